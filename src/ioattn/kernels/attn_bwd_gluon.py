"""FlashAttention backward for Hopper (sm_90) in Gluon: one pass, five products per tile.

FlashAttention-3's backward (Shah et al. 2024, arXiv 2407.08608, Sec. 3 and Alg. 3) without warp
specialisation. One program per (key block, batch x KV head) keeps K and V in shared memory and dK, dV in
registers (two warpgroups, 64 keys each). The Q and dO blocks of every query head of the GQA group stream
through a ``NUM_STAGES`` ring filled by the bulk tensor copy engine; per query block:

* S^T = K Q^T and dP^T = V dO^T (async wgmma, both operands in shared memory);
* P^T = exp2(S^T - lse) and dS^T = P^T (dP^T - delta) in registers (FA2 Alg. 2 lines 13-16);
* dV += P^T dO and dK += dS^T Q with the left operand straight from registers;
* dQ's share dS K: dS^T goes through shared memory (read back transposed by the wgmma); the product goes
  to shared memory too and one bulk tensor reduce-add per step adds it into an fp32 buffer (FA2 Alg. 2
  line 21, FA3's dQ accumulation), so the order of additions, and dQ's last bits, vary from run to run.
  ``deterministic=True`` never comes here.

Transposed tiles (keys x queries) let every product take its operands as the previous one left them.
Opt-in (``IOATTN_GLUON_BWD=1``): on an H200 it runs at 0.8-0.9x the portable two-pass backward, whose
seven products run at a higher rate than these five (d = 128 spills wgmma descriptors at 255 registers,
and the two warpgroups step in lockstep through three CTA barriers per query block; a software-pipelined
variant that issued the next block's S^T and dP^T under the dQ reduce spilled more and ran slower).
Varlen, causal and sliding windows (bottom-right), softcap, ALiBi and GQA are compile-time flags; rows of
a tile past a sequence read the next one's rows (or TMA's zero fill): their lse is +inf, so P = dS = 0;
such key rows of dK, dV are never written, and such query rows add exact zeros to dQ.
"""

from __future__ import annotations

import os

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..backend import interpreting
from .attn_bwd import _row_stats
from .attn_fwd_gluon import _GL_DTYPES, TensorDescriptor, _descriptor, _tma_describable
from .common import apply_softcap, bias_and_mask_t, q_block_range, seq_bounds


@gluon.jit
def _issue_qdo_load(q_desc, do_desc, q_smem, do_smem, bars, stage, row, q_col, do_col, pred):
    bar = bars.index(stage)
    mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(q_desc, [row, q_col], bar, q_smem.index(stage), pred=pred)
    tma.async_copy_global_to_shared(do_desc, [row, do_col], bar, do_smem.index(stage), pred=pred)


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Adds the shared-memory tile ``src`` into global memory at ``coord`` of ``tensor_desc``: one bulk
    tensor reduce-add (``cp.reduce.async.bulk.tensor``) done by the copy engine and L2; completion as a
    TMA store's (``tma.store_wait``). Triton 3.6 builds the op but Gluon exports no wrapper for it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _issue_scores(k_smem, v_smem, q_smem, do_smem, stage, zero):
    """S^T = K Q^T and dP^T = V dO^T of the query block in ``stage``, as two async wgmma groups."""
    st = warpgroup_mma(k_smem, q_smem.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
    dpt = warpgroup_mma(v_smem, do_smem.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
    return st, dpt


@gluon.jit
def _step_stats(Lse, Delta, alibi_slopes, b, h, q_start, rows, seqlen_q, stride_lb, stride_lh, stride_ab,
                HAS_ALIBI: gl.constexpr):
    """lse (log2 units, +inf for rows without keys or past the sequence), delta and ALiBi slope (log2
    units) of head h's query rows."""
    stats = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_start
    lse2, delta = _row_stats(Lse + stats, Delta + stats, rows, seqlen_q)
    alibi_slope2 = 0.0
    if HAS_ALIBI:
        alibi_slope2 = gl.load(alibi_slopes + b * stride_ab + h) * 1.4426950408889634
    return lse2, delta, alibi_slope2


@gluon.jit
def _step_origin(t, n_m, lo, q_row0, hk, group, stride_qh, stride_doh, BLOCK_M: gl.constexpr):
    """Step t of the flattened (group head, query block) loop: (head, query block start, TMA row, columns)."""
    h = hk * group + t // n_m
    start_m = lo + (t % n_m) * BLOCK_M
    return h, start_m, q_row0 + start_m, h * stride_qh, h * stride_doh


@gluon.jit
def attn_bwd_gluon_kernel(
    q_desc, k_desc, v_desc, do_desc, dq_desc, Lse, Delta, DK, DV, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_lb, stride_lh, stride_ab,
    stride_kh, stride_vh, stride_qh, stride_doh,
    nheads, nheads_k, group, max_seqlen_q, max_seqlen_k, dq_rows,
    softmax_scale, qk_scale, softcap2, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr,
    HAS_RIGHT: gl.constexpr, num_warps: gl.constexpr,
):
    """dK, dV of one key block, and its share of dQ added through ``dq_desc`` into an fp32 (z * dq_rows,
    HEAD_DIM) buffer (z = b * nheads + h dense, h varlen). Scores in log2 units: ``qk_scale`` and ``softcap2`` as the
    portable kernels take them (``Problem.log2_units``)."""
    dtype: gl.constexpr = q_desc.dtype
    # Keys x queries and keys x head dim: the warps split the keys (16 rows each). dQ (queries x head
    # dim) has 64 rows: each warpgroup takes half of the head dim.
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                        instr_shape=[16, HEAD_DIM // (num_warps // 4), 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    ds_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)

    start_n = gl.program_id(0) * BLOCK_N
    bhk = gl.program_id(1)
    b = bhk // nheads_k
    hk = bhk % nheads_k
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q,
                                                       max_seqlen_k, IS_VARLEN)
    if start_n >= seqlen_k:
        return
    if IS_VARLEN:
        q_row0 = q_start
        kv_row = k_start + start_n
    else:
        q_row0 = b * seqlen_q
        kv_row = b * seqlen_k + start_n
    diag = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = q_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                             BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    n_m = gl.cdiv(hi - lo, BLOCK_M)
    n_steps = group * n_m

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_smem_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], dq_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row, hk * stride_kh], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_row, hk * stride_vh], kv_bar, v_smem)
    for i in gl.static_range(NUM_STAGES):
        _, _, row, q_col, do_col = _step_origin(i, n_m, lo, q_row0, hk, group, stride_qh, stride_doh, BLOCK_M)
        _issue_qdo_load(q_desc, do_desc, q_smem, do_smem, bars, i, row, q_col, do_col, i < n_steps)

    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
    cols = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, st_layout))
    offs_m = gl.arange(0, BLOCK_M, gl.SliceLayout(0, st_layout))

    mbarrier.wait(kv_bar, 0)
    for t in range(n_steps):
        stage = t % NUM_STAGES
        h, start_m, _, _, _ = _step_origin(t, n_m, lo, q_row0, hk, group, stride_qh, stride_doh, BLOCK_M)
        rows = start_m + offs_m
        lse2, delta, alibi_slope2 = _step_stats(Lse, Delta, alibi_slopes, b, h, q_start, rows, seqlen_q,
                                                stride_lb, stride_lh, stride_ab, HAS_ALIBI)
        mbarrier.wait(bars.index(stage), (t // NUM_STAGES) & 1)
        st, dpt = _issue_scores(k_smem, v_smem, q_smem, do_smem, stage, st_zero)
        qkt = warpgroup_mma_wait(1, deps=(st,))
        st, tt = apply_softcap(qkt, qk_scale, softcap2, SOFTCAP)
        if (start_m < full_lo) | (start_m >= full_hi):
            st = bias_and_mask_t(st, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                                 HAS_ALIBI, True, HAS_LEFT, HAS_RIGHT)
        elif HAS_ALIBI:
            st = bias_and_mask_t(st, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                                 HAS_ALIBI, False, HAS_LEFT, HAS_RIGHT)
        pt = gl.exp2(st - lse2[None, :])
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do_smem.index(stage), dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt,))
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)  # d(softcap * tanh(x)) / dx, the softmax scale applied last
        dst16 = dst.to(dtype)
        dk = warpgroup_mma(gl.convert_layout(dst16, op_layout), q_smem.index(stage), dk, is_async=True)
        ds_smem.store(dst16)
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of dS^T are in place before either reads all of it
        dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
        dq, dk, dv = warpgroup_mma_wait(0, deps=(dq, dk, dv))
        # Every product of this step has read its Q, dO and dS^T: the stage and dS^T may be overwritten.
        gl.thread_barrier()
        nxt = t + NUM_STAGES
        _, _, row, q_col, do_col = _step_origin(nxt, n_m, lo, q_row0, hk, group, stride_qh, stride_doh,
                                                BLOCK_M)
        _issue_qdo_load(q_desc, do_desc, q_smem, do_smem, bars, stage, row, q_col, do_col, nxt < n_steps)

        # The previous step's reduce has read dq_smem long since; rows past the sequence add exact zeros
        # (P = dS = 0) to the next rows, or fall outside the buffer (dropped by the copy engine).
        tma.store_wait(0)
        dq_smem.store(dq * softmax_scale)
        fence_async_shared()
        gl.thread_barrier()
        z = h if IS_VARLEN else b * nheads + h
        _tma_reduce_add(dq_desc, [z * dq_rows + q_start + start_m, 0], dq_smem)

    tma.store_wait(0)
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(bars.index(i))

    # Coalesced 16-byte stores of dK, dV; key rows past the sequence are never written.
    TPW_D: gl.constexpr = HEAD_DIM // 8
    st_out: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPW_D, TPW_D],
                                            warps_per_cta=[num_warps, 1], order=[1, 0])
    out_n = gl.arange(0, BLOCK_N, gl.SliceLayout(1, st_out))
    out_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, st_out))
    row_ok = (start_n + out_n < seqlen_k)[:, None]
    n0 = (kv_row if IS_VARLEN else start_n) + out_n  # varlen: a row of the packed (total_k, ...) tensor
    b64 = b.to(gl.int64)
    hk64 = hk.to(gl.int64)
    dk_ptrs = DK + b64 * stride_dkb + hk64 * stride_dkh + n0.to(gl.int64)[:, None] * stride_dks + out_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + hk64 * stride_dvh + n0.to(gl.int64)[:, None] * stride_dvs + out_d[None, :]
    gl.store(dk_ptrs, gl.convert_layout((dk * softmax_scale).to(dtype), st_out), mask=row_ok)
    gl.store(dv_ptrs, gl.convert_layout(dv.to(dtype), st_out), mask=row_ok)


# (BLOCK_M, BLOCK_N, NUM_STAGES, num_warps) by head dim: 128 keys over two warpgroups, 64 queries a step.
_CONFIGS = {64: (64, 128, 2, 8), 128: (64, 128, 2, 8)}


def gluon_backward_supported(q, k, v, dout, *, dropout_p: float, alibi_slopes,
                             cu_seqlens_q: torch.Tensor | None = None) -> bool:
    """Whether ``gluon_backward`` computes this backward: opted in with ``IOATTN_GLUON_BWD=1`` (on an H200
    it runs at 0.8-0.9x the portable backward: benchmarks/NOTES.md, "Gluon backward v1"), and what the
    Gluon forward takes (dense or varlen, windows, softcap, ALiBi, GQA; not dropout), with a
    TMA-describable dO. ``IOATTN_GLUON=0`` turns every Gluon kernel off."""
    if os.environ.get("IOATTN_GLUON", "1").strip() == "0" or os.environ.get("IOATTN_GLUON_BWD", "0").strip() != "1":
        return False
    if interpreting() or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in _GL_DTYPES or any(t.dtype != q.dtype for t in (k, v, dout)):
        return False
    if q.dim() != (3 if cu_seqlens_q is not None else 4) or any(t.dim() != q.dim() for t in (k, v, dout)):
        return False
    if q.shape[-1] not in _CONFIGS or any(t.shape[-1] != q.shape[-1] for t in (k, v, dout)):
        return False
    if dropout_p != 0 or 0 in q.shape or 0 in k.shape:
        return False
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device):
        return False
    return all(_tma_describable(t) for t in (q, k, v, dout))


def dq_descriptor(dq_acc: torch.Tensor, block_m: int) -> TensorDescriptor:
    """The fp32 (z, rows, d) dQ buffer as (z * rows, d) rows for the bulk reduce-add of (block_m, d) tiles."""
    z, rows, d = dq_acc.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return TensorDescriptor(dq_acc, [z * rows, d], [d, 1], [block_m, d], layout)


def gluon_backward(dout, q, k, v, lse, delta, dk, dv, dq_acc, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                   *, batch: int, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, qk_scale: float,
                   softcap2: float, window_size: tuple[int, int], dq_rows: int,
                   config: tuple[int, int, int, int] | None = None) -> None:
    """Writes dk, dv (the inputs' layout) and adds dQ into ``dq_acc`` (contiguous fp32 (z, dq_rows, d),
    zeroed).
    ``lse``, ``delta``: float32 of the forward's lse shape. Call only where ``gluon_backward_supported``."""
    varlen = cu_seqlens_q is not None
    nheads, d = q.shape[-2:]
    nheads_k = k.shape[-2]
    block_m, block_n, stages, warps = config or _CONFIGS[d]
    grid = (triton.cdiv(max_seqlen_k, block_n), batch * nheads_k)
    if grid[0] * grid[1] == 0:
        return
    if varlen:
        dk_strides = (0, dk.stride(0), dk.stride(1))
        dv_strides = (0, dv.stride(0), dv.stride(1))
        lse_strides = (0, lse.stride(0))
    else:
        dk_strides = (dk.stride(0), dk.stride(1), dk.stride(2))
        dv_strides = (dv.stride(0), dv.stride(1), dv.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    slopes, stride_ab = lse, 0
    if alibi_slopes is not None:
        slopes = alibi_slopes.contiguous()
        stride_ab = slopes.stride(0) if slopes.dim() == 2 else 0
    left, right = window_size
    attn_bwd_gluon_kernel[grid](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(dout, block_m),
        dq_descriptor(dq_acc, block_m), lse, delta, dk, dv,
        cu_seqlens_q if varlen else lse, cu_seqlens_k if varlen else lse, slopes,
        *dk_strides, *dv_strides, *lse_strides, stride_ab,
        k.stride(-2), v.stride(-2), q.stride(-2), dout.stride(-2),
        nheads, nheads_k, nheads // nheads_k, max_seqlen_q, max_seqlen_k, dq_rows,
        softmax_scale, qk_scale, softcap2, left, right,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages, IS_VARLEN=varlen,
        SOFTCAP=softcap2 != 0.0, HAS_ALIBI=alibi_slopes is not None, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        num_warps=warps,
    )
