"""Reproducible experiments (run from the repository root: `python -m experiments.paper`)."""
