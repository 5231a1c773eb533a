"""``ioattn.scaled_dot_product_attention``: torch's SDPA signature and semantics (top-left ``is_causal``,
``CausalBias`` masks, ``enable_gqa``, ``scale``, dropout) on ioattn's kernels, both readings of the layout
(batches along the sequence, or one batch of batch x heads heads) without copies, and every other call
handed to torch's own SDPA."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import ioattn
import ioattn.sdpa as sdpa_mod
from ioattn.backend import select_backend
from ioattn.testing import tolerance_check

# fp16 on CPU: the interpreter's tl.dot is wrong in bf16.
DTYPE = torch.bfloat16 if ON_GPU else torch.float16
D = 64 if ON_GPU else 16


def _make(shape, layout, seed, dtype=DTYPE):
    """A (B, H, L, E) tensor: 'bhsd' contiguous, 'bshd' a transposed view of (B, L, H, E) memory."""
    g = torch.Generator().manual_seed(seed)
    b, h, n, e = shape
    if layout == "bhsd":
        t = torch.randn(b, h, n, e, generator=g)
    else:
        t = torch.randn(b, n, h, e, generator=g).transpose(1, 2)
    return t.to(DEVICE, dtype).requires_grad_()


def _inputs(b, hq, hk, lq, lk, layouts, seed=0, dtype=DTYPE):
    return [_make(s, lay, seed + i, dtype) for i, (s, lay) in
            enumerate(zip(((b, hq, lq, D), (b, hk, lk, D), (b, hk, lk, D)), layouts, strict=True))]


def _torch(q, k, v, **kw):
    return sdpa_mod._torch_sdpa(q, k, v, **kw)


def _check(q, k, v, **kw):
    """Output and gradients within the tolerance rule: against torch's SDPA in float64, with torch's SDPA in
    the inputs' dtype as the baseline error."""
    out = ioattn.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.dtype == q.dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _torch(*ref_in, **kw)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    base_in = [t.detach().requires_grad_() for t in (q, k, v)]
    base = _torch(*base_in, **kw)
    base_grads = torch.autograd.grad(base, base_in, dout)
    for name, x, r, bs, factor in [("out", out, ref, base, 2)] + [
            (f"d{n}", g, rg, bg, 3) for n, g, rg, bg in zip("qkv", grads, ref_grads, base_grads, strict=True)]:
        res = tolerance_check(x, r, bs, factor=factor, floor=2e-3 if x.dtype != torch.float32 else 1e-5, name=name)
        assert res.ok, res
    return out


LAYOUTS = {"bhsd": ("bhsd",) * 3, "bshd": ("bshd",) * 3, "mixed": ("bhsd", "bhsd", "bshd")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2)])
def test_layouts_and_gqa(layout, hq, hk):
    q, k, v = _inputs(2, hq, hk, 19, 23, LAYOUTS[layout])
    _check(q, k, v, enable_gqa=hk != hq)


@pytest.mark.parametrize("lq,lk", [(13, 13), (9, 21), (21, 9)])
@pytest.mark.parametrize("mask", ["is_causal", "upper_left", "lower_right"])
def test_causal_alignments(lq, lk, mask):
    """is_causal and causal_upper_left align top-left (the keys past the last row are cut, or a window
    stands in when there are more rows than keys); causal_lower_right aligns bottom-right, with zeros for
    rows that see no key, as torch's SDPA gives them."""
    q, k, v = _inputs(2, 4, 2, lq, lk, ("bhsd", "bshd", "bshd"), seed=lq * lk)
    kw = {"enable_gqa": True}
    if mask == "is_causal":
        kw["is_causal"] = True
    else:
        kw["attn_mask"] = (causal_upper_left if mask == "upper_left" else causal_lower_right)(lq, lk)
    _check(q, k, v, **kw)


def test_scale_and_leading_dims():
    """scale; inputs of three dims (no batch) and of five (two batch dims)."""
    q, k, v = _inputs(1, 2, 2, 11, 11, ("bhsd",) * 3)
    _check(*(t.detach()[0].requires_grad_() for t in (q, k, v)), scale=0.3, is_causal=True)
    g = torch.Generator().manual_seed(3)
    five = [torch.randn(2, 3, 2, 11, D, generator=g).to(DEVICE, DTYPE).requires_grad_() for _ in range(3)]
    _check(*five, scale=0.2)


def test_odd_inputs():
    """Strided inputs (a slice along the sequence, heads broadcast by expand, a packed qkv's views), only some
    inputs requiring grad, seqlen 1, an odd head dim; and empty ones (batch 0 in either layout, no queries, no
    keys), which give torch's shapes and zeros."""
    q, k, v = _inputs(2, 4, 4, 17, 24, ("bhsd", "bshd", "bhsd"))
    _check(q[:, :, 3:12].detach().requires_grad_(), k.detach()[:, :, ::2].requires_grad_(),
           v.detach()[:, :1, ::2].expand(-1, 4, -1, -1).requires_grad_(), is_causal=True)
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 13, 3, 4, D, generator=g).to(DEVICE, DTYPE).requires_grad_()
    out = ioattn.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv.unbind(2)), is_causal=True)
    ref = _torch(*(t.transpose(1, 2).double() for t in qkv.unbind(2)), is_causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    q1 = q.detach()[:, :, :1].requires_grad_()  # one query, grads for q only
    k0, v0 = k.detach(), v.detach()
    _check_partial = ioattn.scaled_dot_product_attention(q1, k0, v0, is_causal=True)
    torch.testing.assert_close(_check_partial.double(), _torch(q1.double(), k0.double(), v0.double(),
                                                                is_causal=True), atol=2e-2, rtol=0)
    (dq,) = torch.autograd.grad(_check_partial.sum(), (q1,))
    assert dq.shape == q1.shape
    odd = [torch.randn(1, 2, 9, 40 if ON_GPU else 12, generator=g).to(DEVICE, DTYPE).requires_grad_()
           for _ in range(3)]
    _check(*odd)
    for shape_q, shape_kv, layout in [((0, 2, 5, D), (0, 2, 5, D), "bhsd"), ((0, 2, 5, D), (0, 2, 5, D), "bshd"),
                                      ((2, 2, 0, D), (2, 2, 5, D), "bhsd"), ((2, 2, 5, D), (2, 2, 0, D), "bhsd")]:
        q0 = _make(shape_q, layout, 1)
        k0, v0 = _make(shape_kv, layout, 2), _make(shape_kv, layout, 3)
        out = ioattn.scaled_dot_product_attention(q0, k0, v0)
        assert out.shape == shape_q and not out.any()


def _spy(monkeypatch):
    seen = []
    real = sdpa_mod.flash_attn_func

    def spy(q, k, v, **kw):
        seen.append((q, k, v))
        return real(q, k, v, **kw)

    monkeypatch.setattr(sdpa_mod, "flash_attn_func", spy)
    return seen


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reading_without_copies(monkeypatch, layout):
    """(B, L, H, E) memory is passed as B batches, (B, H, L, E) memory as one batch of B x H heads, both as
    views of the caller's tensors; mixed inputs take the reading that copies fewer (here v alone)."""
    seen = _spy(monkeypatch)
    q, k, v = _inputs(3, 4, 2, 10, 12, LAYOUTS[layout])
    out = ioattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    (fq, fk, fv), = seen
    kernels = select_backend(torch.device(DEVICE)) == "triton"  # whose outputs are (batch, seqlen, heads, d)
    if layout == "bshd":
        assert fq.shape == (3, 10, 4, D) and fk.shape == (3, 12, 2, D)
        assert out.transpose(1, 2).is_contiguous() or not kernels  # SDPA's flash backend's layout
    else:
        assert fq.shape == (1, 10, 12, D) and fk.shape == (1, 12, 6, D)
        assert out.permute(2, 0, 1, 3).is_contiguous() or not kernels
    views = (q, k) if layout == "mixed" else (q, k, v)
    for mine, theirs in zip((fq, fk, fv), views, strict=False):  # v: checked below
        assert mine.data_ptr() == theirs.data_ptr()
    if layout == "mixed":
        assert fv.data_ptr() != v.data_ptr()


@pytest.mark.parametrize("rows", [1, 3])
def test_decoding_steps_read_the_cache_in_place(monkeypatch, rows):
    """A few query rows without gradients run the KV-cache kernels over key and value as they lie (views,
    either layout; top-left is_causal cuts the keys first), equal to torch's; with gradients (or more rows) the
    attention kernels run."""
    seen = []
    real = sdpa_mod.flash_attn_with_kvcache

    def spy(q, k_cache, v_cache, **kw):
        seen.append((k_cache, v_cache))
        return real(q, k_cache, v_cache, **kw)

    monkeypatch.setattr(sdpa_mod, "flash_attn_with_kvcache", spy)
    for layouts, kw in [(("bhsd", "bhsd", "bhsd"), {}), (("bhsd", "bshd", "bshd"), {"is_causal": True}),
                        (("bhsd",) * 3, {"attn_mask": causal_lower_right(rows, 37)})]:
        q, k, v = (t.detach() for t in _inputs(2, 8, 2, rows, 37, layouts, seed=rows))
        before = len(seen)
        with torch.no_grad():
            out = ioattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        if kw.get("is_causal") and rows == 1:  # top-left cuts the keys to one: the attention kernels
            assert len(seen) == before
        else:
            (kc, vc), = seen[before:]
            assert kc.data_ptr() == k.data_ptr() and vc.data_ptr() == v.data_ptr()
        ref = _torch(*(t.double() for t in (q, k, v)), enable_gqa=True, **kw)
        base = _torch(q, k, v, enable_gqa=True, **kw)
        res = tolerance_check(out, ref, base, floor=2e-3, name="decode")
        assert res.ok, res
    n = len(seen)
    q, k, v = _inputs(2, 8, 2, rows, 37, ("bhsd",) * 3)
    _check(q, k, v, enable_gqa=True)  # gradients: the attention kernels
    assert len(seen) == n
    with torch.no_grad():  # inputs that require grad, grad mode off: a decoding step
        ioattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert len(seen) == n + 1
    qd, kd, vd = (t.detach() for t in (q, k, v))
    with torch.no_grad():
        plain = ioattn.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)
        dropped = ioattn.scaled_dot_product_attention(qd, kd, vd, dropout_p=0.5, enable_gqa=True)
        # a key and value whose last dim is strided: not a cache the KV-cache call reads; the attention kernels
        kt, vt = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (kd, vd))
        strided = ioattn.scaled_dot_product_attention(qd, kt, vt, enable_gqa=True)
    assert len(seen) == n + 2  # plain only: dropout and the strided cache took the attention kernels
    assert (dropped - plain).abs().max() > 0.1  # dropout applied
    torch.testing.assert_close(strided, plain, atol=2e-2, rtol=0)


def test_dropout_does_not_depend_on_the_reading():
    """The mask is drawn per batch x heads plane, so the same values in either memory layout (read as B
    batches or as B x H heads) give the same output and gradients; and dropout does drop (the output
    differs from the call without it)."""
    torch.manual_seed(0)
    a = _inputs(2, 4, 2, 33, 33, ("bhsd",) * 3)
    b = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in a]
    outs, grads = [], []
    for q, k, v in (a, b):
        torch.manual_seed(11)
        if ON_GPU:
            torch.cuda.manual_seed(11)
        with torch.autograd.graph.disable_saved_tensors_hooks("no hooks"):
            out = ioattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-3)
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-2, atol=2e-2)
    plain = ioattn.scaled_dot_product_attention(*a, is_causal=True, enable_gqa=True)
    assert (plain - outs[0]).abs().max() > 0.1


def test_other_calls_are_torchs(monkeypatch):
    """A tensor mask, a value head dim unlike query's, float64, broadcast batch or head dims, 2-D inputs:
    torch's SDPA computes them (equal results), also with this function installed as torch's SDPA (no
    recursion); its errors are torch's."""
    seen = _spy(monkeypatch)
    g = torch.Generator().manual_seed(5)

    def r(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(DEVICE, dtype)

    q, k, v = r(2, 3, 7, 16), r(2, 3, 9, 16), r(2, 3, 9, 16)
    cases = [
        ((q, k, v), {"attn_mask": r(7, 9) > 0}),
        ((q, k, v), {"attn_mask": r(2, 1, 7, 9)}),
        ((q, k, r(2, 3, 9, 8)), {}),
        ((q.double(), k.double(), v.double()), {"is_causal": True}),
        ((q, k[:1], v[:1]), {}),
        ((q[0, 0], k[0, 0], v[0, 0]), {}),
        ((q, k[:, :1], v[:, :1]), {}),  # heads differ without enable_gqa: torch broadcasts (math) or refuses
        ((q, k, v), {"scale": 0.0}),  # torch takes any scale
        ((q, k, v), {"scale": -0.5, "is_causal": True}),
    ]
    monkeypatch.setattr(F, "scaled_dot_product_attention", ioattn.scaled_dot_product_attention)
    for args, kw in cases:
        got = F.scaled_dot_product_attention(*args, **kw)
        torch.testing.assert_close(got, _torch(*args, **kw), rtol=0, atol=0, equal_nan=True)
    assert not seen
    q4, k4, v4 = _inputs(1, 2, 2, 9, 9, ("bhsd",) * 3)
    with torch.device(DEVICE):  # a torch function mode: still computed here
        ioattn.scaled_dot_product_attention(q4, k4, v4)
    assert len(seen) == 1

    class Sub(torch.Tensor):
        pass

    sub = [t.as_subclass(Sub) for t in (q, k, v)]
    torch.testing.assert_close(ioattn.scaled_dot_product_attention(*sub), _torch(q, k, v), rtol=0, atol=0)
    assert len(seen) == 1  # the subclass went to torch
    with pytest.raises((RuntimeError, ValueError)):
        ioattn.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(7, 9), is_causal=True)
    with pytest.raises(ValueError, match="same sequence length"):
        ioattn.scaled_dot_product_attention(q, k, v[:, :, :5])
    monkeypatch.setenv("IOATTN_BACKEND", "bogus")  # read only for calls ioattn would compute
    args, kw = cases[0]
    torch.testing.assert_close(ioattn.scaled_dot_product_attention(*args, **kw), _torch(*args, **kw), rtol=0, atol=0)


def test_chunked_devices_take_torchs_unless_asked(monkeypatch):
    """Where ioattn would take its chunked path by default (here: CPU tensors without the interpreter), the
    call is torch's (its CPU flash kernel is faster); IOATTN_BACKEND=chunked asks for ioattn's."""
    seen = _spy(monkeypatch)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("IOATTN_BACKEND", raising=False)
    assert select_backend(q.device) == "chunked"
    out = ioattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not seen and torch.equal(out, _torch(q, k, v, is_causal=True))
    monkeypatch.setenv("IOATTN_BACKEND", "chunked")
    out = ioattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert len(seen) == 1
    torch.testing.assert_close(out, _torch(q, k, v, is_causal=True), atol=1e-5, rtol=0)


@pytest.mark.skipif(select_backend(torch.device(DEVICE)) != "triton", reason="compiles the Triton path's ops")
def test_compiles_fullgraph():
    q, k, v = _inputs(2, 4, 2, 24, 17, ("bhsd", "bhsd", "bshd"))  # more queries than keys: the window

    def f(q, k, v):
        return ioattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float().square().sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
