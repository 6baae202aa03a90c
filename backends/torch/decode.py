"""Sparse decode: x_hat[t] = sum_j values[t, j] W_dec_flat[indices[t, j]], W_dec as one (N*m, d)
table, with a sparse backward: the table gradient touches only the selected rows and the values
gradient is one dot product per selected row.  No dense (T, N*m) or (T, m) activation exists.

Rows are processed in the order of their first latent, which groups a Switch SAE's tokens by
expert: consecutive rows then read (and write) the same expert's block of the table, which stays
in cache.  On CPU that halves the cost of the gathers and scatters against token order.

Rows that then form `sparse.Runs` (blocks of consecutive rows with one index list, at least
`RUN_MIN_ROWS` rows each on average: AuxK's rows when each lists all its expert's dead latents)
decode as one GEMM per block, as does their backward."""

from __future__ import annotations

import torch

from .dispatch import sort_rows, unsort_rows
from .sparse import (compact_cols, compact_union, concat_patterns, fixed_pattern, gather_sum, nonzero_entries,
                     row_capacity, run_columns, run_gather_sum, run_sampled_dot, run_scatter_outer, runs_of,
                     sampled_dot, scatter_outer, scatter_rows)


class SparseDecode(torch.autograd.Function):
    """(table (M, d), sink, values_1, indices_1, ..., values_n, indices_n) -> the n decodes
    (T_i, d) of one table (the main TopK's and AuxK's), with ONE table gradient: the parts'
    products go into a single (M, d) table (or a single set of rows for the sink).  values_i
    (T_i, k_i) >= 0, indices_i (T_i, k_i) int.  Entries of value 0 are left out
    (`core.Backend.decode`: they decode to nothing and get gradient 0), so AuxK's padding costs
    no gathers.  sink: a `lazy.RowGradients` that takes the table's gradient at the rows used, or
    None."""

    @staticmethod
    def forward(ctx, table, sink, *parts):
        ctx.parts = [_Part(values, indices, table.shape[0]) for values, indices in zip(parts[::2], parts[1::2])]
        ctx.sink = sink
        ctx.save_for_backward(table)
        ctx.set_materialize_grads(False)
        return tuple(part.decode(table) for part in ctx.parts)

    @staticmethod
    def backward(ctx, *grad_outs):
        (table,) = ctx.saved_tensors
        grads = [None if g is None else sort_rows(g, part.order).contiguous() for part, g in zip(ctx.parts, grad_outs)]
        grad_values = [part.value_grad(g, table) if ctx.needs_input_grad[2 + 2 * i] and g is not None else None
                       for i, (part, g) in enumerate(zip(ctx.parts, grads))]
        grad_table = None
        if ctx.needs_input_grad[0] or ctx.sink is not None:
            with_grad = [(part, g) for part, g in zip(ctx.parts, grads) if g is not None]
            gathers = [(part, g) for part, g in with_grad if part.used is None]
            runs = [(part, g) for part, g in with_grad if part.used is not None]
            if gathers:  # every gathered entry in one pattern over the parts' stacked rows
                pattern = concat_patterns([part.pattern for part, _ in gathers])
                weights = torch.cat([part.weights for part, _ in gathers])
                src = torch.cat([g for _, g in gathers]) if len(gathers) > 1 else gathers[0][1]
            if ctx.needs_input_grad[0]:
                grad_table = scatter_outer(pattern, weights, src) if gathers else table.new_zeros(table.shape)
                for part, g in runs:
                    grad_table.index_add_(0, part.used.ids, run_scatter_outer(part.used, g))
            if ctx.sink is not None:  # lazy Adam: (rows used, d), no (M, d) table: one set of rows over the
                # union of the gathered entries' latents and the runs'
                run_ids = [part.used.ids for part, _ in runs]
                if gathers:
                    ids, local, at = compact_cols(pattern, *run_ids)
                    rows = scatter_rows(local, weights, src)
                else:
                    ids, at = compact_union(table.shape[0], *run_ids)  # a bucketed buffer, as scatter_rows'
                    rows = table.new_zeros((row_capacity(ids.shape[0]), table.shape[1]))[:ids.shape[0]]
                for (part, g), positions in zip(runs, at):
                    rows.index_add_(0, positions, run_scatter_outer(part.used, g))
                ctx.sink.add("W_dec", ids, rows)
        return (grad_table, None, *(x for gv in grad_values for x in (gv, None)))


class _Part:
    """One (values, indices) set of `SparseDecode`, rows sorted by their first index: decoded as
    `Runs` (GEMMs) when its rows form them, else by gathers over its non-zero entries."""

    def __init__(self, values, indices, n_cols: int):
        self.order = torch.argsort(indices[:, 0]) if indices.shape[1] else None
        values, indices = sort_rows(values, self.order), sort_rows(indices, self.order)
        self.shape = values.shape
        runs = runs_of(indices)
        self.used = None if runs is None else run_columns(runs, values)  # zero weights: no work
        if self.used is None:
            self.pattern, self.weights, self.keep = nonzero_entries(fixed_pattern(indices, n_cols),
                                                                    values.reshape(-1))

    def decode(self, table):
        if self.used is not None:
            out = run_gather_sum(self.used, self.shape[0], table)
        else:
            out = gather_sum(self.pattern, self.weights, table)
        return unsort_rows(out, self.order)

    def value_grad(self, grad_sorted, table):
        """The values' gradient (T, k) in the caller's row order from grad_out in sorted order."""
        if self.used is not None:
            return unsort_rows(run_sampled_dot(self.used, grad_sorted, table), self.order)
        dots = sampled_dot(self.pattern, grad_sorted, table)
        if self.keep is not None:
            dots = dots.new_zeros(self.shape.numel()).index_copy_(0, self.keep, dots)
        return unsort_rows(dots.view(self.shape), self.order)


def decode(values, indices, table, sink=None):
    """values, indices: (T, k); table: (N*m, d) -> (T, d).  sink: see `SparseDecode`."""
    return SparseDecode.apply(table, sink, values, indices)[0]


def decode_with_aux(values, indices, aux_values, aux_indices, table, sink=None):
    """`decode` of the main TopK's (T, k) and AuxK's (T, j) entries from one table, with one
    table gradient -> (recon, aux_recon), (T, d) each."""
    return SparseDecode.apply(table, sink, values, indices, aux_values, aux_indices)
