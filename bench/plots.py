"""PNG plots of a benchmark record: tokens/s against N, peak memory against M."""

from __future__ import annotations

from switchsae.plots import pyplot, save_png


def _line_plot(path, series, xlabel, ylabel, title):
    """series: [(label, xs, ys)] -> a log-log PNG at path."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    if series:
        ax.legend(fontsize=7)
    return str(save_png(fig, path))


def plot(record: dict, out_dir) -> list[str]:
    """Write throughput.png and memory.png into out_dir; -> their paths."""
    throughput = [(f"{res['backend']} train step (M={res['speed'][0]['n_latents']}, {res['device']})",
                   [r["n_experts"] for r in res["speed"]],
                   [r["train_step"]["tokens_per_s"] for r in res["speed"]]) for res in record["results"]]
    memory = [(f"{res['backend']} (N={res['memory'][0]['n_experts']}, "
               f"{res['memory'][0]['train_step']['memory_measure']})",
               [r["n_latents"] for r in res["memory"]],
               [r["train_step"]["peak_memory_bytes"] / 2**20 for r in res["memory"]])
              for res in record["results"] if res["memory"]]  # none when every M ran out of memory
    return [
        _line_plot(f"{out_dir}/throughput.png", throughput, "experts N (fixed total width M)", "tokens / s",
                   "Switch SAE training throughput"),
        _line_plot(f"{out_dir}/memory.png", memory, "dictionary size M", "peak memory of a train step (MiB)",
                   "Train-step memory"),
    ]
