"""``ioattn check``: the public functions on a device against the float64 reference (dense, varlen and packed
attention with gradients and dropout, the chunked path, KV-cache attention over contiguous, left-padded and paged
caches, and a paged serving step: ``write_kv`` and ``flash_attn_varlen_func`` with ``block_table``), with the
tolerance rule of the test suite (ours within 2x of PyTorch's same-dtype error for outputs, 3x for gradients, plus
a floor). Prints a table and returns non-zero if anything fails."""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterator

import torch

from . import interface as api
from .chunked import memory_efficient_attention
from .dropout import draw_seed, generator_at, rng_state
from .reference import attention_ref
from .testing import (
    GRAD_FACTOR,
    OUT_FACTOR,
    ToleranceResult,
    dropout_mask_for_call,
    make_alibi,
    make_cu_seqlens,
    make_qkv,
    max_abs_error,
    tolerance_check,
)

Case = Callable[[torch.device, torch.dtype], Iterator[ToleranceResult]]
FLOOR = 1e-4


def _compare(name, ours, q, k, v, factor=OUT_FACTOR, **ref_kwargs) -> ToleranceResult:
    ref, _ = attention_ref(q, k, v, upcast=True, **ref_kwargs)
    base, _ = attention_ref(q, k, v, upcast=False, **ref_kwargs)
    return tolerance_check(ours, ref, base, factor=factor, floor=FLOOR, name=name)


def case_dense(device, dtype):
    options = [
        ("plain", {}),
        ("causal sq<sk", {"causal": True}),
        ("window (8, 3)", {"window_size": (8, 3)}),
        ("softcap 5", {"softcap": 5.0}),
        ("alibi", {"alibi_slopes": torch.rand(4, device=device) * 0.3}),
    ]
    for label, kw in options:
        q, k, v = make_qkv(2, 77, 91, 4, 2, 64, dtype, device)
        yield _compare(f"flash_attn_func {label}", api.flash_attn_func(q, k, v, **kw), q, k, v, **kw)


def case_grad(device, dtype):
    for causal in (False, True):
        q, k, v = make_qkv(1, 65, 65, 4, 1, 64, dtype, device, requires_grad=True)
        dout = torch.randn_like(q)
        grads = torch.autograd.grad(api.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout)
        ref = torch.autograd.grad(attention_ref(q, k, v, causal=causal, upcast=True)[0], (q, k, v), dout)
        base = torch.autograd.grad(attention_ref(q, k, v, causal=causal, upcast=False)[0], (q, k, v), dout)
        for n, g, r, bgrad in zip("qkv", grads, ref, base, strict=True):
            yield tolerance_check(g, r, bgrad, factor=GRAD_FACTOR, floor=FLOOR,
                                  name=f"flash_attn_func d{n} causal={causal} (MQA)")


def case_dropout(device, dtype):
    q, k, v = make_qkv(2, 40, 40, 2, 2, 32, dtype, device)
    seed = draw_seed(device, generator_at(rng_state(device), device))  # the seed the call will draw
    out, _, s_dmask = api.flash_attn_func(q, k, v, dropout_p=0.2, return_attn_probs=True)
    mask = dropout_mask_for_call(seed, 2, 2, 40, 40, 0.2, device)
    yield _compare("flash_attn_func dropout 0.2", out, q, k, v, dropout_p=0.2, dropout_mask=mask)
    # flash-attn's S_dmask: the kept probabilities (>= 0), scaled by 1 / (1 - p), give the output back
    rebuilt = torch.einsum("bhts,bshd->bthd", s_dmask.float().clamp(min=0) / 0.8, v.float()).to(dtype)
    yield _compare("flash_attn_func dropout S_dmask", rebuilt, q, k, v, dropout_p=0.2, dropout_mask=mask)


def case_varlen(device, dtype):
    lens_q, lens_k = [5, 0, 33, 17], [9, 4, 33, 40]
    h, d = 4, 64
    q = torch.randn(sum(lens_q), h, d, device=device, dtype=dtype)
    kv = torch.randn(sum(lens_k), 2, h, d, device=device, dtype=dtype)
    cu_q, cu_k = make_cu_seqlens(lens_q, device), make_cu_seqlens(lens_k, device)
    out = api.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    out2 = api.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    refs, bases = [], []
    for b in range(len(lens_q)):
        qs = q[cu_q[b]:cu_q[b + 1]].unsqueeze(0)
        ks, vs = (kv[cu_k[b]:cu_k[b + 1], i].unsqueeze(0) for i in (0, 1))
        refs.append(attention_ref(qs, ks, vs, causal=True)[0][0])
        bases.append(attention_ref(qs, ks, vs, causal=True, upcast=False)[0][0])
    ref, base = torch.cat(refs), torch.cat(bases)
    yield tolerance_check(out, ref, base, floor=FLOOR, name="flash_attn_varlen_kvpacked_func causal")
    yield tolerance_check(out2, ref, base, floor=FLOOR, name="flash_attn_varlen_func causal")
    qkv = torch.randn(sum(lens_k), 3, h, d, device=device, dtype=dtype)
    out3 = api.flash_attn_varlen_qkvpacked_func(qkv, cu_k, max(lens_k))
    refs = [attention_ref(*(qkv[cu_k[b]:cu_k[b + 1], i].unsqueeze(0) for i in range(3)), upcast=up)[0][0]
            for up in (True, False) for b in range(len(lens_k))]
    n = len(lens_k)
    yield tolerance_check(out3, torch.cat(refs[:n]), torch.cat(refs[n:]), floor=FLOOR,
                          name="flash_attn_varlen_qkvpacked_func")


def case_packed(device, dtype):
    qkv = torch.randn(2, 50, 3, 4, 64, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    yield _compare("flash_attn_qkvpacked_func causal", api.flash_attn_qkvpacked_func(qkv, causal=True), q, k, v,
                   causal=True)
    kv = torch.randn(2, 70, 2, 2, 64, device=device, dtype=dtype)
    yield _compare("flash_attn_kvpacked_func", api.flash_attn_kvpacked_func(q, kv), q, kv[:, :, 0], kv[:, :, 1])


def case_memory_efficient(device, dtype):
    q, k, v = make_qkv(1, 300, 300, 2, 1, 64, dtype, device)
    out = memory_efficient_attention(q, k, v, causal=True, query_chunk_size=128, key_chunk_size=64)
    yield _compare("memory_efficient_attention causal", out, q, k, v, causal=True)


def _paged_copy(cache_k: torch.Tensor, cache_v: torch.Tensor, block: int):
    """(paged_k, paged_v, block_table): a contiguous cache (batch, capacity, nheads_k, d), capacity a multiple of
    ``block``, as pages at shuffled physical positions."""
    b, cap, hk, d = cache_k.shape
    nblk = cap // block
    perm = torch.randperm(b * nblk, device=cache_k.device)
    paged_k = torch.empty(b * nblk, block, hk, d, device=cache_k.device, dtype=cache_k.dtype)
    paged_v = torch.empty_like(paged_k)
    paged_k[perm] = cache_k.reshape(b * nblk, block, hk, d)
    paged_v[perm] = cache_v.reshape(b * nblk, block, hk, d)
    return paged_k, paged_v, perm.view(b, nblk).to(torch.int32)


def case_kvcache(device, dtype):
    from .kvcache import flash_attn_with_kvcache

    b, h, hk, d, block = 3, 8, 2, 64, 16
    lens = [1, 37, 64]
    cache_k = torch.randn(b, 80, hk, d, device=device, dtype=dtype)
    cache_v = torch.randn(b, 80, hk, d, device=device, dtype=dtype)
    q = torch.randn(b, 1, h, d, device=device, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=seqlens)
    paged_k, paged_v, table = _paged_copy(cache_k, cache_v, block)
    out_paged = flash_attn_with_kvcache(q, paged_k, paged_v, cache_seqlens=seqlens, block_table=table)
    for label, got in (("contiguous", out), ("paged block 16", out_paged)):
        for i, n in enumerate(lens):
            args = (q[i:i + 1], cache_k[i:i + 1, :n], cache_v[i:i + 1, :n])
            yield _compare(f"flash_attn_with_kvcache {label} len {n}", got[i:i + 1], *args)


def case_kvcache_leftpad(device, dtype):
    """Left-padded caches (``cache_leftpad``), contiguous and paged (the pages before a pad: -1 in the table):
    two new tokens appended and queried, causal with a window and ALiBi, which count keys from the pad."""
    from .kvcache import flash_attn_with_kvcache

    b, h, hk, d, block, cap, new = 3, 8, 2, 64, 16, 80, 2
    lens, pads = [5, 37, 60], [0, 10, 53]
    cache_k = torch.randn(b, cap, hk, d, device=device, dtype=dtype)
    cache_v = torch.randn(b, cap, hk, d, device=device, dtype=dtype)
    q = torch.randn(b, new, h, d, device=device, dtype=dtype)
    k_new = torch.randn(b, new, hk, d, device=device, dtype=dtype)
    v_new = torch.randn(b, new, hk, d, device=device, dtype=dtype)
    slopes = make_alibi(b, h, per_batch=False, device=device)
    paged_k, paged_v, table = _paged_copy(cache_k, cache_v, block)
    for i, pad in enumerate(pads):
        table[i, : pad // block] = -1
    kwargs = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
                  cache_leftpad=torch.tensor(pads, dtype=torch.int32, device=device), causal=True,
                  window_size=(20, -1), alibi_slopes=slopes)
    out = flash_attn_with_kvcache(q, cache_k, cache_v, k_new, v_new, **kwargs)
    out_paged = flash_attn_with_kvcache(q, paged_k, paged_v, k_new, v_new, block_table=table, **kwargs)
    for label, got in (("contiguous", out), ("paged block 16", out_paged)):
        for i, (n, pad) in enumerate(zip(lens, pads, strict=True)):
            keys = torch.cat((cache_k[i:i + 1, pad:n], k_new[i:i + 1]), dim=1)
            values = torch.cat((cache_v[i:i + 1, pad:n], v_new[i:i + 1]), dim=1)
            yield _compare(f"flash_attn_with_kvcache {label} leftpad {pad} len {n} + {new}", got[i:i + 1],
                           q[i:i + 1], keys, values, causal=True, window_size=(20, -1), alibi_slopes=slopes)


def case_paged_step(device, dtype):
    """One serving step on a paged cache: a prefill chunk's and a decode row's new tokens written by slot
    (``write_kv``), then their queries over their pages (``flash_attn_varlen_func`` with ``block_table``); and
    new tokens appended to a contiguous cache by ``flash_attn_with_kvcache`` itself."""
    from .kvcache import flash_attn_with_kvcache, write_kv

    h, hk, d, block, nblk = 8, 2, 64, 16, 3
    lens_k, new = [21, 40], [5, 1]  # keys after the step; tokens (and queries) of the step
    b = len(lens_k)
    table = torch.randperm(b * nblk, device=device).view(b, nblk).to(torch.int32)
    paged_k = torch.randn(b * nblk, block, hk, d, device=device, dtype=dtype)
    paged_v = torch.randn_like(paged_k)
    k_new = torch.randn(sum(new), hk, d, device=device, dtype=dtype)
    v_new = torch.randn_like(k_new)
    pos = [p for i in range(b) for p in range(lens_k[i] - new[i], lens_k[i])]
    seq = [i for i in range(b) for _ in range(new[i])]
    slots = torch.tensor([int(table[i, p // block]) * block + p % block for i, p in zip(seq, pos, strict=True)],
                         dtype=torch.int64, device=device)
    write_kv(k_new, v_new, paged_k, paged_v, slots)
    written = torch.equal(paged_k.view(-1, hk, d)[slots], k_new) and torch.equal(paged_v.view(-1, hk, d)[slots], v_new)
    yield ToleranceResult("write_kv by slot mapping", 0.0 if written else math.inf, 0.0, 0.0)
    q = torch.randn(sum(new), h, d, device=device, dtype=dtype)
    cu_q, cu_k = make_cu_seqlens(new, device), make_cu_seqlens(lens_k, device)
    out = api.flash_attn_varlen_func(q, paged_k, paged_v, cu_q, cu_k, max(new), max(lens_k), causal=True,
                                     block_table=table)
    for i in range(b):
        keys = paged_k[table[i].long()].reshape(-1, hk, d)[None, :lens_k[i]]
        vals = paged_v[table[i].long()].reshape(-1, hk, d)[None, :lens_k[i]]
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        yield _compare(f"flash_attn_varlen_func block_table causal seq {i}", out[rows][None], q[rows][None],
                       keys, vals, causal=True)
    cache_k = torch.randn(b, 48, hk, d, device=device, dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    qs = torch.randn(b, 3, h, d, device=device, dtype=dtype)
    ks, vs = (torch.randn(b, 3, hk, d, device=device, dtype=dtype) for _ in range(2))
    lens = torch.tensor([7, 30], dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(qs, cache_k, cache_v, ks, vs, cache_seqlens=lens, causal=True)
    for i in range(b):
        n = int(lens[i]) + 3
        yield _compare(f"flash_attn_with_kvcache append 3 causal seq {i}", out[i:i + 1], qs[i:i + 1],
                       cache_k[i:i + 1, :n], cache_v[i:i + 1, :n], causal=True)


def case_sdpa(device, dtype):
    """The SDPA drop-in against torch's own SDPA (float64 the truth, the inputs' dtype the baseline): top-left
    causal with more and with fewer queries than keys, both layouts it reads, GQA, output and gradients."""
    from .sdpa import _computable, _torch_sdpa, scaled_dot_product_attention

    probe = torch.empty(1, 1, 1, 8, device=device, dtype=dtype)
    if not _computable(probe, probe, probe, None, 0.0, False, None, False)[0]:
        # On this device the drop-in hands these calls to torch's SDPA: check that it does, bit for bit.
        q, k, v = (t.transpose(1, 2) for t in make_qkv(2, 77, 91, 4, 2, 64, dtype, device))
        kw = {"is_causal": True, "enable_gqa": True}
        err = max_abs_error(scaled_dot_product_attention(q, k, v, **kw), _torch_sdpa(q, k, v, **kw))
        yield ToleranceResult("scaled_dot_product_attention (torch's SDPA on this device)", err, 0.0, 0.0)
        return
    cases = [("(B, H, L, E), sq<sk", 77, 91, True), ("transposed view, sq>sk", 91, 77, False)]
    for label, sq, sk, heads_major in cases:
        q, k, v = make_qkv(2, sq, sk, 4, 2, 64, dtype, device)  # (batch, seqlen, heads, d)
        q, k, v = ((t.transpose(1, 2).contiguous() if heads_major else t.transpose(1, 2)).requires_grad_()
                   for t in (q, k, v))
        kw = {"is_causal": True, "enable_gqa": True}
        out = scaled_dot_product_attention(q, k, v, **kw)
        dout = torch.randn_like(out)
        runs = [(out, torch.autograd.grad(out, (q, k, v), dout))]
        for cast in (torch.float64, dtype):
            leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
            ref = _torch_sdpa(*leaves, **kw)
            runs.append((ref, torch.autograd.grad(ref, leaves, dout.to(cast))))
        (o, g), (ro, rg), (bo, bg) = runs
        yield tolerance_check(o, ro, bo, factor=OUT_FACTOR, floor=FLOOR, name=f"scaled_dot_product_attention {label}")
        for n, ours, ref, base in zip("qkv", g, rg, bg, strict=True):
            yield tolerance_check(ours, ref, base, factor=GRAD_FACTOR, floor=FLOOR,
                                  name=f"scaled_dot_product_attention {label} d{n}")


CASES: list[Case] = [case_dense, case_grad, case_dropout, case_varlen, case_packed, case_memory_efficient,
                     case_kvcache, case_kvcache_leftpad, case_paged_step, case_sdpa]


def run_checks(device: str = "cpu") -> int:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    torch.manual_seed(0)
    print(f"ioattn check on {dev} in {dtype} (rule: ours <= {OUT_FACTOR:g}x PyTorch's same-dtype error for outputs, "
          f"{GRAD_FACTOR:g}x for gradients, + {FLOOR:g})")
    rows, failed = [], 0
    for i, case in enumerate(CASES, 1):
        print(f"  [{i}/{len(CASES)}] {case.__name__.removeprefix('case_')} ...".ljust(40), end="\r", flush=True)
        try:
            for res in case(dev, dtype):
                rows.append(res)
                failed += not res.ok
        except Exception as e:  # a crash in one case is a failure, reported, not a traceback wall
            failed += 1
            rows.append(ToleranceResult(f"{case.__name__} raised {type(e).__name__}", math.inf, math.nan, math.nan))
            traceback.print_exc()
            print(f"{case.__name__} raised {type(e).__name__}: {e}")
    width = max(len(r.name) for r in rows)
    print(f"{'check':<{width}}  {'ours':>10}  {'pytorch':>10}  {'bound':>10}  verdict")
    for r in rows:
        print(f"{r.name:<{width}}  {r.our_error:>10.2e}  {r.base_error:>10.2e}  {r.bound:>10.2e}  "
              f"{'ok' if r.ok else 'FAIL'}")
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
