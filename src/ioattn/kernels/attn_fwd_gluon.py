"""FlashAttention forward for Hopper (sm_90) in Gluon: TMA loads into a shared-memory ring, async wgmma.

FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608) structure without warp specialisation: one program
per (query block, batch x head) holds its Q tile in shared memory; K and V blocks stream through a
``NUM_STAGES`` ring filled by the bulk tensor copy engine, each stage with its own mbarrier for K and for
V, so S = Q K^T starts as soon as K lands while V is still in flight. A K stage is refilled right after
its QK^T completes, a V stage after its PV completes. S and O accumulate in registers through async
wgmma; P goes to the PV wgmma from registers (FA3 Sec. 3.1). The online softmax keeps the running max in
raw score units and folds ``softmax_scale * log2(e)`` into one FMA before ``exp2``.

Inputs (batch, seqlen, nheads, d) with unit d-stride are described as 2D (batch * seqlen, columns)
views: head h starts at column ``h * stride_h``. Rows past a sequence read the next batch's rows (or
TMA's zero fill at the end); those keys are masked to -inf and those query rows are never stored.
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

LOG2E = 1.4426950408889634


@gluon.jit
def _issue_kv_load(desc, smem, bars, stage, row, col, pred):
    mbarrier.expect(bars.index(stage), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col], bars.index(stage), smem.index(stage), pred=pred)


@gluon.jit
def _softmax_block(s, m_i, l_i, j, rows, offs_n, start_m, seqlen_k, diag, qk_scale,
                   BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Masks key block j where it crosses seqlen_k or the causal diagonal, then the online softmax step
    (FA2 Alg. 1 lines 9-10) in log2 units; a row with no key yet keeps m = -inf and p = 0.
    Returns (p, alpha, m, l)."""
    start_n = j * BLOCK_N
    needs_mask = start_n + BLOCK_N > seqlen_k
    if CAUSAL:
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > start_m + diag)
    if needs_mask:
        cols = start_n + offs_n
        ok = cols[None, :] < seqlen_k
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + diag)
        s = gl.where(ok, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new * qk_scale)
    p = gl.exp2(s * qk_scale - m_scaled[:, None])
    alpha = gl.exp2(m_i * qk_scale - m_scaled)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def attn_fwd_gluon_kernel(
    q_desc, k_desc, v_desc, Out, Lse,
    stride_ob, stride_os, stride_oh, stride_qh, stride_kh, stride_vh,
    nheads, group, seqlen_q, seqlen_k, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    # wgmma accumulators: every warp owns 16 rows (two warpgroups of 64 rows at 8 warps).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m  # longest rows first
    bh = gl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // group
    start_m = pid_m * BLOCK_M
    diag = seqlen_k - seqlen_q  # bottom-right alignment: row i sees keys j <= i + diag
    if CAUSAL:
        hi = gl.minimum(gl.maximum(start_m + BLOCK_M + diag, 0), seqlen_k)
    else:
        hi = seqlen_k
    n_blocks = gl.cdiv(hi, BLOCK_N)
    kv_row = b * seqlen_k
    k_col = hk * stride_kh
    v_col = hk * stride_vh

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
    tma.async_copy_global_to_shared(q_desc, [b * seqlen_q + start_m, h * stride_qh], q_bar, q_smem)
    for i in gl.static_range(NUM_STAGES):
        _issue_kv_load(k_desc, k_smem, k_bars, i, kv_row + i * BLOCK_N, k_col, i < n_blocks)
        _issue_kv_load(v_desc, v_smem, v_bars, i, kv_row + i * BLOCK_N, v_col, i < n_blocks)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    rows = start_m + gl.arange(0, BLOCK_M, row_s)
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))

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
                p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, j, rows, offs_n, start_m, seqlen_k, diag,
                                                    qk_scale, BLOCK_N, CAUSAL)
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
            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, last, rows, offs_n, start_m, seqlen_k, diag,
                                                qk_scale, BLOCK_N, CAUSAL)
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

            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, j, rows, offs_n, start_m, seqlen_k, diag, qk_scale,
                                                BLOCK_N, CAUSAL)
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
    lse = gl.where(empty, float("-inf"), (m_i * qk_scale + gl.log2(l_safe)) * 0.6931471805599453)
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]

    # Coalesced 16-byte stores: each thread writes 8 consecutive elements of a row.
    TPW_D: gl.constexpr = HEAD_DIM // 8
    st_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPW_D, TPW_D],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
    out = gl.convert_layout(out.to(dtype), st_layout)
    st_rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, st_layout))
    st_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, st_layout))
    o_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    o_ptrs = o_base + st_rows.to(gl.int64)[:, None] * stride_os + st_d[None, :]
    gl.store(o_ptrs, out, mask=st_rows[:, None] < seqlen_q)
    gl.store(Lse + bh.to(gl.int64) * seqlen_q + rows, lse, mask=rows < seqlen_q)


# (BLOCK_M, BLOCK_N, NUM_STAGES, num_warps) by head dim: Q + 2 x NUM_STAGES K/V tiles fit in 227 KB.
_CONFIGS = {64: (128, 128, 3, 8), 128: (128, 128, 2, 8)}
# The overlapped loop (254 registers at d=128) measured 3-14% slower than waiting for QK^T before the
# softmax on an H200 (benchmarks/NOTES.md, "Gluon forward (sm90)"): off by default, kept to tune.
OVERLAP = False
# Head dims routed here by the predicate: at d=64 the portable kernel measured ~10% faster.
_ROUTED_HEAD_DIMS = (128,)
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _tma_describable(t: torch.Tensor) -> bool:
    """The 2D (batch * seqlen, columns) view needs unit d-stride, 16-byte aligned base and row stride,
    and batches laid end to end along the sequence (or a single batch)."""
    batch, seqlen, _, _ = t.shape
    elem = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(1) * elem) % 16 == 0
            and (batch == 1 or t.stride(0) == seqlen * t.stride(1)))


def gluon_forward_supported(q, k, v, *, causal: bool, window_size: tuple[int, int], softcap: float,
                            alibi_slopes, dropout_p: float, softmax_scale: float | None = None) -> bool:
    """Whether ``gluon_forward`` computes this dense forward. ``IOATTN_GLUON=0`` turns it off."""
    if os.environ.get("IOATTN_GLUON", "1").strip() == "0" or interpreting():
        return False
    if not (q.is_cuda and k.is_cuda and v.is_cuda) or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in _GL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.dim() != 4 or q.shape[-1] not in _ROUTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return False
    if softcap != 0 or alibi_slopes is not None or dropout_p != 0:
        return False
    if tuple(window_size) != ((-1, 0) if causal else (-1, -1)):
        return False
    if softmax_scale is not None and not softmax_scale > 0:  # the running max is kept in raw units
        return False
    if 0 in q.shape or 0 in k.shape:
        return False
    return all(_tma_describable(t) for t in (q, k, v))


def _descriptor(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    batch, seqlen, nheads, d = t.shape
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, d], _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, [batch * seqlen, (nheads - 1) * t.stride(2) + d], [t.stride(1), 1],
                            [block_rows, d], layout)


def gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                  causal: bool, overlap: bool = OVERLAP) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, sq, h, d), k/v (b, sk, h_k, d) -> (out contiguous like q, lse float32 (b, h, sq)).
    Call only where ``gluon_forward_supported`` is True (or, for d=64, where it would be but for speed)."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    block_m, block_n, stages, warps = _CONFIGS[d]
    grid = (triton.cdiv(seqlen_q, block_m), batch * nheads)
    attn_fwd_gluon_kernel[grid](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), out, lse,
        out.stride(0), out.stride(1), out.stride(2), q.stride(2), k.stride(2), v.stride(2),
        nheads, nheads // nheads_k, seqlen_q, seqlen_k, softmax_scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages, CAUSAL=causal, OVERLAP=overlap,
        num_warps=warps,
    )
    return out, lse
