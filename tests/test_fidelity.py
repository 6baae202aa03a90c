"""Downstream fidelity on the real MiniLM-L6 (CPU, four short texts): splicing the identity
changes nothing, splicing the ablation gives the floor exactly, and the spliced rows are the
harvested activations."""

import functools

import array_api_compat.numpy as xnp
import numpy as np
import pytest

from switchsae import SwitchSAE, SwitchSAEConfig
from switchsae.backends import load_backend
from switchsae.core import metrics
from switchsae.data import harvest
from switchsae.evaluation.fidelity import FidelityError, load_model, splice_fidelity

TEXTS = ["Hello world.",
         "The quick brown fox jumps over the lazy dog near the quiet river bank today.",
         "Sparse autoencoders find interpretable features.",
         "A for loop runs its body once per item."]
KW = dict(batch_size=3)  # two batches, the first padded


@pytest.fixture(scope="module")
def model():
    return load_model()


@functools.lru_cache(maxsize=None)
def _harvested(layer, skip_special_tokens=False):
    """switchsae.data.harvest's rows for TEXTS (the reference for what gets spliced)."""
    return np.concatenate(list(harvest(None, TEXTS, layer, batch_size=3, progress=False,
                                       skip_special_tokens=skip_special_tokens)))


@pytest.mark.parametrize("layer", [0, 3, 6])
def test_identity_splice_is_perfect_and_sees_the_harvested_rows(model, layer):
    seen = []

    def identity(x):
        seen.append(x.copy())
        return x

    fid = splice_fidelity(identity, TEXTS, layer, model, **KW)
    assert fid.cos_sae == pytest.approx(1.0, abs=1e-9)
    assert fid.fraction_recovered == pytest.approx(1.0, abs=1e-8)
    assert fid.layer_fvu == 0.0 and fid.layer == layer and fid.n_texts == 4
    assert fid.cos_ablated < 0.9          # zeroing a layer does move the embedding
    rows = np.concatenate(seen)
    assert fid.n_tokens == len(rows)
    np.testing.assert_allclose(rows, _harvested(layer), rtol=0, atol=1e-5)  # same batches: float32 noise


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_splicing_the_ablation_gives_the_floor_exactly(model, ablation):
    mean = _harvested(3).astype(np.float64).mean(axis=0).astype(np.float32)
    floor = (lambda x: np.zeros_like(x)) if ablation == "zero" else (lambda x: np.broadcast_to(mean, x.shape))
    fid = splice_fidelity(floor, TEXTS, 3, model, ablation=ablation, **KW)
    # zero: bit-identical runs; mean: our float32 mean may differ from the module's in the
    # last bit (different summation order)
    tol = 0.0 if ablation == "zero" else 1e-6
    assert fid.cos_sae == pytest.approx(fid.cos_ablated, abs=tol)
    assert fid.fraction_recovered == pytest.approx(0.0, abs=tol)
    # FVU of predicting the mean is 1 by definition; of predicting zeros, 1 + ||mean||^2 n / TV
    if ablation == "mean":
        assert fid.layer_fvu == pytest.approx(1.0, rel=1e-5)
    else:
        assert fid.layer_fvu > 1.0


def test_small_perturbation_loses_a_little(model):
    rng = np.random.default_rng(0)
    fid = splice_fidelity(lambda x: x + 0.05 * x.std() * rng.normal(size=x.shape), TEXTS, 3, model, **KW)
    assert 0.99 < fid.cos_sae < 1.0 - 1e-7
    assert 0.9 < fid.fraction_recovered < 1.0


def test_a_switch_sae_is_spliced_with_its_reconstruction(model):
    sae = SwitchSAE.init(SwitchSAEConfig(d_in=384, n_latents=64, n_experts=4, k=4), seed=0,
                         backend=load_backend("numpy"))
    acts = _harvested(3)
    x_hat = sae.forward(acts).x_hat
    expected_fvu = float(metrics.fvu(acts.astype(np.float64), x_hat.astype(np.float64), xnp))
    fid = splice_fidelity(sae, TEXTS, 3, model, **KW)
    assert fid.layer_fvu == pytest.approx(expected_fvu, rel=1e-4)
    assert fid.cos_sae < 0.999 and np.isfinite(fid.fraction_recovered)


def test_special_tokens_can_stay_unspliced(model):
    fid = splice_fidelity(lambda x: x, TEXTS, 3, model, skip_special_tokens=True, **KW)
    assert fid.n_tokens == len(_harvested(3, skip_special_tokens=True)) == len(_harvested(3)) - 8


def test_bad_arguments_are_refused(model):
    with pytest.raises(FidelityError, match="layer 7 out of range"):
        splice_fidelity(lambda x: x, TEXTS, 7, model)
    with pytest.raises(FidelityError, match="ablation"):
        splice_fidelity(lambda x: x, TEXTS, 3, model, ablation="noise")
    with pytest.raises(FidelityError, match="shape"):
        splice_fidelity(lambda x: x[:, :10], TEXTS, 3, model)
    with pytest.raises(FidelityError, match="SwitchSAE or a callable"):
        splice_fidelity(42, TEXTS, 3, model)
