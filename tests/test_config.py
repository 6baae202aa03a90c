import pytest

from switchsae import ConfigError, SwitchSAEConfig


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


def test_defaults_follow_the_paper():
    cfg = SwitchSAEConfig(d_in=768, n_latents=2**15, n_experts=16, k=32)
    assert cfg.expert_width == 2048
    assert cfg.lb_weight == 3.0 * 768
    assert cfg.aux_k == 384
    assert abs(cfg.default_lr - 2e-4 / 2**0.5) < 1e-12
    assert not cfg.encoder_bias and "b_enc" not in cfg.param_shapes()


def test_dict_round_trip_and_unknown_fields():
    cfg = SwitchSAEConfig(d_in=8, n_latents=32, n_experts=4, k=2, encoder_bias=True)
    assert SwitchSAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config fields"):
        SwitchSAEConfig.from_dict({**cfg.to_dict(), "experts": 3})
