"""End-of-run report: a text summary with a feature-density histogram, and a PNG of the curves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from switchsae.files import atomic_write_bytes, atomic_write_json

REPORT_FILE = "report.txt"
PLOT_FILE = "curves.png"
EVAL_FILE = "eval.json"


def density_histogram(frequency: np.ndarray, width: float = 0.5):
    """Histogram of log10 firing frequency over the latents that fired (SAELens's feature
    density plot).  -> (bin edges, counts, number of latents that never fired)."""
    fired = frequency[frequency > 0]
    if fired.size == 0:
        return np.array([0.0]), np.zeros(0, dtype=int), int(frequency.size)
    low = np.floor(np.log10(fired.min()) / width) * width
    edges = np.arange(low, width / 2, width)
    edges = np.append(edges, 0.0) if edges[-1] < 0 else edges
    counts, _ = np.histogram(np.log10(fired), bins=edges)
    return edges, counts, int(frequency.size - fired.size)


def format_density(frequency: np.ndarray, bar_width: int = 40) -> str:
    """The histogram as text bars, never-fired latents on the first line."""
    edges, counts, dead = density_histogram(frequency)
    top = max(int(counts.max(initial=0)), dead, 1)
    lines = [f"  never fired        {dead:6d} {'#' * round(bar_width * dead / top)}"]
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        lines.append(f"  [{lo:5.1f}, {hi:5.1f})    {c:6d} {'#' * round(bar_width * c / top)}")
    return "\n".join(lines)


def format_report(summary: dict, eval_text: str, eval_label: str, frequency: np.ndarray) -> str:
    """The report text.  summary: run facts (name -> value), printed in order."""
    width = max(map(len, summary)) + 2
    lines = ["Switch SAE training report", "=" * 26, ""]
    lines += [f"{name:<{width}}{value}" for name, value in summary.items()]
    lines += ["", f"Evaluation ({eval_label})", "-" * 30, eval_text, "",
              "Feature density: latents per log10(firing frequency) bin", "-" * 30,
              format_density(frequency), ""]
    return "\n".join(lines)


def plot_curves(history: list, frequency: np.ndarray, path) -> Path:
    """PNG of FVU, losses, dead fraction, load entropy, learning rate and feature density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    panels = [
        ("FVU", [("fvu", "train batch")], True),
        ("losses (normalised units)", [("loss_mse", "mse"), ("loss_lb", "load balance"),
                                       ("loss_auxk", "auxk")], True),
        ("dead fraction", [("dead_fraction", "dead")], False),
        ("expert load entropy (nats)", [("load_entropy", "entropy")], False),
        ("learning rate", [("lr", "lr")], False),
    ]
    for ax, (title, keys, log_y) in zip(axes.flat, panels):
        for key, label in keys:
            values = [r[key] for r in history]
            if log_y and not all(v > 0 for v in values):
                continue
            ax.plot(steps, values, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend()
    if history:
        n = len(history[-1]["expert_load"])
        axes[1, 0].axhline(np.log(n), color="grey", ls="--", lw=0.8)
    edges, counts, dead = density_histogram(frequency)
    ax = axes[1, 2]
    if counts.size:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black")
    ax.set_title(f"feature density ({dead} never fired)")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(out_dir, summary: dict, evaluation, eval_label: str, history: list) -> dict:
    """Write report.txt, curves.png and eval.json into `out_dir` (each atomically).
    evaluation: an `EvalResult`.  -> {"report": path, "plot": path, "eval": path}."""
    out_dir = Path(out_dir)
    freq = evaluation.firing_frequency
    text = format_report(summary, evaluation.format(), eval_label, freq)
    report = atomic_write_bytes(out_dir / REPORT_FILE, text.encode())
    plot = plot_curves(history, freq, out_dir / PLOT_FILE)
    payload = {"label": eval_label, **evaluation.summary()}
    ev = atomic_write_json(out_dir / EVAL_FILE, payload, indent=1)
    return {"report": report, "plot": plot, "eval": ev}
