"""The Switch SAE forward pass and loss: the specification every backend must reproduce.

For x: (batch, d), with m = M / N latents per expert and e = experts_per_token (1 in the paper):
  1. p = softmax((x - b_router) @ W_router.T)             (batch, N); the top-e experts
  2. each chosen expert j: a_j = relu((x - b_pre) @ W_enc[e_j] (+ b_enc[e_j]))   (batch, m)
  3. candidates = [gate_j * a_j]_j, gate_j = p[e_j] ("soft") or 1 ("hard")   (batch, e*m);
     keep the top k (k - shared_k with a shared expert): top_values, global ids e_j*m + i
  4. x_hat = sum top_values * W_dec[ids] (+ the shared expert's own TopK decode) + b_pre
Loss = mse + lb_coef * N * sum_i f_i P_i (+ auxk_coef * AuxK when a dead mask is given).
With e = 1 the gate is a positive scalar per token, so step 3 is TopK of a_j scaled by p[e].
Steps 2-4's per-expert work (`run_experts`) runs through the backend's `dispatch` hook, and
f_i and AuxK's total variance come from `backend.batch_statistics()`: a backend that splits the
batch or the experts over processes supplies those and nothing else (see `trace`).
"""

from __future__ import annotations

from typing import NamedTuple

from . import losses as L
from .experts import relu
from .router import choose_experts, router_probs


class ForwardOutput(NamedTuple):
    """x_hat: (batch, d); expert: (batch,) chosen expert, (batch, e) when experts_per_token > 1;
    router_probs: (batch, N); top_values: (batch, k) gated activations; top_indices: (batch, k)
    global latent ids (e*m + i routed, M + i shared); losses: dict of scalars
    ("mse", "lb", "auxk", "total")."""

    x_hat: object
    expert: object
    router_probs: object
    top_values: object
    top_indices: object
    losses: dict


class Trace(NamedTuple):
    """Every intermediate of the forward pass (for hand-derived gradients and debugging).

    experts, gates: (batch, e); acts: (batch, e*m) relu'd pre-activations of the chosen experts;
    cand_indices: (batch, k_routed) positions in the e*m candidates; aux_*: AuxK's
    (None when off); shared_pre: (batch, m_s), shared_indices: (batch, shared_k) (None without)."""

    out: ForwardOutput
    x_centered: object
    experts: object
    gates: object
    acts: object
    cand_indices: object
    aux_cand_indices: object
    aux_recon: object
    n_dead: object
    shared_pre: object
    shared_indices: object


class Encoding(NamedTuple):
    """The encoder half of the forward pass.  probs: (batch, N); experts, gates: (batch, e);
    pre, acts: (batch, e*m) pre-activations and their relu; cand_indices: (batch,
    k_routed) kept candidate positions; top_values, top_indices: (batch, k) kept values and
    global ids, routed first, then the shared expert's; shared_pre: (batch, m_s) and
    shared_indices: (batch, shared_k) local ids (None without a shared expert)."""

    probs: object
    experts: object
    gates: object
    x_centered: object
    acts: object
    cand_indices: object
    top_values: object
    top_indices: object
    shared_pre: object
    shared_indices: object


class Experts(NamedTuple):
    """What the chosen experts give back for their tokens (`run_experts`).  values: (T, k_routed)
    gated kept activations; cand_indices: (T, k_routed) their positions among the e*m
    candidates; recon: (T, d) their decode (without b_pre); acts: (T, e*m) relu'd
    pre-activations (None where a backend skips them, or where the experts ran on another
    process); aux_cand_indices: (T, j <= k_aux) AuxK's dead candidates (None when off or remote;
    see `Backend.encode_topk_aux` for j);
    aux_recon: (T, d) their decode (None when AuxK is off)."""

    values: object
    cand_indices: object
    recon: object
    acts: object = None
    aux_cand_indices: object = None
    aux_recon: object = None


def route(params: dict, x, cfg, backend):
    """The router's choice.  x: (batch, d) -> probs (batch, N); experts, gates: (batch, e)."""
    xp = backend.xp
    probs = router_probs(x, params["b_router"], params["W_router"], xp)
    experts = choose_experts(probs, xp)[:, None] if cfg.experts_per_token == 1 else \
        backend.topk(probs, cfg.experts_per_token)[1]
    return probs, experts, gates_of(probs, experts, cfg.router_scale, xp)


def encode_experts(params: dict, x, gates, experts, cfg, backend, keep_acts: bool = True, select_bias=None):
    """Run the chosen experts' encoders and keep the top k_routed gated candidates.
    x: (T, d); gates, experts: (T, e), indices into params' expert axis; select_bias: (experts
    in params, m) or None, the main TopK's selection bias (top-1 routing only) -> (acts (T, e*m)
    or None where the backend skips it and not keep_acts, values, candidate positions (T, k_routed))."""
    xp, e, m = backend.xp, cfg.experts_per_token, cfg.expert_width
    W_enc, b_enc = params["W_enc"], params.get("b_enc")
    if e == 1:  # the gate is a positive per-token scalar: TopK of the expert's acts, then gate
        acts, kept, cand_indices = backend.encode_topk(x, params["b_pre"], W_enc, b_enc, experts[:, 0],
                                                         cfg.routed_k, keep_acts, select_bias)
        return acts, kept * gates, cand_indices
    if select_bias is not None:
        raise ValueError(f"the selection bias needs experts_per_token = 1, got {e}")
    x_centered = x - params["b_pre"]
    acts = relu(xp.concat([backend.encode(x_centered, W_enc, b_enc, experts[:, j]) for j in range(e)],
                          axis=-1), xp)
    return (acts, *gated_topk(acts, gates, cfg.routed_k, m, backend))


def run_experts(params: dict, x, gates, experts, dead, cfg, backend, keep_acts: bool = True,
                select_bias=None) -> Experts:
    """The chosen experts on their tokens: encode, TopK, decode, and AuxK's dead-latent TopK and
    decode.  x: (T, d); gates, experts: (T, e), experts indexing params' expert axis (all N, or
    a process's own under expert parallelism); dead: (experts in params, m) bool, the routed
    dead mask by expert, or None without AuxK; select_bias: (experts in params, m), the main
    TopK's selection bias by expert (`core.selection_bias`), or None."""
    xp, m = backend.xp, cfg.expert_width
    table = xp.reshape(params["W_dec"], (-1, cfg.d_in))
    if dead is not None and experts.shape[1] == 1:  # AuxK chosen in the fused encode (same acts)
        acts, kept, cand, aux_kept, aux_cand = backend.encode_topk_aux(
            x, params["b_pre"], params["W_enc"], params.get("b_enc"), experts[:, 0], cfg.routed_k, dead,
            cfg.aux_k, keep_acts, select_bias)
        values, aux_values = kept * gates, aux_kept * gates
    else:
        acts, values, cand = encode_experts(params, x, gates, experts, cfg, backend, keep_acts or dead is not None,
                                            select_bias)
    ids = global_ids(cand, experts, m, xp)
    if dead is None:
        return Experts(values, cand, backend.decode(values, ids, table), acts)
    if experts.shape[1] > 1:
        dead_local = xp.concat([xp.take(dead, experts[:, j], axis=0) for j in range(experts.shape[1])], axis=-1)
        aux_values, aux_cand = gated_topk(xp.where(dead_local, acts, xp.zeros_like(acts)), gates, cfg.aux_k,
                                          m, backend)
        recon = backend.decode(values, ids, table)
        aux_recon = backend.decode(aux_values, global_ids(aux_cand, experts, m, xp), table)
    else:
        recon, aux_recon = backend.decode_with_aux(values, ids, aux_values, global_ids(aux_cand, experts, m, xp),
                                                   experts[:, 0], dead, table)
    return Experts(values, cand, recon, acts, aux_cand, aux_recon)


def encode(params: dict, x, cfg, backend, keep_intermediates: bool = True) -> Encoding:
    """Route, run the chosen experts' encoders and keep the top k_routed candidates.  Without
    keep_intermediates, Encoding.x_centered and (from a backend that skips them) acts may be
    None where nothing else needs them."""
    probs, experts, gates = route(params, x, cfg, backend)
    acts, values, cand_indices = encode_experts(params, x, gates, experts, cfg, backend, keep_intermediates)
    x_centered, top_values, top_indices, shared_pre, _, shared_indices = _with_shared(
        params, x, values, cand_indices, experts, cfg, backend, keep_intermediates)
    return Encoding(probs, experts, gates, x_centered, acts, cand_indices,
                    top_values, top_indices, shared_pre, shared_indices)


def trace(params: dict, x, cfg, backend, dead_mask=None, keep_intermediates: bool = True,
          select_bias=None) -> Trace:
    """Run the spec on `backend`'s arrays, keeping intermediates.
    dead_mask: (total_latents,) bool or None; AuxK uses its routed part.  select_bias: (N, m)
    >= 0 or None: the routed experts' main TopK keeps the k largest acts + bias where acts > 0
    (`topk.biased_topk`; a training device of `core.selection_bias`, top-1 routing only).
    Without keep_intermediates, Trace.x_centered and Trace.acts may be None (see `encode`).

    x may be one process's slice of a batch split over processes: the chosen experts run through
    `backend.dispatch` (expert parallelism: on the processes that own them), and the losses use
    `backend.batch_statistics()` (the whole batch's f_i and total variance), so they are this
    process's share, whose mean over processes is the whole batch's loss."""
    xp = backend.xp
    probs, experts, gates = route(params, x, cfg, backend)
    dead = None
    if uses_auxk(cfg, dead_mask):
        dead = xp.reshape(dead_mask[:cfg.n_latents], (cfg.n_experts, cfg.expert_width))

    def run(x_rows, gate_rows, expert_rows, dead_rows, bias_rows):
        return run_experts(params, x_rows, gate_rows, expert_rows, dead_rows, cfg, backend, keep_intermediates,
                           bias_rows)

    ex = backend.dispatch(run, x, gates, experts, dead, cfg.n_experts, select_bias)
    x_centered, top_values, top_indices, shared_pre, shared_values, shared_indices = _with_shared(
        params, x, ex.values, ex.cand_indices, experts, cfg, backend, keep_intermediates)
    x_hat = ex.recon + params["b_pre"]
    if cfg.shared_latents:
        x_hat = x_hat + backend.decode(shared_values, shared_indices, params["W_dec_shared"])

    stats = backend.batch_statistics()
    error = x - x_hat
    mse = L.mse_loss(error, xp)
    lb = L.load_balance_loss(probs, stats.expert_fractions(experts, cfg.n_experts, probs.dtype, xp), xp)
    total = mse + cfg.lb_weight * lb
    n_dead = None
    if ex.aux_recon is None:
        auxk = xp.zeros_like(mse)
    else:  # the dead latents reconstruct the detached residual
        n_dead = xp.sum(xp.astype(dead_mask[:cfg.n_latents], x.dtype))
        auxk = L.auxk_loss(ex.aux_recon, backend.stop_gradient(error), n_dead, float(cfg.aux_k),
                           stats.total_variance(x, xp), xp)
        total = total + cfg.auxk_coef * auxk
    expert = experts[:, 0] if cfg.experts_per_token == 1 else experts
    out = ForwardOutput(x_hat, expert, probs, top_values, top_indices,
                        {"mse": mse, "lb": lb, "auxk": auxk, "total": total})
    return Trace(out, x_centered, experts, gates, ex.acts, ex.cand_indices, ex.aux_cand_indices,
                 ex.aux_recon, n_dead, shared_pre, shared_indices)


def _with_shared(params, x, values, cand_indices, experts, cfg, backend, keep_intermediates):
    """The routed experts' kept values and global ids, with the shared expert's TopK appended.
    -> (x_centered or None, top_values, top_indices: (batch, k), shared_pre, shared_values,
    shared_indices (None without a shared expert))."""
    xp = backend.xp
    top_indices = global_ids(cand_indices, experts, cfg.expert_width, xp)
    x_centered = x - params["b_pre"] if keep_intermediates or cfg.shared_latents else None
    if not cfg.shared_latents:
        return x_centered, values, top_indices, None, None, None
    shared_pre, shared_values, shared_indices = shared_encode(params, x_centered, cfg, backend)
    return (x_centered, xp.concat([values, shared_values], axis=-1),
            xp.concat([top_indices, shared_indices + cfg.n_latents], axis=-1),
            shared_pre, shared_values, shared_indices)


def forward(params: dict, x, cfg, backend, dead_mask=None, select_bias=None) -> ForwardOutput:
    """The spec's forward pass and losses.  x: (batch, d) native array (the rest as `trace`)."""
    return trace(params, x, cfg, backend, dead_mask, keep_intermediates=False, select_bias=select_bias).out


def gates_of(probs, experts, router_scale, xp):
    """(batch, e): p[e_j] ("soft") or 1 ("hard")."""
    chosen = xp.take_along_axis(probs, experts, axis=-1)
    return xp.ones_like(chosen) if router_scale == "hard" else chosen


def gated_topk(acts, gates, k, m, backend):
    """The k largest gated candidates gate_j * acts_j.  acts: (batch, e*m); gates: (batch, e)
    -> values (gated), candidate positions: (batch, k).  With one expert the gate is a
    positive per-token scalar, so it is applied to the k kept values only."""
    xp = backend.xp
    batch, e = gates.shape
    if e == 1:
        kept, positions = backend.topk(acts, k)
        return kept * gates, positions
    gated = xp.reshape(xp.reshape(acts, (batch, e, m)) * gates[:, :, None], (batch, e * m))
    return backend.topk(gated, k)


def global_ids(cand_indices, experts, m, xp):
    """Candidate positions j*m + i -> global latent ids experts[:, j]*m + i.  (batch, k)."""
    if experts.shape[-1] == 1:
        return cand_indices + xp.astype(experts, cand_indices.dtype) * m
    slot = cand_indices // m
    owner = xp.take_along_axis(xp.astype(experts, cand_indices.dtype), slot, axis=-1)
    return owner * m + (cand_indices - slot * m)


def shared_encode(params, x_centered, cfg, backend):
    """The always-on shared expert's own TopK of shared_k over m_s latents (ungated).
    -> pre (batch, m_s), values and local ids (batch, shared_k)."""
    xp = backend.xp
    pre = x_centered @ params["W_enc_shared"]
    if "b_enc_shared" in params:
        pre = pre + params["b_enc_shared"]
    values, indices = backend.topk(relu(pre, xp), cfg.shared_k)
    return pre, values, indices


def uses_auxk(cfg, dead_mask) -> bool:
    """Whether the loss has its AuxK term (a dead mask is given and auxk_coef > 0)."""
    return dead_mask is not None and cfg.auxk_coef != 0
