"""The Triton kernels of the torch backend, run by Triton's interpreter on CPU tensors and compared
with the torch (embedding_bag / CSR) path of `sparse.py`.

TRITON_INTERPRET must be set before triton is imported, so the checks run in a fresh Python
(this file as a script); each pytest test reports one check.

Tolerances: float32 -- both accumulate <= 12 products in float32 in different orders: 1e-5 of
the result's scale.  bfloat16 -- both accumulate in float32 and round the result once, so they
differ by at most one bfloat16 ulp: 2**-7 of the scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

CHECKS = ["gather_sum", "sampled_dot", "scatter_outer", "decode_function", "encode_backward"]


def _inputs(torch, dtype):
    """A pattern with empty rows and repeated columns, plus weights, a table and src rows."""
    from switchsae.backends.torch import sparse

    g = torch.Generator().manual_seed(0)
    n_rows, n_cols, d = 10, 30, 200  # d spans two BLOCK_D blocks, the second partial; row 9 empty
    rows = torch.tensor([0, 0, 0, 2, 2, 3, 5, 5, 5, 5, 8])
    cols = torch.tensor([4, 29, 8, 4, 0, 4, 1, 7, 28, 2, 4])
    p = sparse.row_pattern(rows, cols, n_rows, n_cols)
    w = torch.randn(rows.shape[0], generator=g).to(dtype)
    table = torch.randn(n_cols, d, generator=g).to(dtype)
    src = torch.randn(n_rows, d, generator=g).to(dtype)
    return p, w, table, src


def _close(torch, got, want, dtype, what):
    scale = max(want.double().abs().max().item(), 1e-12)
    err = (got.double() - want.double()).abs().max().item()
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert err <= rtol * scale, f"{what} ({dtype}): max error {err:.3g} vs scale {scale:.3g}"


def _run_check(name):
    import torch
    from switchsae.backends.torch import sparse
    from switchsae.backends.torch import triton_kernels as tk

    ref = sparse._TorchImpl
    for dtype in (torch.float32, torch.bfloat16):
        p, w, table, src = _inputs(torch, dtype)
        if name == "gather_sum":
            _close(torch, tk.gather_sum(p, w, table), ref.gather_sum(p, w, table), dtype, name)
        elif name == "scatter_outer":  # gather_sum over the transposed pattern
            got = [_with_impl(sparse, impl, sparse.scatter_outer, p, w, src) for impl in (tk, ref)]
            _close(torch, got[0], got[1], dtype, name)
        elif name == "sampled_dot":
            _close(torch, tk.sampled_dot(p, src, table), ref.sampled_dot(p, src, table), dtype, name)
        else:
            _check_functions(torch, sparse, tk, dtype, name)


def _check_functions(torch, sparse, tk, dtype, name):
    """The autograd Functions with the Triton kernels in place of the torch path."""
    from switchsae.backends.torch.decode import decode as sparse_decode
    from switchsae.backends.torch.encode import ExpertEncode

    g = torch.Generator().manual_seed(1)
    if name == "decode_function":
        values = torch.randn(6, 3, generator=g).to(dtype).requires_grad_()
        table = torch.randn(10, 40, generator=g).to(dtype).requires_grad_()
        indices = torch.tensor([[1, 9, 2], [9, 0, 7], [3, 1, 9], [0, 2, 4], [5, 9, 1], [8, 6, 3]])
        run = lambda: sparse_decode(values, indices, table)
        leaves = (values, table)
    else:
        x = torch.randn(8, 16, generator=g).to(dtype).requires_grad_()
        W = torch.randn(3, 16, 8, generator=g).to(dtype).requires_grad_()
        expert = torch.tensor([2, 0, 2, 2, 0, 2, 0, 0])
        run = lambda: torch.topk(ExpertEncode.apply(x, W, None, expert), 3).values
        leaves = (x, W)
    def forward_backward():
        out = run()
        return (out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out)))

    results = [_with_impl(sparse, impl, forward_backward) for impl in (sparse._TorchImpl, tk)]
    for what, got, want in zip(("output", "grad 0", "grad 1"), results[1], results[0]):
        _close(torch, got, want, dtype, f"{name} {what}")


def _with_impl(sparse, impl, fn, *args):
    """fn(*args) with every sparse product routed to `impl` (the Triton module or the torch path)."""
    chosen = sparse._impl
    sparse._impl = lambda t: impl
    try:
        return fn(*args)
    finally:
        sparse._impl = chosen


def _main():
    """Run every check; print {check: "ok" | traceback} as JSON."""
    results = {}
    for name in CHECKS:
        try:
            _run_check(name)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 -- any failure is reported by its pytest test
            results[name] = traceback.format_exc()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", CHECKS)
def test_triton_kernel_matches_torch_path(interpreted_results, check):
    assert interpreted_results[check] == "ok", interpreted_results[check]


if __name__ == "__main__":
    _main()
