"""The chunked (Rabe & Staats) path against the float64 reference, under the tolerance rule."""

import math

import pytest
import torch
from conftest import DEVICE

import ioattn
from ioattn.bench.memory import peak_memory_bytes, standard_attention
from ioattn.chunked import chunked_attention, chunked_attention_varlen, memory_efficient_attention
from ioattn.dropout import draw_seed
from ioattn.reference import attention_ref
from ioattn.testing import (
    GRAD_FACTOR,
    OUT_FACTOR,
    dropout_mask_for_call,
    make_alibi,
    make_cu_seqlens,
    make_qkv,
    tolerance_check,
    varlen_dropout_masks,
)

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _call(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, dropout_p=0.0,
          qchunk=1024, kchunk=4096):
    left, right = window
    return chunked_attention(q, k, v, softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal,
                             window_size=(left, 0) if causal else (left, right), softcap=softcap,
                             alibi_slopes=alibi, dropout_p=dropout_p, query_chunk_size=qchunk,
                             key_chunk_size=kchunk)


def _check_against_ref(fn, q, k, v, ref_kwargs, with_grad=True):
    """Runs ``fn(q, k, v) -> (out, lse)`` and the reference (float64 and same dtype); asserts the rule for
    out, lse and (optionally) dq, dk, dv."""
    out, lse = fn(q, k, v)
    ref_out, ref_lse = attention_ref(q, k, v, upcast=True, **ref_kwargs)
    base_out, base_lse = attention_ref(q, k, v, upcast=False, **ref_kwargs)
    floor = FLOOR[q.dtype]
    results = [tolerance_check(out, ref_out, base_out, factor=OUT_FACTOR, floor=floor, name="out"),
               tolerance_check(lse, ref_lse, base_lse, factor=OUT_FACTOR, floor=floor, name="lse")]
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # the same rows are empty
    if with_grad:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
        base_grads = torch.autograd.grad(base_out, (q, k, v), dout)
        for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads, strict=True):
            assert g.shape == rg.shape and g.dtype == q.dtype
            results.append(tolerance_check(g, rg, bg, factor=GRAD_FACTOR, floor=floor, name=name))
    for r in results:
        print(r)
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    return out, lse


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, softcap, alibi, qchunk, kchunk)
CASES = [
    (2, 1, 1, 2, 2, 40, False, (-1, -1), 0.0, None, 1024, 4096),
    (1, 1, 97, 3, 1, 64, True, (-1, -1), 0.0, None, 16, 32),
    (2, 17, 97, 4, 1, 72, False, (-1, -1), 0.0, None, 8, 24),
    (2, 97, 17, 6, 2, 96, True, (-1, -1), 0.0, None, 16, 5),  # causal with more queries: empty rows
    (1, 97, 97, 4, 2, 40, False, (8, 3), 0.0, None, 20, 7),
    (1, 64, 33, 2, 2, 64, False, (0, 0), 0.0, None, 16, 16),  # window leaving 31 rows empty
    (1, 33, 80, 4, 4, 32, False, (-1, 2), 5.0, "head", 10, 9),
    (2, 50, 50, 4, 2, 72, True, (11, 0), 2.0, "batch", 16, 13),
    (1, 130, 100, 2, 1, 16, False, (-1, -1), 0.0, "batch", 32, 64),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_chunked_matches_reference_fp32(case):
    b, sq, sk, h, hk, d, causal, window, softcap, alibi, qchunk, kchunk = case
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.float32, DEVICE, requires_grad=True)
    slopes = None if alibi is None else make_alibi(b, h, alibi == "batch", DEVICE)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    _check_against_ref(
        lambda q, k, v: _call(q, k, v, causal=causal, window=window, softcap=softcap, alibi=slopes,
                              qchunk=qchunk, kchunk=kchunk), q, k, v, kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[7]],
                         ids=["causal-gqa", "softcap", "window-alibi"])
def test_chunked_matches_reference_half(case, dtype):
    b, sq, sk, h, hk, d, causal, window, softcap, alibi, qchunk, kchunk = case
    q, k, v = make_qkv(b, sq, sk, h, hk, d, dtype, DEVICE, requires_grad=True)
    slopes = None if alibi is None else make_alibi(b, h, alibi == "batch", DEVICE)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    _check_against_ref(
        lambda q, k, v: _call(q, k, v, causal=causal, window=window, softcap=softcap, alibi=slopes,
                              qchunk=qchunk, kchunk=kchunk), q, k, v, kw)


def test_empty_rows_give_zero_output_and_grads():
    q, k, v = make_qkv(1, 40, 20, 2, 1, 16, torch.float32, DEVICE, requires_grad=True)
    out, lse = _call(q, k, v, causal=True, qchunk=8, kchunk=8)
    empty = slice(0, 20)  # row i sits at key position i - 20: no key for i < 20
    assert torch.all(out[:, empty] == 0) and torch.all(lse[:, :, empty] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 20:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.all(dq[:, empty] == 0) and torch.isfinite(dq).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    # No key at all.
    q2, k2, v2 = make_qkv(1, 5, 0, 2, 2, 8, torch.float32, DEVICE, requires_grad=True)
    out2, lse2 = _call(q2, k2, v2)
    assert torch.all(out2 == 0) and torch.all(lse2 == float("-inf"))


def test_fully_masked_key_chunks_are_skipped(monkeypatch):
    """A sliding window over 512 keys touches a few key chunks per query chunk, not all of them."""
    import ioattn.chunked as chunked_mod

    tiles = []
    real = chunked_mod._scores

    def counting(q_c, k_c, *args, **kwargs):
        tiles.append(k_c.shape[2])
        return real(q_c, k_c, *args, **kwargs)

    monkeypatch.setattr(chunked_mod, "_scores", counting)
    q, k, v = make_qkv(1, 512, 512, 1, 1, 16, torch.float32, DEVICE)
    out, _ = _call(q, k, v, window=(16, 0), causal=True, qchunk=64, kchunk=64)
    # Each 64-row query chunk needs keys [i0 - 16, i1): at most 80 keys, i.e. 2 key chunks (1 for the first).
    print(f"{len(tiles)} tiles, {sum(tiles)} key columns computed of {512 * 512 // 64}")
    assert len(tiles) == 1 + 7 * 2 and sum(tiles) == 64 + 7 * 80
    ref, _ = attention_ref(q, k, v, causal=True, window_size=(16, 0))
    assert (out - ref).abs().max() < 1e-5


def test_gradcheck_float64_causal_softcap_alibi():
    q, k, v = make_qkv(2, 5, 7, 2, 1, 3, torch.float64, DEVICE, requires_grad=True)
    slopes = make_alibi(2, 2, True, DEVICE)

    def fn(q, k, v):
        return _call(q, k, v, causal=True, window=(4, 0), softcap=1.5, alibi=slopes, qchunk=3, kchunk=3)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_dropout():
    q, k, v = make_qkv(1, 4, 6, 2, 1, 3, torch.float64, DEVICE, requires_grad=True)

    def fn(q, k, v):
        torch.manual_seed(11)  # the same seed, hence the same mask, on every evaluation
        return _call(q, k, v, dropout_p=0.3, qchunk=2, kchunk=3)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference_with_same_mask(dtype):
    b, sq, sk, h, hk, d, p = 2, 37, 45, 4, 2, 32, 0.2
    q, k, v = make_qkv(b, sq, sk, h, hk, d, dtype, DEVICE, requires_grad=True)
    slopes = make_alibi(b, h, False, DEVICE)
    torch.manual_seed(2024)
    seed = draw_seed(DEVICE)
    mask = dropout_mask_for_call(seed, b, h, sq, sk, p, DEVICE)
    kept = float(mask.float().mean())
    print(f"kept fraction {kept:.4f} (expected {1 - p})")
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / mask.numel())
    kw = dict(causal=True, alibi_slopes=slopes, dropout_p=p, dropout_mask=mask)

    def fn(q, k, v):
        torch.manual_seed(2024)  # the call draws the same seed
        return _call(q, k, v, causal=True, alibi=slopes, dropout_p=p, qchunk=16, kchunk=16)

    out, _ = _check_against_ref(fn, q, k, v, kw)
    # Dropout really happened: without the mask the output differs.
    nodrop, _ = attention_ref(q, k, v, causal=True, alibi_slopes=slopes)
    assert (out.double() - nodrop.double()).abs().max() > 0.05


def _varlen_ref(q, k, v, cu_q, cu_k, masks, **kw):
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        alibi = kw.get("alibi_slopes")
        seq_kw = dict(kw, alibi_slopes=alibi[i] if alibi is not None and alibi.dim() == 2 else alibi)
        if masks is not None:
            seq_kw["dropout_mask"] = masks[i]
        o, lse = attention_ref(q[cq[i]:cq[i + 1]].unsqueeze(0), k[ck[i]:ck[i + 1]].unsqueeze(0),
                               v[ck[i]:ck[i + 1]].unsqueeze(0), **seq_kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_varlen_matches_reference_per_sequence(dropout_p):
    lens_q, lens_k = [5, 0, 17, 33, 4], [9, 6, 0, 40, 4]  # an empty query and an empty key sequence
    h, hk, d = 4, 2, 40
    cu_q, cu_k = make_cu_seqlens(lens_q, DEVICE), make_cu_seqlens(lens_k, DEVICE)
    q = torch.randn(sum(lens_q), h, d, device=DEVICE, requires_grad=True)
    k = torch.randn(sum(lens_k), hk, d, device=DEVICE, requires_grad=True)
    v = torch.randn(sum(lens_k), hk, d, device=DEVICE, requires_grad=True)
    slopes = make_alibi(len(lens_q), h, True, DEVICE)
    torch.manual_seed(7)
    seed = draw_seed(DEVICE)
    masks = (varlen_dropout_masks(seed, cu_q, cu_k, h, max(lens_q), max(lens_k), dropout_p)
             if dropout_p > 0 else None)
    torch.manual_seed(7)
    out, lse = chunked_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                        softmax_scale=d ** -0.5, causal=True, window_size=(-1, 0),
                                        softcap=0.0, alibi_slopes=slopes, dropout_p=dropout_p,
                                        query_chunk_size=8, key_chunk_size=16)
    kw = dict(causal=True, alibi_slopes=slopes, dropout_p=dropout_p)
    ref_out, ref_lse = _varlen_ref(q, k, v, cu_q, cu_k, masks, **kw)
    base_out, base_lse = _varlen_ref(q, k, v, cu_q, cu_k, masks, upcast=False, **kw)
    assert out.shape == q.shape and lse.shape == (h, sum(lens_q))
    dout = torch.randn_like(out)
    results = [tolerance_check(out, ref_out, base_out, name="out"),
               tolerance_check(lse, ref_lse, base_lse, name="lse")]
    for name, g, rg, bg in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                               torch.autograd.grad(ref_out, (q, k, v), dout),
                               torch.autograd.grad(base_out, (q, k, v), dout), strict=True):
        results.append(tolerance_check(g, rg, bg, factor=GRAD_FACTOR, name=name))
    for r in results:
        print(r)
    assert all(r.ok for r in results)
    # Sequence 2 has queries but no keys: output 0, lse -inf.
    assert torch.all(out[5:22] == 0) and torch.all(lse[:, 5:22] == float("-inf"))


def test_public_functions_with_chunked_backend(monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", "chunked")
    b, s, h, d = 2, 19, 4, 24
    qkv = torch.randn(b, s, 3, h, d, device=DEVICE)
    q, k, v = qkv.unbind(2)
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    out, lse, probs = ioattn.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)
    assert probs.shape == (0,) and probs.dtype == qkv.dtype  # flash-attn's S_dmask without dropout
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-5
    out = ioattn.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True)
    assert (out - ref).abs().max() < 1e-5
    cu = make_cu_seqlens([s] * b, DEVICE)
    out = ioattn.flash_attn_varlen_qkvpacked_func(qkv.reshape(b * s, 3, h, d), cu, s, causal=True)
    assert (out.view(b, s, h, d) - ref).abs().max() < 1e-5
    packed_kv = qkv[:, :, 1:].reshape(b * s, 2, h, d)
    out = ioattn.flash_attn_varlen_kvpacked_func(q.reshape(b * s, h, d), packed_kv, cu, cu, s, s, causal=True)
    assert (out.view(b, s, h, d) - ref).abs().max() < 1e-5
    flat = [t.reshape(b * s, h, d) for t in (q, k, v)]
    out = ioattn.flash_attn_varlen_func(*flat, cu, cu, s, s, causal=True)
    assert (out.view(b, s, h, d) - ref).abs().max() < 1e-5


def test_default_chunks(monkeypatch):
    """Calls that give no chunk sizes take ``default_chunks``: the paper's off the CPU; on a CPU (256, 512)
    once more than eight rows (batch x query heads) share a tile, else (512, 1024); a size given is kept.
    The interface's calls take them, and the result is the reference's."""
    import ioattn.chunked as chunked_mod

    assert chunked_mod.default_chunks(torch.device("cuda"), 64) == chunked_mod.PAPER_CHUNKS == (1024, 4096)
    assert chunked_mod.default_chunks(torch.device("cpu"), 9) == (256, 512)
    assert chunked_mod.default_chunks(torch.device("cpu"), 8) == (512, 1024)
    specs = []
    real = chunked_mod._ChunkedAttention.apply
    monkeypatch.setattr(chunked_mod._ChunkedAttention, "apply",
                        lambda *a: specs.append(a[-1]) or real(*a))
    monkeypatch.setenv("IOATTN_BACKEND", "chunked")
    q, k, v = make_qkv(2, 600, 600, 6, 2, 16, torch.float32, DEVICE)
    auto = chunked_mod.default_chunks(q.device, 12)
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    assert (specs[-1].query_chunk, specs[-1].key_chunk) == auto
    ref, _ = attention_ref(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-5
    chunked_attention(q, k, v, softmax_scale=0.25, causal=False, window_size=(-1, -1), softcap=0.0,
                      alibi_slopes=None, dropout_p=0.0, key_chunk_size=100)
    assert (specs[-1].query_chunk, specs[-1].key_chunk) == (auto[0], 100)
    cu = make_cu_seqlens([600, 600], DEVICE)
    flat = [t.reshape(1200, -1, 16) for t in (q, k, v)]
    ioattn.flash_attn_varlen_func(*flat, cu, cu, 600, 600, causal=True)
    assert (specs[-1].query_chunk, specs[-1].key_chunk) == chunked_mod.default_chunks(q.device, 6)


def test_memory_efficient_attention_public():
    q, k, v = make_qkv(1, 50, 70, 6, 3, 40, torch.float32, DEVICE)
    slopes = make_alibi(1, 6, False, DEVICE)
    out, lse = memory_efficient_attention(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes,
                                          query_chunk_size=16, key_chunk_size=24, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes)
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    assert memory_efficient_attention(q, k, v).shape == q.shape
    with pytest.raises(ValueError, match="query_chunk_size"):
        memory_efficient_attention(q, k, v, query_chunk_size=0)
    with pytest.raises(ValueError, match="window_size"):
        memory_efficient_attention(q, k, v, window_size=(-2, 0, 1))
    with pytest.raises(TypeError, match="k.dtype"):
        memory_efficient_attention(q, k.double(), v)


def test_memory_at_8192_is_a_sixteenth_of_standard():
    """Forward + backward at N = 8192 (1 head, d 64, fp32): peak bytes allocated beyond the inputs, from the
    profiler's allocation trace (ioattn.bench.memory.peak_memory_bytes), for both methods."""
    n, d = 8192, 64
    q, k, v = make_qkv(1, n, n, 1, 1, d, torch.float32, "cpu", requires_grad=True)
    dout = torch.randn(1, n, 1, d)
    result = {}

    def chunked_fwd_bwd():
        out, _ = _call(q, k, v)
        result["out"] = out.detach()
        result["grads"] = torch.autograd.grad(out, (q, k, v), dout)

    def standard_fwd_bwd():
        torch.autograd.grad(standard_attention(q, k, v), (q, k, v), dout)

    chunked_peak = peak_memory_bytes(chunked_fwd_bwd, "cpu")
    standard_peak = peak_memory_bytes(standard_fwd_bwd, "cpu")
    nn_bytes = n * n * 4
    print(f"peak MiB: chunked {chunked_peak / 2**20:.1f}, standard {standard_peak / 2**20:.1f} "
          f"(one N x N fp32 matrix is {nn_bytes / 2**20:.0f}); ratio {standard_peak / chunked_peak:.1f}")
    assert standard_peak >= 2 * nn_bytes  # the measurement sees the materialised matrices
    assert chunked_peak * 16 <= standard_peak
    assert chunked_peak < nn_bytes / 4
    # ... and the chunked result is still exact: compare with the float64 reference.
    ref = attention_ref(q, k, v)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    err = (result["out"] - ref).abs().max().item()
    grad_err = max((g - rg).abs().max().item() for g, rg in zip(result["grads"], ref_grads, strict=True))
    print(f"max error vs float64: out {err:.2e}, grads {grad_err:.2e}")
    assert err < 1e-5 and grad_err < 1e-4
