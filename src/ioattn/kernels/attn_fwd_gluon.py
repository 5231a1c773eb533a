"""FlashAttention forward for Hopper (sm_90) in Gluon: TMA loads into a shared-memory ring, async wgmma.

FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608) structure without warp specialisation: one program
per (query block, batch x head) holds its Q tile in shared memory; K and V blocks stream through a
``NUM_STAGES`` ring filled by the bulk tensor copy engine, each stage with its own mbarrier for K and for
V, so S = Q K^T starts as soon as K lands while V is still in flight. A K stage is refilled right after
its QK^T completes, a V stage after its PV completes. S and O accumulate in registers through async
wgmma; P goes to the PV wgmma from registers (FA3 Sec. 3.1). The online softmax keeps the running max in
score units (raw q.k, or tanh(q.k / softcap) with softcap) and folds the factor to log2 logits into one
FMA before ``exp2``.

Every feature of the portable forward, each a compile-time flag: varlen batches (cu_seqlens), causal and
sliding windows aligned bottom-right (key blocks outside the band skipped, only blocks crossing its edges
masked: the portable kernel's ``kv_block_range``), softcap (``tanh.approx``), ALiBi, GQA, dropout (the keep
mask of ``ioattn.dropout`` drawn in the accumulator's own layout: ``dropout_keep_wgmma``). Dense inputs
(batch, seqlen, nheads, d) and varlen inputs (total, nheads, d) with unit d-stride are described as 2D
(rows, columns) views: head h starts at column ``h * stride_h``. Rows past a sequence read the next
sequence's rows (or TMA's zero fill at the end); those keys are masked to -inf and those query rows are
never stored (masked register stores). Over a paged cache (the warp-specialised kernel's PAGE_SIZE) the load
warp copies K and V box by box through the block table, and the last block's V rows past the sequence are
zeroed before its PV: unused cache slots may hold anything, NaN included, and 0 * NaN is not 0.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..backend import interpreting
from ..dropout import kernel_seed
from .common import (
    bh_grid,
    bias_and_mask,
    dropout_words_kept,
    grid_row,
    kv_block_range,
    launch_order,
    order_section,
    philox,
    philox_rows,
    seed_value,
    seq_bounds,
    tanh,
)
from .fastlaunch import Launcher, PlanTable, TmaDesc, aligned, cdiv, raw_stream, runtime_key

LOG2E = 1.4426950408889634


@gluon.jit
def _issue_kv_load(desc, smem, bars, stage, row, col, pred):
    mbarrier.expect(bars.index(stage), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col], bars.index(stage), smem.index(stage), pred=pred)


@gluon.jit
def box_pages(bt_row, key, last_page, BOX: gl.constexpr, NB: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """Table entries of the NB boxes of BOX keys from ``key`` (pages past the sequence's last one read that
    one again), one load held whole by every thread (its entries picked out in registers, no shuffles)."""
    i = gl.arange(0, NB, gl.BlockedLayout([NB], [32], [1], [0]))
    return gl.load(bt_row + gl.minimum((key + i * BOX) // PAGE_SIZE, last_page))


@gluon.jit
def load_kv_boxes(desc, ring, ready, stage, key, pages, row0, col, BLOCK_N: gl.constexpr, PAGED: gl.constexpr,
                  PAGE_SIZE: gl.constexpr):
    """Copies of one tensor's tile at ``key`` into ring stage ``stage``: boxes of BOX rows by 64 columns
    (a 128-byte swizzle span) into the stage's column blocks, all counted on ``ready``; paged, box i's page is
    entry i of ``pages`` (``box_pages``)."""
    BOX: gl.constexpr = desc.block_type.shape[0]
    CB: gl.constexpr = ring.type.shape[0] // (ready.type.shape[0])  # column blocks per stage
    NB: gl.constexpr = BLOCK_N // BOX
    mbarrier.expect(ready.index(stage), NB * CB * desc.block_type.nbytes)
    for i in gl.static_range(NB):
        if PAGED:
            page = gl.sum(gl.where(gl.arange(0, NB, pages.type.layout) == i, pages, 0), axis=0)
            row = page * PAGE_SIZE + (key + i * BOX) % PAGE_SIZE
        else:
            row = row0 + key
        for c in gl.static_range(CB):
            tma.async_copy_global_to_shared(desc, [row, col + 64 * c], ready.index(stage),
                                            ring.index(stage * CB + c).slice(i * BOX, BOX))


@gluon.jit
def stream_kv_boxes(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, bt_row, row0, col_k, col_v,
                    start, n_tiles, seqlen_k, it, BLOCK_N: gl.constexpr, PAGED: gl.constexpr,
                    PAGE_SIZE: gl.constexpr, PREFETCH: gl.constexpr):
    """A load warp's K and V tiles at keys start, start + BLOCK_N, ... (n_tiles) into ring positions it,
    it + 1, ... (paged: box by box, each box's page from the table row ``bt_row``; contiguous: rows row0 +
    key), each stage once its consumers have released it. Returns the ring position after them. A tile's
    table entries are loaded before its copies wait for their stages, or with PREFETCH during the tile
    before (twice the registers: the decode kernel's load warp, whose stages free fast, has them; the
    forward's, at 24 registers, does not)."""
    NUM_STAGES: gl.constexpr = k_ready.type.shape[0]
    BOX: gl.constexpr = k_desc.block_type.shape[0]
    NB: gl.constexpr = BLOCK_N // BOX
    last_page = gl.maximum(seqlen_k - 1, 0) // PAGE_SIZE
    pages = gl.zeros([NB], gl.int32, gl.BlockedLayout([NB], [32], [1], [0]))
    if PAGED and PREFETCH:
        if n_tiles > 0:  # a table row may hold no entry at all
            pages = box_pages(bt_row, start, last_page, BOX, NB, PAGE_SIZE)
    for j in range(n_tiles):
        c = it + j
        stage = c % NUM_STAGES
        free_phase = ((c // NUM_STAGES) & 1) ^ 1  # a fresh mbarrier passes the phase before phase 0
        key = start + j * BLOCK_N
        if PAGED and PREFETCH:
            # The next tile's, issued before this tile's waits and copies (issued after them, paged decode
            # read 0.8-1.3% slower at 16k / 64k keys on an H100).
            pages_next = box_pages(bt_row, key + BLOCK_N, last_page, BOX, NB, PAGE_SIZE)
        elif PAGED:
            pages = box_pages(bt_row, key, last_page, BOX, NB, PAGE_SIZE)  # in flight during the stage waits
        mbarrier.wait(k_empty.index(stage), free_phase)
        load_kv_boxes(k_desc, k_ring, k_ready, stage, key, pages, row0, col_k, BLOCK_N, PAGED, PAGE_SIZE)
        mbarrier.wait(v_empty.index(stage), free_phase)
        load_kv_boxes(v_desc, v_ring, v_ready, stage, key, pages, row0, col_v, BLOCK_N, PAGED, PAGE_SIZE)
        if PAGED and PREFETCH:
            pages = pages_next
    return it + n_tiles


@gluon.jit
def dropout_keep_wgmma(seed, philox_rows, cols, dropout_p):
    """``ioattn.dropout``'s keep mask on a (rows, cols) tile in the layout of a wgmma accumulator, without
    moving data between threads: ``philox_rows`` (int64, the rows' Philox counters ``base + i * stride``)
    and ``cols`` (a multiple of 32 keys from a multiple of 32) are slices of that layout. A thread holds,
    for each of its rows, keys 8 c + 2 q + e of every 32-key group for one q (its lane % 4): the eight keys
    one Philox call serves. The counters are split out of the full tile (registers only), drawn, and the
    halves joined back in key order; the final conversion is the identity. ``seed``: ``seed_value``'s."""
    BM: gl.constexpr = philox_rows.shape[0]
    BN: gl.constexpr = cols.shape[0]
    calls = philox_rows[:, None] + (4 * (cols // 32) + (cols % 8) // 2)[None, :]
    calls = gl.permute(gl.reshape(calls, [BM, BN // 32, 2, 2, 4, 2]), [0, 1, 4, 2, 3, 5])  # (i, g, q, c1, c0, e)
    calls, _ = gl.split(calls)
    calls, _ = gl.split(calls)
    calls, _ = gl.split(calls)  # (i, g, q): one counter per call
    keep = dropout_words_kept(*philox(seed, calls), dropout_p)  # (i, g, q, e, c0, c1)
    keep = gl.reshape(gl.permute(keep, [0, 1, 5, 4, 2, 3]), [BM, BN])  # (i, g, q, e, c0, c1) -> key order
    return gl.convert_layout(keep, philox_rows.type.layout.parent)


@gluon.jit
def _softmax_block(s, m_i, l_i, start_n, full_lo, full_hi, rows, offs_n, seqlen_k, diag, score_scale,
                   tanh_scale, alibi_slope, window_left, window_right, seed, philox_rows, dropout_p, pos_lo, pos_hi,
                   SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr,
                   HAS_RIGHT: gl.constexpr, FAST_TANH: gl.constexpr, DROPOUT: gl.constexpr):
    """Score mods and the online softmax step (FA2 Alg. 1 lines 9-10) for the key block at start_n.

    Scores stay in "units" u whose log2-logit is ``u * score_scale``: raw q.k without softcap, tanh(q.k *
    tanh_scale) with it; the running max is kept in u so one FMA per element feeds ``exp2``. ALiBi's slope
    comes in u units too. Only blocks outside [full_lo, full_hi) are masked (bounds, window, causal); a row
    with no key yet keeps m = -inf and p = 0. SOFTCAP 2: the max is held at tanh's bound 1 instead, alpha is
    meaningless (the caller does not rescale) and l is returned as given (the caller sums P's rows on the
    tensor cores).
    With DROPOUT the returned p (for PV) is dropped, l sums the undropped p (the lse is that of the scores
    before dropout). Returns (p, alpha, m, l)."""
    cols = start_n + offs_n
    FIXED_MAX: gl.constexpr = SOFTCAP == 2
    ALIBI_SIDES: gl.constexpr = HAS_ALIBI == 2
    if SOFTCAP:
        s = tanh(s * tanh_scale, FAST_TANH)
    edge = (start_n < full_lo) | (start_n >= full_hi)
    if ALIBI_SIDES:
        # A block wholly left of every row's position (keys <= pos_lo) or right of it (keys >= pos_hi) takes
        # -slope |p - j| = sigma slope (j - start_n) - sigma slope (p - start_n), sigma = +1 left, -1 right:
        # one FMA per element and a row term (``shift``, joined per row in the max and exp2's offset); blocks
        # across the diagonal take the exact form with the masked blocks.
        BLOCK_N: gl.constexpr = offs_n.shape[0]
        left = start_n + BLOCK_N - 1 <= pos_lo
        edge = edge | ((start_n + BLOCK_N - 1 > pos_lo) & (start_n < pos_hi))
        pos = (rows + diag).to(gl.float32)
        if edge:
            s = bias_and_mask(s, rows, cols, seqlen_k, diag, alibi_slope, window_left, window_right, True, True,
                              HAS_LEFT, HAS_RIGHT)
            shift = pos * 0.0
        else:
            sigma_slope = gl.where(left, alibi_slope, -alibi_slope)
            s = gl.fma(gl.broadcast(sigma_slope, s)[0], gl.broadcast(offs_n.to(gl.float32)[None, :], s)[0], s)
            shift = sigma_slope * (start_n - pos)
    else:
        s = bias_and_mask(s, rows, cols, seqlen_k, diag, alibi_slope, window_left, window_right, HAS_ALIBI, False,
                          HAS_LEFT, HAS_RIGHT)
        if edge:
            s = bias_and_mask(s, rows, cols, seqlen_k, diag, alibi_slope, window_left, window_right, False, True,
                              HAS_LEFT, HAS_RIGHT)
    if FIXED_MAX:
        # The max held at tanh's bound 1 (m_i = 1 throughout): p = 2^((u - 1) * score_scale) lies in
        # [2^-(2 * score_scale), 1], normal in bf16 and fp32 for the softcaps the host sends here, so no
        # row max and no rescaling of l and of the output.
        m_new = m_i
        alpha = m_i
        l_new = l_i
        p = gl.exp2(s * score_scale - score_scale)
    else:
        row_max = gl.max(s, axis=1)
        if ALIBI_SIDES:
            row_max = row_max + shift
        m_new = gl.maximum(m_i, row_max)
        m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new * score_scale)
        offset = m_scaled
        if ALIBI_SIDES:
            offset = m_scaled - shift * score_scale  # the row term joins exp2's per-row offset
        p = gl.exp2(s * score_scale - offset[:, None])
        alpha = gl.exp2(m_i * score_scale - m_scaled)
        l_new = l_i * alpha + gl.sum(p, axis=1)
    if DROPOUT:
        p = gl.where(dropout_keep_wgmma(seed, philox_rows, cols, dropout_p), p, 0.0)
    return p, alpha, m_new, l_new


@gluon.jit
def normalized_rows(acc, m_i, l_i, score_scale):
    """FA2 Alg. 1 line 12: (acc / l, the rows' lse in natural log) from the online softmax's m (score units)
    and l, both in acc's row layout. A row with no allowed key has l = 0: output 0, lse -inf."""
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i * score_scale + gl.log2(l_safe)) * 0.6931471805599453)
    return acc / l_safe[:, None], lse


@gluon.jit
def _store_tile(acc, m_i, l_i, start_m, seqlen_q, score_scale, o_base, stride_os, lse_base,
                num_warps: gl.constexpr):
    """FA2 Alg. 1 line 12: normalise once and store the rows of the query tile at start_m that lie below
    seqlen_q; m_i and l_i in the accumulator's row layout. A row with no allowed key has l = 0: output 0,
    lse -inf."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    HEAD_DIM: gl.constexpr = acc.shape[1]
    rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, acc.type.layout))
    out, lse = normalized_rows(acc, m_i, l_i, score_scale)
    # Coalesced 16-byte stores: each thread writes 8 consecutive elements of a row. Rows past the
    # sequence (the next sequence's rows, for varlen) are never written.
    TPW_D: gl.constexpr = HEAD_DIM // 8
    st_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPW_D, TPW_D],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
    out = gl.convert_layout(out.to(o_base.dtype.element_ty), st_layout)
    st_rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, st_layout))
    st_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, st_layout))
    o_ptrs = o_base + st_rows.to(gl.int64)[:, None] * stride_os + st_d[None, :]
    gl.store(o_ptrs, out, mask=st_rows[:, None] < seqlen_q)
    gl.store(lse_base + rows, lse, mask=rows < seqlen_q)


@gluon.jit
def _half_block(q_smem, k_smem, v_smem, k_bars, v_bars, acc, m_i, l_i, j, lo, full_lo, full_hi, mods,
                SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                FAST_TANH: gl.constexpr, DROPOUT: gl.constexpr):
    """The one-warpgroup kernel's key block j (ring position j, the last one) when only its first half holds
    allowed keys: QK^T, softmax and PV over the first BLOCK_N / 2 keys of the whole block the ring holds
    (online max; no refills: it is the last block). Returns (acc, m, l) in their layouts, the PV done."""
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    HALF_N: gl.constexpr = k_smem.type.shape[1] // 2
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    num_warps: gl.constexpr = gl.num_warps()
    h_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HALF_N, 16])
    row_h: gl.constexpr = gl.SliceLayout(1, h_layout)
    row_s: gl.constexpr = m_i.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    stage = j % NUM_STAGES
    phase = (j // NUM_STAGES) & 1
    rows, offs_n, seqlen_k, diag, score_scale, tanh_scale, alibi_slope, window_left, window_right, seed, \
        philox_rows, dropout_p, pos_lo, pos_hi = mods
    mods_h = (gl.convert_layout(rows, row_h), gl.arange(0, HALF_N, gl.SliceLayout(0, h_layout)), seqlen_k, diag,
              score_scale, tanh_scale, alibi_slope, window_left, window_right, seed,
              gl.convert_layout(philox_rows, row_h), dropout_p, pos_lo, pos_hi)
    mbarrier.wait(k_bars.index(stage), phase)
    s_tok = warpgroup_mma(q_smem, k_smem.index(stage).slice(0, HALF_N).permute((1, 0)),
                          gl.zeros([BLOCK_M, HALF_N], gl.float32, h_layout), use_acc=False, is_async=True)
    s, acc = warpgroup_mma_wait(0, deps=(s_tok, acc))
    p, alpha, m_h, l_h = _softmax_block(s, gl.convert_layout(m_i, row_h), gl.convert_layout(l_i, row_h),
                                        lo + j * (2 * HALF_N), full_lo, full_hi, *mods_h, SOFTCAP, HAS_ALIBI,
                                        HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    mbarrier.wait(v_bars.index(stage), phase)
    acc = warpgroup_mma(p_op, v_smem.index(stage).slice(0, HALF_N), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    return acc, gl.convert_layout(m_h, row_s), gl.convert_layout(l_h, row_s)


@gluon.jit
def scale_tile(tile, scale):
    """Multiplies a (rows, d) 16-bit tile in shared memory by ``scale`` (in fp32, rounded back), 16 rows at a
    time (few registers held), then fences and synchronises the warps before a product reads it. The
    one-warpgroup forward folds softcap's tanh scale into its Q tile with it; in the warp-specialised d = 128
    consumers the same fold measured 2-5% slower (notebook: it sits at the chained tiles' handoff, and the
    held-max build spills more)."""
    ROWS: gl.constexpr = tile.type.shape[0]
    D: gl.constexpr = tile.type.shape[1]
    TPW_D: gl.constexpr = D // 8
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [gl.num_warps(), 1], [1, 0])
    # A slice no shorter than the rows the layout covers: a shorter one would be held by several warps at
    # once, each scaling the same elements (8 warps at d = 64 cover 32 rows).
    CH: gl.constexpr = max(16, (32 // TPW_D) * gl.num_warps())
    gl.static_assert(ROWS % CH == 0, "the tile's rows in whole slices")
    for c in gl.static_range(ROWS // CH):
        part = tile.slice(c * CH, CH)
        part.store((part.load(layout).to(gl.float32) * scale).to(tile.dtype))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def attn_fwd_gluon_kernel(
    q_desc, k_desc, v_desc, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, stride_qh, stride_kh, stride_vh,
    nheads, group, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, window_left, window_right, seed, dropout_p,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr,
    HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr,
    BH_AXES: gl.constexpr = False,
):
    dtype: gl.constexpr = q_desc.dtype
    FAST_TANH: gl.constexpr = SOFTCAP  # inputs are 16-bit here
    # wgmma accumulators: every warp owns 16 rows (two warpgroups of 64 rows at 8 warps).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid_m = gl.program_id(0)
    if HAS_RIGHT:
        pid_m = gl.num_programs(0) - 1 - pid_m  # causal-like: the last query blocks see the most keys
    bh, b, h = grid_row(nheads, BH_AXES)
    hk = h // group
    start_m = pid_m * BLOCK_M
    if IS_VARLEN:
        q_start, seqlen_q, k_start, seqlen_k = seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q,
                                                          max_seqlen_k, True)
        q_row = q_start + start_m
        kv_row = k_start
    else:
        q_start = b * 0
        seqlen_q = max_seqlen_q
        seqlen_k = max_seqlen_k
        q_row = b * seqlen_q + start_m
        kv_row = b * seqlen_k
    if start_m >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q  # bottom-right alignment: row i sits at key position i + diag
    # HALF_LAST (the non-overlapped loop): a last block whose allowed keys all sit in its first half (the
    # diagonal block of every other 64-row tile under a causal mask with 128-key blocks, a band's end, a ragged
    # sequence end) takes half-width products (``_half_block``); its loads stay whole. Not with dropout (its
    # mask's second instance takes the build from 168 to 226 registers: two programs an SM instead of three),
    # ALiBi (154 -> 168, the most three programs an SM allow; -1.3% at 2k with no half block to take) or the
    # held max. Two stages at least: with one, the last block's V is loaded by the iteration the half block
    # replaces. With it, a left window's blocks start at a multiple of BLOCK_N / 2, not of BLOCK_N (TMA loads
    # any row): a tile whose first allowed key lies in the second half of a block starts there, and the band's
    # last block, shorter by that half, is a half block more often.
    HALF_LAST: gl.constexpr = (not (SOFTCAP == 2 or DROPOUT or HAS_ALIBI or OVERLAP) and BLOCK_N >= 64
                               and NUM_STAGES >= 2)
    lo, full_lo, full_hi, hi = kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                               BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                               BLOCK_N // 2 if HALF_LAST else 0)
    n_blocks = gl.cdiv(hi - lo, BLOCK_N)
    kv_row = kv_row + lo
    k_col = hk * stride_kh
    v_col = hk * stride_vh
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = gl.load(alibi_slopes + b * stride_ab + h) * (1.4426950408889634 / score_scale)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, h * stride_qh], q_bar, q_smem)
    for i in gl.static_range(NUM_STAGES):
        _issue_kv_load(k_desc, k_smem, k_bars, i, kv_row + i * BLOCK_N, k_col, i < n_blocks)
        _issue_kv_load(v_desc, v_smem, v_bars, i, kv_row + i * BLOCK_N, v_col, i < n_blocks)

    # SOFTCAP 2: the max held at tanh's bound (m = 1 throughout), no rescale of l and O; the rows of P, as
    # rounded for PV, summed on the tensor cores (P times a block of ones into acc_l, as the warp-specialised
    # kernels do), so a row with one key gives that key's value exactly
    FIXED_MAX: gl.constexpr = SOFTCAP == 2
    m_i = gl.full([BLOCK_M], 1.0 if FIXED_MAX else float("-inf"), gl.float32, row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if FIXED_MAX:
        acc_l = gl.zeros([BLOCK_M, 8], gl.float32, consumer_acc_layout(8, num_warps))
        ones_smem = _ones_tile(dtype, BLOCK_N)
        fence_async_shared()
        gl.thread_barrier()
    rows = start_m + gl.arange(0, BLOCK_M, row_s)
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    # Softcap: tanh's input scale goes into the Q tile once (``scale_tile``), not into every score (the
    # softmax multiplies by 1.0, which folds away).
    mods = (rows, offs_n, seqlen_k, diag, score_scale, 1.0 if SOFTCAP else tanh_scale, alibi_slope, window_left,
            window_right, seed_value(seed, DROPOUT), philox_rows(bh, rows, max_seqlen_q, max_seqlen_k), dropout_p, 0, 0)

    mbarrier.wait(q_bar, 0)
    if SOFTCAP:
        scale_tile(q_smem, tanh_scale)
    if OVERLAP:
        # FA3 intra-warpgroup pipelining (Sec. 3.2): QK^T of block j+1 runs on the tensor cores while the
        # softmax of block j runs; PV of block j stays in flight across the next QK^T issue.
        if n_blocks > 0:
            mbarrier.wait(k_bars.index(0), 0)
            s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
            _issue_kv_load(k_desc, k_smem, k_bars, 0, kv_row + NUM_STAGES * BLOCK_N, k_col,
                           NUM_STAGES < n_blocks)
            for j in range(n_blocks - 1):
                stage = j % NUM_STAGES
                nstage = (j + 1) % NUM_STAGES
                mbarrier.wait(k_bars.index(nstage), ((j + 1) // NUM_STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, k_smem.index(nstage).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, lo + j * BLOCK_N, full_lo, full_hi, *mods,
                                                SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                if FIXED_MAX:
                    # PV and the row sums of block j-1 done; QK^T j+1 may still run
                    acc, acc_l = warpgroup_mma_wait(1, deps=(acc, acc_l))
                else:
                    acc = warpgroup_mma_wait(1, deps=(acc,))  # PV of block j-1 done; QK^T j+1 may still run
                    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                mbarrier.wait(v_bars.index(stage), (j // NUM_STAGES) & 1)
                acc_tok = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
                if FIXED_MAX:
                    acc_l = _row_sum_mma(p_op, ones_smem, acc_l)
                    # QK^T j+1 done; PV and the row sums of block j in flight
                    s, acc, acc_l = warpgroup_mma_wait(2, deps=(s_tok, acc_tok, acc_l))
                else:
                    s, acc = warpgroup_mma_wait(1, deps=(s_tok, acc_tok))  # QK^T j+1 done; PV j in flight
                # K of block j+1 and V of block j-1 are consumed: refill their stages.
                k_next = j + 1 + NUM_STAGES
                _issue_kv_load(k_desc, k_smem, k_bars, nstage, kv_row + k_next * BLOCK_N, k_col,
                               k_next < n_blocks)
                _issue_kv_load(v_desc, v_smem, v_bars, (j + NUM_STAGES - 1) % NUM_STAGES,
                               kv_row + (k_next - 2) * BLOCK_N, v_col, (j > 0) & (k_next - 2 < n_blocks))
            last = n_blocks - 1
            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, lo + last * BLOCK_N, full_lo, full_hi, *mods,
                                                SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            if FIXED_MAX:
                acc, acc_l = warpgroup_mma_wait(0, deps=(acc, acc_l))
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            mbarrier.wait(v_bars.index(last % NUM_STAGES), (last // NUM_STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last % NUM_STAGES), acc, is_async=True)
            if FIXED_MAX:
                acc_l = _row_sum_mma(p_op, ones_smem, acc_l)
                acc, acc_l = warpgroup_mma_wait(0, deps=(acc, acc_l))
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
    else:
        last_half = HALF_LAST and n_blocks > 0 and hi - (lo + (n_blocks - 1) * BLOCK_N) <= BLOCK_N // 2
        for j in range(n_blocks - last_half.to(gl.int32)):
            stage = j % NUM_STAGES
            phase = (j // NUM_STAGES) & 1
            mbarrier.wait(k_bars.index(stage), phase)
            s_tok = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            # Waits for this QK^T and for the previous block's PV (older in the wgmma queue).
            if FIXED_MAX:
                s, acc, acc_l = warpgroup_mma_wait(0, deps=(s_tok, acc, acc_l))
            else:
                s, acc = warpgroup_mma_wait(0, deps=(s_tok, acc))
            # K stage `stage` and the previous block's V stage are free again: refill them.
            nxt = j + NUM_STAGES
            _issue_kv_load(k_desc, k_smem, k_bars, stage, kv_row + nxt * BLOCK_N, k_col, nxt < n_blocks)
            prev_stage = (j + NUM_STAGES - 1) % NUM_STAGES
            _issue_kv_load(v_desc, v_smem, v_bars, prev_stage, kv_row + (nxt - 1) * BLOCK_N, v_col,
                           (j > 0) & (nxt - 1 < n_blocks))

            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, lo + j * BLOCK_N, full_lo, full_hi, *mods,
                                                SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
            if not FIXED_MAX:
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)

            mbarrier.wait(v_bars.index(stage), phase)
            acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
            if FIXED_MAX:
                acc_l = _row_sum_mma(p_op, ones_smem, acc_l)
                acc, acc_l = warpgroup_mma_wait(2, deps=(acc, acc_l))
            else:
                acc = warpgroup_mma_wait(1, deps=(acc,))
        if HALF_LAST:
            if last_half:
                acc, m_i, l_i = _half_block(q_smem, k_smem, v_smem, k_bars, v_bars, acc, m_i, l_i, n_blocks - 1,
                                            lo, full_lo, full_hi, mods, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                                            FAST_TANH, DROPOUT)
        if FIXED_MAX:
            acc, acc_l = warpgroup_mma_wait(0, deps=(acc, acc_l))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    if FIXED_MAX:
        l_i = gl.convert_layout(gl.sum(acc_l, axis=1) * 0.125, row_s)  # eight equal columns
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    o_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + q_start.to(gl.int64) * stride_os
    lse_base = Lse + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_start
    _store_tile(acc, gl.convert_layout(m_i, row_o), gl.convert_layout(l_i, row_o), start_m, seqlen_q, score_scale,
                o_base, stride_os, lse_base, num_warps)


@gluon.jit
def _ws_tile(t, num_m, num_bh, section, nheads, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
             window_right, TILE_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_VARLEN: gl.constexpr,
             HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DYNAMIC: gl.constexpr, PAIRED: gl.constexpr = False,
             PAGED: gl.constexpr = False, tile_list=0, count=1):
    """Tile t of the (query block of TILE_M rows, batch x head) grid. Static order: query blocks run fastest,
    so the tiles in flight at once share a head's K/V in L2; with a right window the last query blocks (the
    most keys) come first. DYNAMIC order: sections of ``section`` heads (chosen so that their K/V fit in L2),
    within a section query block by query block, longest first with a right window, heads fastest. PAIRED
    order (``_static_tiles``, ``_static_next``): t = 2 u + second, unit u of a head pairs query block
    num_m - 1 - j (second 0) with block j (second 1), j = u mod cdiv(num_m, 2), so under a causal mask every
    unit holds the same number of key blocks (num_m + 1 tiles' worth, plus the offset of seqlen_k past
    seqlen_q), but for the middle block of an odd num_m, alone in its unit; units run j fastest, so the tiles
    in flight share heads' K/V in L2. Returns
    (b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks): q_row0 /
    kv_row0 are the sequence's first rows in the 2D views. PAGED (varlen queries over a paged cache):
    ``cu_seqlens_k`` holds the key lengths, cut at ``max_seqlen_k`` (the block table's capacity), and kv_row0
    is 0 (the load warp finds the rows through the table), and the tiles are those of ``tile_list``
    (``paged_tile_list``: ``count`` entries b x num_m + query block after the count itself), head by head, so
    tile t is entry t mod count of head t // count."""
    if PAGED:
        code = gl.load(tile_list + 1 + t % count)
        pid_m = code % num_m
        bh = (code // num_m) * nheads + t // count
    elif DYNAMIC:
        pid_m, bh = launch_order(t % num_m, t // num_m, num_m, num_bh, section, HAS_RIGHT)
    elif PAIRED:
        half = _pairs(num_m)
        u = t // 2
        bh = u // half
        j = u % half
        second = t % 2
        pid_m = second * j + (1 - second) * (num_m - 1 - j)
    else:
        pid_m = t % num_m
        bh = t // num_m
        if HAS_RIGHT:
            pid_m = num_m - 1 - pid_m
    b = bh // nheads
    h = bh % nheads
    start_m = pid_m * TILE_M
    if PAGED:
        q_start = gl.load(cu_seqlens_q + b)
        seqlen_q = gl.load(cu_seqlens_q + b + 1) - q_start
        seqlen_k = gl.minimum(gl.load(cu_seqlens_k + b), max_seqlen_k)
        kv_row0 = b * 0
        q_row0 = q_start
    elif IS_VARLEN:
        q_start, seqlen_q, kv_row0, seqlen_k = seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q,
                                                          max_seqlen_k, True)
        q_row0 = q_start
    else:
        q_start = b * 0
        seqlen_q = max_seqlen_q
        seqlen_k = max_seqlen_k
        q_row0 = b * seqlen_q
        kv_row0 = b * seqlen_k
    lo, full_lo, full_hi, hi = kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                               TILE_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    n_blocks = gl.cdiv(hi - lo, BLOCK_N)
    return b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks


@gluon.jit
def _q_slot(qi, Q_STAGES: gl.constexpr):
    """(Q slot, mbarrier phase) of the program's tile number qi: Q_STAGES slots in turn."""
    if Q_STAGES == 1:
        return 0, qi & 1
    else:
        return qi % Q_STAGES, (qi // Q_STAGES) & 1


@gluon.jit
def _pairs(num_m):
    """Units of the PAIRED order a head holds (``_ws_tile``): its query blocks two by two, the middle one of an
    odd count alone."""
    return (num_m + 1) // 2


@gluon.jit
def _static_tiles(num_m, num_tiles, PAIRED: gl.constexpr):
    """(first tile, end) of the program's walk on the persistent static schedule: tiles t, t + programs, ...
    below num_tiles, or with PAIRED the units u, u + programs, ... (``_ws_tile``), t = 2 u + second below
    2 x units."""
    if PAIRED:
        return 2 * gl.program_id(0), 2 * (num_tiles // num_m) * _pairs(num_m)
    else:
        return gl.program_id(0), num_tiles


@gluon.jit
def _static_next(t, num_m, PAIRED: gl.constexpr):
    """The program's tile after t on the persistent static schedule (``_static_tiles``): with PAIRED a unit's
    short block after its long one, unless they are the same (the middle block of an odd num_m)."""
    if PAIRED:
        u = t // 2
        more = ((t % 2 == 0) & (2 * (u % _pairs(num_m)) + 1 < num_m)).to(gl.int32)
        return more * (t + 1) + (1 - more) * (2 * (u + gl.num_programs(0)))
    else:
        return t + gl.num_programs(0)


@gluon.jit
def _write_tile_id(tile_smem, slot, t):
    """The load warp hands a tile index to the consumers through shared memory (two slots: a slot is
    rewritten two tiles later, after both consumers have been through the epilogue of the tile between)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    tile_smem.index(slot).store(gl.full([1], t, gl.int32, layout))


@gluon.jit
def _read_tile_id(tile_smem, slot, NUM_WARPS: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    return gl.max(tile_smem.index(slot).load(layout), axis=0)


@gluon.jit
def _ws_load_q(q_desc, q_smem, tile_smem, q_full, q_empty, t, h, stride_qh, q_row, qi, DYNAMIC: gl.constexpr):
    """Both consumers' Q tiles of a tile into Q slot qi mod Q_STAGES (with DYNAMIC, the tile index first), once
    the tile Q_STAGES before has released the slot."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    Q_STAGES: gl.constexpr = q_full.type.shape[0]
    slot, q_phase = _q_slot(qi, Q_STAGES)
    # A fresh mbarrier counts as having completed the phase before phase 0: the first pass is free.
    mbarrier.wait(q_empty.index(slot), q_phase ^ 1)
    if DYNAMIC:
        _write_tile_id(tile_smem, qi & 1, t)
    mbarrier.expect(q_full.index(slot), 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, h * stride_qh], q_full.index(slot), q_smem.index(2 * slot))
    tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK_M, h * stride_qh], q_full.index(slot),
                                    q_smem.index(2 * slot + 1))


@gluon.jit
def _ws_load_tile(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, tile_smem, q_full, q_empty, k_ready, v_ready,
                  k_empty, v_empty, t, h, group, stride_qh, stride_kh, stride_vh, q_row, kv_row, n_blocks, it, qi,
                  DYNAMIC: gl.constexpr):
    """Loads of one tile: both consumers' Q tiles (``_ws_load_q``), then its key blocks through the ring.
    Returns the ring position after the tile."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    _ws_load_q(q_desc, q_smem, tile_smem, q_full, q_empty, t, h, stride_qh, q_row, qi, DYNAMIC)
    hk = h // group
    for j in range(n_blocks):
        c = it + j
        stage = c % NUM_STAGES
        free_phase = ((c // NUM_STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(stage), free_phase)
        _issue_kv_load(k_desc, k_smem, k_ready, stage, kv_row + j * BLOCK_N, hk * stride_kh, True)
        mbarrier.wait(v_empty.index(stage), free_phase)
        _issue_kv_load(v_desc, v_smem, v_ready, stage, kv_row + j * BLOCK_N, hk * stride_vh, True)
    return it + n_blocks


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, tile_smem, q_full, q_empty, k_ready, v_ready,
                 k_empty, v_empty, tile_counter, cu_seqlens_q, cu_seqlens_k, nheads, group, stride_qh, stride_kh,
                 stride_vh, max_seqlen_q, max_seqlen_k, window_left, window_right, num_m, num_tiles, section,
                 block_table, stride_btb, tile_list, IS_VARLEN: gl.constexpr, HAS_LEFT: gl.constexpr,
                 HAS_RIGHT: gl.constexpr, DYNAMIC: gl.constexpr, PAIRED: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """The load warp (FA3 Sec. 3.1, producer): per tile both consumers' Q tiles into the tile's Q slot, once
    the last QK^T of the tile Q_STAGES before has read it, then its K and V blocks into the ring; a stage is
    refilled as soon as both consumers have released it, so the next tile's first blocks load under this
    tile's last products.

    Static: tiles t, t + programs, ... DYNAMIC (FA3's dynamic persistent scheduler): the first tile is the
    program's id, each next one comes from a global counter, taken once this tile's loads are all issued
    (about two key blocks before the consumers need it); the index goes to the consumers with the Q tiles,
    and an index past the last tile ends them. The last program out resets the counter for the next launch.
    PAIRED: the static schedule over pairs of query blocks (``_ws_tile``), every tile holding a key block.
    PAGE_SIZE > 0 (static, varlen queries): keys from the paged cache, BLOCK_N // BOX boxes a block, each box's
    page from the sequence's ``block_table`` row (``stream_kv_boxes``), into column-blocked rings."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]  # k_smem: the ring, (stages, BLOCK_N, d) or column-blocked
    num_bh = num_tiles // num_m
    it = gl.program_id(0) * 0  # key blocks loaded so far: ring stage and phase
    qi = it  # tiles loaded so far: phase of the Q barriers
    if DYNAMIC:
        nprog = gl.num_programs(0)
        t = gl.program_id(0)
        while t < num_tiles:
            b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks = _ws_tile(
                t, num_m, num_bh, section, nheads, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, 2 * BLOCK_M, BLOCK_N, IS_VARLEN, HAS_LEFT, HAS_RIGHT, True)
            it = _ws_load_tile(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, tile_smem, q_full, q_empty, k_ready,
                               v_ready, k_empty, v_empty, t, h, group, stride_qh, stride_kh, stride_vh,
                               q_row0 + start_m, kv_row0 + lo, n_blocks, it, qi, True)
            qi += 1
            t = nprog + gl.atomic_add(tile_counter, 1)
        slot, q_phase = _q_slot(qi, q_full.type.shape[0])
        mbarrier.wait(q_empty.index(slot), q_phase ^ 1)
        _write_tile_id(tile_smem, qi & 1, num_tiles)
        mbarrier.arrive(q_full.index(slot))
        if gl.atomic_add(tile_counter + 1, 1) == nprog - 1:
            # Every program has taken its last index (acq_rel atomics): back to zero for the next launch.
            gl.atomic_xchg(tile_counter, 0)
            gl.atomic_xchg(tile_counter + 1, 0)
    elif PAIRED:
        t, end = _static_tiles(num_m, num_tiles, True)
        while t < end:
            b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks = _ws_tile(
                t, num_m, num_bh, section, nheads, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, 2 * BLOCK_M, BLOCK_N, IS_VARLEN, HAS_LEFT, HAS_RIGHT, False, True)
            it = _ws_load_tile(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, tile_smem, q_full, q_empty, k_ready,
                               v_ready, k_empty, v_empty, t, h, group, stride_qh, stride_kh, stride_vh,
                               q_row0 + start_m, kv_row0 + lo, n_blocks, it, qi, False)
            qi += 1
            t = _static_next(t, num_m, True)
    else:
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks = _ws_tile(
                t, num_m, num_bh, section, nheads, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, 2 * BLOCK_M, BLOCK_N, IS_VARLEN, HAS_LEFT, HAS_RIGHT, False, False,
                PAGE_SIZE > 0, tile_list, num_tiles // nheads)
            if start_m < seqlen_q:
                if PAGE_SIZE > 0:
                    _ws_load_q(q_desc, q_smem, tile_smem, q_full, q_empty, t, h, stride_qh, q_row0 + start_m, qi,
                               False)
                    hk = h // group
                    it = stream_kv_boxes(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                                         block_table + b.to(gl.int64) * stride_btb, 0, hk * stride_kh,
                                         hk * stride_vh, lo, n_blocks, seqlen_k, it, BLOCK_N, True, PAGE_SIZE,
                                         False)
                else:
                    it = _ws_load_tile(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, tile_smem, q_full, q_empty,
                                       k_ready, v_ready, k_empty, v_empty, t, h, group, stride_qh, stride_kh,
                                       stride_vh, q_row0 + start_m, kv_row0 + lo, n_blocks, it, qi, False)
                qi += 1


@gluon.jit
def _store_tile_tma(acc, m_i, l_i, start_m, seqlen_q, score_scale, o_smem, o_desc, o_row, o_col, lse_base):
    """_store_tile through shared memory and a bulk tensor store (dense inputs whose query tiles end at
    the sequence's end: no row of another sequence in the box). Waits for this buffer's previous store."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, acc.type.layout))
    out, lse = normalized_rows(acc, m_i, l_i, score_scale)
    out = out.to(o_smem.dtype)
    tma.store_wait(0)
    gl.thread_barrier()
    o_smem.store(out)
    fence_async_shared()
    if start_m < seqlen_q:
        tma.async_copy_shared_to_global(o_desc, [o_row, o_col], o_smem)
    gl.store(lse_base + rows, lse, mask=rows < seqlen_q)


@gluon.jit
def _row_sum_mma(p_op, ones_smem, acc_l):
    """Issues acc_l += P times the (BLOCK_N, 8) ones (``ones_smem`` holds them transposed): every column of
    acc_l sums P's rows as rounded for PV. Returns the wgmma token."""
    pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l.type.layout, k_width=2)
    return warpgroup_mma(gl.convert_layout(p_op, pl_layout), ones_smem.permute((1, 0)), acc_l, is_async=True)


@gluon.constexpr_function
def consumer_acc_layout(n, warps=4):
    """Layout of a (rows, n) wgmma accumulator of one 4-warp consumer warpgroup (or of ``warps`` warps)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _ones_tile(dtype: gl.constexpr, BLOCK_N: gl.constexpr):
    """The row-sum products' B operand in shared memory, transposed: 8 rows of BLOCK_N ones (``_row_sum_mma``).
    The caller fences and synchronises before a product reads it."""
    ones_smem = gl.allocate_shared_memory(dtype, [8, BLOCK_N], gl.NVMMASharedLayout.get_default_for([8, BLOCK_N],
                                                                                                   dtype))
    ones_smem.store(gl.full([8, BLOCK_N], 1.0, dtype, gl.BlockedLayout([1, 8], [2, 16], [gl.num_warps(), 1], [1, 0])))
    return ones_smem


@gluon.jit
def _ws_fresh(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, FIXED_MAX: gl.constexpr):
    """A consumer's softmax state at a tile's start: (m, l) in the score rows' layout, the output and
    row-sum accumulators zero; m starts at the held max (1) with FIXED_MAX."""
    row_s: gl.constexpr = gl.SliceLayout(1, consumer_acc_layout(BLOCK_N))
    m_i = gl.full([BLOCK_M], 1.0 if FIXED_MAX else float("-inf"), gl.float32, row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, consumer_acc_layout(HEAD_DIM))
    acc_l = gl.zeros([BLOCK_M, 8], gl.float32, consumer_acc_layout(8))
    return m_i, l_i, acc, acc_l


@gluon.jit
def _ws_tile_mods(alibi_slopes, stride_ab, score_scale, tanh_scale, window_left, window_right, seed, dropout_p,
                  nheads, max_seqlen_q, max_seqlen_k, b, h, start_m, seqlen_q, seqlen_k, offs_n, rows,
                  HAS_ALIBI: gl.constexpr, DROPOUT: gl.constexpr):
    """``_softmax_block``'s arguments after (s, m, l, start_n, full_lo, full_hi) for the query ``rows`` from
    start_m (one consumer's half of a tile)."""
    BLOCK_M: gl.constexpr = rows.shape[0]
    diag = seqlen_k - seqlen_q
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = gl.load(alibi_slopes + b * stride_ab + h) * (1.4426950408889634 / score_scale)
    return (rows, offs_n, seqlen_k, diag, score_scale, tanh_scale, alibi_slope, window_left, window_right,
            seed_value(seed, DROPOUT), philox_rows(b * nheads + h, rows, max_seqlen_q, max_seqlen_k), dropout_p,
            start_m + diag,
            start_m + BLOCK_M - 1 + diag)


@gluon.jit
def _ws_first_qk(q, k_smem, k_ready, k_empty, me, other, s_zero, c, turn, PINGPONG: gl.constexpr):
    """QK^T of a tile's first key block (ring position c) alone, on issue turn ``turn``; releases its K."""
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    mbarrier.wait(k_ready.index(c % NUM_STAGES), (c // NUM_STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(me, turn & 1)
    s_tok = warpgroup_mma(q, k_smem.index(c % NUM_STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(other)
    s = warpgroup_mma_wait(0, deps=(s_tok,))
    mbarrier.arrive(k_empty.index(c % NUM_STAGES))
    return s


@gluon.jit
def _ws_step(q, k_smem, v_smem, ones_smem, k_ready, v_ready, k_empty, v_empty, me, other, s_zero, p, acc, acc_l,
             m_i, l_i, c, turn, start_n, full_lo, full_hi, mods, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
             HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, PINGPONG: gl.constexpr,
             OVERLAP: gl.constexpr):
    """One steady step of a consumer: PV of ring position c - 1 (P of the previous block) and QK^T of c (key
    block start_n) on issue turn ``turn``, their waits and releases, and the softmax of c. Returns (p, acc,
    acc_l, m, l)."""
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    FIXED_MAX: gl.constexpr = SOFTCAP == 2
    FAST_TANH: gl.constexpr = SOFTCAP  # inputs are 16-bit here
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    prev = (c - 1) % NUM_STAGES
    stage = c % NUM_STAGES
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    mbarrier.wait(v_ready.index(prev), ((c - 1) // NUM_STAGES) & 1)
    mbarrier.wait(k_ready.index(stage), (c // NUM_STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(me, turn & 1)
    if OVERLAP:
        # FA3 Alg. 2 (intra-warpgroup overlap): QK^T of this block first, then PV of the
        # previous one, which stays in flight under this block's softmax.
        s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        if FIXED_MAX:
            l_tok = _row_sum_mma(p_op, ones_smem, acc_l)
    else:
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        if FIXED_MAX:
            l_tok = _row_sum_mma(p_op, ones_smem, acc_l)
        s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
    if PINGPONG:
        mbarrier.arrive(other)
    if OVERLAP:
        s = warpgroup_mma_wait(2 if FIXED_MAX else 1, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(stage))
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, start_n, full_lo, full_hi, *mods, SOFTCAP, HAS_ALIBI,
                                            HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
        if FIXED_MAX:
            acc, acc_l, p_op = warpgroup_mma_wait(0, deps=(acc_tok, l_tok, p_op))
        else:
            acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
        mbarrier.arrive(v_empty.index(prev))
    else:
        if FIXED_MAX:
            s, acc, acc_l, p_op = warpgroup_mma_wait(0, deps=(s_tok, acc_tok, l_tok, p_op))
        else:
            s, acc, p_op = warpgroup_mma_wait(0, deps=(s_tok, acc_tok, p_op))
        mbarrier.arrive(k_empty.index(stage))
        mbarrier.arrive(v_empty.index(prev))
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, start_n, full_lo, full_hi, *mods, SOFTCAP, HAS_ALIBI,
                                            HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
    if not FIXED_MAX:
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    return p, acc, acc_l, m_i, l_i


@gluon.jit
def _ws_store(acc, m_i, l_i, o_smem, o_desc, Out, Lse, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
              score_scale, dropout_p, b, h, start_m, q_start, seqlen_q, q_row0, DROPOUT: gl.constexpr,
              O_TMA: gl.constexpr):
    """A consumer's epilogue: its half of the tile (rows from start_m) normalised and stored, with its lse;
    m_i and l_i in the softmax's row layout."""
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    m_o = gl.convert_layout(m_i, row_o)
    l_o = gl.convert_layout(l_i, row_o)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse_base = Lse + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_start
    if O_TMA:
        _store_tile_tma(acc, m_o, l_o, start_m, seqlen_q, score_scale, o_smem, o_desc, q_row0 + start_m,
                        h * stride_oh, lse_base)
    else:
        o_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + q_start.to(gl.int64) * stride_os
        _store_tile(acc, m_o, l_o, start_m, seqlen_q, score_scale, o_base, stride_os, lse_base, 4)


@gluon.jit
def zero_rows_past(tile, first_key, seqlen_k):
    """Zeroes the rows of a (BLOCK_N, d) V tile in shared memory whose keys (first_key + row) lie past the
    sequence, 16 rows at a time, then fences and synchronises the warpgroup before its product reads the
    tile. Their P is 0, but 0 * NaN is not 0: unused slots of a paged cache may hold anything. Both consumers
    of a stage may zero it: each writes back the rows' own values or zero, so neither sees a NaN after its
    own pass."""
    BLOCK_N: gl.constexpr = tile.type.shape[0]
    HEAD_DIM: gl.constexpr = tile.type.shape[1]
    TPW_D: gl.constexpr = HEAD_DIM // 8
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    CH: gl.constexpr = 16
    r = gl.arange(0, CH, gl.SliceLayout(1, io_layout))
    if first_key + BLOCK_N > seqlen_k:
        for c in gl.static_range(BLOCK_N // CH):
            if first_key + (c + 1) * CH > seqlen_k:
                part = tile.slice(c * CH, CH)
                keep = (first_key + c * CH + r < seqlen_k)[:, None]
                part.store(gl.where(keep, part.load(io_layout), 0.0))
        fence_async_shared()
        gl.thread_barrier()


@gluon.jit
def _ws_consume_tile(q, k_smem, v_smem, ones_smem, q_empty, k_ready, v_ready, k_empty, v_empty, me, other, o_smem,
                     o_desc, Out, Lse, alibi_slopes, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab,
                     score_scale, tanh_scale, window_left, window_right, seed, dropout_p, nheads, max_seqlen_q,
                     max_seqlen_k, b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, lo, full_lo, full_hi, n_blocks,
                     it, tp, WG: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr,
                     HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr,
                     O_TMA: gl.constexpr, PAGED: gl.constexpr = False):
    """Consumer WG's half of one tile (its Q tile has landed); returns the ring position and issue turns
    after it. SOFTCAP 2 (the max held at softcap's bound): each PV product comes with P times a (BLOCK_N, 8)
    block of ones (``ones_smem``, transposed), so the tensor cores sum the rows of P as rounded for PV (no
    add per score, and a row dominated by one key gives that key's value though no p is exactly 1). PAGED:
    the last block's V rows past the sequence are zeroed before its PV (``zero_rows_past``)."""
    BLOCK_M: gl.constexpr = q.type.shape[0]
    HEAD_DIM: gl.constexpr = q.type.shape[1]
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    dtype: gl.constexpr = q.dtype
    FAST_TANH: gl.constexpr = SOFTCAP  # inputs are 16-bit here
    s_layout: gl.constexpr = consumer_acc_layout(BLOCK_N)
    o_layout: gl.constexpr = consumer_acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    FIXED_MAX: gl.constexpr = SOFTCAP == 2  # and with it the row sums on the tensor cores

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    start_m = start_m + WG * BLOCK_M
    m_i, l_i, acc, acc_l = _ws_fresh(BLOCK_M, BLOCK_N, HEAD_DIM, FIXED_MAX)
    rows = start_m + gl.arange(0, BLOCK_M, row_s)
    mods = _ws_tile_mods(alibi_slopes, stride_ab, score_scale, tanh_scale, window_left, window_right, seed,
                         dropout_p, nheads, max_seqlen_q, max_seqlen_k, b, h, start_m, seqlen_q, seqlen_k, offs_n,
                         rows, HAS_ALIBI, DROPOUT)
    if n_blocks > 0:
        s = _ws_first_qk(q, k_smem, k_ready, k_empty, me, other, s_zero, it, tp, PINGPONG)
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, lo, full_lo, full_hi, *mods, SOFTCAP, HAS_ALIBI,
                                            HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
        for j in range(1, n_blocks):
            p, acc, acc_l, m_i, l_i = _ws_step(q, k_smem, v_smem, ones_smem, k_ready, v_ready, k_empty, v_empty, me,
                                               other, s_zero, p, acc, acc_l, m_i, l_i, it + j, tp + j,
                                               lo + j * BLOCK_N, full_lo, full_hi, mods, SOFTCAP, HAS_ALIBI,
                                               HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG, OVERLAP)
        mbarrier.arrive(q_empty)  # every QK^T of this tile is done: the next tile's Q may load
        last = it + n_blocks - 1
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(last % NUM_STAGES), (last // NUM_STAGES) & 1)
        if PAGED:
            zero_rows_past(v_smem.index(last % NUM_STAGES), lo + (n_blocks - 1) * BLOCK_N, seqlen_k)
        if PINGPONG:
            mbarrier.wait(me, (tp + n_blocks) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(last % NUM_STAGES), acc, is_async=True)
        if FIXED_MAX:
            l_tok = _row_sum_mma(p_op, ones_smem, acc_l)
        if PINGPONG:
            mbarrier.arrive(other)
        if FIXED_MAX:
            acc, acc_l, p_op = warpgroup_mma_wait(0, deps=(acc_tok, l_tok, p_op))
            l_i = gl.convert_layout(gl.sum(acc_l, axis=1) * 0.125, row_s)  # eight equal columns
        else:
            acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
        mbarrier.arrive(v_empty.index(last % NUM_STAGES))
        it += n_blocks
        tp += n_blocks + 1
    else:
        mbarrier.arrive(q_empty)
    _ws_store(acc, m_i, l_i, o_smem, o_desc, Out, Lse, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
              score_scale, dropout_p, b, h, start_m, q_start, seqlen_q, q_row0, DROPOUT, O_TMA)
    return it, tp


@gluon.jit
def _ws_consume_chain(q_smem, k_smem, v_smem, ones_smem, o_smem, q_full, q_empty, k_ready, v_ready,
                      k_empty, v_empty, me, other, o_desc, Out, Lse, alibi_slopes, stride_ob, stride_os, stride_oh,
                      stride_lb, stride_lh, stride_ab, nheads, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale,
                      window_left, window_right, seed, dropout_p, num_m, num_tiles, WG: gl.constexpr,
                      SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr,
                      HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, PINGPONG: gl.constexpr,
                      OVERLAP: gl.constexpr, O_TMA: gl.constexpr, PAIRED: gl.constexpr):
    """One consumer warpgroup over its program's tiles, chained (CHAIN: the persistent static schedule, dense
    inputs without a right window or, PAIRED, with one and every tile holding a key block; two Q slots): a
    tile's last PV goes out together with the next tile's first QK^T (its Q already in the other slot), and
    the tile's epilogue runs under both. The tensor cores then see one step per key block and no per-tile
    ramp (the first QK^T and softmax without a PV under them, the last PV and the store without a softmax),
    except at the program's first and last tile. After the last tile that QK^T is issued on stale shared
    memory (no wait, no release) and its scores are dropped."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    FAST_TANH: gl.constexpr = SOFTCAP  # inputs are 16-bit here
    FIXED_MAX: gl.constexpr = SOFTCAP == 2
    s_layout: gl.constexpr = consumer_acc_layout(BLOCK_N)
    o_layout: gl.constexpr = consumer_acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    num_bh = num_tiles // num_m
    it = gl.program_id(0) * 0  # key blocks consumed so far: ring stage and phase
    qi = it  # tiles begun so far: Q slot and phase
    mbarrier.wait(q_full.index(0), 0)
    t, end = _static_tiles(num_m, num_tiles, PAIRED)
    s = _ws_first_qk(q_smem.index(WG), k_smem, k_ready, k_empty, me, other, s_zero, it, it, PINGPONG)
    tp = it + 1  # issue turns taken so far
    while t < end:
        b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks = _ws_tile(
            t, num_m, num_bh, 1, nheads, Lse, Lse, max_seqlen_q, max_seqlen_k, window_left, window_right,
            2 * BLOCK_M, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, False, PAIRED)
        slot, _ = _q_slot(qi, 2)
        q = q_smem.index(2 * slot + WG)
        start_m = start_m + WG * BLOCK_M
        rows = start_m + gl.arange(0, BLOCK_M, row_s)
        mods = _ws_tile_mods(alibi_slopes, stride_ab, score_scale, tanh_scale, window_left, window_right, seed,
                             dropout_p, nheads, max_seqlen_q, max_seqlen_k, b, h, start_m, seqlen_q, seqlen_k,
                             offs_n, rows, HAS_ALIBI, DROPOUT)
        m_i, l_i, acc, acc_l = _ws_fresh(BLOCK_M, BLOCK_N, HEAD_DIM, FIXED_MAX)
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, lo, full_lo, full_hi, *mods, SOFTCAP, HAS_ALIBI,
                                            HAS_LEFT, HAS_RIGHT, FAST_TANH, DROPOUT)
        for j in range(1, n_blocks):
            p, acc, acc_l, m_i, l_i = _ws_step(q, k_smem, v_smem, ones_smem, k_ready, v_ready, k_empty, v_empty, me,
                                               other, s_zero, p, acc, acc_l, m_i, l_i, it + j, tp + j - 1,
                                               lo + j * BLOCK_N, full_lo, full_hi, mods, SOFTCAP, HAS_ALIBI,
                                               HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG, OVERLAP)
        mbarrier.arrive(q_empty.index(slot))  # every QK^T of this tile is done: its Q slot may refill
        # The next tile and its Q slot.
        next_slot, next_phase = _q_slot(qi + 1, 2)
        t_next = _static_next(t, num_m, PAIRED)
        has_next = t_next < end
        mbarrier.wait(q_full.index(next_slot), next_phase, pred=has_next)
        last = it + n_blocks - 1
        first = last + 1  # the next tile's first key block
        p_op = gl.convert_layout(p.to(q.dtype), p_layout)
        mbarrier.wait(v_ready.index(last % NUM_STAGES), (last // NUM_STAGES) & 1)
        mbarrier.wait(k_ready.index(first % NUM_STAGES), (first // NUM_STAGES) & 1, pred=has_next)
        if PINGPONG:
            mbarrier.wait(me, (tp + n_blocks - 1) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(last % NUM_STAGES), acc, is_async=True)
        if FIXED_MAX:
            l_tok = _row_sum_mma(p_op, ones_smem, acc_l)
        s_tok = warpgroup_mma(q_smem.index(2 * next_slot + WG), k_smem.index(first % NUM_STAGES).permute((1, 0)),
                              s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(other)
        if FIXED_MAX:
            acc, acc_l, p_op = warpgroup_mma_wait(1, deps=(acc_tok, l_tok, p_op))
            l_i = gl.convert_layout(gl.sum(acc_l, axis=1) * 0.125, row_s)  # eight equal columns
        else:
            acc, p_op = warpgroup_mma_wait(1, deps=(acc_tok, p_op))
        mbarrier.arrive(v_empty.index(last % NUM_STAGES))
        _ws_store(acc, m_i, l_i, o_smem, o_desc, Out, Lse, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                  score_scale, dropout_p, b, h, start_m, q_start, seqlen_q, q_row0, DROPOUT, O_TMA)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(first % NUM_STAGES), pred=has_next)
        it += n_blocks
        tp += n_blocks
        qi += 1
        t = t_next


@gluon.jit
def _ws_consumer(q_smem, k_smem, v_smem, ones_smem, tile_smem, o_smem, q_full, q_empty, k_ready, v_ready, k_empty,
                 v_empty, turns, o_desc, Out, Lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, stride_ob, stride_os,
                 stride_oh, stride_lb, stride_lh, stride_ab, nheads, max_seqlen_q, max_seqlen_k, score_scale,
                 tanh_scale, window_left, window_right, seed, dropout_p, num_m, num_tiles, section, tile_list,
                 WG: gl.constexpr, IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
                 HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, PINGPONG: gl.constexpr,
                 OVERLAP: gl.constexpr, DYNAMIC: gl.constexpr, O_TMA: gl.constexpr, CHAIN: gl.constexpr,
                 PAIRED: gl.constexpr, PAGED: gl.constexpr):
    """One consumer warpgroup: query tile WG of each of the program's tiles, over every key block of the ring.

    Each step issues PV of the previous block and QK^T of this one and waits for them, releases their
    stages and runs the softmax. With PINGPONG the two consumers take turns issuing (an mbarrier per
    consumer, arrived on by the other once it has issued): one's softmax runs under the other's products
    (FA3 Sec. 3.1, ping-pong scheduling). With DYNAMIC the tile index comes from the load warp. With CHAIN
    the tiles run back to back (``_ws_consume_chain``)."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    q = q_smem.index(WG)
    o_buf = o_smem.index(WG)
    me = turns.index(WG)
    other = turns.index(1 - WG)
    if PINGPONG and WG == 1:
        mbarrier.arrive(other)  # consumer 0 issues first
    gl.static_assert(CHAIN or not PAIRED, "paired tiles: chained only")
    if CHAIN:
        gl.static_assert(not (DYNAMIC or IS_VARLEN or (HAS_RIGHT and not PAIRED)),
                         "chained tiles: the static schedule, dense, a right window only when paired")
        _ws_consume_chain(q_smem, k_smem, v_smem, ones_smem, o_buf, q_full, q_empty, k_ready, v_ready,
                          k_empty, v_empty, me, other, o_desc, Out, Lse, alibi_slopes, stride_ob, stride_os,
                          stride_oh, stride_lb, stride_lh, stride_ab, nheads, max_seqlen_q, max_seqlen_k,
                          score_scale, tanh_scale, window_left, window_right, seed, dropout_p, num_m, num_tiles, WG,
                          SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG, OVERLAP, O_TMA, PAIRED)
        if O_TMA:
            tma.store_wait(0)
        return
    q_full = q_full.index(0)
    q_empty = q_empty.index(0)
    num_bh = num_tiles // num_m
    it = gl.program_id(0) * 0  # key blocks consumed so far: ring stage and phase
    tp = it  # issue turns taken so far
    qi = it  # tiles done so far
    if DYNAMIC:
        mbarrier.wait(q_full, 0)
        t = _read_tile_id(tile_smem, 0, 4)
        while t < num_tiles:
            b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks = _ws_tile(
                t, num_m, num_bh, section, nheads, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, 2 * BLOCK_M, BLOCK_N, IS_VARLEN, HAS_LEFT, HAS_RIGHT, True)
            it, tp = _ws_consume_tile(q, k_smem, v_smem, ones_smem, q_empty, k_ready, v_ready, k_empty, v_empty, me,
                                      other, o_buf, o_desc, Out, Lse, alibi_slopes, stride_ob, stride_os, stride_oh,
                                      stride_lb, stride_lh, stride_ab, score_scale, tanh_scale, window_left,
                                      window_right, seed, dropout_p, nheads, max_seqlen_q, max_seqlen_k, b, h,
                                      start_m, q_start, seqlen_q, seqlen_k, q_row0, lo, full_lo, full_hi, n_blocks,
                                      it, tp, WG, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG,
                                      OVERLAP, O_TMA)
            qi += 1
            mbarrier.wait(q_full, qi & 1)
            t = _read_tile_id(tile_smem, qi & 1, 4)
    else:
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, kv_row0, lo, full_lo, full_hi, n_blocks = _ws_tile(
                t, num_m, num_bh, section, nheads, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                window_left, window_right, 2 * BLOCK_M, BLOCK_N, IS_VARLEN, HAS_LEFT, HAS_RIGHT, False, False,
                PAGED, tile_list, num_tiles // nheads)
            if start_m < seqlen_q:
                mbarrier.wait(q_full, qi & 1)
                it, tp = _ws_consume_tile(q, k_smem, v_smem, ones_smem, q_empty, k_ready, v_ready, k_empty, v_empty, me,
                                          other, o_buf, o_desc, Out, Lse, alibi_slopes, stride_ob, stride_os,
                                          stride_oh, stride_lb, stride_lh, stride_ab, score_scale, tanh_scale,
                                          window_left, window_right, seed, dropout_p, nheads, max_seqlen_q,
                                          max_seqlen_k, b, h, start_m, q_start, seqlen_q, seqlen_k, q_row0, lo,
                                          full_lo, full_hi, n_blocks, it, tp, WG, SOFTCAP, HAS_ALIBI, HAS_LEFT,
                                          HAS_RIGHT, DROPOUT, PINGPONG, OVERLAP, O_TMA, PAGED)
                qi += 1
    if O_TMA:
        tma.store_wait(0)


@gluon.jit
def _ws_main(q_desc, k_desc, v_desc, o_desc, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, tile_counter,
             stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, stride_qh, stride_kh, stride_vh,
             nheads, group, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, window_left, window_right, seed,
             dropout_p, num_tiles, section, block_table, stride_btb, tile_list, HEAD_DIM: gl.constexpr,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr,
             SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
             DROPOUT: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr, DYNAMIC: gl.constexpr,
             O_TMA: gl.constexpr, CHAIN: gl.constexpr, PAIRED: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """Shared memory, mbarriers and the three partitions of the warp-specialised forward. Q slots: one
    (both consumers' Q tiles), two with CHAIN (the next tile's Q loads while this one runs). PAGE_SIZE > 0
    (a paged cache; varlen queries, the static schedule over a device-built tile list whose count replaces
    ``num_tiles``): k_desc / v_desc copy (box, 64) boxes, so the K and V rings are allocated as column blocks
    of (BLOCK_N, 64), which the consumers read as (BLOCK_N, HEAD_DIM) tiles (the same 128-byte swizzle, byte
    for byte)."""
    gl.static_assert(PAGE_SIZE == 0 or not (DYNAMIC or CHAIN or PAIRED), "paged keys: the static schedule")
    Q_STAGES: gl.constexpr = 2 if CHAIN else 1
    num_m = gl.cdiv(max_seqlen_q, 2 * BLOCK_M)
    if PAGE_SIZE > 0:
        num_tiles = gl.load(tile_list) * nheads  # the list's tiles, head by head (``_ws_tile``)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * Q_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    if PAGE_SIZE > 0:
        CB: gl.constexpr = HEAD_DIM // 64
        ring_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], k_desc.dtype)
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], k_desc.dtype)
        k_ring = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES * CB, BLOCK_N, 64], ring_layout)
        v_ring = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES * CB, BLOCK_N, 64], ring_layout)
        k_smem = k_ring._reinterpret(k_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], tile_layout)
        v_smem = v_ring._reinterpret(v_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], tile_layout)
    else:
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_ring = k_smem
        v_ring = v_smem
    tile_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    if O_TMA:
        # Output staging for the bulk store, one tile per consumer (unused otherwise).
        o_smem = gl.allocate_shared_memory(o_desc.dtype, [2, BLOCK_M, HEAD_DIM], o_desc.layout)
    else:
        o_smem = tile_smem
    if SOFTCAP == 2:
        ones_smem = _ones_tile(q_desc.dtype, BLOCK_N)
    else:
        ones_smem = tile_smem
    q_full = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(Q_STAGES):
        mbarrier.init(q_full.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_ws_consumer, (q_smem, k_smem, v_smem, ones_smem, tile_smem, o_smem, q_full, q_empty, k_ready, v_ready,
                        k_empty, v_empty, turns, o_desc, Out, Lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, stride_ob,
                        stride_os, stride_oh, stride_lb, stride_lh, stride_ab, nheads, max_seqlen_q, max_seqlen_k,
                        score_scale, tanh_scale, window_left, window_right, seed, dropout_p, num_m, num_tiles,
                        section, tile_list, 0, IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG,
                        OVERLAP, DYNAMIC, O_TMA, CHAIN, PAIRED, PAGE_SIZE > 0)),
        (_ws_consumer, (q_smem, k_smem, v_smem, ones_smem, tile_smem, o_smem, q_full, q_empty, k_ready, v_ready,
                        k_empty, v_empty, turns, o_desc, Out, Lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, stride_ob,
                        stride_os, stride_oh, stride_lb, stride_lh, stride_ab, nheads, max_seqlen_q, max_seqlen_k,
                        score_scale, tanh_scale, window_left, window_right, seed, dropout_p, num_m, num_tiles,
                        section, tile_list, 1, IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG,
                        OVERLAP, DYNAMIC, O_TMA, CHAIN, PAIRED, PAGE_SIZE > 0)),
        (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, tile_smem, q_full, q_empty, k_ready,
                        v_ready, k_empty, v_empty, tile_counter, cu_seqlens_q, cu_seqlens_k, nheads, group,
                        stride_qh, stride_kh, stride_vh, max_seqlen_q, max_seqlen_k, window_left, window_right,
                        num_m, num_tiles, section, block_table, stride_btb, tile_list, IS_VARLEN, HAS_LEFT,
                        HAS_RIGHT, DYNAMIC, PAIRED, PAGE_SIZE)),
    ], [4, 1], [240, 24])


@gluon.jit
def attn_fwd_gluon_ws_kernel(
    q_desc, k_desc, v_desc, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, stride_qh, stride_kh, stride_vh,
    nheads, group, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, window_left, window_right, seed, dropout_p,
    num_tiles, block_table, stride_btb, tile_list, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr,
    HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr,
    PINGPONG: gl.constexpr, OVERLAP: gl.constexpr, CHAIN: gl.constexpr, PAGE_SIZE: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Warp-specialised forward (FA3 Sec. 3.1), static schedule: a program walks tiles of 2 x BLOCK_M query
    rows (tile t, t + programs, ...: one per program when the grid covers them all, persistent when it
    holds one program per SM), one BLOCK_M half per consumer warpgroup (the default partition and a 4-warp
    worker), while one load warp fills the K/V ring that both consume; each stage's "empty" mbarrier waits
    for both. Output stored from registers. PAGE_SIZE > 0: varlen queries over a paged cache, k_desc / v_desc
    its (box, 64) boxes, cu_seqlens_k the key lengths, max_seqlen_k the table's capacity (``_ws_tile``)."""
    _ws_main(q_desc, k_desc, v_desc, q_desc, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, cu_seqlens_q,
             stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, stride_qh, stride_kh, stride_vh,
             nheads, group, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, window_left, window_right, seed,
             dropout_p, num_tiles, 1, block_table, stride_btb, tile_list, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES,
             IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG, OVERLAP, False, False, CHAIN,
             False, PAGE_SIZE)


@gluon.jit(do_not_specialize=["section"])
def attn_fwd_gluon_ws_sched_kernel(
    q_desc, k_desc, v_desc, o_desc, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, tile_counter,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, stride_qh, stride_kh, stride_vh,
    nheads, group, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, window_left, window_right, seed, dropout_p,
    num_tiles, section, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, PINGPONG: gl.constexpr,
    OVERLAP: gl.constexpr, DYNAMIC: gl.constexpr, O_TMA: gl.constexpr, CHAIN: gl.constexpr, PAIRED: gl.constexpr,
    num_warps: gl.constexpr,
):
    """``attn_fwd_gluon_ws_kernel`` with the dynamic persistent schedule (DYNAMIC: tiles from the global
    counter ``tile_counter``, int32[2], zero before the launch and left zero after it, in sections of
    ``section`` heads) or the static one over pairs of query blocks (PAIRED, chained: ``_ws_tile``), and / or
    the output through shared memory and a bulk tensor store (O_TMA, o_desc a 2D view of Out like q_desc's
    of q)."""
    _ws_main(q_desc, k_desc, v_desc, o_desc, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, tile_counter,
             stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, stride_qh, stride_kh, stride_vh,
             nheads, group, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, window_left, window_right, seed,
             dropout_p, num_tiles, section, cu_seqlens_q, 0, cu_seqlens_q, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES,
             IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, PINGPONG, OVERLAP, DYNAMIC, O_TMA, CHAIN,
             PAIRED, 0)


class FwdConfig(NamedTuple):
    """Tiles and schedule of the Gluon forward. ``schedule``: "single" runs ``attn_fwd_gluon_kernel`` (one
    warpgroup per program on block_m rows, num_warps warps); "ws" and "pingpong" run the warp-specialised
    kernels (two consumer warpgroups of block_m rows each and a load warp per program; "pingpong" makes the
    consumers take turns issuing their products). ``overlap``: the intra-warpgroup overlap of QK^T (single)
    or PV (ws) with the softmax (FA3 Alg. 2). ``persistent`` (ws schedules, dense inputs without a right
    window): one program per SM walks the tiles t, t + programs, ..., so a tile's first loads run under the
    previous tile's last products and store. Causal tiles differ in length, and that static stride over them
    left SMs idle (0.72x at causal 16k on an H200), hence ``dynamic`` (ws schedules, dense inputs with a
    right window: causal, sliding windows): one program per SM takes tiles from a global counter, longest
    first within sections of heads whose K/V fit in L2 (FA3's dynamic persistent scheduler). Varlen keeps
    one tile per program and the block scheduler's balancing. ``tma_store`` (ws schedules, dense inputs
    whose query length is a multiple of block_m, or one batch; not with softcap or dropout): the output goes
    through shared memory and a bulk tensor store instead of register stores. ``fixed_max`` (bf16 softcap
    <= 40 without ALiBi or dropout): the softmax's max held at softcap's bound, the rows of P summed on the
    tensor cores.
    ``alibi_sides`` (ws schedules): ALiBi's bias on key blocks wholly on one side of the tile's diagonal as one
    FMA per score and a row term (``_softmax_block``, HAS_ALIBI 2), the blocks across it exact. ``chain``
    (the persistent static schedule: dense inputs without a right window, or paired): a program's tiles run
    back to back, each tile's last PV issued with the next one's first QK^T and its store under them (two Q
    slots: 213 KB of shared memory at d = 128 with two stages, so no more stages there). ``paired`` (with
    chain; dense inputs with a right window and no left one, seqlen_q <= seqlen_k, 8 tiles of queries or
    more: causal, where each query block sees key 0 and the keys it sees grow with it): the chained static
    schedule over units of two query blocks of one head, the (num_m - 1 - j)-th and the j-th, which hold
    equal work under a causal mask, in place of the dynamic schedule."""

    block_m: int
    block_n: int
    stages: int
    warps: int
    schedule: str = "single"
    overlap: bool = False
    persistent: bool = False
    dynamic: bool = False
    tma_store: bool = False
    fixed_max: bool = False
    alibi_sides: bool = False
    chain: bool = False
    paired: bool = False

    @classmethod
    def parse(cls, text: str) -> FwdConfig:
        """From 'block_m,block_n,stages,warps[,schedule[,overlap,persistent,dynamic,tma_store,fixed_max,
        alibi_sides,chain,paired]]' (the scripts' options; flags as 0 / 1)."""
        fields = text.split(",")
        ints = [int(x) for x in fields[:4] + fields[5:]]
        return cls(*ints[:4], *fields[4:5], *(bool(x) for x in ints[4:]))


# By head dim. d=64: one warpgroup on 64 query rows, three programs (74-76 KB, 154-159 registers) per SM, so one's
# softmax runs under another's wgmma; 1.14-1.26x the portable kernel on an H200 (benchmarks/NOTES.md,
# "Gluon forward v2"); the overlapped single loop lost 3-25% there. d=128: 128-key blocks (QK^T at N=64
# saturates the shared-memory port) under the ping-pong schedule with the overlap, persistent where it
# applies: 1.06-1.19x the one-warpgroup (64, 64) tiles on an H200 (same notes, "Gluon forward v3"); the
# dynamic schedule for causal: +11 / +9 / +5% at 2k / 4k / 8k, -1% at 16k (scatter level) over one tile per
# program (same notes, "Gluon forward v4"). The bulk store of O measured -3 to +1% then (unchained).
# Softcap's max held at its bound, with P's row sums on the tensor cores: +7-8% for softcap at d = 128 (same
# notes, "softcap's max held at its bound"); the row sums alone, with the online max, measured 3-8% slower.
# Chained tiles (static schedule): softcap +3-4%, dropout +5%, plain +1% (same notes, "chained tiles"). The
# bulk store of O, without softcap or dropout, chained (plain, ALiBi, GQA) or not (the dynamic schedule:
# causal, windows): +2-3% at 2k-4k plain, causal, ALiBi, windows (same notes, "the chained epilogue through a
# bulk tensor store"). Causal inputs of 8 query tiles or more at d = 128: pairs of query blocks of equal work on
# the chained static schedule, +5.2 / +4.4 / +2.3% at 2k / 4k / 8k over the dynamic one, alike at 16k (same
# notes, "query blocks in pairs"). d = 64 holds softcap's max at its bound too: +2.2 / +5.3 / +6.6% at 2k / 4k /
# 16k (H100; same notes, "softcap's max held at its bound in the one-warpgroup kernel").
# d = 256: the d = 128 kernel's warp-specialised tiles on 64-key blocks (Q, two K/V stages and the epilogue's
# layout change take 224 KiB of shared memory, so no bulk store and no chain), free-running consumers:
# 1.9-2.0x the portable kernel on an H200, 613 / 640 / 654 TFLOPs/s at 2k / 4k / 16k non-causal
# (benchmarks/NOTES.md, "the Gluon forward at d = 256").
_CONFIGS = {64: FwdConfig(64, 128, 2, 4, fixed_max=True),
            128: FwdConfig(64, 128, 2, 4, "pingpong", True, True, True, tma_store=True, fixed_max=True,
                           alibi_sides=True, chain=True, paired=True),
            256: FwdConfig(64, 64, 2, 4, "ws", True, True, True, fixed_max=True, alibi_sides=True)}
# Registers a thread of the one-warpgroup kernel may take with dropout: three programs an SM, as its shared
# memory allows (65536 / (128 x 168)). Unbounded, ptxas gave the dropout variants 221-225 (two programs an SM;
# the others take 154-168), the seed being a loaded value since it became a device tensor: 0.94-0.97x
# (benchmarks/NOTES.md, "Dropout's seed on the device").
_SINGLE_MAXNREG = 168
# Largest softcap whose scores take the fixed max (bf16): p >= 2^(-2 * softcap * log2(e)) stays a normal
# float (> 2^-126, which ex2.approx.ftz would flush) up to 43.6.
_FIXED_MAX_SOFTCAP = 40.0


def _softcap_mode(softcap: float, dtype: torch.dtype, alibi: bool, dropout_p: float, cfg: FwdConfig) -> int:
    """The kernels' SOFTCAP flag: 0 off; 1 tanh with the online max; 2 tanh with the max held at the bound
    (``FwdConfig.fixed_max``; the kernels sum P's rows on the tensor cores):
    bf16 only, as in fp16 P far below 1 would flush to zero; not with ALiBi, whose bias takes scores below -1;
    not with dropout (l sums P before the drop, PV takes it after)."""
    if softcap <= 0:
        return 0
    fixed = (cfg.fixed_max and dropout_p == 0 and dtype == torch.bfloat16 and not alibi
             and softcap <= _FIXED_MAX_SOFTCAP)
    return 2 if fixed else 1


# Head dims routed here by the predicate.
_ROUTED_HEAD_DIMS = (64, 128, 256)
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _tma_describable(t: torch.Tensor) -> bool:
    """The 2D (rows, columns) view needs unit d-stride, 16-byte aligned base and row stride, and, for
    dense (batch, seqlen, nheads, d) inputs, batches laid end to end along the sequence (or one batch).
    Varlen (total, nheads, d) inputs are one run of rows already. A view of a single row is declined: Triton
    specialises a descriptor dimension of 1 and ptxas (CUDA 13, sm_90a) crashed compiling the forward so
    specialised (batch 1, seqlen_q 1: a one-sequence decoding step through ``flash_attn_func``); the portable
    kernels take those calls (the paged prefill's one-row q: the split-KV kernel)."""
    strides = t.stride()
    ok = strides[-1] == 1 and t.data_ptr() % 16 == 0 and (strides[-3] * t.element_size()) % 16 == 0
    rows = t.shape[0] * t.shape[1] if len(strides) == 4 else t.shape[0]
    ok = ok and rows > 1
    if len(strides) == 4:
        batch, seqlen = t.shape[:2]
        ok = ok and (batch == 1 or strides[0] == seqlen * strides[1])
    return ok


@functools.cache
def device_capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability (cached: torch's lookup costs microseconds a call)."""
    return torch.cuda.get_device_capability(device)


def gluon_enabled_on(*tensors: torch.Tensor) -> bool:
    """The gate every Gluon kernel shares: ``IOATTN_GLUON`` is not 0, Triton runs compiled (not interpreted),
    and the tensors are on an sm_90 device."""
    for t in tensors:
        if not t.is_cuda:
            return False
    if interpreting() or os.environ.get("IOATTN_GLUON", "1").strip() == "0":
        return False
    return device_capability(tensors[0].device) == (9, 0)


def gluon_scales(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """(score_scale, tanh_scale) of ``_softmax_block``'s score units: the log2-logit of a unit, and what tanh
    takes q.k times (1 without softcap)."""
    if softcap > 0:
        return softcap * LOG2E, softmax_scale / softcap
    return softmax_scale * LOG2E, 1.0


def gluon_forward_supported(q, k, v, *, window_size: tuple[int, int], softcap: float, alibi_slopes,
                            dropout_p: float, softmax_scale: float | None = None,
                            cu_seqlens_q: torch.Tensor | None = None) -> bool:
    """Whether ``gluon_forward`` computes this forward: dense (b, s, h, d) or varlen (total, h, d) with
    cu_seqlens, any window / causal, softcap, ALiBi, GQA, dropout. ``IOATTN_GLUON=0`` turns it off."""
    if not gluon_enabled_on(q, k, v):
        return False
    dtype, shape = q.dtype, q.shape
    if dtype not in _GL_DTYPES or k.dtype != dtype or v.dtype != dtype:
        return False
    rank = 3 if cu_seqlens_q is not None else 4
    if len(shape) != rank or k.dim() != rank or v.dim() != rank:
        return False
    if shape[-1] not in _ROUTED_HEAD_DIMS or k.shape[-1] != shape[-1] or v.shape[-1] != shape[-1]:
        return False
    if not 0 <= dropout_p < 1:
        return False
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device):
        return False
    # Without softcap the running max is kept in raw q.k units: it needs a positive scale.
    if softcap == 0 and softmax_scale is not None and not softmax_scale > 0:
        return False
    if len(window_size) != 2:
        return False
    if 0 in shape or 0 in k.shape:
        return False
    return _tma_describable(q) and _tma_describable(k) and _tma_describable(v)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_TILE_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _tile_counter(device: torch.device) -> torch.Tensor:
    """The dynamic schedule's counter (int32[2]: next tile, programs done). The kernel leaves it at zero, so
    one per stream serves every launch ordered on that stream; a CUDA graph capture gets its own zeroed
    one (captured with the graph)."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(2, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, raw_stream(index))
    counter = _TILE_COUNTERS.get(key)
    if counter is None:
        counter = _TILE_COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return counter


@functools.cache
def _tile_layout(block_rows: int, d: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([block_rows, d], _GL_DTYPES[dtype])


def _descriptor(t: torch.Tensor, block_rows: int) -> TmaDesc:
    """(batch * seqlen or total, columns) view: head h starts at column h * stride_h."""
    shape, strides = t.shape, t.stride()
    nheads, d = shape[-2:]
    rows = shape[0] * shape[1] if len(shape) == 4 else shape[0]
    return TmaDesc(t, (rows, (nheads - 1) * strides[-2] + d), (strides[-3], 1), (block_rows, d),
                   _tile_layout(block_rows, d, t.dtype))


_launch_ws = Launcher(attn_fwd_gluon_ws_kernel)
_launch_sched = Launcher(attn_fwd_gluon_ws_sched_kernel)
_launch_single = Launcher(attn_fwd_gluon_kernel)


def gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                  window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                  dropout_p: float = 0.0, seed: int | torch.Tensor | None = 0, *, config: FwdConfig | None = None,
                  overlap: bool | None = None, plan_key: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense q (b, sq, h, d), k/v (b, sk, h_k, d) -> (out contiguous like q, lse float32 (b, h, sq)); varlen
    q (total_q, h, d), k/v (total_k, h_k, d) with int32 cu_seqlens -> (out, lse float32 (h, total_q)).
    ``window_size`` is resolved (causal = (left, 0)). ``dropout_p`` > 0 drops with ``ioattn.dropout``'s mask
    for ``seed`` (an int or the call's seed tensor, ``ioattn.dropout.kernel_seed``). Call only where
    ``gluon_forward_supported`` is True.
    ``config`` overrides ``_CONFIGS[d]``, ``overlap`` the config's overlap. ``plan_key`` (``forward_plan_key``
    of these arguments, from the op, which checked support) records a plan that
    ``gluon_forward_planned`` launches for the next calls like this one (dense, without ALiBi, config or
    overlap only)."""
    varlen = cu_seqlens_q is not None
    if varlen or alibi_slopes is not None or config is not None or overlap is not None:
        plan_key = None
    seed = kernel_seed(seed, dropout_p, q.device)
    shape = q.shape
    nheads, d = shape[-2:]
    nheads_k = k.shape[-2]
    out = torch.empty(shape, dtype=q.dtype, device=q.device)
    # out and lse are fresh and contiguous: their strides follow from the shapes.
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        lse = torch.empty((nheads, shape[0]), dtype=torch.float32, device=q.device)
        stride_ob, stride_os, stride_oh = 0, nheads * d, d
        stride_lb, stride_lh = 0, shape[0]
    else:
        batch, max_seqlen_q, max_seqlen_k = shape[0], shape[1], k.shape[1]
        lse = torch.empty((batch, nheads, max_seqlen_q), dtype=torch.float32, device=q.device)
        stride_ob, stride_os, stride_oh = max_seqlen_q * nheads * d, nheads * d, d
        stride_lb, stride_lh = nheads * max_seqlen_q, max_seqlen_q
    cfg = config or _CONFIGS[d]
    overlap = cfg.overlap if overlap is None else overlap
    single = cfg.schedule == "single"
    rows = cfg.block_m if single else 2 * cfg.block_m
    num_m = cdiv(max_seqlen_q, rows)
    if num_m * batch * nheads == 0:
        return out, lse
    score_scale, tanh_scale = gluon_scales(softmax_scale, softcap)
    slopes, stride_ab = q, 0
    if alibi_slopes is not None:
        slopes = alibi_slopes.contiguous()  # (nheads,) or (batch, nheads) float32
        stride_ab = slopes.stride(0) if slopes.dim() == 2 else 0
    left, right = window_size
    flags = dict(HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.stages, IS_VARLEN=varlen,
                 SOFTCAP=_softcap_mode(softcap, q.dtype, alibi_slopes is not None, dropout_p, cfg),
                 HAS_ALIBI=0 if alibi_slopes is None else 2 if cfg.alibi_sides and not single else 1,
                 HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                 DROPOUT=dropout_p > 0, OVERLAP=overlap, num_warps=cfg.warps)
    num_tiles = num_m * batch * nheads
    if single:
        grid = bh_grid(num_m, nheads, batch)
        flags["BH_AXES"] = len(grid) == 3
        launcher, kind, dynamic, o_tma, section = _launch_single, 0, False, False, 0
        if dropout_p > 0 and cfg.warps == 4 and d == 64:
            flags["maxnreg"] = _SINGLE_MAXNREG
    else:
        # A right window and no left one with seqlen_q <= seqlen_k (causal, or a right window of any width:
        # every query block sees key 0, and the keys it sees grow with it), 8 query blocks or more: pairs of
        # query blocks on the chained static schedule. Shorter ones keep the dynamic schedule (paired 0.94x at
        # 512, 1.01x at 1k; benchmarks/NOTES.md, "query blocks in pairs").
        paired = (cfg.paired and cfg.chain and not varlen and right >= 0 and left < 0
                  and max_seqlen_q <= max_seqlen_k and num_m >= 8)
        dynamic = cfg.dynamic and not varlen and right >= 0 and not paired
        persistent = not varlen and (dynamic or paired or (cfg.persistent and right < 0))
        # The bulk store slowed softcap's and dropout's consumers (chained, 4k: 0.96 / 0.92; notebook, "the
        # chained epilogue through a bulk tensor store"): they keep the register stores.
        o_tma = (cfg.tma_store and not varlen and (batch == 1 or max_seqlen_q % cfg.block_m == 0) and softcap <= 0
                 and dropout_p == 0)
        # A persistent program walks one tile at least (a consumer waits for its first Q before the loop): no
        # more programs than tiles, or than pairs of query blocks when paired.
        units = batch * nheads * ((num_m + 1) // 2) if paired else num_tiles  # _pairs(num_m) a head when paired
        grid = (min(units, _num_sms(q.device)) if persistent else num_tiles,)
        flags["PINGPONG"] = cfg.schedule == "pingpong"
        # Chained tiles on the static schedule only (no right window, or paired: every tile holds a key block).
        # On the dynamic one they measured 0.97-0.99x at causal 2k-16k (benchmarks/NOTES.md, "chained tiles").
        flags["CHAIN"] = cfg.chain and persistent and not dynamic and max_seqlen_k > 0
        kind = 2 if dynamic or o_tma or paired else 1
        section = 0
        if kind == 2:
            flags.update(DYNAMIC=dynamic, O_TMA=o_tma, PAIRED=paired)
            # Sections of the dynamic schedule: KV heads whose K and V fit in L2 (common.py's
            # L2_SECTION_BYTES), times the query heads sharing each.
            section = order_section(batch * nheads_k, max_seqlen_k * d * 2 * q.element_size()) * (nheads // nheads_k)
        launcher = _launch_sched if kind == 2 else _launch_ws
        if kind == 1:
            flags["PAGE_SIZE"] = 0
    build = _arg_builder(kind, _descriptor(q, cfg.block_m)[1:], _descriptor(k, cfg.block_n)[1:],
                         _descriptor(v, cfg.block_n)[1:], _descriptor(out, cfg.block_m)[1:] if o_tma else None,
                         (stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, q.stride(-2),
                          k.stride(-2), v.stride(-2), nheads, nheads // nheads_k, max_seqlen_q, max_seqlen_k,
                          score_scale, tanh_scale, left, right), num_tiles, section)
    counter = _tile_counter(q.device) if dynamic else lse
    args = build(q, k, v, out, lse, counter, slopes, cu_seqlens_q if varlen else lse,
                 cu_seqlens_k if varlen else lse, seed, float(dropout_p))
    launcher(grid, *args, **flags)
    if plan_key is not None:
        entry = launcher.entry(args, flags)
        if entry is not None:
            _FWD_PLANS.put(plan_key, _FwdPlan(launcher, entry, grid, build, lse.shape, dynamic))
    return out, lse


def _arg_builder(kind: int, qd: tuple, kd: tuple, vd: tuple, od: tuple | None, statics: tuple, num_tiles: int,
                 section: int):
    """The launch's positional arguments from the tensors of one call: ``kind`` 0 the one-warpgroup kernel,
    1 the warp-specialised one, 2 its scheduled variant; ``qd``, ``kd``, ``vd``, ``od`` the descriptors'
    fields after the base (od None: no bulk output store); ``statics`` the strides, sizes, scales and window
    between the pointers and the seed. Holds no tensor, so a plan keeps none alive."""

    def build(q, k, v, out, lse, counter, slopes, cu_q, cu_k, seed, dropout_p):
        descs = (TmaDesc(q, *qd), TmaDesc(k, *kd), TmaDesc(v, *vd))
        if kind == 0:
            return (*descs, out, lse, cu_q, cu_k, slopes, *statics, seed, dropout_p)
        if kind == 1:
            return (*descs, out, lse, cu_q, cu_k, slopes, *statics, seed, dropout_p, num_tiles, lse, 0, lse)
        o_desc = descs[0] if od is None else TmaDesc(out, *od)
        return (*descs, o_desc, out, lse, cu_q, cu_k, slopes, counter, *statics, seed, dropout_p, num_tiles,
                section)

    return build


class _FwdPlan(NamedTuple):
    """A dense forward's launch with everything but its tensors worked out (``gluon_forward_planned``)."""

    launcher: Launcher
    entry: tuple
    grid: tuple
    build: object
    lse_shape: tuple
    dynamic: bool


# Plans by what decides a launch (``forward_plan_key``). ``IOATTN_FWD_PLANS=0`` at import: none (every call
# takes the whole path).
_FWD_PLANS = PlanTable("IOATTN_FWD_PLANS")


def forward_plan_key(q, k, v, softmax_scale: float, window_size, softcap: float, dropout_p: float) -> tuple | None:
    """Everything a dense forward's launch depends on but its tensors' data: the current device and Triton's
    debug and instrumentation knobs (``Launcher``'s key), shapes, strides, dtypes and devices, the scale,
    window and softcap, whether it drops (the seed is then a tensor, aligned as the others), and the config
    and SM count the host reads (so a config or SM count patched in, as the A/B scripts and tests do, makes
    new plans). None where plans or the direct launch are off, the Gluon path
    is (``gluon_enabled_on``: no plan could apply), or no call with q's and k's shapes came before (the first
    of a shape takes the whole path; ``PlanTable.sighted``). The tensors' alignment and launch hooks are checked
    a call (``gluon_forward_planned``)."""
    if not (_FWD_PLANS.active() and _FWD_PLANS.sighted((q.shape, k.shape)) and gluon_enabled_on(q)):
        return None
    return (*runtime_key(),
            q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, softmax_scale, tuple(window_size), softcap, dropout_p > 0,
            _CONFIGS.get(q.shape[-1]), _num_sms(q.device))


def gluon_forward_planned(plan_key: tuple | None, q, k, v, dropout_p: float, seed: torch.Tensor | None):
    """A dense forward without ALiBi through the plan an earlier call with the same ``plan_key``
    (``forward_plan_key``) left (its support check, config, grid, descriptors' layouts and Triton's
    specialisation of the arguments are that call's), or None where there is none or it does not apply now
    (unaligned data, launch hooks); ``gluon_forward`` records plans, and a plan implies
    ``gluon_forward_supported``. The key holds every tensor's device and is None with the Gluon path off.
    ``seed``: the call's seed tensor with dropout, else None."""
    if plan_key is None or not 0 <= dropout_p < 1:
        return None
    plan = _FWD_PLANS.get(plan_key)
    if plan is None or not aligned(q, k, v, seed):
        return None
    if not plan.launcher.direct_ok():
        return None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=q.device)
    counter = _tile_counter(q.device) if plan.dynamic else lse
    plan.launcher.launch_entry(plan.entry, plan.grid,
                               plan.build(q, k, v, out, lse, counter, q, lse, lse, 0 if seed is None else seed,
                                          float(dropout_p)))
    return out, lse
