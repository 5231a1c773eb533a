"""The backward's preprocess kernel: delta = rowsum(O * dO) per (batch, head, row), and, with ZERO_DQ, the
same rows of the fp32 dQ buffer zeroed (the Gluon backward's dense path takes that in place of a fill)."""

import pytest
import torch
from conftest import DEVICE

from ioattn.kernels.fastlaunch import cdiv
from ioattn.kernels.launch import _launch_preprocess


@pytest.mark.parametrize("zero_dq", [False, True])
@pytest.mark.parametrize("d, block_d", [(64, 64), (48, 64)])
@pytest.mark.parametrize("bh_axes", [False, True])
def test_preprocess_delta_and_dq_zeroing(zero_dq, d, block_d, bh_axes):
    """Either grid form of ``bh_grid``: (row blocks, batch x heads) or (row blocks, heads, batch)."""
    # With ZERO_DQ (and ZERO_DONE), also the per-(batch, head) counts zeroed, and nothing past them.
    torch.manual_seed(0)
    b, s, h, block_m = 2, 37, 3, 16
    out, dout = (torch.randn(b, s, h, d, device=DEVICE, dtype=torch.float16) for _ in range(2))
    delta = torch.full((b, h, s), float("nan"), device=DEVICE)
    # dQ as a view with strides of its own (not out's) inside a NaN buffer: what lies outside must stay NaN
    buf = torch.full((b, h, s, d + 8), float("nan"), device=DEVICE)
    dq = buf.transpose(1, 2)[..., :d]
    done = torch.full((b * h + 1,), 7, device=DEVICE, dtype=torch.int32)
    _launch_preprocess(
        (cdiv(s, block_m), h, b) if bh_axes else (cdiv(s, block_m), b * h), out, dout, delta, out, dq, done,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        delta.stride(0), delta.stride(1), dq.stride(0), dq.stride(1), dq.stride(2), h, s,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, IS_VARLEN=False, ZERO_DQ=zero_dq, ZERO_DONE=zero_dq,
        BH_AXES=bh_axes)
    want = (out.float() * dout.float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-3)
    assert buf[..., d:].isnan().all()
    if zero_dq:
        assert torch.equal(dq, torch.zeros_like(dq))
        assert done[:-1].eq(0).all() and done[-1] == 7
    else:
        assert dq.isnan().all()
        assert done.eq(7).all()
