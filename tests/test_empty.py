"""Empty problems: a batch of 0, no queries, no keys, as PyTorch's attention takes them.

A call with nothing to compute returns tensors of the right shapes and launches no kernel: an output with no
key to attend to is 0 with lse -inf (the convention of a row that sees no key), and so are the gradients
that nothing reaches.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import ioattn

DT = torch.float16


def _t(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=DT, device=DEVICE).requires_grad_(requires_grad)


@pytest.mark.parametrize("b,sq,sk", [(0, 8, 8), (2, 0, 8), (2, 8, 0), (2, 0, 0), (0, 0, 0)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dropout_p", [(16, 0.0), (128, 0.0), (64, 0.2)])
def test_dense_empty(b, sq, sk, causal, d, dropout_p):
    q, k, v = _t(b, sq, 4, d, requires_grad=True), _t(b, sk, 2, d, requires_grad=True), _t(b, sk, 2, d,
                                                                                             requires_grad=True)
    out, lse, s_dmask = ioattn.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, 4, sq)
    assert s_dmask.shape == ((b, 4, sq, sk) if dropout_p else (0,))
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not (dq.any() or dk.any() or dv.any())
    out2 = ioattn.flash_attn_func(q, k, v, causal=causal, deterministic=True)  # the two-pass backward
    grads = torch.autograd.grad(out2, (q, k, v), dout)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v), strict=True))


@pytest.mark.parametrize("lens_q,lens_k", [([0, 0], [0, 0]), ([0, 0], [3, 5]), ([3, 5], [0, 0])])
def test_varlen_empty(lens_q, lens_k):
    """Every sequence without queries, or without keys."""
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()],
                                   dtype=torch.int32, device=DEVICE)
    q = _t(sum(lens_q), 4, 64, requires_grad=True)
    k, v = _t(sum(lens_k), 2, 64, requires_grad=True), _t(sum(lens_k), 2, 64, requires_grad=True)
    out, lse, _ = ioattn.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q, default=0),
                                                max(lens_k, default=0), causal=True, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and not (dq.any() or dk.any() or dv.any())


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_batch_of_none(paged):
    k_cache = _t(4, 16, 2, 64)
    v_cache = _t(4, 16, 2, 64)
    table = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE) if paged else None
    q = _t(0, 1, 4, 64)
    k_new, v_new = _t(0, 1, 2, 64), _t(0, 1, 2, 64)
    seqlens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    before = k_cache.clone()
    out, lse = ioattn.flash_attn_with_kvcache(q, k_cache if paged else k_cache[:0], v_cache if paged else
                                              v_cache[:0], k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                              causal=True, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (0, 4, 1)
    assert torch.equal(k_cache, before)


def test_refused_empty_forms():
    """Kept refused, with the reason: a varlen batch of no sequences, a KV-cache call of no query rows."""
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    q = _t(0, 4, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q must be 1-D with batch"):
        ioattn.flash_attn_varlen_func(q, q, q, cu, cu, 0, 0)
    k_cache = _t(2, 32, 2, 64)
    with pytest.raises(ValueError, match="seqlen_q must be >= 1"):
        ioattn.flash_attn_with_kvcache(_t(2, 0, 4, 64), k_cache, k_cache,
                                       cache_seqlens=torch.tensor([5, 9], dtype=torch.int32, device=DEVICE))


def test_paged_varlen_no_queries():
    k_cache, v_cache = _t(8, 16, 2, 64), _t(8, 16, 2, 64)
    table = torch.arange(8, dtype=torch.int32, device=DEVICE).view(2, 4)
    cu_q = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEVICE)
    out = ioattn.flash_attn_varlen_func(_t(0, 4, 64), k_cache, v_cache, cu_q, cu_k, 0, 30, causal=True,
                                        block_table=table)
    assert out.shape == (0, 4, 64)


def test_write_kv_no_tokens():
    k_cache, v_cache = _t(4, 16, 2, 64), _t(4, 16, 2, 64)
    before = (k_cache.clone(), v_cache.clone())
    ioattn.write_kv(_t(0, 2, 64), _t(0, 2, 64), k_cache, v_cache,
                    torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("b,sq,sk", [(0, 8, 8), (2, 0, 8), (2, 8, 0)])
def test_memory_efficient_attention_empty(b, sq, sk):
    q, k, v = (torch.randn(b, s, 2, 16, requires_grad=True) for s in (sq, sk, sk))
    out = ioattn.memory_efficient_attention(q, k, v, causal=True)
    assert out.shape == q.shape and not out.any()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and not (dq.any() or dk.any() or dv.any())


@pytest.mark.parametrize("path", ["kernels", "chunked"])
def test_second_derivative_raises(path):
    """A backward with create_graph=True gives first derivatives that cannot be differentiated again: a loss
    that holds them raises in its backward instead of leaving their term out (or taking a partial one)."""
    q, k, v = (_t(1, 12, 2, 16, requires_grad=True).float().detach().requires_grad_() for _ in range(3))
    if path == "kernels":
        out = ioattn.flash_attn_func(q, k, v, causal=True)
    else:
        out = ioattn.memory_efficient_attention(q.cpu(), k.cpu(), v.cpu(), causal=True)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    penalised = out.sum() + dq.square().sum()  # a gradient penalty, as in WGAN-GP
    with pytest.raises(RuntimeError, match="differentiate twice"):
        penalised.backward()


def test_empty_calls_launch_nothing(monkeypatch):
    """Every empty form returns before any kernel: a launch through any launcher fails the test."""
    from ioattn.kernels.fastlaunch import Launcher

    monkeypatch.setattr(Launcher, "__call__", lambda *a, **k: pytest.fail("a kernel launched"))
    monkeypatch.setattr(Launcher, "launch_entry", lambda *a, **k: pytest.fail("a kernel launched"))
    for b, sq, sk in [(0, 8, 8), (2, 0, 8), (2, 8, 0)]:
        q, k, v = _t(b, sq, 4, 64, requires_grad=True), _t(b, sk, 2, 64, requires_grad=True), _t(b, sk, 2, 64,
                                                                                                 requires_grad=True)
        out = ioattn.flash_attn_func(q, k, v, causal=True)
        out.sum().backward()
    cu_q = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEVICE)
    ioattn.flash_attn_varlen_func(_t(0, 4, 64), _t(50, 2, 64), _t(50, 2, 64), cu_q, cu_k, 0, 30)
    k_cache = _t(8, 16, 2, 64)
    table = torch.arange(8, dtype=torch.int32, device=DEVICE).view(2, 4)
    ioattn.flash_attn_varlen_func(_t(0, 4, 64), k_cache, k_cache, cu_q, cu_k, 0, 30, block_table=table)
    ioattn.flash_attn_with_kvcache(_t(0, 1, 4, 64), k_cache, k_cache, _t(0, 1, 2, 64), _t(0, 1, 2, 64),
                                   cache_seqlens=torch.zeros(0, dtype=torch.int32, device=DEVICE),
                                   block_table=table[:0])
    ioattn.write_kv(_t(0, 2, 64), _t(0, 2, 64), k_cache, k_cache, torch.zeros(0, dtype=torch.int64, device=DEVICE))


def test_empty_side_with_strided_views_compiles_and_stays_contiguous():
    """The non-empty side's output or gradients come back contiguous, as the kernels' and the fake impls'
    (torch.compile checks the strides of what an op returns)."""
    q = _t(2, 8, 4, 16).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (2, 8, 4, 16), strided
    k, v = _t(2, 0, 4, 16), _t(2, 0, 4, 16)
    out = ioattn.flash_attn_func(q, k, v)
    assert out.is_contiguous() and not out.any()
    compiled = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v) + 1, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), out + 1)
    qe = _t(2, 0, 4, 16, requires_grad=True)
    ks, vs = (_t(2, 4, 8, 16).transpose(1, 2).requires_grad_() for _ in range(2))  # (2, 8, 4, 16), strided
    dk, dv = torch.autograd.grad(ioattn.flash_attn_func(qe, ks, vs).sum(), (ks, vs))
    assert dk.is_contiguous() and dv.is_contiguous() and not (dk.any() or dv.any())
    fn = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v).sum(), fullgraph=True)
    dq, dk, dv = torch.autograd.grad(fn(qe, ks, vs), (qe, ks, vs))
    assert dq.shape == qe.shape and dk.shape == ks.shape and not (dk.any() or dv.any())
