"""Calls whose tensors sit on a GPU other than the current one (a model spread over several GPUs without
``torch.cuda.set_device``, as ``device_map="auto"`` places it) run on their tensors' GPU and leave the current
device as it was.

Each case runs once on the current device and once on the other GPU, on the same inputs, and the two must
agree bit for bit (the backward runs ``deterministic=True``, whose dQ order is fixed). Needs two GPUs; the
guard itself (``ioattn.ops._dispatch.on_first_device``) is also checked on one device and on CPU.
"""

from __future__ import annotations

import uuid

import pytest
import torch

import ioattn
from ioattn.ops._dispatch import EagerOp, on_first_device

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
needs_two = pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")


def _on(device: str, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _same(a, b):
    """a (on the current device) equals b (from the other GPU) bit for bit; None matches None."""
    if a is None or b is None:
        assert a is None and b is None
        return
    assert b.device != a.device
    torch.testing.assert_close(b.cpu(), a.cpu(), rtol=0, atol=0, equal_nan=True)


def _run_both(fn, *tensors, other="cuda:1"):
    """fn on the tensors on cuda:0 and on ``other``, the current device staying cuda:0; the outputs of each.
    (A backward runs on the autograd engine's thread for its device, which sets that device itself: the
    forwards and the in-place cache writes are what need the guard.)"""
    torch.cuda.set_device(0)
    here = fn(*_on("cuda:0", *tensors))
    there = fn(*_on(other, *tensors))
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return here, there


def _qkv(b=2, sq=300, sk=300, h=8, hk=2, d=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    return q, k, v


@needs_two
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(64, 16), softcap=20.0),
                                  dict(dropout_p=0.2), dict()])
def test_dense_forward_backward_on_the_other_gpu(d, opts):
    q, k, v = _qkv(d=d)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)

    def fn(q, k, v, dout):
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        torch.manual_seed(7)  # the dropout seed, drawn on the CPU
        out = ioattn.flash_attn_func(q, k, v, deterministic=True, **opts)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        return out, dq, dk, dv

    here, there = _run_both(fn, q, k, v, dout)
    for a, b in zip(here, there, strict=True):
        _same(a, b)


@needs_two
def test_the_current_device_other_than_zero():
    """Tensors on cuda:0 while cuda:1 is current, the other way round."""
    q, k, v = _qkv()
    torch.cuda.set_device(0)
    ref = ioattn.flash_attn_func(*_on("cuda:0", q, k, v), causal=True)
    torch.cuda.set_device(1)
    try:
        out = ioattn.flash_attn_func(*_on("cuda:0", q, k, v), causal=True)
        assert torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(0)
    torch.cuda.synchronize(0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@needs_two
def test_varlen_on_the_other_gpu():
    lens = [37, 300, 1, 129]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (x[0] for x in _qkv(b=1, sq=sum(lens), sk=sum(lens)))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.dtype)

    def fn(q, k, v, dout, cu):
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                            deterministic=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    here, there = _run_both(fn, q, k, v, dout, cu)
    for a, b in zip(here, there, strict=True):
        _same(a, b)


def _caches(paged: bool, batch=3, cap=512, hk=2, d=128, page=16):
    g = torch.Generator().manual_seed(3)
    if paged:
        n_pages = batch * cap // page
        k_cache = torch.randn(n_pages, page, hk, d, generator=g).bfloat16()
        table = torch.randperm(n_pages, generator=g).to(torch.int32).view(batch, cap // page)
    else:
        k_cache = torch.randn(batch, cap, hk, d, generator=g).bfloat16()
        table = None
    v_cache = torch.randn(k_cache.shape, generator=g).bfloat16()
    return k_cache, v_cache, table


@needs_two
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seqlen_q", [1, 5])
def test_kvcache_append_and_attend_on_the_other_gpu(paged, seqlen_q):
    """The in-place append (with rotary) and the split-KV decode: output, lse and both caches agree."""
    k_cache, v_cache, table = _caches(paged)
    g = torch.Generator().manual_seed(4)
    batch, hk, d = 3, 2, 128
    q = torch.randn(batch, seqlen_q, 8, d, generator=g).bfloat16()
    k_new = torch.randn(batch, seqlen_q, hk, d, generator=g).bfloat16()
    v_new = torch.randn(batch, seqlen_q, hk, d, generator=g).bfloat16()
    seqlens = torch.tensor([0, 200, 500 - seqlen_q], dtype=torch.int32)
    angles = torch.rand(512, d // 4, generator=g) * 6.0
    cos, sin = angles.cos(), angles.sin()

    def fn(q, k_cache, v_cache, k_new, v_new, seqlens, table, cos, sin):
        out, lse = ioattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos,
                                                  rotary_sin=sin, cache_seqlens=seqlens, block_table=table,
                                                  causal=True, num_splits=0, return_softmax_lse=True)
        return out, lse, k_cache, v_cache

    here, there = _run_both(fn, q, k_cache, v_cache, k_new, v_new, seqlens, table, cos, sin)
    for a, b in zip(here, there, strict=True):
        _same(a, b)


@needs_two
def test_paged_varlen_and_write_kv_on_the_other_gpu():
    """A continuous-batching step: new tokens written by ``write_kv`` (slot mapping), then a prefill chunk
    and decode rows packed over the paged cache."""
    k_cache, v_cache, table = _caches(True)
    g = torch.Generator().manual_seed(5)
    lens_q = [40, 1, 1]
    seqlens_k = torch.tensor([40, 301, 77], dtype=torch.int32)
    cu_q = torch.tensor([0, 40, 41, 42], dtype=torch.int32)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int32), seqlens_k.cumsum(0, dtype=torch.int32)])
    q = torch.randn(sum(lens_q), 8, 128, generator=g).bfloat16()
    k_new = torch.randn(sum(lens_q), 2, 128, generator=g).bfloat16()
    v_new = torch.randn(sum(lens_q), 2, 128, generator=g).bfloat16()
    # Slots of the new tokens: the last lens_q[b] positions of each sequence, through its block table.
    pos = torch.cat([torch.arange(int(n) - m, int(n)) for n, m in zip(seqlens_k, lens_q, strict=True)])
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lens_q))
    slots = (table[seq, pos // 16].long() * 16 + pos % 16)

    def fn(q, k_cache, v_cache, k_new, v_new, slots, cu_q, cu_k, table):
        ioattn.write_kv(k_new, v_new, k_cache, v_cache, slot_mapping=slots)
        out = ioattn.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lens_q), int(seqlens_k.max()),
                                            causal=True, block_table=table)
        return out, k_cache, v_cache

    here, there = _run_both(fn, q, k_cache, v_cache, k_new, v_new, slots, cu_q, cu_k, table)
    for a, b in zip(here, there, strict=True):
        _same(a, b)


@needs_two
def test_compiled_call_on_the_other_gpu():
    """Under torch.compile inductor holds a device guard of its own (this passed without ours too): a check
    that the guarded op composes with it."""
    q, k, v = _qkv(sq=256, sk=256)

    @torch.compile(fullgraph=True, dynamic=False)
    def fn(q, k, v):
        return ioattn.flash_attn_func(q, k, v, causal=True) * 2

    here, there = _run_both(fn, q, k, v)
    _same(here, there)


def test_on_first_device_leaves_cpu_and_current_device_calls_alone():
    """CPU tensors and tensors on the current device call the function as it is, with its arguments."""
    seen = []

    def fn(x, y=None):
        seen.append((x, y, torch.cuda.current_device() if x.is_cuda else None))
        return x

    run = on_first_device(fn)
    x = torch.ones(2)
    assert run(x, y=3) is x and seen[-1] == (x, 3, None)
    assert run.__wrapped__ is fn  # the custom op reads fn's signature through the wrapper
    if torch.cuda.is_available():
        xc = x.cuda()
        assert run(xc) is xc and seen[-1][2] == torch.cuda.current_device()


def test_eager_op_keeps_the_function_schema():
    """``EagerOp`` registers the guarded function under the schema of the function it wraps."""

    def double(x: torch.Tensor, scale: float) -> torch.Tensor:
        return x * 2 * scale

    name = f"double_{uuid.uuid4().hex[:8]}"  # a fresh op each run: a process may run this test twice
    op = EagerOp(f"ioattn_test::{name}", double)
    assert str(op.op._opoverload._schema) == f"ioattn_test::{name}(Tensor x, float scale) -> Tensor"
    x = torch.arange(3.0)
    torch.testing.assert_close(op(x, 0.5), x)
    torch.testing.assert_close(op.op(x, 0.5), x)


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
def test_guarded_call_runs_on_the_tensor_device():
    """Inside the guarded function the current device is the first tensor's."""
    run = on_first_device(lambda x: torch.cuda.current_device())
    torch.cuda.set_device(0)
    assert run(torch.ones(1, device="cuda:1")) == 1
    assert torch.cuda.current_device() == 0
