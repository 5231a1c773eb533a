"""``torch.autocast``: the attention functions run in autocast's dtype, as SDPA does (autocast lists it among
the ops it runs in lower precision). Inputs of another floating dtype, mixed ones included, are cast
differentiably, so their gradients come back in their own dtypes; outside autocast nothing is cast and mixed
dtypes stay refused (flash-attn's rule)."""

import pytest
import torch
from conftest import DEVICE

import ioattn
from ioattn.testing import make_cu_seqlens

# fp16 on CPU: the interpreter's tl.dot is wrong in bf16 (equal either way, but these compare values too).
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _leaves(*shapes, dtypes):
    g = torch.Generator().manual_seed(sum(map(sum, shapes)))
    return [torch.randn(s, generator=g).to(DEVICE, dt).requires_grad_() for s, dt in zip(shapes, dtypes, strict=True)]


def _cast_leaves(leaves):
    return [t.detach().to(LOW).requires_grad_() for t in leaves]


def _check(fn, leaves):
    """fn under autocast on leaves of any dtypes equals fn outside autocast on the leaves cast to LOW, output
    and gradients (each gradient in its leaf's dtype) bit for bit."""
    with torch.autocast(DEVICE, dtype=LOW):
        out = fn(*leaves)
    assert out.dtype == LOW
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, LOW)
    grads = torch.autograd.grad(out, leaves, dout)
    cast = _cast_leaves(leaves)
    ref = fn(*cast)
    ref_grads = torch.autograd.grad(ref, cast, dout)
    assert torch.equal(out, ref)
    for g, r, leaf in zip(grads, ref_grads, leaves, strict=True):
        assert g.dtype == leaf.dtype and torch.equal(g, r.to(leaf.dtype))


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.float32, LOW), (LOW,) * 3],
                         ids=["fp32", "mixed", "low"])
def test_dense_runs_in_autocast_dtype(dtypes):
    leaves = _leaves((2, 45, 4, 32), (2, 37, 2, 32), (2, 37, 2, 32), dtypes=dtypes)
    _check(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True, deterministic=True), leaves)


def test_varlen_packed_and_chunked_run_in_autocast_dtype():
    lens = [5, 0, 33, 17]
    cu = make_cu_seqlens(lens, DEVICE)
    leaves = _leaves((sum(lens), 4, 32), (sum(lens), 2, 32), (sum(lens), 2, 32), dtypes=(torch.float32,) * 3)
    _check(lambda q, k, v: ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                                         deterministic=True), leaves)
    qkv = _leaves((2, 30, 3, 4, 32), dtypes=(torch.float32,))
    _check(lambda qkv: ioattn.flash_attn_qkvpacked_func(qkv, window_size=(5, 0), deterministic=True), qkv)
    leaves = _leaves((1, 40, 2, 16), (1, 40, 2, 16), (1, 40, 2, 16), dtypes=(torch.float32,) * 3)
    _check(lambda q, k, v: ioattn.memory_efficient_attention(q, k, v, causal=True), leaves)


def test_mixed_dtypes_refused_outside_autocast_and_fp32_kept():
    q, k, v = _leaves((1, 20, 2, 32), (1, 20, 2, 32), (1, 20, 2, 32), dtypes=(torch.float32, LOW, LOW))
    with pytest.raises(TypeError, match="dtype"):
        ioattn.flash_attn_func(q, k, v)
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    assert ioattn.flash_attn_func(q32, k32, v32).dtype == torch.float32
    with torch.autocast(DEVICE, dtype=LOW, enabled=False):  # autocast off inside: as given
        assert ioattn.flash_attn_func(q32, k32, v32).dtype == torch.float32
    other = "cpu" if DEVICE == "cuda" else "cuda"
    if torch.cuda.is_available() or other == "cpu":
        with torch.autocast(other, dtype=torch.bfloat16):  # autocast for another device type: as given
            assert ioattn.flash_attn_func(q32, k32, v32).dtype == torch.float32


def test_autocast_under_torch_compile():
    leaves = _leaves((2, 40, 4, 32), (2, 40, 4, 32), (2, 40, 4, 32), dtypes=(torch.float32,) * 3)
    fn = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True), fullgraph=True)
    with torch.autocast(DEVICE, dtype=LOW):
        out = fn(*leaves)
    assert out.dtype == LOW
    cast = [t.detach().to(LOW) for t in leaves]
    # inductor fuses the chunked path's tiles otherwise: an ulp apart there
    torch.testing.assert_close(out, ioattn.flash_attn_func(*cast, causal=True), atol=4e-3, rtol=1e-2)
    assert fn(*leaves).dtype == torch.float32  # outside autocast the same compiled function keeps fp32


def test_float64_meta_and_non_tensors_under_autocast():
    """Autocast leaves float64 alone (as its own ops do): a float64 call is refused as outside autocast; meta
    tensors (shape inference) work under another device type's autocast; a non-tensor argument gets the usual
    TypeError."""
    q, k, v = (torch.randn(1, 16, 2, 32, device=DEVICE, dtype=torch.float64) for _ in range(3))
    with torch.autocast(DEVICE, dtype=LOW):
        with pytest.raises(TypeError):
            ioattn.flash_attn_func(q, k, v)
        with pytest.raises(TypeError, match="q must be a torch.Tensor"):
            ioattn.flash_attn_func([1.0], k, v)
    meta = [torch.empty(1, 16, 2, 32, device="meta") for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ioattn.flash_attn_func(*meta, causal=True).shape == (1, 16, 2, 32)
        assert ioattn.memory_efficient_attention(*meta, causal=True).shape == (1, 16, 2, 32)
