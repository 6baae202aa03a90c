"""The GPU proof's --cpu-dry-run: every stage of `bench/gpu_proof.sh` on CPU at tiny sizes (the
Triton kernels through TRITON_INTERPRET=1, data parallel through gloo), as a GPU session will run
them, so that session spends its minutes measuring, not debugging.  A stage that fails fails
the test; so does one that did not write what the summary reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from switchsae.bench import gpu_proof

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 2100  # a hang guard only: the dry run is ~1 min of CPU and stops itself after 4 x 480 s
STAGES = ["environment", "conformance-torch", "triton", "allocation", "bench-d768", "data-parallel",
          "scale-sweep", "bench-d2304", "conformance-jax"]


def _proof(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["bash", str(REPO / "bench/gpu_proof.sh"), "--cpu-dry-run", "--out", str(out), *args],
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof") / "results"
    proc = _proof(out)
    return proc, out, json.loads((out / "summary.json").read_text())


def test_every_stage_passes_on_cpu(dry_run):
    proc, out, summary = dry_run
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert list(statuses) == STAGES
    # the scale sweep (issue 15) may not have landed yet: then, and only then, it is "absent"
    sweep_landed = (REPO / "bench/scale_sweep.py").exists()
    assert statuses.pop("scale-sweep") == ("ok" if sweep_landed else "absent")
    assert all(s == "ok" for s in statuses.values()), f"{statuses}\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0 and summary["passed"] and summary["dry_run"], proc.stdout[-4000:]
    assert "ALL STAGES PASSED" in (out / "summary.md").read_text()


def test_stages_check_what_they_name(dry_run):
    _, out, _ = dry_run
    for backend in ("torch", "jax"):
        conf = json.loads((out / f"conformance-{backend}.json").read_text())
        assert conf["passed"] and {"float32", "bfloat16"} <= set(conf["by_dtype"]), conf
    triton = json.loads((out / "triton.json").read_text())
    assert triton["interpreted"] and len(triton["checks"]) == 10
    assert {n.split()[1] for n in triton["checks"]} == {"float32", "bfloat16"}
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["saw_expert_activations"] and not alloc["too_big"]
    dp = json.loads((out / "data-parallel.json").read_text())
    assert dp["collective_backend"] == "gloo" and dp["data_parallel_line"] and dp["learned"]


def test_summary_holds_the_benchmark_table(dry_run):
    _, out, summary = dry_run
    text = (out / "summary.md").read_text()
    assert "| d | N | M | tokens/s |" in text
    rows = [r for s in summary["stages"] if s["name"].startswith("bench-") for r in s["rows"] if "N" in r]
    assert {r["d"] for r in rows} == {32, 48} and {r["N"] for r in rows} >= {1, 8, 16}
    assert all(0 < r["fraction"] and r["tokens_per_s"] > 0 for r in rows)
    for d in (768, 2304):
        assert (out / f"bench-d{d}" / "throughput.png").stat().st_size > 1000
    assert len(text.splitlines()) < 60  # one screen


def test_a_failing_stage_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "results"
    proc = _proof(out, "--stages", "environment,allocation", "--limit", "environment=0.2")
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 1 and summary["failed"] == ["environment"]
    assert [s["status"] for s in summary["stages"]] == ["timeout", "ok"]
    assert "FAILED: environment" in proc.stdout and (out / "logs" / "environment.log").exists()


def test_results_go_to_out_as_one_archive(tmp_path, monkeypatch):
    out, dest = tmp_path / "results", tmp_path / "device-out"
    out.mkdir()
    (out / "summary.md").write_text("table\n")
    (out / "summary.json").write_text("{}\n")
    (out / "bench-d768").mkdir()
    (out / "bench-d768" / "results.json").write_text("{}\n")
    gpu_proof.export(out, dest)
    import tarfile

    with tarfile.open(dest / "gpu-proof-results.tar.gz") as tar:
        assert "results/bench-d768/results.json" in tar.getnames()
    assert sorted(p.name for p in dest.iterdir()) == ["gpu-proof-results.tar.gz", "summary.json", "summary.md"]


def test_the_sweep_line_names_each_optimiser_at_its_largest_size():
    row = lambda log2_m, opt, tps: {"log2_m": log2_m, "optimizer": opt, "tokens_per_s": tps,
                                    "peak_memory_bytes": 3 * 2**30, "peak_over_fp32_params": 1.5}
    line = gpu_proof.sweep_summary({"sizes": [row(20, "lazy_adam", 5e4), row(14, "lazy_adam", 9e4),
                                              row(14, "adam", 8e4)]})
    assert line == ("lazy_adam M 2^20: 50,000 tokens/s, peak 3.0 GiB (1.50x fp32 params); "
                    "adam M 2^14: 80,000 tokens/s, peak 3.0 GiB (1.50x fp32 params)")


def test_a_folder_that_is_not_a_proofs_is_never_cleared(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(gpu_proof.ProofError, match="not a GPU proof's"):
        gpu_proof.prepare_out(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert gpu_proof.slug("NVIDIA H200") == "nvidia-h200" and gpu_proof.slug("NVIDIA H100 80GB HBM3") == \
        "nvidia-h100-80gb-hbm3"


def test_the_install_stage_asks_for_the_test_tools_by_their_own_names():
    """The proof installs the project's dependencies and the two test tools its stages run
    (pytest, hypothesis), each a module it can then import; plugins of the test extra such as
    pytest-xdist (no module `pytest_xdist`) are not among them."""
    wanted = gpu_proof._requirements()
    names = [r.split(">")[0].split("=")[0] for r in wanted]
    assert "pytest" in names and "hypothesis" in names and "numpy" in names
    assert not any(n.startswith("pytest-") for n in names), wanted
