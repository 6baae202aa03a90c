"""PyTorch backend: the spec on torch tensors with fast hooks and autograd gradients.

Hooks: grouped-GEMM expert dispatch with a sparse backward (`encode`, and fused with ReLU and
TopK in `encode_topk`, and with AuxK's dead-latent TopK too in `encode_topk_aux`), sparse gather
decode with a sparse backward (`decode`; with AuxK's, one table gradient: `decode_with_aux`), `torch.topk` with
the spec's tie rule, and an in-place fused optimiser step (`update`).
Arrays live on `select_device()`: $SWITCHSAE_DEVICE, else CUDA when present, else CPU; on CPU,
freed memory is kept for reuse (`keep_freed_cpu_memory`)."""

from __future__ import annotations

import array_api_compat.torch as torch_xp
import numpy as np
import torch
from switchsae.core.backend import Backend
from switchsae.core.spec import ForwardOutput, forward

from .decode import decode as sparse_decode
from .decode import decode_with_aux as sparse_decode_with_aux
from .device import keep_freed_cpu_memory, select_device
from .encode import encode as expert_encode
from .encode import encode_topk_aux as expert_encode_topk_aux
from .encode import latent_major
from .lazy import RowGradients
from .lazy import lazy_update as fused_lazy_update
from .optim import fused_update
from .topk import topk_lowest_index_ties


class TorchBackend(Backend):
    name = "torch"
    xp = torch_xp
    extra = "torch"
    dtypes = ("float32", "bfloat16", "float16", "float64")

    def __init__(self, device: str | torch.device | None = None):
        self.device = select_device(str(device) if device is not None else None)
        self._row_grads = None  # the lazy-Adam collector while loss_and_row_grads runs
        if self.device.type == "cpu":
            keep_freed_cpu_memory()

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """NumPy array, tensor, scalar or nested list -> tensor on self.device."""
        target = self.dtype(dtype) if dtype is not None else None
        if not isinstance(a, torch.Tensor):
            a = np.asarray(a)
            if a.dtype.kind not in "biuf":
                raise TypeError(f"cannot make a torch tensor from a NumPy array of dtype {a.dtype}")
            a = torch.from_numpy(np.ascontiguousarray(a))
        return a.to(device=self.device, dtype=target)

    def to_numpy(self, a):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.numpy()

    def scatter_add(self, target, indices, values):
        return target.index_add(0, indices, values)

    def stop_gradient(self, a):
        return a.detach()

    # -- spec hooks ---------------------------------------------------------------------------
    def topk(self, acts, k):
        """torch.topk, with the spec's lowest-index rule for ties (see topk.py)."""
        return topk_lowest_index_ties(acts, k)

    def encode(self, x_centered, W_enc, b_enc, expert):
        return expert_encode(x_centered, W_enc, b_enc, expert)

    def encode_topk(self, x, b_pre, W_enc, b_enc, expert, k, keep_acts=True, select_bias=None):
        return self.encode_topk_aux(x, b_pre, W_enc, b_enc, expert, k, None, 0, keep_acts, select_bias)[:3]

    def encode_topk_aux(self, x, b_pre, W_enc, b_enc, expert, k, dead, aux_k, keep_acts=True, select_bias=None):
        rows = self._row_grads if self._row_grads is not None and self._row_grads.owns_encoder(W_enc) else None
        return expert_encode_topk_aux(x, b_pre, W_enc, b_enc, expert, k, dead, aux_k, keep_acts, rows, select_bias)

    def decode(self, values, indices, W_dec_flat):
        return sparse_decode(values, indices, W_dec_flat, self._decoder_sink(W_dec_flat))

    def decode_with_aux(self, values, indices, aux_values, aux_indices, expert, dead, W_dec_flat):
        return sparse_decode_with_aux(values, indices, aux_values, aux_indices, W_dec_flat,
                                      self._decoder_sink(W_dec_flat))

    def _decoder_sink(self, W_dec_flat):
        """The lazy-Adam collector when W_dec_flat is the one it collects for, else None."""
        rows = self._row_grads
        return rows if rows is not None and rows.owns_decoder(W_dec_flat) else None

    # -- training -----------------------------------------------------------------------------
    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        """Autograd through core.spec.forward with this backend's hooks."""
        return self.differentiate(params, lambda p: forward(p, x, cfg, self, dead_mask, select_bias))

    def loss_and_row_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        """`loss_and_grads`, but W_enc, W_dec and b_enc get their gradients as `lazy.Rows` (the
        latents that received gradient and their rows) straight from the sparse backwards: no
        (N, m, d) gradient.  With experts_per_token > 1 (whose encoder has no such backward)
        the gradients are dense."""
        if cfg.experts_per_token > 1:
            return self.loss_and_grads(params, x, cfg, dead_mask, select_bias)
        self._row_grads = RowGradients(params)
        try:
            out, grads = self.differentiate(params, lambda p: forward(p, x, cfg, self, dead_mask, select_bias),
                                            constant=tuple(self._row_grads.params))
            return out, dict(grads, **self._row_grads.rows())
        finally:
            self._row_grads = None

    def differentiate(self, params, run, loss_scale: float = 1.0, constant=()):
        """run(params) -> ForwardOutput.  -> (its ForwardOutput with detached tensors, gradients
        of loss_scale * losses["total"]); a parameter the loss does not reach (a process's
        experts that received no token) gets a zero gradient.  The params named in `constant`
        are held constant (no gradient returned)."""
        names = [n for n in params if n not in constant]
        leaves = dict(params, **{n: params[n].detach().requires_grad_(True) for n in names})
        with torch.enable_grad():
            out = run(leaves)
            total = out.losses["total"] if loss_scale == 1.0 else out.losses["total"] * loss_scale
            grads = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
        out = ForwardOutput(
            out.x_hat.detach(), out.expert, out.router_probs.detach(), out.top_values.detach(),
            out.top_indices, {name: v.detach() for name, v in out.losses.items()},
        )
        return out, {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}

    def update(self, params, grads, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """clip -> drop decoder-parallel gradient -> Adam -> renormalise decoder, fused and IN
        PLACE: params, grads and opt_state's moments are overwritten.  -> (params, opt_state).

        The returned W_enc (and its moments) are in the `training_layout`."""
        return fused_update(self.training_layout(params), grads, opt_state, lr, max_grad_norm, betas)

    def training_layout(self, arrays):
        """W_enc `latent_major`: same shape and values, strides that spare the encoder backward
        two transposed copies per step (its gradient and moments follow the parameter's layout)."""
        return dict(arrays, W_enc=latent_major(arrays["W_enc"])) if "W_enc" in arrays else arrays

    def lazy_update(self, params, grads, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """Lazy Adam in place (`lazy.lazy_update`): reads and writes only the touched latents'
        rows of W_enc, W_dec, b_enc and their moments.  -> (params, opt_state)."""
        return fused_lazy_update(params, grads, opt_state, lr, max_grad_norm, betas)

    def block_until_ready(self, tree):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return tree

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)

    def __repr__(self) -> str:
        return f"<switchsae backend 'torch' on {self.device}>"
