"""TopK with the spec's tie rule (equal values: lower index first) on top of `torch.topk`.

torch.topk picks an arbitrary subset of values tied at the k-th place.  That leaves x_hat alone
but moves gradient between tied latents, so rows with such a boundary tie (typically the zeros
of AuxK's masked rows, or duplicated latents) are re-selected exactly: everything above the
k-th value, then the lowest-index tied entries.  A tie is seen from one extra topk column, so
rows without one cost nothing more; the fix is linear in the row width, no full sort.  Rows
with equal kept values are then put in (value desc, index asc) order."""

from __future__ import annotations

import torch


def topk_lowest_index_ties(acts: torch.Tensor, k: int):
    """acts: (T, n) -> values, indices (T, k): the k largest, descending, equal values in
    ascending index order.  values are gathered from acts, so gradients flow as for topk."""
    with torch.no_grad():
        wide = min(k + 1, acts.shape[-1])  # the (k+1)-th value shows a tie across the k-th place
        kept, indices = torch.topk(acts, wide, dim=-1, sorted=True)
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
