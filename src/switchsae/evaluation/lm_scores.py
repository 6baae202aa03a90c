"""Downstream scores on a causal language model, as SAELens defines them
(`sae_lens.evals.get_downstream_reconstruction_metrics`).

The SAE's x_hat is spliced in at `layer` (0 = embedding output, i = input of block i, as in
`switchsae.data.harvest`; SAELens's `blocks.i.hook_resid_pre`) for every token except the
special ones; the zero ablation writes zeros at every token.  Over the next-token
predictions of the non-special, non-padding positions:

    ce_loss_score = (CE_zero_ablated - CE_spliced) / (CE_zero_ablated - CE_clean)
    kl_div_score  = (KL_zero_ablated - KL_spliced) / KL_zero_ablated

with CE the mean next-token cross-entropy and KL the mean over positions of
KL(clean next-token distribution || the spliced one).  1 = the SAE loses nothing the model
uses, 0 = as bad as removing the layer.  Also reported: the CE losses, the KLs and the
difference CE_spliced - CE_clean (Gemma Scope's "delta LM loss").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


from switchsae.data.models import load_model, model_config, tokenize

from .fidelity import FidelityError, LayerSplice, _as_function, _zeros


@dataclass(frozen=True)
class LMScores:
    """ce_loss_score, kl_div_score: see the module docstring.  ce_loss_clean/_with_sae/
    _with_ablation: mean next-token cross-entropy (nats); kl_div_with_sae/_with_ablation:
    mean KL (nats); delta_lm_loss = ce_loss_with_sae - ce_loss_clean; n_tokens: predictions
    scored."""

    ce_loss_score: float
    kl_div_score: float
    ce_loss_clean: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    kl_div_with_sae: float
    kl_div_with_ablation: float
    delta_lm_loss: float
    n_tokens: int
    layer: int

    def summary(self) -> dict:
        return asdict(self)


def is_causal_lm(model_path) -> bool:
    """Whether a local model directory holds a causal language model (its config names an
    architecture ending in ForCausalLM or LMHeadModel that AutoModelForCausalLM builds)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = model_config(model_path)
    named = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    return named and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def lm_scores(reconstruct, texts: Sequence[str], layer: int, model, *, batch_size: int = 8,
              max_length: int = 128, max_tokens: int | None = None, device: str | None = None,
              progress: bool = True) -> LMScores:
    """SAELens's CE-loss and KL scores of `reconstruct` (a SwitchSAE or a callable on
    (n_tokens, d_model) float32 arrays) spliced in at `layer` of the causal LM `model` (a
    local directory or a (tokenizer, AutoModelForCausalLM) pair) over `texts` (long ones in
    windows of max_length tokens), stopping once `max_tokens` predictions are scored."""
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise FidelityError("texts must be a non-empty sequence of strings")
    if batch_size < 1 or max_length < 2:
        raise FidelityError(f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    fn = _as_function(reconstruct)
    tok, lm = model if isinstance(model, tuple) else load_model(model, device, causal_lm=True, progress=progress)
    import torch

    enc_all, _ = tokenize(tok, texts, max_length, return_special_tokens_mask=True)
    windows = [{k: enc_all[k][i] for k in ("input_ids", "attention_mask", "special_tokens_mask")}
               for i in range(len(enc_all["input_ids"])) if len(enc_all["input_ids"][i]) >= 2]
    if not windows:
        raise FidelityError("every text is shorter than 2 tokens: nothing to predict")
    sums = dict.fromkeys(("ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl"), 0.0)
    n = 0
    splice = LayerSplice(lm, layer)
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                batch = tok.pad(windows[i:i + batch_size], return_tensors="pt")
                special = batch.pop("special_tokens_mask").bool()
                real = batch["attention_mask"].bool()
                batch = batch.to(lm.device)
                splice.fn = None
                splice.keep = real
                clean = lm(**batch).logits.double()
                splice.fn, splice.keep = fn, real & ~special
                spliced = lm(**batch).logits.double()
                splice.fn, splice.keep = _zeros, real
                ablated = lm(**batch).logits.double()
                # prediction at t scores token t + 1: both real, the position not special
                scored = (real[:, :-1] & real[:, 1:] & ~special[:, :-1]).to(clean.device)
                target = batch["input_ids"][:, 1:]
                log_clean = torch.log_softmax(clean[:, :-1], -1)
                for name, logits in (("clean", clean), ("sae", spliced), ("abl", ablated)):
                    log_p = torch.log_softmax(logits[:, :-1], -1)
                    ce = -log_p.gather(-1, target[..., None])[..., 0]
                    sums[f"ce_{name}"] += float(ce[scored].sum())
                    if name != "clean":
                        kl = (log_clean.exp() * (log_clean - log_p)).sum(-1)
                        sums[f"kl_{name}"] += float(kl[scored].sum())
                n += int(scored.sum())
                if max_tokens is not None and n >= max_tokens:
                    break
    finally:
        splice.remove()
    if n == 0:
        raise FidelityError("no next-token predictions to score (every position is padding or special)")
    m = {k: v / n for k, v in sums.items()}
    ce_gap, kl_abl = m["ce_abl"] - m["ce_clean"], m["kl_abl"]
    return LMScores(
        ce_loss_score=(m["ce_abl"] - m["ce_sae"]) / ce_gap if ce_gap != 0 else float("nan"),
        kl_div_score=(kl_abl - m["kl_sae"]) / kl_abl if kl_abl != 0 else float("nan"),
        ce_loss_clean=m["ce_clean"], ce_loss_with_sae=m["ce_sae"], ce_loss_with_ablation=m["ce_abl"],
        kl_div_with_sae=m["kl_sae"], kl_div_with_ablation=kl_abl, delta_lm_loss=m["ce_sae"] - m["ce_clean"],
        n_tokens=n, layer=splice.layer)
