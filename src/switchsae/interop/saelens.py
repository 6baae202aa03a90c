"""SAELens SAE directories (`cfg.json` + `sae_weights.safetensors`), read and written.

Read: a TopK SAE, x_hat = TopK(relu((x - b_dec) W_enc + b_enc)) W_dec + b_dec, is an N = 1
Switch SAE (its one router probability is exactly 1) with b_pre = b_dec and an encoder bias.
Every SAELens option maps exactly or is refused by name:
  architecture "topk", or (SAELens < 6) "standard" with activation_fn(_str) "topk" and
    activation_fn_kwargs {"k": ...}; any other architecture is refused;
  apply_b_dec_to_input false: the input is not centred -> b_enc + b_dec W_enc;
  rescale_acts_by_decoder_norm true (SAELens's trainer default): TopK of pre * |W_dec row|
    and decode of acts / |W_dec row| -> folded into W_enc, b_enc, W_dec (as SAELens's own
    fold_W_dec_norm does), the same x_hat up to float rounding;
  a `scaling_factor` tensor (finetuning_scaling_factor) scales the decoder rows;
  normalize_activations "none" or "expected_average_only_in" (identity at inference, as in
    SAELens); "layer_norm", "constant_norm_rescale", "covariance_whitening" are refused;
  reshape_activations "hook_z": the SAE reads the flattened (n_heads * d_head) vector.
  Fields SAELens itself ignores (training settings, metadata) are ignored.
And the "switch" architecture this library exports (see `switch_fields`).

Written: N = 1 (one expert per token, no shared expert) as SAELens's own "topk" SAE; any
other Switch SAE as architecture "switch", which SAELens loads after
`import switchsae.integrations.saelens`.  The tensors of "switch": W_enc (d_in, d_sae),
b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,) = b_pre, W_router (N, d_in),
b_router (d_in,), with d_sae = M + m_s (the shared expert's latents last).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from switchsae.core.config import ConfigError, SwitchSAEConfig

from .fields import check_shapes, read_cfg, read_tensors

WEIGHTS_FILE = "sae_weights.safetensors"
SWITCH_ARCHITECTURE = "switch"
NORMALIZATIONS_KEPT = ("none", "expected_average_only_in")
NORMALIZATIONS = NORMALIZATIONS_KEPT + ("layer_norm", "constant_norm_rescale", "covariance_whitening")
# SwitchSAEConfig fields a "switch" cfg.json carries at top level (the rest: d_in, d_sae)
SWITCH_FIELDS = ("n_experts", "k", "experts_per_token", "router_scale", "shared_latents", "shared_k",
                 "encoder_bias")
# training-only settings, kept in metadata["switchsae"] so a round trip loses nothing
TRAINING_FIELDS = ("lb_coef", "auxk_coef", "k_aux", "dead_tokens")


def is_saelens(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file()


def read(path: Path) -> tuple[SwitchSAEConfig, dict]:
    """(config, NumPy float64 parameters) of a SAELens SAE directory."""
    cfg = read_cfg(path)
    architecture = cfg.str("architecture", "standard")
    if architecture == SWITCH_ARCHITECTURE:
        return _read_switch(path, cfg)
    activation = cfg.str("activation_fn", None) or cfg.str("activation_fn_str", None)
    kwargs = cfg.dict("activation_fn_kwargs", None)
    if architecture != "topk" and not (architecture == "standard" and activation == "topk"):
        raise cfg.error(f"architecture={architecture!r} (activation_fn={activation!r}) is not a TopK SAE; "
                        f"switchsae reads SAELens 'topk' and '{SWITCH_ARCHITECTURE}' SAEs")
    k = cfg.int("k", None, minimum=1)
    k_old = kwargs.int("k", None, minimum=1) if kwargs is not None else None
    if k is not None and k_old is not None and k != k_old:
        raise cfg.error(f"k={k} disagrees with activation_fn_kwargs k={k_old}")
    k = k if k is not None else k_old
    if k is None:
        raise cfg.error("a TopK SAE needs k (or activation_fn_kwargs {\"k\": ...})")
    _check_common(cfg)
    rescale = cfg.bool("rescale_acts_by_decoder_norm", False)
    fine_tuned = cfg.bool("finetuning_scaling_factor", False)
    w = read_tensors(path / WEIGHTS_FILE, {"W_enc": 2, "b_enc": 1, "W_dec": 2, "b_dec": 1},
                     {"scaling_factor": 1})
    d_in, d_sae = w["W_enc"].shape
    check_shapes(path / WEIGHTS_FILE, w, {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
                                          "scaling_factor": (d_sae,)})
    _check_dims(cfg, d_in, d_sae)
    if k > d_sae:
        raise cfg.error(f"k={k} exceeds d_sae={d_sae}")
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    scale = w.get("scaling_factor")
    if scale is not None and not np.all(scale == 1.0):  # SAELens drops an all-ones factor
        if not fine_tuned:
            raise cfg.error("sae_weights.safetensors holds a scaling_factor but finetuning_scaling_factor "
                            "is false (SAELens refuses this too)")
        if rescale:
            raise cfg.error("a finetuning scaling_factor together with rescale_acts_by_decoder_norm=true "
                            "is not a SAELens TopK SAE")
        W_dec = W_dec * scale[:, None]
    if rescale:
        norms = np.linalg.norm(W_dec, axis=1)
        if not np.all(norms > 0):
            raise cfg.error(f"rescale_acts_by_decoder_norm=true with {int(np.sum(norms == 0))} zero decoder "
                            "rows: SAELens divides by their norm, the SAE is undefined")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if not cfg.bool("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    config = _config(cfg, d_in=d_in, n_latents=d_sae, n_experts=1, k=k, encoder_bias=True,
                     extra={"converted_from": "saelens", "source": str(path)})
    params = {"b_pre": b_dec, "b_router": np.zeros(d_in), "W_router": np.zeros((1, d_in)),
              "W_enc": W_enc[None], "b_enc": b_enc[None], "W_dec": W_dec[None]}
    return config, params


def _check_common(cfg) -> None:
    """The options every SAELens SAE has, mapped or refused."""
    norm = cfg.data.get("normalize_activations")
    if isinstance(norm, bool):  # SAELens < 6 wrote a flag: true meant expected_average_only_in
        norm = NORMALIZATIONS_KEPT[int(norm)]
    elif norm is not None:
        norm = cfg.str("normalize_activations", choices=NORMALIZATIONS)
    if (norm or "none") not in NORMALIZATIONS_KEPT:
        raise cfg.error(f"normalize_activations={norm!r} rescales each token at run time; "
                        "a Switch SAE cannot represent it")
    cfg.str("reshape_activations", "none", choices=("none", "hook_z"))
    cfg.str("dtype", None)
    cfg.dict("metadata", None)


def _check_dims(cfg, d_in: int, d_sae: int) -> None:
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        given = cfg.int(name, None)
        if given is not None and given != value:
            raise cfg.error(f"{name}={given} but the weights have {name}={value}")


def _config(cfg, **fields) -> SwitchSAEConfig:
    try:
        return SwitchSAEConfig(**fields)
    except ConfigError as e:
        raise cfg.error(str(e)) from e


def _read_switch(path: Path, cfg) -> tuple[SwitchSAEConfig, dict]:
    _check_common(cfg)
    if cfg.str("normalize_activations", "none") != "none" or cfg.str("reshape_activations", "none") != "none":
        raise cfg.error(f"architecture {SWITCH_ARCHITECTURE!r} takes normalize_activations and "
                        "reshape_activations 'none'")
    if not cfg.bool("apply_b_dec_to_input", True):
        raise cfg.error(f"architecture {SWITCH_ARCHITECTURE!r} needs apply_b_dec_to_input=true")
    w = read_tensors(path / WEIGHTS_FILE, {"W_enc": 2, "b_enc": 1, "W_dec": 2, "b_dec": 1,
                                           "W_router": 2, "b_router": 1})
    d_in, d_sae = w["W_enc"].shape
    n = cfg.int("n_experts", None, minimum=1)
    if n is None:
        raise cfg.error(f"architecture {SWITCH_ARCHITECTURE!r} needs n_experts")
    check_shapes(path / WEIGHTS_FILE, w, {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
                                          "W_router": (n, d_in), "b_router": (d_in,)})
    _check_dims(cfg, d_in, d_sae)
    given = {name: cfg.data[name] for name in SWITCH_FIELDS if name in cfg}
    meta = cfg.dict("metadata", None)
    training = meta.dict("switchsae", None) if meta is not None else None
    given.update({name: training.data[name] for name in TRAINING_FIELDS if training and name in training})
    shared = cfg.int("shared_latents", 0, minimum=0)
    config = _config(cfg, d_in=d_in, n_latents=d_sae - shared, **given,
                     extra={"converted_from": "saelens", "source": str(path)})
    M, m, ms = config.n_latents, config.expert_width, config.shared_latents
    params = {"b_pre": w["b_dec"], "b_router": w["b_router"], "W_router": w["W_router"],
              "W_enc": w["W_enc"][:, :M].reshape(d_in, n, m).transpose(1, 0, 2),
              "W_dec": w["W_dec"][:M].reshape(n, m, d_in)}
    if config.encoder_bias:
        params["b_enc"] = w["b_enc"][:M].reshape(n, m)
    elif np.any(w["b_enc"] != 0):
        raise cfg.error("encoder_bias=false but b_enc is not zero")
    if ms:
        params["W_enc_shared"], params["W_dec_shared"] = w["W_enc"][:, M:], w["W_dec"][M:]
        if config.encoder_bias:
            params["b_enc_shared"] = w["b_enc"][M:]
    return config, params


def switch_fields(cfg: SwitchSAEConfig) -> dict:
    """The cfg.json fields of an exported Switch SAE beyond SAELens's common ones."""
    return {name: getattr(cfg, name) for name in SWITCH_FIELDS}


def is_plain_topk(cfg: SwitchSAEConfig) -> bool:
    """N = 1 without a shared expert: exactly a TopK SAE."""
    return cfg.n_experts == 1 and cfg.shared_latents == 0


def tensors(cfg: SwitchSAEConfig, params: dict) -> dict:
    """SAELens tensors (float32) of a Switch SAE: the TopK layout for N = 1, else "switch"'s."""
    d, n, m = cfg.d_in, cfg.n_experts, cfg.expert_width
    b_enc = params.get("b_enc", np.zeros((n, m)))
    W_enc = [params["W_enc"].transpose(1, 0, 2).reshape(d, n * m)]
    W_dec = [params["W_dec"].reshape(n * m, d)]
    b = [b_enc.reshape(n * m)]
    if cfg.shared_latents:
        W_enc.append(params["W_enc_shared"])
        W_dec.append(params["W_dec_shared"])
        b.append(params.get("b_enc_shared", np.zeros(cfg.shared_latents)))
    out = {"W_enc": np.concatenate(W_enc, axis=1), "b_enc": np.concatenate(b),
           "W_dec": np.concatenate(W_dec), "b_dec": params["b_pre"]}
    if not is_plain_topk(cfg):
        out.update(W_router=params["W_router"], b_router=params["b_router"])
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in out.items()}


def cfg_json(cfg: SwitchSAEConfig, metadata: dict) -> dict:
    """The cfg.json SAELens's `SAE.load_from_disk` reads (version 6 layout)."""
    import switchsae

    out = {"d_in": cfg.d_in, "d_sae": cfg.total_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none"}
    meta = {"sae_lens_version": "6.0.0", "sae_lens_training_version": None,
            "exported_by": f"switchsae {switchsae.__version__}", **metadata}
    if is_plain_topk(cfg):
        out.update(architecture="topk", k=cfg.k, rescale_acts_by_decoder_norm=False)
    else:
        out.update(architecture=SWITCH_ARCHITECTURE, **switch_fields(cfg))
        meta["switchsae"] = {name: getattr(cfg, name) for name in TRAINING_FIELDS}
    out["metadata"] = meta
    return out
