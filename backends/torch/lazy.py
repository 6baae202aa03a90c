"""Lazy Adam on torch without a dense (M, d) gradient: the latent-row gradients are collected as
(touched latent ids, their rows) by the sparse backwards, and the update reads and writes only
those rows of W_enc, W_dec, b_enc and their moments (`core.optim`'s lazy Adam, in place).

During `TorchBackend.loss_and_row_grads` the latent-row parameters take no part in autograd: the
fused encoder's and the sparse decode's backwards hand their gradients, over the latents their
patterns touch, to a `RowGradients` collector instead of scattering them into (N*m, d) tables."""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch
import array_api_compat.torch as torch_xp
from switchsae.core.constraints import DECODERS, NORM_EPS, normalize_decoder, remove_parallel_grad
from switchsae.core.optim import CLIP_EPS, LATENT_ROW_PARAMS, AdamState, adam_moments, adam_step_corrected
from torch.optim.adam import adam
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from .encode import latent_major
from .optim import _in_layout_of, fused_update
from .sparse import compact, row_capacity


ROW_BLOCK = 4096  # rows updated at a time: p, m, v of W_enc and W_dec of a block are 36 MiB at d = 384
# dictionaries of at least this many W_dec entries (2^16 latents at d 256) update their rows in one
# compiled pass on CPU (`_rows_step`), which costs a one-time compilation (~10 s, then cached on
# disk by Inductor) and makes a lazy step ~27 % faster from 2^16 latents at d 384 on (measured:
# bench.scale_sweep's config, one thread; 6 % at 2^14)
ONE_PASS_MIN_ENTRIES = 1 << 24
ONE_PASS_ENV_VAR = "SWITCHSAE_ONE_PASS_ROWS"


class Rows(NamedTuple):
    """A latent-row parameter's gradient at some latents.  ids: (r,) int64 ascending latent ids;
    values: (r, d) (W_enc, W_dec) or (r,) (b_enc)."""

    ids: torch.Tensor
    values: torch.Tensor


class RowGradients:
    """Collects the gradients of the latent-row parameters `params` (name -> tensor, which take
    no part in autograd meanwhile) as parts (ids, rows), to be summed by `rows()`."""

    def __init__(self, params: dict):
        self.params = {n: params[n] for n in LATENT_ROW_PARAMS if n in params}
        self.n_latents = self.params["W_dec"].shape[0] * self.params["W_dec"].shape[1]
        self.parts = {n: [] for n in self.params}

    def owns_encoder(self, W_enc) -> bool:
        return W_enc is self.params.get("W_enc")

    def owns_decoder(self, table) -> bool:
        """Whether `table` (N*m, d) is W_dec's flat view."""
        W_dec = self.params["W_dec"]
        return table.data_ptr() == W_dec.data_ptr() and table.shape[0] == self.n_latents

    def add(self, name: str, ids, values) -> None:
        """ids: (r,) ascending latents, each with a non-zero weight in the part's pattern (the
        callers drop zero-weight entries); values: their gradient rows (r, d) or entries (r,), handed
        over (`rows` may add other parts into them in place)."""
        self.parts[name].append((ids, values))

    def rows(self) -> dict:
        """name -> Rows, all over the same ids: the union of the parts' latents, each of which
        had an entry of non-zero weight (so a non-zero gradient row but for exact cancellation,
        as `core.optim.received_gradient` counts them; no scan over the rows)."""
        pieces = [ids for parts in self.parts.values() for ids, _ in parts]
        device = self.params["W_dec"].device
        ids, _ = compact(torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64, device=device),
                         self.n_latents)
        slot = torch.empty(self.n_latents, dtype=torch.int64, device=device)
        slot[ids] = torch.arange(ids.shape[0], device=device)
        out = {}
        for name, p in self.params.items():
            parts = self.parts.pop(name)
            # a part already over every id, in order (ascending unique ids, as many as the union:
            # e.g. the main TopK's, which AuxK's latents lie among), is the sum the others add into
            # in place (each part's values are its own buffer)
            whole = next((i for i, (part_ids, _) in enumerate(parts) if part_ids.shape == ids.shape), None)
            if whole is not None:
                total = parts.pop(whole)[1].to(p.dtype)
            else:
                row_shape = p.shape[2:] if name == "W_dec" else p.shape[1:2] if name == "W_enc" else ()
                total = p.new_zeros((row_capacity(ids.shape[0]), *row_shape))[:ids.shape[0]]  # see scatter_rows
            while parts:  # each part freed once added
                part_ids, values = parts.pop()
                total.index_add_(0, slot[part_ids], values.to(total.dtype))
                del values
            del parts
            out[name] = Rows(ids, total)
        return out


def latent_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """The (M, ...) view of a latent-row tensor in its training layout (W_enc latent-major)."""
    if name == "W_enc":
        return t.transpose(1, 2).view(-1, t.shape[1])
    return t.view(t.shape[0] * t.shape[1], *t.shape[2:])


def lazy_update(params: dict, grads: dict, state: AdamState, lr, max_grad_norm=1.0,
                betas=(0.9, 0.999), eps: float = 1e-8) -> tuple[dict, AdamState]:
    """`core.train_step.apply_lazy_update` in place.  grads: the latent-row parameters' as `Rows`
    (or dense tensors, turned into Rows by a scan), the others dense.  W_enc (and its moments) are
    made latent-major as by `TorchBackend.update`.  -> (params, AdamState(step + 1, m, v))."""
    params = dict(params, W_enc=latent_major(params["W_enc"]))
    latent = [n for n in LATENT_ROW_PARAMS if n in params]
    if not isinstance(grads["W_dec"], Rows):  # dense gradients (a backend without row collection)
        grads = dict(grads, **_as_rows({n: grads[n] for n in latent}))
    ids = grads["W_dec"].ids
    m, v = ({n: _in_layout_of(t[n], params[n]) for n in params} for t in (state.m, state.v))
    dense = [n for n in params if n not in latent]
    row_grads = {n: grads[n].values for n in latent}

    one_pass = _one_pass(params["W_dec"])
    scale = None
    if max_grad_norm is not None:  # exact: the rows left out have zero gradient
        squares = [torch.linalg.vector_norm(g) ** 2 for g in [*row_grads.values(), *(grads[n] for n in dense)]]
        scale = torch.clamp(max_grad_norm / (torch.sqrt(sum(squares)) + CLIP_EPS), max=1.0)
        for g in [*(grads[n] for n in dense), *([] if one_pass else row_grads.values())]:  # one pass: in it
            g.mul_(scale.to(g.dtype))

    # the dense parameters (router, b_pre, the shared expert): the fused dense step, unclipped now
    dense_params, dense_state = fused_update({n: params[n] for n in dense}, {n: grads[n] for n in dense},
                                             AdamState(state.step, {n: m[n] for n in dense},
                                                       {n: v[n] for n in dense}), lr, None, betas, eps)
    m.update(dense_state.m)
    v.update(dense_state.v)

    views = {n: [latent_view(n, t[n]) for t in (params, m, v)] for n in latent}
    step = state.step + 1
    if one_pass:
        hyper = _hyper(step, float(lr), betas, eps, scale)
        for start in range(0, ids.shape[0], ROW_BLOCK):  # bounded temporaries
            block = slice(start, start + ROW_BLOCK)
            for n in latent:
                _compiled_rows()(*views[n], ids[block], row_grads[n][block], hyper, n in DECODERS)
        return dict(params, **dense_params), AdamState(step, m, v)
    device = ids.device
    fused = device.type in _get_fused_kernels_supported_devices()
    for start in range(0, ids.shape[0], ROW_BLOCK):  # bounded temporaries
        block = slice(start, start + ROW_BLOCK)
        block_ids = ids[block]
        rows = {n: [view.index_select(0, block_ids) for view in views[n]] for n in latent}  # p, m, v
        g, w = row_grads["W_dec"][block], rows["W_dec"][0]  # core.constraints.remove_parallel_grad:
        g.addcmul_(torch.linalg.vecdot(g, w)[:, None], w, value=-1.0)
        # Adam on the gathered rows: torch's (fused) kernel, as `fused_update` uses for dense tensors
        adam([rows[n][0] for n in latent], [g if n == "W_dec" else row_grads[n][block] for n in latent],
             [rows[n][1] for n in latent],
             [rows[n][2] for n in latent], [], [torch.tensor(float(state.step), device=device) for _ in latent],
             fused=fused, amsgrad=False, beta1=betas[0], beta2=betas[1], lr=float(lr), weight_decay=0.0,
             eps=eps, maximize=False)
        for n in latent:
            if n in DECODERS:  # renormalise the touched decoder rows
                rows[n][0].div_(torch.linalg.vector_norm(rows[n][0], dim=-1, keepdim=True).add_(NORM_EPS))
            for view, new in zip(views[n], rows[n]):
                view.index_copy_(0, block_ids, new)
    return dict(params, **dense_params), AdamState(state.step + 1, m, v)


def _as_rows(grads: dict) -> dict:
    """Dense latent-row gradients -> Rows at the latents with a non-zero entry in any of them."""
    flat = {n: latent_view(n, g) if n != "W_enc" else g.transpose(1, 2).reshape(-1, g.shape[1])
            for n, g in grads.items()}
    nonzero = None
    for t in flat.values():
        row = (t != 0) if t.ndim == 1 else (t != 0).any(1)
        nonzero = row if nonzero is None else nonzero | row
    ids = torch.nonzero(nonzero).squeeze(1)
    return {n: Rows(ids, t.index_select(0, ids)) for n, t in flat.items()}


def _one_pass(W_dec) -> bool:
    """Whether this dictionary's rows are updated in one compiled pass (`_rows_step`): CPU, at least
    ONE_PASS_MIN_ENTRIES entries, not turned off ($SWITCHSAE_ONE_PASS_ROWS=0: no torch.compile, whose
    Inductor writes its generated code to its cache, /tmp/torchinductor_$USER unless
    $TORCHINDUCTOR_CACHE_DIR says otherwise), and torch.compile works here (see `_compiled_rows`)."""
    return (W_dec.device.type == "cpu" and W_dec.numel() >= ONE_PASS_MIN_ENTRIES
            and os.environ.get(ONE_PASS_ENV_VAR, "1") != "0" and _compiled_rows() is not None)


def _rows_step(p, m, v, ids, g, hyper, decoder: bool) -> None:
    """`core.optim.adam_rows` on rows ids (r,) of p, m, v (M, ...) in place, from their gradient
    g (r, ...) times the clipping scale; hyper: (7,) float64 lr, the bias corrections c1 and c2,
    beta1, beta2, eps, scale (a tensor, so that a new step's values do not recompile).  A
    decoder's gradient first loses its component along the row, and the row is renormalised
    after (`core.constraints`)."""
    lr, c1, c2, b1, b2, eps, scale = hyper.unbind()
    g = g * scale
    w = p[ids]
    if decoder:
        g = remove_parallel_grad(g, w, torch_xp)
    m_new, v_new = adam_moments(g, m[ids], v[ids], torch_xp, (b1, b2))
    w = adam_step_corrected(w, m_new, v_new, c1, c2, lr, torch_xp, eps)
    if decoder:
        w = normalize_decoder(w, torch_xp)
    p.index_put_((ids,), w)
    m.index_put_((ids,), m_new)
    v.index_put_((ids,), v_new)


@functools.cache
def _compiled_rows():
    """`_rows_step` compiled by torch.compile (Inductor, C++ on CPU: the gathers, the math and the
    scatters fused into one pass over the rows, where eager torch makes three: gather p, m, v,
    update, scatter back), or None when it cannot compile here (e.g. no C++ compiler), with a
    warning; the caller then takes the blocked eager update."""
    compiled = torch.compile(_rows_step, dynamic=True)
    try:  # compile now, on tiny rows of both kinds, rather than mid-step
        hyper = _hyper(1, 0.1, (0.9, 0.999), 1e-8)
        for decoder in (False, True):
            compiled(torch.ones(4, 8), torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor([0, 2]), torch.ones(2, 8),
                     hyper, decoder)
        compiled(torch.ones(4), torch.zeros(4), torch.zeros(4), torch.tensor([1]), torch.ones(1), hyper, False)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: use the eager update
        warnings.warn(f"lazy Adam's one-pass row update could not be compiled ({type(e).__name__}: {e}); "
                      "using the blocked eager update", RuntimeWarning, stacklevel=3)
        return None
    return compiled


def _hyper(step: int, lr: float, betas, eps: float, scale=None) -> torch.Tensor:
    """`_rows_step`'s hyper (7,) float64 at global step `step` (counted from 1); scale: a 0-d
    tensor, None for 1."""
    b1, b2 = betas
    hyper = torch.tensor([lr, 1.0 - b1**step, 1.0 - b2**step, b1, b2, eps, 1.0], dtype=torch.float64)
    if scale is not None:
        hyper[6] = scale
    return hyper
