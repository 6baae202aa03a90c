"""Training metrics: what is measured on a training batch, and the JSONL file it goes to."""

from __future__ import annotations

import json
from pathlib import Path

from switchsae.core import metrics
from switchsae.files import atomic_write_bytes


def step_metrics(out, x, counter, cfg, dead_tokens: int, backend) -> dict:
    """Metrics of one training step.  out: its ForwardOutput; x: the (normalised) batch;
    counter: tokens since each latent fired.  Losses are in normalised units; FVU and nMSE
    do not depend on the scale."""
    xp = backend.xp
    x32, x_hat32 = xp.astype(x, xp.float32), xp.astype(out.x_hat, xp.float32)
    load = metrics.expert_load(out.expert, cfg.n_experts, xp)
    record = {
        "fvu": float(metrics.fvu(x32, x_hat32, xp)),
        "nmse": float(metrics.normalized_mse(x32, x_hat32, xp)),
        "l0": float(metrics.l0(out.top_values, xp)),
        "dead_fraction": float(metrics.dead_fraction(counter, dead_tokens, xp)),
        "load_entropy": float(metrics.load_entropy(load, xp)),
        "expert_load": [round(float(v), 6) for v in backend.to_numpy(load)],
    }
    record.update({f"loss_{name}": float(value) for name, value in out.losses.items()})
    return record


class MetricsLog:
    """Append-only JSONL metrics file, one object per logged step.

    Resuming at step s starts from the lines of `history` (default: this file) up to s,
    dropping what a killed run wrote after s (and any torn last line), written atomically,
    so the log matches the restored state."""

    def __init__(self, path, resume_step: int | None = None, history=None):
        self.path = Path(path)
        if resume_step is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path if history is None else history)
                    if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= resume_step]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path) -> list[dict]:
    """The records of a metrics file (a torn last line from a killed run is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
