"""EleutherAI sparsify SAE directories (`cfg.json` + `sae.safetensors`), read and written.

sparsify's SparseCoder: encoder.weight (num_latents, d_in), encoder.bias (num_latents,),
W_dec (num_latents, d_in), b_dec (d_in,); x_hat = TopK(relu((x - b_dec) encoder.weight.T +
encoder.bias)) W_dec + b_dec: an N = 1 Switch SAE.  Options: activation "topk" (or
"groupmax": refused), num_latents (0: d_in * expansion_factor), k; normalize_decoder and
multi_topk only change training; skip_connection and transcode are refused.  Fields
sparsify ignores are ignored.  A sparsify training run keeps one such directory per
hookpoint (`<run>/<hookpoint>/`); given the run directory, its only hookpoint is loaded,
or the error lists them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from switchsae.core.config import ConfigError, SwitchSAEConfig

from .fields import CFG_FILE, InteropError, check_shapes, read_cfg, read_tensors

WEIGHTS_FILE = "sae.safetensors"


def is_sparsify(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file()


def hookpoints(run: Path) -> list[Path]:
    """The hookpoint directories of a sparsify training run, sorted by name."""
    if not run.is_dir():
        return []
    return sorted(p for p in run.iterdir() if p.is_dir() and is_sparsify(p) and (p / CFG_FILE).is_file())


def read(path: Path) -> tuple[SwitchSAEConfig, dict]:
    """(config, NumPy float64 parameters) of a sparsify SAE directory."""
    cfg = read_cfg(path)
    cfg.str("activation", "topk", choices=("topk", "groupmax"))
    if cfg.data.get("activation", "topk") != "topk":
        raise cfg.error("activation='groupmax' is not a TopK SAE")
    for flag, what in (("transcode", "a transcoder (predicts another module's output)"),
                       ("skip_connection", "a linear skip connection (W_skip)")):
        if cfg.bool(flag, False):
            raise cfg.error(f"{flag}=true: {what} is not a Switch SAE")
    cfg.bool("normalize_decoder", True)
    cfg.bool("multi_topk", False)
    d_in = cfg.int("d_in", None, minimum=1)
    if d_in is None:
        raise cfg.error("d_in is missing")
    k = cfg.int("k", 32, minimum=1)  # sparsify's default
    num_latents = cfg.int("num_latents", 0, minimum=0) or d_in * cfg.int("expansion_factor", 32, minimum=1)
    w = read_tensors(path / WEIGHTS_FILE, {"encoder.weight": 2, "encoder.bias": 1, "W_dec": 2, "b_dec": 1})
    check_shapes(path / WEIGHTS_FILE, w, {"encoder.weight": (num_latents, d_in), "encoder.bias": (num_latents,),
                                          "W_dec": (num_latents, d_in), "b_dec": (d_in,)})
    try:
        config = SwitchSAEConfig(d_in=d_in, n_latents=num_latents, n_experts=1, k=k, encoder_bias=True,
                                 extra={"converted_from": "sparsify", "source": str(path)})
    except ConfigError as e:
        raise cfg.error(str(e)) from e
    params = {"b_pre": w["b_dec"], "b_router": np.zeros(d_in), "W_router": np.zeros((1, d_in)),
              "W_enc": w["encoder.weight"].T[None], "b_enc": w["encoder.bias"][None], "W_dec": w["W_dec"][None]}
    return config, params


def check_exportable(cfg: SwitchSAEConfig) -> None:
    if cfg.n_experts != 1 or cfg.shared_latents:
        raise InteropError(f"sparsify has only plain TopK SAEs; this one has n_experts={cfg.n_experts}"
                           + (f" and a shared expert of {cfg.shared_latents} latents" if cfg.shared_latents else "")
                           + ": export it with format='saelens' (a registered Switch architecture)")


def tensors(cfg: SwitchSAEConfig, params: dict) -> dict:
    """sparsify's tensors (float32) of an N = 1 Switch SAE."""
    check_exportable(cfg)
    m = cfg.n_latents
    out = {"encoder.weight": params["W_enc"][0].T, "encoder.bias": params.get("b_enc", np.zeros((1, m)))[0],
           "W_dec": params["W_dec"][0], "b_dec": params["b_pre"]}
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in out.items()}


def cfg_json(cfg: SwitchSAEConfig) -> dict:
    """sparsify's cfg.json (SparseCoderConfig fields + d_in)."""
    return {"activation": "topk", "expansion_factor": max(cfg.n_latents // cfg.d_in, 1),
            "normalize_decoder": False, "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False,
            "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
