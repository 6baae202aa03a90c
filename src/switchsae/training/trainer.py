"""`Trainer`: the training loop around the shared `core.train_step`, with metrics,
dead-latent tracking, atomic resumable checkpoints and fail-fast checks."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import array_api_compat.numpy as np_xp
import numpy as np

from switchsae import checkpoint as ckpt_io
from switchsae._active import get_backend
from switchsae.core import selection_bias
from switchsae.core.config import ConfigError, SwitchSAEConfig, check_int, check_number
from switchsae.core.dead_latents import dead_mask, tokens_seen, update_tokens_since_fired
from switchsae.core.init import geometric_median, init_params
from switchsae.core.optim import AdamState, adam_init
from switchsae.core.spec import uses_auxk
from switchsae.core.train_step import train_step
from switchsae.data import DataError
from switchsae.files import crash_point, remove_dir
from switchsae.model import SwitchSAE
from switchsae.validation import check_fits_in_memory

from .config import TrainConfig
from .metrics_log import MetricsLog, read_metrics, step_metrics
from .normalize import estimate_scale, fold_scale, unfold_scale
from .run_dir import METRICS_FILE, RunLock, check_new_run_dir
from .schedule import learning_rate

STATE_VERSION = 1
# a training-batch FVU above this has diverged: the untrained model's is about 1 (b_pre alone)
# to a few (random decoder directions); 100 leaves room for a rough start, a diverged run
# (e.g. lr 1e6) measured FVU 1e27
DIVERGED_FVU = 100.0


class TrainingError(RuntimeError):
    """Training cannot go on (the message names the step and what went wrong)."""


class NonFiniteError(TrainingError):
    """A NaN or inf in the activations or the loss."""


class DivergedError(TrainingError):
    """The reconstruction error exploded (the learning rate is too high for this data)."""


@dataclass
class TrainResult:
    """sae: the trained model for raw activations; history: the logged metric records;
    checkpoint: the last checkpoint written (None without out_dir); wall_time: seconds."""

    sae: SwitchSAE
    step: int
    history: list
    checkpoint: Path | None
    wall_time: float


class Trainer:
    """Train `cfg` on batches from `source` (an `ActivationSource`) on `backend`.

    Everything is checked before any work: the source's d_in and batch size against the
    configs, the dtype against the backend.  `run()` trains to `train_cfg.steps`;
    `Trainer.resume(path, source)` continues a checkpointed run exactly (same data order,
    same numbers).  data_spec: a JSON-able description of the source, stored for resuming.

    Parallel (a backend with `parallel` set, e.g. from `switchsae.backends.load_parallel_backend`;
    on several processes every one runs this with the same source and configs): `batch_size`
    is the global batch; each process reads the whole first batch (initialisation: scale and
    geometric median of the whole batch) and then only its own rows of each batch
    (`backend.batch_rows`); rank 0 alone writes the metrics and checkpoints (whole parameters,
    gathered); `run().sae` is None on the other ranks of an expert-parallel run.
    """

    def __init__(self, cfg: SwitchSAEConfig, train_cfg: TrainConfig, source, backend=None, *,
                 data_spec: dict | None = None, progress: bool = True, on_record=None):
        """A new run; its out_dir (if any) must not hold a complete checkpoint (see
        `run_dir.check_new_run_dir`) and is locked against other trainers until `run` ends."""
        self._setup(cfg, train_cfg, source, backend, data_spec, progress, on_record, resuming=False)

    def _setup(self, cfg, train_cfg, source, backend, data_spec, progress, on_record, resuming: bool) -> None:
        self.lock = None
        self.on_record = on_record  # called with each metrics line (e.g. tracking.WandbTracker.log)
        self.backend = get_backend(backend) if backend is None or isinstance(backend, str) else backend
        _check_setup(cfg, train_cfg, source, self.backend)
        self.cfg, self.tc, self.source = cfg, train_cfg, source
        self.data_spec, self.progress = data_spec, progress
        self.dead_tokens = train_cfg.dead_threshold(cfg)
        self.peak_lr = train_cfg.learning_rate(cfg)
        self.bias_step = train_cfg.selection_bias_step(cfg)
        self.bias_state = None  # the `selection_bias.SelectionBias` with a bias step
        self.out_dir = Path(train_cfg.out_dir) if train_cfg.out_dir else None
        self.step, self.elapsed, self.scale = 0, 0.0, 1.0
        self.params = self.opt_state = self.counter = None
        self.last_checkpoint: Path | None = None
        self.rows = self.backend.batch_rows(train_cfg.batch_size)  # this process's rows of a batch
        self._history_from: Path | None = None  # resuming: the metrics file to continue
        self.is_main = self.backend.rank == 0  # the process that writes
        if self.out_dir is not None and self.is_main:
            if not resuming:
                check_new_run_dir(self.out_dir, other_files=True)
            self.lock = RunLock(self.out_dir)

    # -- set-up ---------------------------------------------------------------------------
    @classmethod
    def resume(cls, path, source, backend=None, *, out_dir=None, progress: bool = True,
               on_record=None) -> Trainer:
        """Continue from a checkpoint (or a run directory's newest).  `source` must be built
        like the original one; its position is restored from the checkpoint.  The run goes on
        in `out_dir`, by default the run directory holding the checkpoint (wherever it was
        moved or copied to; a lone checkpoint directory needs `out_dir`).  A new `out_dir`
        starts with the original run's metrics up to the checkpoint."""
        ckpt, state, tc = read_resumable(path)
        in_run = ckpt.path.parent.name == ckpt_io.CHECKPOINTS_DIR
        run = ckpt.path.parent.parent if in_run else None
        if out_dir is None and run is None:
            raise ckpt_io.CheckpointError(
                f"{ckpt.path} is a checkpoint outside a run directory: pass out_dir (--out) for the continued run")
        out = Path(out_dir) if out_dir is not None else run
        if run is None or out.resolve() != run.resolve():
            check_new_run_dir(out, other_files=True)
        trainer = cls.__new__(cls)
        trainer._setup(ckpt.cfg, tc.replace(out_dir=str(out)), source, backend, state.get("data_spec"),
                       progress, on_record, resuming=True)
        trainer._restore(ckpt, state, run)
        return trainer

    def _restore(self, ckpt, state: dict, run: Path | None) -> None:
        be, dtype = self.backend, self.cfg.dtype
        self.step, self.elapsed = state["step"], float(state["elapsed"])
        self.scale = float(state["activation_scale"])

        def native(arrays):  # whole NumPy arrays -> this process's part, on the backend, laid out as live
            return be.training_layout(self._local({k: be.asarray(v, dtype) for k, v in arrays.items()}))

        self.params = native(unfold_scale(ckpt.params, self.scale))
        opt = ckpt.optimizer
        self.opt_state = AdamState(int(opt["step"]), native(opt["m"]), native(opt["v"]))
        self.counter = be.asarray(np.asarray(state["tokens_since_fired"], dtype=np.float32))
        if self.bias_step:
            shape = (self.cfg.n_experts, self.cfg.expert_width)
            self.bias_state = selection_bias.SelectionBias(
                *(be.asarray(np.asarray(state["selection_bias"][name], dtype=np.float32).reshape(shape))
                  for name in selection_bias.SelectionBias._fields))
        try:
            self.source.load_state_dict(state["data_state"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt_io.CheckpointError(f"{ckpt.path / ckpt_io.STATE_FILE}: data_state does not fit this "
                                          f"data source: {e}") from e
        self.last_checkpoint = ckpt.path
        self._history_from = run / METRICS_FILE if run is not None else None

    def _initialise(self, first_batch: np.ndarray) -> np.ndarray:
        """Scale from the first batch, b_pre = b_router = its geometric median (the paper).
        Returns the scaled first batch (it is also the first training batch)."""
        if not np.any(first_batch != first_batch[:1]):
            raise DataError("the first batch of activations is constant (every row the same): the FVU is "
                            "undefined (zero variance) and there is nothing to learn; check the data")
        self.scale = estimate_scale(first_batch) if self.tc.normalize else 1.0
        scaled = first_batch * self.scale
        params = init_params(self.cfg, self.tc.seed)
        median = geometric_median(scaled.astype(np.float64), np_xp)
        params["b_pre"], params["b_router"] = median, median.copy()
        self.params = self.backend.training_layout(
            self._local(SwitchSAE.from_params(self.cfg, params, self.backend).params))
        self.opt_state = adam_init(self.params, self.backend.xp)
        self.counter = self.backend.asarray(np.zeros(self.cfg.total_latents, dtype=np.float32))
        self.bias_state = selection_bias.init_state(self.cfg, self.backend) if self.bias_step else None
        return scaled

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to `steps`; log, checkpoint, and stop with NonFiniteError on NaN/inf."""
        from tqdm.auto import tqdm

        try:
            return self._run(tqdm)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self, tqdm) -> TrainResult:
        tc = self.tc
        log = self._open_log()
        history = read_metrics(log.path) if log else []
        step_fn = self.backend.compile_step(
            functools.partial(train_step, self.backend, self.cfg, max_grad_norm=tc.max_grad_norm,
                              optimizer=tc.optimizer))
        pending = self._initialise(self._checked_batch(whole=True))[self.rows] if self.params is None else None
        bar = tqdm(total=tc.steps, initial=self.step, unit="step", disable=not (self.progress and self.is_main),
                   desc=f"switch sae ({self.backend.name})", dynamic_ncols=True)
        window = [time.perf_counter(), 0]  # start time and tokens of the current log window
        try:
            while self.step < tc.steps:
                x_np = pending if pending is not None else self._checked_batch() * self.scale
                pending = None
                x, lr, out = self._update(step_fn, x_np)
                crash_point("trainer:step")
                window[1] += x_np.shape[0]
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    record = self._record(out, x, lr, window)
                    history.append(record)
                    if log:
                        log.append(record)
                    if self.on_record and self.is_main:
                        self.on_record(record)
                    bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}",
                                    dead=f"{record['dead_fraction']:.2f}", lb=f"{record['loss_lb']:.3f}",
                                    tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                    window[:] = [time.perf_counter(), 0]
                if self.out_dir and (self.step % tc.checkpoint_every == 0 or self.step == tc.steps):
                    self.save_checkpoint()
        finally:
            bar.close()
        return TrainResult(self.sae(), self.step, history, self.last_checkpoint, self.elapsed)

    def _update(self, step_fn, x_np: np.ndarray):
        """One optimiser step on the (scaled) batch; -> (native batch, lr, ForwardOutput)."""
        be = self.backend
        x = be.place_batch(x_np, self.cfg.dtype)
        lr = learning_rate(self.step, self.tc.steps, self.peak_lr, self.tc.warmup, self.tc.decay_fraction)
        self.params, self.opt_state, out = step_fn(self.params, self.opt_state, x, lr, self._dead_mask(),
                                                   self._select_bias())
        self.step += 1
        self._check_loss(out)
        if self.bias_state is not None:  # evaluated here on every process: a lazy backend (MLX) would
            # otherwise run the update's collectives wherever it is next read (rank 0 alone, saving it)
            self.bias_state = be.block_until_ready(selection_bias.update(
                self.bias_state, out, self.cfg, be, self.bias_step, self.tc.selection_bias_floor))
        seen = tokens_seen(self.cfg, out.expert, be) if self.tc.dead_count == "expert" else None
        self.counter = update_tokens_since_fired(self.counter, out.top_indices, out.top_values, be, seen)
        return x, lr, out

    def _dead_mask(self):
        """The dead latents AuxK revives, or None without AuxK work to do: when auxk_coef is 0, or
        while no latent is dead (AuxK is then exactly 0, with no gradient, yet its TopK over
        k_aux candidates and their decode would cost more than the rest of the step)."""
        mask = dead_mask(self.counter, self.dead_tokens)
        # np.any on a copy of the (M,) bools: not every backend's namespace has `any` (MLX's)
        return mask if uses_auxk(self.cfg, mask) and np.any(self.backend.to_numpy(mask)) else None

    def _select_bias(self):
        """The main TopK's selection bias for this step ((N, m), faded by `selection_bias.scale`),
        or None: off, or faded to 0."""
        if self.bias_state is None:
            return None
        factor = selection_bias.scale(self.step, self.tc.steps, self.tc.selection_bias_fade)
        if factor == 0:
            return None
        return self.bias_state.bias if factor == 1 else self.bias_state.bias * factor

    def _record(self, out, x, lr: float, window: list) -> dict:
        """The metrics line for this step; window: [start time, tokens] since the last line."""
        seconds = max(time.perf_counter() - window[0], 1e-9)
        self.elapsed += seconds
        out, x = self.backend.gather_outputs(out, x)  # parallel: metrics of the whole batch
        record = {"step": self.step, "tokens": self.step * self.tc.batch_size, "lr": lr,
                  **step_metrics(out, x, self.counter, self.cfg, self.dead_tokens, self.backend),
                  "tokens_per_s": window[1] / seconds, "elapsed_s": self.elapsed}
        if not record["fvu"] <= DIVERGED_FVU:
            raise DivergedError(f"step {self.step}: training diverged (training-batch FVU {record['fvu']:.3g} > "
                                f"{DIVERGED_FVU:g}, learning rate {lr:g}); lower the learning rate; "
                                f"stopped{self._last_saved()}")
        return record

    def _open_log(self) -> MetricsLog | None:
        """The run's metrics file: new, or when resuming the original run's lines up to the
        restored step (what a killed run wrote after it is dropped)."""
        if self.out_dir is None or not self.is_main:
            return None
        self._prune()  # a run killed before it pruned
        return MetricsLog(self.out_dir / METRICS_FILE, self.step or None, self._history_from)

    def _checked_batch(self, whole: bool = False) -> np.ndarray:
        """The next batch: this process's rows of it (whole: all of them)."""
        rows = self.rows.stop - self.rows.start
        whole = whole or rows == self.tc.batch_size
        batch = self.source.next_batch() if whole else self.source.next_batch(self.rows)
        rows = self.tc.batch_size if whole else rows
        if batch.shape != (rows, self.cfg.d_in):
            raise DataError(f"step {self.step + 1}: the data source gave a batch of shape {batch.shape}, "
                            f"expected {(rows, self.cfg.d_in)}")
        if not np.all(np.isfinite(batch)):
            row, col = np.argwhere(~np.isfinite(batch))[0]
            raise NonFiniteError(f"step {self.step + 1}: activations hold NaN/inf (batch row {row}, "
                                 f"column {col}); stopped{self._last_saved()}")
        return batch

    def _check_loss(self, out) -> None:
        losses = {name: float(v) for name, v in out.losses.items()}
        bad = [name for name, v in losses.items() if not np.isfinite(v)]
        if bad:
            raise NonFiniteError(f"step {self.step}: loss {bad[0]!r} is {losses[bad[0]]} "
                                 f"(losses: {losses}); stopped{self._last_saved()}")

    def _last_saved(self) -> str:
        return f", last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ", nothing saved"

    # -- outputs --------------------------------------------------------------------------
    def sae(self) -> SwitchSAE | None:
        """The current model, for raw (unscaled) activations (None on the ranks other than 0
        of an expert-parallel run: a collective there, every rank must call it)."""
        params = self._numpy(self.params)
        return None if params is None else SwitchSAE.from_params(self.cfg, fold_scale(params, self.scale),
                                                                 self.backend.local_backend())

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint `<out_dir>/checkpoints/step_<n>` and prune old ones
        (distributed: a collective that gathers the parameters; rank 0 writes)."""
        if self.out_dir is None:
            raise ConfigError("TrainConfig.out_dir is None: nowhere to write checkpoints")
        params, m, v = (self._numpy(a) for a in (self.params, self.opt_state.m, self.opt_state.v))
        path = self.out_dir / ckpt_io.CHECKPOINTS_DIR / f"step_{self.step:08d}"
        if not self.is_main:
            self.last_checkpoint = path
            return path
        state = {
            "format_version": STATE_VERSION,
            "step": self.step,
            "elapsed": self.elapsed,
            "activation_scale": self.scale,
            "backend": self.backend.name,
            "train_config": self.tc.to_dict(),
            "data_spec": self.data_spec,
            "data_state": self.source.state_dict(),
            "tokens_since_fired": [float(c) for c in self.backend.to_numpy(self.counter)],
        }
        if self.bias_state is not None:  # float32 -> JSON numbers and back: exact
            state["selection_bias"] = {name: [float(c) for c in self.backend.to_numpy(a).reshape(-1)]
                                       for name, a in self.bias_state._asdict().items()}
        optimizer = {"step": int(self.opt_state.step), "m": m, "v": v}
        ckpt_io.write_checkpoint(path, self.cfg, fold_scale(params, self.scale),
                                 optimizer=optimizer, trainer_state=state, overwrite=True)
        self.last_checkpoint = path
        crash_point("trainer:checkpoint_written")
        self._prune()
        return path

    def _prune(self) -> None:
        """Remove all but the newest `keep_checkpoints` checkpoints (never one half-removed)."""
        for old in ckpt_io.list_checkpoints(self.out_dir)[:-self.tc.keep_checkpoints]:
            remove_dir(old)

    def _numpy(self, arrays: dict) -> dict | None:
        """NumPy copies (a backend may share memory with arrays it later updates in place) of
        whole parameters or moments (distributed: gathered; None where they are not)."""
        arrays = self.backend.gather_params(arrays)
        if arrays is None:
            return None
        return {k: np.array(self.backend.to_numpy(v)) for k, v in arrays.items()}

    def _local(self, arrays: dict) -> dict:
        """Whole parameters or moments -> this process's part (expert parallel: its experts)."""
        return self.backend.shard_params(arrays)


def check_config(cfg: SwitchSAEConfig, tc: TrainConfig, backend) -> None:
    """What can be checked before the data exists: the dtype (supported by the backend, and
    trainable), the memory training needs, the parallel split."""
    if not isinstance(cfg, SwitchSAEConfig) or not isinstance(tc, TrainConfig):
        raise ConfigError(f"expected a SwitchSAEConfig and a TrainConfig, got {type(cfg).__name__} "
                          f"and {type(tc).__name__}")
    try:
        backend.dtype(cfg.dtype)
    except TypeError as e:
        raise ConfigError(str(e)) from e
    if cfg.dtype == "float16":
        raise ConfigError("float16 cannot train: Adam's eps (1e-8) rounds to 0 and squared gradients overflow "
                          "its range (max 65504); train in bfloat16 or float32 and load the result with "
                          "dtype='float16' (switchsae eval --dtype float16) for inference")
    check_fits_in_memory(cfg, copies=3, what="training (parameters and Adam's two moments)")
    tc.selection_bias_step(cfg)  # supported by the routing
    backend.check_partition(cfg, tc.batch_size)  # parallel: equal batch slices, whole experts
    if tc.optimizer == "lazy_adam" and backend.parallel:  # its row gradients are one process's
        raise ConfigError(f"optimizer 'lazy_adam' runs on one process; use 'adam' with {backend.describe_parallel()}")


def _check_setup(cfg: SwitchSAEConfig, tc: TrainConfig, source, backend) -> None:
    """Fail before any work on a bad config or mismatched d_in, batch size or dtype."""
    check_config(cfg, tc, backend)
    if source.d_in != cfg.d_in:
        raise DataError(f"the data has d_in={source.d_in} but the model config has d_in={cfg.d_in}")
    if source.batch_size != tc.batch_size:
        raise ConfigError(f"the data source yields batches of {source.batch_size} rows but "
                          f"TrainConfig.batch_size is {tc.batch_size}")
    if np.dtype(source.dtype).kind != "f":
        raise DataError(f"activations must be floating point; the data source has dtype {source.dtype}")


def read_resumable(path) -> tuple:
    """A checkpoint to resume, every field of its training state checked (a CheckpointError
    naming the file and the field, before any work).  -> (Checkpoint, trainer state, TrainConfig)."""
    ckpt = ckpt_io.read_checkpoint(path)
    state, where = ckpt.trainer_state, ckpt.path / ckpt_io.STATE_FILE
    if state is None or ckpt.optimizer is None:
        raise ckpt_io.CheckpointError(f"{ckpt.path} holds no training state; it cannot be resumed")
    needed = {"step", "elapsed", "activation_scale", "data_state", "tokens_since_fired", "train_config"}
    if state.get("format_version") != STATE_VERSION or needed - set(state):
        raise ckpt_io.CheckpointError(
            f"{where}: unsupported trainer state (format_version {state.get('format_version')!r}, "
            f"missing {sorted(needed - set(state))})")
    try:
        tc = TrainConfig.from_dict(state["train_config"])
        unset = sorted(set(tc.to_dict()) - set(state["train_config"]))
        if unset:  # a default would silently change the run
            raise ConfigError(f"train_config lacks {unset}")
        check_int("step", state["step"], 0)
        check_number("elapsed", state["elapsed"], 0.0)
        scale = check_number("activation_scale", state["activation_scale"], 0.0, above=True)
        if math.frexp(scale)[0] != 0.5:
            raise ConfigError(f"activation_scale must be a power of two, got {scale!r}")
        if not isinstance(state["data_state"], dict):
            raise ConfigError(f"data_state must be an object, got {state['data_state']!r}")
        if not isinstance(state.get("data_spec"), (dict, type(None))):
            raise ConfigError(f"data_spec must be an object or null, got {state['data_spec']!r}")
        counter = state["tokens_since_fired"]
        if not isinstance(counter, list) or len(counter) != ckpt.cfg.total_latents:
            raise ConfigError(f"tokens_since_fired must list {ckpt.cfg.total_latents} counts (one per latent), "
                              f"got {len(counter) if isinstance(counter, list) else repr(counter)}")
        for c in counter:
            check_number("tokens_since_fired", c, 0.0)
        if tc.selection_bias_step(ckpt.cfg):
            _check_selection_bias(state.get("selection_bias"), ckpt.cfg.n_latents)
    except ConfigError as e:
        raise ckpt_io.CheckpointError(f"{where}: {e}") from e
    if state["step"] > tc.steps or ckpt.optimizer["step"] != state["step"]:
        raise ckpt_io.CheckpointError(f"{where}: step {state['step']} does not fit the run (steps {tc.steps}, "
                                      f"optimizer step {ckpt.optimizer['step']})")
    return ckpt, state, tc


def _check_selection_bias(state, n_latents: int) -> None:
    """A checkpoint's selection-bias state: {"bias": [...], "rate": [...]}, n_latents finite
    numbers >= 0 each; else ConfigError."""
    names = selection_bias.SelectionBias._fields
    if not isinstance(state, dict) or sorted(state) != sorted(names):
        raise ConfigError(f"selection_bias must be an object with {list(names)}, got {state!r:.80}")
    for name in names:
        values = state[name]
        if not isinstance(values, list) or len(values) != n_latents:
            raise ConfigError(f"selection_bias.{name} must list {n_latents} numbers (one per routed latent), "
                              f"got {len(values) if isinstance(values, list) else repr(values)}")
        for c in values:
            check_number(f"selection_bias.{name}", c, 0.0)
