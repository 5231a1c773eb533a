"""FlashAttention forward for Hopper (sm_90) in Gluon: TMA loads into a shared-memory ring, async wgmma.

FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608) structure without warp specialisation: one program
per (query block, batch x head) holds its Q tile in shared memory; K and V blocks stream through a
``NUM_STAGES`` ring filled by the bulk tensor copy engine, each stage with its own mbarrier for K and for
V, so S = Q K^T starts as soon as K lands while V is still in flight. A K stage is refilled right after
its QK^T completes, a V stage after its PV completes. S and O accumulate in registers through async
wgmma; P goes to the PV wgmma from registers (FA3 Sec. 3.1). The online softmax keeps the running max in
score units (raw q.k, or tanh(q.k / softcap) with softcap) and folds the factor to log2 logits into one
FMA before ``exp2``.

Every feature of the portable forward but dropout, each a compile-time flag: varlen batches
(cu_seqlens), causal and sliding windows aligned bottom-right (key blocks outside the band skipped, only
blocks crossing its edges masked: the portable kernel's ``kv_block_range``), softcap (``tanh.approx``),
ALiBi, GQA. Dense inputs (batch, seqlen, nheads, d) and varlen inputs (total, nheads, d) with unit
d-stride are described as 2D (rows, columns) views: head h starts at column ``h * stride_h``. Rows past
a sequence read the next sequence's rows (or TMA's zero fill at the end); those keys are masked to -inf
and those query rows are never stored (masked register stores).
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..backend import interpreting
from .common import allowed, seq_bounds, tanh

LOG2E = 1.4426950408889634


@gluon.jit
def _issue_kv_load(desc, smem, bars, stage, row, col, pred):
    mbarrier.expect(bars.index(stage), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col], bars.index(stage), smem.index(stage), pred=pred)


@gluon.jit
def _kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
    """``common.kv_block_range`` line for line: (lo, full_lo, full_hi, hi), where [full_lo, full_hi) holds
    the fully allowed key blocks and blocks outside [lo, hi) are skipped. (The shared helper builds its
    zero with ``tl.full``, which Gluon cannot lay out.)"""
    diag = seqlen_k - seqlen_q
    lo = seqlen_k * 0
    hi = seqlen_k
    first_full = seqlen_k * 0
    last_full = seqlen_k
    if HAS_LEFT:
        lo = gl.maximum(start_m + diag - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        first_full = start_m + BLOCK_M - 1 + diag - window_left
    if HAS_RIGHT:
        hi = gl.minimum(start_m + BLOCK_M + diag + window_right, seqlen_k)
        last_full = gl.minimum(start_m + diag + window_right + 1, seqlen_k)
    hi = gl.maximum(hi, lo)
    full_lo = lo + gl.maximum(gl.cdiv(first_full - lo, BLOCK_N), 0) * BLOCK_N
    full_lo = gl.minimum(full_lo, hi)
    full_hi = full_lo + gl.maximum((last_full - full_lo) // BLOCK_N, 0) * BLOCK_N
    return lo, full_lo, full_hi, hi


@gluon.jit
def _softmax_block(s, m_i, l_i, start_n, full_lo, full_hi, rows, offs_n, seqlen_k, diag, score_scale,
                   tanh_scale, alibi_slope, window_left, window_right, SOFTCAP: gl.constexpr,
                   HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                   FAST_TANH: gl.constexpr):
    """Score mods and the online softmax step (FA2 Alg. 1 lines 9-10) for the key block at start_n.

    Scores stay in "units" u whose log2-logit is ``u * score_scale``: raw q.k without softcap, tanh(q.k *
    tanh_scale) with it; the running max is kept in u so one FMA per element feeds ``exp2``. ALiBi's slope
    comes in u units too. Only blocks outside [full_lo, full_hi) are masked (bounds, window, causal); a row
    with no key yet keeps m = -inf and p = 0. Returns (p, alpha, m, l)."""
    cols = start_n + offs_n
    if SOFTCAP:
        s = tanh(s * tanh_scale, FAST_TANH)
    if HAS_ALIBI:
        # -slope * |i + diag - j| in fp32 (exact below 2^24): an add with |.| and an FMA per element,
        # where the integer form would add a conversion (quarter-rate) per element.
        pos = (rows + diag).to(gl.float32)
        s = s - alibi_slope * gl.abs(pos[:, None] - cols.to(gl.float32)[None, :])
    if (start_n < full_lo) | (start_n >= full_hi):
        ok = allowed(rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = gl.where(ok, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new * score_scale)
    p = gl.exp2(s * score_scale - m_scaled[:, None])
    alpha = gl.exp2(m_i * score_scale - m_scaled)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def attn_fwd_gluon_kernel(
    q_desc, k_desc, v_desc, Out, Lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab, stride_qh, stride_kh, stride_vh,
    nheads, group, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr,
    HAS_RIGHT: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr,
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
    bh = gl.program_id(1)
    b = bh // nheads
    h = bh % nheads
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
    lo, full_lo, full_hi, hi = _kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                               BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
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

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    rows = start_m + gl.arange(0, BLOCK_M, row_s)
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    mods = (rows, offs_n, seqlen_k, diag, score_scale, tanh_scale, alibi_slope, window_left, window_right)

    mbarrier.wait(q_bar, 0)
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
                                                SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, FAST_TANH)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                acc = warpgroup_mma_wait(1, deps=(acc,))  # PV of block j-1 done; QK^T j+1 may still run
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                mbarrier.wait(v_bars.index(stage), (j // NUM_STAGES) & 1)
                acc_tok = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
                s, acc = warpgroup_mma_wait(1, deps=(s_tok, acc_tok))  # QK^T j+1 done; PV j in flight
                # K of block j+1 and V of block j-1 are consumed: refill their stages.
                k_next = j + 1 + NUM_STAGES
                _issue_kv_load(k_desc, k_smem, k_bars, nstage, kv_row + k_next * BLOCK_N, k_col,
                               k_next < n_blocks)
                _issue_kv_load(v_desc, v_smem, v_bars, (j + NUM_STAGES - 1) % NUM_STAGES,
                               kv_row + (k_next - 2) * BLOCK_N, v_col, (j > 0) & (k_next - 2 < n_blocks))
            last = n_blocks - 1
            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, lo + last * BLOCK_N, full_lo, full_hi, *mods,
                                                SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, FAST_TANH)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            mbarrier.wait(v_bars.index(last % NUM_STAGES), (last // NUM_STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last % NUM_STAGES), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
    else:
        for j in range(n_blocks):
            stage = j % NUM_STAGES
            phase = (j // NUM_STAGES) & 1
            mbarrier.wait(k_bars.index(stage), phase)
            s_tok = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            # Waits for this QK^T and for the previous block's PV (older in the wgmma queue).
            s, acc = warpgroup_mma_wait(0, deps=(s_tok, acc))
            # K stage `stage` and the previous block's V stage are free again: refill them.
            nxt = j + NUM_STAGES
            _issue_kv_load(k_desc, k_smem, k_bars, stage, kv_row + nxt * BLOCK_N, k_col, nxt < n_blocks)
            prev_stage = (j + NUM_STAGES - 1) % NUM_STAGES
            _issue_kv_load(v_desc, v_smem, v_bars, prev_stage, kv_row + (nxt - 1) * BLOCK_N, v_col,
                           (j > 0) & (nxt - 1 < n_blocks))

            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, lo + j * BLOCK_N, full_lo, full_hi, *mods,
                                                SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, FAST_TANH)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)

            mbarrier.wait(v_bars.index(stage), phase)
            acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))
        acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    # FA2 Alg. 1 line 12: normalise once; a row with no allowed key has l = 0: output 0, lse -inf.
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i * score_scale + gl.log2(l_safe)) * 0.6931471805599453)
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]

    # Coalesced 16-byte stores: each thread writes 8 consecutive elements of a row. Rows past the
    # sequence (the next sequence's rows, for varlen) are never written.
    TPW_D: gl.constexpr = HEAD_DIM // 8
    st_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPW_D, TPW_D],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
    out = gl.convert_layout(out.to(dtype), st_layout)
    st_rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, st_layout))
    st_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, st_layout))
    o_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    o_ptrs = o_base + (q_start + st_rows).to(gl.int64)[:, None] * stride_os + st_d[None, :]
    gl.store(o_ptrs, out, mask=st_rows[:, None] < seqlen_q)
    lse_base = Lse + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_start
    gl.store(lse_base + rows, lse, mask=rows < seqlen_q)


# (BLOCK_M, BLOCK_N, NUM_STAGES, num_warps) by head dim: one warpgroup on 64 query rows, so two (d=128:
# 82 KB, 140 registers) or three (d=64: 74 KB, 154 registers) programs share an SM and one's softmax runs
# under another's wgmma. Measured on an H200 against v1's 128-row tiles of two warpgroups (one program per
# SM): d=128 +1 to +17%, d=64 1.14-1.26x the portable kernel where v1 lost 0.86-0.93x (benchmarks/NOTES.md,
# "Gluon forward v2").
_CONFIGS = {64: (64, 128, 2, 4), 128: (64, 64, 2, 4)}
# The overlapped loop measured slower than waiting for QK^T before the softmax on an H200 with both tile
# shapes (v1's two warpgroups: 3-14%; one warpgroup: 20-25%; benchmarks/NOTES.md): off, kept to tune.
OVERLAP = False
# Head dims routed here by the predicate.
_ROUTED_HEAD_DIMS = (64, 128)
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _tma_describable(t: torch.Tensor) -> bool:
    """The 2D (rows, columns) view needs unit d-stride, 16-byte aligned base and row stride, and, for
    dense (batch, seqlen, nheads, d) inputs, batches laid end to end along the sequence (or one batch).
    Varlen (total, nheads, d) inputs are one run of rows already."""
    elem = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(-3) * elem) % 16 == 0
    if t.dim() == 4:
        batch, seqlen = t.shape[:2]
        ok = ok and (batch == 1 or t.stride(0) == seqlen * t.stride(1))
    return ok


def gluon_forward_supported(q, k, v, *, window_size: tuple[int, int], softcap: float, alibi_slopes,
                            dropout_p: float, softmax_scale: float | None = None,
                            cu_seqlens_q: torch.Tensor | None = None) -> bool:
    """Whether ``gluon_forward`` computes this forward: dense (b, s, h, d) or varlen (total, h, d) with
    cu_seqlens, any window / causal, softcap, ALiBi, GQA; not dropout. ``IOATTN_GLUON=0`` turns it off."""
    if os.environ.get("IOATTN_GLUON", "1").strip() == "0" or interpreting():
        return False
    if not (q.is_cuda and k.is_cuda and v.is_cuda) or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in _GL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.dim() != (3 if cu_seqlens_q is not None else 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return False
    if q.shape[-1] not in _ROUTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return False
    if dropout_p != 0:
        return False
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device):
        return False
    # Without softcap the running max is kept in raw q.k units: it needs a positive scale.
    if softcap == 0 and softmax_scale is not None and not softmax_scale > 0:
        return False
    if len(window_size) != 2:
        return False
    if 0 in q.shape or 0 in k.shape:
        return False
    return all(_tma_describable(t) for t in (q, k, v))


def _descriptor(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """(batch * seqlen or total, columns) view: head h starts at column h * stride_h."""
    nheads, d = t.shape[-2:]
    rows = t.shape[0] * t.shape[1] if t.dim() == 4 else t.shape[0]
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, d], _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, [rows, (nheads - 1) * t.stride(-2) + d], [t.stride(-3), 1], [block_rows, d],
                            layout)


def gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                  window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0, *,
                  overlap: bool = OVERLAP, config: tuple[int, int, int, int] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense q (b, sq, h, d), k/v (b, sk, h_k, d) -> (out contiguous like q, lse float32 (b, h, sq)); varlen
    q (total_q, h, d), k/v (total_k, h_k, d) with int32 cu_seqlens -> (out, lse float32 (h, total_q)).
    ``window_size`` is resolved (causal = (left, 0)). Call only where ``gluon_forward_supported`` is True.
    ``config`` overrides (BLOCK_M, BLOCK_N, stages, warps) of ``_CONFIGS``."""
    varlen = cu_seqlens_q is not None
    nheads, d = q.shape[-2:]
    nheads_k = k.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        lse = torch.empty((nheads, q.shape[0]), dtype=torch.float32, device=q.device)
        stride_ob, stride_os, stride_oh = 0, out.stride(0), out.stride(1)
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        batch, max_seqlen_q, max_seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        lse = torch.empty((batch, nheads, max_seqlen_q), dtype=torch.float32, device=q.device)
        stride_ob, stride_os, stride_oh = out.stride(0), out.stride(1), out.stride(2)
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    block_m, block_n, stages, warps = config or _CONFIGS[d]
    grid = (triton.cdiv(max_seqlen_q, block_m), batch * nheads)
    if grid[0] * grid[1] == 0:
        return out, lse
    if softcap > 0:
        score_scale, tanh_scale = softcap * LOG2E, softmax_scale / softcap
    else:
        score_scale, tanh_scale = softmax_scale * LOG2E, 1.0
    slopes, stride_ab = q, 0
    if alibi_slopes is not None:
        slopes = alibi_slopes.contiguous()  # (nheads,) or (batch, nheads) float32
        stride_ab = slopes.stride(0) if slopes.dim() == 2 else 0
    left, right = window_size
    attn_fwd_gluon_kernel[grid](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), out, lse,
        cu_seqlens_q if varlen else lse, cu_seqlens_k if varlen else lse, slopes,
        stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab,
        q.stride(-2), k.stride(-2), v.stride(-2),
        nheads, nheads // nheads_k, max_seqlen_q, max_seqlen_k, score_scale, tanh_scale, left, right,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages, IS_VARLEN=varlen,
        SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        OVERLAP=overlap, num_warps=warps,
    )
    return out, lse
