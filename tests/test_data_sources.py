"""Tests for switchsae.data.sources: ArraySource, ShardSource, ShardWriter."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchsae.data.sources import ArraySource, DataError, ShardSource, ShardWriter

D = 5


def rows_of(n, d=D, dtype=np.float32):
    """Row i is filled with the value i, so a row identifies itself."""
    return np.repeat(np.arange(n, dtype=dtype)[:, None], d, axis=1)


def ids(batches):
    """Row ids of a list of batches, checking every row is a whole original row."""
    x = np.concatenate(batches)
    assert (x == x[:, :1]).all()
    return x[:, 0].astype(np.int64)


def take(src, k):
    return [src.next_batch() for _ in range(k)]


def write_shards(directory, n, fmt, shard_tokens, dtype=np.float32):
    with ShardWriter(directory, shard_tokens=shard_tokens, format=fmt, metadata={"model": "m", "layer": 3}) as w:
        data = rows_of(n, dtype=dtype)
        for i in range(0, n, 7):  # appends not aligned with shards
            w.append(data[i:i + 7])
    return w.manifest


def assert_epochs_are_permutations(stream, n, epochs):
    for e in range(epochs):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n)), f"epoch {e} is not a permutation"


# ------------------------------------------------------------- ArraySource
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 25), seed=st.integers(0, 2**31))
def test_array_source_each_row_once_per_epoch(n, bs, seed):
    src = ArraySource(rows_of(n), bs, seed=seed)
    k = -(-3 * n // bs)  # enough batches for 3 epochs
    batches = take(src, k)
    assert all(b.shape == (bs, D) and b.dtype == np.float32 for b in batches)
    assert_epochs_are_permutations(ids(batches), n, 3)


def test_array_source_reshuffles_each_epoch_and_seed_matters():
    a = ids(take(ArraySource(rows_of(100), 50, seed=1), 4))
    b = ids(take(ArraySource(rows_of(100), 50, seed=2), 2))
    assert (a[:100] != np.arange(100)).any()
    assert (a[:100] != a[100:]).any(), "epochs must use different orders"
    assert (a[:100] != b).any(), "seeds must give different orders"
    assert (ids(take(ArraySource(rows_of(10), 3, shuffle=False), 4)) == np.arange(12) % 10).all()


@pytest.mark.parametrize("n,bs", [(50, 7), (20, 9), (5, 12)])
def test_array_source_resume_is_bitwise_equal(n, bs):
    data = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    ref = take(ArraySource(data, bs, seed=3), 7)
    src = ArraySource(data, bs, seed=3)
    take(src, 3)
    state = json.loads(json.dumps(src.state_dict()))
    fresh = ArraySource(data, bs, seed=99)  # seed comes from the state
    fresh.load_state_dict(state)
    for r, b in zip(ref[3:], take(fresh, 4)):
        assert r.tobytes() == b.tobytes()


def test_array_source_backends_and_dtype():
    torch = pytest.importorskip("torch")
    t = torch.arange(12.0, requires_grad=True).reshape(4, 3)
    src = ArraySource(t, 4, shuffle=False)
    assert (src.next_batch() == np.arange(12.0).reshape(4, 3)).all()
    assert ArraySource(torch.ones(3, 2, dtype=torch.bfloat16), 2).dtype == np.float32
    assert ArraySource(rows_of(4, dtype=np.float64), 2).next_batch().dtype == np.float64
    assert ArraySource(rows_of(4, dtype=np.float64), 2, dtype="float32").next_batch().dtype == np.float32


def test_importing_data_does_not_import_frameworks():
    code = ("import sys, switchsae.data; bad = [m for m in ('torch', 'jax', 'mlx', 'transformers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("array,kw,msg", [
    (np.zeros(5, np.float32), {}, "2-D"),
    (np.zeros((0, 3), np.float32), {}, "no data"),
    (np.zeros((4, 3), np.int32), {}, "unsupported dtype int32"),
    (np.zeros((4, 3), np.float32), {"batch_size": 0}, "batch_size"),
    (np.zeros((4, 3), np.float32), {"expected_d_in": 7}, "d_in=3 does not match expected_d_in=7"),
])
def test_array_source_errors(array, kw, msg):
    kw = {"batch_size": 2, **kw}
    with pytest.raises(DataError, match=msg):
        ArraySource(array, **kw)


def test_load_state_dict_rejects_other_data():
    state = ArraySource(rows_of(10), 2).state_dict()
    with pytest.raises(DataError, match="n_rows"):
        ArraySource(rows_of(11), 2).load_state_dict(state)
    with pytest.raises(DataError, match="ArraySource"):
        ArraySource(rows_of(10), 2).load_state_dict({**state, "type": "ShardSource"})


# ------------------------------------------------------------- ShardWriter
@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_writer_manifest_and_no_temp_files(tmp_path, fmt):
    m = write_shards(tmp_path, 50, fmt, shard_tokens=16)
    files = sorted(os.listdir(tmp_path))
    assert files == ["manifest.json"] + [f"shard_{i:05d}.{fmt}" for i in range(4)]
    disk = json.loads((tmp_path / "manifest.json").read_text())
    assert disk == m
    assert [s["rows"] for s in disk["shards"]] == [16, 16, 16, 2]
    assert (disk["total_tokens"], disk["d_in"], disk["dtype"]) == (50, D, "float32")
    assert (disk["model"], disk["layer"]) == ("m", 3)
    src = ShardSource(tmp_path, 50, shuffle=False)  # unshuffled read-back is the input, in order
    assert (src.next_batch() == rows_of(50)).all()


def test_writer_failure_leaves_no_partial_files(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_tokens=10) as w:
            w.append(rows_of(25))  # two complete shards
            raise RuntimeError("harvest crashed")
    assert sorted(os.listdir(tmp_path)) == ["shard_00000.npy", "shard_00001.npy"], "no manifest when incomplete"

    def boom(*a, **k):
        raise OSError("disk full")

    out = tmp_path / "b"
    w = ShardWriter(out, shard_tokens=10)
    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        w.append(rows_of(10))
    assert os.listdir(out) == [], "temp file must be removed, target never created"


def test_writer_refuses_existing_data_and_bad_input(tmp_path):
    write_shards(tmp_path, 5, "npy", 4)
    with pytest.raises(DataError, match="already contains"):
        ShardWriter(tmp_path)
    w = ShardWriter(tmp_path, overwrite=True)
    w.append(rows_of(3))
    with pytest.raises(DataError, match="d_in=4 differs from earlier d_in=5"):
        w.append(np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match="unsupported dtype"):
        w.append(np.zeros((2, 5), np.int64))
    assert w.close()["total_tokens"] == 3


@pytest.mark.parametrize("kind", ["array", "npy"])
def test_each_process_reads_only_its_rows_of_the_same_batches(tmp_path, kind):
    """Four processes' row slices of each batch (batches straddling epoch boundaries) put
    together are the whole batch, and every source advances by whole batches."""
    def make():
        if kind == "array":
            return ArraySource(np.arange(97 * 3, dtype=np.float32).reshape(97, 3), 40, seed=1)
        return ShardSource(tmp_path, 40, seed=1, shuffle_buffer=30, chunk_rows=7)

    if kind == "npy":
        write_shards(tmp_path, 97, "npy", shard_tokens=20)
    whole, parts = make(), [make() for _ in range(4)]
    for _ in range(6):  # 240 rows: two epoch boundaries
        want = whole.next_batch()
        got = np.concatenate([p.next_batch(slice(10 * r, 10 * r + 10)) for r, p in enumerate(parts)])
        np.testing.assert_array_equal(got, want)
    assert all(p.state_dict() == whole.state_dict() for p in parts)
    with pytest.raises(DataError, match="contiguous slice"):
        whole.next_batch(slice(0, 40, 2))


# ------------------------------------------------------------- ShardSource
@pytest.fixture(scope="module", params=["npy", "safetensors"])
def shard_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    write_shards(d, 97, request.param, shard_tokens=20)
    return d


@settings(max_examples=15, deadline=None)
@given(bs=st.integers(1, 40), seed=st.integers(0, 1000), buf=st.integers(1, 120), chunk=st.integers(1, 30))
def test_shard_source_each_row_once_per_epoch(shard_dir, bs, seed, buf, chunk):
    src = ShardSource(shard_dir, bs, seed=seed, shuffle_buffer=buf, chunk_rows=chunk)
    assert (src.n_rows, src.d_in, src.dtype) == (97, D, np.float32)
    batches = take(src, -(-2 * 97 // bs))
    assert all(b.shape == (bs, D) for b in batches)
    assert_epochs_are_permutations(ids(batches), 97, 2)


def test_shard_source_mixes_across_shards(shard_dir):
    src = ShardSource(shard_dir, 20, seed=0, shuffle_buffer=40, chunk_rows=5)
    first = ids([src.next_batch()])
    assert len(set(first // 20)) >= 3, f"first batch should mix several shards, got {first}"
    assert (np.diff(first) != 1).sum() >= 10, "rows within the buffer must be shuffled"
    e0, e1 = ids(take(src, 4))[-77:], ids(take(src, 5))[-97:]
    assert (e0 != e1[:77]).any()


@pytest.mark.parametrize("bs,buf,chunk", [(8, 30, 4), (13, 7, 7), (40, 1000, 16)])
def test_shard_source_resume_is_bitwise_equal(shard_dir, bs, buf, chunk):
    kw = dict(shuffle_buffer=buf, chunk_rows=chunk)
    ref = take(ShardSource(shard_dir, bs, seed=5, **kw), 7)
    src = ShardSource(shard_dir, bs, seed=5, **kw)
    take(src, 3)
    state = json.loads(json.dumps(src.state_dict()))
    fresh = ShardSource(shard_dir, bs)  # other seed/buffer: the state restores them
    fresh.load_state_dict(state)
    for r, b in zip(ref[3:], take(fresh, 4)):
        assert r.tobytes() == b.tobytes()


def test_shard_source_memory_maps_and_bounds_memory(tmp_path):
    n, d, buf = 4000, 16, 256
    write = rows_of(n, d)
    with ShardWriter(tmp_path, shard_tokens=1000) as w:
        w.append(write)
    src = ShardSource(tmp_path, 64, shuffle_buffer=buf, chunk_rows=32)
    take(src, 20)
    assert src._mmaps and all(isinstance(m, np.memmap) for m in src._mmaps.values())
    in_ram = [v.size for v in vars(src).values() if isinstance(v, np.ndarray) and not isinstance(v, np.memmap)]
    assert max(in_ram) <= buf * d, "source must hold at most one shuffle buffer of rows"


def test_shard_source_bare_directory_and_named_tensor(tmp_path):
    from safetensors.numpy import save_file

    np.save(tmp_path / "a.npy", rows_of(3))
    save_file({"activations": rows_of(4)[1:], "tokens": np.zeros(3, np.int32)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "notes.txt").write_text("ignored")
    src = ShardSource(tmp_path, 6, shuffle=False)
    assert src.manifest is None and src.n_rows == 6
    assert ids([src.next_batch()]).tolist() == [0, 1, 2, 1, 2, 3]


def _bad(tmp_path, kind):
    """Create a directory with one problem; return (directory, kwargs)."""
    d = tmp_path / kind
    d.mkdir()
    good = rows_of(4)
    if kind != "empty":
        np.save(d / "a.npy", good)
    if kind == "3d":
        np.save(d / "b.npy", np.zeros((2, 2, 2), np.float32))
    elif kind == "width":
        np.save(d / "b.npy", np.zeros((2, 7), np.float32))
    elif kind == "garbage":
        (d / "b.npy").write_bytes(b"this is not an npy file at all")
    elif kind == "truncated":
        np.save(d / "b.npy", good)
        (d / "b.npy").write_bytes((d / "b.npy").read_bytes()[:-9])
    elif kind == "bad_safetensors":
        (d / "b.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    elif kind == "int":
        np.save(d / "b.npy", np.zeros((2, D), np.int32))
    elif kind == "two_tensors":
        from safetensors.numpy import save_file
        save_file({"x": good, "y": good}, str(d / "b.safetensors"))
    elif kind == "manifest_missing":
        (d / "manifest.json").write_text(json.dumps({"shards": [{"name": "a.npy", "rows": 4},
                                                                {"name": "b.npy", "rows": 4}]}))
    elif kind == "manifest_rows":
        (d / "manifest.json").write_text(json.dumps({"shards": [{"name": "a.npy", "rows": 5}]}))
    elif kind == "manifest_json":
        (d / "manifest.json").write_text("{oops")
    return d


@pytest.mark.parametrize("kind,kw,msg", [
    ("empty", {}, "no activation shards"),
    ("3d", {}, r"b\.npy must be 2-D"),
    ("width", {}, r"inconsistent d_in across shards: b\.npy has d_in=7, a\.npy has d_in=5"),
    ("garbage", {}, r"cannot read shard .*b\.npy"),
    ("truncated", {}, r"cannot read shard .*b\.npy.*truncated"),
    ("bad_safetensors", {}, r"cannot read shard .*b\.safetensors"),
    ("int", {}, r"b\.npy: unsupported dtype int32"),
    ("two_tensors", {}, "named 'activations'"),
    ("manifest_missing", {}, r"b\.npy listed in manifest\.json is missing"),
    ("manifest_rows", {}, "has 4 rows but manifest.json says 5"),
    ("manifest_json", {}, "cannot read manifest"),
    ("ok", {"batch_size": 0}, "batch_size must be an integer >= 1"),
    ("ok", {"expected_d_in": 384}, "d_in=5 does not match expected_d_in=384"),
    ("ok", {"shuffle_buffer": 0}, "shuffle_buffer"),
])
def test_shard_source_errors(tmp_path, kind, kw, msg):
    kw = {"batch_size": 2, **kw}
    with pytest.raises(DataError, match=msg):
        ShardSource(_bad(tmp_path, kind), **kw)


def test_shard_source_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ShardSource(tmp_path / "nope", 2)
