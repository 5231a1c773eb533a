"""The Gluon Hopper forward (kernels/attn_fwd_gluon.py) against attention_ref.

Tolerance rule: our max error against the float64 reference is at most 2x PyTorch's error doing the
same math in the inputs' dtype, plus a floor. GPU-only: the kernel needs sm_90 (TMA, wgmma).
"""

import math

import pytest
import torch
from conftest import ON_GPU

from ioattn.reference import attention_ref
from ioattn.testing import OUT_FACTOR, tolerance_check

if not ON_GPU:
    pytest.skip("the Gluon forward needs a CUDA device (sm_90)", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip(f"the Gluon forward needs sm_90, got {torch.cuda.get_device_capability()}",
                allow_module_level=True)

from ioattn.kernels.attn_fwd_gluon import gluon_forward, gluon_forward_supported  # noqa: E402

FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _check(q, k, v, causal, overlap=False):
    scale = 1.0 / math.sqrt(q.shape[-1])
    routed = gluon_forward_supported(q, k, v, causal=causal, window_size=(-1, 0) if causal else (-1, -1),
                                     softcap=0.0, alibi_slopes=None, dropout_p=0.0, softmax_scale=scale)
    assert routed == (q.shape[-1] == 128)  # d=64 is computed right but left to the faster portable kernel
    out, lse = gluon_forward(q, k, v, scale, causal, overlap=overlap)
    ref_out, ref_lse = attention_ref(q, k, v, causal=causal)
    base_out, base_lse = attention_ref(q, k, v, causal=causal, upcast=False)
    results = [tolerance_check(o, r, b, factor=OUT_FACTOR, floor=FLOOR[q.dtype], name=n)
               for o, r, b, n in ((out, ref_out, base_out, "out"), (lse, ref_lse, base_lse, "lse"))]
    for r in results:
        print(r)
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    has_key = torch.isfinite(ref_lse)  # (b, h, sq): rows with at least one allowed key
    assert torch.equal(torch.isinf(lse), ~has_key), "lse -inf rows differ from the reference"
    assert torch.isfinite(out).all(), "non-finite output"
    empty = ~has_key.transpose(1, 2)  # (b, sq, h)
    assert (out[empty] == 0).all(), "rows with no key must give output 0"
    return out, lse


def _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype):
    q = torch.randn(batch, seqlen_q, nheads, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, d, device="cuda", dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen", [1, 17, 128, 1000, 1025, 4096])
def test_square(seqlen, causal, d, dtype):
    batch = 2 if seqlen <= 1025 else 1
    _check(*_qkv(batch, seqlen, seqlen, 4, 4, d, dtype), causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(17, 17), (1025, 1025), (300, 17), (129, 2000)])
def test_overlap_variant(seqlens, causal, d):
    """The overlapped loop (QK^T of block j+1 during the softmax of block j), off by default."""
    _check(*_qkv(2, *seqlens, 4, 4, d, torch.bfloat16), causal, overlap=True)


# (seqlen_q, seqlen_k): bottom-right causal; sq > sk leaves the first sq - sk rows without keys.
@pytest.mark.parametrize("seqlens", [(1, 1000), (17, 300), (300, 17), (1000, 129), (513, 2048), (128, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_seqlen_q_ne_k(seqlens, causal, d):
    _check(*_qkv(2, *seqlens, 4, 4, d, torch.bfloat16), causal)


@pytest.mark.parametrize("nheads_k", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(nheads_k, causal):
    _check(*_qkv(2, 333, 517, 8, nheads_k, 128, torch.bfloat16), causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_qkv_strides(d, causal):
    qkv = torch.randn(3, 777, 3, 6, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)  # each (3, 777, 6, d) with strides (777*18d, 18d, d, 1)
    _check(q, k, v, causal)


def test_large_batch_heads():
    _check(*_qkv(4, 2048, 2048, 16, 16, 128, torch.bfloat16), True)


def test_deterministic():
    q, k, v = _qkv(2, 1025, 1025, 4, 2, 128, torch.bfloat16)
    a, la = gluon_forward(q, k, v, 0.125, True)
    b, lb = gluon_forward(q, k, v, 0.125, True)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_predicate(monkeypatch):
    q, k, v = _qkv(1, 64, 64, 2, 2, 128, torch.bfloat16)
    kw = dict(causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0)
    assert gluon_forward_supported(q, k, v, **kw)
    assert not gluon_forward_supported(q.float(), k.float(), v.float(), **kw)
    assert not gluon_forward_supported(q, k, v, **{**kw, "window_size": (8, 8)})
    assert not gluon_forward_supported(q, k, v, **{**kw, "softcap": 5.0})
    assert not gluon_forward_supported(q[..., :96], k[..., :96], v[..., :96], **kw)
    odd = torch.randn(2, 64, 2, 129, device="cuda", dtype=torch.bfloat16)[..., :128]
    assert not gluon_forward_supported(odd, odd, odd, **kw)  # row stride 258 elements: not 16-byte aligned
    monkeypatch.setenv("IOATTN_GLUON", "0")
    assert not gluon_forward_supported(q, k, v, **kw)
