"""The Gluon backward's tail split on the host: how many pieces the last wave's key blocks take
(``tail_split``), and the kernel that sums the pieces into dK, dV (``tail_sum_kernel``, portable Triton: the
interpreter on CPU). The split kernel itself is GPU-only (tests/test_gluon_bwd.py)."""

import pytest
import torch
from conftest import DEVICE

from ioattn.kernels.attn_bwd_gluon import tail_split, tail_sum_kernel


@pytest.mark.parametrize("tiles,sms,steps,split", [
    (2048, 132, 256, 7),  # d = 128, 16k: 68 blocks left; 476 sevenths in 4 rounds (0.63 of a block)
    (2048, 132, 128, 5),  # 8k: fifths in 3 rounds
    (2048, 132, 32, 1),  # 2k: pieces of 16 steps would pay more than they save
    (4096, 132, 128, 8),  # d = 64, 16k: 4 blocks left, eighths in one round
    (4096, 132, 16, 1),  # d = 64, 2k: a piece needs 16 steps
    (264, 132, 256, 1),  # whole waves
    (100, 132, 256, 1),  # one partial wave: nothing to balance
    (16, 5, 128, 5),  # the GPU tests' forced case
])
def test_tail_split(tiles, sms, steps, split):
    assert tail_split(tiles, sms, steps) == split


def test_tail_split_never_longer():
    """The chosen split's tail (rounds times piece length with its fixed cost) is never longer than one
    whole key block."""
    for tiles in range(132, 700, 7):
        for steps in (16, 40, 64, 128, 256, 1024):
            split = tail_split(tiles, 132, steps)
            rounds = -(-(tiles % 132) * split // 132)
            assert split == 1 or rounds * (steps / split + 4) < steps


@pytest.mark.parametrize("layout", ["dense", "strided"])
def test_tail_sum_kernel(layout):
    """Each split key block's dK, dV is the sum of its pieces, cast to the gradient's dtype; keys past
    seqlen_k and every whole key block are left alone."""
    torch.manual_seed(0)
    batch, seqlen_k, nheads_k, d, block_n, split = 2, 300, 3, 32, 64, 3
    n_kb = -(-seqlen_k // block_n)
    tiles = n_kb * batch * nheads_k
    n_whole = tiles - 4
    dtype = torch.float16
    shape = (batch, seqlen_k, nheads_k, d)
    if layout == "dense":
        dk = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)
        dv = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)
    else:  # the (b, s, 2, h, d) packed layout's views
        packed = torch.full((batch, seqlen_k, 2, nheads_k, d), 7.0, dtype=dtype, device=DEVICE)
        dk, dv = packed[:, :, 0], packed[:, :, 1]
    parts = torch.randn((tiles - n_whole) * split, 2, block_n, d, device=DEVICE)
    tail_sum_kernel[(tiles - n_whole, block_n // 16)](
        parts, dk, dv, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        n_whole, split, n_kb, nheads_k, seqlen_k, BLOCK_N=block_n, HEAD_DIM=d, ROWS=16)
    want_k = torch.full(shape, 7.0, dtype=dtype)
    want_v = torch.full(shape, 7.0, dtype=dtype)
    sums = parts.cpu().view(tiles - n_whole, split, 2, block_n, d).sum(1)
    for r in range(tiles - n_whole):
        tile = n_whole + r
        pid_n, bhk = tile % n_kb, tile // n_kb
        b, hk = bhk // nheads_k, bhk % nheads_k
        rows = slice(pid_n * block_n, min((pid_n + 1) * block_n, seqlen_k))
        n = rows.stop - rows.start
        want_k[b, rows, hk] = sums[r, 0, :n].to(dtype)
        want_v[b, rows, hk] = sums[r, 1, :n].to(dtype)
    torch.testing.assert_close(dk.cpu(), want_k, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(dv.cpu(), want_v, atol=1e-3, rtol=1e-3)


def test_backward_step_loops_on_the_host(monkeypatch):
    """Which builds walk a band's steps in nested loops (``BwdConfig.nested``, flag ``NESTED``): causal inputs
    and windows, not dense inputs, not the d = 128 softcap and dropout configs (flat there), never with the
    tail split (its pieces start mid-head). Shapes only, CPU tensors."""
    from ioattn.kernels import attn_bwd_gluon

    select = attn_bwd_gluon.select_config
    assert select(128, True, False).nested == 0 and select(128, False, True).nested == 0
    assert select(128, False, False).nested == 1 and select(64, True, False).nested == 1
    assert select(64, False, True).nested == 1
    monkeypatch.setattr(attn_bwd_gluon, "_num_sms", lambda device: 5)

    def flags(d, window, softcap=0.0, dropout=0.0, seqlen=4096):
        q = torch.zeros(2, seqlen, 4, d, dtype=torch.bfloat16)
        launches, _, _ = attn_bwd_gluon.gluon_backward_launches(
            q, q, q, q, torch.zeros(2, 4, seqlen), q, q, q.float(), None, batch=2, max_seqlen_q=seqlen,
            max_seqlen_k=seqlen, varlen=False, softmax_scale=d ** -0.5, qk_scale=1.0, softcap2=softcap,
            window_size=window, dropout_p=dropout)
        return launches[0].flags

    assert flags(64, (-1, 0))["NESTED"] and flags(128, (256, 256))["NESTED"] and flags(64, (100, -1))["NESTED"]
    assert flags(64, (-1, 0), softcap=1.0)["NESTED"]
    assert not flags(128, (-1, 0), softcap=1.0)["NESTED"] and not flags(128, (256, 256), dropout=0.1)["NESTED"]
    dense = flags(128, (-1, -1))
    assert dense["TAIL"] and not dense["NESTED"]  # five SMs: the dense d = 128 input splits its last wave
    assert not flags(64, (-1, -1))["NESTED"]
