"""The browser's data: one JSON-able dict describing a Switch SAE on a corpus.

Layout (T = every latent, routed then shared; ids are global latent ids):
  meta      sizes, config, thresholds, where the activations came from
  summary   fvu, l0, load entropy, dead / dense counts and fractions, duplication fraction
  experts   per expert: key, start, width, load, dead, dense
  features  per latent: f (frequency), n (tokens fired on), max, mean, hist (counts over
            [0, max]), ctx (top contexts: [token-table start, centre offset, activation,
            per-mille of max for each window token]), nn ([id, cosine] in other experts)
  tokens    the token strings the contexts refer to
  map       x, y of every decoder direction
  search    tok (normalised token text), n (occurrences), top ([id, mean activation])
"""

from __future__ import annotations

import array_api_compat.numpy as xnp
import numpy as np

from switchsae.core import metrics

from .encode import encode_corpus
from .features import context_windows, feature_stats, top_activations, window_activations
from .geometry import map_2d, nearest_in_other_experts
from .groups import decoder_rows, expert_groups, group_of


def _round(values, sig: int = 4) -> list[float]:
    """Floats rounded to `sig` significant digits (compact JSON)."""
    return [float(f"{v:.{sig}g}") for v in np.asarray(values, dtype=np.float64).ravel()]


def site_data(sae, corpus, *, n_contexts: int = 10, before: int = 12, after: int = 4, bins: int = 20,
              n_neighbours: int = 5, dense_threshold: float = 0.1, duplication_threshold: float = 0.9,
              map_method: str = "auto", search_tokens: int = 20000, per_token: int = 5,
              source: str = "", batch_size: int = 4096) -> dict:
    """Everything the browser shows about `sae` (a SwitchSAE) on `corpus` (a Corpus)."""
    cfg = sae.cfg
    if corpus.acts.shape[1] != cfg.d_in:
        raise ValueError(f"the corpus has d={corpus.acts.shape[1]} but the SAE expects d_in={cfg.d_in}")
    groups = expert_groups(cfg)
    total = sum(g.width for g in groups)
    codes = encode_corpus(sae, corpus.acts, batch_size)
    stats = feature_stats(codes, total, bins)
    rows, values = top_activations(codes, total, n_contexts)
    contexts, tokens = _contexts(codes, corpus, rows, values, stats.max, before, after)
    directions = decoder_rows(sae)
    nn_ids, nn_cos = nearest_in_other_experts(directions, group_of(groups), n_neighbours)
    coords, method = map_2d(directions, map_method)
    experts, summary = _experts_and_summary(cfg, groups, codes, stats, directions, dense_threshold,
                                            duplication_threshold)
    features = [{"f": f, "n": int(n), "max": mx, "mean": mn, "hist": h.tolist(), "ctx": c,
                 "nn": [[int(j), cs] for j, cs in zip(ids, _round(cos, 3))]}
                for f, n, mx, mn, h, c, ids, cos in zip(
                    _round(stats.freq), stats.count, _round(stats.max), _round(stats.mean), stats.hist,
                    contexts, nn_ids, nn_cos)]
    meta = {"source": source, "n_tokens": len(corpus.tokens), "n_docs": int(corpus.doc.max()) + 1,
            "config": cfg.to_dict(), "total_latents": total, "map_method": method,
            "dense_threshold": dense_threshold, "duplication_threshold": duplication_threshold,
            "n_contexts": n_contexts, "bins": bins}
    return {"meta": meta, "summary": summary, "experts": experts, "features": features,
            "tokens": tokens, "map": {"x": _round(coords[:, 0]), "y": _round(coords[:, 1])},
            "search": _search_index(codes, corpus.tokens, total, search_tokens, per_token)}


def _experts_and_summary(cfg, groups, codes, stats, directions, dense_threshold, duplication_threshold):
    """Per-expert load / dead / dense counts, and the corpus-wide summary (metrics API).
    Dead: never fired on the corpus; dense: fires on more than `dense_threshold` of it."""
    load = np.asarray(metrics.expert_load(xnp.asarray(codes.expert), cfg.n_experts, xnp, xnp.float64))
    dead, dense = stats.count == 0, stats.freq > dense_threshold
    experts = [{"key": g.key, "start": g.start, "width": g.width,
                "load": float(load[i]) if i < cfg.n_experts else 1.0,  # the shared expert: always on
                "dead": int(dead[g.start:g.start + g.width].sum()),
                "dense": int(dense[g.start:g.start + g.width].sum())} for i, g in enumerate(groups)]
    W_dec = xnp.asarray(directions[:cfg.n_latents].reshape(cfg.n_experts, cfg.expert_width, cfg.d_in))
    summary = {
        "fvu": codes.fvu, "l0": codes.l0,
        "load_entropy": float(metrics.load_entropy(xnp.asarray(load), xnp)),
        "dead": int(dead.sum()), "dead_fraction": float(dead.mean()),
        "dense": int(dense.sum()),
        "dense_fraction": float(metrics.dense_fraction(xnp.asarray(stats.freq), xnp, dense_threshold)),
        "duplication_fraction": float(metrics.duplication_fraction(W_dec, xnp, duplication_threshold)),
    }
    return experts, summary


def _contexts(codes, corpus, rows, values, vmax, before, after):
    """Per latent its contexts [start, centre offset, value, per-mille acts] into a compact
    token table holding only the tokens some context shows; -> (contexts, table)."""
    latent, rank = np.nonzero(rows >= 0)
    centre = rows[latent, rank]
    start, stop = context_windows(centre, corpus.doc, before, after)
    acts = window_activations(codes, latent, start, stop)
    used = np.zeros(len(corpus.tokens) + 1, dtype=np.int64)
    np.add.at(used, start, 1)
    np.add.at(used, stop, -1)
    shown = np.cumsum(used[:-1]) > 0
    new_index = np.cumsum(shown) - 1
    table = [t for t, keep in zip(corpus.tokens, shown) if keep]
    out = [[] for _ in range(len(rows))]
    for f, a, c, v, w in zip(latent, start, centre, _round(values[latent, rank]), acts):
        permille = np.rint(1000 * w / vmax[f]).astype(int).tolist()
        out[f].append([int(new_index[a]), int(c - a), v, permille])
    return out, table


def _search_index(codes, tokens, total, max_tokens, per_token):
    """Normalised token text (stripped, lower-case) -> the latents with the highest mean
    activation over its occurrences; the `max_tokens` most frequent texts."""
    norm = np.array([t.strip().lower() for t in tokens])
    vocab, tok_id, occurrences = np.unique(norm, return_inverse=True, return_counts=True)
    on = codes.values > 0
    key = tok_id[np.nonzero(on)[0]] * total + codes.indices[on]
    keys, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=codes.values[on].astype(np.float64))
    t_of, latent = keys // total, keys % total
    mean = sums / occurrences[t_of]
    order = np.lexsort((latent, -mean, t_of))
    t_of, latent, mean = t_of[order], latent[order], mean[order]
    rank = np.arange(len(t_of)) - np.searchsorted(t_of, t_of)
    keep_vocab = [int(i) for i in np.argsort(-occurrences, kind="stable") if vocab[i]][:max_tokens]
    top = {i: [] for i in keep_vocab}
    for t, f, m in zip(t_of[rank < per_token], latent[rank < per_token], _round(mean[rank < per_token])):
        if int(t) in top:
            top[int(t)].append([int(f), m])
    return {"tok": [str(vocab[i]) for i in keep_vocab], "n": [int(occurrences[i]) for i in keep_vocab],
            "top": [top[i] for i in keep_vocab]}
