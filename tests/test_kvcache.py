"""flash_attn_with_kvcache against attention_ref on the gathered cache.

Every unused cache slot (past a sequence's length, pages no sequence owns, cache rows no sequence uses)
holds NaN, so a kernel that reads one fails; the slots the append must write start as NaN too.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, ON_GPU

from ioattn.kvcache import flash_attn_with_kvcache
from ioattn.ops.decode import choose_num_splits
from ioattn.reference import attention_ref
from ioattn.testing import make_alibi, tolerance_check

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
# CPU (interpreter) sizes stay small; the GPU runs the same cases at realistic lengths and head dims.
HEADDIM = 128 if ON_GPU else 40
LONG = 1500 if ON_GPU else 61


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, interleaved: bool):
    """Reference rotary: x (seqlen, nheads, d) rotated at positions pos (seqlen,), in float32."""
    half = cos.shape[1]
    c, s = cos[pos].float()[:, None, :], sin[pos].float()[:, None, :]
    xf = x.float()
    rot, rest = xf[..., : 2 * half], xf[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def build_cache(lens_after, nheads_k, d, dtype, block_size, batch_cache_extra=0, seed=0, leftpad=None):
    """NaN-filled cache plus its addressing. block_size 0 = contiguous. Returns (k_cache, v_cache,
    block_table or None, cache_batch_idx or None, locate) where locate(b, pos) -> cache index tuple.
    leftpad (paged): a table as narrow as the longest sequence, -1 in every entry no key needs (the pages
    wholly before a sequence's pad and past its end), so an entry read there fails."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens_after)
    if block_size == 0:
        capacity = max(lens_after) + 5
        rows = batch + batch_cache_extra
        shape = (rows, capacity, nheads_k, d)
        idx = torch.randperm(rows, generator=gen)[:batch].to(torch.int32) if batch_cache_extra else None
        row_of = idx.tolist() if idx is not None else list(range(batch))
        k_cache = torch.full(shape, float("nan"), dtype=dtype)
        v_cache = torch.full(shape, float("nan"), dtype=dtype)
        return k_cache, v_cache, None, idx, (lambda b, pos: (row_of[b], pos))
    max_blocks = math.ceil(max(lens_after) / block_size) + (1 if leftpad is None else 0)
    needed = [math.ceil(n / block_size) for n in lens_after]
    num_blocks = sum(needed) + 3
    pages = torch.randperm(num_blocks, generator=gen).tolist()
    # Entries no key needs: a spare NaN page, or -1 with leftpad.
    table = torch.full((batch, max_blocks), pages[-1] if leftpad is None else -1, dtype=torch.int32)
    it = iter(pages)
    for b, n in enumerate(needed):
        for j in range(0 if leftpad is None else leftpad[b] // block_size, n):
            table[b, j] = next(it)
    k_cache = torch.full((num_blocks, block_size, nheads_k, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    locate = lambda b, pos: (int(table[b, pos // block_size]), pos % block_size)
    return k_cache, v_cache, table, None, locate


def run_case(*, lens, seqlen_q, nheads, nheads_k, dtype, block_size, seqlen_new=0, causal=False,
             window_size=(-1, -1), softcap=0.0, alibi=None, rotary=None, num_splits=1, batch_cache_extra=0,
             int_seqlens=False, d=HEADDIM, seed=0, leftpad=None):
    """Builds the case, runs it, checks out and lse against attention_ref (tolerance rule) and the cache
    contents after the append. rotary: None or (rotary_dim, interleaved). leftpad: None or each sequence's
    ``cache_leftpad`` (the positions before it stay NaN; the reference sees the keys from there on)."""
    torch.manual_seed(seed)
    batch = len(lens)
    lens_after = [n + seqlen_new for n in lens]
    k_cache, v_cache, table, batch_idx, locate = build_cache(lens_after, nheads_k, d, dtype, block_size,
                                                             batch_cache_extra, seed, leftpad)
    k_old = [torch.randn(n, nheads_k, d).to(dtype) for n in lens]
    v_old = [torch.randn(n, nheads_k, d).to(dtype) for n in lens]
    pad = [0] * batch if leftpad is None else list(leftpad)
    for b, n in enumerate(lens):
        for pos in range(pad[b], n):
            k_cache[locate(b, pos)] = k_old[b][pos]
            v_cache[locate(b, pos)] = v_old[b][pos]
    q = torch.randn(batch, seqlen_q, nheads, d).to(dtype)
    k_new = torch.randn(batch, seqlen_new, nheads_k, d).to(dtype) if seqlen_new else None
    v_new = torch.randn(batch, seqlen_new, nheads_k, d).to(dtype) if seqlen_new else None
    cos = sin = None
    if rotary is not None:
        rotary_dim, interleaved = rotary
        angles = torch.rand(k_cache.shape[1] * (table.shape[1] if table is not None else 1), rotary_dim // 2)
        cos, sin = (angles * 6).cos().to(dtype), (angles * 6).sin().to(dtype)
    slopes = make_alibi(batch, nheads, per_batch=alibi == "batch") if alibi else None
    cache_seqlens = lens[0] if int_seqlens else torch.tensor(lens, dtype=torch.int32)

    nan_before = int(torch.isnan(k_cache).sum())
    dev = lambda t: None if t is None else t.to(DEVICE)
    k_cache_d, v_cache_d = dev(k_cache), dev(v_cache)
    out, lse = flash_attn_with_kvcache(
        dev(q), k_cache_d, v_cache_d, k=dev(k_new), v=dev(v_new), rotary_cos=dev(cos), rotary_sin=dev(sin),
        cache_seqlens=cache_seqlens if int_seqlens else dev(cache_seqlens), cache_batch_idx=dev(batch_idx),
        cache_leftpad=None if leftpad is None else dev(torch.tensor(leftpad, dtype=torch.int32)),
        block_table=dev(table), causal=causal, window_size=window_size, softcap=softcap,
        rotary_interleaved=rotary[1] if rotary else True, alibi_slopes=dev(slopes), num_splits=num_splits,
        return_softmax_lse=True)
    out, lse, k_cache_d, v_cache_d = out.cpu(), lse.cpu(), k_cache_d.cpu(), v_cache_d.cpu()
    assert out.shape == q.shape and lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32

    outs = {True: [], False: []}
    lses = {True: [], False: []}
    for b in range(batch):
        k_b, v_b = k_old[b], v_old[b]
        q_b = q[b]
        if seqlen_new:
            kn = k_new[b]
            if rotary is not None:
                kn = rotate(kn, cos, sin, torch.arange(lens[b], lens_after[b]), rotary[1])
                per_row = causal or window_size != (-1, -1)
                q_pos = torch.arange(seqlen_q) + lens[b] if per_row else torch.full((seqlen_q,), lens[b])
                q_b = rotate(q_b, cos, sin, q_pos, rotary[1])
            # The append wrote exactly these values, and nothing of the old contents changed.
            got_k = torch.stack([k_cache_d[locate(b, p)] for p in range(lens_after[b])])
            got_v = torch.stack([v_cache_d[locate(b, p)] for p in range(lens_after[b])])
            torch.testing.assert_close(got_k[pad[b]: lens[b]], k_b[pad[b]:], rtol=0, atol=0)
            atol = 1e-2 if dtype != torch.float32 else 1e-5  # one rounding of the rotated keys
            torch.testing.assert_close(got_k[lens[b]:], kn, rtol=0, atol=atol)
            torch.testing.assert_close(got_v[pad[b]:], torch.cat((v_b, v_new[b]))[pad[b]:], rtol=0, atol=0)
            k_b, v_b = torch.cat((k_b, kn)), torch.cat((v_b, v_new[b]))
        k_b, v_b = k_b[pad[b]:], v_b[pad[b]:]  # the sequence's keys start at its cache_leftpad
        s_b = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        for upcast in (True, False):
            o, l = attention_ref(q_b[None], k_b[None], v_b[None], causal=causal, window_size=window_size,
                                 softcap=softcap, alibi_slopes=s_b, upcast=upcast)
            outs[upcast].append(o[0])
            lses[upcast].append(l[0])
    floor = 1e-5 if dtype == torch.float32 else 1e-4
    res_out = tolerance_check(out, torch.stack(outs[True]), torch.stack(outs[False]), floor=floor, name="out")
    res_lse = tolerance_check(lse, torch.stack(lses[True]), torch.stack(lses[False]), floor=1e-4, name="lse")
    print(res_out)
    print(res_lse)
    assert res_out.ok, res_out
    assert res_lse.ok, res_lse
    # The unused slots were never written: as many NaN as before, less the appended ones.
    appended = batch * seqlen_new * nheads_k * d
    assert int(torch.isnan(k_cache_d).sum()) == nan_before - appended
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_contiguous(dtype, group):
    nheads_k = 2 if ON_GPU else 1
    run_case(lens=[LONG, 1, 17], seqlen_q=1, nheads=group * nheads_k, nheads_k=nheads_k, dtype=dtype,
             block_size=0, num_splits=1)


def test_decode_paged_bf16():
    """bf16 decode over a paged cache with key splits: on a CPU the portable decode kernel in Triton's
    interpreter, whose bf16 tiles ``common.dot`` widens to fp32 (its tl.dot multiplies them wrongly)."""
    run_case(lens=[LONG, 1, 17], seqlen_q=1, nheads=4, nheads_k=1, dtype=torch.bfloat16, block_size=16,
             num_splits=3)


# Every block size and GQA ratio on CPU; their full product on the GPU.
PAGED_CASES = ([(b, g) for b in (1, 16, 256) for g in (1, 4, 8)] if ON_GPU
               else [(1, 4), (16, 1), (16, 8), (256, 4)])


@pytest.mark.parametrize("block_size, group", PAGED_CASES)
def test_decode_paged(block_size, group):
    run_case(lens=[LONG - 4, 7, 33], seqlen_q=1, nheads=group * 2, nheads_k=2, dtype=torch.float16,
             block_size=block_size, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 3, 0, 16])
def test_split_kv(num_splits):
    # 16 splits leave most splits without keys: they must weigh nothing in the combine.
    run_case(lens=[LONG, 23], seqlen_q=1, nheads=4, nheads_k=1, dtype=torch.float32, block_size=16,
             num_splits=num_splits)


@pytest.mark.parametrize("block_size, interleaved, causal", [
    (0, True, True), (16, False, True), (16, True, False), (0, False, False)])
def test_append_with_rotary(block_size, interleaved, causal):
    # Speculative verification: 4 new tokens appended and queried, rotary on the first 24 dims only.
    run_case(lens=[LONG - 7, 0, 9], seqlen_q=4, seqlen_new=4, nheads=8, nheads_k=2, dtype=torch.float16,
             block_size=block_size, causal=causal, rotary=(24, interleaved), num_splits=2,
             batch_cache_extra=2 if block_size == 0 else 0)


@pytest.mark.parametrize("dtype", DTYPES[::2])
def test_chunked_prefill_causal(dtype):
    # 19 new query tokens x 4 heads per group span several query blocks of the packed tile.
    seqlen_q = 100 if ON_GPU else 19
    run_case(lens=[LONG - 30, 5], seqlen_q=seqlen_q, seqlen_new=seqlen_q, nheads=8, nheads_k=2, dtype=dtype,
             block_size=16, causal=True, num_splits=2)


def test_window_and_empty_rows():
    # A sequence with an empty cache and no append has no key at all: output 0, lse -inf.
    out, lse = run_case(lens=[LONG, 0, 40], seqlen_q=3, nheads=4, nheads_k=2, dtype=torch.float32,
                        block_size=16, window_size=(9, 0), num_splits=2)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


@pytest.mark.parametrize("alibi", ["heads", "batch"])
def test_softcap_alibi(alibi):
    run_case(lens=[LONG, 19], seqlen_q=2, nheads=4, nheads_k=2, dtype=torch.float32, block_size=0,
             softcap=5.0, alibi=alibi, causal=True, num_splits=2)


def test_int_cache_seqlens_and_batch_idx():
    run_case(lens=[29, 29, 29], seqlen_q=1, seqlen_new=1, nheads=4, nheads_k=4, dtype=torch.float32,
             block_size=0, int_seqlens=True, batch_cache_extra=3, num_splits=0)


# cache_leftpad (flash-attn 2.6): keys start at each sequence's pad; the positions before it hold NaN. Pads mid-tile
# and mid-page, none, the whole old cache (only the appended keys left), and a pad past a page.
LEFTPAD_CASES = [
    dict(block_size=0, seqlen_new=2, causal=True, rotary=(24, True), batch_cache_extra=2),
    dict(block_size=0, seqlen_new=0, window_size=(9, 0), alibi="heads"),
    dict(block_size=16, seqlen_new=2, causal=True, rotary=(24, False)),
    dict(block_size=1, seqlen_new=0, softcap=5.0, alibi="batch"),
    dict(block_size=16, seqlen_new=0, window_size=(5, 3)),
]


@pytest.mark.parametrize("case", LEFTPAD_CASES, ids=str)
def test_cache_leftpad(case):
    lens = [LONG, 23, 17, 40]
    pads = [LONG - 20, 0, 17, 19] if case["seqlen_new"] else [LONG - 20, 0, 16, 19]
    run_case(lens=lens, leftpad=pads, seqlen_q=2, nheads=8, nheads_k=2, dtype=torch.float16, num_splits=3, **case)


@pytest.mark.parametrize("block_size", [0, 16])
def test_cache_leftpad_empty_sequence(block_size):
    """A pad at the cache's length (on a page boundary) leaves a sequence without keys: output 0, lse -inf; its
    table row holds -1 only."""
    out, lse = run_case(lens=[LONG, 32], leftpad=[3, 32], seqlen_q=1, nheads=4, nheads_k=2, dtype=torch.float16,
                        block_size=block_size, num_splits=2)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


def test_cache_leftpad_is_a_shifted_cache():
    """A padded cache gives what the same keys give moved to position 0 (no rotary: positions would differ),
    with the kernel's own split of the shorter range."""
    torch.manual_seed(0)
    d, pad, n = HEADDIM, 13, LONG
    q = torch.randn(2, 3, 4, d, dtype=torch.float16, device=DEVICE)
    k_cache = torch.randn(2, n + 8, 2, d, dtype=torch.float16, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([n, n - 5], dtype=torch.int32, device=DEVICE)
    pads = torch.tensor([pad, 0], dtype=torch.int32, device=DEVICE)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=pads, causal=True,
                                  window_size=(20, -1), num_splits=2)
    shifted_k, shifted_v = k_cache.clone(), v_cache.clone()
    shifted_k[0, : n - pad], shifted_v[0, : n - pad] = k_cache[0, pad:n], v_cache[0, pad:n]
    ref = flash_attn_with_kvcache(q, shifted_k, shifted_v, cache_seqlens=lens - pads, causal=True,
                                  window_size=(20, -1), num_splits=2)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)


def test_num_splits_heuristic_uses_shapes_only():
    cpu = torch.device("cpu")
    assert choose_num_splits(cpu, 256, 32, 8, 1, 1 << 16, 128) == 1
    assert choose_num_splits(cpu, 1, 32, 8, 1, 1 << 16, 128) == 1  # one program per SM on CPU
    if ON_GPU:
        gpu = torch.device("cuda")
        assert choose_num_splits(gpu, 1, 32, 8, 1, 1 << 16, 128) > 8
        assert choose_num_splits(gpu, 256, 32, 8, 1, 1024, 128) == 1
        assert choose_num_splits(gpu, 1, 32, 8, 1, 64, 128) == 1  # too few keys to split


@pytest.mark.parametrize("paged, per_sm", [(True, 4), (False, 3)])
@pytest.mark.parametrize("batch", [1, 3, 4, 16, 50, 64, 66, 67, 256])
def test_num_splits_fill_each_sm_without_a_second_wave(batch, paged, per_sm, monkeypatch):
    """No SM gets more than per_sm programs (one more on an H200 cost up to 30%), and no more splits would
    fit: four per SM for a paged cache, three for a contiguous one."""
    import ioattn.ops.decode as decode_ops

    sms = 132
    monkeypatch.setattr(decode_ops, "_sm_count", lambda device: sms)
    splits = choose_num_splits(torch.device("cpu"), batch, 32, 8, 1, 1 << 16, 128, paged=paged)
    programs = batch * 8
    assert splits == 1 or programs * splits <= per_sm * sms
    assert splits == decode_ops.MAX_SPLITS or programs * (splits + 1) > per_sm * sms


@pytest.mark.parametrize("leftpad", [False, True])
def test_torch_compile_fullgraph(leftpad):
    dtype = torch.float32
    lens = [13, 6]
    k_cache, v_cache, table, _, _ = build_cache([n + 1 for n in lens], 2, 32, dtype, 16)
    for b, n in enumerate(lens):
        for pos in range(n):
            k_cache[table[b, pos // 16], pos % 16] = torch.randn(2, 32)
            v_cache[table[b, pos // 16], pos % 16] = torch.randn(2, 32)
    q, k, v = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    pads = torch.tensor([3, 0], dtype=torch.int32).to(DEVICE) if leftpad else None
    args = [t.to(DEVICE) for t in (q, k, v, torch.tensor(lens, dtype=torch.int32), table)]

    def step(q, k, v, seqlens, table, k_cache, v_cache):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, cache_leftpad=pads,
                                       block_table=table, causal=True, num_splits=2)

    kc_eager, vc_eager = k_cache.to(DEVICE), v_cache.to(DEVICE)
    kc_comp, vc_comp = k_cache.to(DEVICE), v_cache.to(DEVICE)
    ref = step(*args, kc_eager, vc_eager)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    got = compiled(*args, kc_comp, vc_comp)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # The in-place append survives functionalization.
    torch.testing.assert_close(kc_comp, kc_eager, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc_comp, vc_eager, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_reads_new_lengths():
    dtype = torch.bfloat16
    lens = [300, 41]
    k_cache, v_cache, table, _, locate = build_cache([700, 700], 2, 128, dtype, 16)
    k_all = torch.randn(2, 700, 2, 128).to(dtype)
    v_all = torch.randn(2, 700, 2, 128).to(dtype)
    for b in range(2):
        for pos in range(700):
            k_cache[locate(b, pos)] = k_all[b, pos]
            v_cache[locate(b, pos)] = v_all[b, pos]
    q = torch.randn(2, 1, 8, 128).to(dtype).cuda()
    k_cache, v_cache, table = k_cache.cuda(), v_cache.cuda(), table.cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    run = lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
    run()  # compile outside the capture
    run()  # the second call records a decode plan: the captured call launches it
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for new_lens in ([300, 41], [699, 1], [5, 650]):
        seqlens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        for b, n in enumerate(new_lens):
            ref, _ = attention_ref(q[b:b + 1].cpu(), k_all[b:b + 1, :n], v_all[b:b + 1, :n])
            base, _ = attention_ref(q[b:b + 1].cpu(), k_all[b:b + 1, :n], v_all[b:b + 1, :n], upcast=False)
            res = tolerance_check(out[b:b + 1].cpu(), ref, base, floor=1e-4)
            print(new_lens, b, res)
            assert res.ok, res


def _args():
    q = torch.randn(2, 1, 4, 16)
    cache = torch.randn(2, 32, 2, 16)
    return q, cache, cache.clone()


def test_strided_new_tokens_and_flash_attn_scalars():
    """As flash-attn: q and the new k, v with a strided last dimension are copied (the caches must not be:
    they are written in place), a negative window side is unbounded and a softcap <= 0 is off."""
    torch.manual_seed(4)
    q, k_cache, v_cache = _args()
    q = q.to(DEVICE)
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    k_new, v_new = (torch.randn(2, 3, 2, 32, device=DEVICE)[..., ::2] for _ in range(2))
    lens = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)
    caches = (k_cache.clone(), v_cache.clone())
    out = flash_attn_with_kvcache(torch.randn(2, 1, 4, 32, device=DEVICE)[..., ::2].copy_(q), *caches, k_new, v_new,
                                  cache_seqlens=lens, causal=True, window_size=(-4, -1), softcap=-2.0)
    want_caches = (k_cache.clone(), v_cache.clone())
    want = flash_attn_with_kvcache(q, *want_caches, k_new.contiguous(), v_new.contiguous(), cache_seqlens=lens,
                                   causal=True)
    torch.testing.assert_close(out, want)
    for got, ref in zip(caches, want_caches, strict=True):
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="k_cache must have a contiguous last dimension"):
        flash_attn_with_kvcache(q, torch.randn(2, 32, 2, 32, device=DEVICE)[..., ::2], v_cache, cache_seqlens=lens)


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.randn(2, 4, 16)), "q must have rank 4"),
    (dict(q=torch.randn(2, 0, 4, 16)), "seqlen_q must be >= 1"),
    (dict(k_cache=torch.randn(2, 32, 3, 16), v_cache=torch.randn(2, 32, 3, 16)),
     "divisible by k_cache's nheads_k"),
    (dict(v_cache=torch.randn(2, 31, 2, 16)), "v_cache must have k_cache's shape"),
    (dict(k_cache=torch.randn(2, 32, 2, 16).half()), "k_cache.dtype must equal q.dtype"),
    (dict(cache_seqlens=33), "cache_seqlens must be in"),
    (dict(cache_seqlens=torch.tensor([1, 2])), "cache_seqlens.dtype must be torch.int32"),
    (dict(cache_seqlens=torch.tensor([1, 40], dtype=torch.int32)), "cache_seqlens must be in"),
    (dict(cache_seqlens=torch.tensor([1], dtype=torch.int32)), r"cache_seqlens must have shape \(2\)"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), "block_table.dtype must be torch.int32"),
    (dict(block_table=torch.full((2, 2), 5, dtype=torch.int32)), "block_table entries must be in"),
    (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), "cache_batch_idx entries must be in"),
    (dict(k=torch.randn(2, 1, 2, 16)), "k and v must be given together"),
    (dict(k=torch.randn(2, 1, 4, 16), v=torch.randn(2, 1, 4, 16)),
     r"k must have shape \(2, seqlen_new, 2, 16\)"),
    (dict(rotary_cos=torch.randn(32, 4), rotary_sin=torch.randn(32, 4)), "need the new k and v"),
    (dict(k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16), rotary_cos=torch.randn(8, 4),
          rotary_sin=torch.randn(8, 4)), "at least the cache's 32 positions"),
    (dict(window_size=(0, 1.5)), "window_size right must be an int"),
    (dict(softcap=float("nan")), "softcap must be finite"),
    (dict(num_splits=-1), "num_splits must be an int >= 0"),
    (dict(alibi_slopes=torch.rand(3)), "alibi_slopes must have shape"),
    (dict(cache_leftpad=torch.tensor([1, 2])), "cache_leftpad.dtype must be torch.int32"),
    (dict(cache_leftpad=torch.tensor([1], dtype=torch.int32)), r"cache_leftpad must have shape \(2\)"),
    (dict(cache_leftpad=torch.tensor([0, -1], dtype=torch.int32)), r"cache_leftpad\[1\] = -1"),
    (dict(cache_seqlens=torch.tensor([5, 9], dtype=torch.int32), cache_leftpad=torch.tensor([6, 0], dtype=torch.int32)),
     r"in \[0, cache_seqlens\[b\]\], got cache_leftpad\[0\] = 6 with cache_seqlens\[0\] = 5"),
])
def test_validation_names_the_argument(change, match):
    q, k_cache, v_cache = _args()
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache)
    kwargs.update(change)
    if "block_table" in change:
        kwargs["k_cache"], kwargs["v_cache"] = torch.randn(4, 16, 2, 16), torch.randn(4, 16, 2, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(**kwargs)


# Decode plans (``ops.decode._decode_plan_key``): a call shaped like two earlier ones launches the plan the
# second recorded. Cases of both kernels: the Gluon one (paged with the split rule and the combine; contiguous,
# one split; ALiBi, a window and softcap on 64-row pages) and the portable one (more programs than SMs; rotary
# with an append and cache_batch_idx).
DECODE_PLAN_CASES = [
    dict(batch=4, page=16, cap=1024),
    dict(batch=4, page=0, cap=1024, num_splits=1, causal=True),
    dict(batch=4, page=64, cap=2048, alibi=True, window_size=(300, 0), softcap=20.0),
    dict(batch=80, page=16, cap=512),
    dict(batch=3, page=0, cap=512, rotary=True, new=2, batch_idx=True, causal=True),
    dict(batch=4, page=0, cap=1024, leftpad=True),
    dict(batch=4, page=16, cap=1024, leftpad=True, causal=True),
]


def _plan_case(batch, page, cap, num_splits=0, causal=False, alibi=False, window_size=(-1, -1), softcap=0.0,
               rotary=False, new=0, batch_idx=False, leftpad=False):
    """(q, k_cache, v_cache) and the other arguments of a decode call on the GPU, random contents."""
    nheads, nheads_k, d, dev, dtype = 8, 2, 128, "cuda", torch.bfloat16
    if page:
        blocks = batch * cap // page
        k_cache = torch.randn(blocks + 3, page, nheads_k, d, device=dev, dtype=dtype)
        table = torch.randperm(blocks + 3, device=dev)[:blocks].to(torch.int32).view(batch, cap // page)
    else:
        k_cache = torch.randn(batch + (2 if batch_idx else 0), cap, nheads_k, d, device=dev, dtype=dtype)
        table = None
    kwargs = dict(cache_seqlens=torch.randint(1, cap - new, (batch,), device=dev, dtype=torch.int32),
                  block_table=table, causal=causal, window_size=window_size, softcap=softcap,
                  num_splits=num_splits, return_softmax_lse=True)
    if batch_idx:
        kwargs["cache_batch_idx"] = torch.randperm(batch + 2, device=dev)[:batch].to(torch.int32)
    if leftpad:
        kwargs["cache_leftpad"] = (kwargs["cache_seqlens"] * torch.rand(batch, device=dev)).to(torch.int32)
    if alibi:
        kwargs["alibi_slopes"] = make_alibi(batch, nheads, per_batch=True).to(dev)
    if new:
        kwargs["k"] = torch.randn(batch, new, nheads_k, d, device=dev, dtype=dtype)
        kwargs["v"] = torch.randn(batch, new, nheads_k, d, device=dev, dtype=dtype)
    if rotary:
        angles = torch.rand(cap, 32, device=dev) * 6
        kwargs["rotary_cos"], kwargs["rotary_sin"] = angles.cos().to(dtype), angles.sin().to(dtype)
    q = torch.randn(batch, 1, nheads, d, device=dev, dtype=dtype)
    return q, k_cache, torch.randn_like(k_cache), kwargs


@pytest.mark.skipif(not ON_GPU, reason="launch plans replay compiled GPU launches")
@pytest.mark.parametrize("case", DECODE_PLAN_CASES, ids=str)
def test_decode_plan_matches_the_whole_path(case, monkeypatch):
    """No key for a shape's first call, the second records a plan, the third launches it (same result, bit
    for bit); on new queries the plan gives what the whole path gives, bit for bit."""
    import ioattn.ops.decode as decode_ops

    torch.manual_seed(len(str(case)))
    q, k_cache, v_cache, kwargs = _plan_case(**case)
    planned = []
    real = decode_ops._decode_planned
    monkeypatch.setattr(decode_ops, "_decode_planned", lambda *a: planned.append(real(*a)) or planned[-1])
    outs = [flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs) for _ in range(3)]
    assert [p is not None for p in planned] == [False, True]
    assert len(decode_ops._DECODE_PLANS) == 1
    assert torch.equal(outs[2][0], outs[0][0]) and torch.equal(outs[2][1], outs[0][1])
    q2 = torch.randn_like(q)
    out_p, lse_p = flash_attn_with_kvcache(q2, k_cache, v_cache, **kwargs)
    assert planned[-1] is not None
    monkeypatch.setattr(decode_ops._DECODE_PLANS, "enabled", False)
    out_w, lse_w = flash_attn_with_kvcache(q2, k_cache, v_cache, **kwargs)
    assert torch.equal(out_p, out_w) and torch.equal(lse_p, lse_w)


@pytest.mark.skipif(not ON_GPU, reason="launch plans replay compiled GPU launches")
def test_decode_plan_declines_what_it_cannot_take(monkeypatch):
    """With a plan recorded: q 2 bytes off (same shape and strides) and another SM count find none, the
    fast launch off declines it, and the calls are still right."""
    import ioattn.kernels.fastlaunch as fastlaunch
    import ioattn.ops.decode as decode_ops

    q, k_cache, v_cache, kwargs = _plan_case(batch=4, page=16, cap=1024)
    for _ in range(2):
        ref = flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
    tensors = (q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs["block_table"], None, None, None, None, None)
    scalars = (0, 1.0 / math.sqrt(128), -1, -1, 0.0, True, False, 0)  # as flash_attn_with_kvcache passes them
    key = decode_ops._decode_plan_key(tensors, *scalars)
    assert key is not None and decode_ops._decode_planned(key, tensors) is not None
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_off = buf[1:].view(q.shape).copy_(q)
    assert q_off.data_ptr() % 16 and q_off.stride() == q.stride()
    off = (q_off, *tensors[1:])
    assert decode_ops._decode_plan_key(off, *scalars) == key and decode_ops._decode_planned(key, off) is None
    got = flash_attn_with_kvcache(q_off, k_cache, v_cache, **kwargs)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-2)
    monkeypatch.setattr(fastlaunch, "_ENABLED", False)
    assert decode_ops._decode_plan_key(tensors, *scalars) is None and decode_ops._decode_planned(key, tensors) is None
    monkeypatch.undo()
    monkeypatch.setattr(decode_ops, "_sm_count", lambda device: 7)
    assert decode_ops._decode_plan_key(tensors, *scalars) != key
    got = flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)  # another split count off sm_90
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-2)


def plans_in_the_interpreter(monkeypatch, key_name: str, planned_name: str) -> list:
    """``ops.decode``'s plans of one kind (``key_name``, ``planned_name``) made to replay through Triton's own
    launch in the interpreter (CPU: the compiled entries plans keep do not exist there, so each launch's
    constexprs stand in for its entry), keyed by the real key's sighting rule without its GPU-only parts.
    Returns the list each planned lookup's answer is appended to."""
    import ioattn.kernels.fastlaunch as fastlaunch
    import ioattn.ops.decode as decode_ops

    monkeypatch.setattr(fastlaunch.Launcher, "entry", lambda self, args, constexprs: dict(constexprs))
    monkeypatch.setattr(fastlaunch.Launcher, "launch_entry",
                        lambda self, entry, grid, args: self.kernel[grid](*fastlaunch._real(args), **entry))
    monkeypatch.setattr(fastlaunch, "replayable", lambda launches: True)
    seen = set()

    def key(tensors, *scalars):
        shapes = tuple(map(decode_ops._describe, tensors)) + scalars
        if shapes not in seen:
            seen.add(shapes)
            return None
        return shapes

    monkeypatch.setattr(decode_ops, key_name, key)
    planned = []
    real = getattr(decode_ops, planned_name)
    monkeypatch.setattr(decode_ops, planned_name, lambda *a: planned.append(real(*a)) or planned[-1])
    return planned


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the real plans (test_decode_plan_matches_the_whole_path)")
@pytest.mark.parametrize("num_splits, page, leftpad", [(3, 16, False), (1, 0, False), (0, 16, False), (2, 0, True)])
def test_decode_plan_replays_its_launches_in_the_interpreter(num_splits, page, leftpad, monkeypatch):
    """The decode plan's builders, replayed through Triton's own launch in the interpreter (CPU: the compiled
    entries plans keep do not exist here, so each launch's constexprs stand in for its entry): a call's second
    time records, its third replays the decode launch and, with splits, the combine, bit for bit."""
    import ioattn.ops.decode as decode_ops

    planned = plans_in_the_interpreter(monkeypatch, "_decode_plan_key", "_decode_planned")
    torch.manual_seed(num_splits + page)
    if page:
        k_cache = torch.randn(20, page, 2, 32, dtype=torch.float16)
        table = torch.randperm(20)[:16].to(torch.int32).view(2, 8)
    else:
        k_cache, table = torch.randn(2, 128, 2, 32, dtype=torch.float16), None
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(2, 1, 4, 32, dtype=torch.float16)
    kwargs = dict(cache_seqlens=torch.tensor([100, 37], dtype=torch.int32), block_table=table,
                  num_splits=num_splits, causal=True, return_softmax_lse=True)
    if leftpad:
        kwargs["cache_leftpad"] = torch.tensor([30, 5], dtype=torch.int32)
    outs = [flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs) for _ in range(3)]
    assert [p is not None for p in planned] == [False, True]
    (plan,) = decode_ops._DECODE_PLANS.plans.values()
    assert len(plan.launches) == (2 if num_splits > 1 else 1)
    assert torch.equal(outs[2][0], outs[0][0]) and torch.equal(outs[2][1], outs[0][1])
