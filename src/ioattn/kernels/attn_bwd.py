"""FlashAttention-2 backward (Dao 2023, Algorithm 2) for dense and varlen batches.

* ``attn_bwd_preprocess_kernel``: ``delta_i = rowsum(dO_i * O_i)`` (Alg. 2 line 4, the ``D_i`` term).
* ``attn_bwd_dkdv_kernel``: one program per (key block, batch x kv head) keeps dK, dV on chip and walks
  the query blocks that see its keys, for every query head of its GQA group, so dK/dV are summed over
  the group without repeating K/V (Alg. 2 lines 11-20).
* ``attn_bwd_dq_kernel``: one program per (query block, batch x head) walks the key blocks like the
  forward and accumulates dQ in registers (Alg. 2 line 21 without the paper's atomics): no atomics
  anywhere, so every gradient is bitwise reproducible. FA2's fp32 dQ atomics (5 products per tile
  instead of 7) measured slower here on an H200 (benchmarks/NOTES.md, FA2 tuning v2).
P is recomputed from Q, K and the saved lse: ``P = exp2(S * log2(e) - lse * log2(e))``.

Softcap: both kernels recompute ``tanh`` of the scores. ``FAST_TANH=True`` (16-bit inputs only; ignored for
fp32) takes the forward's ``tanh.approx.f32``; the launcher passes it everywhere but in the non-causal dQ
kernel at head dims up to 64, because the ptxas bundled with Triton 3.6 (CUDA 12.8) scheduled that kernel's
(128, 64, 8, 2) row at d = 48 with a cp.async whose address register is rewritten before the read barrier
guarding it is waited on (an illegal address on an H200). ``scripts/compile_bwd.py --dq`` screens rows
offline for that (benchmarks/NOTES.md, Backward fast tanh).
"""

import triton
import triton.language as tl

from .common import (
    apply_softcap,
    bias_and_mask,
    bias_and_mask_t,
    dot,
    dropout_keep,
    dropout_keep_t,
    grid_row,
    kv_block_range,
    philox_grid,
    q_block_range,
    seed_value,
    seq_bounds,
)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def attn_bwd_preprocess_kernel(
    Out, DOut, Delta, cu_seqlens_q, DQ, Done,
    stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, stride_lb, stride_lh,
    stride_qb, stride_qs, stride_qh, nheads, max_seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
    ZERO_DQ: tl.constexpr = False, ZERO_DONE: tl.constexpr = False, BH_AXES: tl.constexpr = False,
):
    """delta = rowsum(O * dO) for BLOCK_M rows of one (batch, head); with ZERO_DQ, also zeroes the same rows
    of the fp32 dQ buffer ``DQ`` (strides ``stride_q*``), so the backward needs no separate fill. ZERO_DONE:
    the first row block of (batch, head) ``bh`` zeroes the int32 ``Done[bh]`` (the Gluon backward's counts
    of finished programs, ``dq_convert_kernel``)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh, b, h = grid_row(nheads, BH_AXES)
    if ZERO_DONE:
        if start_m == 0:
            tl.store(Done + bh, 0)
    q_start, seqlen_q, _, _ = seq_bounds(cu_seqlens_q, cu_seqlens_q, b, max_seqlen_q, 0, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row0 = (q_start + start_m).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = start_m + offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + row0 * stride_os
                + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + b64 * stride_db + h64 * stride_dh + row0 * stride_ds
                 + offs_m[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + row0 + offs_m, delta, mask=row_ok)
    if ZERO_DQ:
        tl.store(DQ + b64 * stride_qb + h64 * stride_qh + row0 * stride_qs + offs_m[:, None] * stride_qs
                 + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=mask)


@triton.jit
def _probs_and_dscores(q, do, kt, vt, lse2, delta, rows, cols, seqlen_k, diag, qk_scale, softcap2,
                       alibi_slope2, window_left, window_right, seed, philox_base, philox_row_stride,
                       dropout_p, MASK: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr):
    """Recomputes P (Alg. 2 line 13) and returns (dropped P for dV, dS w.r.t. the pre-softcap scaled
    scores) for one (query block, key block) tile; dS = P * (dP - delta) (Alg. 2 line 16)."""
    qk = dot(q, kt, DOT_PRECISION)
    if SOFTCAP:
        s, t = apply_softcap(qk, qk_scale, softcap2, SOFTCAP, FAST_TANH)
    else:
        s = qk * qk_scale
        t = s
    if HAS_ALIBI or MASK:
        s = bias_and_mask(s, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                          HAS_ALIBI, MASK, HAS_LEFT, HAS_RIGHT)
    p = tl.math.exp2(s - lse2[:, None])
    dp = dot(do, vt, DOT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, philox_base, rows, cols, philox_row_stride, dropout_p)
        scale = 1.0 / (1.0 - dropout_p)
        p_drop = tl.where(keep, p * scale, 0.0)
        dp = tl.where(keep, dp * scale, 0.0)
    else:
        p_drop = p
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        # d(softcap * tanh(x)) / dx = 1 - tanh^2 (times the softmax_scale applied by the caller).
        ds = ds * (1.0 - t * t)
    return p_drop, ds


@triton.jit
def _row_stats(lse_base, delta_base, rows, seqlen_q):
    row_ok = rows < seqlen_q
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    # A row with no allowed key has lse -inf; +inf makes its recomputed P exactly 0 instead of NaN.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                dq_desc, dq_base, dq_z, dq_row0, softmax_scale,
                lo, hi, cols, seqlen_q, seqlen_k, diag, qk_scale, softcap2,
                alibi_slope2, window_left, window_right, seed, philox_base, philox_row_stride, dropout_p,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                FUSED_DQ: tl.constexpr, DQ_TMA: tl.constexpr, FAST_TANH: tl.constexpr):
    # Works on transposed tiles (keys x queries): S^T = K Q^T, so P^T and dS^T feed dV += P^T dO and
    # dK += dS^T Q straight from registers, as in FA2's Alg. 2 lines 12-20 with the roles swapped.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qt_ptrs = q_base + lo.to(tl.int64) * stride_qs + offs_m[None, :] * stride_qs + offs_d[:, None]
    do_ptrs = do_base + lo.to(tl.int64) * stride_dos + offs_m[:, None] * stride_dos + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if MASK:
            row_ok = rows < seqlen_q
            qt = tl.load(qt_ptrs, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            qt = tl.load(qt_ptrs, mask=d_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
        lse2, delta = _row_stats(lse_base, delta_base, rows, seqlen_q)
        qkt = dot(k, qt, DOT_PRECISION)
        if SOFTCAP:
            st, tt = apply_softcap(qkt, qk_scale, softcap2, SOFTCAP, FAST_TANH)
        else:
            st = qkt * qk_scale
            tt = st
        if HAS_ALIBI or MASK:
            st = bias_and_mask_t(st, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                                 HAS_ALIBI, MASK, HAS_LEFT, HAS_RIGHT)
        pt = tl.math.exp2(st - lse2[None, :])
        dpt = dot(v, tl.trans(do), DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep_t(seed, philox_base, rows, cols, philox_row_stride, dropout_p)
            scale = 1.0 / (1.0 - dropout_p)
            pt_drop = tl.where(keep, pt * scale, 0.0)
            dpt = tl.where(keep, dpt * scale, 0.0)
        else:
            pt_drop = pt
        dv += dot(pt_drop.to(do.dtype), do, DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += dot(dst.to(qt.dtype), tl.trans(qt), DOT_PRECISION)
        if FUSED_DQ:
            # FA2's single pass (Alg. 2 line 21): this key block's share of dQ = dS K, summed over key
            # blocks in an fp32 buffer. On sm_90 one bulk tensor reduce-add (TMA) per tile; rows past a
            # varlen sequence carry exact zeros (P = 0, dO = 0), so they may land on the next sequence.
            dq_part = dot(tl.trans(dst).to(k.dtype), k, DOT_PRECISION) * softmax_scale
            if DQ_TMA:
                dq_desc.atomic_add([dq_z, dq_row0 + start_m, 0], dq_part.reshape(1, BLOCK_M, BLOCK_D))
            else:
                dq_ptrs = dq_base + (start_m + offs_m)[:, None] * BLOCK_D + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq_part, mask=(rows < seqlen_q)[:, None], sem="relaxed")
        qt_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQacc, dq_desc, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_ab,
    nheads, nheads_k, group, max_seqlen_q, max_seqlen_k, dq_rows,
    softmax_scale, qk_scale, softcap2, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_DQ: tl.constexpr = False, DQ_TMA: tl.constexpr = False, FAST_TANH: tl.constexpr = False,
    BH_AXES: tl.constexpr = False,
):
    """dK, dV for one key block; with FUSED_DQ also dQ's share, added into the fp32 buffer ``DQacc``
    of shape (z, rows, BLOCK_D) (z = b * nheads + h dense, h varlen; rows = seqlen_q dense, total_q
    varlen), through the tensor descriptor ``dq_desc`` when DQ_TMA."""
    start_n = tl.program_id(0) * BLOCK_N
    _, b, hk = grid_row(nheads_k, BH_AXES)
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q,
                                                       max_seqlen_k, IS_VARLEN)
    if start_n >= seqlen_k:
        return
    diag = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q0 = q_start.to(tl.int64)
    n0 = (k_start + start_n).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + n0 * stride_ks
    v_base = V + b64 * stride_vb + hk64 * stride_vh + n0 * stride_vs
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    FAST: tl.constexpr = FAST_TANH and DOT_PRECISION != "ieee"
    lo, full_lo, full_hi, hi = q_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                             BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    seed_v = seed_value(seed, DROPOUT)
    # The query heads of this kv head's group, summed in registers: no repeated K/V, no atomics.
    for g in range(group):
        h = hk * group + g
        h64 = h.to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qs
        do_base = DOut + b64 * stride_dob + h64 * stride_doh + q0 * stride_dos
        lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q0
        delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q0
        alibi_slope2 = 0.0
        if HAS_ALIBI:
            alibi_slope2 = tl.load(alibi_slopes + b * stride_ab + h) * LOG2E
        philox_base, philox_stride = philox_grid(b * nheads + h, max_seqlen_q, max_seqlen_k)
        args = (cols, seqlen_q, seqlen_k, diag, qk_scale, softcap2, alibi_slope2, window_left,
                window_right, seed_v, philox_base, philox_stride, dropout_p)
        dq_z = h if IS_VARLEN else b * nheads + h  # int32: descriptor offsets are 32-bit
        dq_base = DQacc + (dq_z.to(tl.int64) * dq_rows + q0) * BLOCK_D
        ptrs = (q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, dq_desc, dq_base, dq_z,
                q_start, softmax_scale)
        # fp32: each head's sums start from zero and are added after, so the products' FMA chains run over one
        # head's queries, as a GEMM per head would, not over the whole group's (a GQA group of 8 over 640
        # queries read up to 6x PyTorch's dK error). 16-bit inputs keep one chain: their error is P's rounding.
        HEAD_SUMS: tl.constexpr = DOT_PRECISION == "ieee"
        if HEAD_SUMS:
            dk_h = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv_h = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        else:
            dk_h, dv_h = dk, dv
        dk_h, dv_h = _dkdv_inner(dk_h, dv_h, k, v, *ptrs, lo, full_lo, *args, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                                 SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION, FUSED_DQ, DQ_TMA,
                                 FAST)
        dk_h, dv_h = _dkdv_inner(dk_h, dv_h, k, v, *ptrs, full_lo, full_hi, *args, HEAD_DIM, BLOCK_M, BLOCK_D,
                                 False, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION, FUSED_DQ,
                                 DQ_TMA, FAST)
        dk_h, dv_h = _dkdv_inner(dk_h, dv_h, k, v, *ptrs, full_hi, hi, *args, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                                 SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION, FUSED_DQ, DQ_TMA,
                                 FAST)
        if HEAD_SUMS:
            dk += dk_h
            dv += dv_h
        else:
            dk, dv = dk_h, dv_h
    dk = dk * softmax_scale
    dk_base = DK + b64 * stride_dkb + hk64 * stride_dkh + n0 * stride_dks
    dv_base = DV + b64 * stride_dvb + hk64 * stride_dvh + n0 * stride_dvs
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, lo, hi,
              rows, seqlen_k, diag, qk_scale, softcap2, alibi_slope2, window_left, window_right,
              seed, philox_base, philox_row_stride, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              FAST_TANH: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kt_ptrs = k_base + lo.to(tl.int64) * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]
    vt_ptrs = v_base + lo.to(tl.int64) * stride_vs + offs_n[None, :] * stride_vs + offs_d[:, None]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            mask = d_ok[:, None] & (cols[None, :] < seqlen_k)
        else:
            mask = d_ok[:, None]
        kt = tl.load(kt_ptrs, mask=mask, other=0.0)
        vt = tl.load(vt_ptrs, mask=mask, other=0.0)
        _, ds = _probs_and_dscores(q, do, kt, vt, lse2, delta, rows, cols, seqlen_k, diag, qk_scale,
                                   softcap2, alibi_slope2, window_left, window_right, seed, philox_base,
                                   philox_row_stride, dropout_p, MASK, SOFTCAP, HAS_ALIBI, HAS_LEFT,
                                   HAS_RIGHT, DROPOUT, DOT_PRECISION, FAST_TANH)
        dq += dot(ds.to(kt.dtype), tl.trans(kt), DOT_PRECISION)
        kt_ptrs += BLOCK_N * stride_ks
        vt_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, stride_ab,
    nheads, group, max_seqlen_q, max_seqlen_k,
    softmax_scale, qk_scale, softcap2, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FAST_TANH: tl.constexpr = False, BH_AXES: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if HAS_RIGHT:
        # Causal: the last query blocks see the most keys; launch them first (longest work first).
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    bh, b, h = grid_row(nheads, BH_AXES)
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q,
                                                       max_seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    hk = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m0 = (q_start + start_m).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    tile_ok = (rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + m0 * stride_qs
                + offs_m[:, None] * stride_qs + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DOut + b64 * stride_dob + h64 * stride_doh + m0 * stride_dos
                 + offs_m[:, None] * stride_dos + offs_d[None, :], mask=tile_ok, other=0.0)
    q0 = q_start.to(tl.int64)
    lse2, delta = _row_stats(Lse + b64 * stride_lb + h64 * stride_lh + q0,
                             Delta + b64 * stride_lb + h64 * stride_lh + q0, rows, seqlen_q)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    alibi_slope2 = 0.0
    if HAS_ALIBI:
        alibi_slope2 = tl.load(alibi_slopes + b * stride_ab + h) * LOG2E
    philox_base, philox_stride = philox_grid(bh, max_seqlen_q, max_seqlen_k)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    FAST: tl.constexpr = FAST_TANH and DOT_PRECISION != "ieee"
    lo, full_lo, full_hi, hi = kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                              BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    args = (rows, seqlen_k, diag, qk_scale, softcap2, alibi_slope2, window_left, window_right,
            seed_value(seed, DROPOUT), philox_base, philox_stride, dropout_p)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, lo, full_lo, *args,
                   HEAD_DIM, BLOCK_N, BLOCK_D, True, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT,
                   DOT_PRECISION, FAST)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, full_lo, full_hi, *args,
                   HEAD_DIM, BLOCK_N, BLOCK_D, False, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT,
                   DOT_PRECISION, FAST)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, full_hi, hi, *args,
                   HEAD_DIM, BLOCK_N, BLOCK_D, True, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT,
                   DOT_PRECISION, FAST)
    dq = dq * softmax_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + m0 * stride_dqs
             + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=tile_ok)
