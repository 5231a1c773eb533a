"""Split-KV decoding for Hopper (sm_90) in Gluon: a load warp streams K/V tiles by TMA, paged or contiguous.

``decode.py``'s kernel leaves the loads to Triton's software pipeliner, which keeps two tiles in flight per
program and needs several programs per SM (hence key splits and a combine launch) to cover DRAM latency.
Here one warp only issues copies: bulk tensor copies (TMA) of K and V tiles into a ``NUM_STAGES`` ring, each
stage with a ready and an empty mbarrier per tensor, refilled as soon as the consumer warpgroup's products
have read it (the default: two stages of 128 keys, 128 KB at d = 128). One program per (batch, KV head)
streams at about the rate several pipelined ones did, so long caches need few or no splits.

- Rows: the GQA group's query heads times the query tokens, packed as ``decode.py`` packs them (row r is
  token r // GROUP, head hk * GROUP + r % GROUP) and padded to the 64 rows of a wgmma.
- Paged caches (power-of-two pages of 16 tokens or more): a tile of BLOCK_N keys is BLOCK_N // BOX boxes of
  BOX = min(page_size, BLOCK_N) rows, each inside one page; the load warp reads a tile's page entries in one
  load, a tile ahead (``attn_fwd_gluon.stream_kv_boxes``), so no table read sits between two copies. A
  contiguous cache is a tile per box.
- Keys past the sequence (the last tile's tail, read from the clamped last page or the next rows): their
  scores are masked, and the consumer zeroes their V rows in shared memory before PV
  (``attn_fwd_gluon.zero_rows_past``), so whatever unused slots hold (NaN included) never reaches the output.
- Scores, masks (causal and windows aligned bottom-right), softcap and ALiBi come from the Gluon forward's
  ``_softmax_block``; outputs and log-sum-exps are ``decode.py``'s, per split, merged by ``combine.py``.

The module also launches the Gluon forward's warp-specialised tiles over a paged cache for packed
variable-length queries (``gluon_paged_prefill``: prefill chunks of ``flash_attn_varlen_func(...,
block_table=...)``), with the same box loads.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .attn_fwd_gluon import (
    _CONFIGS,
    _GL_DTYPES,
    FwdConfig,
    _launch_ws,
    _num_sms,
    _softcap_mode,
    _softmax_block,
    _tma_describable,
    _ws_first_qk,
    _ws_fresh,
    consumer_acc_layout,
    gluon_enabled_on,
    gluon_scales,
    normalized_rows,
    stream_kv_boxes,
    zero_rows_past,
)
from .attn_fwd_gluon import _descriptor as _rows_descriptor
from .decode import key_range, paged_tile_list_kernel
from .fastlaunch import Launcher, TmaDesc, cdiv, next_power_of_2

_launch_tile_list = Launcher(paged_tile_list_kernel)

BLOCK_M = gl.constexpr(64)  # the wgmma's rows: GROUP x seqlen_q packed rows must fit


@gluon.jit
def _producer(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, bt_row, row0, col_k, col_v, start,
              n_tiles, seqlen_k, BLOCK_N: gl.constexpr, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """The load warp: K and V of tiles start, start + BLOCK_N, ... into the ring (``stream_kv_boxes``)."""
    stream_kv_boxes(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, bt_row, row0, col_k, col_v,
                    start, n_tiles, seqlen_k, start * 0, BLOCK_N, PAGED, PAGE_SIZE, True)


@gluon.jit
def _consumer(Q, Out, Lse, Alibi, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn_bar,
              b, hk, split, start, n_tiles, seqlen_k, seqlen_q, diag, full_lo, full_hi,
              stride_qb, stride_qs, stride_qh, stride_osplit, stride_ob, stride_os, stride_oh,
              stride_lsplit, stride_lb, stride_lh, stride_ls, stride_ab,
              score_scale, tanh_scale, window_left, window_right,
              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, SOFTCAP: gl.constexpr,
              HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
    """One warpgroup: S = Q K^T and O += P V by wgmma over the ring's tiles, the online softmax between."""
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = consumer_acc_layout(BLOCK_N)
    o_layout: gl.constexpr = consumer_acc_layout(HEAD_DIM)
    q_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    TPW_D: gl.constexpr = HEAD_DIM // 8
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])

    # Q: the packed rows (zero past the group's last token), from global memory into wgmma's A registers.
    num_rows = seqlen_q * GROUP
    io_r = gl.arange(0, BLOCK_M, gl.SliceLayout(1, io_layout))
    io_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, io_layout))
    io_ok = (io_r < num_rows)[:, None]
    q_rows = b.to(gl.int64) * stride_qb + (io_r // GROUP) * stride_qs + (hk * GROUP + io_r % GROUP) * stride_qh
    q = gl.load(Q + q_rows[:, None] + io_d[None, :], mask=io_ok, other=0.0)
    q_op = gl.convert_layout(q, q_op_layout)

    r = gl.arange(0, BLOCK_M, row_s)
    rows = r // GROUP  # query token of each packed row
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    alibi_slope = 0.0
    if HAS_ALIBI:
        slope = gl.load(Alibi + b * stride_ab + hk * GROUP + r % GROUP, mask=r < num_rows, other=0.0)
        alibi_slope = (slope * (1.4426950408889634 / score_scale))[:, None]
    m_i, l_i, acc, _ = _ws_fresh(BLOCK_M, BLOCK_N, HEAD_DIM, False)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mods = (rows, offs_n, seqlen_k, diag, score_scale, tanh_scale, alibi_slope, window_left, window_right, 0, rows,
            0.0, 0, 0)
    if n_tiles > 0:
        # The first tile's scores alone (as the forward's consumer: its accumulator only joins from the
        # first PV), then per tile j: PV of tile j - 1 and QK^T of tile j in flight together.
        s = _ws_first_qk(q_op, k_smem, k_ready, k_empty, turn_bar, turn_bar, s_zero, 0, 0, False)  # no turns
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, start, full_lo, full_hi, *mods, SOFTCAP, HAS_ALIBI,
                                            HAS_LEFT, HAS_RIGHT, SOFTCAP, False)
        for j in range(1, n_tiles):
            prev = (j - 1) % NUM_STAGES
            stage = j % NUM_STAGES
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_STAGES) & 1)
            acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            mbarrier.wait(k_ready.index(stage), (j // NUM_STAGES) & 1)
            s_tok = warpgroup_mma(q_op, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s, acc = warpgroup_mma_wait(0, deps=(s_tok, acc_tok))
            mbarrier.arrive(k_empty.index(stage))
            mbarrier.arrive(v_empty.index(prev))
            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, start + j * BLOCK_N, full_lo, full_hi, *mods,
                                                SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, SOFTCAP, False)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        last = (n_tiles - 1) % NUM_STAGES
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // NUM_STAGES) & 1)
        zero_rows_past(v_smem.index(last), start + (n_tiles - 1) * BLOCK_N, seqlen_k)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))

    # Normalise; a row with no allowed key gives 0 and lse -inf (decode.py's outputs, one split's part).
    out, lse = normalized_rows(acc, gl.convert_layout(m_i, row_o), gl.convert_layout(l_i, row_o), score_scale)
    out = gl.convert_layout(out, io_layout)
    o_ptrs = (Out + split.to(gl.int64) * stride_osplit + b.to(gl.int64) * stride_ob + (io_r // GROUP) * stride_os
              + (hk * GROUP + io_r % GROUP) * stride_oh)
    gl.store(o_ptrs[:, None] + io_d[None, :], out.to(Out.dtype.element_ty), mask=io_ok)
    ro = gl.arange(0, BLOCK_M, row_o)
    l_ptrs = (Lse + split.to(gl.int64) * stride_lsplit + b.to(gl.int64) * stride_lb
              + (hk * GROUP + ro % GROUP) * stride_lh + (ro // GROUP) * stride_ls)
    gl.store(l_ptrs, lse, mask=ro < num_rows)


@gluon.jit
def decode_gluon_kernel(
    k_desc, v_desc, Q, Out, Lse, CacheSeqlens, BlockTable, CacheBatchIdx, Alibi, LeftPad,
    stride_qb, stride_qs, stride_qh, stride_kh, stride_vh,
    stride_osplit, stride_ob, stride_os, stride_oh, stride_lsplit, stride_lb, stride_lh, stride_ls,
    stride_btb, stride_ab, capacity, nheads_k, seqlen_q, seqlen_new, num_splits,
    score_scale, tanh_scale, window_left, window_right,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, HAS_BATCH_IDX: gl.constexpr, SOFTCAP: gl.constexpr,
    HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_LEFTPAD: gl.constexpr = False,
):
    """One program per (batch x KV head, split): a load warp and a consumer warpgroup (module docstring)."""
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k
    seqlen_k = gl.load(CacheSeqlens + b) + seqlen_new
    # HAS_LEFTPAD (contiguous caches): the sequence's keys start at cache position key0 (``decode.py``'s).
    gl.static_assert(not (HAS_LEFTPAD and PAGED), "cache_leftpad takes the portable kernel over pages")
    key0 = 0
    if HAS_LEFTPAD:
        key0 = gl.maximum(gl.minimum(gl.load(LeftPad + b), seqlen_k), 0)
        seqlen_k -= key0
    diag = seqlen_k - seqlen_q  # bottom-right alignment: token i sits at key position i + diag

    # Keys any row may see, [lo, hi), and the whole tiles every row sees, [full_lo, full_hi).
    lo, hi, first_full, last_full = key_range(diag, seqlen_q - 1 + diag, seqlen_k, window_left, window_right,
                                              BLOCK_N, HAS_LEFT, HAS_RIGHT)
    full_lo = lo + gl.maximum(gl.cdiv(first_full - lo, BLOCK_N), 0) * BLOCK_N
    full_hi = full_lo + gl.maximum((last_full - full_lo) // BLOCK_N, 0) * BLOCK_N
    tiles_per_split = gl.cdiv(gl.cdiv(hi - lo, BLOCK_N), num_splits)
    start = gl.minimum(lo + split * tiles_per_split * BLOCK_N, hi)
    n_tiles = gl.cdiv(gl.minimum(start + tiles_per_split * BLOCK_N, hi) - start, BLOCK_N)

    cache_row = b
    if HAS_BATCH_IDX:
        cache_row = gl.load(CacheBatchIdx + b)
    row0 = cache_row * capacity + key0  # contiguous: the sequence's first key's row

    # The ring as TMA fills it: per stage, HEAD_DIM / 64 column blocks of (BLOCK_N, 64) (128-byte swizzle),
    # which is byte for byte the (BLOCK_N, HEAD_DIM) tile the wgmma reads (the same swizzle, column-blocked).
    dtype: gl.constexpr = k_desc.dtype
    CB: gl.constexpr = HEAD_DIM // 64
    ring_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], dtype)
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES * CB, BLOCK_N, 64], ring_layout)
    v_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES * CB, BLOCK_N, 64], ring_layout)
    k_smem = k_ring._reinterpret(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], tile_layout)
    v_smem = v_ring._reinterpret(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], tile_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())  # _ws_first_qk's, unused
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    mbarrier.init(turn_bar, count=1)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (Q, Out, Lse, Alibi, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn_bar,
                     b, hk, split, start, n_tiles, seqlen_k, seqlen_q, diag, full_lo, full_hi,
                     stride_qb, stride_qs, stride_qh, stride_osplit, stride_ob, stride_os, stride_oh,
                     stride_lsplit, stride_lb, stride_lh, stride_ls, stride_ab,
                     score_scale, tanh_scale, window_left, window_right,
                     GROUP, HEAD_DIM, BLOCK_N, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT)),
        (_producer, (k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                     BlockTable + b.to(gl.int64) * stride_btb, row0, hk * stride_kh, hk * stride_vh, start, n_tiles,
                     seqlen_k, BLOCK_N, PAGED, PAGE_SIZE)),
    ], [1], [48])


# ---------------------------------------------------------------------------------------------------------
# Host side

SMEM_PER_SM = 227 * 1024


class DecodeConfig(NamedTuple):
    block_n: int = 128
    stages: int = 2

    def smem_bytes(self, headdim: int, elem: int = 2) -> int:
        # The K and V rings, plus barriers and layout-conversion scratch (8.1 KB at (128, 2), offline sm_90a).
        return 2 * self.stages * self.block_n * headdim * elem + 9 * 1024


CONFIG = DecodeConfig()


def _boxable_page(page: int) -> bool:
    """Pages the box loads handle: a power of two of 16 tokens or more, so a box of min(page, BLOCK_N) rows
    never crosses a page and a tile is whole boxes (``attn_fwd_gluon.load_kv_boxes``)."""
    return page >= 16 and page & (page - 1) == 0


def _describable(cache: torch.Tensor) -> bool:
    """A (num_blocks or batch, page or capacity, nheads_k, d) cache as one 2D (rows, columns) TMA view:
    unit d-stride, rows laid end to end, 16-byte aligned base and strides."""
    elem = cache.element_size()
    return (cache.stride(-1) == 1 and cache.stride(0) == cache.shape[1] * cache.stride(1)
            and cache.data_ptr() % 16 == 0 and all((cache.stride(i) * elem) % 16 == 0 for i in (1, 2)))


def _cache_call_ok(q, k_cache, v_cache, alibi_slopes, softmax_scale: float, softcap: float) -> bool:
    """What both Gluon kernels over a cache need besides sm_90 (each caller checks ``gluon_enabled_on``): q and
    the caches in one 16-bit dtype, a positive scale without softcap (the running max is kept in raw q.k
    units), float32 ALiBi slopes, caches describable by TMA."""
    if q.dtype not in _GL_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return False
    if softcap == 0 and not softmax_scale > 0:
        return False
    if alibi_slopes is not None and alibi_slopes.dtype != torch.float32:
        return False
    return _describable(k_cache) and _describable(v_cache)


def gluon_decode_supported(q, k_cache, v_cache, block_table, rotary_cos, alibi_slopes, softmax_scale: float,
                           softcap: float, cache_leftpad=None) -> bool:
    """Whether ``gluon_decode`` runs this call: sm_90, 16-bit, d = 64 or 128, GQA group x query tokens
    <= 64, no rotary, power-of-two pages of >= 16 tokens and no ``cache_leftpad`` with them (a tile would
    start inside a page), caches describable by TMA. ``IOATTN_GLUON=0`` turns it off."""
    if not gluon_enabled_on(q):
        return False
    batch, seqlen_q, nheads, d = q.shape
    if d not in (64, 128) or (nheads // k_cache.shape[2]) * seqlen_q > BLOCK_M.value or rotary_cos is not None:
        return False
    if block_table is not None and (cache_leftpad is not None or not _boxable_page(k_cache.shape[1])):
        return False
    return _cache_call_ok(q, k_cache, v_cache, alibi_slopes, softmax_scale, softcap)


def gluon_decode_preferred(device: torch.device, batch: int, nheads_k: int) -> bool:
    """The Gluon kernel is the default where the (batch x KV head) programs fit on the SMs at once, the
    long-cache regime where the portable kernel needs key splits (and a combine) to keep DRAM busy; with more
    programs the portable kernel, several per SM, overlaps their starts better (H200, benchmarks/NOTES.md,
    Decode v6)."""
    return batch * nheads_k <= _num_sms(device)


def gluon_num_splits(device: torch.device, batch: int, nheads_k: int, capacity: int, headdim: int,
                     config: DecodeConfig = CONFIG, max_splits: int = 64) -> int:
    """Splits so the (batch x KV head) programs fill each SM once with the programs that fit there (one
    program streams at the rate of several pipelined ones, so no more), each split >= 4 tiles."""
    per_sm = max(1, SMEM_PER_SM // config.smem_bytes(headdim))
    wanted = per_sm * _num_sms(device) // max(batch * nheads_k, 1)
    return max(1, min(wanted, cdiv(capacity, 4 * config.block_n), max_splits))


@functools.cache
def _box_layout(box: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([box, 64], _GL_DTYPES[dtype])


def _descriptor(cache: torch.Tensor, box: int) -> TmaDesc:
    shape, strides = cache.shape, cache.stride()
    return TmaDesc(cache, (shape[0] * shape[1], (shape[2] - 1) * strides[2] + shape[3]), (strides[1], 1),
                   (box, 64), _box_layout(box, cache.dtype))


_launch = Launcher(decode_gluon_kernel)


def gluon_decode(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, seqlen_new: int,
                 softmax_scale: float, window_left: int, window_right: int, softcap: float, num_splits: int,
                 out_part, lse_part, o_strides, l_strides, config: DecodeConfig | None = None,
                 cache_leftpad=None) -> tuple:
    """Writes ``decode.py``'s per-split outputs (or the final ones, one split) into out_part / lse_part with
    the given (split, batch, token, head) / (split, batch, head, token) strides. ``cache_leftpad``: int32
    (batch,), each sequence's first cache position (contiguous caches). Returns the launch as (launcher, grid,
    constexprs, builder, arguments): ``builder(q, k_cache, v_cache, out_part, lse_part, cache_seqlens,
    block_table, cache_batch_idx, alibi_slopes, cache_leftpad)`` gives the arguments for another call's
    tensors of the same shapes and strides (it holds no tensor)."""
    cfg = config or CONFIG
    batch, seqlen_q, nheads, d = q.shape
    nheads_k = k_cache.shape[2]
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    box = min(page, cfg.block_n) if paged else cfg.block_n
    score_scale, tanh_scale = gluon_scales(softmax_scale, softcap)
    kd, vd = _descriptor(k_cache, box)[1:], _descriptor(v_cache, box)[1:]
    statics = (q.stride(0), q.stride(1), q.stride(2), k_cache.stride(2), v_cache.stride(2),
               *o_strides, *l_strides,
               block_table.stride(0) if paged else 0,
               alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
               0 if paged else k_cache.shape[1], nheads_k, seqlen_q, seqlen_new, num_splits,
               score_scale, tanh_scale, window_left, window_right)

    def build(q, k_cache, v_cache, out_part, lse_part, cache_seqlens, block_table, cache_batch_idx, alibi_slopes,
              cache_leftpad):
        dummy = cache_seqlens
        return (TmaDesc(k_cache, *kd), TmaDesc(v_cache, *vd), q, out_part, lse_part, cache_seqlens,
                dummy if block_table is None else block_table, dummy if cache_batch_idx is None else cache_batch_idx,
                dummy if alibi_slopes is None else alibi_slopes, dummy if cache_leftpad is None else cache_leftpad,
                *statics)

    flags = dict(GROUP=nheads // nheads_k, HEAD_DIM=d, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.stages,
                 PAGED=paged, PAGE_SIZE=page, HAS_BATCH_IDX=cache_batch_idx is not None,
                 SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
                 HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, num_warps=4)
    if cache_leftpad is not None:  # only then (a sweep's baseline kernel may predate the flag)
        flags["HAS_LEFTPAD"] = True
    grid = (batch * nheads_k, num_splits)
    args = build(q, k_cache, v_cache, out_part, lse_part, cache_seqlens, block_table, cache_batch_idx, alibi_slopes,
                 cache_leftpad)
    _launch(grid, *args, **flags)
    return _launch, grid, flags, build, args


# ---------------------------------------------------------------------------------------------------------
# Packed variable-length queries over a paged cache (prefill chunks): the Gluon forward's warp-specialised
# kernel with its load warp reading K and V by page (``attn_fwd_gluon._ws_main``, PAGE_SIZE). d = 64 takes the
# warp-specialised tiles too (its dense forward runs a one-warpgroup kernel that has no paged loads).
PAGED_CONFIGS = {64: FwdConfig(64, 128, 2, 4, "pingpong", True, fixed_max=True, alibi_sides=True),
                 128: _CONFIGS[128], 256: _CONFIGS[256]}


class PagedTensors(NamedTuple):
    """The tensors of one paged varlen call (``ops.decode.paged_varlen_attention``) that its launches read: the
    inputs, the outputs (out (total_q, nheads, d), lse (nheads, total_q)), the split-KV half's per-split buffers
    (out and lse again without splits: the decode kernel then writes them) and the tile list (None without
    one). Launch builders of the call's plan take one of these."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqlens_k: torch.Tensor
    block_table: torch.Tensor
    alibi_slopes: torch.Tensor | None
    out: torch.Tensor
    lse: torch.Tensor
    out_part: torch.Tensor | None
    lse_part: torch.Tensor | None
    tile_list: torch.Tensor | None


def gluon_paged_prefill_supported(q, k_cache, v_cache, alibi_slopes, softmax_scale: float, softcap: float) -> bool:
    """Whether ``gluon_paged_prefill`` runs this call: sm_90, 16-bit, d = 64 / 128 / 256, power-of-two pages of
    >= 16 tokens, q (total, nheads, d) and the caches describable by TMA. ``IOATTN_GLUON=0`` turns it off."""
    if not gluon_enabled_on(q, k_cache, v_cache):
        return False
    if q.dim() != 3 or q.shape[-1] not in PAGED_CONFIGS or not _boxable_page(k_cache.shape[1]) or 0 in q.shape:
        return False
    if alibi_slopes is not None and alibi_slopes.device != q.device:
        return False
    return _cache_call_ok(q, k_cache, v_cache, alibi_slopes, softmax_scale, softcap) and _tma_describable(q)


def paged_tile_list(cu_seqlens_q, total_q: int, max_seqlen_q: int, short_rows: int, tile_m: int,
                    record=None) -> tuple[torch.Tensor, int]:
    """The query tiles of the sequences of more than ``short_rows`` rows, built on the device
    (``decode.paged_tile_list_kernel``: int32, the count first), and a bound on their count from shapes.
    ``record`` (a ``fastlaunch.Recording``): the launch is added to it, its builder taking a plan's tensors
    (``cu_seqlens_q``, ``tile_list``), and the list's length is kept as its buffer ``tile_list``."""
    batch = cu_seqlens_q.shape[0] - 1
    num_m = cdiv(max_seqlen_q, tile_m)
    longer = batch if short_rows <= 0 else min(batch, total_q // (short_rows + 1))
    # A sequence of n rows holds cdiv(n, tile_m) <= n / tile_m + 1 tiles.
    bound = min(longer * num_m, total_q // tile_m + longer)
    if bound == 0:  # no sequence can hold a tile: the count alone, no launch
        return torch.zeros(1, dtype=torch.int32, device=cu_seqlens_q.device), bound
    tile_list = torch.empty(1 + bound, dtype=torch.int32, device=cu_seqlens_q.device)
    block_b = max(16, next_power_of_2(batch))
    flags = dict(TILE_M=tile_m, BLOCK_B=block_b, num_warps=4 if block_b <= 4096 else 16)

    def build(e):
        return e.cu_seqlens_q, e.tile_list, batch, short_rows, num_m, bound

    args = (cu_seqlens_q, tile_list, batch, short_rows, num_m, bound)
    _launch_tile_list((1,), *args, **flags)
    if record is not None:
        record.add(_launch_tile_list, (1,), flags, build, args)
        record.buffers["tile_list"] = 1 + bound
    return tile_list, bound


def gluon_paged_prefill(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes,
                        max_seqlen_q: int, softmax_scale: float, window_left: int, window_right: int, softcap: float,
                        config: FwdConfig | None = None, short_rows: int = 0, out=None, lse=None,
                        persistent: bool | None = None, record=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries q (total_q, nheads, d) over a paged cache (num_blocks, page, nheads_k, d):
    sequence b's queries are rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]), its keys the first ``seqlens_k[b]``
    positions of its pages ``block_table[b]`` (cut at the row's capacity), aligned bottom-right. Tiles of
    2 x block_m query rows of one head, no key split, from a list built on the device (``paged_tile_list``).
    ``short_rows`` > 0: sequences of at most that many rows are left out (another kernel's, their rows of out
    and lse unwritten); ``out`` / ``lse`` given are written in place. ``persistent`` (default: with
    ``short_rows``): one program an SM walks the tiles, else a program a tile (the grid sized on a bound, the
    programs past the list's tiles exit). Returns (out like q, lse float32 (nheads, total_q)). Call only where
    ``gluon_paged_prefill_supported`` is True."""
    total_q, nheads, d = q.shape
    page, nheads_k = k_cache.shape[1], k_cache.shape[2]
    cfg = config or PAGED_CONFIGS[d]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
    tile_list, bound = paged_tile_list(cu_seqlens_q, total_q, max_seqlen_q, short_rows, 2 * cfg.block_m, record)
    num_tiles = bound * nheads
    if num_tiles == 0:
        return out, lse
    if persistent is None:
        persistent = short_rows > 0
    box = min(page, cfg.block_n)
    score_scale, tanh_scale = gluon_scales(softmax_scale, softcap)
    stride_ab = 0
    if alibi_slopes is not None:  # (nheads,) or (batch, nheads) float32, made contiguous below
        stride_ab = nheads if alibi_slopes.dim() == 2 else 0
    capacity = page * block_table.shape[1]
    qd, kd, vd = _rows_descriptor(q, cfg.block_m)[1:], _descriptor(k_cache, box)[1:], _descriptor(v_cache, box)[1:]
    statics = (0, nheads * d, d, 0, total_q, stride_ab, q.stride(1), k_cache.stride(2), v_cache.stride(2),
               nheads, nheads // nheads_k, max_seqlen_q, capacity, score_scale, tanh_scale, window_left,
               window_right, 0, 0.0, num_tiles)
    bt_stride = block_table.stride(0)

    def build(e):
        slopes = e.lse if e.alibi_slopes is None else e.alibi_slopes.contiguous()
        return (TmaDesc(e.q, *qd), TmaDesc(e.k_cache, *kd), TmaDesc(e.v_cache, *vd), e.out, e.lse, e.cu_seqlens_q,
                e.seqlens_k, slopes, *statics, e.block_table, bt_stride, e.tile_list)

    args = build(PagedTensors(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes, out, lse,
                              None, None, tile_list))
    flags = dict(HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.stages, IS_VARLEN=True,
                 SOFTCAP=_softcap_mode(softcap, q.dtype, alibi_slopes is not None, 0.0, cfg),
                 HAS_ALIBI=0 if alibi_slopes is None else 2 if cfg.alibi_sides else 1,
                 HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, DROPOUT=False,
                 PINGPONG=cfg.schedule == "pingpong", OVERLAP=cfg.overlap, CHAIN=False, PAGE_SIZE=page,
                 num_warps=cfg.warps)
    grid = (min(num_tiles, _num_sms(q.device)) if persistent else num_tiles,)
    _launch_ws(grid, *args, **flags)
    if record is not None:
        record.add(_launch_ws, grid, flags, build, args)
    return out, lse
