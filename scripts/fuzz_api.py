"""Random calls of the public API against the float64 reference, under the suite's tolerance rule.

Each case draws its shapes and options from its own seed, weighted toward the edges: one-row inputs, lengths
next to multiples of the tiles, head dims off the fast paths, GQA, strided views, empty sequences, one-key
caches, pages of 1 to 256 tokens. Five entry points:
- ``flash_attn_func`` (and its ``qkv`` / ``kv`` packed forms): forward, lse and gradients, with causal,
  windows, softcap, ALiBi, dropout (the mask rebuilt from the call's seed), and deterministic backwards
  repeated bit for bit;
- ``flash_attn_varlen_func``: the same on packed sequences;
- ``flash_attn_with_kvcache``: contiguous and paged caches (unused slots NaN), appends (rotary too), splits,
  ``cache_leftpad`` and ``cache_batch_idx``;
- ``flash_attn_varlen_func`` with ``block_table``: a serving step's decode and prefill rows over a paged cache;
- ``scaled_dot_product_attention``: torch's layout and semantics, against torch's own SDPA in float64.
A crash, a hang or a tolerance miss is kept with its case (the exit code is 1 if any); ``--replay SEED``
runs cases again and prints every check. Replays of bf16 cases in Triton's interpreter can miss by a rounding
(its fp32 -> bf16 casts truncate); replay those on a GPU.

Usage: fuzz_api.py [--seconds 300] [--workers 8] [--seed 0] [--out DIR] [--device cuda] [--replay SEED]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time

import torch

SEQLENS = (1, 1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 191, 255, 256, 257, 383, 511,
           512, 513, 640, 1023, 1025)
HEADDIMS = (64, 64, 128, 128, 128, 256, 256, 32, 96, 80, 40, 8, 16, 160, 192, 200, 224, 72, 1, 3)
HEADS = ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (8, 1), (8, 2), (8, 8), (12, 4), (16, 2), (32, 8))
FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
MAX_SCORES = 6_000_000  # batch x heads x seqlen_q x seqlen_k: the float64 reference's size


def _options(rng: random.Random, sq: int, sk: int, nheads: int, batch: int) -> dict:
    c = {"causal": rng.random() < 0.35}
    if rng.random() < 0.25:
        c["window_size"] = (rng.choice([-1, 0, 1, 5, 63, 64, 200]), rng.choice([-1, 0, 1, 9, 128]))
    if rng.random() < 0.2:
        c["softcap"] = rng.choice([5.0, 30.0])
    if rng.random() < 0.2:
        c["alibi"] = rng.choice(["heads", "batch"])
    return c


def _dropout(rng: random.Random, case: dict, lens_k: list[int]) -> float:
    """A drop probability for some cases whose rows see 16 keys or more (no window). Where every row sees one
    key, the true dQ and dK are 0 and torch's same-dtype autograd gets exactly 0, while a FlashAttention
    backward (flash-attn's too) takes the row's dP sum from the output rounded to 16 bits, whose error then
    stands alone against a bound of the floor."""
    if "window_size" in case or any(0 < n < 16 for n in lens_k) or rng.random() >= 0.15:
        return 0.0
    return rng.choice([0.1, 0.5])


def _one_key_rows(case: dict, lens_k: list[int]) -> bool:
    """Whether some sequence's rows each see at most one key (one key, or a window of zero width)."""
    left, right = case.get("window_size", (-1, -1))
    return 1 in lens_k or (left == 0 and (right == 0 or case.get("causal", False)))


def draw_case(seed: int) -> dict:
    """The case of ``seed``: a dict of plain values (JSON), every tensor built from it by ``run_case``."""
    rng = random.Random(seed)
    api = rng.choices(["dense", "varlen", "kvcache", "paged", "sdpa"], weights=[4, 2, 3, 2, 2])[0]
    dtype = rng.choices(["bfloat16", "float16", "float32"], weights=[6, 3, 1])[0]
    d = rng.choice(HEADDIMS)
    hq, hk = rng.choice(HEADS)
    batch = rng.choice([1, 1, 1, 2, 3, 4])
    case = {"seed": seed, "api": api, "dtype": dtype, "d": d, "nheads": hq, "nheads_k": hk, "batch": batch}
    if api in ("dense", "sdpa"):
        sq, sk = rng.choice(SEQLENS), rng.choice(SEQLENS)
        if rng.random() < 0.3:
            sk = sq
        while batch * hq * sq * sk > MAX_SCORES:
            sq, sk = max(1, sq // 2), max(1, sk // 2)
        case.update(seqlen_q=sq, seqlen_k=sk, strided=rng.random() < 0.3)
    if api == "dense":
        case.update(_options(rng, sq, sk, hq, batch))
        r = rng.random()
        if r < 0.12 and sq == sk and hq == hk:
            case["packed"] = "qkv"
        elif r < 0.24:
            case["packed"] = "kv"
        case["dropout_p"] = _dropout(rng, case, [sk])
        case["deterministic"] = rng.random() < 0.2
    elif api == "sdpa":
        case.update(is_causal=rng.random() < 0.4, scale=rng.choice([None, None, 0.05, 0.3]),
                    grad=rng.random() < 0.6)
    elif api == "varlen":
        lens_q = [rng.choice(SEQLENS + (0,)) for _ in range(batch)]
        same = rng.random() < 0.5
        lens_k = list(lens_q) if same else [rng.choice(SEQLENS + (0,)) for _ in range(batch)]
        case.update(lens_q=lens_q, lens_k=lens_k, **_options(rng, max(lens_q), max(lens_k), hq, batch))
        case["dropout_p"] = _dropout(rng, case, lens_k)
        case["deterministic"] = rng.random() < 0.2
    elif api == "kvcache":
        new = rng.choice([0, 0, 1, 2, 4])
        sq = new if new else rng.choice([1, 1, 1, 2, 4, 7, 16])
        lens = [rng.choice((0, 1, 2, 15, 16, 17, 100, 255, 256, 1000, 3000)) for _ in range(batch)]
        page = rng.choice([0, 0, 1, 16, 16, 32, 64, 256])
        case.update(lens=lens, seqlen_new=new, seqlen_q=sq, page=page, spare=rng.choice([0, 0, 1, 5]),
                    num_splits=rng.choice([0, 0, 0, 1, 3, 8]), **_options(rng, sq, max(lens) + new, hq, batch))
        if rng.random() < 0.2:
            case["leftpad"] = [rng.randint(0, n) for n in lens]
        dims = [r for r in (d - d % 2, 16, 32, 64) if 2 <= r <= d]
        if new and "leftpad" not in case and dims and rng.random() < 0.3:
            case["rotary"] = [rng.choice(dims), rng.random() < 0.5]  # rotary_dim, interleaved
        if not page and rng.random() < 0.2:
            case["extra_rows"] = rng.choice([1, 3])
    elif api == "paged":
        batch = rng.choice([1, 2, 3, 5, 8])
        lens_q = [1 if rng.random() < 0.5 else rng.choice((2, 5, 16, 17, 64, 100, 128, 129, 300, 512))
                  for _ in range(batch)]
        lens_k = [n + rng.choice((0, 0, 1, 15, 16, 100, 1000, 2000)) for n in lens_q]
        case.update(batch=batch, lens_q=lens_q, lens_k=lens_k, page=rng.choice([1, 8, 16, 16, 32, 64, 256]),
                    spare=rng.choice([0, 1, 4]), **_options(rng, max(lens_q), max(lens_k), hq, batch))
    if case["dtype"] == "float32" and api != "kvcache" and _one_key_rows(
            case, case.get("lens_k") or [case.get("seqlen_k", 0)]):
        # fp32 rows of one key: the true dK is 0 and PyTorch's exactly 0, a FlashAttention backward's the
        # rounding of dP - delta (test_large_logits_stay_finite floors the same); known, not drawn.
        case["dtype"] = "bfloat16"
    return case


def _mods(case: dict, device, batch_rows: int | None = None) -> dict:
    """The call's keyword arguments besides dropout (ALiBi slopes drawn on the device)."""
    kw = {k: case[k] for k in ("causal", "window_size", "softcap") if k in case}
    if "alibi" in case:
        shape = (case["nheads"],) if case["alibi"] == "heads" else (batch_rows or case["batch"], case["nheads"])
        kw["alibi_slopes"] = torch.rand(shape, device=device) * 0.5 + 0.05
    return kw


def _slopes_of(kw: dict, b: int) -> dict:
    """Sequence b's reference keywords (per-sequence slopes sliced)."""
    kw = dict(kw)
    s = kw.get("alibi_slopes")
    if s is not None and s.dim() == 2:
        kw["alibi_slopes"] = s[b:b + 1]
    return kw


def _tensor(shape, dtype, device, strided: bool, rng: torch.Generator):
    """Standard normal (batch, seqlen, heads, d); ``strided``: a view of (batch, heads, seqlen, d) memory."""
    if strided:
        b, s, h, d = shape
        return torch.randn(b, h, s, d, generator=rng).to(device, dtype).transpose(1, 2)
    return torch.randn(shape, generator=rng).to(device, dtype)


def _check(results: list, name: str, ours, ref, base, factor: float, floor: float) -> None:
    from ioattn.testing import tolerance_check
    results.append(tolerance_check(ours, ref, base, factor=factor, floor=floor, name=name))


def _grad_checks(results, out, refs, leaves, dout, floor, names=("q", "k", "v")):
    from ioattn.testing import GRAD_FACTOR
    ours = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    ref = torch.autograd.grad(refs[0], leaves, dout)
    base = torch.autograd.grad(refs[1], leaves, dout)
    for n, g, r, b in zip(names, ours, ref, base, strict=True):
        _check(results, f"d{n}", g, r, b, GRAD_FACTOR, floor)
    return ours


def run_dense(case: dict, device) -> list:
    import ioattn
    from ioattn.dropout import draw_seed, generator_at, rng_state
    from ioattn.reference import attention_ref
    from ioattn.testing import OUT_FACTOR, dropout_mask_for_call
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, floor = getattr(torch, case["dtype"]), FLOORS[getattr(torch, case["dtype"])]
    b, sq, sk, h, hk, d = (case[x] for x in ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_k", "d"))
    packed = case.get("packed")
    if packed == "qkv":  # (batch, seqlen, 3, nheads, d): q, k, v its views
        qkv = torch.randn(b, sq, 3, h, d, generator=gen).to(device, dtype).requires_grad_()
        (q, k, v), leaves, names = qkv.unbind(2), (qkv,), ("qkv",)
    else:
        q = _tensor((b, sq, h, d), dtype, device, case["strided"], gen).requires_grad_()
        if packed == "kv":
            kv = torch.randn(b, sk, 2, hk, d, generator=gen).to(device, dtype).requires_grad_()
            (k, v), leaves, names = kv.unbind(2), (q, kv), ("q", "kv")
        else:
            k = _tensor((b, sk, hk, d), dtype, device, case["strided"], gen).requires_grad_()
            v = _tensor((b, sk, hk, d), dtype, device, case["strided"], gen).requires_grad_()
            leaves, names = (q, k, v), ("q", "k", "v")
    kw, p = _mods(case, device), case["dropout_p"]
    mask = None
    if p > 0:
        seed = draw_seed(device, generator_at(rng_state(device), device))
        mask = dropout_mask_for_call(seed, b, h, sq, sk, p, device)
    common = dict(dropout_p=p, deterministic=case["deterministic"], return_attn_probs=True, **kw)
    if packed == "qkv":
        out, lse, _ = ioattn.flash_attn_qkvpacked_func(qkv, **common)
    elif packed == "kv":
        out, lse, _ = ioattn.flash_attn_kvpacked_func(q, kv, **common)
    else:
        out, lse, _ = ioattn.flash_attn_func(q, k, v, **common)
    refs = [attention_ref(q, k, v, dropout_p=p, dropout_mask=mask, upcast=up, **kw) for up in (True, False)]
    results = []
    _check(results, "out", out, refs[0][0], refs[1][0], OUT_FACTOR, floor)
    _check(results, "lse", lse, refs[0][1], refs[1][1], OUT_FACTOR, floor)
    dout = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = _grad_checks(results, out, [refs[0][0], refs[1][0]], leaves, dout, floor, names)
    if case["deterministic"]:
        again = torch.autograd.grad(out, leaves, dout)
        same = all(torch.equal(a, g) for a, g in zip(again, grads, strict=True))
        results.append(("deterministic backward repeats", same))
    return results


def run_varlen(case: dict, device) -> list:
    import ioattn
    from ioattn.dropout import draw_seed, generator_at, rng_state
    from ioattn.reference import attention_ref
    from ioattn.testing import OUT_FACTOR, make_cu_seqlens, varlen_dropout_masks
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, floor = getattr(torch, case["dtype"]), FLOORS[getattr(torch, case["dtype"])]
    lq, lk, h, hk, d = case["lens_q"], case["lens_k"], case["nheads"], case["nheads_k"], case["d"]
    q = torch.randn(sum(lq), h, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(sum(lk), hk, d, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(sum(lk), hk, d, generator=gen).to(device, dtype).requires_grad_()
    cu_q, cu_k = make_cu_seqlens(lq, device), make_cu_seqlens(lk, device)
    kw, p = _mods(case, device), case["dropout_p"]
    masks = None
    if p > 0:
        seed = draw_seed(device, generator_at(rng_state(device), device))
        masks = varlen_dropout_masks(seed, cu_q, cu_k, h, max(lq), max(lk), p)
    out, lse, _ = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), dropout_p=p,
                                                deterministic=case["deterministic"], return_attn_probs=True, **kw)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = ([], []), ([], [])
    for i in range(len(lq)):
        qs, ks, vs = q[cq[i]:cq[i + 1]][None], k[ck[i]:ck[i + 1]][None], v[ck[i]:ck[i + 1]][None]
        for j, up in enumerate((True, False)):
            o, s = attention_ref(qs, ks, vs, dropout_p=p, dropout_mask=None if masks is None else masks[i],
                                 upcast=up, **_slopes_of(kw, i))
            outs[j].append(o[0])
            lses[j].append(s[0])
    results = []
    ref_out, base_out = torch.cat(outs[0]), torch.cat(outs[1])
    _check(results, "out", out, ref_out, base_out, OUT_FACTOR, floor)
    _check(results, "lse", lse, torch.cat(lses[0], dim=1), torch.cat(lses[1], dim=1), OUT_FACTOR, floor)
    dout = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = _grad_checks(results, out, [ref_out, base_out], (q, k, v), dout, floor)
    if case["deterministic"]:
        again = torch.autograd.grad(out, (q, k, v), dout)
        results.append(("deterministic backward repeats",
                        all(torch.equal(a, g) for a, g in zip(again, grads, strict=True))))
    return results


def _cache(gen, lens: list[int], page: int, spare: int, rows: int, nheads_k: int, d: int, dtype, fill=None):
    """A NaN cache holding ``lens[i]`` random keys and values for sequence i, which ``fill`` (a list of
    (first, stop) per sequence, default (0, lens[i])) narrows. page 0: contiguous (rows, capacity, ...), row i
    for sequence i; else shuffled pages of ``page`` tokens, a spare NaN page in every table entry no key needs.
    Returns (k_cache, v_cache, table or None, slots): slots(i) the flat indices of sequence i's positions."""
    b = len(lens)
    if page:
        per_seq = [math.ceil(n / page) for n in lens]
        num_blocks = sum(per_seq) + 2
        order = torch.randperm(num_blocks, generator=gen)
        table = torch.full((b, max(1, max(per_seq) + spare)), int(order[-1]), dtype=torch.int32)
        used = 0
        for i, n in enumerate(per_seq):
            table[i, :n] = order[used:used + n]
            used += n
        shape = (num_blocks, page, nheads_k, d)

        def slots(i, n=None):
            pos = torch.arange(lens[i] if n is None else n)
            return table[i, pos // page].long() * page + pos % page
    else:
        table, shape = None, (rows, max(max(lens, default=0) + spare, 1), nheads_k, d)

        def slots(i, n=None):
            return i * shape[1] + torch.arange(lens[i] if n is None else n)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for i in range(b):
        first, stop = (0, lens[i]) if fill is None else fill[i]
        idx = slots(i)[first:stop]
        k_cache.view(-1, nheads_k, d)[idx] = torch.randn(len(idx), nheads_k, d, generator=gen).to(dtype)
        v_cache.view(-1, nheads_k, d)[idx] = torch.randn(len(idx), nheads_k, d, generator=gen).to(dtype)
    return k_cache, v_cache, table, slots


def run_kvcache(case: dict, device) -> list:
    from ioattn.kvcache import flash_attn_with_kvcache
    from ioattn.reference import attention_ref
    from ioattn.rotary import apply_rotary_emb
    from ioattn.testing import OUT_FACTOR
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, floor = getattr(torch, case["dtype"]), FLOORS[getattr(torch, case["dtype"])]
    b, h, hk, d, sq, new = (case[x] for x in ("batch", "nheads", "nheads_k", "d", "seqlen_q", "seqlen_new"))
    lens, page, pads = case["lens"], case["page"], case.get("leftpad")
    after = [n + new for n in lens]
    extra = case.get("extra_rows", 0)
    row_of = list(range(b))
    if extra:  # cache_batch_idx: the sequences take shuffled rows of a larger cache
        row_of = torch.randperm(b + extra, generator=gen)[:b].tolist()
    row_lens = [0] * (b + extra)
    for i, n in enumerate(after):
        row_lens[row_of[i]] = n
    fill = [(0, 0)] * (b + extra)
    for i, n in enumerate(lens):
        fill[row_of[i]] = (pads[i] if pads else 0, n)
    k_cache, v_cache, table, slots = _cache(gen, row_lens if not page else after, page, case["spare"], b + extra,
                                            hk, d, dtype, fill if not page else fill[:b])
    if table is not None and pads:
        for i, pad in enumerate(pads):
            table[i, :pad // page] = -1  # pages wholly before the pad are never read
    q = torch.randn(b, sq, h, d, generator=gen).to(dtype)
    k_new = torch.randn(b, new, hk, d, generator=gen).to(dtype) if new else None
    v_new = torch.randn(b, new, hk, d, generator=gen).to(dtype) if new else None
    capacity = table.shape[1] * page if page else k_cache.shape[1]
    cos = sin = q_ref = k_ref = None
    if case.get("rotary"):  # q and the new keys rotated at their positions (flash-attn's rule)
        rdim, interleaved = case["rotary"]
        angles = torch.rand(capacity, rdim // 2, generator=gen) * 6
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        offsets = torch.tensor(lens)
        k_ref = apply_rotary_emb(k_new, cos, sin, interleaved, seqlen_offsets=offsets)
        if case.get("causal") or tuple(case.get("window_size", (-1, -1))) != (-1, -1):
            q_ref = apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets=offsets)  # row j at lens + j
        else:  # every row at the cache's length
            q_ref = torch.stack([apply_rotary_emb(q[i][:, None], cos, sin, interleaved, seqlen_offsets=lens[i])[:, 0]
                                 for i in range(b)])
    # What the cache must hold after the call (the appended tokens written, nothing else touched), and the
    # reference's keys, from before the call.
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    seq_slots = [slots(row_of[i] if not page else i, n) for i, n in enumerate(after)]
    appended = torch.zeros(expect_k.shape[:-2].numel(), dtype=torch.bool)
    if new:
        for i in range(b):
            expect_k.view(-1, hk, d)[seq_slots[i][lens[i]:]] = (k_new if k_ref is None else k_ref)[i]
            expect_v.view(-1, hk, d)[seq_slots[i][lens[i]:]] = v_new[i]
            appended[seq_slots[i][lens[i]:]] = True
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    k_cache, v_cache, q_dev, k_new, v_new = dev(k_cache), dev(v_cache), dev(q), dev(k_new), dev(v_new)
    kw = _mods(case, device)
    out, lse = flash_attn_with_kvcache(
        q_dev, k_cache, v_cache, k=k_new, v=v_new, rotary_cos=dev(cos), rotary_sin=dev(sin),
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
        cache_batch_idx=torch.tensor(row_of, dtype=torch.int32, device=device) if extra else None,
        cache_leftpad=torch.tensor(pads, dtype=torch.int32, device=device) if pads else None,
        block_table=None if table is None else table.to(device), num_splits=case["num_splits"],
        rotary_interleaved=bool(case["rotary"][1]) if case.get("rotary") else True, return_softmax_lse=True, **kw)
    same = lambda a, b: bool(((a == b) | (a.isnan() & b.isnan())).all())  # noqa: E731
    got_k = k_cache.cpu().view(-1, hk, d)
    # rotated keys: a rounding of their own (a few units in the last place); everything else exactly
    tol = 0.0 if k_ref is None else 4 * torch.finfo(dtype).eps
    rotated_ok = torch.allclose(got_k[appended].float(), expect_k.view(-1, hk, d)[appended].float(), rtol=tol,
                                atol=tol)
    results = [("the cache: the appended tokens written, nothing else touched",
                same(got_k[~appended], expect_k.view(-1, hk, d)[~appended]) and rotated_ok
                and same(v_cache.cpu(), expect_v))]
    flat_k, flat_v = expect_k.view(-1, hk, d).to(device), expect_v.view(-1, hk, d).to(device)
    q = q_dev if q_ref is None else q_ref.to(device)
    for i in range(b):
        first = pads[i] if pads else 0
        idx = seq_slots[i][first:].to(device)
        ks, vs = flat_k[idx][None], flat_v[idx][None]
        refs = [attention_ref(q[i:i + 1], ks, vs, upcast=up, **_slopes_of(kw, i)) for up in (True, False)]
        _check(results, f"seq {i} out", out[i:i + 1], refs[0][0], refs[1][0], OUT_FACTOR, floor)
        _check(results, f"seq {i} lse", lse[i:i + 1], refs[0][1], refs[1][1], OUT_FACTOR, floor)
    return results


def run_paged(case: dict, device) -> list:
    """``flash_attn_varlen_func`` with ``block_table``: a serving step's queries (each sequence's last rows)
    over their keys in a paged cache."""
    import ioattn
    from ioattn.reference import attention_ref
    from ioattn.testing import OUT_FACTOR, make_cu_seqlens
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, floor = getattr(torch, case["dtype"]), FLOORS[getattr(torch, case["dtype"])]
    h, hk, d, lq, lk = case["nheads"], case["nheads_k"], case["d"], case["lens_q"], case["lens_k"]
    k_cache, v_cache, table, slots = _cache(gen, lk, case["page"], case["spare"], len(lk), hk, d, dtype)
    k_cache, v_cache, table = k_cache.to(device), v_cache.to(device), table.to(device)
    q = torch.randn(sum(lq), h, d, generator=gen).to(device, dtype)
    cu_q, cu_k = make_cu_seqlens(lq, device), make_cu_seqlens(lk, device)
    kw = _mods(case, device)
    out, lse, _ = ioattn.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lq), max(lk),
                                                block_table=table, return_attn_probs=True, **kw)
    results = []
    cq = cu_q.tolist()
    for i in range(len(lq)):
        idx = slots(i).to(device)
        ks, vs = k_cache.view(-1, hk, d)[idx][None], v_cache.view(-1, hk, d)[idx][None]
        rows = slice(cq[i], cq[i + 1])
        refs = [attention_ref(q[rows][None], ks, vs, upcast=up, **_slopes_of(kw, i)) for up in (True, False)]
        _check(results, f"seq {i} out", out[rows][None], refs[0][0], refs[1][0], OUT_FACTOR, floor)
        _check(results, f"seq {i} lse", lse[:, rows][None], refs[0][1], refs[1][1], OUT_FACTOR, floor)
    return results


def run_sdpa(case: dict, device) -> list:
    import ioattn
    from ioattn.backend import select_backend
    from ioattn.testing import OUT_FACTOR
    torch_sdpa = ioattn.sdpa._torch_sdpa
    if select_backend(device) == "chunked" and not os.environ.get("IOATTN_BACKEND", "").strip():
        return None  # the drop-in calls torch's SDPA on this device: nothing of ioattn's to check
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, floor = getattr(torch, case["dtype"]), FLOORS[getattr(torch, case["dtype"])]
    b, sq, sk, h, hk, d = (case[x] for x in ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_k", "d"))
    # (B, H, L, E): contiguous, or a transposed view of (B, L, H, E) memory
    q, k, v = (_tensor((b, n, heads, d), dtype, device, not case["strided"], gen).transpose(1, 2)
               for n, heads in ((sq, h), (sk, hk), (sk, hk)))
    leaves = tuple(t.detach().requires_grad_(case["grad"]) for t in (q, k, v))
    kw = dict(is_causal=case["is_causal"], scale=case["scale"], enable_gqa=h != hk)
    out = ioattn.scaled_dot_product_attention(*leaves, **kw)
    ref = torch_sdpa(*(t.double() for t in leaves), **kw).to(dtype)
    base = _low_precision_math(torch_sdpa, leaves, kw)
    results = []
    _check(results, "out", out, ref, base, OUT_FACTOR, floor)
    if case["grad"]:
        dout = torch.randn(out.shape, generator=gen).to(device, dtype)
        _grad_checks(results, out, [ref, base], leaves, dout, floor)
    return results


def _low_precision_math(sdpa, inputs, kw):
    """The rule's baseline, torch doing the math in the inputs' dtype: SDPA's math backend with its reductions
    in 16 bits (by default it computes half types in fp32, and its error then reads 0 where the float64
    result rounds to the same 16-bit values, at head dims no fused backend takes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(*inputs, **kw)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


RUNNERS = {"dense": run_dense, "varlen": run_varlen, "kvcache": run_kvcache, "paged": run_paged, "sdpa": run_sdpa}


def run_case(case: dict, device, every: list | None = None) -> tuple[bool | None, list[str]]:
    """(passed, the failed checks' lines); a raise is a failure whose line is the exception; passed is None
    for a case with nothing of ioattn's to check on this device. ``every`` takes each check's line."""
    try:
        results = RUNNERS[case["api"]](case, device)
    except Exception as e:  # noqa: BLE001 - every raise is a finding
        return False, [f"raised {type(e).__name__}: {str(e)[:400]}"]
    if results is None:
        return None, []
    bad = []
    for r in results:
        ok = r[1] if isinstance(r, tuple) else r.ok
        line = f"{r[0]}: {r[1]}" if isinstance(r, tuple) else str(r)
        if every is not None:
            every.append(line)
        if not ok:
            bad.append(line)
    return not bad, bad


def _fatal(lines: list[str]) -> bool:
    """A CUDA error leaves the context unusable: the worker stops and a fresh one takes the next cases."""
    return any("CUDA" in line or "illegal" in line or "AcceleratorError" in line for line in lines)


def worker(index: int, first: int, stop_at: float, device: str, path: str) -> None:
    """Runs cases from seed ``first`` until ``stop_at``, a JSON line each; the seed under way is kept in
    ``path + ".now"`` (written before the case), so a worker that dies or hangs leaves its seed behind."""
    with open(path, "a") as f:
        i = first
        while time.time() < stop_at:
            with open(path + ".now", "w") as now:
                now.write(str(i))
            case = draw_case(i)
            t0 = time.time()
            ok, bad = run_case(case, torch.device(device))
            f.write(json.dumps({"seed": i, "ok": ok, "bad": bad, "case": case, "s": round(time.time() - t0, 2)})
                    + "\n")
            f.flush()
            i += 1
            if _fatal(bad):
                sys.exit(3)
    os.remove(path + ".now")


def _record_lost(path: str, why: str) -> int | None:
    """The seed a dead or stalled worker was on, written to its file as a failure; None if it finished
    its last case (its ``.now`` file gone or naming a recorded seed)."""
    try:
        with open(path + ".now") as now:
            seed = int(now.read())
    except (FileNotFoundError, ValueError):
        return None
    with open(path) as f:
        if any(json.loads(line)["seed"] == seed for line in f):
            return None
    with open(path, "a") as f:
        f.write(json.dumps({"seed": seed, "ok": False, "bad": [why], "case": draw_case(seed), "s": None}) + "\n")
    return seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--stall", type=float, default=240, help="seconds a case may take before it counts as hung")
    ap.add_argument("--replay", type=int, nargs="+")
    args = ap.parse_args()
    if args.replay is not None:
        for s in args.replay:
            case = draw_case(s)
            lines: list[str] = []
            ok, bad = run_case(case, torch.device(args.device), lines)
            print(json.dumps(case), {True: "ok", False: "FAIL", None: "skipped"}[ok], *(lines or bad), sep="\n  ")
        return
    stop_at = time.time() + args.seconds
    span = 1_000_000
    ctx = mp.get_context("spawn")
    paths = [os.path.join(args.out, f"fuzz-{w}.jsonl") for w in range(args.workers)]
    for p in paths:
        open(p, "w").close()

    def start(w: int) -> mp.Process:
        with open(paths[w]) as f:
            done = max((json.loads(line)["seed"] for line in f), default=None)
        first = (args.seed * args.workers + w) * span if done is None else done + 1
        proc = ctx.Process(target=worker, args=(w, first, stop_at, args.device, paths[w]))
        proc.start()
        return proc

    procs: list[mp.Process | None] = [start(w) for w in range(args.workers)]
    while any(p is not None for p in procs):
        for w, p in enumerate(procs):
            if p is None:
                continue
            stalled = False
            if p.is_alive():
                try:
                    stalled = time.time() - os.path.getmtime(paths[w] + ".now") > args.stall
                except FileNotFoundError:
                    pass
                if not stalled:
                    continue
                p.kill()
            p.join()
            if stalled or p.exitcode != 0:
                _record_lost(paths[w], f"worker hung past {args.stall:.0f} s" if stalled
                             else f"worker died (exit code {p.exitcode})")
            again = p.exitcode != 0 and time.time() < stop_at - 20
            procs[w] = start(w) if again else None
        time.sleep(0.5)
    rows = [json.loads(line) for p in paths for line in open(p)]
    by_api: dict[str, list[int]] = {}
    for r in rows:
        by_api.setdefault(r["case"]["api"], [0, 0, 0])[{True: 0, False: 1, None: 2}[r["ok"]]] += 1
    failures = [r for r in rows if r["ok"] is False]
    with open(os.path.join(args.out, "fuzz-failures.json"), "w") as f:
        json.dump(failures, f, indent=1)
    for r in failures[:40]:
        print(f"FAIL seed {r['seed']}: {json.dumps(r['case'])}", *r["bad"][:4], sep="\n    ")
    print("api       passed  failed skipped")
    for api, (ok, bad, skipped) in sorted(by_api.items()):
        print(f"{api:8} {ok:7} {bad:7} {skipped:7}")
    print(f"{len(rows)} cases, {len(failures)} failed ({args.workers} workers, {args.seconds:.0f} s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
