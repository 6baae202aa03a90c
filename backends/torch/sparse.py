"""Sparse products over a pattern of (row, col) entries: the kernels behind the sparse decode and
the sparse encoder backward.  Neither ever forms the dense (rows, cols) matrix.

A `Pattern` lists nnz entries (rows[j], cols[j]) in ascending row order; row r owns entries
row_ptr[r]:row_ptr[r+1].  With weights w (nnz,), a table (n_cols, d) and src (n_rows, d):

  gather_sum(p, w, table)  -> (n_rows, d):  out[r] = sum_{j in r} w[j] table[cols[j]]
  sampled_dot(p, src, table) -> (nnz,):     out[j] = <src[rows[j]], table[cols[j]]>
  scatter_outer(p, w, src) -> (n_cols, d):  out[c] = sum_{j: cols[j]=c} w[j] src[rows[j]]

scatter_outer is gather_sum over the transposed pattern (entries sorted by column): no atomics,
so it is deterministic, and it runs embedding_bag's fast kernel on CPU.

`Runs` are the dense blocks of a (rows, j) index matrix: consecutive rows that share one list
of j columns (AuxK's rows when they list every dead latent of their expert).  Their products are
GEMMs over the block, several times faster per multiply-add than one gather per entry:

  run_columns(r, w) -> `used`: each run's columns with a non-zero weight and their weights
  run_gather_sum(used, n_rows, table) -> (n_rows, d): out[rows of run] = w[rows] @ table[cols]
  run_sampled_dot(used, src, table) -> (n_rows, j):   out[rows of run] = src[rows] @ table[cols].T
  run_scatter_outer(used, src) -> (n_ids, d):         per run, its weights.T @ src[rows]

CUDA tensors of 16/32-bit floats use the Triton kernels when triton imports; everything else uses
embedding_bag and torch's CSR SDDMM, computing in float32 for 16-bit inputs."""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Pattern(NamedTuple):
    """rows, cols: (nnz,) int64, rows ascending; row_ptr: (n_rows + 1,) int64; n_cols: int."""

    rows: torch.Tensor
    cols: torch.Tensor
    row_ptr: torch.Tensor
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.row_ptr.shape[0] - 1


def fixed_pattern(indices: torch.Tensor, n_cols: int) -> Pattern:
    """indices: (n_rows, k) -> the pattern with row r holding cols indices[r, :] (in that order)."""
    n_rows, k = indices.shape
    device = indices.device
    rows = torch.arange(n_rows, device=device).repeat_interleave(k)
    row_ptr = torch.arange(0, n_rows * k + 1, k, device=device)
    return Pattern(rows, indices.reshape(-1).to(torch.int64), row_ptr, n_cols)


def row_pattern(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> Pattern:
    """Entries given as ascending rows (nnz,) and their cols (nnz,)."""
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts(rows, n_rows), 0, out=row_ptr[1:])
    return Pattern(rows, cols, row_ptr, n_cols)


def concat_patterns(patterns: list) -> Pattern:
    """Patterns over one set of columns, their rows stacked in order (the second's row 0 is the
    first's n_rows): one pattern (itself when there is one)."""
    if len(patterns) == 1:
        return patterns[0]
    rows, row_ptrs, n_rows, nnz = [], [patterns[0].row_ptr[:1]], 0, 0
    for p in patterns:
        rows.append(p.rows + n_rows)
        row_ptrs.append(p.row_ptr[1:] + nnz)
        n_rows, nnz = n_rows + p.n_rows, nnz + p.cols.shape[0]
    return Pattern(torch.cat(rows), torch.cat([p.cols for p in patterns]), torch.cat(row_ptrs), patterns[0].n_cols)


def compact(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: (nnz,) int in 0..n-1 -> (unique ids (r,) ascending, position of each id in them (nnz,)),
    through an (n,) table rather than a sort."""
    seen = torch.zeros(n, dtype=torch.bool, device=ids.device)
    seen[ids] = True
    unique = torch.nonzero(seen).squeeze(1)
    position = torch.cumsum(seen, 0).sub_(1)
    return unique, position[ids]


def nonzero_entries(p: Pattern, weights: torch.Tensor):
    """The pattern's entries with a non-zero weight (nnz,): -> (that pattern, their weights, their
    positions among p's entries, or None when every weight is non-zero and p is returned)."""
    keep = torch.nonzero(weights).squeeze(1)
    if keep.shape[0] == weights.shape[0]:
        return p, weights, None
    return row_pattern(p.rows.index_select(0, keep), p.cols.index_select(0, keep), p.n_rows, p.n_cols), \
        weights.index_select(0, keep), keep


def compact_cols(p: Pattern, *more: torch.Tensor) -> tuple[torch.Tensor, Pattern, list]:
    """The pattern over the columns it uses and those in `more` (id arrays over the same columns,
    e.g. AuxK's blocks): -> (those columns (r,) ascending, the pattern with cols renumbered
    0..r-1 in that order, each of `more` renumbered likewise), so that their rows can be summed
    into one (r, d) result in place."""
    unique, (local, *renumbered) = compact_union(p.n_cols, p.cols, *more)
    return unique, Pattern(p.rows, local, p.row_ptr, unique.shape[0]), renumbered


def compact_union(n: int, *ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """`compact` of several id arrays (each (nnz_i,) in 0..n-1) together: -> (their unique ids
    ascending, each array's positions in them)."""
    unique, position = compact(torch.cat(ids) if len(ids) != 1 else ids[0], n)
    return unique, list(position.split([i.shape[0] for i in ids]))


def scatter_rows(p: Pattern, weights: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`scatter_outer` for a pattern over its used columns (`compact_cols`): (n_cols, d), a view
    of a buffer of `row_capacity(n_cols)` rows, so that the touched-row gradients of successive
    steps, whose count varies a little, come in a few sizes that a heap keeping freed memory
    (`host_memory`) reuses instead of growing."""
    return scatter_outer(p._replace(n_cols=row_capacity(p.n_cols)), weights, src)[:p.n_cols]


def row_capacity(r: int) -> int:
    """r rounded up to a multiple of 1/32 of the power of two below it (at most ~3 % more)."""
    step = max(1, 1 << max(r.bit_length() - 6, 0))
    return -(-r // step) * step


def counts(index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64: how often each of 0..n-1 occurs in index (bincount with a static shape, so
    torch.compile needs no graph break)."""
    out = torch.zeros(n, dtype=torch.int64, device=index.device)
    return out.index_add_(0, index, torch.ones_like(index, dtype=torch.int64))


class Runs(NamedTuple):
    """Blocks of consecutive rows sharing one column list: run r holds rows
    bounds[r]:bounds[r + 1] (host ints, ascending) and columns cols[r] (j_r <= j,) int64 in its
    first j_r slots (of an index matrix (n_rows, j); the slots past j_r hold zero weights)."""

    bounds: list
    cols: list


# fewer rows per run on average: one gather per entry does as well as the GEMMs (measured on one
# CPU core, AuxK's runs at d 384, m 1024, batch 4096: GEMMs 10 % faster at 128 and 256 rows per
# run, even at 64, 15 % slower at 32)
RUN_MIN_ROWS = 96


def runs_pay(n_runs: int, n_rows: int) -> bool:
    """Whether n_rows rows in n_runs runs are worth GEMMs: at least RUN_MIN_ROWS rows per run on
    average."""
    return 0 < n_runs and n_runs * RUN_MIN_ROWS <= n_rows


def runs_of(indices: torch.Tensor) -> Runs | None:
    """indices: (n_rows, j) -> its Runs (maximal blocks of equal consecutive rows) when they pay
    (`runs_pay`), else None."""
    n_rows, j = indices.shape
    if j == 0 or not runs_pay(1, n_rows):
        return None
    starts = torch.ones(n_rows, dtype=torch.bool, device=indices.device)
    starts[1:] = (indices[1:] != indices[:-1]).any(1)
    first = torch.nonzero(starts).squeeze(1)
    if not runs_pay(first.shape[0], n_rows):
        return None
    bounds = [*first.tolist(), n_rows]
    return Runs(bounds, [indices[b].to(torch.int64) for b in bounds[:-1]])


class RunBlock(NamedTuple):
    """One run's columns with a non-zero weight: rows start:end, ids (u,) their columns, slots
    their positions among the run's j slots (a slice when a prefix), weights (end - start, u)."""

    start: int
    end: int
    ids: torch.Tensor
    slots: object
    weights: torch.Tensor


class RunColumns(NamedTuple):
    """`run_columns`: ids (n_ids,) int64, every block's ids in order; blocks: list of RunBlock;
    width: j."""

    ids: torch.Tensor
    blocks: list
    width: int


def run_columns(r: Runs, weights: torch.Tensor) -> RunColumns:
    """weights: (n_rows, j) -> RunColumns: each run's columns with a non-zero weight in some row
    (the others decode to nothing and get no gradient).  Used columns that are a prefix of the
    slots (AuxK's padding is at the end) are views, not copies."""
    blocks = []
    for start, end, cols in zip(r.bounds, r.bounds[1:], r.cols):
        block = weights[start:end]
        used = torch.nonzero(block.ne(0).any(0)).squeeze(1)
        n_used = used.shape[0]
        if n_used == 0 or int(used[-1]) == n_used - 1:
            blocks.append(RunBlock(start, end, cols[:n_used], slice(0, n_used), block[:, :n_used]))
        else:
            blocks.append(RunBlock(start, end, cols.index_select(0, used), used, block.index_select(1, used)))
    return _run_columns_of(blocks, weights)


def all_columns(r: Runs, weights: torch.Tensor) -> RunColumns:
    """`run_columns` without the scan: every column of each run, as used (zero weights add nothing
    to a product; for results where a zero-weight column may appear, e.g. a dense gradient)."""
    blocks = [RunBlock(start, end, cols, slice(0, cols.shape[0]), weights[start:end, :cols.shape[0]])
              for start, end, cols in zip(r.bounds, r.bounds[1:], r.cols)]
    return _run_columns_of(blocks, weights)


def _run_columns_of(blocks: list, weights: torch.Tensor) -> RunColumns:
    """RunColumns of these blocks of `weights` (n_rows, j): their ids in order."""
    ids = torch.cat([b.ids for b in blocks]) if blocks else weights.new_zeros(0, dtype=torch.int64)
    return RunColumns(ids, blocks, weights.shape[1])


def run_gather_sum(used: RunColumns, n_rows: int, table: torch.Tensor) -> torch.Tensor:
    """table (n_cols, d) -> (n_rows, d) in table's dtype: each run's rows = its used weights @
    table[used columns] (rows outside every run: 0)."""
    dt = accumulation_dtype(table.dtype)
    out = (table.new_empty if _covers(used.blocks, n_rows) else table.new_zeros)((n_rows, table.shape[1]), dtype=dt)
    for b in used.blocks:
        torch.mm(b.weights.to(dt), table.index_select(0, b.ids).to(dt), out=out[b.start:b.end])
    return out.to(table.dtype)


def run_sampled_dot(used: RunColumns, src: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """src: (n_rows, d); table (n_cols, d) -> (n_rows, j) in src's dtype: each row's dot product
    with each used column of its run, in that column's slot; 0 in the other slots."""
    dt = accumulation_dtype(src.dtype)
    out = src.new_zeros((used.width, src.shape[0]), dtype=dt)  # transposed: (columns, d) @ (d, rows) is
    for b in used.blocks:  # ~10 % faster on one CPU core than rows @ columns.T at AuxK's shapes
        dots = (table.index_select(0, b.ids).to(dt), src[b.start:b.end].to(dt).t())
        if isinstance(b.slots, slice):
            torch.mm(*dots, out=out[b.slots, b.start:b.end])
        else:
            out[b.slots, b.start:b.end] = torch.mm(*dots)
    return out.t().contiguous().to(src.dtype)


def _covers(blocks: list, n_rows: int) -> bool:
    """Whether the blocks' rows are 0..n_rows-1, each once (in order)."""
    end = 0
    for b in blocks:
        if b.start != end:
            return False
        end = b.end
    return end == n_rows


def run_scatter_outer(used: RunColumns, src: torch.Tensor) -> torch.Tensor:
    """src: (n_rows, d) -> (n_ids, d) in src's dtype: row i = sum over its run's rows of
    weight * src[row], for the column used.ids[i]."""
    if not used.blocks:
        return src.new_zeros((0, src.shape[1]))
    dt = accumulation_dtype(src.dtype)
    return torch.cat([b.weights.to(dt).t() @ src[b.start:b.end].to(dt) for b in used.blocks]).to(src.dtype)


def run_sums(used: RunColumns) -> torch.Tensor:
    """(n_ids,) the sum of each used column's weights over its run, in the accumulation dtype."""
    if not used.blocks:
        return used.ids.new_zeros(0, dtype=torch.float32)
    return torch.cat([b.weights.to(accumulation_dtype(b.weights.dtype)).sum(0) for b in used.blocks])


# -- dispatch -----------------------------------------------------------------------------

@functools.cache
def _triton_kernels():
    """The Triton module, or None when triton is not importable."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # they accumulate in float32


def _impl(t: torch.Tensor):
    if t.is_cuda and t.dtype in _TRITON_DTYPES and _triton_kernels() is not None:
        return _triton_kernels()
    return _TorchImpl


def gather_sum(p: Pattern, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """-> (n_rows, d) in table's dtype: out[r] = sum_{j in row r} weights[j] * table[cols[j]]."""
    return torch.ops.switchsae.gather_sum(*p, weights, table)


def sampled_dot(p: Pattern, src: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """-> (nnz,) in src's dtype: out[j] = <src[rows[j]], table[cols[j]]>."""
    return torch.ops.switchsae.sampled_dot(*p, src, table)


# custom ops: opaque to torch.compile (no graph break, no tracing into sparse tensors or Triton)
@torch.library.custom_op("switchsae::gather_sum", mutates_args=())
def _gather_sum_op(rows: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, n_cols: int,
                   weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _impl(table).gather_sum(Pattern(rows, cols, row_ptr, n_cols), weights, table)


@_gather_sum_op.register_fake
def _(rows, cols, row_ptr, n_cols, weights, table):
    return table.new_empty((row_ptr.shape[0] - 1, table.shape[1]))


@torch.library.custom_op("switchsae::sampled_dot", mutates_args=())
def _sampled_dot_op(rows: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, n_cols: int,
                    src: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _impl(table).sampled_dot(Pattern(rows, cols, row_ptr, n_cols), src, table)


@_sampled_dot_op.register_fake
def _(rows, cols, row_ptr, n_cols, src, table):
    return src.new_empty(cols.shape)


def scatter_outer(p: Pattern, weights: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """-> (n_cols, d) in src's dtype: out[c] = sum_{j: cols[j] = c} weights[j] * src[rows[j]]."""
    order = torch.argsort(p.cols, stable=True)
    by_col = row_pattern(p.cols.index_select(0, order), p.rows.index_select(0, order), p.n_cols, p.n_rows)
    return gather_sum(by_col, weights.index_select(0, order), src)


# -- torch implementation -------------------------------------------------------------------

def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float32 for 16-bit floats (embedding_bag and the CSR
    kernels accumulate in their input dtype, so 16-bit inputs are widened first)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _csr(row_ptr, cols, values, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(row_ptr, cols, values, size=size, check_invariants=False)


class _TorchImpl:
    """embedding_bag (gather_sum) and CSR SDDMM (sampled_dot)."""

    @staticmethod
    def gather_sum(p, weights, table):
        dt = accumulation_dtype(table.dtype)
        out = F.embedding_bag(p.cols, table.to(dt), p.row_ptr[:-1], mode="sum",
                              per_sample_weights=weights.to(dt))
        return out.to(table.dtype)

    @staticmethod
    def sampled_dot(p, src, table):
        dt = accumulation_dtype(src.dtype)
        mask = _csr(p.row_ptr, p.cols, torch.zeros(p.cols.shape[0], dtype=dt, device=src.device),
                    (p.n_rows, p.n_cols))
        dots = torch.sparse.sampled_addmm(mask, src.to(dt), table.to(dt).mT, beta=0.0)
        return dots.values().to(src.dtype)
