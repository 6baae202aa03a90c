"""TopK with the spec's tie rule (equal values: lower index first) on top of `torch.topk`.

torch.topk picks an arbitrary subset of values tied at the k-th place.  That leaves x_hat alone
but moves gradient between tied latents, so rows with such a boundary tie (typically the zeros
of AuxK's masked rows, or duplicated latents) are re-selected exactly: everything above the
k-th value, then the lowest-index tied entries.  A tie is seen from one extra topk column, so
rows without one cost nothing more; the fix is linear in the row width, no full sort.  Rows
with equal kept values are then put in (value desc, index asc) order.

On CPU, `torch.topk` of a few dozen out of thousands costs several times a pass over the row;
`largest` first bounds the k-th value from below with block maxima, so only the few entries above
the bound are sorted.  The small selections run in NumPy, whose AVX-512 sorts and partitions
(x86-simd-sort) are several times faster than ATen's on CPU; the arrays are shared, not copied."""

from __future__ import annotations

import numpy as np
import torch


def topk_lowest_index_ties(acts: torch.Tensor, k: int):
    """acts: (T, n) -> values, indices (T, k): the k largest, descending, equal values in
    ascending index order.  values are gathered from acts, so gradients flow as for topk."""
    with torch.no_grad():
        wide = min(k + 1, acts.shape[-1])  # the (k+1)-th value shows a tie across the k-th place
        kept, indices = largest(acts, wide)
        kept, indices, after = kept[:, :k], indices[:, :k], kept[:, k:]
        kth = kept[:, -1:]
        if wide > k:
            rows = torch.nonzero(after[:, 0] == kth[:, 0]).squeeze(-1)
            if rows.numel():
                sub, sub_kth = acts[rows], kth[rows]
                slots = k - (kept[rows] > sub_kth).sum(-1, keepdim=True)
                chosen = _lowest_index_selection(sub, sub == sub_kth, sub_kth, slots, k)
                indices[rows] = _order(torch.gather(sub, 1, chosen), chosen)
                kept[rows] = torch.gather(sub, 1, indices[rows])
        rows = torch.nonzero((kept[:, 1:] == kept[:, :-1]).any(-1)).squeeze(-1)
        if rows.numel():
            indices[rows] = _order(kept[rows], indices[rows])
    return torch.gather(acts, 1, indices), indices


def largest(acts: torch.Tensor, k: int):
    """torch.topk(acts, k, dim=-1, sorted=True) for acts: (T, n) (ties in any order)."""
    n_rows, n = acts.shape
    if acts.device.type != "cpu" or n < _MIN_WIDTH_PER_K * k or n_rows == 0 or not acts.is_floating_point():
        return torch.topk(acts, k, dim=-1, sorted=True)
    with torch.no_grad():
        a = acts if acts.dtype in (torch.float32, torch.float64) else acts.float()
        a = a.contiguous()
        n_blocks, size = 2 * k, n // (2 * k)
        maxima = a[:, :n_blocks * size].view(n_rows, size, n_blocks).amax(1).numpy()
        a = a.numpy()
    found = _above_bound(a, maxima, k)
    if found is None:
        return torch.topk(acts, k, dim=-1, sorted=True)
    values, indices = torch.from_numpy(found[0]).to(acts.dtype), torch.from_numpy(found[1])
    crowded = torch.from_numpy(found[2])
    if crowded.numel():  # rows with more than half their entries at the bound: torch.topk
        values[crowded], indices[crowded] = torch.topk(acts[crowded], k, dim=-1, sorted=True)
    return values, indices


def _above_bound(a: np.ndarray, maxima: np.ndarray, k: int):
    """The k largest entries of each row of a: (r, n), sorted, found among the few entries at or
    above a lower bound of the k-th largest.  maxima (r, 2k): the maxima of 2k disjoint blocks of
    each row; their k-th largest bounds the row's k-th largest entry from below (k blocks reach
    it, each holding an entry at least that large).  -> values, indices (r, k) and the rows
    `crowded` (ascending) with more than half their entries at or above the bound (ties, e.g. a
    relu'd row with fewer than k positive entries), whose values and indices are left for
    torch.topk, which does better there; None when there are NaNs (torch.topk ranks them above
    all) or every row is crowded."""
    n_rows, n = a.shape
    if np.isnan(maxima).any() or np.isnan(a[:, maxima.shape[1] * (n // maxima.shape[1]):]).any():
        return None  # the maxima cover all but the last n mod 2k columns
    bound = np.partition(maxima, k, axis=-1)[:, k, None]  # 2k maxima: the k-th largest
    flat = np.flatnonzero(a >= bound)  # row-major: each row's columns ascending
    rows = flat // n
    per_row = np.bincount(rows, minlength=n_rows)
    crowded = np.flatnonzero(per_row > n // 2)
    if crowded.size == n_rows:
        return None
    if crowded.size:
        keep = per_row[rows] <= n // 2
        flat, rows = flat[keep], rows[keep]
        per_row[crowded] = 0
    width = max(int(per_row.max()), k)  # a crowded row's k slots: -inf, left to the caller
    # row r's candidates, padded with -inf to `width`
    dest = np.arange(flat.size) + np.repeat(np.arange(n_rows) * width - (np.cumsum(per_row) - per_row), per_row)
    candidates = np.full(n_rows * width, -np.inf, dtype=a.dtype)
    candidates[dest] = a.reshape(-1)[flat]
    columns = np.zeros(n_rows * width, dtype=np.int64)
    columns[dest] = flat - rows * n
    order = np.argsort(-candidates.reshape(n_rows, width), axis=-1)[:, :k]
    return (np.take_along_axis(candidates.reshape(n_rows, width), order, -1),
            np.take_along_axis(columns.reshape(n_rows, width), order, -1), crowded)


_MIN_WIDTH_PER_K = 16  # narrower rows: torch.topk directly


def _lowest_index_selection(acts, tied, kth, slots, k):
    """Rows with more entries tied at kth than slots: indices (r, k) in ascending order of
    everything above kth plus the first `slots` tied entries."""
    keep = (acts > kth) | (tied & (torch.cumsum(tied, dim=-1) <= slots))
    return torch.nonzero(keep)[:, 1].view(-1, k)


def _order(values, indices):
    """Sort each row by value descending, then index ascending.  (T, k) -> indices (T, k)."""
    by_index = torch.argsort(indices, dim=-1)
    indices = torch.gather(indices, 1, by_index)
    by_value = torch.argsort(torch.gather(values, 1, by_index), dim=-1, descending=True, stable=True)
    return torch.gather(indices, 1, by_value)
