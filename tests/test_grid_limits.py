"""Batches whose sequences x heads pass CUDA's 65535 limit on a grid's second axis.

The attention kernels take (blocks, heads, sequences) grids, so sequences x heads may be anything as long as
each of the two stays within 65535 (flash-attn's limit too); past it a call raises a clear ``ValueError``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU

import ioattn
from ioattn.kernels.common import MAX_GRID_YZ, bh_grid
from ioattn.reference import attention_ref


def test_bh_grid():
    """Sequences x heads on the second axis while it fits there, else an axis each."""
    assert bh_grid(7, 16, 4095) == (7, 65520)
    assert bh_grid(7, 16, 4200) == (7, 16, 4200)
    assert bh_grid(0, 1, MAX_GRID_YZ) == (0, MAX_GRID_YZ)
    assert bh_grid(3, 2, MAX_GRID_YZ) == (3, 2, MAX_GRID_YZ)
    with pytest.raises(ValueError, match="at most 65535 sequences.*got 65536 sequences of 2 heads"):
        bh_grid(1, 2, MAX_GRID_YZ + 1)


@pytest.mark.parametrize("form", ["sequences", "heads", "varlen"])
def test_too_many_sequences_or_heads_raise_before_any_kernel(form, monkeypatch):
    """Past the bound the call raises at once, forward included (the d = 128 Gluon forward's one-axis grid
    could run, but its backward could not)."""
    from ioattn.kernels.fastlaunch import Launcher

    monkeypatch.setattr(Launcher, "__call__", lambda *a, **k: pytest.fail("a kernel launched"))
    n = MAX_GRID_YZ + 1
    with pytest.raises(ValueError, match="at most 65535 sequences and 65535 heads"):
        if form == "varlen":
            q = torch.randn(n, 1, 16, dtype=torch.float16, device=DEVICE)
            cu = torch.arange(n + 1, dtype=torch.int32, device=DEVICE)
            ioattn.flash_attn_varlen_func(q, q, q, cu, cu, 1, 1)
        else:
            shape = (n, 1, 1, 16) if form == "sequences" else (1, 1, n, 16)
            q = torch.randn(*shape, dtype=torch.float16, device=DEVICE)
            ioattn.flash_attn_func(q, q, q)


@pytest.mark.skipif(not ON_GPU, reason="tens of thousands of programs: too slow for the interpreter")
@pytest.mark.parametrize("dtype,deterministic,d", [(torch.bfloat16, False, 64), (torch.bfloat16, False, 128),
                                                   (torch.bfloat16, True, 128), (torch.bfloat16, False, 256),
                                                   (torch.float32, False, 64)])
def test_dense_past_65535_programs_a_row(dtype, deterministic, d):
    """4200 sequences x 16 heads = 67200 (batch x heads), causal, forward and backward."""
    torch.manual_seed(0)
    b, s, h = 4200, 16, 16
    q, k, v = (torch.randn(b, s, h, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    out = ioattn.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q32, k32, v32, causal=True, upcast=False)[0]
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for got, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), r, atol=5 * tol, rtol=5 * tol)


@pytest.mark.skipif(not ON_GPU, reason="tens of thousands of programs: too slow for the interpreter")
def test_varlen_past_65535_programs_a_row():
    """5000 sequences of 1-40 tokens x 16 heads, forward and backward against the reference per sequence."""
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 41, (5000,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).to(DEVICE)
    total = int(lens.sum())
    q, k, v = (torch.randn(total, 16, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, 40, 40, causal=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    # The reference on the batch padded to (5000, 40) with zeros: under the causal mask a sequence's rows
    # never reach its padding, and the padding's rows take a zero dout, so they add no gradient.
    pos = torch.arange(40, device=DEVICE)
    valid = pos[None, :] < lens.to(DEVICE)[:, None]
    idx = (cu[:-1, None].long() + pos[None, :]).clamp(max=total - 1)

    def pad(t):
        return t.detach().float()[idx] * valid[..., None, None]

    qp, kp, vp = (pad(t).requires_grad_() for t in (q, k, v))
    ref = attention_ref(qp, kp, vp, causal=True, upcast=False)[0]
    ref_grads = torch.autograd.grad(ref, (qp, kp, vp), pad(dout))
    torch.testing.assert_close(out.float()[idx][valid], ref[valid], atol=2e-2, rtol=2e-2)
    for got, r in zip((dq, dk, dv), ref_grads, strict=True):
        torch.testing.assert_close(got.float()[idx][valid], r[valid], atol=1e-1, rtol=1e-1)


@pytest.mark.parametrize("opts", [
    dict(causal=True), dict(causal=True, deterministic=False), dict(dropout_p=0.3),
    dict(window_size=(5, 9), softcap=10.0), dict(deterministic=True),
    dict(varlen=True, causal=True), dict(alibi=True),
])
@pytest.mark.parametrize("d", [64, 128] + ([256] if ON_GPU else []))
def test_three_axis_grids_match_two(monkeypatch, opts, d):
    """Every kernel's three-axis variant (forced with a small limit) against its two-axis one, forward and
    backward: equal bit for bit (the backward deterministic), or within rounding where dQ is summed by
    atomics in whatever order."""
    import ioattn.kernels.common as common

    opts = dict(opts)
    varlen = opts.pop("varlen", False)
    det = opts.setdefault("deterministic", True)
    b, s, h, hk = 3, (40 if ON_GPU else 19), 4, 2
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, s, n, d, generator=g).to(DEVICE, dtype) for n in (h, hk, hk))
    dout = torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(h, generator=g).to(DEVICE) * 0.3
    cu = torch.tensor([0, s, 2 * s, 3 * s], dtype=torch.int32, device=DEVICE)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(11)
        if varlen:
            flat = [t.flatten(0, 1) for t in leaves]
            out = ioattn.flash_attn_varlen_func(*flat, cu, cu, s, s, **opts).view(b, s, h, d)
        else:
            out = ioattn.flash_attn_func(*leaves, **opts)
        return (out, *torch.autograd.grad(out, leaves, dout))

    two = run()
    monkeypatch.setattr(common, "MAX_GRID_YZ", 5)  # 3 sequences x 4 heads (x 2 KV heads) now take three axes
    assert common.bh_grid(1, h, b) == (1, h, b)
    three = run()
    for a, c in zip(two, three, strict=True):
        if det:
            torch.testing.assert_close(c, a, rtol=0, atol=0)
        else:
            torch.testing.assert_close(c, a)
