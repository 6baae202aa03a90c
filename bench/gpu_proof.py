"""The GPU proof: one run that shows the CUDA path correct and fast on a real GPU.

    bash bench/gpu_proof.sh                  # on a GPU machine (H100/H200): install, then every stage
    bash bench/gpu_proof.sh --cpu-dry-run    # the same stages on CPU at tiny sizes, no installs (CI)
    bash bench/gpu_proof.sh --fetch-wheels   # with registries: .whl/ for a GPU machine without them
    python -m switchsae.bench.gpu_proof ...  # the same, once switchsae is installed

Install (GPU runs; skipped with --no-install): torch with CUDA is used where the interpreter
already has it (e.g. a CUDA image), else `pip install torch==2.14.1` (PyPI's Linux wheel is the
CUDA 13.0 build and brings Triton); the project is built into a private folder put first on
PYTHONPATH (the interpreter's own packages stay untouched), with any missing dependency taken
from .whl/ when present (a machine with no registry), else from the registries.
--install-jax adds `jax[cuda13]` (or cuda12, following torch's CUDA) as an optional stage.

Stages, each in its own process with its own time limit (all within --budget, 480 s: a stage
that fails or runs out of time is recorded and the run goes on):
  environment        the device and the versions (bench/gpu_proof_checks.py)
  conformance-torch  `pytest conformance` on cuda, float32 and bfloat16
  triton             the Triton kernels compiled for the device against their eager versions
  allocation         no (batch, M)-sized tensor in a train step on the device
  bench-d768         `python -m switchsae.bench --grid gpu --d-in 768` in bfloat16, CUDA events:
                     N in {1, 8, 16, 32} at M = 32 d, M up to 2^20 at N = 16, batch 8192, k 32,
                     the step's useful FLOP/s over the measured bf16 matmul peak
  data-parallel      `torchrun --nproc-per-node 1 -m switchsae train --parallel data` (NCCL)
  scale-sweep        `python -m switchsae.bench.scale_sweep --device cuda --dtype bfloat16
                     --max-log2-m 20` (issue 15's M sweep)
  bench-d2304        the grid at d 2304
  conformance-jax    `pytest conformance` for JAX on the GPU, when JAX sees one
Everything lands in one folder (default bench/results/gpu-<device>/: JSON, PNG, each stage's
log); the run ends with a one-screen summary (summary.md: the README's GPU table).  With $OUT
set (the device tool), the folder is packed into $OUT/gpu-proof-results.tar.gz beside
summary.md, summary.json and proof.log.  Exit status 1 when any stage failed.

The dry run swaps in CPU, tiny sizes, TRITON_INTERPRET=1 and gloo, and needs no GPU and no
network; a stage whose command is not in this tree yet (scale-sweep) is recorded as absent there
and fails a GPU run.

This file uses the standard library only: it runs before the project is installed."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH_CUDA_PIN = "torch==2.14.1"  # PyPI's Linux x86_64 wheel: the CUDA 13.0 build, Triton 3.8
WHEELS = REPO / ".whl"
# Pure-Python wheels a bare CUDA image may lack (this workplace's lacks array-api-compat);
# only those that do not import are installed from them.
WHEEL_REQUIREMENTS = ["array-api-compat>=1.11", "tqdm>=4.60", "pytest>=8", "hypothesis>=6", "iniconfig",
                      "pluggy", "sortedcontainers", "attrs", "setuptools>=64"]
DEFAULT_BUDGET_S = 480
# The dry run's sizes are tiny but its machine may be a busy 2-core CI runner: its limits (and
# budget) are the GPU run's times this, so that only a hang or a real failure stops a stage.
DRY_RUN_SLACK = 4
INSTALL_LIMIT_S = 420
JAX_INSTALL_LIMIT_S = 300
CHECKS = "switchsae.bench.gpu_proof_checks"
EXPORT_MAX_FILE_BYTES = 2 * 2**20  # results, plots and logs are far smaller; anything larger stays out


@dataclass
class Stage:
    """One step of the proof: a command run from the repository root with a time limit."""

    name: str
    limit_s: float
    command: list[str]
    env: dict = field(default_factory=dict)
    result: str | None = None  # a JSON file under the results folder that the summary reads
    absent_if_missing: str | None = None  # a file of this tree the command needs (dry run: absent)


def stages(py: str, out: Path, dry: bool, jax_gpu: bool) -> list[Stage]:
    """The stages in the order they run (the most telling first, the optional JAX one last)."""
    dev = "cpu" if dry else "cuda"
    check = lambda name, *extra: [py, "-m", CHECKS, name, "--out", str(out), "--device", dev,
                                  *(["--tiny"] if dry else []), *extra]

    def bench(d_gpu: int, d_tiny: int) -> list[str]:
        sizes = (["--grid", "quick", "--d-in", str(d_tiny), "--batch", "256", "--repeats", "1", "--dtype", "bfloat16",
                  "--threads", "1"] if dry else
                 ["--grid", "gpu", "--d-in", str(d_gpu), "--repeats", "3", "--dtype", "bfloat16"])
        return [py, "-m", "switchsae.bench", "--backends", "torch", *sizes, "--out", str(out / f"bench-d{d_gpu}")]

    scale = [py, "-m", "switchsae.bench.scale_sweep", "--device", dev, "--dtype", "bfloat16",
             "--out", str(out / "scale-sweep"), "--max-log2-m", "8" if dry else "20"]
    if dry:  # one tiny size, both optimisers; the sweep's AuxK check is at d 768 (GPU only)
        scale += ["--min-log2-m", "8", "--d", "16", "--m", "64", "--k", "4", "--batch", "64", "--steps", "1",
                  "--skip-auxk-check", "--threads", "1"]
    jax = check("conformance", "--backend", "jax", *(["-k", "base and forward"] if dry else []))
    listed = [
        Stage("environment", 60, check("environment"), result="environment.json"),
        Stage("conformance-torch", 120, check("conformance", "--backend", "torch", *(["-k", "base"] if dry else [])),
              result="conformance-torch.json"),
        Stage("triton", 90, check("triton"), env={"TRITON_INTERPRET": "1"} if dry else {}, result="triton.json"),
        Stage("allocation", 60, check("allocation"), result="allocation.json"),
        Stage("bench-d768", 120, bench(768, 32), result="bench-d768/results.json"),
        Stage("data-parallel", 90, check("data-parallel"), result="data-parallel.json"),
        Stage("scale-sweep", 150, scale, result="scale-sweep/scale_sweep.json",
              absent_if_missing="bench/scale_sweep.py"),
        Stage("bench-d2304", 180, bench(2304, 48), result="bench-d2304/results.json"),
    ]
    if dry or jax_gpu:
        listed.append(Stage("conformance-jax", 120, jax, result="conformance-jax.json"))
    return listed


# -- running ----------------------------------------------------------------------------------

class Log:
    """Prints and keeps every line for proof.log."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def run_command(cmd: list[str], limit_s: float, log_path: Path, env: dict) -> tuple[str, float]:
    """Run cmd in its own process group, output to log_path; -> ("ok" | "failed" | "timeout", s)."""
    start = time.monotonic()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                    start_new_session=True)
        except OSError as err:
            f.write(f"could not start: {err}\n")
            return "failed", 0.0
        try:
            code = proc.wait(timeout=max(limit_s, 0.01))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            f.write(f"\n[gpu-proof] killed after its limit of {limit_s:.0f} s\n")
            return "timeout", time.monotonic() - start
    return ("ok" if code == 0 else "failed"), time.monotonic() - start


def _kill_group(proc) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- install ----------------------------------------------------------------------------------

def _probe(py: str, code: str, env: dict, timeout: float = 120) -> dict | None:
    """Run python code that prints one JSON line; -> it, or None when it fails."""
    try:
        proc = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


TORCH_PROBE = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
               "'available': torch.cuda.is_available()}))")


def _missing_modules(py: str, requirements: list[str], env: dict) -> list[str]:
    """The requirements whose module does not import with this interpreter and env."""
    names = {r: re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].replace("-", "_") for r in requirements}
    code = ("import importlib.util, json; print(json.dumps([n for n in %r if importlib.util.find_spec(n) is None]))"
            % sorted(set(names.values())))
    found = _probe(py, code, env)
    missing = set(names.values()) if found is None else set(found)
    return [r for r, n in names.items() if n in missing]


def _requirements() -> list[str]:
    """The project's dependencies and the test tools the stages use, from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the list as of this writing
        return ["numpy>=1.26", "array-api-compat>=1.11", "safetensors>=0.4", "tqdm>=4.60", "matplotlib>=3.7",
                "pytest>=8", "hypothesis>=6"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    tools = [r for r in project["optional-dependencies"]["test"]  # the two by name (not pytest-xdist)
             if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] in ("pytest", "hypothesis")]
    return project["dependencies"] + tools


def install(py: str, site: Path, log: Log, logs: Path, env: dict, deadline: float) -> dict:
    """Make torch with CUDA, Triton, the project and its dependencies importable by `py` with
    `site` first on PYTHONPATH.  -> a record of what was found and done."""
    rec: dict = {"python": py, "site": str(site), "steps": []}

    def pip(name: str, *args: str) -> bool:
        status, took = run_command([py, "-m", "pip", "install", "--disable-pip-version-check", *args],
                                   deadline - time.monotonic(), logs / f"install-{name}.log", env)
        rec["steps"].append({"step": name, "status": status, "seconds": round(took, 1)})
        log(f"[gpu-proof] install {name}: {status} in {took:.0f} s")
        return status == "ok"

    torch = _probe(py, TORCH_PROBE, env)
    if torch is None or torch["cuda"] is None:
        log(f"[gpu-proof] no CUDA build of torch here ({torch and torch['torch']}): pip install {TORCH_CUDA_PIN}")
        pip("torch", TORCH_CUDA_PIN)
        torch = _probe(py, TORCH_PROBE, env)
    rec["torch"] = torch
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    offline = ["--no-index", "--find-links", str(WHEELS)] if WHEELS.is_dir() else []
    if not pip("switchsae", "--no-deps", "--no-build-isolation", "--target", str(site), str(REPO)):
        pip("switchsae-isolated", "--no-deps", *offline, "--target", str(site), str(REPO))
    missing = _missing_modules(py, _requirements() + ["triton"], env)
    rec["missing_before"] = missing
    if missing:
        pip("dependencies", "--no-deps", *offline, "--target", str(site), *missing)
        rec["missing_after"] = _missing_modules(py, missing, env)
    ok = bool(torch and torch["cuda"]) and not rec.get("missing_after") and all(
        s["status"] == "ok" for s in rec["steps"] if s["step"] != "switchsae")
    rec["ok"] = ok and _probe(py, "import json, switchsae.bench.gpu_proof_checks; print(1)", env) == 1
    return rec


def install_jax(py: str, torch_cuda: str | None, log: Log, logs: Path, env: dict) -> dict:
    """pip install jax with the CUDA major version torch was built for (the optional stage)."""
    extra = "cuda13" if (torch_cuda or "").startswith("13") else "cuda12"
    status, took = run_command([py, "-m", "pip", "install", "--disable-pip-version-check", f"jax[{extra}]"],
                               JAX_INSTALL_LIMIT_S, logs / "install-jax.log", env)
    log(f"[gpu-proof] install jax[{extra}]: {status} in {took:.0f} s")
    return {"step": f"jax[{extra}]", "status": status, "seconds": round(took, 1)}


def fetch_wheels(py: str, python_version: str) -> int:
    """Download the pure-Python wheels of WHEEL_REQUIREMENTS into .whl/ (for `carry`)."""
    cmd = [py, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "py", "-d", str(WHEELS), *WHEEL_REQUIREMENTS]
    code = subprocess.call(cmd, cwd=REPO)
    if code == 0:
        print(f"wheels for Python {python_version} in {WHEELS}: " + ", ".join(sorted(p.name for p in WHEELS.glob("*.whl"))))
    return code


# -- the device's name and the results folder ---------------------------------------------------

def device_name(py: str, env: dict) -> str:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    name = _probe(py, "import json, torch; print(json.dumps(torch.cuda.get_device_name(0)))", env)
    return name or "unknown-gpu"


def slug(name: str) -> str:
    """ "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


class ProofError(Exception):
    """The proof cannot start as asked (its message names why)."""


def prepare_out(out: Path) -> None:
    """An empty results folder: a previous proof's is replaced, anything else refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / "proof.log").exists() and not (out / "summary.json").exists():
            raise ProofError(f"{out} holds files that are not a GPU proof's; name another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir()


# -- summary ------------------------------------------------------------------------------------

def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def bench_rows(record: dict) -> list[dict]:
    """The README's GPU table rows from one `python -m switchsae.bench` results.json."""
    rows = []
    for res in record.get("results", []):
        peak = res["matmul_peak"]["flop_per_s"]
        for part, recs in (("speed", res["speed"]), ("memory", res["memory"])):
            for r in recs:
                step = r["train_step"]
                rows.append({"d": r["d_in"], "N": r["n_experts"], "M": r["n_latents"], "k": r["k"], "batch": r["batch"],
                             "sweep": part, "tokens_per_s": step["tokens_per_s"], "ms": 1e3 * step["median_s"],
                             "ms_min": 1e3 * step["min_s"], "ms_max": 1e3 * step["max_s"],
                             "tflop_per_s": step["flop_per_s"] / 1e12,
                             "fraction": step.get("roofline_fraction", step["flop_per_s"] / peak),
                             "peak_mib": step["peak_memory_bytes"] / 2**20, "matmul_peak_tflop_per_s": peak / 1e12})
        rows.append({"speedups": res["speedups"], "d": res["speed"][0]["d_in"], "timer": res["timer"],
                     "dtype": res["dtype"], "matmul_peak_tflop_per_s": peak / 1e12,
                     "peak_size": res["matmul_peak"]["size"]})
    return rows


def sweep_summary(record: dict) -> str:
    """One line from `bench.scale_sweep`'s scale_sweep.json: each optimiser at the largest M."""
    parts = []
    for optimizer in ("lazy_adam", "adam"):
        rows = sorted((r for r in record.get("sizes", []) if r["optimizer"] == optimizer), key=lambda r: r["log2_m"])
        if rows:
            top = rows[-1]
            parts.append(f"{optimizer} M 2^{top['log2_m']}: {top['tokens_per_s']:,.0f} tokens/s, peak "
                         f"{top['peak_memory_bytes'] / 2**30:.1f} GiB ({top['peak_over_fp32_params']:.2f}x fp32 params)")
    return "; ".join(parts) or "no sizes recorded"


def summarise(out: Path, results: list[dict], header: dict, dry: bool) -> tuple[str, dict]:
    """-> (the one-screen text, the summary record)."""
    lines = [f"GPU proof{' (CPU DRY RUN: tiny sizes, not a measurement)' if dry else ''}: {header['device']}"
             + (f" | {header['env']}" if header.get("env") else ""),
             f"results: {out}", "",
             f"{'stage':<18} {'status':<8} {'time':>6} {'limit':>6}  result"]
    for r in results:
        lines.append(f"{r['name']:<18} {r['status']:<8} {r['seconds']:>5.0f}s {r['limit_s']:>5.0f}s  {r.get('summary', '')}"[:160])
    table = []
    for r in results:
        if r["name"].startswith("bench-") and r.get("rows"):
            table += r["rows"]
    steps = [t for t in table if "N" in t]
    if steps:
        meta = next(t for t in table if "speedups" in t)
        lines += ["", f"torch train step, {meta['dtype']}, {meta['timer']}, useful FLOP/s over the measured "
                      f"{meta['dtype']} matmul peak ({meta['peak_size']}^3 product):",
                  "| d | N | M | tokens/s | ms/step (min-max) | useful TFLOP/s | of peak | step memory (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in steps:
            lines.append(f"| {t['d']} | {t['N']} | {t['M']} | {t['tokens_per_s']:,.0f} | {t['ms']:.2f} "
                         f"({t['ms_min']:.2f}-{t['ms_max']:.2f}) | {t['tflop_per_s']:.3g} | {t['fraction']:.1%} | "
                         f"{t['peak_mib']:,.0f} |")
        for t in table:
            if "speedups" in t:
                lines.append(f"d {t['d']}: matmul peak {t['matmul_peak_tflop_per_s']:.3g} TFLOP/s; "
                             + ", ".join(f"{k} {v:.2f}x" for k, v in t["speedups"].items()))
    failed = [r["name"] for r in results if r["status"] not in ("ok", "absent", "skipped")]
    lines += ["", "ALL STAGES PASSED" if not failed else f"FAILED: {', '.join(failed)}"]
    record = {"dry_run": dry, **header, "stages": results, "failed": failed, "passed": not failed}
    return "\n".join(lines), record


def _write(path: Path, text: str) -> None:
    """Written next to the target and renamed into place: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export(out: Path, dest: Path) -> None:
    """$OUT: the folder as one archive, plus the summary and the log (the device tool brings
    back at most 8 files, 2 folders down)."""
    dest.mkdir(parents=True, exist_ok=True)
    left_out = []

    def small(info):  # the archive stays well under the tool's 16 MiB a file
        if info.size <= EXPORT_MAX_FILE_BYTES:
            return info
        left_out.append(f"{info.name} ({info.size / 2**20:.1f} MiB)")
        return None

    with tarfile.open(dest / "gpu-proof-results.tar.gz", "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=small)
    if left_out:
        print(f"[gpu-proof] left out of the archive: {', '.join(left_out)}")
    for name in ("summary.md", "summary.json", "proof.log"):
        if (out / name).exists():
            shutil.copy(out / name, dest / name)


def _read_result(name: str, rec: dict | None, entry: dict, header: dict) -> None:
    """Put what a stage's result file says into its summary entry (and the header)."""
    if rec is None:
        return
    if name.startswith("bench-"):
        entry["rows"] = bench_rows(rec)
        entry["summary"] = f"matmul peak {entry['rows'][-1]['matmul_peak_tflop_per_s']:.3g} TFLOP/s"
    elif name == "scale-sweep":
        entry["summary"] = sweep_summary(rec)
    elif "summary" in rec:
        entry["summary"] = rec["summary"]
    if name == "environment":
        header["env"] = rec["summary"]


# -- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_proof.sh", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--cpu-dry-run", action="store_true", help="every stage on CPU at tiny sizes, no installs")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/gpu-<device>, "
                                                 "runs/gpu-proof-cpu-dry-run for the dry run)")
    parser.add_argument("--budget", type=float,
                        help=f"seconds for all stages together (default {DEFAULT_BUDGET_S}, the dry run "
                             f"{DRY_RUN_SLACK}x that; install not counted)")
    parser.add_argument("--stages", help="comma-separated subset of the stages, in their order")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's time limit (repeatable)")
    parser.add_argument("--no-install", action="store_true", help="use the interpreter as it is")
    parser.add_argument("--install-jax", action="store_true", help="pip install jax with CUDA (optional stage)")
    parser.add_argument("--fetch-wheels", nargs="?", const="3.12", metavar="PYTHON_VERSION",
                        help="download pure-Python dependency wheels into .whl/ and exit (default 3.12)")
    args = parser.parse_args(argv)
    py = sys.executable
    if args.fetch_wheels:
        return fetch_wheels(py, args.fetch_wheels)
    limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        try:
            limits[name] = float(seconds)
        except ValueError:
            parser.error(f"--limit wants STAGE=SECONDS, got {item!r}")

    dry = args.cpu_dry_run
    names = [s.name for s in stages(py, REPO, dry, jax_gpu=True)]
    wanted = args.stages.split(",") if args.stages else names
    unknown = sorted((set(wanted) | set(limits)) - set(names))
    if unknown:  # before any work
        parser.error(f"unknown stages {unknown}; choose from {', '.join(names)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry:
        env.update(SWITCHSAE_DEVICE="cpu", OMP_NUM_THREADS="1")
    log = Log()
    name = "cpu (dry run)" if dry else device_name(py, env)
    out = (args.out or REPO / ("runs/gpu-proof-cpu-dry-run" if dry else f"bench/results/gpu-{slug(name)}")).resolve()
    try:
        prepare_out(out)
    except ProofError as err:
        parser.error(str(err))
    logs = out / "logs"
    log(f"[gpu-proof] {name}; results in {out}")
    header: dict = {"device": name, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    results: list[dict] = []

    jax_gpu = False
    if not dry and not args.no_install:
        site = Path(os.environ.get("TMPDIR", "/tmp")) / "switchsae-gpu-proof-site"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        start = time.monotonic()
        rec = install(py, site, log, logs, env, start + INSTALL_LIMIT_S)
        if args.install_jax:
            rec["steps"].append(install_jax(py, (rec.get("torch") or {}).get("cuda"), log, logs, env))
        results.append({"name": "install", "status": "ok" if rec["ok"] else "failed", "limit_s": INSTALL_LIMIT_S,
                        "seconds": time.monotonic() - start, "record": rec,
                        "summary": f"torch {(rec.get('torch') or {}).get('torch')} (CUDA {(rec.get('torch') or {}).get('cuda')})"
                                   + (f"; installed {', '.join(rec['missing_before'])}" if rec.get("missing_before") else "")})
    if not dry:
        jax_gpu = bool(_probe(py, "import json, jax; print(json.dumps(any(d.platform == 'gpu' for d in jax.devices())))",
                              {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}))

    chosen = [s for s in stages(py, out, dry, jax_gpu) if s.name in wanted]
    slack = DRY_RUN_SLACK if dry else 1
    deadline = time.monotonic() + (args.budget or slack * DEFAULT_BUDGET_S)
    for stage in chosen:
        remaining = deadline - time.monotonic()
        limit = min(limits.get(stage.name, slack * stage.limit_s), remaining)
        entry = {"name": stage.name, "limit_s": round(limit, 1), "seconds": 0.0,
                 "command": " ".join(stage.command).replace(py, "python")}
        if stage.absent_if_missing and not (REPO / stage.absent_if_missing).exists():
            entry.update(status="absent" if dry else "failed",
                         summary=f"{stage.absent_if_missing} is not in this tree yet")
        elif remaining < 1:
            entry.update(status="not run", summary="the budget was spent before this stage")
        else:
            status, took = run_command(stage.command, limit, logs / f"{stage.name}.log", {**env, **stage.env})
            entry.update(status=status, seconds=round(took, 1))
            rec = _read(out / stage.result) if stage.result else None
            try:
                _read_result(stage.name, rec, entry, header)
            except (KeyError, IndexError, TypeError, ValueError) as err:  # a summary bug must not end the run
                entry["summary"] = f"could not read {stage.result}: {err!r}"
            if status != "ok":
                entry["summary"] = (entry.get("summary", "") + f" (see logs/{stage.name}.log)").strip()
        results.append(entry)
        log(f"[gpu-proof] {stage.name}: {entry['status']} in {entry['seconds']:.0f} s"
            f" (limit {entry['limit_s']:.0f} s) {entry.get('summary', '')}")
        if entry["status"] in ("failed", "timeout"):
            log(_tail(logs / f"{stage.name}.log"))

    text, record = summarise(out, results, header, dry)
    log("")
    log(text)
    _write(out / "summary.md", text + "\n")
    _write(out / "summary.json", json.dumps(record, indent=1) + "\n")
    _write(out / "proof.log", "\n".join(log.lines) + "\n")
    if os.environ.get("OUT"):
        export(out, Path(os.environ["OUT"]))
        print(f"[gpu-proof] packed {out} into {os.environ['OUT']}/gpu-proof-results.tar.gz")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
