"""Property tests: whatever the command-line arguments, config fields or trainer-state fields,
`switchsae` either works or stops with one clean error line (exit 2, or 1 for a training run
that had to stop); never a traceback.  Bounded: a few dozen examples, tiny models."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchsae.checkpoint import CFG_FILE, STATE_FILE, list_checkpoints
from switchsae.cli import build_parser, main, run_command
from switchsae.data import ShardWriter

D = 8
FUZZ = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# option -> values a careless user might give (valid ones included, all small enough to train fast)
NUMBERS = ["-1", "0", "1", "2", "x", "", "1.5", "1e3", "nan", "inf", "-inf", "99999999999999999999"]
OPTIONS = {
    "--latents": NUMBERS + ["32", "1000000000000"], "--experts": NUMBERS + ["4"], "--k": NUMBERS + ["4", "100"],
    "--steps": ["-1", "0", "1", "2", "x", "1.5"], "--batch-size": ["-1", "0", "1", "16", "x"],
    "--lr": NUMBERS + ["1e6", "1e-2"], "--warmup": NUMBERS, "--dead-tokens": NUMBERS,
    "--lb-coef": NUMBERS, "--auxk-coef": NUMBERS, "--seed": NUMBERS, "--log-every": ["0", "1", "x"],
    "--checkpoint-every": ["0", "1", "x"], "--eval-tokens": ["-5", "0", "1", "16", "x"],
    "--dtype": ["float16", "float64", "bfloat16", "bogus", ""], "--holdout-every": NUMBERS,
    "--d-in": NUMBERS + [str(D)], "--layer": NUMBERS, "--backend": ["numpy", "bogus", ""],
    "--eval-data": ["{t}/d", "{t}/missing", "{t}"], "--data": ["{t}/d", "{t}/missing", "{t}/notes.txt"],
    "--out": ["{t}/run", "{t}/notes.txt", "{t}/notes.txt/run", "{t}"],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    with ShardWriter(tmp / "d", shard_tokens=100) as writer:
        writer.append(rng.normal(size=(200, D)).astype(np.float32))
    return tmp / "d"


def _main(capsys, argv) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def _clean(code, err) -> None:
    assert code in (0, 1, 2), (code, err)
    if code:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("switchsae ") and ": error: " in lines[-1], err
        assert "Traceback" not in err, err


@settings(FUZZ, max_examples=15)  # each valid draw trains, evaluates and plots: the slow one
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.data(), max_size=5))
def test_train_arguments(shards, capsys, chosen):
    with tempfile.TemporaryDirectory() as t:
        (Path(t) / "notes.txt").write_text("x")
        shutil.copytree(shards, Path(t) / "d")
        argv = ["train", "--no-progress", "--backend", "numpy", "--data", f"{t}/d", "--out", f"{t}/run",
                "--latents", "32", "--experts", "4", "--k", "4", "--steps", "2", "--batch-size", "16",
                "--warmup", "0", "--eval-tokens", "16"]
        for option, draw in chosen.items():
            argv += [option, draw.draw(st.sampled_from(OPTIONS[option])).format(t=t)]
        _clean(*_main(capsys, argv))


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzzrun") / "run"
    assert main(["train", "--no-progress", "--backend", "numpy", "--data", str(shards), "--out", str(out),
                 "--latents", "32", "--experts", "4", "--k", "4", "--steps", "2", "--batch-size", "16",
                 "--warmup", "0", "--eval-tokens", "16"]) == 0
    return out


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=5)


def _field_edits(doc: dict) -> st.SearchStrategy:
    """(key path, new value) pairs: a field of doc (one level into nested objects) set to any
    JSON value, or removed (value None with remove=True)."""
    paths = [(k,) for k in doc] + [(k, j) for k, v in doc.items() if isinstance(v, dict) for j in v]
    return st.tuples(st.sampled_from(paths), JSON, st.booleans())


def _edit(path: Path, key, value, remove: bool) -> None:
    doc = json.loads(path.read_text())
    target = doc
    for k in key[:-1]:
        target = target[k]
    if remove:
        target.pop(key[-1])
    else:
        target[key[-1]] = value
    path.write_text(json.dumps(doc))


def _state_edits():
    ckpt_state = {"format_version": 1, "step": 0, "elapsed": 0, "activation_scale": 1, "backend": "numpy",
                  "train_config": {k: 0 for k in ("steps", "batch_size", "lr", "warmup_steps", "decay_fraction",
                                                 "max_grad_norm", "seed", "log_every", "checkpoint_every",
                                                 "keep_checkpoints", "dead_tokens", "normalize", "out_dir")},
                  "data_spec": {k: 0 for k in ("shards", "text", "model", "layer", "eval_shards", "holdout_every",
                                               "cache")},
                  "data_state": {k: 0 for k in ("type", "epoch", "offset", "seed", "shuffle", "n_rows", "d_in")},
                  "tokens_since_fired": 0}
    return st.lists(_field_edits(ckpt_state), min_size=1, max_size=3)


@FUZZ
@given(_state_edits())
def test_resume_with_any_trainer_state(run, capsys, edits):
    """Field values of trainer_state.json (its digest re-recorded, as a buggy writer would)."""
    import hashlib

    with tempfile.TemporaryDirectory() as t:
        copy = Path(t) / "run"
        shutil.copytree(run, copy)
        ckpt = list_checkpoints(copy)[-1]
        for key, value, remove in edits:
            try:
                _edit(ckpt / STATE_FILE, key, value, remove)
            except (KeyError, TypeError):  # the path is gone after an earlier edit
                pass
        cfg = json.loads((ckpt / CFG_FILE).read_text())
        cfg["sha256"][STATE_FILE] = hashlib.sha256((ckpt / STATE_FILE).read_bytes()).hexdigest()
        (ckpt / CFG_FILE).write_text(json.dumps(cfg))
        _clean(run_command("train", _resume_only, build_parser().parse_args(["train", "--resume", str(copy)])),
               capsys.readouterr().err)


def _resume_only(args) -> int:
    """What `switchsae train --resume` does before its first step (the steps, evaluation and
    report that follow a valid state are tested elsewhere, and would make this slow)."""
    from switchsae.cli import _resume_state
    from switchsae.training import DataSpec, TrainConfig, Trainer, build_sources

    state = _resume_state(args)
    spec, tc = DataSpec.from_dict(state["data_spec"]), TrainConfig.from_dict(state["train_config"])
    source, _, _ = build_sources(spec, tc.batch_size, tc.seed, progress=False)
    Trainer.resume(args.resume, source, "numpy", progress=False)
    return 0


@FUZZ
@given(st.lists(_field_edits({k: 0 for k in ("d_in", "n_latents", "n_experts", "k", "lb_coef", "auxk_coef", "k_aux",
                                              "dead_tokens", "encoder_bias", "router_scale", "dtype",
                                              "experts_per_token", "shared_latents", "shared_k", "format",
                                              "format_version", "sha256")}), min_size=1, max_size=3))
def test_eval_with_any_config_field(run, shards, capsys, edits):
    with tempfile.TemporaryDirectory() as t:
        ckpt = Path(t) / "ck"
        shutil.copytree(list_checkpoints(run)[-1], ckpt)
        for key, value, remove in edits:
            try:
                _edit(ckpt / CFG_FILE, key[:1], value, remove)
            except KeyError:
                pass
        _clean(*_main(capsys, ["eval", str(ckpt), str(shards), "--backend", "numpy"]))
