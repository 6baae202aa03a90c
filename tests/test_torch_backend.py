"""The PyTorch backend: forward and gradients against the NumPy float64 reference (float64 runs the
grouped-matmul fallback, float32 the native grouped GEMM), its fast paths against their dense
definitions, the tie rule of its TopK, the fused in-place optimiser step against core's, and a
proof that a train step never allocates a (batch, n_latents) or (batch, N, m) tensor.

The conformance suite (`pytest conformance`) covers float32/bfloat16 on every case and the
shared train step; here the same cases also run in float64, plus what only torch has.

Tolerances: float64 -- the harness's 1e-9 (only summation order differs: grouped matmuls, CSR
products); float32 vs the float64 reference -- the harness's 1e-4 (eps 1.2e-7 over sums of
<= 64 terms); float32 fast path vs its float32 definition on the same inputs -- 1e-5 of the
result's scale (~100x eps: summation order only)."""

from __future__ import annotations

import platform

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import array_api_compat.numpy as np_xp
import array_api_compat.torch as torch_xp
from switchsae.backends import load_backend
from switchsae.backends.torch import Backend as TorchBackend
from switchsae.backends.torch import dispatch, lazy, optim, sparse
from switchsae.backends.torch import topk as torch_topk
from switchsae.backends.torch.decode import decode as sparse_decode
from switchsae.backends.torch.decode import decode_with_aux
from switchsae.backends.torch.device import DeviceError, select_device
from switchsae.backends.torch import encode as torch_encode
from switchsae.backends.torch.encode import ExpertEncode, encode_topk, latent_major
from switchsae.conformance import harness as H
from switchsae.conformance.cases import build
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
from switchsae.core.backend import Backend as ReferenceHooks
from switchsae.core.constraints import DECODERS, normalize_decoder, remove_parallel_grad
from switchsae.core.optim import adam_update, clip_by_global_norm
from switchsae.core.topk import topk_reference
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

be = load_backend("torch")
FAST_RTOL = 1e-5
REFERENCE_CASES = ["base", "empty_expert", "one_expert", "k_equals_m", "single_expert",
                   "encoder_bias", "hard_router", "auxk", "ties", "two_experts_per_token",
                   "shared_expert"]


def np_(a):
    return np.asarray(be.to_numpy(a), dtype=np.float64)


def assert_fast(actual, expected, what, rtol=FAST_RTOL):
    expected = np_(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    err = float(np.max(np.abs(np_(actual) - expected))) if expected.size else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# -- against the NumPy reference ---------------------------------------------------------

@pytest.fixture(scope="module")
def references():
    return {}


def _reference(references, name):
    if name not in references:
        c = build(name)
        ref = H.forward("numpy", c, "float64")
        ref["grads"] = H.gradients("numpy", c, "float64")
        references[name] = (c, ref)
    return references[name]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_forward_and_gradients_match_numpy(references, name, dtype):
    c, ref = _reference(references, name)
    got = H.forward("torch", c, dtype)
    np.testing.assert_array_equal(got["expert"], ref["expert"], err_msg="chosen experts")
    np.testing.assert_array_equal(got["top_indices"], ref["top_indices"], err_msg="TopK ids (ties: lower first)")
    for field in ("x_hat", "router_probs", "top_values"):
        H.assert_close(got[field], ref[field], dtype, field)
    for term, value in ref["losses"].items():
        H.assert_close(got["losses"][term], value, dtype, f"loss {term}", scale=abs(value) + 1e-6)
    grads = H.gradients("torch", c, dtype)
    floor = 1e-2 * max(float(np.max(np.abs(g))) for g in ref["grads"].values())  # as conformance
    for pname, g_ref in ref["grads"].items():
        H.assert_close(grads[pname], g_ref, dtype, f"grad {pname}", scale=max(float(np.max(np.abs(g_ref))), floor))


def test_cases_exercise_the_edge_they_name(references):
    """The empty-expert case really leaves an expert without tokens, one_expert really sends
    every token to one expert, and float32 really takes the native grouped GEMM."""
    c, ref = _reference(references, "empty_expert")
    assert 3 not in set(ref["expert"].tolist())
    c, ref = _reference(references, "one_expert")
    assert set(ref["expert"].tolist()) == {0}
    x = be.asarray(c.x, "float32")
    assert dispatch.grouped_mm_supported(x, be.asarray(c.params["W_enc"], "float32"))
    assert not dispatch.grouped_mm_supported(be.asarray(c.x), be.asarray(c.params["W_enc"]))  # float64


# -- dispatch: native grouped GEMM vs fallback ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_fast_path_equals_fallback(dtype):
    g = torch.Generator().manual_seed(0)
    T, d, n, m = 40, 16, 5, 8
    x = torch.randn(T, d, generator=g).to(dtype)
    W = torch.randn(n, d, m, generator=g).to(dtype)
    ends = torch.tensor([7, 7, 20, 40, 40], dtype=torch.int32)  # experts 1 and 4 get no tokens
    assert dispatch.grouped_mm_supported(x, W)
    fast = dispatch.grouped_matmul(x, W, ends)
    loop = dispatch.grouped_matmul_loop(x, W, ends)
    # bfloat16: both round one fp32-accumulated product to bfloat16 -> at most 1 ulp apart
    assert_fast(fast.float(), loop.float(), f"grouped matmul {dtype}", rtol=FAST_RTOL if dtype == torch.float32 else 2**-7)
    starts = [0, 7, 7, 20, 40]
    dense = torch.cat([x[s:e].double() @ W[i].double() for i, (s, e) in enumerate(zip(starts, ends.tolist()))])
    assert_fast(fast.float(), dense, "grouped matmul vs definition", rtol=1e-5 if dtype == torch.float32 else 2**-6)


def test_unaligned_shapes_take_the_fallback():
    x, W = torch.randn(9, 7), torch.randn(3, 7, 5)  # 7 * 4 bytes: not 16-byte aligned
    assert not dispatch.grouped_mm_supported(x, W)
    ends = torch.tensor([2, 2, 9], dtype=torch.int32)
    want = torch.cat([x[:2] @ W[0], x[2:] @ W[2]])
    assert_fast(dispatch.grouped_matmul(x, W, ends), want, "fallback")


def test_route_sorts_stably_and_counts():
    expert = torch.tensor([2, 0, 2, 1, 0, 2])
    r = dispatch.route(expert, 4)
    assert r.perm.tolist() == [1, 4, 3, 0, 2, 5]
    assert r.ends.tolist() == [2, 3, 6, 6] and r.ends.dtype == torch.int32


# -- sparse products vs their dense definitions ------------------------------------------

def _pattern_case(dtype):
    g = torch.Generator().manual_seed(1)
    n_rows, n_cols, d = 7, 9, 5
    rows = torch.tensor([0, 0, 0, 2, 2, 3, 5, 5])  # rows 1, 4 and the last, 6, empty
    cols = torch.tensor([4, 1, 8, 4, 0, 4, 1, 7])  # col 4 three times: duplicates accumulate
    p = sparse.row_pattern(rows, cols, n_rows, n_cols)
    dense = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    dense[rows, cols] = w
    table = torch.randn(n_cols, d, generator=g, dtype=torch.float64)
    src = torch.randn(n_rows, d, generator=g, dtype=torch.float64)
    return p, dense, w.to(dtype), table.to(dtype), src.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_products_equal_dense_definitions(dtype):
    p, dense, w, table, src = _pattern_case(dtype)
    rtol = 1e-12 if dtype == torch.float64 else FAST_RTOL
    assert_fast(sparse.gather_sum(p, w, table), dense @ table.double(), "gather_sum", rtol)
    dots = (src.double() @ table.double().T)[p.rows, p.cols]
    assert_fast(sparse.sampled_dot(p, src, table), dots, "sampled_dot", rtol)
    assert_fast(sparse.scatter_outer(p, w, src), dense.T @ src.double(), "scatter_outer", rtol)


def test_fixed_pattern_keeps_row_order():
    p = sparse.fixed_pattern(torch.tensor([[5, 2], [0, 5], [3, 1]]), 7)
    assert p.rows.tolist() == [0, 0, 1, 1, 2, 2] and p.cols.tolist() == [5, 2, 0, 5, 3, 1]
    assert p.row_ptr.tolist() == [0, 2, 4, 6] and p.n_rows == 3


# -- the autograd Functions: gradcheck in float64 -----------------------------------------

def test_expert_encode_gradcheck_and_definition():
    g = torch.Generator().manual_seed(2)
    T, d, n, m = 7, 4, 3, 5
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, m, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, m, generator=g, dtype=torch.float64, requires_grad=True)
    expert = torch.tensor([2, 0, 2, 2, 0, 2, 0])  # expert 1 idle
    want = torch.einsum("td,tdm->tm", x, W[expert]) + b[expert]
    assert_fast(ExpertEncode.apply(x, W, b, expert), want.detach(), "encode forward", 1e-12)
    assert torch.autograd.gradcheck(lambda x, W, b: ExpertEncode.apply(x, W, b, expert), (x, W, b))
    assert torch.autograd.gradcheck(lambda x, W: ExpertEncode.apply(x, W, None, expert), (x, W))
    grads = torch.autograd.grad(ExpertEncode.apply(x, W, b, expert), (x, W, b), torch.zeros(T, m))
    assert all(not g.any() for g in grads), "a zero upstream gradient (no entries) gives zeros"


@pytest.mark.parametrize("n", [3, 1], ids=["three_experts", "one_expert"])
def test_expert_encode_topk_gradcheck_and_definition(n):
    """The fused encode -> relu -> TopK equals the three hooks composed; its gradients pass
    gradcheck when only the kept values carry gradient (the sparse backward from (T, k), with
    b_pre's gradient from per-latent sums when x needs none) and when acts does too (AuxK)."""
    g = torch.Generator().manual_seed(6)
    T, d, m, k = 9, 4, 6, 2
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    b_pre = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, m, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, m, generator=g, dtype=torch.float64, requires_grad=True)
    expert = torch.tensor([2, 0, 2, 2, 0, 2, 0, 0, 2]) % n  # expert 1 idle
    want_acts = torch.relu(torch.einsum("td,tdm->tm", x - b_pre, W[expert]) + b[expert]).detach()
    want_v, want_i = topk_reference(want_acts.numpy(), k, np_xp)
    acts, values, indices = encode_topk(x, b_pre, W, b, expert, k)
    assert_fast(acts, want_acts, "acts", 1e-12)
    assert_fast(values, torch.from_numpy(want_v), "values", 1e-12)
    np.testing.assert_array_equal(indices.numpy(), want_i)
    assert encode_topk(x, b_pre, W, b, expert, k, keep_acts=False)[0] is None

    def kept(x, b_pre, W, b):
        return encode_topk(x, b_pre, W, b, expert, k, keep_acts=False)[1]

    def both(x, b_pre, W, b):
        acts, values, _ = encode_topk(x, b_pre, W, b, expert, k)
        return acts, values

    assert torch.autograd.gradcheck(kept, (x, b_pre, W, b))
    assert torch.autograd.gradcheck(lambda b_pre, W, b: kept(x.detach(), b_pre, W, b), (b_pre, W, b))
    assert torch.autograd.gradcheck(both, (x, b_pre, W, b))
    assert torch.autograd.gradcheck(lambda b_pre, W: both(x.detach(), b_pre, W, None), (b_pre, W))


def _auxk_as_runs(monkeypatch, on: bool):
    """Have AuxK take its dense per-expert form (`encode.dead_topk`) at test sizes (every row
    count and density pays), or never."""
    monkeypatch.setattr(sparse, "RUN_MIN_ROWS", 1 if on else 10**9)
    monkeypatch.setattr(torch_encode, "RUN_MIN_DENSITY", 0.0)


@pytest.mark.parametrize("runs", [False, True], ids=["gathers", "dense_runs"])
def test_fused_auxk_selection_equals_the_reference_hook_and_passes_gradcheck(runs, monkeypatch):
    """encode_topk_aux chooses AuxK's dead latents inside the fused encode: its positive values
    and their ids equal the standard-ops hook's (top aux_k of acts masked to dead latents), the
    rest is 0, and the gradients of main and AuxK values together pass gradcheck (one sparse
    backward).  Gathers: the positive ones first, width the most positive dead acts of a row
    (capped at aux_k); in ascending id order in a row with at most aux_k (no selection), else
    descending.  Dense runs (when every dead latent may be kept): each row lists its
    expert's dead latents, ascending, width the most dead latents of an expert."""
    _auxk_as_runs(monkeypatch, runs)
    g = torch.Generator().manual_seed(11)
    T, d, n, m, k = 12, 5, 3, 8, 2
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    b_pre = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, m, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, m, generator=g, dtype=torch.float64, requires_grad=True)
    expert = torch.tensor([2, 0, 2, 2, 0, 2, 0, 0, 2, 1, 0, 2])
    dead = torch.rand(n, m, generator=g) < 0.5
    dead[1] = False  # an expert without dead latents
    most = int((ReferenceHooks.encode_topk_aux(be, x, b_pre, W, b, expert, k, dead, m)[3] > 0).sum(1).max())
    assert 2 <= most < m, "rows with more positive dead acts than aux_k = 1, none with more than m"
    for aux_k in (1, m):
        want = ReferenceHooks.encode_topk_aux(be, x, b_pre, W, b, expert, k, dead, aux_k)
        got = be.encode_topk_aux(x, b_pre, W, b, expert, k, dead, aux_k, keep_acts=False)
        assert got[0] is None
        for i in (1, 2):
            assert torch.equal(got[i], want[i])
        positive = (want[3] > 0).sum(1)
        as_runs = runs and aux_k >= int(dead.sum(1).max())
        width = int(dead.sum(1).max()) if as_runs else max(1, min(aux_k, int(positive.max())))
        assert got[3].shape == (T, width)
        for t in range(T):
            p = int(positive[t])
            kept = got[3][t] > 0
            assert int(kept.sum()) == p and not got[3][t, ~kept].any()
            if as_runs:  # the expert's dead latents in ascending order, then padding
                assert torch.equal(got[4][t, :int(dead[expert[t]].sum())], torch.nonzero(dead[expert[t]])[:, 0])
                order = torch.argsort(got[3][t][kept], descending=True, stable=True)
                assert torch.equal(got[3][t][kept][order], want[3][t, :p])
                assert torch.equal(got[4][t][kept][order], want[4][t, :p])
            elif p < aux_k or most <= aux_k:  # every positive one, in ascending id order
                order = torch.argsort(want[4][t, :p])
                assert torch.equal(got[3][t, :p], want[3][t, :p][order])
                assert torch.equal(got[4][t, :p], want[4][t, :p][order])
            else:
                assert torch.equal(got[3][t, :p], want[3][t, :p]) and torch.equal(got[4][t, :p], want[4][t, :p])

    def both(x, b_pre, W, b):
        return be.encode_topk_aux(x, b_pre, W, b, expert, k, dead, m, keep_acts=False)[1:4:2]

    assert torch.autograd.gradcheck(both, (x, b_pre, W, b))
    assert torch.autograd.gradcheck(lambda b_pre, W: both(x.detach(), b_pre, W, None), (b_pre, W))


def test_auxk_dense_runs_equal_the_numpy_reference(monkeypatch):
    """AuxK in its dense per-expert form (GEMMs over each expert's dead latents in the fused
    encode's backward and in the decode) gives the NumPy reference's losses and gradients
    (float64: only summation order differs, the harness's 1e-9)."""
    c = build("auxk")
    c.cfg = c.cfg.replace(k_aux=c.cfg.expert_width)  # every dead latent may be kept
    want, want_grads = H.forward("numpy", c, "float64"), H.gradients("numpy", c, "float64")
    _auxk_as_runs(monkeypatch, True)
    forms = []
    dead_topk = torch_encode.dead_topk

    def spy(*args):
        out = dead_topk(*args)
        forms.append(out[2] is not None)
        return out

    monkeypatch.setattr(torch_encode, "dead_topk", spy)
    got, grads = H.forward("torch", c, "float64"), H.gradients("torch", c, "float64")
    assert forms and all(forms), "AuxK did not take its dense form"
    for term, value in want["losses"].items():
        H.assert_close(got["losses"][term], value, "float64", f"loss {term}", scale=abs(value) + 1e-6)
    for name, g in want_grads.items():
        H.assert_close(grads[name], g, "float64", f"grad {name}", scale=float(np.max(np.abs(g))))


def test_sparse_decode_of_runs_gradcheck(monkeypatch):
    """Rows sharing one index list (runs) decode as GEMMs: the same result as the gathers, and
    gradcheck; a latent whose weights are 0 in every row of its runs gets no table gradient."""
    monkeypatch.setattr(sparse, "RUN_MIN_ROWS", 2)
    g = torch.Generator().manual_seed(5)
    indices = torch.tensor([[1, 6, 2]] * 3 + [[0, 7, 4]] * 4 + [[3, 1, 5]] * 2)
    values = torch.rand(9, 3, generator=g, dtype=torch.float64)
    values[:3, 1] = 0.0  # latent 6 unused in its run
    values[7:, 2] = 0.0  # latent 5 unused: the used columns are a prefix
    table = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert sparse.runs_of(indices[torch.argsort(indices[:, 0])]) is not None
    want = (values[:, :, None] * table.detach()[indices]).sum(1)
    torch.testing.assert_close(sparse_decode(values, indices, table), want, rtol=1e-12, atol=1e-12)
    sparse_decode(values, indices, table).sum().backward()
    assert not table.grad[[5, 6]].any() and table.grad[[0, 1, 2, 3, 4, 7]].abs().sum(1).gt(0).all()
    positive = (values + 0.5).requires_grad_(True)  # zero entries may get gradient 0 (core.Backend.decode)
    assert torch.autograd.gradcheck(lambda v, t: sparse_decode(v, indices, t), (positive, table))


def test_sparse_decode_of_runs_hands_lazy_adam_the_rows_with_gradient(monkeypatch):
    """A decode whose rows are all runs (no gathered entries) gives lazy Adam's collector the
    table gradient at exactly the latents with a non-zero weight, equal to the dense gradient's
    rows there."""
    monkeypatch.setattr(sparse, "RUN_MIN_ROWS", 2)
    g = torch.Generator().manual_seed(6)
    indices = torch.tensor([[1, 6, 2]] * 3 + [[0, 7, 4]] * 4 + [[3, 1, 5]] * 2)
    values = torch.rand(9, 3, generator=g, dtype=torch.float64)
    values[:3, 1] = 0.0
    values[7:, 2] = 0.0  # latents 6 and 5: no weight, no gradient
    W_dec = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    weights = torch.randn(9, 4, generator=g, dtype=torch.float64)
    sink = lazy.RowGradients({"W_dec": W_dec})
    (sparse_decode(values.clone().requires_grad_(True), indices, W_dec.view(8, 4), sink) * weights).sum().backward()
    rows = sink.rows()["W_dec"]
    table = W_dec.view(8, 4).clone().requires_grad_(True)
    (sparse_decode(values, indices, table) * weights).sum().backward()
    assert rows.ids.tolist() == [0, 1, 2, 3, 4, 7]
    torch.testing.assert_close(rows.values, table.grad[rows.ids], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("runs", [False, True], ids=["aux_gathers", "aux_runs"])
def test_decode_with_aux_equals_two_decodes_with_one_table_gradient(runs, monkeypatch):
    """decode_with_aux (the main TopK's and AuxK's entries of one table, one table gradient)
    equals two `decode`s in outputs and every gradient (float64: summation order only), with
    AuxK's rows as gathers or as runs, and passes gradcheck."""
    monkeypatch.setattr(sparse, "RUN_MIN_ROWS", 2 if runs else 10**9)
    g = torch.Generator().manual_seed(8)
    values = torch.rand(9, 3, generator=g, dtype=torch.float64).add_(0.1).requires_grad_(True)
    indices = torch.randint(0, 12, (9, 3), generator=g)
    aux_indices = torch.tensor([[1, 6, 2]] * 3 + [[0, 7, 4]] * 4 + [[3, 11, 5]] * 2)[torch.randperm(9, generator=g)]
    aux_values = torch.rand(9, 3, generator=g, dtype=torch.float64).add_(0.1).requires_grad_(True)
    table = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = (values, aux_values, table)
    both = decode_with_aux(values, indices, aux_values, aux_indices, table)
    apart = sparse_decode(values, indices, table), sparse_decode(aux_values, aux_indices, table)
    weights = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    for got, want in zip(both, apart):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, both)), leaves),
                         torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, apart)), leaves)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v, a, t: decode_with_aux(v, indices, a, aux_indices, t), leaves)


def test_touched_row_buffers_come_in_few_sizes():
    """scatter_rows equals scatter_outer over the used columns, in a buffer of row_capacity rows:
    at most 1/32 more than asked, the same for counts that differ a little (so a heap that keeps
    freed memory reuses last step's block), never fewer."""
    caps = [sparse.row_capacity(r) for r in range(1, 5000)]
    assert all(r <= c <= r * 33 / 32 for r, c in zip(range(1, 5000), caps))
    assert caps == sorted(caps) and len(set(caps[2000:4000])) < 40
    assert sparse.row_capacity(200_000) == sparse.row_capacity(198_000) == 200_704
    g = torch.Generator().manual_seed(2)
    p = sparse.fixed_pattern(torch.randint(0, 500, (40, 3), generator=g), 500)
    w, src = torch.randn(120, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    ids, local, _ = sparse.compact_cols(p)
    rows = sparse.scatter_rows(local, w, src)
    assert rows.shape == (ids.shape[0], 6)
    assert rows.untyped_storage().nbytes() == 8 * 6 * sparse.row_capacity(ids.shape[0])
    torch.testing.assert_close(rows, sparse.scatter_outer(p, w, src)[ids], rtol=1e-12, atol=1e-12)


def test_compact_cols_renumbers_the_pattern_and_more_ids_into_one_union():
    """The pattern's columns and the extra id arrays (AuxK's blocks) share one ascending set of
    ids, and every entry's new number points back at its own id."""
    p = sparse.fixed_pattern(torch.tensor([[5, 1], [1, 9]]), 12)
    more = torch.tensor([9, 3]), torch.tensor([7])
    ids, local, at = sparse.compact_cols(p, *more)
    assert ids.tolist() == [1, 3, 5, 7, 9] and local.n_cols == 5
    assert ids[local.cols].tolist() == p.cols.tolist() and [ids[a].tolist() for a in at] == [[9, 3], [7]]
    assert torch.equal(local.rows, p.rows) and torch.equal(local.row_ptr, p.row_ptr)


def test_sparse_decode_gradcheck():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[1, 6, 2], [6, 0, 7], [3, 1, 6], [0, 2, 4], [5, 6, 1]])
    assert torch.autograd.gradcheck(lambda v, t: sparse_decode(v, indices, t), (values, table))


# -- TopK tie rule ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_largest_bounds_the_row_and_equals_torch_topk(dtype, monkeypatch):
    """`largest` returns torch.topk's values (and, without ties, indices) without running
    torch.topk on whole rows, but for rows with more than half their entries tied at the bound
    (those rows alone); a NaN row falls back to torch.topk on the whole batch."""
    widths, rows, real_topk = [], [], torch.topk

    def spy(t, k, *args, **kwargs):
        widths.append(t.shape[-1])
        rows.append(t.shape[0])
        return real_topk(t, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    g = torch.Generator().manual_seed(8)
    for T, n, k in [(64, 1536, 33), (9, 100, 3), (5, 40, 2), (3, 1601, 1)]:
        acts = torch.randn(T, n, generator=g, dtype=torch.float64).clamp_min(0).to(dtype)
        widths.clear()
        values, indices = torch_topk.largest(acts, k)
        want = real_topk(acts, k, dim=-1)
        assert torch.equal(values, want.values)
        assert torch.equal(torch.gather(acts, 1, indices), want.values)
        if dtype != torch.bfloat16:  # continuous values: no ties, the same indices
            assert torch.equal(indices, want.indices)
        assert all(w < n // 2 for w in widths), f"torch.topk ran on widths {widths} of rows {n} wide"
    acts = torch.randn(64, 1536, generator=g, dtype=torch.float64).clamp_min(0).to(dtype)
    acts[[3, 40], 40:] = 0.0  # crowded: fewer than k positive entries, more than half tied at 0
    widths.clear()
    values, indices = torch_topk.largest(acts, 33)
    assert rows[-1:] == [2] and widths[-1:] == [acts.shape[1]], "the crowded rows alone go to torch.topk"
    want = real_topk(acts, 33, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(torch.gather(acts, 1, indices), want.values)
    acts[0, 5] = float("nan")
    widths.clear()
    values, indices = torch_topk.largest(acts, 1)
    assert widths == [acts.shape[1]], "the NaN row did not fall back to torch.topk"
    assert torch.equal(indices, real_topk(acts, 1, dim=-1).indices) and torch.isnan(values[0, 0])


def test_largest_falls_back_on_nans_anywhere_in_the_row():
    """torch.topk ranks NaN above everything: a NaN inside a block or in the n mod 2k columns the
    block maxima do not cover must send the selection to torch.topk."""
    g = torch.Generator().manual_seed(10)
    acts = torch.randn(50, 405, generator=g)  # k = 5: 10 blocks of 40 cover 400 columns
    for row, col in [(40, 3), (10, 402)]:
        nan = acts.clone()
        nan[row, col] = float("nan")
        assert torch.equal(torch_topk.largest(nan, 5)[1], torch.topk(nan, 5, dim=-1).indices)


def test_topk_values_carry_gradient():
    acts = torch.tensor([[0.5, 2.0, 2.0, 1.0]], requires_grad=True)
    values, indices = be.topk(acts, 2)
    assert indices.tolist() == [[1, 2]]
    values.sum().backward()
    assert acts.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_fused_update_works_block_by_block_on_a_large_decoder():
    """The optimiser projects, clips and renormalises decoders in ~2 MiB blocks: a decoder
    spanning several blocks (and a short last one) gets core's update."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(3, 700, 768, generator=g, dtype=torch.float64)  # 12.3 MiB: 7 blocks
    params = {"W_dec": W / torch.linalg.vector_norm(W, dim=-1, keepdim=True),
              "b_pre": torch.randn(768, generator=g, dtype=torch.float64)}
    grads = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    assert len(optim._row_blocks(params["W_dec"])) > 2
    state = adam_init(params, torch_xp)
    want, _ = _core_update(params, grads, state, 1e-2, 1e-1, torch_xp)
    got, _ = optim.fused_update({n: p.clone() for n, p in params.items()},
                                {n: t.clone() for n, t in grads.items()}, state, 1e-2, 1e-1)
    for n in params:
        assert_fast(got[n], want[n], n, 1e-12)


# -- fused optimiser step vs core's ---------------------------------------------------------

def _core_update(params, grads, state, lr, max_grad_norm, xp):
    """core.train_step's optimiser half, op for op."""
    if max_grad_norm is not None:
        grads = clip_by_global_norm(grads, max_grad_norm, xp)
    decoders = [n for n in DECODERS if n in params]
    grads = dict(grads, **{n: remove_parallel_grad(grads[n], params[n], xp) for n in decoders})
    params, state = adam_update(params, grads, state, lr, xp)
    return dict(params, **{n: normalize_decoder(params[n], xp) for n in decoders}), state


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 2e-6)])
@pytest.mark.parametrize("max_grad_norm", [None, 1e-2, 1e6])
def test_fused_update_equals_core_update(dtype, rtol, max_grad_norm):
    """Three steps, gradients large enough that clipping acts at 1e-2 and not at 1e6; a shared
    expert so both decoders are projected and renormalised.  float32 tolerance: the fused Adam
    divides by 1/scale where core multiplies by scale, plus a different reduction order."""
    cfg = SwitchSAEConfig(d_in=8, n_latents=24, n_experts=3, k=3, shared_latents=4, shared_k=1,
                          encoder_bias=True)
    rng = np.random.default_rng(5)
    params = {n: be.asarray(p, dtype) for n, p in init_params(cfg, 0).items()}
    ref_params = {n: p.clone() for n, p in params.items()}
    state, ref_state = adam_init(params, be.xp), adam_init(ref_params, be.xp)
    for _ in range(3):
        grads = {n: be.asarray(rng.normal(size=p.shape), dtype) for n, p in params.items()}
        ref_grads = {n: g.clone() for n, g in grads.items()}
        ref_params, ref_state = _core_update(ref_params, ref_grads, ref_state, 1e-2, max_grad_norm, be.xp)
        params, state = be.update(params, grads, state, 1e-2, max_grad_norm)
    assert state.step == ref_state.step == 3
    for n in params:
        for got, want, what in ((params[n], ref_params[n], "param"), (state.m[n], ref_state.m[n], "m"),
                                (state.v[n], ref_state.v[n], "v")):
            assert_fast(got, want, f"{what} {n} (clip {max_grad_norm})", rtol)


def test_latent_major_encoder_changes_layout_not_values():
    """After `update`, W_enc is stored latent-major; its gradients come back in that layout (no
    transposed copies) and equal those of the contiguous W_enc."""
    cfg = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4, encoder_bias=True)
    params = {n: be.asarray(p, "float64") for n, p in init_params(cfg, 0).items()}
    x = be.asarray(np.random.default_rng(8).normal(size=(40, 16)))
    _, grads = be.loss_and_grads(params, x, cfg)
    assert grads["W_enc"].stride() == params["W_enc"].stride()
    new, state = be.update(params, grads, adam_init(params, be.xp), 1e-3)
    W = new["W_enc"]
    assert W.transpose(1, 2).is_contiguous() and W.stride() == state.m["W_enc"].stride()
    contiguous = dict(new, W_enc=W.contiguous())
    out_a, grads_a = be.loss_and_grads(new, x, cfg)
    out_b, grads_b = be.loss_and_grads(contiguous, x, cfg)
    assert grads_a["W_enc"].stride() == W.stride()
    assert_fast(out_a.x_hat, out_b.x_hat, "x_hat", 1e-12)
    for n in grads_a:
        assert_fast(grads_a[n], grads_b[n], f"grad {n}", 1e-12)


def test_latent_major_rearranges_a_contiguous_encoder_in_place():
    W = torch.randn(3, 5, 4, dtype=torch.float64)
    want = W.clone()
    got = latent_major(W)
    assert got.data_ptr() == W.data_ptr() and got.transpose(1, 2).is_contiguous()
    assert torch.equal(got, want) and latent_major(got) is got


def test_update_is_in_place():
    cfg = SwitchSAEConfig(d_in=8, n_latents=16, n_experts=2, k=2)
    params = {n: be.asarray(p, "float32") for n, p in init_params(cfg, 0).items()}
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    W_dec = params["W_dec"]
    new, _ = be.update(params, grads, adam_init(params, be.xp), 1e-3)
    assert new["W_dec"] is W_dec


# -- no (batch, n_latents) or (batch, N, m) tensor in a train step --------------------------

class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every dense tensor an ATen op returns (autograd's backward included):
    `shapes`, and `allocated`, those not sharing memory with an input (no views, no in-place)."""

    def __init__(self):
        super().__init__()
        self.shapes, self.allocated = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.shapes.append(tuple(t.shape))
                if t.untyped_storage().data_ptr() not in inputs:
                    self.allocated.append(tuple(t.shape))
        return out


def _step_shapes(backend, cfg, batch, use_update):
    params = {n: backend.asarray(p, "float32") for n, p in init_params(cfg, 0).items()}
    x = backend.asarray(np.random.default_rng(6).normal(size=(batch, cfg.d_in)), "float32")
    dead = backend.asarray(np.random.default_rng(7).random(cfg.total_latents) < 0.5)
    state = adam_init(params, backend.xp)
    with AllocationRecorder() as rec:
        if use_update:
            _, grads = backend.loss_and_grads(params, x, cfg, dead)
            backend.update(params, grads, state, 1e-3)
        else:
            train_step(backend, cfg, params, state, x, 1e-3, dead)
    return rec.shapes


def _too_big(shapes, batch, cfg):
    """Shapes with at least batch * n_latents / 2 elements (a (batch, M) or (batch, N, m) tensor
    is one; the largest legitimate ones are (batch, e*m) = batch * M / 4 here)."""
    return [s for s in shapes if np.prod(s, dtype=np.int64) >= batch * cfg.n_latents // 2]


NO_DENSE_CONFIGS = {
    "auxk_bias": {"auxk_coef": 1 / 32, "k_aux": 8, "encoder_bias": True},
    "two_experts_shared": {"experts_per_token": 2, "shared_latents": 16, "shared_k": 1},
}


@pytest.mark.parametrize("use_update", [False, True], ids=["core_train_step", "fused_update"])
@pytest.mark.parametrize("variant", list(NO_DENSE_CONFIGS))
def test_train_step_never_allocates_batch_by_latents(variant, use_update):
    batch = 256  # > d_in, so parameters and Adam moments (M * d) stay below batch * M
    cfg = SwitchSAEConfig(d_in=16, n_latents=512, n_experts=8, k=4, **NO_DENSE_CONFIGS[variant])
    shapes = _step_shapes(be, cfg, batch, use_update)
    e_m = cfg.experts_per_token * cfg.expert_width
    assert (batch, e_m) in shapes, "the recorder missed the (batch, e*m) pre-activations"
    assert (cfg.n_latents, cfg.d_in) in shapes, "the recorder missed the decoder gradient"
    assert not _too_big(shapes, batch, cfg), f"dense (batch, latents)-sized tensors: {_too_big(shapes, batch, cfg)}"


def test_allocation_check_catches_the_dense_reference_encoder():
    """The same check fails on the spec's dense reference encode (which builds (batch, N, m))."""

    class DenseEncode(TorchBackend):
        encode = ReferenceHooks.encode
        encode_topk = ReferenceHooks.encode_topk  # the standard-ops hooks, calling encode above
        encode_topk_aux = ReferenceHooks.encode_topk_aux

    cfg = SwitchSAEConfig(d_in=16, n_latents=512, n_experts=8, k=4)
    shapes = _step_shapes(DenseEncode(), cfg, 256, use_update=True)
    assert (256, 8, 64) in _too_big(shapes, 256, cfg)


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_lazy_train_step_allocates_no_dictionary_sized_gradient(optimizer):
    """Lazy-Adam torch steps (the first, which makes W_enc latent-major in place, and the next)
    allocate nothing of (M, d) size: the latent-row gradients come as the touched rows (at most
    batch * (k + k_aux) = 192 < M / 2 here).  The dense step, recorded the same way, allocates
    its (N, m, d) gradients: the check can fail."""
    cfg = SwitchSAEConfig(d_in=64, n_latents=512, n_experts=8, k=4, auxk_coef=1 / 32, k_aux=4,
                          encoder_bias=True)
    params = {n: be.asarray(p, "float32") for n, p in init_params(cfg, 0).items()}
    x = be.asarray(np.random.default_rng(6).normal(size=(24, cfg.d_in)), "float32")
    dead = be.asarray(np.random.default_rng(7).random(cfg.total_latents) < 0.5)
    state = adam_init(params, be.xp)
    with AllocationRecorder() as rec:
        for _ in range(2):
            params, state, _ = train_step(be, cfg, params, state, x, 1e-3, dead, optimizer=optimizer)
    assert params["W_enc"].transpose(1, 2).is_contiguous()
    big = [s for s in rec.allocated if np.prod(s, dtype=np.int64) >= cfg.n_latents * cfg.d_in // 2]
    if optimizer == "adam":
        assert (cfg.n_latents, cfg.d_in) in big, "the recorder missed the dense (M, d) gradients"
        return
    assert not big, f"dictionary-sized allocations in a lazy step: {big}"
    rows = [s for s in rec.allocated if len(s) == 2 and s[1] == cfg.d_in and 4 < s[0] <= 192]
    assert rows, "the recorder missed the (touched rows, d) gradients"


@pytest.mark.parametrize("one_pass", [False, True], ids=["eager_rows", "one_pass_rows"])
@pytest.mark.parametrize("runs", [False, True], ids=["auxk_gathers", "auxk_dense_runs"])
def test_lazy_fast_path_equals_core_lazy_update(runs, one_pass, monkeypatch):
    """Three lazy steps through the row collection and the in-place row update (in blocks of 5
    rows, so several blocks), eager or in one compiled pass (`lazy._rows_step`, made to apply at
    this size), equal core's mask-based reference (apply_lazy_update) on the same torch float64
    gradients, clipping active (1e-2) and not, with AuxK in either form (its dense runs: every
    dead latent may be kept); float64: only summation order differs."""
    from switchsae.core.train_step import apply_lazy_update

    monkeypatch.setattr(lazy, "ROW_BLOCK", 5)
    monkeypatch.setattr(lazy, "ONE_PASS_MIN_ENTRIES", 0 if one_pass else 1 << 62)
    _auxk_as_runs(monkeypatch, runs)
    cfg = SwitchSAEConfig(d_in=16, n_latents=128, n_experts=4, k=4, auxk_coef=0.5, k_aux=32 if runs else 6,
                          encoder_bias=True, shared_latents=8, shared_k=1)
    rng = np.random.default_rng(12)
    dead = be.asarray(rng.random(cfg.total_latents) < 0.4)
    for clip in (1e-2, None):
        fast = {n: be.asarray(p, "float64") for n, p in init_params(cfg, 1).items()}
        ref = {n: p.clone() for n, p in fast.items()}
        fast_state, ref_state = adam_init(fast, be.xp), adam_init(ref, be.xp)
        for _ in range(3):
            x = be.asarray(rng.normal(size=(20, 16)))
            _, ref_grads = be.loss_and_grads(ref, x, cfg, dead)
            ref, ref_state = apply_lazy_update(be.xp, ref, ref_grads, ref_state, 1e-2, clip)
            _, rows = be.loss_and_row_grads(fast, x, cfg, dead)
            assert isinstance(rows["W_dec"], lazy.Rows) and rows["W_dec"].ids.shape[0] < cfg.n_latents
            assert lazy._one_pass(fast["W_dec"]) == one_pass
            fast, fast_state = be.lazy_update(fast, rows, fast_state, 1e-2, clip)
        for n in fast:
            for got, want, what in ((fast[n], ref[n], "param"), (fast_state.m[n], ref_state.m[n], "m"),
                                    (fast_state.v[n], ref_state.v[n], "v")):
                assert_fast(got, want, f"{what} {n} (clip {clip})", 1e-12)


def test_one_pass_rows_can_be_turned_off(monkeypatch):
    """$SWITCHSAE_ONE_PASS_ROWS=0 keeps lazy Adam on the eager update (no torch.compile) at any size."""
    monkeypatch.setattr(lazy, "ONE_PASS_MIN_ENTRIES", 0)
    W_dec = torch.zeros(2, 4, 8)
    monkeypatch.setenv(lazy.ONE_PASS_ENV_VAR, "0")
    assert not lazy._one_pass(W_dec)
    monkeypatch.setenv(lazy.ONE_PASS_ENV_VAR, "1")
    assert lazy._one_pass(W_dec)


def test_one_pass_rows_fall_back_when_they_cannot_compile(monkeypatch):
    """Where torch.compile fails (no C++ compiler, say) the one-pass row update is off, with a
    warning naming the failure, and lazy Adam takes the eager blocked update."""
    def failing_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*blocked eager update"):
        assert lazy._compiled_rows.__wrapped__() is None


# -- arrays and devices -------------------------------------------------------------------------

def test_conversions_and_scatter_add():
    a = np.array([[1.0, 2.5], [-3.0, 1e-3]])
    assert be.asarray(a).dtype == torch.float64 and be.asarray(a).device == be.device
    b = be.asarray(a, "bfloat16")
    assert b.dtype == torch.bfloat16
    back = be.to_numpy(b)
    assert back.dtype == np.float32 and np.allclose(back, a, rtol=2**-8)
    assert be.asarray(np.array([True, False])).dtype == torch.bool
    assert be.asarray(torch.ones(2, dtype=torch.float64), "float32").dtype == torch.float32
    with pytest.raises(TypeError, match="int8"):
        be.asarray(a, "int8")
    out = be.scatter_add(torch.zeros(4), torch.tensor([1, 3, 1]), torch.tensor([1.0, 2.0, 4.0]))
    assert out.tolist() == [0.0, 5.0, 0.0, 2.0]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_cpu_backend_keeps_freed_memory_for_reuse(monkeypatch):
    """After a CPU backend exists, a freed 64 MiB block stays resident and the next one reuses it
    (glibc's default hands it back and page-faults a new one in)."""
    from switchsae.backends.torch.device import KEEP_FREED_ENV_VAR, keep_freed_cpu_memory

    assert be.device.type == "cpu" and keep_freed_cpu_memory()

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    first = torch.ones(16 * 2**20)
    del first
    before = rss()
    second = torch.ones(16 * 2**20)
    assert rss() - before < 8 * 2**20, "the freed block was not reused"
    del second
    monkeypatch.setenv(KEEP_FREED_ENV_VAR, "0")
    assert keep_freed_cpu_memory.__wrapped__() is False


def test_device_selection(monkeypatch):
    monkeypatch.setenv("SWITCHSAE_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    assert TorchBackend().device == torch.device("cpu")
    monkeypatch.setenv("SWITCHSAE_DEVICE", "not-a-device")
    with pytest.raises(DeviceError, match="SWITCHSAE_DEVICE"):
        select_device()
    monkeypatch.delenv("SWITCHSAE_DEVICE")
    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            select_device("cuda")
