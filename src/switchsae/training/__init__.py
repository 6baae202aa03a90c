"""Training Switch SAEs: `Trainer` + `TrainConfig`, evaluation, the end-of-run report.

    from switchsae.training import Trainer, TrainConfig, evaluate
    trainer = Trainer(cfg, TrainConfig(steps=500, batch_size=4096, out_dir="runs/a"), source)
    result = trainer.run()              # result.sae: the trained SwitchSAE (raw activations)
    print(evaluate(result.sae, held_out).format())
"""

from .config import TrainConfig
from .data import DataSpec, build_sources
from .evaluate import EvalResult, evaluate
from .report import write_report
from .schedule import learning_rate
from .trainer import NonFiniteError, Trainer, TrainingError, TrainResult

__all__ = ["DataSpec", "EvalResult", "NonFiniteError", "TrainConfig", "TrainResult", "Trainer",
           "TrainingError", "build_sources", "evaluate", "learning_rate", "write_report"]
