"""PNG plots of a benchmark record: tokens/s against N, peak memory against M."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(record: dict, out_dir) -> list[str]:
    """Write throughput.png and memory.png into out_dir; -> their paths."""
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in record["results"]:
        speed = res["speed"]
        ax.plot([r["n_experts"] for r in speed], [r["train_step"]["tokens_per_s"] for r in speed],
                marker="o", label=f"{res['backend']} train step (M={speed[0]['n_latents']}, {res['device']})")
    ax.set(xscale="log", yscale="log", xlabel="experts N (fixed total width M)", ylabel="tokens / s",
           title="Switch SAE training throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{out_dir}/throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in record["results"]:
        mem = res["memory"]
        ax.plot([r["n_latents"] for r in mem], [r["train_step"]["peak_memory_bytes"] / 2**20 for r in mem],
                marker="o", label=f"{res['backend']} (N={mem[0]['n_experts']}, {mem[0]['train_step']['memory_measure']})")
    ax.set(xscale="log", yscale="log", xlabel="dictionary size M", ylabel="peak memory of a train step (MiB)",
           title="Train-step memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{out_dir}/memory.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
