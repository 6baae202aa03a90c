"""Causal LMs and text sources: transformers' AutoConfig for any architecture, texts through
`datasets`, windows instead of truncation, harvesting/training/eval on a random-weight
GPT-2 built here (no hub), SAELens's CE/KL scores, wandb logging (offline)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny_lm import LAYERS, WIDTH, save_tiny_lm

import switchsae
from switchsae.cli import main
from switchsae.data import DataError, default_texts, harvest, read_texts
from switchsae.data.models import load_model, model_shape, tokenize
from switchsae.evaluation.lm_scores import is_causal_lm, lm_scores


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def docs():
    return default_texts()[:60]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHSAE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_width_and_layers_come_from_autoconfig(tmp_path, arch):
    path = save_tiny_lm(tmp_path / arch, arch)
    assert model_shape(path) == (WIDTH, LAYERS)
    acts = np.concatenate(list(harvest(path, ["a short text", "another one here"], layer=1, progress=False)))
    assert acts.shape[1] == WIDTH
    assert is_causal_lm(path)


def test_minilm_is_not_a_causal_lm():
    assert not is_causal_lm(None)  # the packaged sentence encoder: no LM head


def test_long_texts_are_split_into_windows_not_truncated(gpt2):
    tok, _ = load_model(gpt2, "cpu", progress=False)
    long = " ".join(["word"] * 100)
    n_tokens = len(tok(long)["input_ids"])  # with [CLS]/[SEP]: 102
    enc, doc = tokenize(tok, [long, "short"], max_length=16)
    assert doc == [0] * math.ceil((n_tokens - 2) / 14) + [1]  # 14 text tokens + 2 special a window
    rows = np.concatenate(list(harvest(gpt2, [long], layer=1, max_length=16, progress=False)))
    assert len(rows) == sum(len(ids) for ids, d in zip(enc["input_ids"], doc) if d == 0) > n_tokens


def _write_sources(tmp_path, texts):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    datasets.Dataset.from_dict({"body": texts}).to_csv(tmp_path / "c.csv")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(tmp_path / "saved")
    (tmp_path / "c.txt").write_text("\n".join(texts))


def test_every_text_source_gives_the_same_documents(tmp_path):
    import datasets

    texts = ["first document, with a comma", "second \"quoted\" one", "third"]
    _write_sources(tmp_path, texts)
    for name in ("c.parquet", "c.jsonl", "c.csv", "saved"):
        assert read_texts(tmp_path / name, text_column="body") == texts, name
    assert read_texts(tmp_path / "c.txt", one_per_line=True) == texts
    assert read_texts(tmp_path / "c.txt") == ["\n".join(texts)]  # paragraphs: one blank-line-free block
    ds = datasets.Dataset.from_dict({"body": texts})
    assert read_texts(ds, text_column="body") == texts
    assert read_texts(ds.to_iterable_dataset(), text_column="body") == texts


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), {}, "is not UTF-8 text"),
    (lambda p: p.with_suffix(".bin").write_text("x"), {}, "cannot read text from"),
    (None, {"text_column": "nope"}, "has no column 'nope'"),
    (None, {"text_column": "n"}, "column 'n' holds int, not text"),
    (None, {"one_per_line": True}, "applies to plain text files"),
])
def test_text_source_errors(tmp_path, make, kwargs, message):
    _write_sources(tmp_path, ["a", "b"])
    target = tmp_path / "c.parquet"
    if make is not None:
        target = tmp_path / "bad.txt"
        make(target)
        target = target if target.exists() else target.with_suffix(".bin")
    with pytest.raises(DataError, match=message):
        read_texts(target, **kwargs)


def test_harvest_parquet_cli(tmp_path, gpt2, docs, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "corpus.parquet")
    code = main(["harvest", str(tmp_path / "acts"), "--text", str(tmp_path / "corpus.parquet"), "--model", str(gpt2),
                 "--layer", "1", "--device", "cpu", "--batch-size", "8", "--max-length", "32", "--no-progress"])
    assert code == 0
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    direct = np.concatenate(list(harvest(gpt2, docs, layer=1, max_length=32, progress=False)))
    assert manifest["d_in"] == WIDTH and manifest["total_tokens"] == len(direct)
    err = capsys.readouterr().err
    assert "Loading" not in err and "%|" not in err  # --no-progress: no bars, transformers' included


def test_train_on_gpt2_then_eval_with_lm_scores_and_wandb(tmp_path, gpt2, docs, capsys, monkeypatch):
    (tmp_path / "docs.txt").write_text("\n".join(docs))
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    code = main(["train", "--model", str(gpt2), "--text", str(tmp_path / "docs.txt"), "--one-per-line",
                 "--layer", "1", "--max-length", "32", "--experts", "2", "--k", "4", "--steps", "20",
                 "--batch-size", "128", "--log-every", "5", "--checkpoint-every", "20", "--eval-tokens", "500",
                 "--out", str(run), "--no-progress", "--backend", "torch", "--wandb", "switchsae-test"])
    assert code == 0
    # wandb's offline run holds the metrics lines the trainer wrote
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logged) == 1 and logged[0].stat().st_size > 0
    # wandb 0.31 has no Python reader for its .wandb log; its history records hold each value
    # as JSON text, so every logged step's FVU and loss must appear there verbatim
    data = logged[0].read_bytes()
    for r in history:
        for key in ("fvu", "loss_total", "l0"):
            assert json.dumps(r[key]).encode() in data, (r["step"], key)
    assert data.count(b"expert_load/1") >= len(history)
    capsys.readouterr()
    code = main(["eval", str(run), "--model", str(gpt2), "--text", str(tmp_path / "docs.txt"), "--one-per-line",
                 "--layer", "1", "--max-length", "32", "--json", "--no-progress", "--backend", "torch"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("ce_loss_score", "kl_div_score", "fvu"):
        assert math.isfinite(result[key]), key
    assert result["n_tokens"] > 0


def test_lm_scores_follow_saelens_definitions(gpt2, docs):
    """The identity map scores 1: its CE is the clean model's and its KL 0."""
    identity = lm_scores(lambda x: x, docs[:8], 1, gpt2, max_length=32, progress=False)
    assert identity.ce_loss_with_sae == pytest.approx(identity.ce_loss_clean, abs=1e-6)
    assert identity.kl_div_with_sae == pytest.approx(0, abs=1e-6)
    assert identity.ce_loss_score == pytest.approx(1, abs=1e-5)
    assert identity.kl_div_score == pytest.approx(1, abs=1e-5)


def test_decode_takes_numpy_on_every_backend():
    cfg = switchsae.SwitchSAEConfig(d_in=8, n_latents=32, n_experts=4, k=3)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    for name in switchsae.installed_backends():
        sae = switchsae.SwitchSAE.init(cfg, backend=name)
        values, ids, _ = sae.encode(x)
        be = sae.backend
        x_hat = be.to_numpy(sae.decode(be.to_numpy(values), be.to_numpy(ids)))
        np.testing.assert_array_equal(x_hat, be.to_numpy(sae.forward(x).x_hat))


def test_feature_browser_corpus_aligns_windows_with_tokens(gpt2):
    from switchsae.inspect import collect

    long = " ".join(f"w{i}" for i in range(60))
    corpus = collect(gpt2, [long, "short one"], layer=1, max_length=16, skip_special_tokens=True,
                     progress=False)
    first = [t for t, d in zip(corpus.tokens, corpus.doc) if d == 0]
    assert "".join(first) == long  # every window's tokens, in order, rebuild the document
    assert corpus.acts.shape == (len(corpus.tokens), WIDTH)


def test_device_errors_are_clear():
    from switchsae.data.models import resolve_device

    import torch

    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DataError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(DataError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
