"""Bad input, as a careless or hostile user gives it: the library's own error with one line,
before any work (the CLI: `switchsae <command>: error: ...`, exit 2), never a traceback."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import switchsae
from switchsae import SwitchSAE, SwitchSAEConfig, TrainConfig
from switchsae.checkpoint import CFG_FILE, STATE_FILE, CheckpointError, list_checkpoints
from switchsae.cli import main
from switchsae.data import ArraySource, ShardWriter
from switchsae.data.harvest import default_model_path
from switchsae.training import Trainer

D = 24
SMALL = ["--backend", "numpy", "--no-progress", "--latents", "96", "--experts", "4", "--k", "4",
         "--steps", "12", "--batch-size", "64", "--lr", "1e-2", "--warmup", "2", "--eval-tokens", "256"]
NOT_UTF8 = "caf\xe9 cr\xe8me\n\nna\xefve".encode("latin-1")


def _acts(n=600, d=D, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((rng.exponential(1.0, size=(n, 48)) * (rng.random((n, 48)) < 0.08)) @ rng.normal(size=(48, d))
            ).astype(np.float32)


def _shards(path, x=None):
    with ShardWriter(path, shard_tokens=300) as writer:
        writer.append(_acts() if x is None else x)
    return path


def _manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest["shards"])
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _model_dir_with_only_config(tmp):
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text((default_model_path() / "config.json").read_text())
    return tmp / "m"


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"switchsae {command}: error: "), err
    return lines[0]


# -- train: every case refused before anything is written ---------------------------------
@pytest.mark.parametrize("setup, extra, message", [
    (lambda t: (t / "c.txt").write_bytes(NOT_UTF8), ["--text", "{t}/c.txt"], "is not UTF-8 text (byte 3 is 0xe9)"),
    (lambda t: _shards(t / "d"), ["--data", "{t}/d", "--latents", "1000000000000"],
     "training (parameters and Adam's two moments) needs 523.9 TiB (48,000,000,000,144 parameters x 3"),
    (lambda t: (_shards(t / "d"), (t / "file").write_text("x")), ["--data", "{t}/d", "--out", "{t}/file"],
     "run directory {t}/file exists and is not a directory"),
    (lambda t: (_shards(t / "d"), (t / "file").write_text("x")), ["--data", "{t}/d", "--out", "{t}/file/run"],
     "cannot create run directory {t}/file/run: {t}/file is not a directory"),
    (lambda t: (_shards(t / "d"), _shards(t / "e", _acts(d=16))), ["--data", "{t}/d", "--eval-data", "{t}/e"],
     "activation width d_in=16 does not match expected_d_in=24"),
    (lambda t: _shards(t / "d"), ["--data", "{t}/d", "--eval-tokens", "-5"],
     "argument --eval-tokens: must be an integer >= 2, got -5"),
    (lambda t: _shards(t / "d"), ["--data", "{t}/d", "--eval-tokens", "1"],
     "argument --eval-tokens: must be an integer >= 2, got 1"),
    (lambda t: _shards(t / "d"), ["--data", "{t}/d", "--lr", "nan"], "argument --lr: must be a finite number"),
    (lambda t: _shards(t / "d"), ["--data", "{t}/d", "--steps", "x"], "argument --steps: expected an integer"),
    (lambda t: ((t / "c.txt").write_text("hello"), _model_dir_with_only_config(t)),
     ["--text", "{t}/c.txt", "--model", "{t}/m"], "has a config.json but no weights and no tokenizer files"),
    (lambda t: _shards(t / "d"), ["--data", "{t}/d", "--dtype", "float16"], "float16 cannot train"),
    (lambda t: _manifest(_shards(t / "d"), lambda s: s.append(dict(s[0]))), ["--data", "{t}/d"],
     "lists shard 'shard_00000.npy' twice"),
    (lambda t: (_shards(t / "x"), _manifest(_shards(t / "d"), lambda s: s[0].update(name="../x/shard_00000.npy"))),
     ["--data", "{t}/d"], "points outside"),
    (lambda t: _manifest(_shards(t / "d"), lambda s: s[0].update(name=str(t / "d" / "shard_00000.npy"))),
     ["--data", "{t}/d"], "points outside"),
])
def test_train_refuses_bad_input_before_any_work(tmp_path, capsys, setup, extra, message):
    setup(tmp_path)
    argv = [a.format(t=tmp_path) for a in extra]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    code, _, err = _run(capsys, "train", *SMALL, *argv)
    assert code == 2
    assert message.format(t=tmp_path) in _one_line_error(err, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, message", [
    (np.zeros((600, D), np.float32), "the first batch of activations is constant"),
    (np.full((600, D), 3.0, np.float32), "the first batch of activations is constant"),
])
def test_train_refuses_data_without_variance(tmp_path, capsys, data, message):
    code, _, err = _run(capsys, "train", *SMALL, "--data", _shards(tmp_path / "d", data), "--out", tmp_path / "run")
    assert code == 2 and message in _one_line_error(err, "train")
    assert not list_checkpoints(tmp_path / "run")


def test_a_diverging_run_stops_naming_the_step(tmp_path, capsys):
    code, _, err = _run(capsys, "train", *[a if a != "1e-2" else "1e6" for a in SMALL], "--log-every", "1",
                        "--data", _shards(tmp_path / "d"), "--out", tmp_path / "run")
    line = _one_line_error(err, "train")
    assert code == 1 and "training diverged" in line and "learning rate" in line
    step = int(line.split(": error: step ")[1].split(":")[0])
    assert 1 <= step <= 12


# -- eval, harvest, inspect, bench ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run on shards (d_in=24) and its data."""
    tmp = tmp_path_factory.mktemp("trained")
    data = _shards(tmp / "d")
    assert main([*("train", *SMALL), "--data", str(data), "--out", str(tmp / "run")]) == 0
    return tmp


@pytest.mark.parametrize("argv, message", [
    (["eval", "{run}", "{d}", "--max-tokens", "1"], "argument --max-tokens: must be an integer >= 2, got 1"),
    (["eval", "{run}", "{d}", "--max-tokens", "-1"], "argument --max-tokens: must be an integer >= 2, got -1"),
    (["eval", "{run}", "{nan}"], "the activations hold NaN/inf (row 7, column 0)"),
    (["eval", "{run}", "{const}"], "the activations are constant"),
    (["harvest", "{t}/h", "--text", "{utf}", "--max-tokens", "0"], "argument --max-tokens: must be an integer >= 1"),
    (["harvest", "{t}/h", "--text", "{latin}"], "is not UTF-8 text"),
    (["harvest", "{t}/h", "--text", "{utf}", "--model", "{onlycfg}"], "no weights and no tokenizer files"),
    (["bench", "--backends", "bogus"], "unknown backend 'bogus'"),
    (["inspect", "{run}", "--contexts", "-1", "--text", "{utf}"], "argument --contexts: must be an integer >= 1"),
    (["inspect", "{run}", "--text", "{utf}"], "expects activations of width d_in=24 but MiniLM-L6 has hidden size 384"),
    (["inspect", "{run}", "--text", "{latin}"], "is not UTF-8 text"),
    (["inspect", "{run}", "--text", "{utf}", "--model", "{onlycfg}"], "no weights and no tokenizer files"),
])
def test_other_commands_refuse_bad_input(trained, tmp_path, capsys, argv, message):
    nan = _acts()
    nan[7, 0] = np.nan
    names = {"run": trained / "run", "d": trained / "d", "t": tmp_path,
             "nan": _shards(tmp_path / "nan", nan), "const": _shards(tmp_path / "const", np.ones((600, D), np.float32)),
             "utf": tmp_path / "u.txt", "latin": tmp_path / "l.txt", "onlycfg": _model_dir_with_only_config(tmp_path)}
    names["utf"].write_text("Sparse autoencoders.\n\nSwitch layers route tokens.")
    names["latin"].write_bytes(NOT_UTF8)
    code, _, err = _run(capsys, *[a.format(**names) for a in argv])
    assert code == 2
    assert message in _one_line_error(err, argv[0])
    assert not (tmp_path / "h").exists() and not (trained / "run" / "browser").exists()


# -- resuming: every field of the trainer state is checked -----------------------------------
def _edit_state(ckpt, edit) -> None:
    """Change trainer_state.json and record its new digest (as a buggy writer would have)."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    edit(state)
    data = json.dumps(state).encode()
    (ckpt / STATE_FILE).write_bytes(data)
    cfg = json.loads((ckpt / CFG_FILE).read_text())
    cfg["sha256"][STATE_FILE] = hashlib.sha256(data).hexdigest()
    (ckpt / CFG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("train_config"), "missing ['train_config']"),
    (lambda s: s.update(step="x"), "step must be a non-negative integer, got 'x'"),
    (lambda s: s.update(step=-3), "step must be a non-negative integer, got -3"),
    (lambda s: s.update(activation_scale=0), "activation_scale must be a finite number > 0, got 0"),
    (lambda s: s.update(activation_scale=3.0), "activation_scale must be a power of two"),
    (lambda s: s.update(tokens_since_fired=[0.0] * 5), "tokens_since_fired must list 96 counts"),
    (lambda s: s.update(tokens_since_fired=["a"] * 96), "tokens_since_fired must be a finite number"),
    (lambda s: s["train_config"].update(lr="1"), "lr must be a finite number > 0, got '1'"),
    (lambda s: s.update(train_config=[4]), "a train config must be a JSON object"),
    (lambda s: s["train_config"].pop("batch_size"), "train_config lacks ['batch_size']"),
    (lambda s: s.update(data_state=None), "data_state must be an object"),
    (lambda s: s.update(data_spec={"shards": 3}), "data spec shards must be a path string"),
])
@pytest.mark.parametrize("finished", [False, True])
def test_resume_checks_the_trainer_state(trained, tmp_path, capsys, edit, message, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    ckpts = list_checkpoints(run)
    if not finished:  # a run stopped halfway: its last checkpoint is not the final step
        _edit_state(ckpts[-1], lambda s: s["train_config"].update(steps=100))
    _edit_state(ckpts[-1], edit)
    before = sorted(p.name for p in run.rglob("*"))
    code, _, err = _run(capsys, "train", "--resume", run, "--no-progress")
    assert code == 2 and message in _one_line_error(err, "train")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_resume_uses_the_backend_the_run_used(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    _edit_state(list_checkpoints(run)[-1], lambda s: s["train_config"].update(steps=14))
    code, out, err = _run(capsys, "train", "--resume", run, "--no-progress")  # no --backend: numpy, as the run
    assert code == 0, err
    assert "with numpy;" in out


# -- the Python API -----------------------------------------------------------------------------
CFG = SwitchSAEConfig(d_in=8, n_latents=32, n_experts=4, k=2)


@pytest.mark.parametrize("fields, message", [
    (dict(lb_coef="1"), "lb_coef must be a finite number >= 0, got '1'"),
    (dict(auxk_coef=None), "auxk_coef must be a finite number >= 0, got None"),
    (dict(k="3"), "k must be a positive integer, got '3'"),
    (dict(k=2.0), "k must be a positive integer, got 2.0"),
    (dict(encoder_bias="yes"), "encoder_bias must be true or false"),
    (dict(dtype=["float32"]), "dtype must be one of"),
    (dict(k_aux=True), "k_aux must be a positive integer"),
    (dict(extra=[1]), "extra must be a dict"),
])
def test_config_fields_of_the_wrong_type(fields, message):
    with pytest.raises(switchsae.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        CFG.replace(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(lr="1"), "lr must be a finite number > 0"), (dict(decay_fraction="x"), "decay_fraction must be"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm must be a finite number > 0"),
    (dict(normalize="no"), "normalize must be true or false"), (dict(out_dir=3), "out_dir must be a path"),
])
def test_train_config_fields_of_the_wrong_type(fields, message):
    with pytest.raises(switchsae.ConfigError, match=message):
        TrainConfig(**fields)


def test_a_model_too_large_for_memory_states_the_bytes():
    huge = SwitchSAEConfig(d_in=384, n_latents=10**12, n_experts=8, k=32)
    with pytest.raises(switchsae.ConfigError, match=r"the model needs 2\.7 PiB \(768,000,000,003,840 parameters"):
        SwitchSAE.init(huge, backend="numpy")


def test_use_and_get_backend_take_names():
    with pytest.raises(switchsae.BackendError, match="got None"):
        switchsae.use(None)
    with pytest.raises(switchsae.BackendError, match="got 3"):
        switchsae.get_backend(3)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("ids, message", [
    ([[0, -1]], "latent ids in 0..31; got -1"), ([[0, 32]], "latent ids in 0..31; got 32"),
    ([[0, 10**9]], "got 1000000000"), ([[0.0, 1.0]], "must be integers"),
])
def test_decode_refuses_ids_out_of_range(backend, ids, message):
    sae = SwitchSAE.init(CFG, backend=backend)
    with pytest.raises(switchsae.InputError, match=message):
        sae.decode(np.ones((1, 2), np.float32), np.array(ids))
    with pytest.raises(switchsae.InputError, match="both have shape"):
        sae.decode(np.ones((1, 3), np.float32), np.array([[0, 1]]))


def test_trainer_refuses_zero_activations_with_a_data_error():
    source = ArraySource(np.zeros((200, 8), np.float32), 50)
    with pytest.raises(switchsae.data.DataError, match="constant"):
        Trainer(CFG, TrainConfig(steps=2, batch_size=50), source, "numpy", progress=False).run()


@pytest.mark.parametrize("limits", [dict(max_tokens=0), dict(max_tokens=-1), dict(max_texts=0), dict(max_tokens="9")])
def test_harvest_limits_below_one_are_refused_before_anything_is_written(tmp_path, limits):
    from switchsae.data import DataError, cache_activations

    with pytest.raises(DataError, match="must be an integer >= 1"):
        cache_activations(None, ["some text"], 3, tmp_path / "acts", progress=False, **limits)
    assert not (tmp_path / "acts").exists()
