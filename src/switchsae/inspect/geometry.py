"""Geometry of the decoder directions: nearest features in other experts, and a 2-D map."""

from __future__ import annotations

import importlib.util

import numpy as np

MAP_METHODS = ("auto", "pca", "umap")


def nearest_in_other_experts(rows: np.ndarray, owner: np.ndarray, n: int,
                             block_elements: int = 2**24) -> tuple[np.ndarray, np.ndarray]:
    """The `n` decoder rows of *other* experts most cosine-similar to each row.

    rows: (T, d); owner: (T,) expert of each row.  -> (ids, cosines), both (T, n'), most
    similar first, n' = min(n, rows outside the largest expert).  Works in blocks of at most
    `block_elements` similarities."""
    unit = rows / (np.linalg.norm(rows, axis=-1, keepdims=True) + 1e-12)
    total = len(rows)
    n = max(0, min(n, total - int(np.bincount(owner).max())))
    ids, cos = np.zeros((total, n), dtype=np.int64), np.zeros((total, n), dtype=np.float32)
    if n == 0:
        return ids, cos
    step = max(1, block_elements // total)
    for a in range(0, total, step):
        b = min(a + step, total)
        sims = unit[a:b] @ unit.T
        sims[owner[a:b, None] == owner[None, :]] = -np.inf
        part = np.argpartition(-sims, n - 1, axis=-1)[:, :n]
        part_sims = np.take_along_axis(sims, part, axis=-1)
        order = np.lexsort((part, -part_sims), axis=-1)
        ids[a:b] = np.take_along_axis(part, order, axis=-1)
        cos[a:b] = np.take_along_axis(part_sims, order, axis=-1)
    return ids, cos


def pca_2d(rows: np.ndarray) -> np.ndarray:
    """(T, d) -> (T, 2): projection on the top two principal components (NumPy SVD), each
    signed so its largest loading is positive (a deterministic picture)."""
    centered = rows - rows.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    comps = vt[:2]
    comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=-1)])[:, None]
    out = centered @ comps.T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def map_2d(rows: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the decoder directions and the method used: "pca", or "umap"
    (cosine metric) when asked for or, with "auto", when umap-learn is installed."""
    if method not in MAP_METHODS:
        raise ValueError(f"map method must be one of {MAP_METHODS}, got {method!r}")
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not has_umap:
        raise ValueError("map method 'umap' needs umap-learn: pip install umap-learn (or use 'pca')")
    if method == "pca" or (method == "auto" and not has_umap):
        return pca_2d(rows), "pca"
    import umap

    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
    return np.asarray(reducer.fit_transform(rows), dtype=np.float64), "umap"
