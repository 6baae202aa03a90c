"""All-or-nothing file writes (checkpoints' side files, shards, manifests, reports, results)."""

import json

import pytest

from switchsae.files import atomic_write, atomic_write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "results.json", {"a": 1}, indent=1)
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")

    def torn(f):
        f.write(b'{"a": 2, "b": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, torn)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
