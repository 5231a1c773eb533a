"""Split-KV attention of a few query tokens over a KV cache (Flash-Decoding), paged or contiguous.

One program per (batch, KV head, query block, split). The query heads of a GQA group and the query
tokens are packed together as the M dimension of the tile (row ``r`` is token ``r // GROUP``, head
``hk * GROUP + r % GROUP``), so each K/V tile is read once per group rather than once per query head.

The cache is addressed by (row0, row1) pairs: (page, offset) through ``block_table`` when PAGED, and
(cache row, position) for a contiguous cache, which is a page table with one page per sequence. Keys
are the sequence's first ``cache_seqlens[b] + seqlen_new`` positions (from ``cache_leftpad[b]`` with
HAS_LEFTPAD), read on the device only.

Each split owns a contiguous run of key tiles and writes its normalised output and log-sum-exp; with
several splits ``combine.py`` merges them (Flash-Decoding's reduction), with one they are final.
"""

import triton
import triton.language as tl

from .common import dot, online_softmax_step, score_mod
from .kv_write import rotary_load

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _page_ids(bt_row, cols, seqlen_k, key0, PAGE_SIZE: tl.constexpr):
    """Page of each key ``cols`` (counted from the sequence's first key, at cache position ``key0``);
    keys past the sequence read its last page's entry (an empty sequence's at key0 - 1), so the table is never
    read out of bounds (and masked K/V loads never dereference what they read)."""
    return tl.load(bt_row + tl.maximum(tl.minimum(cols + key0, key0 + seqlen_k - 1), 0) // PAGE_SIZE)


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, cache_row, key0, start, end, rows, seqlen_k, diag,
                  qk_scale, softcap2, alibi_slope2, window_left, window_right,
                  stride_kc0, stride_kc1, stride_vc0, stride_vc1, offs_d, d_ok,
                  BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK: tl.constexpr,
                  EVEN_D: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key tiles [start, end); MASK=False only for tiles every row fully allows. Keys are
    counted from the sequence's first, at cache position ``key0`` (``cache_leftpad``; 0 without)."""
    offs_n = tl.arange(0, BLOCK_N)
    if PAGED:
        # The page ids of a tile are loaded one tile ahead, so the K/V addresses never wait on a table
        # read in the same iteration and the loads pipeline as deeply as a contiguous cache's.
        pages = _page_ids(bt_row, start + offs_n, seqlen_k, key0, PAGE_SIZE)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        if PAGED:
            row0 = pages.to(tl.int64)
            row1 = ((cols + key0) % PAGE_SIZE).to(tl.int64)
            pages = _page_ids(bt_row, cols + BLOCK_N, seqlen_k, key0, PAGE_SIZE)
        else:
            row0 = cache_row.to(tl.int64)
            row1 = (cols + key0).to(tl.int64)
        k_ptrs = k_base + (row0 * stride_kc0 + row1 * stride_kc1)[:, None] + offs_d[None, :]
        v_ptrs = v_base + (row0 * stride_vc0 + row1 * stride_vc1)[:, None] + offs_d[None, :]
        if MASK or not EVEN_D:
            # Masked loads keep unused cache slots (whatever they hold) out of the sums.
            ld_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
            v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = dot(q, tl.trans(k), PRECISION)
        s = score_mod(qk, rows, cols, seqlen_k, diag, qk_scale, softcap2, alibi_slope2, window_left,
                      window_right, SOFTCAP, HAS_ALIBI, MASK, HAS_LEFT, HAS_RIGHT)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def key_range(pos_first, pos_last, seqlen_k, window_left, window_right, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """For query rows at key positions [pos_first, pos_last] (bottom-right aligned): the keys any of them may
    see, [lo, hi) with lo on a tile boundary, and those every one sees, [first_full, last_full)."""
    lo = 0
    hi = seqlen_k
    first_full = 0
    last_full = seqlen_k
    if HAS_LEFT:
        lo = (tl.maximum(pos_first - window_left, 0) // BLOCK_N) * BLOCK_N
        first_full = pos_last - window_left
    if HAS_RIGHT:
        hi = tl.minimum(pos_last + window_right + 1, seqlen_k)
        last_full = tl.minimum(pos_first + window_right + 1, seqlen_k)
    return lo, tl.maximum(hi, lo), first_full, last_full


@triton.jit
def decode_kernel(
    Q, K, V, Out, Lse, CacheSeqlens, BlockTable, CacheBatchIdx, Alibi, Cos, Sin, CuSeqlensQ, LeftPad,
    stride_qb, stride_qs, stride_qh,
    stride_kc0, stride_kc1, stride_kch, stride_vc0, stride_vc1, stride_vch,
    stride_osplit, stride_ob, stride_os, stride_oh,
    stride_lsplit, stride_lb, stride_lh, stride_ls,
    stride_btb, stride_ab, stride_ro,
    nheads_k, seqlen_q, seqlen_new, num_splits, num_bh, capacity,
    qk_scale, softcap2, window_left, window_right,
    GROUP: tl.constexpr, HEADDIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, ROTARY_PER_ROW: tl.constexpr,
    PRECISION: tl.constexpr, VARLEN_Q: tl.constexpr, PARTS_BY_SEQ: tl.constexpr = False,
    HAS_LEFTPAD: tl.constexpr = False,
):
    # (batch x KV head) fastest, then the query block, on one grid axis (2^31 programs; the second and third
    # axes stop at 65535); the split on the second
    pid_bh = tl.program_id(0) % num_bh
    pid_m = tl.program_id(0) // num_bh
    split = tl.program_id(1)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k

    # VARLEN_Q: sequence b's queries are the packed rows [CuSeqlensQ[b], CuSeqlensQ[b + 1]) (the batch
    # strides of q, out and lse are 0, seqlen_q is the most rows a sequence of this launch has: a longer one
    # is left to another kernel, the Gluon tiles of a packed call's prefill rows); otherwise row 0 of batch b.
    # PARTS_BY_SEQ: the split outputs are (split, b, row of the sequence), not (split, packed row).
    q_first = 0
    o_first = 0
    if VARLEN_Q:
        q_first = tl.load(CuSeqlensQ + b)
        rows_b = tl.load(CuSeqlensQ + b + 1) - q_first
        if rows_b > seqlen_q:
            return
        seqlen_q = rows_b
        if not PARTS_BY_SEQ:
            o_first = q_first
    cache_len = tl.load(CacheSeqlens + b)
    # Lengths past the cache's capacity (unchecked on the device) read no other sequence's pages.
    seqlen_k = tl.minimum(cache_len + seqlen_new, capacity)
    # HAS_LEFTPAD (flash-attn's cache_leftpad): the sequence's keys start at cache position key0; keys are
    # counted from there (masks, ALiBi), the rotary positions stay the cache's.
    key0 = 0
    if HAS_LEFTPAD:
        key0 = tl.maximum(tl.minimum(tl.load(LeftPad + b), seqlen_k), 0)
        seqlen_k -= key0
    diag = seqlen_k - seqlen_q  # bottom-right alignment: token i sits at key position i + diag

    num_rows = seqlen_q * GROUP
    if VARLEN_Q:
        if pid_m * BLOCK_M >= num_rows:
            return  # past a shorter sequence's queries
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_rows
    rows = offs_m // GROUP  # query token of each packed row
    heads = hk * GROUP + offs_m % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEADDIM
    q_mask = row_ok[:, None] & d_ok[None, :]

    q_rows = Q + b.to(tl.int64) * stride_qb + (q_first + rows).to(tl.int64) * stride_qs + heads * stride_qh
    if ROTARY_DIM > 0:
        # flash-attn: causal/local queries rotate at their own positions, others all at cache_seqlens[b].
        if ROTARY_PER_ROW:
            pos = cache_len + rows
        else:
            pos = cache_len + 0 * rows
        q = rotary_load(q_rows, pos, offs_d, q_mask, Cos, Sin, stride_ro, ROTARY_DIM, ROTARY_INTERLEAVED)
        q = q.to(Q.dtype.element_ty)
    else:
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)

    alibi_slope2 = 0.0
    if HAS_ALIBI:
        slopes = tl.load(Alibi + b * stride_ab + heads, mask=row_ok, other=0.0)
        alibi_slope2 = (slopes * 1.4426950408889634)[:, None]

    # Keys any row of this block may see, [lo, hi), and those every row sees, [first_full, last_full).
    pos_first = pid_m * BLOCK_M // GROUP + diag
    pos_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_rows) - 1) // GROUP + diag
    lo, hi, first_full, last_full = key_range(pos_first, pos_last, seqlen_k, window_left, window_right, BLOCK_N,
                                              HAS_LEFT, HAS_RIGHT)

    # This split's run of whole tiles.
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    split_lo = tl.minimum(lo + split * tiles_per_split * BLOCK_N, hi)
    split_hi = tl.minimum(split_lo + tiles_per_split * BLOCK_N, hi)
    full_lo = split_lo + tl.maximum(tl.cdiv(first_full - split_lo, BLOCK_N), 0) * BLOCK_N
    full_lo = tl.minimum(full_lo, split_hi)
    full_hi = full_lo + tl.maximum((tl.minimum(last_full, split_hi) - full_lo) // BLOCK_N, 0) * BLOCK_N

    cache_row = b
    if HAS_BATCH_IDX:
        cache_row = tl.load(CacheBatchIdx + b)
    bt_row = BlockTable + b.to(tl.int64) * stride_btb
    k_base = K + hk.to(tl.int64) * stride_kch
    v_base = V + hk.to(tl.int64) * stride_vch

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Paged, the masked loops run only where their range holds a tile: an empty pipelined loop still pays
    # its prologue, its drain and a page-table read on the program's critical path (+2.5% at 1k keys on an
    # H200). The contiguous kernel keeps them unconditional: with the branch it measured 2% slower at 1k.
    if (split_lo < full_lo) | (not PAGED):
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, bt_row, cache_row, key0, split_lo, full_lo, rows, seqlen_k, diag,
            qk_scale, softcap2, alibi_slope2, window_left, window_right,
            stride_kc0, stride_kc1, stride_vc0, stride_vc1, offs_d, d_ok,
            BLOCK_N, PAGED, PAGE_SIZE, True, BLOCK_D == HEADDIM, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
            PRECISION)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, bt_row, cache_row, key0, full_lo, full_hi, rows, seqlen_k, diag,
        qk_scale, softcap2, alibi_slope2, window_left, window_right,
        stride_kc0, stride_kc1, stride_vc0, stride_vc1, offs_d, d_ok,
        BLOCK_N, PAGED, PAGE_SIZE, False, BLOCK_D == HEADDIM, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
        PRECISION)
    if (full_hi < split_hi) | (not PAGED):
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, bt_row, cache_row, key0, full_hi, split_hi, rows, seqlen_k, diag,
            qk_scale, softcap2, alibi_slope2, window_left, window_right,
            stride_kc0, stride_kc1, stride_vc0, stride_vc1, offs_d, d_ok,
            BLOCK_N, PAGED, PAGE_SIZE, True, BLOCK_D == HEADDIM, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
            PRECISION)

    # A row that saw no allowed key (empty split, window) gives output 0 and lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = (Out + split.to(tl.int64) * stride_osplit + b.to(tl.int64) * stride_ob
              + (o_first + rows).to(tl.int64) * stride_os + heads * stride_oh)
    tl.store(o_ptrs[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    l_ptrs = (Lse + split.to(tl.int64) * stride_lsplit + b.to(tl.int64) * stride_lb + heads * stride_lh
              + (o_first + rows).to(tl.int64) * stride_ls)
    tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def paged_tile_list_kernel(CuSeqlensQ, TileList, batch, short_rows, num_m, capacity, TILE_M: tl.constexpr,
                           BLOCK_B: tl.constexpr):
    """The query tiles of packed variable-length queries that the Gluon paged forward runs (one program):
    TileList[0] = their count, then for each sequence of more than ``short_rows`` rows, in batch order, its
    query blocks of TILE_M rows (at most ``num_m``) as b x num_m + block, the last block (the most keys under a
    bottom-right causal mask) first. At most ``capacity`` tiles (the host's bound; only lengths past the
    packed rows would reach it)."""
    offs = tl.arange(0, BLOCK_B)
    ok = offs < batch
    first = tl.load(CuSeqlensQ + offs, mask=ok, other=0)
    rows = tl.load(CuSeqlensQ + offs + 1, mask=ok, other=0) - first
    blocks = tl.where(ok & (rows > short_rows), tl.minimum(tl.cdiv(rows, TILE_M), num_m), 0)
    end = tl.cumsum(blocks, 0)
    tl.store(TileList, tl.minimum(tl.sum(blocks, 0), capacity))
    for j in range(0, tl.max(blocks, 0)):
        tl.store(TileList + end - j, offs * num_m + j, mask=(j < blocks) & (end - j <= capacity))
