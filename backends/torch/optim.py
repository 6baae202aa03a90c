"""The optimiser half of `core.train_step`, fused and in place.

On CPU the update is memory-bound: core's functional version allocates a fresh (N, m, d) array
for every elementwise op (~25 of them), which costs more than the N = 16 forward and backward.
This does the same math in five passes over the big tensors, updating params, grads and the
Adam moments in place (the arguments are donated, as with JAX's donate_argnums):

  clip by global norm -> drop the decoder-parallel gradient -> Adam -> renormalise decoder rows.

Must equal core.optim.clip_by_global_norm, core.constraints.remove_parallel_grad,
core.optim.adam_update and core.constraints.normalize_decoder in that order
(tests/test_torch_backend.py checks it)."""

from __future__ import annotations

import torch
from switchsae.core.constraints import DECODERS, NORM_EPS
from switchsae.core.optim import CLIP_EPS, AdamState
from torch.optim.adam import adam
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from .encode import latent_major


def fused_update(params: dict, grads: dict, state: AdamState, lr, max_grad_norm=1.0,
                 betas=(0.9, 0.999), eps: float = 1e-8) -> tuple[dict, AdamState]:
    """One optimiser step on torch tensors, in place.  params/grads/state.m/state.v: dicts of
    same-shaped tensors; the decoders (core.constraints.DECODERS) have unit-norm rows (..., d).
    A gradient or moment whose memory layout differs from its parameter's is copied into that
    layout first (the returned state holds the copy).  -> (params, AdamState(step + 1, m, v))."""
    names = list(params)
    # the fused kernel streams each param with its gradient and moments: one layout for all four
    grads, m, v = ({n: _in_layout_of(t[n], params[n]) for n in names} for t in (grads, state.m, state.v))
    decoders = [n for n in DECODERS if n in params]

    # project each decoder's raw gradient (scaling commutes with it) block by block, taking the
    # blocks' norms for clipping on the way, while they are in cache
    norms = []
    for n in decoders:
        for g, w in zip(_row_blocks(grads[n]), _row_blocks(params[n])):
            if max_grad_norm is not None:
                norms.append(torch.linalg.vector_norm(g))
            g.addcmul_((g * w).sum(-1, keepdim=True), w, value=-1.0)

    device = params[names[0]].device
    fused = device.type in _get_fused_kernels_supported_devices()
    grad_scale = None
    if max_grad_norm is not None:
        norms += torch._foreach_norm([grads[n] for n in names if n not in decoders])
        norm = torch.linalg.vector_norm(torch.stack(norms))
        scale = torch.clamp(max_grad_norm / (norm + CLIP_EPS), max=1.0)
        if fused and grads[names[0]].dtype != torch.float64:
            # the fused kernel divides the gradients by a float32 grad_scale as it reads them,
            # which saves a pass (to within an ulp of core's multiply by scale)
            grad_scale = (1.0 / scale).float()
        else:
            torch._foreach_mul_([grads[n] for n in names], scale)

    steps = [torch.tensor(float(state.step), device=device) for _ in names]
    views = [[_memory_order(t[n]) for n in names] for t in (params, grads, m, v)]
    adam(*views, [], steps, fused=fused, grad_scale=grad_scale,
         amsgrad=False, beta1=betas[0], beta2=betas[1], lr=float(lr), weight_decay=0.0, eps=eps,
         maximize=False)

    for n in decoders:
        for rows in _row_blocks(params[n]):
            rows.div_(torch.linalg.vector_norm(rows, dim=-1, keepdim=True).add_(NORM_EPS))
    return dict(params), AdamState(state.step + 1, m, v)


def _in_layout_of(t, like):
    """t itself when it has like's strides, else t rearranged to them: in place for a contiguous
    tensor and a latent-major `like` (a W_enc moment, see `latent_major`), else a copy."""
    if t.stride() == like.stride():
        return t
    if t.ndim == 3 and t.is_contiguous() and like.stride() == (t.shape[1] * t.shape[2], 1, t.shape[1]):
        return latent_major(t)
    return torch.empty_like(like).copy_(t)


def _memory_order(t):
    """t with its dimensions permuted into memory order: contiguous for any dense layout (e.g. a
    latent-major W_enc), so the fused kernel streams it; params, grads and moments share it."""
    return t.permute(sorted(range(t.ndim), key=lambda i: -t.stride(i)))


def _row_blocks(t, block_bytes: int = 1 << 21):
    """Views of t (..., d), contiguous, as consecutive (rows, d) blocks of ~2 MiB on CPU, so a
    pass of several ops over a block finds it in cache; one block on GPUs."""
    rows = t.view(-1, t.shape[-1])
    size = rows.shape[0] if t.is_cuda else max(1, block_bytes // (rows.shape[1] * rows.element_size()))
    return rows.split(size)
