"""`Backend`: what every backend provides.  The spec calls these hooks; the defaults here are
the standard-ops definitions, which a backend overrides with its fast paths."""

from __future__ import annotations

import numpy as np

from .config import DTYPES
from .experts import decode_reference, encode_reference, relu
from .parallel import BatchStatistics, batch_rows
from .topk import biased_topk, topk_reference


class Backend:
    """Base adapter.  Subclasses set `name`, `xp` (an Array API namespace) and implement the
    array conversions, `scatter_add` and `loss_and_grads`; they may override any hook.

    The parallel contract (the "parallel" section below) has single-process defaults: one
    process holding the whole batch and every parameter.  A parallel backend (torch
    `distributed.parallel_backend`, JAX `distributed.parallel_backend` over its devices, MLX
    `distributed.DataParallelBackend`) overrides what differs; the trainer and the CLI use
    these members on every backend, without probing."""

    name = "abstract"
    xp = None
    extra = ""  # pip extra that installs this backend
    dtypes = DTYPES

    # -- parallel (single-process defaults) -----------------------------------------------
    parallel = ""  # "" (one process, one device), "data" or "expert"
    rank = 0  # this process, of world_size; rank 0 writes checkpoints and logs
    world_size = 1  # processes the batch is split over (a device mesh in one process: 1)

    def describe_parallel(self) -> str:
        """How the work is split, for messages ("" on one device)."""
        return f"{self.parallel} parallel, {self.world_size} processes" if self.parallel else ""

    def check_partition(self, cfg, batch_size: int) -> None:
        """Raise ConfigError unless `cfg` and global batches of `batch_size` rows can be split
        the way this backend splits them (one process: anything)."""

    def batch_rows(self, batch_size: int) -> slice:
        """The rows of a global batch (batch_size, d) this process trains on (and reads)."""
        return batch_rows(batch_size, self.world_size, self.rank)

    def place_batch(self, x, dtype: str | None = None):
        """This process's rows of a batch (NumPy, (batch / R, d)) -> the native array the train
        step takes (a device mesh places it split over its devices)."""
        return self.asarray(x, dtype)

    def all_sum(self, a):
        """`a` summed over the processes, detached (one process: `a`)."""
        return a

    def batch_statistics(self) -> BatchStatistics:
        """The whole batch's statistics for the loss of this process's slice (`core.spec.trace`)."""
        return BatchStatistics(self.all_sum, self.world_size)

    def dispatch(self, run, x, gates, experts, dead, n_experts: int, select_bias=None):
        """Run the chosen experts on the tokens: -> `run(x, gates, experts, dead, select_bias)`, a
        `core.spec.Experts` for these tokens in their order.  x: (batch, d); gates, experts:
        (batch, e) of N = n_experts; dead: (N, m) bool, the routed dead mask by expert, or None;
        select_bias: (N, m), the main TopK's selection bias by expert (`core.selection_bias`), or
        None.  Expert parallelism sends each token to the process that owns its expert, calls
        `run` there on the tokens it received (with that process's experts and rows of `dead` and
        `select_bias`) and sends the results back: only the exchange, the spec computes the rest."""
        return run(x, gates, experts, dead, select_bias)

    def local_backend(self) -> Backend:
        """The one-process backend computing as this one does here (this one when not parallel):
        what a gathered, whole model runs on, e.g. for evaluation on rank 0."""
        return self

    def shard_params(self, arrays: dict) -> dict:
        """Whole parameters (or Adam moments) -> what this process holds (default: all)."""
        return arrays

    def gather_params(self, arrays: dict) -> dict | None:
        """This process's parameters (or moments) -> the whole ones on rank 0, None on the others
        where they are sharded across processes.  A collective: every process calls it."""
        return arrays

    def gather_outputs(self, out, x):
        """This process's ForwardOutput and batch -> the whole batch's, for metrics (the losses
        are already the whole batch's)."""
        return out, x

    def barrier(self) -> None:
        """Wait for every process (one process: return)."""

    def shutdown(self, failed: bool = False) -> None:
        """Leave the process group at the end of training (a collective unless `failed`, when
        the other processes may be gone); one process: nothing."""

    # -- arrays ---------------------------------------------------------------------------
    def dtype(self, name: str):
        """The native dtype for a config dtype name."""
        if name not in self.dtypes:
            raise TypeError(
                f"backend {self.name!r} does not support dtype {name!r}; supported: {self.dtypes}"
            )
        return getattr(self.xp, name)

    def asarray(self, a, dtype: str | None = None):
        """NumPy or native array -> native array (optionally cast to a config dtype name)."""
        raise NotImplementedError

    def to_numpy(self, a) -> np.ndarray:
        """Native array -> NumPy array (bfloat16 comes back as float32)."""
        raise NotImplementedError

    # -- spec hooks (override with fast paths) --------------------------------------------
    def topk(self, acts, k: int):
        """acts: (batch, m) -> (values, indices): (batch, k) each, largest first."""
        return topk_reference(acts, k, self.xp)

    def encode(self, x_centered, W_enc, b_enc, expert):
        """x_centered: (batch, d), W_enc: (N, d, m), expert: (batch,) -> pre-activations (batch, m)."""
        return encode_reference(x_centered, W_enc, b_enc, expert, self.xp)

    def encode_topk(self, x, b_pre, W_enc, b_enc, expert, k: int, keep_acts: bool = True, select_bias=None):
        """`encode` of x - b_pre, relu and `topk` in one hook, so that a backend can fuse them
        (and give the encoder a backward that touches only the k kept latents).  x: (batch, d);
        b_pre: (d,); the rest as `encode`; select_bias: (N, m) >= 0 or None: the TopK is chosen
        by `topk.biased_topk` with each token's expert's row -> acts (batch, m) = relu(pre-
        activations), which a backend may return as None when not keep_acts; values, indices:
        (batch, k) = topk(acts) (values gathered from acts, gradient as without bias)."""
        xp = self.xp
        acts = relu(self.encode(x - b_pre, W_enc, b_enc, expert), xp)
        if select_bias is None:
            values, indices = self.topk(acts, k)
        else:
            values, indices = biased_topk(acts, xp.take(select_bias, expert, axis=0), k, self.topk, xp)
        return acts, values, indices

    def encode_topk_aux(self, x, b_pre, W_enc, b_enc, expert, k: int, dead, aux_k: int,
                        keep_acts: bool = True, select_bias=None):
        """`encode_topk` plus AuxK's selection from the same activations, so that a backend can
        choose both in one pass (and keep AuxK's backward as sparse as the main one).
        dead: (N, m) bool, the routed latents that count as dead -> acts, values, indices as
        `encode_topk` (select_bias biases the main TopK only); aux_values, aux_indices: (batch,
        j), j <= aux_k: the top aux_k of acts masked to the token's expert's dead latents (local
        ids), in any order (this reference: descending).  Entries that are not a row's positive
        masked acts have value 0: they decode to nothing and carry no gradient, so a backend may
        give them any index and drop the columns that are 0 in every row (1 <= j)."""
        xp = self.xp
        acts, values, indices = self.encode_topk(x, b_pre, W_enc, b_enc, expert, k, True, select_bias)
        dead_acts = xp.where(xp.take(dead, expert, axis=0), acts, xp.zeros_like(acts))
        aux_values, aux_indices = self.topk(dead_acts, aux_k)
        return (acts if keep_acts else None), values, indices, aux_values, aux_indices

    def decode(self, values, indices, W_dec_flat):
        """values (batch, k) >= 0, indices (batch, k); W_dec_flat: (N*m, d) -> (batch, d).  An entry
        of value 0 decodes to nothing, and a backend may give it gradient 0 and skip it (the spec's
        values are ReLU outputs, whose zeros pass no gradient on; AuxK pads its rows with them)."""
        return decode_reference(values, indices, W_dec_flat, self.xp)

    def decode_with_aux(self, values, indices, aux_values, aux_indices, expert, dead, W_dec_flat):
        """The main TopK's `decode` and AuxK's from one table, so that a backend can share work
        between them (one table gradient) or use that AuxK's entries lie in the token's expert's
        dead latents.  values, indices: (batch, k) and aux_values, aux_indices: (batch, j)
        (`encode_topk_aux`'s aux entries; one at a latent that is not dead has value 0), global
        ids; expert: (batch,); dead: (N, m) bool; W_dec_flat: (N*m, d) -> (recon, aux_recon), each
        (batch, d)."""
        return self.decode(values, indices, W_dec_flat), self.decode(aux_values, aux_indices, W_dec_flat)

    def scatter_add(self, target, indices, values):
        """Return target with values[j] added at row indices[j], duplicates accumulating.

        target: (n, ...); indices: (j,) int; values: (j, ...)."""
        raise NotImplementedError

    def stop_gradient(self, a):
        """a, excluded from differentiation (identity for non-autograd backends)."""
        return a

    # -- training -------------------------------------------------------------------------
    def loss_and_grads(self, params: dict, x, cfg, dead_mask=None, select_bias=None):
        """x: (batch, d); dead_mask: (total_latents,) bool or None; select_bias: (N, m) or None
        (`core.spec.trace`) -> (ForwardOutput, grads: dict name -> array like params)."""
        raise NotImplementedError

    def update(self, params: dict, grads: dict, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """The optimiser half of the train step (`core.train_step.apply_update`).  A backend may
        fuse it and update in place (arguments donated): callers use the returned values.
        -> (params, opt_state)."""
        from .train_step import apply_update

        return apply_update(self.xp, params, grads, opt_state, lr, max_grad_norm, betas)

    def training_layout(self, arrays: dict) -> dict:
        """Parameters (or Adam moments, keyed alike) in the memory layout `update` keeps them
        in, so that a run restored from a checkpoint computes every step exactly as the live
        run did; as they are by default."""
        return arrays

    def loss_and_row_grads(self, params: dict, x, cfg, dead_mask=None, select_bias=None):
        """`loss_and_grads` for lazy Adam: the gradients of the latent-row parameters
        (`core.optim.LATENT_ROW_PARAMS`) may come as dense arrays (this default) or in a form of
        the backend's own that only its `lazy_update` reads (e.g. the touched rows alone)."""
        return self.loss_and_grads(params, x, cfg, dead_mask, select_bias)

    def lazy_update(self, params: dict, grads: dict, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """`update` with lazy Adam (`core.train_step.apply_lazy_update`) on the gradients of
        `loss_and_row_grads`; may update in place like `update`.  -> (params, opt_state)."""
        from .train_step import apply_lazy_update

        return apply_lazy_update(self.xp, params, grads, opt_state, lr, max_grad_norm, betas)

    def compile_step(self, step_fn):
        """Wrap a pure train-step function for speed (jit); identity by default."""
        return step_fn

    def compile_forward(self, forward_fn):
        """Wrap a pure forward function (params, x, dead_mask=None, select_bias=None) for speed;
        identity by default."""
        return forward_fn

    def block_until_ready(self, tree):
        """Wait for the asynchronous work that produces `tree` (timing); no-op by default."""
        return tree

    def device_name(self) -> str:
        """Where this backend computes, for benchmark records."""
        return "cpu"

    def __repr__(self) -> str:
        return f"<switchsae backend {self.name!r}>"
