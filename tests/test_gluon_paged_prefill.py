"""The Gluon forward over a paged cache (sm_90): packed variable-length queries with ``block_table`` through
``decode_gluon.gluon_paged_prefill``, against attention_ref on each sequence's gathered keys (NaN in every
unused cache slot, test_paged_varlen's inputs), and which calls take it."""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU
from test_paged_varlen import LENS, LONG, _check, _inputs, _run, check_compiled_step

import ioattn.ops.decode as decode_ops
from ioattn.kernels.decode_gluon import gluon_paged_prefill_supported
from ioattn.testing import make_alibi

HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
pytestmark = pytest.mark.skipif(not HOPPER, reason="the Gluon paged forward runs on sm_90 only")

# Prefill chunks beside decode rows and short sequences: query tiles past a sequence's end, sequences
# without queries or keys, more queries than keys, one tile holding two pages' partial last block.
MIXED = [(300, 1100), (1, 1500), (64, 64), (0, 9), (130, 200), (7, 3), (3, 0), (129, 2049)]


@pytest.fixture(params=["tiles", "mixed"])
def prefill_calls(request, monkeypatch):
    """Every packed call the Gluon path supports takes it, for all its sequences ("tiles") or for those the
    split-KV kernel leaves ("mixed"), whatever the shapes rule; counts the Gluon launches."""
    monkeypatch.setattr(decode_ops, "paged_varlen_route", lambda *args: request.param)
    calls = []
    real = decode_ops.gluon_paged_prefill

    def counting(*args, **kwargs):
        calls.append(args[1].shape[1])  # page size
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_ops, "gluon_paged_prefill", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size, group", [(16, 1), (16, 4), (64, 8), (256, 2), (32, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [LENS, MIXED], ids=["short", "mixed"])
def test_paged_prefill_matches_reference(dtype, block_size, group, causal, lens, prefill_calls):
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 2 * group, 2, dtype, block_size)
    out, lse, _ = _run(q, k_cache, v_cache, cu_q, cu_k, table, lens, causal=causal)
    assert prefill_calls == [block_size]
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    _check(out, lse, seqs, dtype, causal=causal)


@pytest.mark.parametrize("d, block_size", [(64, 16), (128, 16), (256, 16), (64, 256), (128, 128), (256, 256)])
@pytest.mark.parametrize("opts", [
    {"causal": True}, {"window_size": (100, 20)}, {"window_size": (50, -1), "causal": True}, {"softcap": 5.0},
    {"softcap": 50.0, "causal": True}, {"alibi": "heads", "causal": True},
    {"alibi": "batch", "softcap": 3.0, "window_size": (-1, 60)},
], ids=str)
def test_paged_prefill_head_dims_masks_and_mods(d, block_size, opts, prefill_calls):
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(MIXED, 8, 2, torch.bfloat16, block_size, d=d, seed=1)
    slopes = make_alibi(len(MIXED), 8, per_batch=alibi == "batch") if alibi else None
    out, lse, _ = _run(q, k_cache, v_cache, cu_q, cu_k, table, MIXED,
                       alibi_slopes=None if slopes is None else slopes.cuda(), softmax_scale=0.3 * d ** -0.5,
                       **opts)
    assert prefill_calls == [block_size]
    _check(out, lse, seqs, torch.bfloat16, slopes, softmax_scale=0.3 * d ** -0.5, **opts)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("route, wide", [("tiles", True), ("mixed", True), ("mixed", False)])
def test_paged_prefill_programs_walk_many_tiles(d, route, wide, monkeypatch):
    """Three programs walk the whole tile list (the persistent grid, one program an SM, made small), on both
    routes; sequences of exactly the split-KV kernel's rows and one more, at its wide and narrow limit (empty
    sequences beside them make the rows beside the longest fewer than their count), and one without keys."""
    from ioattn.kernels import decode_gluon

    monkeypatch.setattr(decode_gluon, "_num_sms", lambda device: 3)
    monkeypatch.setattr(decode_ops, "paged_varlen_route", lambda *args: route)
    real = decode_ops.gluon_paged_prefill
    calls = []
    monkeypatch.setattr(decode_ops, "gluon_paged_prefill",
                        lambda *a, **k: calls.append(1) or real(*a, **{**k, "persistent": True}))
    short = decode_ops.short_query_rows(4, wide)
    lens = [(300, 1100), (short, 200), (short + 1, 90), (1, 700), (3, 0), (129, 2049), (64, 64)]
    if not wide:
        lens += [(0, 1)] * (sum(nq for nq, _ in lens) - 300)
    assert decode_ops.multi_row_others(sum(nq for nq, _ in lens), len(lens), 300) == wide
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 8, 2, torch.bfloat16, 16, d=d, seed=11)
    out, lse, _ = _run(q, k_cache, v_cache, cu_q, cu_k, table, lens, causal=True)
    assert calls == [1]
    _check(out, lse, seqs, torch.bfloat16, causal=True)


def test_paged_prefill_lengths_past_capacity_read_no_other_pages(prefill_calls):
    """Key lengths past a table row's capacity are cut there: the next row's pages are never read."""
    lens = [(70, 32), (2, 20)]
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 4, 2, torch.bfloat16, 16, seed=7)
    table = table[:, :2].contiguous()  # capacity 32 keys a sequence: the first one's keys exactly
    k_cache[table[1].long()] = float("nan")
    v_cache[table[1].long()] = float("nan")
    too_long = torch.tensor([500], dtype=torch.int32, device="cuda")
    out, lse = decode_ops.paged_varlen_attention(q[:70], k_cache, v_cache, cu_q[:2], too_long, table[:1], None, 70,
                                                 128 ** -0.5, -1, -1, 0.0, 0)
    assert prefill_calls == [16]
    _check(out, lse, seqs[:1], torch.bfloat16)


def test_paged_prefill_strided_q_and_table_padding(prefill_calls):
    """q as a view of a packed qkv tensor, and -1 in the table past the pages each sequence uses."""
    lens = [(150, 300), (90, 17), (1, 40)]
    q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 8, 2, torch.bfloat16, 16, seed=5)
    qkv = torch.zeros(q.shape[0], 3, *q.shape[1:], dtype=q.dtype, device=q.device)
    qkv[:, 0] = q
    padded = table.clone()
    for b, (_, nk) in enumerate(lens):
        padded[b, -(-nk // 16):] = -1
    out, lse, _ = _run(qkv[:, 0], k_cache, v_cache, cu_q, cu_k, padded, lens, causal=True)
    assert prefill_calls == [16]
    _check(out, lse, seqs, torch.bfloat16, causal=True)


def test_paged_prefill_routing(monkeypatch):
    """Which packed calls take the Gluon path (``paged_varlen_route``): one sequence of PAGED_PREFILL_MIN_ROWS
    query rows or more all of it, several sequences with one that long the sequences of more than
    ``short_query_rows`` rows ("mixed"), pages of 16 tokens or more, no forced key split; the rest (LENS: no
    sequence that long) take the split-KV decode kernel alone."""
    calls = []
    real = decode_ops.gluon_paged_prefill
    monkeypatch.setattr(decode_ops, "gluon_paged_prefill",
                        lambda *a, **k: calls.append(k.get("short_rows", 0)) or real(*a, **k))
    chunks = [(130, 300), (64, 64), (90, 1000)]
    long_beside_decodes = [(1500, 1500), (1, 700), (1, 40)]
    short, wide = decode_ops.short_query_rows(4), decode_ops.short_query_rows(4, wide=True)
    for lens, block_size, splits, taken in [(chunks, 16, 0, [wide]), (LONG, 16, 0, [wide]), (LENS, 16, 0, []),
                                            (chunks, 8, 0, []), (chunks, 16, 2, []), ([(64, 80)], 16, 0, [0]),
                                            ([(63, 80)], 16, 0, []), (long_beside_decodes, 16, 0, [short]),
                                            (chunks, 48, 0, [])]:  # pages of 48: not a power of two
        calls.clear()
        q, k_cache, v_cache, cu_q, cu_k, table, seqs = _inputs(lens, 8, 2, torch.bfloat16, block_size, seed=2)
        out, lse = decode_ops.paged_varlen_attention(q, k_cache, v_cache, cu_q, cu_k[1:] - cu_k[:-1], table, None,
                                                     max(nq for nq, _ in lens), 128 ** -0.5, -1, 0, 0.0, splits)
        assert calls == taken, (lens, block_size, splits)
        _check(out, lse, seqs, torch.bfloat16, causal=True)
    q = torch.empty(10, 8, 128, device="cuda", dtype=torch.bfloat16)
    cache = torch.empty(4, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    assert gluon_paged_prefill_supported(q, cache, cache, None, 0.1, 0.0)
    assert not gluon_paged_prefill_supported(q.float(), cache.float(), cache.float(), None, 0.1, 0.0)
    assert not gluon_paged_prefill_supported(q[..., :96], cache[..., :96], cache[..., :96], None, 0.1, 0.0)
    assert not gluon_paged_prefill_supported(q, cache, cache, None, -0.1, 0.0)
    odd = torch.empty(4, 48, 2, 128, device="cuda", dtype=torch.bfloat16)  # pages of 48: not a power of two
    assert not gluon_paged_prefill_supported(q, odd, odd, None, 0.1, 0.0)


def test_paged_prefill_under_torch_compile(prefill_calls):
    check_compiled_step([(100, 300), (40, 70)], 8, torch.bfloat16)
    assert len(prefill_calls) >= 2
