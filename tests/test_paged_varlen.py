"""flash_attn_varlen_func with block_table (packed variable-length queries over a paged KV cache) against
attention_ref on each sequence's gathered keys, through the Triton kernel and the chunked path.

Unused cache slots (past a sequence's keys, pages no sequence owns) hold NaN, so reading one fails a test.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, ON_GPU
from test_kvcache import build_cache, plans_in_the_interpreter

import ioattn
from ioattn.ops.decode import paged_varlen_attention
from ioattn.reference import attention_ref
from ioattn.testing import make_alibi, tolerance_check

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
HEADDIM = 128 if ON_GPU else 40
# Per sequence (queries, keys): prefill chunks, decode rows, an empty sequence, more queries than keys (the
# first rows of a causal mask see no key), a sequence without keys.
LENS = [(5, 17), (1, 40), (0, 9), (12, 12), (1, 1), (7, 3), (3, 0)]
LONG = [(300, 1100), (1, 1500), (64, 64), (1, 700)] if ON_GPU else [(19, 61), (1, 45)]


def _inputs(lens, nheads, nheads_k, dtype, block_size, d=HEADDIM, seed=0):
    """(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, per-sequence (q, k, v)) on the device."""
    torch.manual_seed(seed)
    k_cache, v_cache, table, _, locate = build_cache([max(nk, 1) for _, nk in lens], nheads_k, d, dtype,
                                                     block_size, seed=seed)
    seqs = []
    for b, (nq, nk) in enumerate(lens):
        k_b = torch.randn(nk, nheads_k, d).to(dtype)
        v_b = torch.randn(nk, nheads_k, d).to(dtype)
        for pos in range(nk):
            k_cache[locate(b, pos)] = k_b[pos]
            v_cache[locate(b, pos)] = v_b[pos]
        seqs.append((torch.randn(nq, nheads, d).to(dtype), k_b, v_b))
    q = torch.cat([s[0] for s in seqs])
    cu_q = torch.tensor([0, *torch.tensor([nq for nq, _ in lens]).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor([nk for _, nk in lens]).cumsum(0).tolist()], dtype=torch.int32)
    dev = lambda t: t.to(DEVICE)
    return dev(q), dev(k_cache), dev(v_cache), dev(cu_q), dev(cu_k), dev(table), seqs


def _check(out, lse, seqs, dtype, slopes=None, **mask):
    """out (total_q, nheads, d) and lse (nheads, total_q) against attention_ref, sequence by sequence."""
    refs = {True: ([], []), False: ([], [])}
    for b, (q_b, k_b, v_b) in enumerate(seqs):
        if q_b.shape[0] == 0:
            continue
        s_b = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        for upcast in (True, False):
            o, l = attention_ref(q_b[None], k_b[None], v_b[None], alibi_slopes=s_b, upcast=upcast, **mask)
            refs[upcast][0].append(o[0])
            refs[upcast][1].append(l[0])
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all()
    floor = 1e-5 if dtype == torch.float32 else 1e-4
    res_out = tolerance_check(out, torch.cat(refs[True][0]), torch.cat(refs[False][0]), floor=floor, name="out")
    res_lse = tolerance_check(lse, torch.cat(refs[True][1], -1), torch.cat(refs[False][1], -1), floor=1e-4,
                              name="lse")
    assert res_out.ok, res_out
    assert res_lse.ok, res_lse


def _run(q, k_cache, v_cache, cu_q, cu_k, table, lens, **opts):
    max_q = max(nq for nq, _ in lens)
    max_k = max(nk for _, nk in lens)
    return ioattn.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, block_table=table,
                                         return_attn_probs=True, **opts)


@pytest.fixture(params=["triton", "chunked"])
def backend(request, monkeypatch):
    if request.param == "chunked":
        monkeypatch.setenv("IOATTN_BACKEND", "chunked")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, group", [(1, 1), (16, 4), (16, 8), (256, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_varlen_matches_reference(dtype, block_size, group, causal, backend):
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(LENS, 2 * group, 2, dtype, block_size)
    out, lse, probs = _run(q, k_cache, v_cache, cu_q, cu_k, table, LENS, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (q.shape[1], q.shape[0])
    assert probs.shape == (0,) and probs.dtype == dtype  # flash-attn's S_dmask without dropout
    _check(out, lse, seqs, dtype, causal=causal)


@pytest.mark.parametrize("opts", [
    {"window_size": (8, 2)}, {"window_size": (4, -1), "causal": True}, {"softcap": 5.0},
    {"alibi": "heads", "causal": True}, {"alibi": "batch", "softcap": 3.0, "window_size": (-1, 6)},
], ids=str)
def test_paged_varlen_masks_and_mods(opts, backend):
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(LENS, 8, 2, torch.float16, 16, seed=1)
    slopes = make_alibi(len(LENS), 8, per_batch=alibi == "batch") if alibi else None
    out, lse, _ = _run(q, k_cache, v_cache, cu_q, cu_k, table, LENS,
                       alibi_slopes=None if slopes is None else slopes.to(DEVICE), **opts)
    _check(out, lse, seqs, torch.float16, slopes, **opts)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_varlen_long_and_split(num_splits):
    """Longer sequences, and the op's key splits with their combine (the API's split rule picks one split on
    the interpreter)."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(LONG, 8, 2, dtype, 16, seed=2)
    seqlens_k = cu_k[1:] - cu_k[:-1]
    out, lse = paged_varlen_attention(q, k_cache, v_cache, cu_q, seqlens_k, table, None,
                                      max(nq for nq, _ in LONG), HEADDIM ** -0.5, -1, 0, 0.0, num_splits)
    _check(out, lse, seqs, dtype, causal=True)


def test_paged_varlen_strided_q_fp32_gqa8_splits_and_a_loose_max_seqlen_q():
    """q as a view of a packed qkv tensor (rows 3 x nheads x d apart), fp32, GQA 8, key splits, and a
    max_seqlen_q above the longest sequence (its extra query blocks exit)."""
    lens = [(9, 40), (1, 70), (4, 4)]
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 8, 1, torch.float32, 16, seed=5)
    qkv = torch.zeros(q.shape[0], 3, *q.shape[1:], dtype=q.dtype, device=q.device)
    qkv[:, 0] = q
    out, lse = paged_varlen_attention(qkv[:, 0], k_cache, v_cache, cu_q, cu_k[1:] - cu_k[:-1], table, None, 30,
                                      HEADDIM ** -0.5, -1, 0, 0.0, 3)
    _check(out, lse, seqs, torch.float32, causal=True)


def test_paged_varlen_fake_outputs_match_the_real_ones():
    """The op's fake (what torch.compile plans with) gives the real outputs' shapes and strides, also for a
    q that is a permuted view."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    lens = [(3, 10), (2, 7)]
    q, k_cache, v_cache, cu_q, cu_k, table, _ = _inputs(lens, 4, 2, torch.float32, 16, seed=6)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # (total_q, nheads, d), heads outermost in memory
    args = (q, k_cache, v_cache, cu_q, cu_k[1:] - cu_k[:-1], table, None, 3, 0.2, -1, 0, 0.0, 0)
    real = paged_varlen_attention.op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = paged_varlen_attention.op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for r, f in zip(real, fake, strict=True):
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype)


@pytest.mark.skipif(not ON_GPU, reason="CPU inputs are checked on the host (test_paged_varlen_value_checks)")
def test_paged_varlen_lengths_past_capacity_read_no_other_pages():
    """Key lengths past a table row's capacity (not read back from the device) are cut at that capacity: the
    kernel never reads the next sequence's table row or pages."""
    lens = [(2, 32), (2, 20)]
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 4, 2, torch.float16, 16, seed=7)
    table = table[:, :2].contiguous()  # capacity 32 keys a sequence: the first one's keys exactly
    k_cache[table[1].long()] = float("nan")  # the second sequence's pages: reading them would show
    v_cache[table[1].long()] = float("nan")
    too_long = torch.tensor([500], dtype=torch.int32, device=DEVICE)
    out, lse = paged_varlen_attention(q[:2], k_cache, v_cache, cu_q[:2], too_long, table[:1], None, 2,
                                      HEADDIM ** -0.5, -1, -1, 0.0, 0)
    _check(out, lse, seqs[:1], torch.float16)


def test_paged_varlen_mixed_batch_matches_kvcache_decode():
    """A continuous-batching step: the decode rows of a varlen call give what flash_attn_with_kvcache gives for
    the same sequences, page tables and lengths."""
    lens = [(1, 30), (1, 7), (1, 19)]
    q, k_cache, v_cache, cu_q, cu_k, table, _ = _inputs(lens, 4, 2, torch.float32, 16, seed=3)
    out = ioattn.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 1, 30, causal=True, block_table=table)
    ref = ioattn.flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=cu_k[1:] - cu_k[:-1],
                                         block_table=table, causal=True)
    torch.testing.assert_close(out, ref[:, 0], rtol=1e-5, atol=1e-5)


def check_compiled_step(lens, nheads, dtype):
    """A causal paged varlen step compiled whole (fullgraph) gives the eager call's output exactly."""
    q, k_cache, v_cache, cu_q, cu_k, table, _ = _inputs(lens, nheads, 2, dtype, 16, seed=4)
    max_q, max_k = max(nq for nq, _ in lens), max(nk for _, nk in lens)

    def step(q, k_cache, v_cache, cu_q, cu_k, table):
        return ioattn.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, causal=True,
                                             block_table=table)

    ref = step(q, k_cache, v_cache, cu_q, cu_k, table)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    torch.testing.assert_close(compiled(q, k_cache, v_cache, cu_q, cu_k, table), ref, rtol=0, atol=0)


def test_paged_varlen_under_torch_compile():
    check_compiled_step([(4, 20), (1, 9)], 4, torch.float32)


def _valid():
    lens = [(3, 10), (1, 5)]
    q, k_cache, v_cache, cu_q, cu_k, table, _ = _inputs(lens, 4, 2, torch.float16, 16, d=32)
    return dict(q=q, k=k_cache, v=v_cache, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3,
                max_seqlen_k=10, block_table=table)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(dropout_p=0.1), "dropout_p must be 0 with block_table"),
    (lambda a: a.update(block_table=a["block_table"].long()), "block_table.dtype"),
    (lambda a: a.update(block_table=a["block_table"][:1]), "block_table must have shape"),
    (lambda a: a.update(k=a["k"][..., :16], v=a["v"][..., :16]), "headdim"),
    (lambda a: a.update(v=a["v"][:, :8]), "v must have k's shape"),
    (lambda a: a.update(k=a["k"][0]), "rank 4"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:2]), "cu_seqlens_k must describe 2 sequences"),
    (lambda a: a.update(q=a["q"].requires_grad_()), "forward-only"),
    (lambda a: a.update(block_table=a["block_table"].repeat_interleave(2, 1)[:, ::2]),
     "block_table must have a contiguous last dimension"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].repeat_interleave(2)[::2]),
     "cu_seqlens_q must have a contiguous last dimension"),
    (lambda a: a.update(alibi_slopes=torch.ones(8, device=DEVICE)[::2]),
     "alibi_slopes must have a contiguous last dimension"),
], ids=["dropout", "table-dtype", "table-rows", "headdim", "v-shape", "k-rank", "cu-k", "grad", "table-strided",
        "cu-q-strided", "alibi-strided"])
def test_paged_varlen_validation_names_the_argument(change, match):
    args = _valid()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        ioattn.flash_attn_varlen_func(**args)


@pytest.mark.skipif(ON_GPU, reason="value checks read the tensors on the host (CPU inputs)")
def test_paged_varlen_value_checks():
    args = _valid()
    args["block_table"] = args["block_table"].clone()
    args["block_table"][0, 0] = 10_000
    with pytest.raises(ValueError, match="block_table entries"):
        ioattn.flash_attn_varlen_func(**args)
    args = _valid()
    capacity = args["block_table"].shape[1] * args["k"].shape[1]
    args["cu_seqlens_k"] = torch.tensor([0, capacity + 1, capacity + 2], dtype=torch.int32)
    args["max_seqlen_k"] = capacity + 1
    with pytest.raises(ValueError, match="more than its block_table"):
        ioattn.flash_attn_varlen_func(**args)


def test_paged_varlen_table_padding_past_the_used_pages():
    """Entries past the pages a sequence uses are never read: -1 padding there is accepted (as flash-attn's
    kernels accept it), and the result is the unpadded table's; -1 in a used page is refused (CPU inputs)."""
    lens = [(3, 20), (1, 5)]
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 4, 2, torch.float32, 16, seed=8)
    padded = table.clone()
    padded[1, 1:] = -1  # sequence 1 uses one page of 16
    out, lse, _ = _run(q, k_cache, v_cache, cu_q, cu_k, padded, lens, causal=True)
    _check(out, lse, seqs, torch.float32, causal=True)
    kv_out = ioattn.flash_attn_with_kvcache(q[3:4, None], k_cache, v_cache, cache_seqlens=cu_k[2:] - cu_k[1:2],
                                            block_table=padded[1:], causal=True)
    torch.testing.assert_close(kv_out[:, 0], out[3:4], rtol=1e-5, atol=1e-5)
    if not ON_GPU:
        padded[0, 1] = -1  # sequence 0 uses two pages
        with pytest.raises(ValueError, match="for the pages a sequence uses"):
            _run(q, k_cache, v_cache, cu_q, cu_k, padded, lens, causal=True)


def test_paged_varlen_route_by_shapes():
    """The host rule between the split-KV kernel, the Gluon paged tiles and both (ops.decode.paged_varlen_route):
    steps whose longest sequence is short stay on the split-KV kernel, one sequence takes the tiles, the rest
    run both, each on its sequences."""
    from ioattn.ops.decode import PAGED_PREFILL_MIN_ROWS as rows
    from ioattn.ops.decode import multi_row_others, paged_varlen_route, short_query_rows

    assert paged_varlen_route(rows, 1, rows) == "tiles" and paged_varlen_route(rows - 1, 1, rows - 1) == "split"
    assert paged_varlen_route(64, 64, 1) == "split"  # decode rows only
    assert paged_varlen_route(64 * 8, 64, 8) == "split"  # speculative verification, 8 rows a sequence
    assert paged_varlen_route(40, 20, 4096) == "split"  # a loose max_seqlen_q: at most total_q rows
    assert paged_varlen_route(512 + 32, 33, 512) == "mixed"  # one chunk beside 32 decode rows
    assert paged_varlen_route(4 * 2048, 4, 2048) == "mixed"  # prefill only
    assert [short_query_rows(g) for g in (1, 2, 4, 8, 16, 32)] == [16, 8, 4, 2, 1, 1]
    assert [short_query_rows(g, wide=True) for g in (1, 2, 4, 8, 16, 32, 64)] == [32, 16, 8, 4, 2, 1, 1]
    # One prefill beside decode rows, beside verification rows, beside chunks; a loose max_seqlen_q.
    assert [multi_row_others(*shapes) for shapes in ((544, 33, 512), (768, 33, 512), (1024, 8, 512),
                                                     (40, 33, 600))] == [False, True, True, False]


def test_paged_tile_list_holds_the_long_sequences_tiles():
    """decode_gluon.paged_tile_list: the count, then each sequence's query blocks past ``short_rows`` rows,
    last block first, in batch order; blocks past max_seqlen_q and entries past the host's bound left out."""
    from ioattn.kernels.decode_gluon import paged_tile_list

    lens = [1, 300, 0, 5, 128, 4, 129, 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    for short, max_q in ((0, 300), (4, 300), (4, 129), (200, 300)):
        tiles, bound = paged_tile_list(cu, sum(lens), max_q, short, 128)
        num_m = -(-max_q // 128)
        want = [b * num_m + j for b, n in enumerate(lens) if n > short
                for j in reversed(range(min(-(-n // 128), num_m)))]
        assert bound >= len(want) and tiles.shape[0] == 1 + bound
        assert tiles[0].item() == len(want) and tiles[1:1 + len(want)].tolist() == want, (short, max_q)
    tiles, bound = paged_tile_list(cu, 10, 300, 0, 128)  # total_q understated: the host bound caps the list
    assert tiles[0].item() == bound and tiles.shape[0] == 1 + bound
    tiles, bound = paged_tile_list(cu[:2], 1, 300, 4, 128)  # no sequence past 4 rows: the count alone
    assert bound == 0 and tiles.tolist() == [0]


# The split-KV half of mixed steps: (lens, nheads, nheads_k, the rule's wide answer, its short rows).
MIXED_SPLIT_CASES = {
    "group-1-wide-32-33": ([(70, 80), (32, 40), (33, 50), (1, 20), (0, 9), (5, 3)], 2, 2, True, 32),
    "group-4-wide-8-9": ([(70, 80), (8, 40), (9, 50), (1, 20), (0, 9), (3, 0)], 8, 2, True, 8),
    "group-64-wide-1": ([(70, 80), (1, 40), (2, 50), (1, 20)], 64, 1, True, 1),
    "group-1-narrow-16-17": ([(70, 80), (16, 30), (17, 30), (1, 10)] + [(0, 5)] * 31, 2, 2, False, 16),
}


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("name", MIXED_SPLIT_CASES)
def test_paged_varlen_split_kernel_takes_the_short_sequences_of_a_mixed_step(name, num_splits, monkeypatch):
    """The split-KV half of a mixed step (``ops.decode._decode`` at the rule's short rows, split outputs by
    sequence), at the wide and the narrow limit: the sequences of at most ``short`` rows (one of exactly that
    many) match the reference, with their key splits combined; the rows of the longer ones (one of short + 1)
    are left as they were (the tiles' to write), and the tile list holds exactly those sequences' query blocks."""
    from ioattn.kernels.decode_gluon import paged_tile_list
    from ioattn.ops import decode as decode_ops

    lens, nheads, nheads_k, wide, short = MIXED_SPLIT_CASES[name]
    total, batch, max_q = sum(nq for nq, _ in lens), len(lens), max(nq for nq, _ in lens)
    assert decode_ops.paged_varlen_route(total, batch, max_q) == "mixed"
    assert decode_ops.multi_row_others(total, batch, max_q) == wide
    assert decode_ops.short_query_rows(nheads // nheads_k, wide) == short
    marker = 12345.0
    real = decode_ops._decode_buffers

    def marked(*args):
        out, lse, out_part, lse_part = real(*args)
        out.fill_(marker)
        lse.fill_(marker)
        return out, lse, out_part, lse_part

    monkeypatch.setattr(decode_ops, "_decode_buffers", marked)
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, nheads, nheads_k, torch.float16, 16, seed=3)
    out, lse = decode_ops._decode(q, k_cache, v_cache, cu_k[1:] - cu_k[:-1], table, None, None, None, None, 0,
                                  HEADDIM ** -0.5, -1, 0, 0.0, True, False, num_splits, cu_seqlens_q=cu_q,
                                  max_seqlen_q=short, by_seq=True)
    firsts = cu_q.tolist()

    def rows_of(seqs_b):
        return torch.cat([torch.arange(firsts[b], firsts[b + 1]) for b in seqs_b]).to(DEVICE)

    keep = [b for b, (nq, _) in enumerate(lens) if 0 < nq <= short]
    assert any(lens[b][0] == short for b in keep)
    rows = rows_of(keep)
    _check(out[rows], lse[:, rows], [seqs[b] for b in keep], torch.float16, causal=True)
    longer = [b for b, (nq, _) in enumerate(lens) if nq > short]
    assert any(lens[b][0] == short + 1 for b in longer) or short == 1
    rows = rows_of(longer)
    assert (out[rows] == marker).all() and (lse[:, rows] == marker).all()
    tiles, _ = paged_tile_list(cu_q, total, max_q, short, 128)
    num_m = -(-max_q // 128)
    listed = tiles[1:1 + tiles[0].item()].tolist()
    assert sorted(listed) == sorted(b * num_m + j for b in longer for j in range(-(-lens[b][0] // 128)))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("plans", [True, False])
def test_paged_varlen_cuda_graph_replays_new_lengths(plans, monkeypatch):
    """One captured step replayed with other query and key lengths (the same total rows and max_seqlen_q): the
    routes read every length on the device (on sm_90 the mixed route: the short sequences on the split-KV
    kernel, the rest on the Gluon tiles from a tile list built in the graph). The captured call is the third of
    its shape: with plans, the plan's launches; without, the whole path's."""
    import ioattn.ops.decode as decode_ops

    monkeypatch.setattr(decode_ops._PAGED_PLANS, "enabled", plans)
    dtype = torch.bfloat16
    _, k_cache, v_cache, _, _, table, seqs = _inputs([(0, 300)] * 4, 8, 2, dtype, 16, seed=12)
    q = torch.randn(70, 8, HEADDIM, dtype=dtype, device=DEVICE)
    steps = [[(64, 200), (1, 300), (4, 90), (1, 50)], [(1, 17), (64, 300), (1, 1), (4, 64)],
             [(5, 120), (3, 33), (61, 299), (1, 250)]]

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    cu_q, cu_k = cu([nq for nq, _ in steps[0]]), cu([nk for _, nk in steps[0]])
    run = lambda: ioattn.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 64, 300, causal=True,
                                                block_table=table, return_attn_probs=True)[:2]
    run()
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = run()
    for lens in steps:
        cu_q.copy_(cu([nq for nq, _ in lens]))
        cu_k.copy_(cu([nk for _, nk in lens]))
        graph.replay()
        torch.cuda.synchronize()
        firsts = cu_q.tolist()
        step = [(q[firsts[b]:firsts[b + 1]].cpu(), k_b[:nk], v_b[:nk])
                for b, ((_, nk), (_, k_b, v_b)) in enumerate(zip(lens, seqs, strict=True))]
        _check(out.clone(), lse.clone(), step, dtype, causal=True)


# Paged varlen plans (``ops.decode._paged_plan_key``): a call shaped like two earlier ones (total_q, the batch and
# max_seqlen_q included) launches the plan the second recorded, on each route.
PAGED_PLAN_CASES = {
    "decode": dict(lens=[(1, 300), (1, 17), (1, 290), (1, 64), (1, 1)]),
    "verify-3-splits": dict(lens=[(4, 300), (1, 17), (3, 290)], num_splits=3),
    "one-chunk": dict(lens=[(100, 300)]),
    "mixed": dict(lens=[(70, 200), (1, 300), (3, 90), (1, 50), (65, 65)]),
    "mixed-alibi-softcap-window": dict(lens=[(90, 300), (1, 250), (2, 40)], alibi=True, softcap=15.0,
                                       window_size=(100, 0)),
}


def _plan_call(q, k_cache, v_cache, cu_q, cu_k, table, lens, slopes=None, num_splits=0, **opts):
    """A causal call through the public API, or with ``num_splits`` (which the API does not take) the op."""
    if num_splits:
        left, right = opts.get("window_size", (-1, 0))
        return paged_varlen_attention(q, k_cache, v_cache, cu_q, cu_k[1:] - cu_k[:-1], table, slopes,
                                      max(nq for nq, _ in lens), q.shape[-1] ** -0.5, left, 0,
                                      opts.get("softcap", 0.0), num_splits)
    return _run(q, k_cache, v_cache, cu_q, cu_k, table, lens, alibi_slopes=slopes, causal=True, **opts)[:2]


@pytest.mark.skipif(not ON_GPU, reason="launch plans replay compiled GPU launches")
@pytest.mark.parametrize("name", PAGED_PLAN_CASES)
def test_paged_varlen_plan_matches_the_whole_path(name, monkeypatch):
    """No key for a shape's first call, the second records a plan (on sm_90 with the launches of the route the
    shapes pick), the third launches it (the same result, bit for bit); on another step of the same shapes (new
    queries, caches, page table and key lengths) the plan gives what the whole path gives, bit for bit, and the
    reference's."""
    import ioattn.ops.decode as decode_ops
    from ioattn.kernels import decode_gluon

    case = dict(PAGED_PLAN_CASES[name])
    lens, alibi = case.pop("lens"), case.pop("alibi", False)
    q, k_cache, v_cache, cu_q, cu_k, table, _ = _inputs(lens, 8, 2, torch.bfloat16, 16, seed=len(name))
    slopes = make_alibi(len(lens), 8, per_batch=True).to(DEVICE) if alibi else None
    planned = []
    real = decode_ops._paged_planned
    monkeypatch.setattr(decode_ops, "_paged_planned", lambda *a: planned.append(real(*a)) or planned[-1])
    outs = [_plan_call(q, k_cache, v_cache, cu_q, cu_k, table, lens, slopes, **case) for _ in range(3)]
    assert [p is not None for p in planned] == [False, True]
    (plan,) = decode_ops._PAGED_PLANS.plans.values()
    launchers = {launch[0] for launch in plan.launches}
    route = "split"
    if not case.get("num_splits") and decode_gluon.gluon_paged_prefill_supported(
            q, k_cache, v_cache, slopes, 0.1, case.get("softcap", 0.0)):
        route = decode_ops.paged_varlen_route(q.shape[0], len(lens), max(nq for nq, _ in lens))
    assert (decode_ops._launch_decode in launchers) == (route != "tiles")
    assert (decode_gluon._launch_ws in launchers) == (route != "split"), (route, launchers)
    assert torch.equal(outs[2][0], outs[0][0]) and torch.equal(outs[2][1], outs[0][1])
    # Another step of the same shapes: every tensor new, the key lengths shuffled among the sequences of one
    # query length (their pages hold up to the longest's keys).
    lens2 = list(lens)
    for nq in {nq for nq, _ in lens}:
        idx = [b for b, (m, _) in enumerate(lens) if m == nq]
        for b, nk in zip(idx, [lens[i][1] for i in reversed(idx)], strict=True):
            lens2[b] = (nq, nk)
    q2, k2, v2, cu_q2, cu_k2, table2, seqs2 = _inputs(lens2, 8, 2, torch.bfloat16, 16, seed=len(name) + 100)
    assert table2.shape == table.shape and k2.shape == k_cache.shape and not torch.equal(table2, table)
    out_p, lse_p = _plan_call(q2, k2, v2, cu_q2, cu_k2, table2, lens2, slopes, **case)
    assert planned[-1] is not None
    monkeypatch.setattr(decode_ops._PAGED_PLANS, "enabled", False)
    out_w, lse_w = _plan_call(q2, k2, v2, cu_q2, cu_k2, table2, lens2, slopes, **case)
    assert torch.equal(out_p, out_w) and torch.equal(lse_p, lse_w)
    mask = {k: v for k, v in case.items() if k in ("softcap", "window_size")}
    _check(out_p, lse_p, seqs2, torch.bfloat16, None if slopes is None else slopes.cpu(), causal=True, **mask)


@pytest.mark.skipif(not ON_GPU, reason="launch plans replay compiled GPU launches")
def test_paged_varlen_plan_declines_what_it_cannot_take(monkeypatch):
    """With a plan recorded: q 2 bytes off (same shape and strides) finds none and the call is still right;
    the fast launch off makes no key; another SM count makes another key."""
    import ioattn.kernels.fastlaunch as fastlaunch
    import ioattn.ops.decode as decode_ops

    lens = PAGED_PLAN_CASES["mixed"]["lens"]
    q, k_cache, v_cache, cu_q, cu_k, table, _ = _inputs(lens, 8, 2, torch.bfloat16, 16, seed=3)
    for _ in range(2):
        ref = _plan_call(q, k_cache, v_cache, cu_q, cu_k, table, lens)
    tensors = (q, k_cache, v_cache, cu_q, cu_k[1:] - cu_k[:-1], table, None)
    scalars = (max(nq for nq, _ in lens), 1.0 / math.sqrt(HEADDIM), -1, 0, 0.0, 0)  # as the API passes them
    key = decode_ops._paged_plan_key(tensors, scalars)
    assert key is not None and decode_ops._paged_planned(key, tensors) is not None
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)
    q_off = buf[1:].view(q.shape).copy_(q)
    assert q_off.data_ptr() % 16 and q_off.stride() == q.stride()
    off = (q_off, *tensors[1:])
    assert decode_ops._paged_plan_key(off, scalars) == key and decode_ops._paged_planned(key, off) is None
    got = _plan_call(q_off, k_cache, v_cache, cu_q, cu_k, table, lens)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-2)
    monkeypatch.setattr(fastlaunch, "_ENABLED", False)
    assert decode_ops._paged_plan_key(tensors, scalars) is None
    monkeypatch.undo()
    monkeypatch.setattr(decode_ops.decode_gluon, "_num_sms", lambda device: 7)
    assert decode_ops._paged_plan_key(tensors, scalars) != key


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the real plans (test_paged_varlen_plan_matches_the_whole_path)")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_varlen_plan_replays_its_launches_in_the_interpreter(num_splits, monkeypatch):
    """The paged varlen plan's builders on the split-KV route, replayed through Triton's own launch in the
    interpreter (the compiled entries plans keep do not exist on CPU: each launch's constexprs stand in for its
    entry): a shape's second call records, its third replays the decode launch and, with splits, the combine,
    bit for bit."""
    import ioattn.ops.decode as decode_ops

    planned = plans_in_the_interpreter(monkeypatch, "_paged_plan_key", "_paged_planned")
    lens, lens2 = [(1, 40), (3, 33), (1, 20)], [(1, 20), (3, 33), (1, 40)]
    first = _inputs(lens, 4, 2, torch.float16, 16, seed=num_splits)
    for _ in range(2):
        _plan_call(*first[:6], lens, num_splits=num_splits)
    # The replay on another step of the same shapes: new queries, caches, page table and key lengths.
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens2, 4, 2, torch.float16, 16, seed=num_splits + 5)
    assert table.shape == first[5].shape
    out, lse = _plan_call(q, k_cache, v_cache, cu_q, cu_k, table, lens2, num_splits=num_splits)
    assert [p is not None for p in planned] == [False, True]
    (plan,) = decode_ops._PAGED_PLANS.plans.values()
    assert len(plan.launches) == (2 if num_splits > 1 else 1) and (plan.parts is not None) == (num_splits > 1)
    monkeypatch.setattr(decode_ops._PAGED_PLANS, "enabled", False)
    whole = _plan_call(q, k_cache, v_cache, cu_q, cu_k, table, lens2, num_splits=num_splits)
    assert torch.equal(out, whole[0]) and torch.equal(lse, whole[1])
    _check(out, lse, seqs, torch.float16, causal=True)
