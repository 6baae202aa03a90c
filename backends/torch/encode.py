"""Expert encoders with a grouped-GEMM forward and a sparse backward.

Forward: tokens sorted by expert, one grouped GEMM: only each token's own expert runs.
Backward: after ReLU and TopK the gradient reaching the pre-activations is non-zero at most at
the k (+ AuxK) kept positions of each row, so both gradients are sparse products over those
entries (Gao et al. 2024): with c = expert * m + i the global latent of entry (t, i),
  dW_enc[e][:, i] = sum_t g[t, i] x[t]   (scatter_outer into the (N*m, d) transposed table)
  dx[t]           = sum_i g[t, i] W_enc[e][:, i]   (gather_sum from that table)
so nothing of size (T, N*m) or (T, N, m) is ever formed.  Both products read and write W_enc
as an (N*m, d) table of latent rows: with a `latent_major` W_enc that is a view, otherwise a
transposed copy each way.

`encode_topk` fuses encode, ReLU and TopK: it keeps the tokens in expert order from the GEMM to
the backward (each expert's weights stay in cache for its run of tokens), and when only the kept
values carry gradient (no AuxK) the backward starts from the (T, k) value gradient, with no
(T, m) gradient at all.  It takes x and b_pre apart: when x needs no gradient (training), b_pre's
is -sum_t dx[t] = -(per-latent sums of g) @ the latent table, one pass over W_enc instead of the
(T, d) gather_sum."""

from __future__ import annotations

import torch

from .dispatch import grouped_matmul, route, sort_rows, unsort_rows
from .sparse import (Pattern, RunColumns, Runs, accumulation_dtype, all_columns, compact_cols, counts, fixed_pattern,
                     gather_sum, nonzero_entries, row_pattern, run_columns, run_gather_sum, run_scatter_outer, run_sums,
                     runs_pay, scatter_outer, scatter_rows)
from .topk import topk_lowest_index_ties


class ExpertEncode(torch.autograd.Function):
    """(x_centered (T, d), W_enc (N, d, m), b_enc (N, m) or None, expert (T,)) -> pre (T, m)."""

    @staticmethod
    def forward(ctx, x_centered, W_enc, b_enc, expert):
        routing = route(expert, W_enc.shape[0])
        perm = routing.perm
        pre = unsort_rows(_sorted_pre(sort_rows(x_centered, perm), W_enc, b_enc, sort_rows(expert, perm),
                                      routing.ends), perm)
        ctx.save_for_backward(x_centered, W_enc, expert)
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        x_centered, W_enc, expert = ctx.saved_tensors
        pattern, values = _dense_entries(grad_pre, expert, W_enc.shape[-1], W_enc.shape[0])
        return (*_sparse_backward(pattern, values, None, x_centered, W_enc, *ctx.needs_input_grad[:3]), None)


class ExpertEncodeTopK(torch.autograd.Function):
    """(x (T, d), b_pre (d,), W_enc (N, d, m), b_enc (N, m) or None, expert (T,), k, keep_acts,
    dead (N, m) bool or None, aux_k, sink, select_bias (N, m) or None) -> acts (T, m) =
    relu((x - b_pre) @ W_enc[expert] (+ b_enc[expert])) (None without keep_acts), values (T, k),
    indices (T, k) = TopK of acts (spec tie rule; by `biased_topk` with a selection bias), and
    with a dead mask also AuxK's aux_values, aux_indices (T, j) (`dead_topk`)."""

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, expert, k, keep_acts, dead=None, aux_k=0, sink=None, select_bias=None):
        routing = route(expert, W_enc.shape[0])
        perm = routing.perm
        x_sorted, expert_sorted = sort_rows(x, perm) - b_pre, sort_rows(expert, perm)
        acts_sorted = _sorted_pre(x_sorted, W_enc, b_enc, expert_sorted, routing.ends).clamp_(min=0)
        if select_bias is None:
            values_sorted, indices_sorted = topk_lowest_index_ties(acts_sorted, k)
        else:  # `core.topk.biased_topk` with one (T, m) temporary: bias * (acts > 0) + acts, in place
            score = select_bias[expert_sorted]
            indices_sorted = topk_lowest_index_ties(score.masked_fill_(acts_sorted <= 0, 0).add_(acts_sorted), k)[1]
            del score
            values_sorted = acts_sorted.gather(1, indices_sorted)
        aux_values = aux_indices = aux_sorted = aux_ids_sorted = ctx.runs = None
        if dead is not None:
            aux_sorted, aux_ids_sorted, ctx.runs = dead_topk(acts_sorted, dead, expert_sorted, aux_k, routing.ends)
            aux_values, aux_indices = unsort_rows(aux_sorted, perm), unsort_rows(aux_ids_sorted, perm)
            ctx.mark_non_differentiable(aux_indices)
        acts = unsort_rows(acts_sorted, perm) if keep_acts else None
        indices = unsort_rows(indices_sorted, perm)
        ctx.sink, ctx.has_b = sink, b_enc is not None
        ctx.save_for_backward(x_sorted, W_enc, expert_sorted, perm, acts, values_sorted, indices_sorted, aux_sorted,
                              aux_ids_sorted)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        main = acts, unsort_rows(values_sorted, perm), indices
        return main if dead is None else (*main, aux_values, aux_indices)

    @staticmethod
    def backward(ctx, grad_acts, grad_values, _, *aux_grads):
        grad_aux = aux_grads[0] if aux_grads else None
        x_sorted, W_enc, expert_sorted, perm, acts, values, indices, aux_values, aux_ids = ctx.saved_tensors
        need_x, need_b_pre, need_W, need_b = ctx.needs_input_grad[:4]
        n, _, m = W_enc.shape
        # the value gradient of every kept entry through relu (zero where acts == 0): the k main
        # ones, then AuxK's (duplicates add up)
        kept_grad = _through_relu(grad_values, values, perm)
        aux_grad = None if aux_values is None else _through_relu(grad_aux, aux_values, perm)
        blocks = None
        if grad_acts is None:  # only the kept values carry gradient: k (+ j) entries per row
            if ctx.runs is not None:  # AuxK's dense runs: GEMMs (over every dead latent for a dense
                # gradient, where a zero column adds nothing; lazy Adam's rows: the ones with gradient)
                blocks = run_columns(ctx.runs, aux_grad) if ctx.sink is not None else all_columns(ctx.runs, aux_grad)
            elif aux_grad is not None:  # one k + j pattern
                kept_grad, indices = torch.cat([kept_grad, aux_grad], 1), torch.cat([indices, aux_ids], 1)
            pattern, values, _ = nonzero_entries(fixed_pattern(expert_sorted[:, None] * m + indices, n * m),
                                                 kept_grad.reshape(-1))  # AuxK's padding: no work
        else:  # acts is used too: add the kept values' share to its dense gradient
            grad_pre = sort_rows(grad_acts * (acts > 0), perm)
            grad_pre.scatter_add_(1, indices, kept_grad)
            if aux_grad is not None:
                grad_pre.scatter_add_(1, aux_ids, aux_grad)
            pattern, values = _dense_entries(grad_pre, expert_sorted, m, n)
        grad_x, grad_W, grad_b = _sparse_backward(pattern, values, blocks, x_sorted, W_enc, need_x, need_W, need_b)
        if ctx.sink is not None:  # lazy Adam: W_enc's (and b_enc's) gradient at the touched latents only
            _collect_rows(ctx.sink, pattern, values, blocks, x_sorted, ctx.has_b)
        grad_b_pre = None
        if need_b_pre:  # d/d b_pre = -sum_t d/d x_t: one product with per-latent sums, not T
            grad_b_pre = -grad_x.sum(0) if need_x else -_latent_sum_product(pattern, values, blocks, W_enc)
        return ((unsort_rows(grad_x, perm) if need_x else None), grad_b_pre, grad_W, grad_b,
                None, None, None, None, None, None, None)


def _through_relu(grad, kept_sorted, perm):
    """The gradient (T, j) of kept values (None: zero) in expert order, zero where the kept value
    is 0 (relu's zeros and AuxK's padding)."""
    if grad is None:
        return torch.zeros_like(kept_sorted)
    return sort_rows(grad, perm) * (kept_sorted > 0)


RUN_MIN_DENSITY = 0.25  # AuxK as dense per-expert blocks when at least this share of them is positive


def dead_topk(acts_sorted, dead, expert_sorted, aux_k: int, ends):
    """AuxK's selection: the top aux_k of each row's acts at its expert's dead latents.
    acts_sorted: (T, m) >= 0, rows in expert order; dead: (N, m) bool; expert_sorted: (T,);
    ends: (N,) the end of each expert's rows -> values, local ids (T, j) and their `Runs` or None.
    Each expert's dead ids ascending, padded to the most any expert has, are `width` columns.
    Two forms, both exact (entries of value 0 are inert: any index, no gradient):
      * when every row may keep all its dead latents (width <= aux_k), there are enough rows per
        expert (`sparse.runs_pay`) and at least `RUN_MIN_DENSITY` of the entries
        are positive: no selection at all, j = width, row t lists all its expert's dead ids
        (acts there, 0 at padding), so each expert's rows are one dense block (`Runs` over the
        global latents, in ascending order) whose products are GEMMs;
      * otherwise the positive dead acts, j = the most of any row (at least 1, at most aux_k):
        in a row with at most aux_k of them (in training, mostly a few) all of them with no
        selection, in ascending id order, then value 0 at local id 0; in a row with more, the
        top aux_k, descending (equal values: lower id first)."""
    n, m = dead.shape
    per_expert = dead.sum(1)
    width = max(int(per_expert.max()), 1)
    dead_ids = torch.argsort(~dead, dim=1, stable=True)[:, :width]  # dead local ids first, ascending
    n_rows = acts_sorted.shape[0]
    stops = ends.tolist()
    starts = [0, *stops[:-1]]
    runs = [(e, a, b) for e, (a, b) in enumerate(zip(starts, stops)) if b > a]
    # both forms read the candidates: each row's acts at its expert's dead ids (T, width), >= 0
    # (relu'd, so their zeros are inert as they are), 0 in the padding slots
    slot_ids = dead_ids[expert_sorted]
    cand = torch.gather(acts_sorted, 1, slot_ids)
    n_dead = per_expert.tolist()
    for e, a, b in runs:
        cand[a:b, n_dead[e]:] = 0
    positive = cand > 0
    if width <= aux_k and runs_pay(len(runs), n_rows) and int(positive.sum()) >= RUN_MIN_DENSITY * n_rows * width:
        return cand, slot_ids, Runs([a for _, a, _ in runs] + [n_rows],
                                    [dead_ids[e, :n_dead[e]] + e * m for e, _, _ in runs])
    # the positive dead acts, row-major: each row's in ascending id order
    rows, slots = torch.nonzero(positive).unbind(1)
    per_row = counts(rows, n_rows)
    most = int(per_row.max()) if n_rows else 0  # a process may hold no rows
    j = max(min(most, aux_k), 1)
    values, ids = acts_sorted.new_zeros((n_rows, j)), slot_ids.new_zeros((n_rows, j))
    crowded = torch.nonzero(per_row > aux_k).squeeze(1) if most > aux_k else None
    if crowded is not None:  # those rows select below; the others keep all their positive ones
        fits = per_row[rows] <= aux_k
        rows, slots = rows[fits], slots[fits]
        per_row = per_row.masked_fill(per_row > aux_k, 0)
    pos = torch.arange(rows.shape[0], device=rows.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
    values[rows, pos], ids[rows, pos] = cand[rows, slots], slot_ids[rows, slots]
    if crowded is not None:
        crowded_cand, crowded_ids = cand[crowded], slot_ids[crowded]
        # not positive dead: below every live entry, lower positions ranked higher (no ties)
        filler = -1.0 - torch.arange(width, device=cand.device, dtype=cand.dtype)
        top, slot = topk_lowest_index_ties(torch.where(crowded_cand > 0, crowded_cand, filler), j)
        values[crowded], ids[crowded] = top.clamp_(min=0), torch.gather(crowded_ids, 1, slot)
    return values, ids, None


def _sorted_pre(x_sorted, W_enc, b_enc, expert_sorted, ends):
    """x_sorted: (T, d), expert_sorted: (T,) rows in expert order; ends: (N,) -> (T, m)."""
    pre = grouped_matmul(x_sorted, W_enc, ends)
    if b_enc is not None:
        pre += b_enc[expert_sorted]
    return pre


def _dense_entries(grad_pre: torch.Tensor, expert: torch.Tensor, m: int, n_experts: int):
    """The non-zero entries of a (T, m) pre-activation gradient: (Pattern over the global latents
    expert * m + i, values (nnz,))."""
    rows, local = torch.nonzero(grad_pre).unbind(1)  # row-major: rows ascending
    values = grad_pre[rows, local]
    return row_pattern(rows, expert[rows] * m + local, grad_pre.shape[0], n_experts * m), values


def _sparse_backward(pattern: Pattern, values, blocks: RunColumns | None, x_rows, W_enc, need_x, need_W, need_b):
    """Gradients of x_rows (T, d), W_enc (N, d, m) and b_enc from the pre-activation gradient's
    entries `values` at `pattern` (rows of x_rows, global latents) and, when not None, the dense
    blocks `blocks` (`sparse.run_columns` over the global latents).  None where not needed."""
    n, d, m = W_enc.shape
    grad_x = grad_W = grad_b = None
    if need_x:
        grad_x = gather_sum(pattern, values, _latent_rows(W_enc))
        if blocks is not None:
            grad_x += run_gather_sum(blocks, grad_x.shape[0], _latent_rows(W_enc))
    if need_W:
        rows = scatter_outer(pattern, values, x_rows)
        if blocks is not None:
            rows.index_add_(0, blocks.ids, run_scatter_outer(blocks, x_rows))
        grad_W = rows.view(n, m, d).transpose(1, 2)
        if grad_W.stride() != W_enc.stride():  # give the gradient its parameter's layout
            grad_W = torch.empty_like(W_enc).copy_(grad_W)
    if need_b:
        grad_b = _latent_sums(pattern, values, blocks).view(n, m).to(values.dtype)
    return grad_x, grad_W, grad_b


def _collect_rows(sink, pattern: Pattern, values, blocks: RunColumns | None, x_rows, has_b: bool) -> None:
    """Hand W_enc's gradient rows (and b_enc's entries) at the latents of `pattern` (its entries
    have non-zero values) and of `blocks` to the lazy-Adam collector `sink` (`lazy.RowGradients`):
    (r, d) and (r,) over the union of their latents, no (N*m, d) table."""
    ids, local, at = compact_cols(pattern, *([] if blocks is None else [blocks.ids]))
    rows = scatter_rows(local, values, x_rows)
    sums = _latent_sums(local, values) if has_b else None
    if blocks is not None:  # AuxK's runs: added at their latents' rows
        rows.index_add_(0, at[0], run_scatter_outer(blocks, x_rows))
        if has_b:
            sums.index_add_(0, at[0], run_sums(blocks))
    sink.add("W_enc", ids, rows)
    if has_b:
        sink.add("b_enc", ids, sums)


def _latent_rows(W_enc):
    """W_enc (N, d, m) as its (N*m, d) table of latent rows: a view if latent-major."""
    n, d, m = W_enc.shape
    return W_enc.transpose(1, 2).reshape(n * m, d)


def _latent_sums(pattern: Pattern, values, blocks: RunColumns | None = None):
    """(N*m,) sum of the entries at each latent (and of `blocks`' columns), in the accumulation dtype."""
    acc = values.new_zeros(pattern.n_cols, dtype=accumulation_dtype(values.dtype))
    acc.index_add_(0, pattern.cols, values.to(acc.dtype))
    if blocks is not None:
        acc.index_add_(0, blocks.ids, run_sums(blocks))
    return acc


def _latent_sum_product(pattern: Pattern, values, blocks: RunColumns | None, W_enc):
    """sum over all entries of values[j] * W_enc[:, cols[j]] (and the blocks'): (d,) = sum_t of
    the rows of dx.  Reads only the latents with a non-zero sum when W_enc is latent-major (its
    training layout), else W_enc[e] @ sums[e] over every expert (any layout, no (N*m, d) copy)."""
    n, d, m = W_enc.shape
    sums = _latent_sums(pattern, values, blocks)
    if not W_enc.transpose(1, 2).is_contiguous():
        return torch.bmm(W_enc.to(sums.dtype), sums.view(n, m, 1)).sum(0).view(d).to(W_enc.dtype)
    ids = torch.nonzero(sums).squeeze(1)
    one_row = row_pattern(torch.zeros_like(ids), ids, 1, n * m)
    return gather_sum(one_row, sums[ids], _latent_rows(W_enc))[0]


def latent_major(W_enc: torch.Tensor) -> torch.Tensor:
    """W_enc (N, d, m) stored with each latent's d weights contiguous (strides (d*m, 1, d)), the
    layout whose sparse backward needs no transposes; W_enc itself when it already is.  A
    contiguous W_enc is rearranged IN PLACE, expert by expert (its storage is reused: the tensor
    passed in then holds the rearranged numbers), so the dictionary is never copied whole."""
    rows = W_enc.transpose(1, 2)
    if rows.is_contiguous():
        return W_enc
    if not W_enc.is_contiguous():
        return rows.contiguous().transpose(1, 2)
    n, d, m = W_enc.shape
    flat = W_enc.view(n, d * m)
    with torch.no_grad():
        for e in range(n):  # one (d, m) block at a time through a small buffer
            flat[e].copy_(W_enc[e].t().contiguous().view(-1))
    return W_enc.as_strided((n, d, m), (d * m, 1, d))


def encode(x_centered, W_enc, b_enc, expert):
    """Pre-activations of each token's own expert: (T, d), (N, d, m), (N, m) | None, (T,) -> (T, m)."""
    return ExpertEncode.apply(x_centered, W_enc, b_enc, expert)


def encode_topk(x, b_pre, W_enc, b_enc, expert, k: int, keep_acts: bool = True, select_bias=None):
    """relu(encode(x - b_pre, ...)) and its TopK: -> acts (T, m) (None without keep_acts),
    values (T, k), indices (T, k)."""
    return encode_topk_aux(x, b_pre, W_enc, b_enc, expert, k, None, 0, keep_acts, select_bias=select_bias)[:3]


def encode_topk_aux(x, b_pre, W_enc, b_enc, expert, k: int, dead, aux_k: int, keep_acts: bool = True,
                    sink=None, select_bias=None):
    """`encode_topk` and AuxK's top aux_k dead latents of the same acts (`dead_topk`), both
    with one sparse backward.  dead: (N, m) bool or None (no AuxK) -> acts, values, indices,
    aux_values, aux_indices (T, j) (None without AuxK).  sink: a `lazy.RowGradients` that takes
    W_enc's and b_enc's gradients (they then need none from autograd), or None.  select_bias:
    (N, m) >= 0 or None, the main TopK's selection bias (`core.selection_bias`)."""
    out = ExpertEncodeTopK.apply(x, b_pre, W_enc, b_enc, expert, k, keep_acts, dead, aux_k, sink, select_bias)
    return out if dead is not None else (*out, None, None)
