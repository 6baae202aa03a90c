"""TopK SAEs from SAELens and EleutherAI's sparsify as one-expert Switch SAEs.

A TopK SAE, x_hat = TopK(relu((x - b_dec) W_enc + b_enc)) W_dec + b_dec, is a Switch SAE
with N = 1 (the single router probability is exactly 1), b_pre = b_dec and an encoder bias.

SAELens (`sae_weights.safetensors` + `cfg.json`): W_enc (d_in, d_sae), b_enc (d_sae,),
W_dec (d_sae, d_in), b_dec (d_in,); cfg architecture "topk" with `k` (newer releases) or
architecture "standard" with activation_fn_str "topk" and activation_fn_kwargs {"k": ...}
(older ones).  SAELens applies TopK before its ReLU; the kept values are the same.  With
apply_b_dec_to_input = false the input is not centred, which becomes b_enc + b_dec W_enc.

sparsify (`sae.safetensors` + `cfg.json`): encoder.weight (num_latents, d_in), encoder.bias,
W_dec (num_latents, d_in), b_dec; cfg `d_in`, `k`, `num_latents` (0: d_in * expansion_factor).

Decoder rows are kept as stored (not renormalised) so outputs match the original exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from switchsae.core.config import SwitchSAEConfig

from .checkpoint import CFG_FILE, read_safetensors

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"


class InteropError(ValueError):
    """A foreign SAE checkpoint this library cannot represent, or a malformed one."""


def load_topk(path, backend=None, dtype: str | None = None):
    """Load a SAELens or sparsify TopK SAE directory (detected by its weights file name)."""
    path = Path(path)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return load_sparsify(path, backend, dtype)
    if (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path, backend, dtype)
    raise InteropError(f"{path} is neither a switchsae checkpoint nor a SAELens ({SAELENS_WEIGHTS}) "
                       f"or sparsify ({SPARSIFY_WEIGHTS}) TopK SAE directory")


def load_saelens(path, backend=None, dtype: str | None = None):
    """A SAELens TopK SAE as an N = 1 `SwitchSAE` (dtype: default float32)."""
    path = Path(path)
    cfg = _read_cfg(path)
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    topk = cfg.get("architecture") == "topk" or cfg.get("activation_fn_str") == "topk"
    if not topk or k is None:
        raise InteropError(f"{path / CFG_FILE}: not a TopK SAE (architecture={cfg.get('architecture')!r}, "
                           f"activation_fn_str={cfg.get('activation_fn_str')!r}, k={k!r})")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):  # the latter is the identity at inference
        raise InteropError(f"{path / CFG_FILE}: normalize_activations={norm!r} rescales each token; "
                           "a Switch SAE cannot represent it")
    w = _read_weights(path / SAELENS_WEIGHTS, {"W_enc", "b_enc", "W_dec", "b_dec"}, {"scaling_factor"})
    W_dec = w["W_dec"] * w["scaling_factor"][:, None] if "scaling_factor" in w else w["W_dec"]
    b_enc = w["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + w["b_dec"] @ w["W_enc"]
    return _as_switch(path, "saelens", w["W_enc"], b_enc, W_dec, w["b_dec"], int(k), backend, dtype)


def load_sparsify(path, backend=None, dtype: str | None = None):
    """An EleutherAI sparsify TopK SAE as an N = 1 `SwitchSAE` (dtype: default float32)."""
    path = Path(path)
    cfg = _read_cfg(path)
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise InteropError(f"{path / CFG_FILE}: {flag}=true is not a plain TopK autoencoder")
    if cfg.get("activation", "topk") != "topk" or "k" not in cfg:
        raise InteropError(f"{path / CFG_FILE}: not a TopK SAE (activation={cfg.get('activation')!r}, "
                           f"k={cfg.get('k')!r})")
    w = _read_weights(path / SPARSIFY_WEIGHTS, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, set())
    return _as_switch(path, "sparsify", w["encoder.weight"].T, w["encoder.bias"], w["W_dec"], w["b_dec"],
                      int(cfg["k"]), backend, dtype)


def _read_cfg(path: Path) -> dict:
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except FileNotFoundError as e:
        raise InteropError(f"{path / CFG_FILE} is missing") from e
    except ValueError as e:
        raise InteropError(f"{path / CFG_FILE} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise InteropError(f"{path / CFG_FILE} must hold a JSON object")
    return cfg


def _read_weights(path: Path, required: set, optional: set) -> dict:
    arrays, _ = read_safetensors(path)
    missing, unknown = sorted(required - set(arrays)), sorted(set(arrays) - required - optional)
    if missing or unknown:
        raise InteropError(f"{path}: missing tensors {missing}, unexpected tensors {unknown}")
    return {name: a.astype(np.float64) for name, a in arrays.items()}


def _as_switch(path, origin, W_enc, b_enc, W_dec, b_dec, k, backend, dtype):
    """(d_in, d_sae) encoder, (d_sae, d_in) decoder -> an N = 1 SwitchSAE (shapes checked)."""
    from .model import SwitchSAE

    d_in, d_sae = W_enc.shape
    expect = {"encoder": ((d_in, d_sae), W_enc), "encoder bias": ((d_sae,), b_enc),
              "decoder": ((d_sae, d_in), W_dec), "decoder bias": ((d_in,), b_dec)}
    for what, (shape, a) in expect.items():
        if a.shape != shape:
            raise InteropError(f"{path}: {what} has shape {a.shape}, expected {shape} "
                               f"for d_in={d_in}, d_sae={d_sae}")
    cfg = SwitchSAEConfig(d_in=d_in, n_latents=d_sae, n_experts=1, k=k, encoder_bias=True,
                          dtype=dtype or "float32", extra={"converted_from": origin, "source": str(path)})
    params = {"b_pre": b_dec, "b_router": np.zeros(d_in), "W_router": np.zeros((1, d_in)),
              "W_enc": W_enc[None], "b_enc": b_enc[None], "W_dec": W_dec[None]}
    return SwitchSAE.from_params(cfg, params, backend)
