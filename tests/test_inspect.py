"""The feature browser's data (switchsae.inspect), checked against the metrics API and
against activations recomputed with `SwitchSAE.forward`, on real MiniLM-L6 activations."""

import importlib.machinery
import json
import re
import sys
import types

import array_api_compat.numpy as xnp
import numpy as np
import pytest

import switchsae
from switchsae.core import metrics
from switchsae.inspect import Corpus, build_site, collect, read_site_data
from switchsae.inspect.cli import main
from switchsae.inspect.encode import Codes
from switchsae.inspect.features import context_windows, feature_stats, top_activations, window_activations
from switchsae.inspect.geometry import map_2d, nearest_in_other_experts, pca_2d

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A list comprehension builds a new list: [x * 2 for x in items if x > 0].",
    "Raise a ValueError when the argument has the right type but an invalid value.",
    "The with statement wraps a block in a context manager's __enter__ and __exit__ methods.",
    "Dictionaries map hashable keys to values; keys() returns a view of them.",
    "Sparse autoencoders decompose activations into interpretable features.",
]
CFG = switchsae.SwitchSAEConfig(d_in=384, n_latents=256, n_experts=4, k=8)
N_DUP = 5  # decoder rows of expert 0 copied into expert 1


@pytest.fixture(scope="module")
def corpus():
    return collect(texts=TEXTS, progress=False)


@pytest.fixture(scope="module")
def sae(corpus):
    """A random SAE centred on the data, with N_DUP features duplicated across experts 0 and 1."""
    params = switchsae.SwitchSAE.init(CFG, seed=1).numpy_params()
    params["b_pre"] = corpus.acts.mean(axis=0)
    params["b_router"] = corpus.acts.mean(axis=0)
    params["W_dec"][1, :N_DUP] = params["W_dec"][0, :N_DUP]
    return switchsae.SwitchSAE.from_params(CFG, params, switchsae.get_backend("numpy"))


@pytest.fixture(scope="module")
def site(sae, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    build_site(sae, corpus, out, n_contexts=6, dense_threshold=0.05)
    return read_site_data(out)


@pytest.fixture(scope="module")
def dense_acts(sae, corpus):
    """(n_tokens, M) every latent's gated activation, recomputed with sae.forward."""
    out = sae.forward(corpus.acts)
    dense = np.zeros((len(corpus.acts), CFG.n_latents))
    np.put_along_axis(dense, np.asarray(out.top_indices), np.asarray(out.top_values), axis=1)
    return dense, np.asarray(out.expert)


def test_collect_aligns_tokens_with_harvested_rows(corpus):
    from switchsae.data import harvest

    ref = np.concatenate(list(harvest(None, TEXTS, progress=False)))
    np.testing.assert_array_equal(corpus.acts, ref)
    assert corpus.acts.shape == (len(corpus.tokens), 384)
    for i, text in enumerate(TEXTS):
        toks = [t for t, d in zip(corpus.tokens, corpus.doc) if d == i]
        assert toks[0] == "[CLS]" and toks[-1] == "[SEP]"
        assert "".join(toks[1:-1]) == text  # display strings rebuild the text


def test_collect_limits_and_special_tokens():
    short = collect(texts=TEXTS, max_tokens=20, skip_special_tokens=True, progress=False)
    assert len(short.tokens) == len(short.acts) == 20
    assert "[CLS]" not in short.tokens and "".join(short.tokens).startswith(TEXTS[0][:20])
    assert collect(texts=TEXTS, max_texts=2, progress=False).doc.max() == 1


def test_corpus_rejects_misaligned_tokens():
    with pytest.raises(ValueError, match="3 activation rows but 2 tokens"):
        Corpus(np.zeros((3, 4)), ["a", "b"], np.zeros(3))


def test_loads_dead_and_dense_match_metrics(site, dense_acts):
    dense, expert = dense_acts
    n = len(dense)
    load = np.asarray(metrics.expert_load(xnp.asarray(expert), CFG.n_experts, xnp))
    np.testing.assert_allclose([e["load"] for e in site["experts"]], load, rtol=1e-6)
    fired = dense > 0
    last = np.where(fired.any(axis=0), n - 1 - np.argmax(fired[::-1], axis=0), -1)
    since = np.where(last >= 0, n - 1 - last, n)  # tokens since each latent last fired
    assert site["summary"]["dead_fraction"] == pytest.approx(float(metrics.dead_fraction(since, n, xnp)))
    m = CFG.expert_width
    assert [e["dead"] for e in site["experts"]] == [int((~fired.any(0))[e * m:(e + 1) * m].sum()) for e in range(4)]
    freq = fired.mean(axis=0)
    assert site["summary"]["dense_fraction"] == pytest.approx(float(metrics.dense_fraction(freq, xnp, 0.05)))
    assert sum(e["dense"] for e in site["experts"]) == int((freq > 0.05).sum()) == site["summary"]["dense"]
    assert 0 < site["summary"]["dead"] < CFG.n_latents and site["summary"]["dense"] > 0  # both exercised
    np.testing.assert_allclose([f["f"] for f in site["features"]], freq, rtol=1e-3)
    assert [sum(f["hist"]) for f in site["features"]] == fired.sum(axis=0).tolist()


def test_duplication_fraction_and_nearest_features(site, sae):
    W_dec = sae.numpy_params()["W_dec"]
    expected = float(metrics.duplication_fraction(xnp.asarray(W_dec), xnp, 0.9))
    assert site["summary"]["duplication_fraction"] == pytest.approx(expected)
    assert expected == pytest.approx(2 * N_DUP / CFG.n_latents)
    m = CFG.expert_width
    assert site["features"][0]["nn"][0] == [m, 1.0]  # 0/0's twin is 1/0
    rows = W_dec.reshape(CFG.n_latents, -1)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    for f in (7, 100, 255):
        cos = unit @ unit[f]
        cos[(np.arange(CFG.n_latents) // m) == f // m] = -np.inf
        best = np.argsort(-cos, kind="stable")[:5]
        assert [j for j, _ in site["features"][f]["nn"]] == best.tolist()
        np.testing.assert_allclose([c for _, c in site["features"][f]["nn"]], cos[best], atol=1e-3)


def test_top_contexts_are_the_highest_recomputed_activations(site, corpus, dense_acts):
    dense, _ = dense_acts
    checked = 0
    for f, feat in enumerate(site["features"]):
        col = dense[:, f]
        best = np.lexsort((np.arange(len(col)), -col))[:6]
        best = best[col[best] > 0]
        assert len(feat["ctx"]) == len(best)
        for (start, centre, value, permille), row in zip(feat["ctx"], best):
            assert value == pytest.approx(col[row], rel=1e-3)
            assert site["tokens"][start + centre] == corpus.tokens[row]
            assert abs(permille[centre] - 1000 * col[row] / col.max()) <= 0.5 + 1e-3
            window = site["tokens"][start:start + len(permille)]
            assert window == corpus.tokens[row - centre:row - centre + len(permille)]
            np.testing.assert_allclose(np.array(permille) / 1000 * col.max(),
                                       col[row - centre:row - centre + len(permille)], atol=2e-3 * col.max())
            checked += 1
        assert feat["max"] == pytest.approx(col.max(), rel=1e-3)
    assert checked > 100


def test_summary_fvu_l0_and_search_index(site, sae, corpus, dense_acts):
    out = sae.forward(corpus.acts)
    assert site["summary"]["fvu"] == pytest.approx(float(metrics.fvu(corpus.acts, np.asarray(out.x_hat), xnp)), rel=1e-4)
    assert site["summary"]["l0"] == pytest.approx(float(metrics.l0(np.asarray(out.top_values), xnp)))
    dense, _ = dense_acts
    search = site["search"]
    j = search["tok"].index("the")
    rows = [i for i, t in enumerate(corpus.tokens) if t.strip().lower() == "the"]
    assert search["n"][j] == len(rows)
    mean = dense[rows].mean(axis=0)
    top = np.argsort(-mean, kind="stable")[:5]
    assert [f for f, _ in search["top"][j]] == top.tolist()
    np.testing.assert_allclose([v for _, v in search["top"][j]], mean[top], rtol=1e-3)


def test_site_files_are_self_contained(sae, corpus, tmp_path):
    index = build_site(sae, corpus, tmp_path / "out")
    assert sorted(p.name for p in index.parent.iterdir()) == ["app.js", "data.js", "index.html", "style.css"]
    html = index.read_text()
    assert '<script src="data.js"></script>' in html and '<script src="app.js"></script>' in html
    for name in ("index.html", "app.js", "style.css"):
        text = (index.parent / name).read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f"{name} refers to the network"
        assert "fetch(" not in text and "import(" not in text


def test_shared_expert_is_browsable(corpus, tmp_path):
    cfg = switchsae.SwitchSAEConfig(d_in=384, n_latents=64, n_experts=2, k=6, shared_latents=8, shared_k=2)
    sae = switchsae.SwitchSAE.init(cfg, seed=0)
    build_site(sae, corpus, tmp_path)
    data = read_site_data(tmp_path)
    assert [e["key"] for e in data["experts"]] == ["0", "1", "shared"]
    assert data["experts"][2]["start"] == 64 and len(data["features"]) == 72
    out = sae.forward(corpus.acts)
    shared = (np.asarray(out.top_indices) >= 64) & (np.asarray(out.top_values) > 0)
    assert sum(f["n"] for f in data["features"][64:]) == shared.sum() > len(corpus.tokens)


def _codes(values, indices):
    values, indices = np.array(values, float), np.array(indices)
    return Codes(values, indices, np.zeros(len(values), int), 0.0, 0.0)


def test_feature_stats_and_windows_on_hand_made_codes():
    codes = _codes([[3.0, 1.0], [2.0, 0.0], [4.0, 2.0], [1.0, 0.5]],
                   [[0, 1], [1, 2], [0, 2], [2, 1]])
    stats = feature_stats(codes, 4, bins=4)
    assert stats.count.tolist() == [2, 3, 2, 0] and stats.max.tolist() == [4, 2, 2, 0]
    assert stats.hist[0].tolist() == [0, 0, 0, 2] and stats.hist[1].tolist() == [0, 1, 1, 1]
    assert stats.mean.tolist() == [3.5, 3.5 / 3, 1.5, 0] and stats.freq.tolist() == [0.5, 0.75, 0.5, 0]
    rows, values = top_activations(codes, 4, 2)
    assert rows.tolist() == [[2, 0], [1, 0], [2, 3], [-1, -1]]  # the 0.0 in row 1 is no firing
    assert values.tolist() == [[4, 3], [2, 1], [2, 1], [0, 0]]
    doc = np.array([0, 0, 1, 1])
    start, stop = context_windows(np.array([1, 2]), doc, before=5, after=5)
    assert start.tolist() == [0, 2] and stop.tolist() == [2, 4]
    acts = window_activations(codes, np.array([1, 2]), start, stop)
    assert [a.tolist() for a in acts] == [[1.0, 2.0], [2.0, 1.0]]


def test_nearest_features_skip_own_expert_and_handle_one_expert():
    rows = np.eye(4)[[0, 1, 0, 2]] + 0.01
    ids, cos = nearest_in_other_experts(rows, np.array([0, 0, 1, 1]), 5, block_elements=4)
    assert ids.shape == (4, 2) and ids[0, 0] == 2 and ids[2, 0] == 0 and cos[0, 0] == pytest.approx(1)
    assert set(ids[1].tolist()) == {2, 3}
    ids, _ = nearest_in_other_experts(rows, np.zeros(4, int), 5)
    assert ids.shape == (4, 0)


def test_map_is_pca_or_umap_when_installed(monkeypatch):
    rows = np.random.default_rng(0).normal(size=(40, 6)) * [5, 3, 1, 1, 1, 1]
    coords = pca_2d(rows)
    centred = rows - rows.mean(0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    for c in range(2):
        assert abs(abs(np.corrcoef(coords[:, c], centred @ vecs[:, -1 - c])[0, 1]) - 1) < 1e-9
    assert coords[:, 0].var() > coords[:, 1].var()
    monkeypatch.setitem(sys.modules, "umap", None)  # makes umap unimportable
    assert map_2d(rows)[1] == "pca"
    with pytest.raises(ValueError, match="pip install umap-learn"):
        map_2d(rows, "umap")
    fake = types.ModuleType("umap")
    fake.__spec__ = importlib.machinery.ModuleSpec("umap", None)
    fake.UMAP = lambda **kw: types.SimpleNamespace(fit_transform=lambda x: x[:, :2] * 0 + kw["random_state"])
    monkeypatch.setitem(sys.modules, "umap", fake)
    xy, method = map_2d(rows)
    assert method == "umap" and xy.shape == (40, 2)
    assert map_2d(rows, "pca")[1] == "pca"


def test_cli_builds_from_checkpoint_and_reports_errors(sae, tmp_path, capsys):
    from switchsae.checkpoint import save, write_checkpoint

    text = tmp_path / "texts.txt"
    text.write_text("\n\n".join(TEXTS))
    ckpt = save(sae, tmp_path / "ckpt")
    assert main([str(ckpt), "--text", str(text), "--max-texts", "3", "--no-progress",
                 "--contexts", "4", "--map", "pca"]) == 0
    out = tmp_path / "ckpt-browser"
    assert str(out / "index.html") in capsys.readouterr().out
    data = read_site_data(out)
    assert data["meta"]["n_docs"] == 3 and data["meta"]["map_method"] == "pca"
    assert max(len(f["ctx"]) for f in data["features"]) == 4
    assert "layer 3" in data["meta"]["source"]

    # what the checkpoint was trained on is the default source
    spec = {"shards": None, "text": str(text), "model": None, "layer": 2}
    trained = write_checkpoint(tmp_path / "trained", CFG, sae.numpy_params(), trainer_state={"data_spec": spec})
    assert main([str(trained), "--max-texts", "2", "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert read_site_data(tmp_path / "b")["meta"]["source"] == f"{text} through MiniLM-L6 layer 2"

    spec = {"shards": str(tmp_path / "shards"), "text": None, "model": None, "layer": 3}
    shards = write_checkpoint(tmp_path / "sh", CFG, sae.numpy_params(), trainer_state={"data_spec": spec})
    assert main([str(shards), "--no-progress"]) == 2
    assert "trained on activation shards, which hold no text" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_data_js_is_plain_json_assignment(site):
    json.dumps(site, allow_nan=False)  # round-trips with no NaN / inf
    assert set(site) == {"meta", "summary", "experts", "features", "tokens", "map", "search"}
    assert len(site["map"]["x"]) == len(site["features"]) == CFG.n_latents
