"""FlashAttention-2 forward (Dao 2023, Algorithm 1) for dense and varlen batches.

One program per (query block, batch x head): the Q tile stays on chip while the program walks the key
blocks that its rows can see, keeping a running max ``m``, running sum ``l`` and an unnormalised
accumulator rescaled by ``alpha`` each step and divided by ``l`` once at the end (Alg. 1 line 12).
Key blocks above the causal diagonal / outside the window are never visited; only blocks that cross a
mask boundary take the masked path. The N x N score matrix never reaches device memory.
"""

import triton
import triton.language as tl

from .common import (
    apply_softcap,
    bias_and_mask,
    dot,
    dropout_keep,
    grid_row,
    kv_block_range,
    online_softmax_step,
    philox_grid,
    seed_value,
    seq_bounds,
)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, lo, hi,
               rows, seqlen_k, diag, qk_scale, softcap2, alibi_slope2, window_left, window_right,
               seed, philox_base, philox_row_stride, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # K is read transposed (d, n) so q @ k needs no register transpose.
    kt_ptrs = k_base + lo.to(tl.int64) * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_base + lo.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        qk = dot(q, kt, DOT_PRECISION)
        # score_mod's steps, each called only when its flag is on (interpreter calls cost milliseconds).
        if SOFTCAP:
            s, _ = apply_softcap(qk, qk_scale, softcap2, SOFTCAP, DOT_PRECISION != "ieee")  # fast tanh: 16-bit
        else:
            s = qk * qk_scale
        if HAS_ALIBI or MASK:
            s = bias_and_mask(s, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                              HAS_ALIBI, MASK, HAS_LEFT, HAS_RIGHT)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        if DROPOUT:
            # l keeps the undropped sum: the lse is that of the scores before dropout.
            p = tl.where(dropout_keep(seed, philox_base, rows, cols, philox_row_stride, dropout_p), p, 0.0)
        if MASK:
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc += dot(p.to(v.dtype), v, DOT_PRECISION)
        kt_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab,
    nheads, group, max_seqlen_q, max_seqlen_k,
    qk_scale, softcap2, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BH_AXES: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if HAS_RIGHT:
        # Causal: the last query blocks see the most keys; launch them first (longest work first).
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    bh, b, h = grid_row(nheads, BH_AXES)
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q, max_seqlen_k,
                                                      IS_VARLEN)
    if start_m >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    hk = h // group
    # Batch, head and sequence offsets in int64: tensors over 2^31 elements stay addressable.
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + (q_start + start_m).to(tl.int64) * stride_qs
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    o_base = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + (q_start + start_m).to(tl.int64) * stride_os
    lse_base = Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + (q_start + start_m)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=tile_ok, other=0.0)

    alibi_slope2 = 0.0
    if HAS_ALIBI:
        alibi_slope2 = tl.load(alibi_slopes + b * stride_ab + h) * 1.4426950408889634
    philox_base, philox_stride = philox_grid(bh, max_seqlen_q, max_seqlen_k)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                              BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    args = (rows, seqlen_k, diag, qk_scale, softcap2, alibi_slope2, window_left, window_right,
            seed_value(seed, DROPOUT), philox_base, philox_stride, dropout_p)
    # Blocks crossing the left window edge, then the unmasked interior, then the diagonal/right edge.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, lo, full_lo, *args,
                               HEAD_DIM, BLOCK_N, BLOCK_D, True, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                               DROPOUT, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, full_lo, full_hi,
                               *args, HEAD_DIM, BLOCK_N, BLOCK_D, False, SOFTCAP, HAS_ALIBI, HAS_LEFT,
                               HAS_RIGHT, DROPOUT, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, full_hi, hi, *args,
                               HEAD_DIM, BLOCK_N, BLOCK_D, True, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                               DROPOUT, DOT_PRECISION)

    # Alg. 1 line 12-13: normalise once; a row with no allowed key has l = 0: output 0, lse -inf.
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=tile_ok)
    tl.store(lse_base + offs_m, lse, mask=row_ok)
