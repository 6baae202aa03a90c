"""Switch SAEs inside other libraries.  `switchsae.integrations.saelens` registers the Switch
architecture with SAELens (importing it needs sae_lens and torch)."""
