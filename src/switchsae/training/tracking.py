"""Optional experiment tracking: the trainer's metrics lines sent to Weights & Biases.

    tracker = WandbTracker("my-project", run_dir, config={...})
    Trainer(..., on_record=tracker.log).run(); tracker.finish(summary)

wandb writes its files under `run_dir` (`run_dir/wandb/`); WANDB_MODE=offline keeps them
there for a later `wandb sync`.
"""

from __future__ import annotations

from pathlib import Path

from switchsae.core.config import ConfigError


class WandbTracker:
    """One wandb run; `log(record)` takes a metrics line (dict with "step")."""

    def __init__(self, project: str, run_dir, config: dict | None = None, name: str | None = None):
        if not isinstance(project, str) or not project.strip():
            raise ConfigError(f"the wandb project must be a non-empty name, got {project!r}")
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("--wandb needs the wandb package (pip install wandb)") from e
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, dir=str(run_dir), config=config or {},
                              name=name or run_dir.name, reinit="finish_previous")

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for i, share in enumerate(record.get("expert_load", [])):
            values[f"expert_load/{i}"] = share
        self.run.log(values, step=int(record["step"]))

    def finish(self, summary: dict | None = None) -> None:
        if summary:
            self.run.summary.update(summary)
        self.run.finish()
        import wandb

        wandb.teardown()  # stop wandb's service: everything logged is on disk when this returns
