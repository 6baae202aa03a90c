import pytest

from switchsae import ConfigError, SwitchSAEConfig, TrainConfig
from switchsae.core.config import LR_ANCHOR, LR_MAX


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_in=8, n_latents=30, n_experts=4, k=2), "divisible by n_experts"),
    (dict(d_in=8, n_latents=32, n_experts=4, k=9), "k (9) must be <= latents per expert"),
    (dict(d_in=8, n_latents=32, n_experts=4, k=0), "k must be a positive integer"),
    (dict(d_in=0, n_latents=32, n_experts=4, k=2), "d_in must be a positive integer"),
    (dict(d_in=8, n_latents=32, n_experts=4, k=2, router_scale="heavy"), "router_scale must be one of"),
    (dict(d_in=8, n_latents=32, n_experts=4, k=2, dtype="int8"), "dtype must be one of"),
    (dict(d_in=8, n_latents=32, n_experts=4, k=2, lb_coef=-1.0), "lb_coef must be"),
    (dict(d_in=8.5, n_latents=32, n_experts=4, k=2), "d_in must be a positive integer"),
])
def test_invalid_configs_name_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SwitchSAEConfig(**kwargs)


def test_defaults_are_the_measured_ones_and_the_paper_is_a_preset():
    cfg = SwitchSAEConfig(d_in=768, n_latents=2**15, n_experts=16, k=32)
    assert cfg.expert_width == 2048
    assert cfg.lb_weight == pytest.approx(0.1 * 768)  # LB_ALPHA, exact up to float rounding
    assert cfg.auxk_coef == 1 / 32 and cfg.dead_tokens is None  # the trainer derives the window
    assert cfg.aux_k == 384
    assert cfg.default_lr == LR_MAX  # m = 2048 latents per expert: LR_ANCHOR * sqrt(8) is above the cap
    assert not cfg.encoder_bias and "b_enc" not in cfg.param_shapes()
    paper = SwitchSAEConfig.preset("paper", d_in=768, n_latents=2**15, n_experts=16, k=32)
    assert (paper.lb_weight, paper.auxk_coef, paper.dead_tokens) == (3.0 * 768, 0.0, 10_000_000)
    assert paper.replace(lb_coef=None, auxk_coef=1 / 32, dead_tokens=None) == cfg
    assert SwitchSAEConfig.preset("default", d_in=768, n_latents=2**15, n_experts=16, k=32) == cfg
    assert SwitchSAEConfig.preset("paper", d_in=8, n_latents=32, auxk_coef=0.5).auxk_coef == 0.5  # fields win
    with pytest.raises(ConfigError, match="unknown preset 'gpt'"):
        SwitchSAEConfig.preset("gpt", d_in=8, n_latents=32)


def test_learning_rate_rules():
    cfg = SwitchSAEConfig(d_in=768, n_latents=2**15, n_experts=16, k=32)
    assert TrainConfig.paper().learning_rate(cfg) == 2e-4 / 2**0.5  # the paper's code: total M
    assert TrainConfig(lr=3e-3).learning_rate(cfg) == 3e-3
    # the library's: by the latents per expert, so FLOP-matched N = 16 gets dense's rate ...
    dense = SwitchSAEConfig(d_in=768, n_latents=2**16, n_experts=1, k=32)
    flop_matched = dense.replace(n_latents=16 * 2**16, n_experts=16)
    assert TrainConfig().learning_rate(flop_matched) == TrainConfig().learning_rate(dense) == LR_ANCHOR / 2
    # ... and at most LR_MAX for small dictionaries
    assert TrainConfig().learning_rate(SwitchSAEConfig(d_in=384, n_latents=3072, n_experts=8)) == LR_MAX


def test_settings_derived_from_the_run_size():
    cfg = SwitchSAEConfig(d_in=384, n_latents=3072, n_experts=8, k=32)
    tc = TrainConfig(steps=1000, batch_size=2048)
    assert tc.warmup == 10 and TrainConfig(steps=50).warmup == 0 and TrainConfig.paper().warmup == 0
    # counted in the tokens routed to the latent's expert (the default): 5% of the 1/N of the
    # run's tokens an expert sees; counted over every token: 5% of the run's tokens
    assert tc.dead_threshold(cfg) == round(0.05 * 1000 * 2048 / 8)
    assert tc.replace(dead_count="batch").dead_threshold(cfg) == round(0.05 * 1000 * 2048)
    assert tc.dead_threshold(cfg.replace(n_experts=1)) == round(0.05 * 1000 * 2048)
    top2 = cfg.replace(experts_per_token=2)  # each token reaches 2 of the 8 experts
    assert tc.dead_threshold(top2) == round(0.05 * 1000 * 2048 * 2 / 8)
    assert TrainConfig.paper(steps=1000, batch_size=2048).dead_threshold(cfg.replace(dead_tokens=None)) == \
        round(0.05 * 1000 * 2048)
    assert TrainConfig(steps=10**7, batch_size=4096).dead_threshold(cfg) == 10_000_000  # capped
    # at least one batch's worth of the tokens a latent sees
    assert TrainConfig(steps=4, batch_size=64).dead_threshold(cfg) == 64 // 8
    assert TrainConfig(steps=4, batch_size=64, dead_count="batch").dead_threshold(cfg) == 64
    assert tc.dead_threshold(cfg.replace(dead_tokens=777)) == 777
    assert tc.replace(dead_tokens=55).dead_threshold(cfg.replace(dead_tokens=777)) == 55
    with pytest.raises(ConfigError, match="lr_anchor"):
        TrainConfig(lr_anchor=0.0)


def test_dict_round_trip_and_unknown_fields():
    cfg = SwitchSAEConfig(d_in=8, n_latents=32, n_experts=4, k=2, encoder_bias=True)
    assert SwitchSAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config fields"):
        SwitchSAEConfig.from_dict({**cfg.to_dict(), "experts": 3})
