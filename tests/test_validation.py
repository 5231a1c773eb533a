"""Every validation error: raised before any kernel, typed, and naming the argument and values."""

import pytest
import torch

import ioattn


def _qkv(b=1, sq=8, sk=8, h=2, hk=2, d=16, dtype=torch.float16):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


def _varlen(lens_q=(3, 5), lens_k=(4, 2), h=2, d=16):
    q = torch.randn(sum(lens_q), h, d, dtype=torch.float16)
    k = torch.randn(sum(lens_k), h, d, dtype=torch.float16)
    v = torch.randn(sum(lens_k), h, d, dtype=torch.float16)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k)


@pytest.mark.parametrize(
    "mutate,exc,words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, ["q", "rank 4", "(8, 2, 16)"]),
        (lambda q, k, v: (q, k, "v"), TypeError, ["v", "torch.Tensor", "str"]),
        (lambda q, k, v: (q, k[:, :5], v), ValueError, ["v", "seqlen", "5"]),
        (lambda q, k, v: (q, torch.cat([k, k]), v), ValueError, ["batch", "1", "2"]),
        (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), None, []),
        (lambda q, k, v: (torch.randn(1, 8, 3, 16, dtype=torch.float16), k, v), ValueError,
         ["nheads", "3", "divisible", "2"]),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, ["headdim", "16", "8"]),
        (lambda q, k, v: (q, k, v[..., :8]), ValueError, ["headdim", "16", "8"]),
        (lambda q, k, v: (q.float(), k, v), TypeError, ["k.dtype", "float32", "float16"]),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, ["q.dtype", "int64"]),
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, ["q.dtype", "float64"]),
        (lambda q, k, v: (*(torch.randn(1, 8, 2, 272, dtype=torch.float16) for _ in range(3)),), ValueError,
         ["headdim", "256", "272"]),
    ],
)
def test_qkv_errors(mutate, exc, words):
    args = mutate(*_qkv())
    if exc is None:  # a valid MQA call: nheads_k = 1
        ioattn.flash_attn_func(*args)
        return
    with pytest.raises(exc) as err:
        ioattn.flash_attn_func(*args)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"window_size": (1, 2, 3)}, ValueError, ["window_size", "(1, 2, 3)"]),
        ({"window_size": (0, 1.5)}, TypeError, ["window_size right", "float"]),
        ({"dropout_p": 1.0}, ValueError, ["dropout_p", "1.0"]),
        ({"softmax_scale": 0.0}, ValueError, ["softmax_scale", "0.0"]),
        ({"softcap": float("inf")}, ValueError, ["softcap", "finite", "inf"]),
        ({"softcap": float("nan")}, ValueError, ["softcap", "nan"]),
        ({"softmax_scale": float("inf")}, ValueError, ["softmax_scale", "finite", "inf"]),
        ({"softcap": 1e39}, ValueError, ["softcap", "fp32", "1e+39"]),
        ({"alibi_slopes": torch.ones(3)}, ValueError, ["alibi_slopes", "(2,)", "(3,)"]),
        ({"alibi_slopes": torch.ones(2, dtype=torch.float64)}, TypeError, ["alibi_slopes.dtype", "float64"]),
    ],
)
def test_option_errors(kwargs, exc, words):
    with pytest.raises(exc) as err:
        ioattn.flash_attn_func(*_qkv(), **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_mixed_devices_named():
    q, k, v = _qkv()
    meta_v = torch.empty(v.shape, dtype=v.dtype, device="meta")
    with pytest.raises(ValueError, match=r"v must be on q's device \(cpu\), got meta"):
        ioattn.flash_attn_func(q, k, meta_v)


@pytest.mark.parametrize(
    "which,value,exc,words",
    [
        ("cu_q", lambda cu: cu.long(), TypeError, ["cu_seqlens_q.dtype", "int32", "int64"]),
        ("cu_q", lambda cu: torch.tensor([0, 5, 3], dtype=torch.int32), ValueError,
         ["cu_seqlens_q", "non-decreasing"]),
        ("cu_q", lambda cu: torch.tensor([1, 3, 8], dtype=torch.int32), ValueError, ["cu_seqlens_q[0]", "1"]),
        ("cu_k", lambda cu: torch.tensor([0, 4, 7], dtype=torch.int32), ValueError,
         ["cu_seqlens_k[-1]", "6", "7"]),
        ("cu_k", lambda cu: torch.tensor([0, 2, 4, 6], dtype=torch.int32), ValueError, ["2 sequences", "3"]),
        ("cu_q", lambda cu: cu.view(1, -1), ValueError, ["cu_seqlens_q", "1-D"]),
        ("max_q", lambda m: 4, ValueError, ["max_seqlen", "5", "4"]),
    ],
)
def test_varlen_errors(which, value, exc, words):
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen()
    if which == "cu_q":
        cu_q = value(cu_q)
    elif which == "cu_k":
        cu_k = value(cu_k)
    else:
        max_q = value(max_q)
    with pytest.raises(exc) as err:
        ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_varlen_rank_error():
    q, k, v = _qkv()
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must have rank 3"):
        ioattn.flash_attn_varlen_func(q, k, v, cu, cu, 8, 8)


def test_packed_shape_error():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        ioattn.flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 2, 16, dtype=torch.float16))


def test_backend_env_error(monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="IOATTN_BACKEND"):
        ioattn.flash_attn_func(*_qkv())


def test_qkv_fast_path_accepts_only_what_the_full_checks_accept(monkeypatch):
    """``check_qkv`` answers valid arguments in one pass (``_qkv_valid``): for valid and invalid arguments
    alike, whatever it accepts the full checks accept with the same answer, and every valid case takes it."""
    from ioattn import validation as V

    def t(*shape, dtype=torch.float16, device="cpu", stride_last=True):
        x = torch.zeros(*shape[:-1], shape[-1] * (1 if stride_last else 2), dtype=dtype, device=device)
        return x if stride_last else x[..., ::2]

    base = ((2, 8, 4, 16), (2, 9, 2, 16), (2, 9, 2, 16))
    cases = [tuple(t(*s) for s in base)]
    for i in range(3):  # one argument changed at a time
        for bad in (t(3, *base[i][1:]), t(*base[i][:-1], 32), t(*base[i][:2], 3, 16), t(*base[i][:1], 7, 2, 16),
                    t(*base[i], dtype=torch.int32), t(*base[i], dtype=torch.float32), t(*base[i], stride_last=False),
                    t(*base[i][1:]), "not a tensor"):
            args = list(cases[0])
            args[i] = bad
            cases.append(tuple(args))
    cases += [(t(2, 8, 4, 300), t(2, 9, 2, 300), t(2, 9, 2, 300)), (t(2, 8, 4, 1), t(2, 9, 2, 1), t(2, 9, 2, 1)),
              (t(2, 8, 4, 16), t(2, 9, 0, 16), t(2, 9, 0, 16))]
    for q, k, v in cases:
        rank = q.dim() if isinstance(q, torch.Tensor) else 4
        fast = V._qkv_valid(q, k, v, rank)
        with monkeypatch.context() as mp:
            mp.setattr(V, "_qkv_valid", lambda *a: None)
            try:
                full = V.check_qkv(q, k, v, rank=rank)
            except (TypeError, ValueError):
                full = None
        assert fast is None or fast == full, (q, k, v)
        assert (fast is None) == (full is None), "a valid case missed the fast path"


def test_window_sides_capped():
    """Sides wider than ``WINDOW_CAP`` (which reaches every key of any sequence up to 2^28 tokens) are taken as
    that wide; narrower ones and -1 pass unchanged."""
    from ioattn.validation import WINDOW_CAP, check_window

    assert check_window((2**40, -1)) == (WINDOW_CAP, -1)
    assert check_window([3, 2**31]) == (3, WINDOW_CAP)
    assert check_window((WINDOW_CAP, WINDOW_CAP - 1)) == (WINDOW_CAP, WINDOW_CAP - 1)
    assert WINDOW_CAP >= 2 * (1 << 28) and 3 * (1 << 28) + WINDOW_CAP < 1 << 31


def test_kvcache_numpy_int_lengths_and_window_as_wide_as_the_cache(monkeypatch):
    """cache_seqlens as a numpy integer is an int (a bool is not); a window side as wide as the cache capacity
    bounds nothing and, as in flash-attn, leaves q's rotary at the cache length for every row (chunked path)."""
    np = pytest.importorskip("numpy")
    monkeypatch.setenv("IOATTN_BACKEND", "chunked")
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(1, 16, 1, 32), torch.randn(1, 16, 1, 32)
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 4, 1, 32), torch.randn(1, 4, 1, 32)
    angles = torch.rand(16, 16) * 6
    run = lambda window, lens=3: ioattn.flash_attn_with_kvcache(  # noqa: E731
        q, k_cache.clone(), v_cache.clone(), k, v, rotary_cos=angles.cos(), rotary_sin=angles.sin(),
        cache_seqlens=lens, window_size=window)
    plain = run((-1, -1))
    for window in ((16, -1), (1000, 1000), (-1, 16)):
        torch.testing.assert_close(run(window), plain, rtol=0, atol=0)
    assert not torch.equal(run((15, -1)), plain)  # 15 < capacity: q rotated row by row
    # The mask keeps a side as given: 40 queries over 16 keys put the first rows before key 0, and a right
    # side of 16 (the capacity) leaves the first 8 rows without a key.
    from ioattn.reference import attention_ref

    q40 = torch.randn(1, 40, 1, 32)
    out = ioattn.flash_attn_with_kvcache(q40, k_cache, v_cache, cache_seqlens=16, window_size=(-1, 16))
    torch.testing.assert_close(out, attention_ref(q40, k_cache, v_cache, window_size=(-1, 16))[0].float(),
                               rtol=1e-5, atol=1e-5)
    assert (out[:, :8] == 0).all()
    torch.testing.assert_close(run((-1, -1), np.int32(3)), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        run((-1, -1), True)


def test_flash_attn_lenient_scalars():
    """As flash-attn takes them: any negative window side is unbounded (-1), any integer type (numpy's too)
    a side, any softcap <= 0 is off."""
    import numpy as np

    from ioattn.validation import check_window

    assert check_window((-2, -7)) == (-1, -1) and check_window((-3, 4)) == (-1, 4)
    assert check_window((np.int64(3), np.int32(-1))) == (3, -1) and type(check_window((np.int64(3), 0))[0]) is int
    q, k, v = _qkv()
    want = ioattn.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(ioattn.flash_attn_func(q, k, v, causal=True, window_size=(-5, -2), softcap=-3.0), want)
    assert torch.equal(ioattn.flash_attn_func(q, k, v, window_size=(-9, 0), softcap=-0.5), want)
    assert torch.equal(ioattn.flash_attn_func(q, k, v, causal=True, softcap=float("-inf")), want)


def test_inputs_with_a_strided_last_dimension_are_copied():
    """flash-attn copies q, k, v whose last dimension is not contiguous (``maybe_contiguous``): the same
    output and gradients as the contiguous inputs, the gradients in the strided tensors' layout."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 8, h, 32, dtype=torch.float32)[..., ::2].requires_grad_()
               for h in (2, 1, 1))
    assert q.stride(-1) == 2
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    want = ioattn.flash_attn_func(qc, kc, vc, causal=True)
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, torch.autograd.grad(want.sum(), (qc, kc, vc)), strict=True):
        torch.testing.assert_close(g, w)
    # inputs that pass the checks come back as the very same objects (nothing copied, nothing spent)
    from ioattn.validation import qkv_unit_stride

    assert all(a is b for a, b in zip(qkv_unit_stride(qc, kc, vc, rank=4)[:3], (qc, kc, vc), strict=True))


def test_strided_varlen_packed_and_paged_inputs_are_copied():
    """The same copies for varlen q, k, v, a packed qkv whose last dimension is strided (its slices are), and
    the paged varlen path's q and caches (only read there): outputs equal the contiguous inputs'."""
    from ioattn.chunked import memory_efficient_attention

    torch.manual_seed(6)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, 2, 32)[..., ::2] for _ in range(3))
    want = ioattn.flash_attn_varlen_func(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 5, 5, causal=True)
    torch.testing.assert_close(ioattn.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True), want)
    qkv = torch.randn(1, 8, 3, 2, 32)[..., ::2]
    want = ioattn.flash_attn_qkvpacked_func(qkv.contiguous(), causal=True)
    torch.testing.assert_close(ioattn.flash_attn_qkvpacked_func(qkv, causal=True), want)
    torch.testing.assert_close(memory_efficient_attention(*qkv.unbind(2), causal=True), want)
    caches = [torch.randn(4, 4, 2, 32)[..., ::2] for _ in range(2)]
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 13], dtype=torch.int32)
    want = ioattn.flash_attn_varlen_func(q.contiguous(), *(c.contiguous() for c in caches), cu, cu_k, 5, 7,
                                         causal=True, block_table=table)
    got = ioattn.flash_attn_varlen_func(q, *caches, cu, cu_k, 5, 7, causal=True, block_table=table)
    torch.testing.assert_close(got, want)
