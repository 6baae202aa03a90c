"""TopK with the spec's tie rule (equal values: lower index first) on top of `torch.topk`.

torch.topk picks an arbitrary subset of values tied at the k-th place.  That leaves x_hat alone
but moves gradient between tied latents, so rows with such a boundary tie (typically the zeros
of AuxK's masked rows, or duplicated latents) are re-selected exactly: everything above the
k-th value, then the lowest-index tied entries.  A tie is seen from one extra topk column, so
rows without one cost nothing more; the fix is linear in the row width, no full sort.  Rows
with equal kept values are then put in (value desc, index asc) order.

On CPU, `torch.topk` of a few dozen out of thousands costs several times a pass over the row;
`largest` first bounds the k-th value from below with block maxima (two cheap passes), so only the
few entries above the bound go through topk."""

from __future__ import annotations

import torch

from .sparse import counts


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
    if acts.is_cuda or n < _MIN_WIDTH_PER_K * k or n_rows == 0 or not acts.is_floating_point():
        return torch.topk(acts, k, dim=-1, sorted=True)
    # k groups of 2 strided blocks: each group's larger block maximum is at most its own maximum,
    # so the k-th largest of the 2k block maxima is at most the k-th largest entry
    n_blocks = 2 * k
    size = n // n_blocks
    maxima = acts[:, :n_blocks * size].view(n_rows, size, n_blocks).amax(1)
    bound = torch.topk(maxima, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    rows, cols = torch.nonzero(acts >= bound, as_tuple=True)  # row-major: columns ascending
    per_row = counts(rows, n_rows)
    width = int(per_row.max())
    if int(per_row.min()) < k or width > n // 2:  # NaNs, or too many ties at the bound
        return torch.topk(acts, k, dim=-1, sorted=True)
    slot = torch.arange(rows.shape[0], device=acts.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
    candidates = acts.new_full((n_rows, width), float("-inf"))
    candidates[rows, slot] = acts[rows, cols]
    positions = torch.zeros((n_rows, width), dtype=torch.int64, device=acts.device)
    positions[rows, slot] = cols
    values, chosen = torch.topk(candidates, k, dim=-1, sorted=True)
    return values, torch.gather(positions, 1, chosen)


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
