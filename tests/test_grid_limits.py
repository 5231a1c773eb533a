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
    assert bh_grid(7, 16, 4200) == (7, 16, 4200)
    assert bh_grid(0, 1, MAX_GRID_YZ) == (0, 1, MAX_GRID_YZ)
    with pytest.raises(ValueError, match="at most 65535 sequences.*got 65536 sequences of 2 heads"):
        bh_grid(1, 2, MAX_GRID_YZ + 1)


def test_too_many_sequences_raise_clearly():
    q = torch.randn(MAX_GRID_YZ + 1, 1, 1, 16, dtype=torch.float16, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="at most 65535 sequences"):
        out = ioattn.flash_attn_func(q, q, q)  # the Gluon forward has a 1D grid: then its backward raises
        out.sum().backward()


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
