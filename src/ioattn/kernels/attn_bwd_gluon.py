"""FlashAttention backward for Hopper (sm_90) in Gluon: one pass, five products per tile.

FlashAttention-3's backward (Shah et al. 2024, arXiv 2407.08608, Sec. 3 and Alg. 3), warp-specialised.
One program per (key block of 128, batch x KV head) keeps K and V in shared memory. Its partitions:

* two consumer warpgroups (240 registers each), each with 64 of the keys and their dK, dV in registers;
* a load warp that streams the Q and dO blocks of every query head of the GQA group through a
  ``NUM_STAGES`` ring with the bulk tensor copy engine;
* a dQ warp that adds each step's dQ share into an fp32 buffer with bulk tensor reduce-adds (FA2 Alg. 2
  line 21, FA3's dQ accumulation), so the order of additions, and dQ's last bits, vary from run to run;
  with ``deterministic=True`` the key blocks take turns on each query block, in a fixed order
  (``_ws_dq_writer``), and dQ is bitwise reproducible.

Per query block a consumer computes S^T = K Q^T and dP^T = V dO^T (async wgmma from shared memory),
P^T = exp2(S^T - lse) and dS^T = P^T (dP^T - delta) in registers (FA2 Alg. 2 lines 13-16), dV += P^T dO
and dK += dS^T Q with the left operand straight from registers, and half of the head dim of dQ's share
dS K from dS^T in shared memory (both consumers' halves: they meet there once per step, on an mbarrier).
Transposed tiles (keys x queries) let every product take its operands as the previous one left them.
Ring stages, dS^T and dQ buffers are handed over by mbarriers; no CTA-wide barrier runs in the loop.
The load warp also brings each step's lse and delta rows (and ALiBi's row and key terms) into shared memory,
so the consumers hold none of them across their waits. On an H200 it runs at 1.1-1.5x the portable backward
at d = 64 and 128 (routed there by default). At d = 256 ``attn_bwd_gluon_wide_kernel`` takes its place: the
two consumers share 64 keys and split dK, dV along the head dim (see there; 1.6-1.9x the portable backward).
benchmarks/NOTES.md, "Gluon backward v2" and "v3", has the measurements and the variants that lost.
Dense inputs without a window (not deterministic) can run the key blocks of the last, partial wave as
pieces over their query steps, so every SM has work to the end (``tail_split``; the pieces' dK, dV are
summed by ``tail_sum_kernel``); shipped at d = 128 without softcap.
Varlen, causal and sliding windows (bottom-right), softcap, ALiBi, GQA, dropout (the forward's mask drawn
again, ``_keep_t``) and the deterministic dQ order are compile-time flags; rows of
a tile past a sequence read the next one's rows (or TMA's zero fill): their lse is +inf, so P = dS = 0;
such key rows of dK, dV are never written, and such query rows add exact zeros to dQ.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
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
from triton.language.extra.cuda import gdc_wait

from ..dropout import kernel_seed
from .attn_bwd import _row_stats
from .attn_fwd_gluon import (
    _GL_DTYPES,
    _descriptor,
    _num_sms,
    _tma_describable,
    dropout_keep_wgmma,
    gluon_enabled_on,
)
from .common import (
    apply_softcap,
    bh_grid,
    bias_and_mask_t,
    grid_row,
    grid_rows,
    launch_order,
    order_section,
    philox_rows,
    q_block_range,
    seq_bounds,
)
from .fastlaunch import Launcher, TmaDesc, cdiv


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
def _alibi_slope2(alibi_slopes, b, h, stride_ab):
    """Head h's ALiBi slope in log2 units (slopes (nheads,) with stride_ab = 0, or (batch, nheads))."""
    return gl.load(alibi_slopes + b * stride_ab + h) * 1.4426950408889634


@gluon.jit
def _put_step_stats(Lse, Delta, alibi_slopes, stats_smem, stats_full, stage, b, h, q_start, start_m, start_n,
                    seqlen_q, seqlen_k, stride_lb, stride_lh, stride_ab, HALF_N: gl.constexpr,
                    HAS_ALIBI: gl.constexpr):
    """The load warp's share of a step: head h's query block at start_m, into the ring's stats slot (read by
    the consumers from shared memory just where they need them, so neither holds them in registers across
    the step's waits). Rows: lse (log2 units, +inf for rows without keys or past the sequence), delta.

    With ALiBi, per consumer warpgroup (keys n0 .. n0 + HALF_N - 1) its lse row and a key row: off the diagonal,
    -slope |p - j| (p = i + diag) = s (j - n0) - s (p - n0) with s = +slope if the block's keys sit at or
    below the query positions and -slope if above; the query term goes into the warpgroup's lse and the key
    term s (j - n0), which the consumer adds to the scores (the blocks that cross the diagonal are masked
    and take the rest there). Offsets from n0 keep both terms as small as the bias, so they cancel as
    exactly as |p - j| would. Rows then: lse of warpgroup 0, of warpgroup 1, delta, key row 0, key row 1."""
    BLOCK_M: gl.constexpr = stats_smem.type.shape[1]
    ROWS: gl.constexpr = stats_smem.type.shape[0] // stats_full.type.shape[0]
    layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    stats = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_start
    offs = gl.arange(0, BLOCK_M, layout)
    lse2, delta = _row_stats(Lse + stats, Delta + stats, start_m + offs, seqlen_q)
    if HAS_ALIBI:
        slope2 = _alibi_slope2(alibi_slopes, b, h, stride_ab)
        pos0 = start_m + seqlen_k - seqlen_q
        for wg in gl.static_range(2):
            n0 = start_n + wg * HALF_N
            s = gl.where(n0 > pos0, -slope2, slope2)
            stats_smem.index(ROWS * stage + wg).store(lse2 + s * (offs + (pos0 - n0)).to(gl.float32))
            stats_smem.index(ROWS * stage + 3 + wg).store(s * offs.to(gl.float32))
        stats_smem.index(ROWS * stage + 2).store(delta)
    else:
        stats_smem.index(ROWS * stage).store(lse2)
        stats_smem.index(ROWS * stage + 1).store(delta)
    mbarrier.arrive(stats_full.index(stage))  # lowered after a barrier of the warp: every row is written


@gluon.jit
def _step_origin(t, n_m, lo, q_row0, hk, group, stride_qh, stride_doh, BLOCK_M: gl.constexpr):
    """Step t of the flattened (group head, query block) loop: (head, query block start, TMA row, columns)."""
    h = hk * group + t // n_m
    start_m = lo + (t % n_m) * BLOCK_M
    return h, start_m, q_row0 + start_m, h * stride_qh, h * stride_doh


@gluon.jit
def _ws_loader(q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, stats_smem, kv_bar, qdo_full,
               qdo_empty, stats_full, Lse, Delta, alibi_slopes, stride_lb, stride_lh, stride_ab, b, q_start,
               seqlen_q, seqlen_k, start_n, kv_row, hk, q_row0, lo, n_m, n_steps, group, stride_kh, stride_vh,
               stride_qh, stride_doh, t0, HAS_ALIBI: gl.constexpr, TAIL: gl.constexpr):
    """The load warp: K and V of the key block once, then Q and dO of every step into the ring (and the
    step's lse and delta rows beside them), a stage refilled as soon as both consumers have released it.
    TAIL: the program's steps are t0, t0 + 1, ... of its key block (a piece of it)."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    NUM_STAGES: gl.constexpr = q_smem.type.shape[0]
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row, hk * stride_kh], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_row, hk * stride_vh], kv_bar, v_smem)
    for t in range(n_steps):
        stage = t % NUM_STAGES
        # A fresh mbarrier counts as having completed the phase before phase 0: the first pass is free.
        mbarrier.wait(qdo_empty.index(stage), ((t // NUM_STAGES) & 1) ^ 1)
        h, start_m, row, q_col, do_col = _step_origin(t + t0 if TAIL else t, n_m, lo, q_row0, hk, group, stride_qh,
                                                      stride_doh, BLOCK_M)
        _issue_qdo_load(q_desc, do_desc, q_smem, do_smem, qdo_full, stage, row, q_col, do_col, True)
        _put_step_stats(Lse, Delta, alibi_slopes, stats_smem, stats_full, stage, b, h, q_start, start_m, start_n,
                        seqlen_q, seqlen_k, stride_lb, stride_lh, stride_ab, k_smem.type.shape[0] // 2, HAS_ALIBI)


@gluon.jit
def _count_wait(lock, target):
    """Spins until the count at ``lock`` reaches ``target`` (an acquire read each turn)."""
    count = gl.atomic_add(lock, 0, sem="acquire", scope="gpu")
    while count < target:
        count = gl.atomic_add(lock, 0, sem="acquire", scope="gpu")


@gluon.jit
def _warp_asm(ASM: gl.constexpr):
    """In a one-warp partition: PTX ``ASM`` in every lane (it ends by moving its input, 0, to its output) and
    0 reduced over the lanes, for an address that must not be formed before every lane has run it."""
    lanes = gl.arange(0, 32, gl.BlockedLayout([1], [32], [1], [0]))
    done = gl.inline_asm_elementwise(ASM, "=r,r", [lanes * 0], dtype=gl.int32, is_pure=False, pack=1)
    return gl.max(done, axis=0)


@gluon.jit
def _async_proxy_fence():
    """In a one-warp partition: ``fence.proxy.async.global`` in every lane, ordering the generic-proxy accesses
    before it (an acquire of a count) before the async-proxy ones after it (bulk reduce-adds); returns 0, to
    add into the address of what must follow it."""
    return _warp_asm("fence.proxy.async.global;\n\tmov.u32 $0, $1;")


@gluon.jit
def _count_arrive(lock):
    gl.atomic_add(lock, 1, sem="release", scope="gpu")


@gluon.jit
def _bulk_writes_done(PROXY_FENCE: gl.constexpr = False):
    """In a one-warp partition: waits until the warp's bulk copies have written global memory
    (``tma.store_wait`` waits only until they have read shared memory) and returns 0, for an address that
    must not be formed before. Each lane waits for its own copies; the reduction over the lanes makes the
    one that issued them finish waiting before any lane goes on. ``PROXY_FENCE``: then orders those writes
    (async proxy) before the lane's later generic-proxy accesses (``fence.proxy.async.global``), for a
    release that plain loads elsewhere acquire."""
    if PROXY_FENCE:
        done = _warp_asm("cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;\n\tmov.u32 $0, $1;")
    else:
        done = _warp_asm("cp.async.bulk.wait_group 0;\n\tmov.u32 $0, $1;")
    return done


@gluon.jit
def _launch_dependents(NUM_WARPS: gl.constexpr):
    """``griddepcontrol.launch_dependents``: the launch after this one (programmatic dependent launch) may start
    once every program has run this or exited; a no-op for launches without that attribute."""
    lanes = gl.arange(0, 32 * NUM_WARPS, gl.BlockedLayout([1], [32], [NUM_WARPS], [0]))
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents;\n\tmov.u32 $0, $1;", "=r,r", [lanes * 0],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _ws_dq_writer(dq_desc, dq_smem, dq_smem_hi, dq_full, dq_free, dq_lock, pid_n, last_n, reach, b, hk, nheads,
                  q_row0, lo, n_m, n_steps, group, n_mblocks, t0, done_ptr, weight, BLOCK_N: gl.constexpr,
                  HAS_RIGHT: gl.constexpr, DETERMINISTIC: gl.constexpr, TAIL: gl.constexpr, WIDE: gl.constexpr,
                  SIGNAL: gl.constexpr):
    """The dQ warp: once both consumers have put their half of a step's dQ share in shared memory, adds it
    into the fp32 buffer (the queries' layout, viewed as (rows, nheads * d)) with bulk tensor reduce-adds,
    waits for them to read the tile and frees it.

    ``DETERMINISTIC``: the key blocks of a sequence add into each query block in a fixed order, the last one
    first (the order in which causal key blocks reach a query block; FA3's semaphores run the other way).
    ``dq_lock`` counts, per (batch, head, query block), the key blocks done with it; this one (``pid_n``)
    adds once the count equals the number of later key blocks that receive that query block, then counts
    itself. Those are all up to ``last_n``, or with a right window bound only the first ``cdiv(start_m +
    BLOCK_M + reach, BLOCK_N)`` key blocks (``q_block_range``'s lo, inverted; ``reach`` = seqlen_k -
    seqlen_q + window_right). A program waits only on later key blocks, which the launch order runs first:
    never on a program not yet resident."""
    BLOCK_M: gl.constexpr = dq_smem.type.shape[1]
    HALF_D: gl.constexpr = dq_smem.type.shape[2]
    # WIDE: step t's two tiles are dq_smem[t % stages] and dq_smem_hi[t % stages] (the wide kernel's Q and dO
    # rings); else dq_smem[2 (t % DQ_STAGES)] and the next
    DQ_STAGES: gl.constexpr = dq_smem.type.shape[0] if WIDE else dq_smem.type.shape[0] // 2
    for t in range(n_steps):
        buf = t % DQ_STAGES
        if DETERMINISTIC:
            lock = dq_lock + (b * nheads + hk * group + t // n_m) * n_mblocks + lo // BLOCK_M + t % n_m
            later = last_n - pid_n
            if HAS_RIGHT:
                later = gl.minimum(gl.cdiv(lo + (t % n_m + 1) * BLOCK_M + reach, BLOCK_N) - 1, last_n) - pid_n
            _count_wait(lock, later)
            # the earlier key blocks' reduce-adds (async proxy) were released through a generic atomic
            q_row0 += _async_proxy_fence()
        mbarrier.wait(dq_full.index(buf), (t // DQ_STAGES) & 1)
        u = t + t0 if TAIL else t  # the step of the key block (TAIL: this piece's steps start at t0)
        col = (hk * group + u // n_m) * (2 * HALF_D)
        row = q_row0 + lo + (u % n_m) * BLOCK_M
        if WIDE:
            _tma_reduce_add(dq_desc, [row, col], dq_smem.index(buf))
            _tma_reduce_add(dq_desc, [row, col + HALF_D], dq_smem_hi.index(buf))
        else:
            _tma_reduce_add(dq_desc, [row, col], dq_smem.index(2 * buf))
            _tma_reduce_add(dq_desc, [row, col + HALF_D], dq_smem.index(2 * buf + 1))
        if DETERMINISTIC:
            # the next key block may add once these additions are in memory, not merely issued (and ordered
            # before the release's generic proxy)
            _count_arrive(lock + _bulk_writes_done(True))
        else:
            tma.store_wait(0)
        mbarrier.arrive(dq_free.index(buf))
    if SIGNAL:
        # the program's dQ shares are in memory: count it for dq_convert_kernel (``weight``: see the kernel)
        gl.atomic_add(done_ptr + _bulk_writes_done(True), weight, sem="release", scope="gpu")


@gluon.jit
def _keep_t(seed, bh, start_m, key_lo, max_seqlen_q, max_seqlen_k, dropout_p, st_layout: gl.constexpr,
            qk_layout: gl.constexpr, BLOCK_M: gl.constexpr, HALF_N: gl.constexpr):
    """The forward's dropout keep mask of queries [start_m, + BLOCK_M) and keys [key_lo, + HALF_N) in plane
    ``bh``, transposed into the S^T layout: drawn where each thread's Philox calls serve only its own
    elements (``qk_layout``: an mma accumulator layout of queries x keys, ``dropout_keep_wgmma``), then
    moved."""
    rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, qk_layout))
    cols = key_lo + gl.arange(0, HALF_N, gl.SliceLayout(0, qk_layout))
    keep = dropout_keep_wgmma(gl.load(seed), philox_rows(bh, rows, max_seqlen_q, max_seqlen_k), cols, dropout_p)
    return gl.convert_layout(gl.permute(keep.to(gl.int8), [1, 0]), st_layout) != 0


@gluon.jit
def _alibi_key_term(stats_smem, slot, WG: gl.constexpr, HALF_N: gl.constexpr, st_layout: gl.constexpr):
    """The consumer's ALiBi key row of the step in ``slot`` (``_put_step_stats``), one value per key of S^T."""
    return stats_smem.index(slot + 3 + WG).slice(0, HALF_N).load(gl.SliceLayout(1, st_layout))


@gluon.jit
def _ws_step(t, h, start_m, masked, dk, dv, st_zero, dq_zero, k_mine, v_mine, k_dq, q_smem, do_smem, ds_smem,
             dq_smem, stats_smem, qdo_full, qdo_empty, stats_full, ds_ready, ds_free, dq_full, dq_free,
             alibi_slopes, stride_ab, b, seqlen_q, seqlen_k, cols, key_lo, dead_below, dead_above, reach_left,
             reach_right, softmax_scale,
             qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q, max_seqlen_k, dropout_p,
             WG: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr,
             HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, EARLY_MASK: gl.constexpr):
    """Step t (query block start_m of head h) of one consumer warpgroup: its five products. ``masked``: the
    block crosses the band's edges or the sequence's end (with ALiBi, also the diagonal). (Two copies of the
    step, masked and not, spilled more at 240 registers than this branch around the masking alone; so did
    issuing the next step's S^T before waiting for this step's last products: benchmarks/NOTES.md, "Gluon
    backward v2".)"""
    NUM_STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HALF_N: gl.constexpr = k_mine.type.shape[0]
    DQ_STAGES: gl.constexpr = dq_smem.type.shape[0] // 2
    dtype: gl.constexpr = q_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    qk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HALF_N, 16])  # dropout's draw
    stage = t % NUM_STAGES
    row_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
    ROWS: gl.constexpr = stats_smem.type.shape[0] // NUM_STAGES  # the stats slot's rows: _put_step_stats
    slot = ROWS * stage
    # With a band (causal, windows), a half whose keys no query of the step may see (right of the right
    # edge, left of the left one, past the sequence) adds nothing to dK, dV or dS^T: it skips S^T, dP^T, dV
    # and the softmax, so the other half's run on the whole tensor cores, and gives zeros to dK's product and
    # the dQ product. (An async product cannot leave a branch: dV is waited for inside, dK issued after.)
    diag = seqlen_k - seqlen_q
    BAND: gl.constexpr = HAS_LEFT or HAS_RIGHT
    dead = masked & ((start_m < dead_below) | (start_m > dead_above))
    if BAND and dead:
        mbarrier.wait(qdo_full.index(stage), (t // NUM_STAGES) & 1)
        dst16 = gl.zeros([HALF_N, BLOCK_M], dtype, st_layout)
    else:
        mbarrier.wait(qdo_full.index(stage), (t // NUM_STAGES) & 1)
        st_acc, dpt = _issue_scores(k_mine, v_mine, q_smem, do_smem, stage, st_zero)
        if DROPOUT and EARLY_MASK:
            # the forward's mask, drawn while the tensor cores compute S^T and dP^T
            keep = _keep_t(seed, b * nheads + h, start_m, key_lo, max_seqlen_q, max_seqlen_k, dropout_p, st_layout,
                           qk_layout, BLOCK_M, HALF_N)
        mbarrier.wait(stats_full.index(stage), (t // NUM_STAGES) & 1)
        qkt = warpgroup_mma_wait(1, deps=(st_acc,))
        if SOFTCAP:
            st, tt = apply_softcap(qkt, qk_scale, softcap2, SOFTCAP, True)  # 16-bit inputs: tanh.approx
            if HAS_ALIBI:
                st = st + _alibi_key_term(stats_smem, slot, WG, HALF_N, st_layout)[:, None]
        elif HAS_ALIBI:
            key_term = _alibi_key_term(stats_smem, slot, WG, HALF_N, st_layout)
            st = gl.fma(qkt, qk_scale, gl.broadcast(key_term[:, None], qkt)[0])
        else:
            st = qkt * qk_scale  # (one FMA with lse measured 1-2% slower: benchmarks/NOTES.md, Gluon backward v3)
        if masked:
            rows = start_m + gl.arange(0, BLOCK_M, row_layout)
            if HAS_ALIBI:
                # pairs on the other side of the diagonal from the block's first key: -2 slope |p - j| back
                slope2 = _alibi_slope2(alibi_slopes, b, h, stride_ab)
                jp = (cols[:, None] - (rows + diag)[None, :]).to(gl.float32)
                side = gl.where(key_lo > start_m + diag, -1.0, 1.0)
                st = st - (2.0 * slope2) * gl.maximum(side * jp, 0.0)
            if HAS_ALIBI:
                st = bias_and_mask_t(st, rows, cols, seqlen_k, diag, 0.0, window_left, window_right, False, True,
                                     HAS_LEFT, HAS_RIGHT)
            else:
                # bias_and_mask_t's mask with the edges as two offsets of key - query (``reach``)
                ok = cols[:, None] < seqlen_k
                if HAS_LEFT:
                    ok = ok & (cols[:, None] - rows[None, :] >= reach_left)
                if HAS_RIGHT:
                    ok = ok & (cols[:, None] - rows[None, :] <= reach_right)
                st = gl.where(ok, st, float("-inf"))
        pt = gl.exp2(st - stats_smem.index(slot + WG * HAS_ALIBI).load(row_layout)[None, :])
        pd = pt
        if SOFTCAP:
            # P times d(softcap * tanh(x)) / dx (the softmax scale applied last), formed before dP^T's wait so
            # one tile, not P and tanh, stays live across it
            pd = pt * (1.0 - tt * tt)
        if DROPOUT:
            if not EARLY_MASK:
                # the forward's mask, drawn while the tensor cores compute dP^T
                keep = _keep_t(seed, b * nheads + h, start_m, key_lo, max_seqlen_q, max_seqlen_k, dropout_p,
                               st_layout, qk_layout, BLOCK_M, HALF_N)
            # dV takes the dropped, rescaled P^T, and dP^T passes the same mask (FA2 Alg. 4)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv = warpgroup_mma(gl.convert_layout(gl.where(keep, pt * inv_keep, 0.0).to(dtype), op_layout),
                               do_smem.index(stage), dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=(dpt,))
            dpt = gl.where(keep, dpt * inv_keep, 0.0)
        else:
            dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do_smem.index(stage), dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=(dpt,))
        dst = pd * (dpt - stats_smem.index(slot + 1 + HAS_ALIBI).load(row_layout)[None, :])
        dst16 = dst.to(dtype)
        if BAND:
            dv = warpgroup_mma_wait(0, deps=(dv,))
    dk = warpgroup_mma(gl.convert_layout(dst16, op_layout), q_smem.index(stage), dk, is_async=True)

    # dS^T of this step into its buffer (free once both consumers' dQ products of step t - 2 are done),
    # then wait for the other consumer's half.
    buf = t % 2
    mbarrier.wait(ds_free.index(buf), ((t // 2) & 1) ^ 1)
    ds_smem.index(buf).slice(WG * HALF_N, HALF_N).store(dst16)
    fence_async_shared()
    mbarrier.arrive(ds_ready.index(buf))  # lowered after a barrier of this warpgroup: every part is written
    mbarrier.wait(ds_ready.index(buf), (t // 2) & 1)
    dq = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_dq, dq_zero, use_acc=False, is_async=True)
    dq, dk, dv = warpgroup_mma_wait(0, deps=(dq, dk, dv))
    # Every product of this step has read its Q, dO and dS^T.
    mbarrier.arrive(qdo_empty.index(stage))
    mbarrier.arrive(ds_free.index(buf))

    qbuf = t % DQ_STAGES
    mbarrier.wait(dq_free.index(qbuf), ((t // DQ_STAGES) & 1) ^ 1)
    dq_smem.index(2 * qbuf + WG).store(dq * softmax_scale)
    fence_async_shared()
    mbarrier.arrive(dq_full.index(qbuf))
    return dk, dv


@gluon.jit
def _step_masked(start_m, full_lo, full_hi, key_lo, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, HALF_N: gl.constexpr,
                 HAS_ALIBI: gl.constexpr):
    """Whether the step at query block ``start_m`` takes the masked path: outside the key block's full
    blocks [full_lo, full_hi) (``q_block_range``), or with ALiBi across the diagonal from this half's keys
    (whose |p - j| the masked path takes as it comes)."""
    masked = (start_m < full_lo) | (start_m >= full_hi)
    if HAS_ALIBI:
        pos = start_m + seqlen_k - seqlen_q
        masked = masked | ((key_lo + HALF_N - 1 > pos) & (key_lo < pos + BLOCK_M - 1))
    return masked


@gluon.jit
def _ws_consumer(k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, stats_smem, kv_bar, qdo_full, qdo_empty,
                 stats_full, ds_ready, ds_free, dq_full, dq_free, DK, DV, alibi_slopes,
                 stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                 stride_ab, b, hk, seqlen_q, seqlen_k, kv_row, start_n, lo, full_lo, full_hi, n_m,
                 n_steps, group, softmax_scale, qk_scale, softcap2, window_left, window_right, seed, nheads,
                 max_seqlen_q, max_seqlen_k, dropout_p, t0, piece, Parts, WG: gl.constexpr, IS_VARLEN: gl.constexpr,
                 SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                 DROPOUT: gl.constexpr, EARLY_MASK: gl.constexpr, KV_REGS: gl.constexpr, TAIL: gl.constexpr,
                 NESTED: gl.constexpr):
    """One consumer warpgroup: keys [WG * 64, WG * 64 + 64) of the block, dK and dV of them in registers,
    and columns [WG * d / 2, (WG + 1) * d / 2) of each step's dQ share (which needs both halves of dS^T:
    the consumers meet on an mbarrier once per step, and on nothing else). Per head of the GQA group the
    query blocks run in the loader's order. TAIL: steps t0, t0 + 1, ... of the key block; a piece of a split
    key block (``piece`` >= 0) puts dK (scaled) and dV in fp32 into its slot of ``Parts`` for
    ``tail_sum_kernel``."""
    NUM_WARPS: gl.constexpr = 4
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    HALF_N: gl.constexpr = k_smem.type.shape[0] // 2
    HALF_D: gl.constexpr = HEAD_DIM // 2
    dtype: gl.constexpr = q_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])

    k_mine = k_smem.slice(WG * HALF_N, HALF_N)
    v_mine = v_smem.slice(WG * HALF_N, HALF_N)
    k_dq = k_smem.slice(WG * HALF_D, HALF_D, dim=1)
    dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, kv_layout)
    key_lo = start_n + WG * HALF_N
    cols = key_lo + gl.arange(0, HALF_N, gl.SliceLayout(1, st_layout))
    # the step starts below dead_below or above dead_above whose queries none of this half's keys pairs with
    # (the right edge, the sequence's end; the left edge): two thresholds live in the step loop, not four
    BIG: gl.constexpr = 1 << 30
    diag = seqlen_k - seqlen_q
    dead_below = key_lo - (BLOCK_M - 1) - diag - window_right if HAS_RIGHT else key_lo * 0 - BIG
    dead_above = key_lo + HALF_N - 1 - diag + window_left if HAS_LEFT else key_lo * 0 + BIG
    if key_lo >= seqlen_k:
        dead_below = key_lo * 0 + BIG
    reach_left = diag - window_left  # a pair (query i, key j) is in the band when
    reach_right = diag + window_right  # reach_left <= j - i <= reach_right
    st_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, st_layout)
    dq_zero = gl.zeros([BLOCK_M, HALF_D], gl.float32,
                       gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                 instr_shape=[16, HALF_D, 16]))
    common = (k_mine, v_mine, k_dq, q_smem, do_smem, ds_smem, dq_smem, stats_smem, qdo_full, qdo_empty,
              stats_full, ds_ready, ds_free, dq_full, dq_free, alibi_slopes, stride_ab, b, seqlen_q, seqlen_k, cols,
              key_lo, dead_below, dead_above, reach_left, reach_right,
              softmax_scale, qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q,
              max_seqlen_k, dropout_p)

    mbarrier.wait(kv_bar, 0)
    # KV_REGS & 1 (& 2): S^T's (dP^T's) left operand, K (V), from registers; the product then reads only
    # Q^T (dO^T) from shared memory
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=st_layout, k_width=2)
    if KV_REGS & 1:
        common = (k_mine.load(a_layout), ) + common[1:]
    if KV_REGS & 2:
        common = common[:1] + (v_mine.load(a_layout), ) + common[2:]
    if not NESTED:
        for t in range(n_steps):
            u = t + t0 if TAIL else t  # the step of the key block
            start_m = lo + (u % n_m) * BLOCK_M
            masked = _step_masked(start_m, full_lo, full_hi, key_lo, seqlen_q, seqlen_k, BLOCK_M, HALF_N, HAS_ALIBI)
            dk, dv = _ws_step(t, hk * group + u // n_m, start_m, masked, dk, dv, st_zero, dq_zero, *common, WG,
                              SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, EARLY_MASK)
    else:
        # The steps as heads of the group, then query blocks: no division by n_m in the step, whose divisor
        # the flat loop kept live (the d = 64 band build reloaded 16 spilled values a step, 10 so)
        for g in range(group):
            h = hk * group + g
            for j in range(n_m):
                start_m = lo + j * BLOCK_M
                masked = _step_masked(start_m, full_lo, full_hi, key_lo, seqlen_q, seqlen_k, BLOCK_M, HALF_N,
                                      HAS_ALIBI)
                dk, dv = _ws_step(g * n_m + j, h, start_m, masked, dk, dv, st_zero, dq_zero, *common, WG, SOFTCAP,
                                  HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT, EARLY_MASK)

    # Coalesced 16-byte stores of this warpgroup's dK, dV rows; key rows past the sequence are never written.
    TPW_D: gl.constexpr = HEAD_DIM // 8
    st_out: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPW_D, TPW_D],
                                            warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    out_n = start_n + WG * HALF_N + gl.arange(0, HALF_N, gl.SliceLayout(1, st_out))
    out_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, st_out))
    row_ok = (out_n < seqlen_k)[:, None]
    n0 = (kv_row - start_n if IS_VARLEN else 0) + out_n  # varlen: a row of the packed (total_k, ...) tensor
    b64 = b.to(gl.int64)
    hk64 = hk.to(gl.int64)
    dk_ptrs = DK + b64 * stride_dkb + hk64 * stride_dkh + n0.to(gl.int64)[:, None] * stride_dks + out_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + hk64 * stride_dvh + n0.to(gl.int64)[:, None] * stride_dvs + out_d[None, :]
    if TAIL:
        if piece >= 0:
            # a piece of a split key block: fp32 partial sums into its slot (n_pieces, 2, BLOCK_N, d) of
            # Parts, every row (the sum masks them)
            local = WG * HALF_N + gl.arange(0, HALF_N, gl.SliceLayout(1, st_out))
            part = Parts + piece.to(gl.int64) * (4 * HALF_N * HEAD_DIM) + local[:, None] * HEAD_DIM + out_d[None, :]
            gl.store(part, gl.convert_layout(dk * softmax_scale, st_out))
            gl.store(part + 2 * HALF_N * HEAD_DIM, gl.convert_layout(dv, st_out))
        else:
            gl.store(dk_ptrs, gl.convert_layout((dk * softmax_scale).to(dtype), st_out), mask=row_ok)
            gl.store(dv_ptrs, gl.convert_layout(dv.to(dtype), st_out), mask=row_ok)
    else:
        gl.store(dk_ptrs, gl.convert_layout((dk * softmax_scale).to(dtype), st_out), mask=row_ok)
        gl.store(dv_ptrs, gl.convert_layout(dv.to(dtype), st_out), mask=row_ok)


@gluon.jit
def _key_block(pid_n, bhk, cu_seqlens_q, cu_seqlens_k, nheads_k, max_seqlen_q, max_seqlen_k,
               BLOCK_N: gl.constexpr, IS_VARLEN: gl.constexpr):
    """Where a backward program's key block pid_n of (batch x KV head) bhk lies: (start_n, b, hk, q_start,
    seqlen_q, seqlen_k, q_row0, kv_row), q_row0 / kv_row the sequence's first query row and the block's first
    key row in the 2D views. start_n >= seqlen_k: a block past its sequence's keys (the caller returns before
    it computes the block's query range)."""
    start_n = pid_n * BLOCK_N
    b = bhk // nheads_k
    hk = bhk % nheads_k
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q,
                                                       max_seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        q_row0 = q_start
        kv_row = k_start + start_n
    else:
        q_row0 = b * seqlen_q
        kv_row = b * seqlen_k + start_n
    return start_n, b, hk, q_start, seqlen_q, seqlen_k, q_row0, kv_row


@gluon.jit(do_not_specialize=["section"])
def attn_bwd_gluon_kernel(
    q_desc, k_desc, v_desc, do_desc, dq_desc, Lse, Delta, DK, DV, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    dq_lock, Parts, dq_done, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_lb,
    stride_lh, stride_ab, stride_kh, stride_vh, stride_qh, stride_doh,
    nheads, nheads_k, group, max_seqlen_q, max_seqlen_k, n_mblocks,
    softmax_scale, qk_scale, softcap2, window_left, window_right, section, seed, dropout_p, n_whole, split,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    DQ_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr,
    HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr,
    EARLY_MASK: gl.constexpr, DETERMINISTIC: gl.constexpr, KV_REGS: gl.constexpr, TAIL: gl.constexpr,
    NESTED: gl.constexpr, SIGNAL: gl.constexpr,
    num_warps: gl.constexpr, BH_AXES: gl.constexpr = False,
):
    """dK, dV of one key block, and its share of dQ added through ``dq_desc`` into an fp32 buffer in the
    queries' (contiguous) layout, viewed as (batch * seqlen_q dense or total_q varlen, nheads * HEAD_DIM).
    Two consumer warpgroups (the default partition and a 4-warp worker, 240 registers each) hold dK, dV of
    64 keys each; one load warp fills the Q/dO ring; one dQ warp issues the bulk reduce-adds of dQ's
    shares. The consumers never issue TMA or wait for a reduce, and meet each other once per step (dS^T's
    halves). Scores in log2 units: ``qk_scale`` and ``softcap2`` as the portable kernels take them
    (``Problem.log2_units``).

    TAIL (dense, no window, not deterministic; a 1D grid): programs [0, n_whole) run key blocks whole, in
    the 2D grid's order (key blocks fastest); each later key block runs as ``split`` programs, pieces of its
    (head, query block) steps in order, whose dK, dV go to ``Parts`` in fp32 (``tail_sum_kernel`` adds them
    into DK, DV): the last wave's key blocks spread over every SM. NESTED (a band, no TAIL): the consumers
    walk the steps as the group's heads, then query blocks, in two loops (the loader and the dQ warp keep one
    loop over the same steps). SIGNAL: every program lets the next launch start (programmatic dependent
    launch) and, once its dQ shares are in memory, adds its weight to ``dq_done[b * nheads_k + hk]``: 1, or
    ``split`` for a whole key block under TAIL, so that each (batch, KV head) sums to its key blocks times
    ``split`` (``dq_convert_kernel`` waits for that)."""
    dtype: gl.constexpr = q_desc.dtype
    if SIGNAL:
        _launch_dependents(num_warps)
    if TAIL:
        n_kb = gl.cdiv(max_seqlen_k, BLOCK_N)
        tile = gl.program_id(0)
        piece = tile * 0 - 1
        if tile >= n_whole:
            piece = tile - n_whole
            tile = n_whole + piece // split
        pid_n = tile % n_kb
        bhk = tile // n_kb
    else:
        pid_n = gl.program_id(0)
        bhk = grid_row(nheads_k, BH_AXES)[0]
        piece = 0
    if HAS_RIGHT or DETERMINISTIC:
        # Causal: the first key blocks receive the most queries; launch them first (longest work first).
        # Deterministic: the last key block of a row first, as the dQ warp's order needs (_ws_dq_writer).
        pid_n, bhk = launch_order(pid_n, bhk, gl.num_programs(0), grid_rows(BH_AXES), section, DETERMINISTIC)
    start_n, b, hk, q_start, seqlen_q, seqlen_k, q_row0, kv_row = _key_block(
        pid_n, bhk, cu_seqlens_q, cu_seqlens_k, nheads_k, max_seqlen_q, max_seqlen_k, BLOCK_N, IS_VARLEN)
    done_ptr = dq_done + (b * nheads_k + hk)
    weight = split * 0 + 1
    if TAIL:
        if piece < 0:
            weight = split
    if start_n >= seqlen_k:
        if SIGNAL:
            gl.atomic_add(done_ptr, weight, sem="release", scope="gpu")
        return
    lo, full_lo, full_hi, hi = q_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                             BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    n_m = gl.cdiv(hi - lo, BLOCK_M)
    n_steps = group * n_m
    t0 = 0
    if TAIL:
        if piece >= 0:
            # piece p of the key block: steps [p * n_steps // split, (p + 1) * n_steps // split)
            part = piece % split
            t0 = part * n_steps // split
            n_steps = (part + 1) * n_steps // split - t0

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
    dq_smem = gl.allocate_shared_memory(gl.float32, [2 * DQ_STAGES, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)
    gl.static_assert(not HAS_ALIBI or BLOCK_N <= 2 * BLOCK_M, "ALiBi's key rows are BLOCK_M long")
    stats_smem = gl.allocate_shared_memory(gl.float32, [(5 if HAS_ALIBI else 2) * NUM_STAGES, BLOCK_M],
                                           gl.SwizzledSharedLayout(1, 1, 1, [0]))
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qdo_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    stats_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    dq_free = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(qdo_full.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)
        mbarrier.init(stats_full.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)
        mbarrier.init(ds_free.index(i), count=2)
    for i in gl.static_range(DQ_STAGES):
        mbarrier.init(dq_full.index(i), count=2)
        mbarrier.init(dq_free.index(i), count=1)
    fence_async_shared()

    gl.warp_specialize([
        (_ws_consumer, (k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, stats_smem, kv_bar, qdo_full,
                        qdo_empty, stats_full, ds_ready, ds_free, dq_full, dq_free, DK, DV, alibi_slopes,
                        stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_ab, b, hk,
                        seqlen_q, seqlen_k, kv_row, start_n, lo, full_lo, full_hi, n_m, n_steps, group,
                        softmax_scale, qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q,
                        max_seqlen_k, dropout_p, t0, piece, Parts, 0, IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT,
                        HAS_RIGHT, DROPOUT, EARLY_MASK, KV_REGS, TAIL, NESTED)),
        (_ws_consumer, (k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, stats_smem, kv_bar, qdo_full,
                        qdo_empty, stats_full, ds_ready, ds_free, dq_full, dq_free, DK, DV, alibi_slopes,
                        stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_ab, b, hk,
                        seqlen_q, seqlen_k, kv_row, start_n, lo, full_lo, full_hi, n_m, n_steps, group,
                        softmax_scale, qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q,
                        max_seqlen_k, dropout_p, t0, piece, Parts, 1, IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT,
                        HAS_RIGHT, DROPOUT, EARLY_MASK, KV_REGS, TAIL, NESTED)),
        (_ws_loader, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, stats_smem, kv_bar,
                      qdo_full, qdo_empty, stats_full, Lse, Delta, alibi_slopes, stride_lb, stride_lh, stride_ab,
                      b, q_start, seqlen_q, seqlen_k, start_n, kv_row, hk, q_row0, lo, n_m, n_steps, group,
                      stride_kh, stride_vh, stride_qh, stride_doh, t0, HAS_ALIBI, TAIL)),
        (_ws_dq_writer, (dq_desc, dq_smem, dq_smem, dq_full, dq_free, dq_lock, pid_n, gl.cdiv(seqlen_k, BLOCK_N) - 1,
                         seqlen_k - seqlen_q + window_right, b, hk, nheads, q_row0, lo, n_m, n_steps, group,
                         n_mblocks, t0, done_ptr, weight, BLOCK_N, HAS_RIGHT, DETERMINISTIC, TAIL, False, SIGNAL)),
    ], [4, 1, 1], [240, 24, 24])


# ---------------------------------------------------------------------------------------------------------
# Wide head dims (d = 256): dK and dV split along the head dim.
#
# At d = 256 one warpgroup cannot hold dK and dV of 64 keys (256 fp32 registers a thread). Here both consumer
# warpgroups work on the same 64 keys: warpgroup w holds columns [w * d/2, (w + 1) * d/2) of dK and dV, and
# computes S^T and dP^T for half of each step's queries (keys x 32 queries), so the tensor cores do each
# product once. P and dS meet in shared memory, each warpgroup storing its half of the query rows; every
# warpgroup then takes the whole tiles for its columns of dV += P^T dO, dK += dS^T Q and dQ = dS K. K, V, two
# stages of Q and dO, and two P and dS buffers (one with dropout, whose mask moves through shared memory)
# fill the shared memory, so dQ's share goes to the dQ warp
# through the step's own Q and dO tiles, once both warpgroups' products have read them (warpgroup 0's columns
# in the Q tile, warpgroup 1's in the dO tile; the stage returns to the load warp when the bulk reduce-adds
# have read it).


@gluon.jit
def _wide_step(t, h, start_m, masked, dk, dv, st_zero, dq_zero, k_smem, v_smem, q_smem, do_smem, dq_smem, p_smem,
               ds_smem, stats_smem, qdo_full, stats_full, read_done, dq_full, p_ready, p_free, ds_ready, ds_free,
               alibi_slopes, stride_ab, b, seqlen_q, seqlen_k, cols, start_n, softmax_scale, qk_scale, softcap2,
               window_left, window_right, seed, nheads, max_seqlen_q, max_seqlen_k, dropout_p, WG: gl.constexpr,
               SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
               DROPOUT: gl.constexpr):
    """Step t (query block start_m of head h) of consumer warpgroup WG of the wide backward; ``dq_smem``: its
    dQ tiles (the Q or dO ring seen as fp32 tiles of half the head dim). ALiBi's bias is formed on every step
    (-slope |p - j| on the tile, no split by sides of the diagonal: at d = 256 the products are twice as long
    per score as at d = 128); dropout draws the forward's mask of the warpgroup's query rows while dP^T is
    computed."""
    NUM_STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    HALF_M: gl.constexpr = BLOCK_M // 2
    HALF_D: gl.constexpr = HEAD_DIM // 2
    BLOCK_N: gl.constexpr = k_smem.type.shape[0]
    BUFS: gl.constexpr = p_smem.type.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    row_layout: gl.constexpr = gl.SliceLayout(0, st_zero.type.layout)
    stage = t % NUM_STAGES
    ring_phase = (t // NUM_STAGES) & 1
    slot = 2 * stage  # the stats slot's rows: lse, delta (_put_step_stats)

    mbarrier.wait(qdo_full.index(stage), ring_phase)
    q_mine = q_smem.index(stage).slice(WG * HALF_M, HALF_M)
    do_mine = do_smem.index(stage).slice(WG * HALF_M, HALF_M)
    st_acc = warpgroup_mma(k_smem, q_mine.permute((1, 0)), st_zero, use_acc=False, is_async=True)
    dpt = warpgroup_mma(v_smem, do_mine.permute((1, 0)), st_zero, use_acc=False, is_async=True)
    if HAS_ALIBI:
        slope2 = _alibi_slope2(alibi_slopes, b, h, stride_ab)
    mbarrier.wait(stats_full.index(stage), ring_phase)
    qkt = warpgroup_mma_wait(1, deps=(st_acc,))
    st, tt = apply_softcap(qkt, qk_scale, softcap2, SOFTCAP, True)  # 16-bit inputs: tanh.approx
    rows = start_m + WG * HALF_M + gl.arange(0, HALF_M, row_layout)
    if HAS_ALIBI:
        st = bias_and_mask_t(st, rows, cols, seqlen_k, seqlen_k - seqlen_q, slope2, window_left, window_right, True,
                             False, HAS_LEFT, HAS_RIGHT)
    if masked:
        st = bias_and_mask_t(st, rows, cols, seqlen_k, seqlen_k - seqlen_q, 0.0, window_left, window_right, False,
                             True, HAS_LEFT, HAS_RIGHT)
    if DROPOUT:
        # the forward's mask of this warpgroup's query rows: a query row a thread, and of each 32 keys the
        # eight a wgmma accumulator thread would hold (pairs 8 c + 2 q + e, q its lane % 4), which is what
        # one Philox call serves (dropout_keep_wgmma)
        qk_layout: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [4, 1], [1, 0])
        st_layout: gl.constexpr = st_zero.type.layout
        keep = _keep_t(seed, b * nheads + h, start_m + WG * HALF_M, start_n, max_seqlen_q, max_seqlen_k,
                       dropout_p, st_layout, qk_layout, HALF_M, BLOCK_N)
    pt = gl.exp2(st - stats_smem.index(slot).slice(WG * HALF_M, HALF_M).load(row_layout)[None, :])
    pd = pt
    if SOFTCAP:
        pd = pt * (1.0 - tt * tt)
    pv = pt
    if DROPOUT:
        # dV takes the dropped, rescaled P^T, and dP^T passes the same mask (FA2 Alg. 4)
        inv_keep = 1.0 / (1.0 - dropout_p)
        pv = gl.where(keep, pt * inv_keep, 0.0)
    # This warpgroup's query rows of P into the shared tile (queries x keys), once both warpgroups' dV
    # products of the step that last used the buffer are done; then dS likewise.
    buf = t % BUFS
    phase = (t // BUFS) & 1
    mbarrier.wait(p_free.index(buf), phase ^ 1)
    p_smem.index(buf).slice(WG * HALF_M, HALF_M).store(gl.permute(pv.to(dtype), [1, 0]))
    fence_async_shared()
    mbarrier.arrive(p_ready.index(buf))  # lowered after a barrier of this warpgroup: every part is written
    dpt = warpgroup_mma_wait(0, deps=(dpt,))
    if DROPOUT:
        dpt = gl.where(keep, dpt * inv_keep, 0.0)
    dst = pd * (dpt - stats_smem.index(slot + 1).slice(WG * HALF_M, HALF_M).load(row_layout)[None, :])
    mbarrier.wait(ds_free.index(buf), phase ^ 1)
    ds_smem.index(buf).slice(WG * HALF_M, HALF_M).store(gl.permute(dst.to(dtype), [1, 0]))
    fence_async_shared()
    mbarrier.arrive(ds_ready.index(buf))

    mbarrier.wait(p_ready.index(buf), phase)
    dv = warpgroup_mma(p_smem.index(buf).permute((1, 0)), do_smem.index(stage).slice(WG * HALF_D, HALF_D, dim=1), dv,
                       is_async=True)
    mbarrier.wait(ds_ready.index(buf), phase)
    dk = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), q_smem.index(stage).slice(WG * HALF_D, HALF_D, dim=1), dk,
                       is_async=True)
    dq = warpgroup_mma(ds_smem.index(buf), k_smem.slice(WG * HALF_D, HALF_D, dim=1), dq_zero, use_acc=False,
                       is_async=True)
    dq, dk, dv = warpgroup_mma_wait(0, deps=(dq, dk, dv))
    mbarrier.arrive(p_free.index(buf))
    mbarrier.arrive(ds_free.index(buf))
    # This warpgroup's columns of the step's dQ share, into its tile once both warpgroups are done reading
    # the stage's Q and dO, for the dQ warp.
    mbarrier.arrive(read_done.index(stage))
    mbarrier.wait(read_done.index(stage), ring_phase)
    dq_smem.index(stage).store(dq * softmax_scale)
    fence_async_shared()
    mbarrier.arrive(dq_full.index(stage))
    return dk, dv


@gluon.jit
def _wide_consumer(k_smem, v_smem, q_smem, do_smem, dq_smem, p_smem, ds_smem, stats_smem, kv_bar, qdo_full,
                   stats_full, read_done, dq_full, p_ready, p_free, ds_ready, ds_free, DK, DV, alibi_slopes,
                   stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_ab, b, hk,
                   seqlen_q, seqlen_k, kv_row, start_n, lo, full_lo, full_hi, n_m, n_steps, group, softmax_scale,
                   qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q, max_seqlen_k,
                   dropout_p, WG: gl.constexpr, IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr,
                   HAS_ALIBI: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                   DROPOUT: gl.constexpr):
    """Consumer warpgroup WG of the wide backward: columns [WG * d/2, (WG + 1) * d/2) of dK and dV of the key
    block in registers, S^T and dP^T of the query rows [WG * BLOCK_M/2, (WG + 1) * BLOCK_M/2) of each step."""
    NUM_WARPS: gl.constexpr = 4
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    BLOCK_N: gl.constexpr = k_smem.type.shape[0]
    HALF_D: gl.constexpr = HEAD_DIM // 2
    dtype: gl.constexpr = q_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                        instr_shape=[16, BLOCK_M // 2, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                        instr_shape=[16, HALF_D, 16])
    dk = gl.zeros([BLOCK_N, HALF_D], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HALF_D], gl.float32, kv_layout)
    cols = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, st_layout))
    st_zero = gl.zeros([BLOCK_N, BLOCK_M // 2], gl.float32, st_layout)
    dq_zero = gl.zeros([BLOCK_M, HALF_D], gl.float32, kv_layout)
    mbarrier.wait(kv_bar, 0)
    for t in range(n_steps):
        start_m = lo + (t % n_m) * BLOCK_M
        masked = (start_m < full_lo) | (start_m >= full_hi)
        h = hk * group
        if HAS_ALIBI or DROPOUT:
            h += t // n_m  # the step's head of the GQA group (the loader's order: _step_origin)
        dk, dv = _wide_step(t, h, start_m, masked, dk, dv, st_zero, dq_zero, k_smem, v_smem, q_smem, do_smem,
                            dq_smem, p_smem, ds_smem, stats_smem, qdo_full, stats_full, read_done, dq_full, p_ready,
                            p_free, ds_ready, ds_free, alibi_slopes, stride_ab, b, seqlen_q, seqlen_k, cols, start_n,
                            softmax_scale, qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q,
                            max_seqlen_k, dropout_p, WG, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, DROPOUT)

    # This warpgroup's columns of dK, dV stored as the products left them (no layout change: no shared
    # memory is left for one); key rows past the sequence are never written.
    out_n = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, kv_layout))
    out_d = WG * HALF_D + gl.arange(0, HALF_D, gl.SliceLayout(0, kv_layout))
    row_ok = gl.broadcast((out_n < seqlen_k)[:, None], dk)[0]
    n0 = ((kv_row - start_n if IS_VARLEN else 0) + out_n).to(gl.int64)[:, None]  # varlen: a packed row
    dk_ptrs = DK + b.to(gl.int64) * stride_dkb + hk.to(gl.int64) * stride_dkh + n0 * stride_dks + out_d[None, :]
    dv_ptrs = DV + b.to(gl.int64) * stride_dvb + hk.to(gl.int64) * stride_dvh + n0 * stride_dvs + out_d[None, :]
    gl.store(dk_ptrs, (dk * softmax_scale).to(dtype), mask=row_ok)
    gl.store(dv_ptrs, dv.to(dtype), mask=row_ok)


@gluon.jit(do_not_specialize=["section"])
def attn_bwd_gluon_wide_kernel(
    q_desc, k_desc, v_desc, do_desc, dq_desc, Lse, Delta, DK, DV, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
    dq_lock, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_lb, stride_lh,
    stride_ab, stride_kh, stride_vh, stride_qh, stride_doh, nheads, nheads_k, group, max_seqlen_q, max_seqlen_k,
    n_mblocks, softmax_scale, qk_scale, softcap2, window_left, window_right, section, seed, dropout_p,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    BUFS: gl.constexpr, IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DROPOUT: gl.constexpr, DETERMINISTIC: gl.constexpr,
    num_warps: gl.constexpr, BH_AXES: gl.constexpr = False,
):
    """dK, dV of one key block of BLOCK_N (64) keys, and its share of dQ added through ``dq_desc`` into the fp32
    buffer in the queries' (contiguous) layout, viewed as (rows, nheads * HEAD_DIM). Two consumer warpgroups
    (240 registers each) split dK, dV along the head dim and each step's S^T, dP^T along the queries
    (``_wide_consumer``); one load warp fills the Q/dO ring and the stats (``_ws_loader``); one dQ warp issues
    the bulk reduce-adds of dQ's shares from the ring's tiles (``_ws_dq_writer``). Scores in log2 units, as
    the other kernels take them. DETERMINISTIC: the key blocks add into each query block in a fixed order
    (``dq_lock``, ``n_mblocks``: ``_ws_dq_writer``'s counts), as in ``attn_bwd_gluon_kernel``."""
    dtype: gl.constexpr = q_desc.dtype
    pid_n = gl.program_id(0)
    bhk = grid_row(nheads_k, BH_AXES)[0]
    if HAS_RIGHT or DETERMINISTIC:
        # Causal: the first key blocks receive the most queries; launch them first (longest work first).
        # Deterministic: the last key block of a row first, as the dQ warp's order needs (_ws_dq_writer).
        pid_n, bhk = launch_order(pid_n, bhk, gl.num_programs(0), grid_rows(BH_AXES), section, DETERMINISTIC)
    start_n, b, hk, q_start, seqlen_q, seqlen_k, q_row0, kv_row = _key_block(
        pid_n, bhk, cu_seqlens_q, cu_seqlens_k, nheads_k, max_seqlen_q, max_seqlen_k, BLOCK_N, IS_VARLEN)
    if start_n >= seqlen_k:
        return
    lo, full_lo, full_hi, hi = q_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                             BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    n_m = gl.cdiv(hi - lo, BLOCK_M)
    n_steps = group * n_m

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    # the same rings as fp32 tiles of half the head dim: warpgroup 0's dQ columns in Q's, 1's in dO's
    gl.static_assert(dtype.primitive_bitwidth == 16, "a dQ tile fills a 16-bit Q / dO stage")
    q32_smem = q_smem._reinterpret(gl.float32, [NUM_STAGES, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)
    do32_smem = do_smem._reinterpret(gl.float32, [NUM_STAGES, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
    p_smem = gl.allocate_shared_memory(dtype, [BUFS, BLOCK_M, BLOCK_N], pds_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BUFS, BLOCK_M, BLOCK_N], pds_layout)
    stats_smem = gl.allocate_shared_memory(gl.float32, [2 * NUM_STAGES, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qdo_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    stats_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    read_done = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
    p_free = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(qdo_full.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=1)  # the dQ warp, once its reduce-adds have read the stage
        mbarrier.init(stats_full.index(i), count=1)
        mbarrier.init(read_done.index(i), count=2)
        mbarrier.init(dq_full.index(i), count=2)
    for i in gl.static_range(BUFS):
        mbarrier.init(p_ready.index(i), count=2)
        mbarrier.init(p_free.index(i), count=2)
        mbarrier.init(ds_ready.index(i), count=2)
        mbarrier.init(ds_free.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_wide_consumer, (k_smem, v_smem, q_smem, do_smem, q32_smem, p_smem, ds_smem, stats_smem, kv_bar, qdo_full,
                          stats_full, read_done, dq_full, p_ready, p_free, ds_ready, ds_free, DK, DV, alibi_slopes,
                          stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_ab, b, hk,
                          seqlen_q, seqlen_k, kv_row, start_n, lo, full_lo, full_hi, n_m, n_steps, group,
                          softmax_scale, qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q,
                          max_seqlen_k, dropout_p, 0, IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                          DROPOUT)),
        (_wide_consumer, (k_smem, v_smem, q_smem, do_smem, do32_smem, p_smem, ds_smem, stats_smem, kv_bar, qdo_full,
                          stats_full, read_done, dq_full, p_ready, p_free, ds_ready, ds_free, DK, DV, alibi_slopes,
                          stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_ab, b, hk,
                          seqlen_q, seqlen_k, kv_row, start_n, lo, full_lo, full_hi, n_m, n_steps, group,
                          softmax_scale, qk_scale, softcap2, window_left, window_right, seed, nheads, max_seqlen_q,
                          max_seqlen_k, dropout_p, 1, IS_VARLEN, SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                          DROPOUT)),
        (_ws_loader, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, stats_smem, kv_bar,
                      qdo_full, qdo_empty, stats_full, Lse, Delta, Lse, stride_lb, stride_lh, 0, b, q_start,
                      seqlen_q, seqlen_k, start_n, kv_row, hk, q_row0, lo, n_m, n_steps, group, stride_kh,
                      stride_vh, stride_qh, stride_doh, 0, False, False)),
        (_ws_dq_writer, (dq_desc, q32_smem, do32_smem, dq_full, qdo_empty, dq_lock, pid_n,
                         gl.cdiv(seqlen_k, BLOCK_N) - 1, seqlen_k - seqlen_q + window_right, b, hk, nheads, q_row0,
                         lo, n_m, n_steps, group, n_mblocks, 0, Lse, 0, BLOCK_N, HAS_RIGHT, DETERMINISTIC, False,
                         True, False)),
    ], [4, 1, 1], [240, 24, 24])


class BwdConfig(NamedTuple):
    """Tiles of ``attn_bwd_gluon_kernel``: ``block_n`` keys per program over its two consumer warpgroups,
    ``block_m`` queries a step through a ring of ``stages`` Q/dO tiles, ``dq_stages`` fp32 dQ tiles in
    shared memory for the dQ warp; with dropout, ``early_mask`` draws the mask while S^T and dP^T are
    computed (else while dP^T is: fewer registers held across the S^T wait); ``kv_regs``: K (bit 0) and V
    (bit 1) as register operands; ``dq_swizzle``: the dQ tiles' shared-memory swizzle (``dq_descriptor``);
    ``tail``: the last wave's key blocks split over their steps where ``tail_split`` finds it pays (dense
    inputs without a window, not deterministic); ``nested``: a band's (causal, windows) consumers walk the
    steps as two loops, the group's heads and their query blocks, instead of one loop over both. Head dims
    above 128 run ``attn_bwd_gluon_wide_kernel``, where ``dq_stages`` counts the buffers of the shared P and
    dS tiles (it has no dQ tiles) and only ``block_m``, ``block_n`` and ``stages`` apply besides."""

    block_m: int
    block_n: int
    stages: int
    dq_stages: int = 1
    early_mask: int = 0
    kv_regs: int = 0
    dq_swizzle: int = 128
    tail: int = 1
    nested: int = 1

    @classmethod
    def parse(cls, text: str) -> BwdConfig:
        """From 'block_m,block_n,stages[,dq_stages[,early_mask[,kv_regs[,dq_swizzle[,tail[,nested]]]]]]'
        (the scripts' options)."""
        return cls(*(int(x) for x in text.split(",")))


# By head dim: 128 keys over two warpgroups; at d = 128 64 queries a step (two dQ tiles do not fit: 227 KB).
# The early dropout mask measured 2-4% faster at d = 128 and 3-4% slower at d = 64 (H200; NOTES, "Gluon
# backward with dropout").
# d = 64 takes 128 queries a step (half the meetings and ring waits per FLOP); softcap and dropout, whose
# extra registers spill there, take 64 queries a step, softcap with K and V as register operands (NOTES,
# "Gluon backward at d = 64: K and V as register operands"; dropout measured 1-2% slower with them). Short
# sequences measured no slower with 128-query steps (512-2k, same process).
# The tail split: d = 128 non-causal +1.0 / +1.8 / +0.6% at 16k / 8k / 4k; d = 64 (32 waves of shorter blocks,
# whose ends have spread by the last wave) 1.00 / 0.995 at 16k / 8k, and d = 128 softcap 0.94 / 0.95 at 4k /
# 16k (the build with the split runs its steps slower): off there (NOTES, "the last wave's key blocks split").
_CONFIGS = {64: BwdConfig(128, 128, 2, 1, tail=0), 128: BwdConfig(64, 128, 2, 1, early_mask=1),
            256: BwdConfig(64, 64, 2, 2, tail=0)}
# The band's nested step loops: offline, d = 128 softcap and dropout bands spilled more with them (kept flat).
_SOFTCAP_CONFIGS = {64: BwdConfig(64, 128, 2, 2, kv_regs=3, tail=0),
                    128: _CONFIGS[128]._replace(tail=0, nested=0)}
# d = 256 with dropout: one P and one dS buffer, so that the mask's move into the S^T layout finds its shared
# memory (two buffers leave 1.3 KB).
_DROPOUT_CONFIGS = {64: BwdConfig(64, 128, 2, 2, tail=0), 128: _CONFIGS[128]._replace(nested=0),
                    256: _CONFIGS[256]._replace(dq_stages=1)}


def nested_steps(cfg: BwdConfig, band: bool, tail: bool) -> bool:
    """Whether the consumers walk the steps in nested loops (``NESTED``): the config's ``nested``, a band's
    input (a window or causal), and no tail split (its pieces start mid-head)."""
    return bool(cfg.nested) and band and not tail


def select_config(d: int, softcap: bool, dropout: bool) -> BwdConfig:
    """The shipped config for head dim d (softcap, dropout: whether the call has them)."""
    if dropout and d in _DROPOUT_CONFIGS:
        return _DROPOUT_CONFIGS[d]
    if softcap and d in _SOFTCAP_CONFIGS:
        return _SOFTCAP_CONFIGS[d]
    return _CONFIGS[d]


# Head dims routed here by default: all three (1.1-1.5x the portable backward on an H200 at d = 64 and 128 since
# lse and delta come through shared memory, benchmarks/NOTES.md, "Gluon backward v3"; the wide kernel 1.6-1.9x
# at d = 256, "Gluon backward at d = 256").
_ROUTED_HEAD_DIMS = (64, 128, 256)


def gluon_backward_supported(q, k, v, dout, *, dropout_p: float, alibi_slopes,
                             cu_seqlens_q: torch.Tensor | None = None) -> bool:
    """Whether ``gluon_backward`` computes this backward: head dims in ``_ROUTED_HEAD_DIMS`` (all of
    ``_CONFIGS``'s; ``IOATTN_GLUON_BWD=1`` takes every head dim of ``_CONFIGS``), none with
    ``IOATTN_GLUON_BWD=0`` or ``IOATTN_GLUON=0``; and
    what the Gluon forward takes (dense or varlen, causal, windows, softcap, ALiBi, GQA, dropout), with a
    TMA-describable dO, in either dQ order (``gluon_backward``'s ``deterministic``), the wide kernel (d = 256)
    as well. Causal softcap took the portable backward until an H100 probe put the Gluon one at 1.27-1.49x it
    at d = 128 and 1.78-2.0x at d = 256 (benchmarks/NOTES.md)."""
    choice = os.environ.get("IOATTN_GLUON_BWD", "").strip()
    if choice == "0":
        return False
    if choice != "1" and q.shape[-1] not in _ROUTED_HEAD_DIMS:
        return False
    if not gluon_enabled_on(q):
        return False
    dtype, shape = q.dtype, q.shape
    if dtype not in _GL_DTYPES or k.dtype != dtype or v.dtype != dtype or dout.dtype != dtype:
        return False
    rank, d = (3 if cu_seqlens_q is not None else 4), shape[-1]
    if len(shape) != rank or k.dim() != rank or v.dim() != rank or dout.dim() != rank:
        return False
    if d not in _CONFIGS or k.shape[-1] != d or v.shape[-1] != d or dout.shape[-1] != d:
        return False
    if 0 in shape or 0 in k.shape:
        return False
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device):
        return False
    return _tma_describable(q) and _tma_describable(k) and _tma_describable(v) and _tma_describable(dout)


# A piece of a split key block pays about this many steps for its start and its end (K/V load, ring fill,
# dK/dV store), and runs at least MIN_PIECE_STEPS steps.
PIECE_COST_STEPS, MIN_PIECE_STEPS, MAX_SPLIT = 4, 16, 8


def tail_split(tiles: int, sms: int, steps: int) -> int:
    """Pieces per key block of the last wave (1: no split) for ``tiles`` equal key blocks of ``steps``
    steps each, one program per SM at a time (the consumers' 240 registers a thread leave room for one):
    the ``tiles % sms`` blocks left after the whole waves run as ``split`` pieces each, which take
    ceil(rest * split / sms) rounds of (steps / split + PIECE_COST_STEPS) steps, against one round of
    ``steps``; the split with the shortest tail, if it saves at least 2 steps in 100 of a tile."""
    rest = tiles % sms
    if rest == 0 or tiles < sms:
        return 1
    best, best_time = 1, float(steps)
    for split in range(2, min(MAX_SPLIT, steps // MIN_PIECE_STEPS) + 1):
        time = cdiv(rest * split, sms) * (steps / split + PIECE_COST_STEPS)
        if time < best_time:
            best, best_time = split, time
    return best if best_time <= 0.98 * steps else 1


@triton.jit
def tail_sum_kernel(Parts, DK, DV, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                    n_whole, split, n_kb, nheads_k, seqlen_k,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """dK, dV of the split key blocks: key block ``n_whole + r`` (r the first program id) is the sum of its
    ``split`` pieces' fp32 slots in ``Parts`` ((pieces, 2, BLOCK_N, HEAD_DIM): dK scaled, dV), ROWS of its
    keys per program (the second id); keys past seqlen_k are not written."""
    r = tl.program_id(0)
    tile = n_whole + r
    pid_n = tile % n_kb
    b = (tile // n_kb) // nheads_k
    hk = (tile // n_kb) % nheads_k
    local = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    src = Parts + (r * split).to(tl.int64) * (2 * BLOCK_N * HEAD_DIM) + local[:, None] * HEAD_DIM + d[None, :]
    dk = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    dv = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for _ in range(split):
        dk += tl.load(src)
        dv += tl.load(src + BLOCK_N * HEAD_DIM)
        src += 2 * BLOCK_N * HEAD_DIM
    n = (pid_n * BLOCK_N + local).to(tl.int64)
    ok = (n < seqlen_k)[:, None]
    dk_ptrs = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + n[:, None] * stride_dks + d[None, :]
    dv_ptrs = DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + n[:, None] * stride_dvs + d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok)


# The conversion of dQ under the attention kernel's last wave: dense inputs at d <= 128 (``fused_dq_convert``).
# ``IOATTN_BWD_DQ_UNDER_WAVE=0`` at import: converted after the attention kernel (``dq_acc.to``) as before.
DQ_CONVERT_UNDER_WAVE = os.environ.get("IOATTN_BWD_DQ_UNDER_WAVE", "1").strip() != "0"


def fused_dq_convert(headdim: int) -> bool:
    """Whether a dense Gluon backward at this head dim converts dQ with ``dq_convert_kernel``."""
    return DQ_CONVERT_UNDER_WAVE and headdim <= 128


@triton.jit
def dq_convert_kernel(DQacc, DQ, Done, expected, seqlen, nheads_k, row_stride,
                      COLS: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BH_AXES: tl.constexpr = False):
    """dQ (q's dtype) of ROWS rows of (batch, KV head) ``bhk`` (the second program id): the group's heads'
    columns of the dense fp32 buffer ``DQacc`` ((batch * seqlen, nheads * d) rows of ``row_stride``), once
    ``Done[bhk]`` reaches ``expected`` (the attention kernel's programs of that (batch, KV head) count
    themselves there after their last reduce-adds are in memory). Launched right after that kernel with
    programmatic dependent launch, so it starts while the kernel's last wave runs and converts each (batch, KV
    head) as soon as it is complete, on the SMs the wave frees; the kernel's programs all start before it
    does, so it never waits on one that is not resident. Its last program waits for the attention kernel to
    complete (``griddepcontrol.wait``), so whatever follows in the stream sees all of its writes."""
    bhk, b, hk = grid_row(nheads_k, BH_AXES)
    count = tl.atomic_add(Done + bhk, 0, sem="acquire", scope="gpu")
    while count < expected:
        count = tl.atomic_add(Done + bhk, 0, sem="acquire", scope="gpu")
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    ok = (rows < seqlen)[:, None] & (cols < COLS)[None, :]
    offs = (b.to(tl.int64) * seqlen + rows)[:, None] * row_stride + hk.to(tl.int64) * COLS + cols[None, :]
    x = tl.load(DQacc + offs, mask=ok, cache_modifier=".cg")
    tl.store(DQ + offs, x.to(DQ.dtype.element_ty), mask=ok)
    last = (tl.program_id(0) == tl.num_programs(0) - 1) & (tl.program_id(1) == tl.num_programs(1) - 1)
    if BH_AXES:
        last = last & (tl.program_id(2) == tl.num_programs(2) - 1)
    if last:
        gdc_wait()


def dq_descriptor(dq_acc: torch.Tensor, block_m: int, block_d: int, swizzle: int = 128) -> TmaDesc:
    """The contiguous fp32 dQ buffer, (..., nheads, d), as (rows, nheads * d) for the bulk reduce-add of
    (block_m, block_d) tiles. The tile's shared-memory layout is the descriptor's: ``swizzle`` bytes (the
    consumers' stores from the wgmma accumulator layout hit 8 banks 8 ways in unswizzled rows of 128 or 256
    bytes, and 2 wavefronts a store with 128-byte swizzling; the copy engine then moves 32 columns a box)."""
    cols = dq_acc.shape[-2] * dq_acc.shape[-1]
    return TmaDesc(dq_acc, (dq_acc.numel() // cols, cols), (cols, 1), (block_m, block_d), _dq_layout(swizzle))


_launch_bwd = Launcher(attn_bwd_gluon_kernel)
_launch_tail_sum = Launcher(tail_sum_kernel)
_launch_dq_convert = Launcher(dq_convert_kernel)


@functools.cache
def _dq_layout(swizzle: int) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=32, rank=2)


_launch_wide = Launcher(attn_bwd_gluon_wide_kernel)


class BwdLaunch(NamedTuple):
    """One launch of the Gluon backward, worked out from shapes: ``build(dout, q, k, v, lse, delta, dk, dv,
    dq_acc, parts, locks, slopes, cu_q, cu_k, seed, dropout_p, dq, done)`` gives its positional arguments for
    one call's tensors (it holds none)."""

    launcher: Launcher
    grid: tuple
    flags: dict
    build: object


def gluon_backward_launches(dout, q, k, v, lse, dk, dv, dq_acc, alibi_slopes, *, batch: int, max_seqlen_q: int,
                            max_seqlen_k: int, varlen: bool, softmax_scale: float, qk_scale: float,
                            softcap2: float, window_size: tuple[int, int], deterministic: bool = False,
                            dropout_p: float = 0.0, config: BwdConfig | None = None, fused: bool = False
                            ) -> tuple[list[BwdLaunch], tuple | None, int]:
    """``gluon_backward``'s launches in order (the key blocks' kernel; with ``fused`` (dense, d <= 128) the dQ
    conversion right after it; then the tail's sum when the last wave splits), the shape of the fp32 ``Parts``
    workspace the split needs (None: no split) and the length of the deterministic order's lock array (0:
    none). Reads only shapes and strides of the tensors it is given."""
    nheads, d = q.shape[-2:]
    nheads_k = k.shape[-2]
    cfg = config or select_config(d, softcap2 != 0.0, dropout_p > 0)
    block_m, block_n = cfg.block_m, cfg.block_n
    grid_n = cdiv(max_seqlen_k, block_n)
    grid = bh_grid(grid_n, nheads_k, batch)
    if grid_n * batch == 0:
        return [], None, 0
    if varlen:
        dk_strides = (0, dk.stride(0), dk.stride(1))
        dv_strides = (0, dv.stride(0), dv.stride(1))
        lse_strides = (0, lse.stride(0))
    else:
        dk_strides = (dk.stride(0), dk.stride(1), dk.stride(2))
        dv_strides = (dv.stride(0), dv.stride(1), dv.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    stride_ab = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        stride_ab = alibi_slopes.stride(0)  # contiguous (batch, nheads): the caller passes it so
    left, right = window_size
    n_mblocks = cdiv(max_seqlen_q, block_m)
    n_locks = batch * nheads * n_mblocks if deterministic else 0  # per (batch, head, query block)
    # launch_order's rows are KV heads, each streaming its group's Q and dO and adding into their fp32 dQ.
    group_bytes = max_seqlen_q * d * (2 * q.element_size() + 4) * (nheads // nheads_k)
    section = order_section(batch * nheads_k, group_bytes)
    qd, kd, vd, dod = (_descriptor(q, block_m)[1:], _descriptor(k, block_n)[1:], _descriptor(v, block_n)[1:],
                       _descriptor(dout, block_m)[1:])
    dqd = dq_descriptor(dq_acc, block_m, d // 2, cfg.dq_swizzle)[1:]
    io_strides = (k.stride(-2), v.stride(-2), q.stride(-2), dout.stride(-2))
    if d > 128:
        # the wide kernel (no tail split, no dQ conversion under its last wave)
        if dropout_p > 0 and cfg.dq_stages > 1:
            raise ValueError("the wide backward with dropout takes one P / dS buffer (dq_stages=1): the mask's "
                             f"move into the S^T layout needs the shared memory a second one takes; got {cfg}")
        statics = (*dk_strides, *dv_strides, *lse_strides, stride_ab, *io_strides, nheads, nheads_k,
                   nheads // nheads_k, max_seqlen_q, max_seqlen_k, n_mblocks, softmax_scale, qk_scale, softcap2, left,
                   right, section)

        def build_wide(dout, q, k, v, lse, delta, dk, dv, dq_acc, parts, locks, slopes, cu_q, cu_k, seed, dropout_p,
                       dq, done):
            return (TmaDesc(q, *qd), TmaDesc(k, *kd), TmaDesc(v, *vd), TmaDesc(dout, *dod), TmaDesc(dq_acc, *dqd),
                    lse, delta, dk, dv, cu_q, cu_k, slopes, locks, *statics, seed, dropout_p)

        flags = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=cfg.stages, BUFS=cfg.dq_stages,
                     IS_VARLEN=varlen, SOFTCAP=softcap2 != 0.0, HAS_ALIBI=alibi_slopes is not None,
                     HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, DROPOUT=dropout_p > 0, DETERMINISTIC=deterministic,
                     num_warps=4, BH_AXES=len(grid) == 3)
        return [BwdLaunch(_launch_wide, grid, flags, build_wide)], None, n_locks
    tiles = grid_n * batch * nheads_k
    split = 1
    if cfg.tail and not (varlen or deterministic or left >= 0 or right >= 0):
        sms = _num_sms(q.device)
        split = tail_split(tiles, sms, (nheads // nheads_k) * n_mblocks)
    n_whole = tiles - tiles % sms if split > 1 else tiles
    parts_shape = None
    if split > 1:
        # (pieces, dK / dV, keys, d) fp32, every element written by the pieces
        parts_shape = ((tiles - n_whole) * split, 2, block_n, d)
        grid = (n_whole + (tiles - n_whole) * split,)
    statics = (*dk_strides, *dv_strides, *lse_strides, stride_ab, *io_strides, nheads, nheads_k,
               nheads // nheads_k, max_seqlen_q, max_seqlen_k, n_mblocks, softmax_scale, qk_scale, softcap2, left,
               right, section)

    def build(dout, q, k, v, lse, delta, dk, dv, dq_acc, parts, locks, slopes, cu_q, cu_k, seed, dropout_p, dq, done):
        return (TmaDesc(q, *qd), TmaDesc(k, *kd), TmaDesc(v, *vd), TmaDesc(dout, *dod), TmaDesc(dq_acc, *dqd),
                lse, delta, dk, dv, cu_q, cu_k, slopes, locks, parts, done if fused else lse, *statics, seed,
                dropout_p, n_whole, split)

    flags = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=cfg.stages, DQ_STAGES=cfg.dq_stages,
                 IS_VARLEN=varlen, SOFTCAP=softcap2 != 0.0, HAS_ALIBI=alibi_slopes is not None, HAS_LEFT=left >= 0,
                 HAS_RIGHT=right >= 0, DROPOUT=dropout_p > 0, EARLY_MASK=bool(cfg.early_mask),
                 DETERMINISTIC=deterministic, KV_REGS=cfg.kv_regs, TAIL=split > 1,
                 NESTED=nested_steps(cfg, left >= 0 or right >= 0, split > 1), SIGNAL=fused, num_warps=4,
                 BH_AXES=len(grid) == 3)
    launches = [BwdLaunch(_launch_bwd, grid, flags, build)]
    if fused:
        # (rows, the group's columns) blocks of about 32 KB of the fp32 buffer, (batch, KV head) slowest
        cols = (nheads // nheads_k) * d
        block_c = triton.next_power_of_2(cols)
        rows_c = max(1, 8192 // block_c)
        conv_statics = (grid_n * split, max_seqlen_q, nheads_k, nheads * d)

        def build_convert(dout, q, k, v, lse, delta, dk, dv, dq_acc, parts, locks, slopes, cu_q, cu_k, seed,
                          dropout_p, dq, done):
            return (dq_acc, dq, done, *conv_statics)

        conv_grid = bh_grid(cdiv(max_seqlen_q, rows_c), nheads_k, batch)
        launches.append(BwdLaunch(_launch_dq_convert, conv_grid,
                                  dict(COLS=cols, BLOCK_C=block_c, ROWS=rows_c, BH_AXES=len(conv_grid) == 3,
                                       num_warps=4, launch_pdl=True),
                                  build_convert))
    if split > 1:
        rows = 32
        sum_statics = (*dk_strides, *dv_strides, n_whole, split, grid_n, nheads_k, max_seqlen_k)

        def build_sum(dout, q, k, v, lse, delta, dk, dv, dq_acc, parts, locks, slopes, cu_q, cu_k, seed, dropout_p,
                      dq, done):
            return (parts, dk, dv, *sum_statics)

        launches.append(BwdLaunch(_launch_tail_sum, (tiles - n_whole, block_n // rows),
                                  dict(BLOCK_N=block_n, HEAD_DIM=d, ROWS=rows, num_warps=4), build_sum))
    return launches, parts_shape, n_locks


def gluon_backward(dout, q, k, v, lse, delta, dk, dv, dq_acc, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                   *, batch: int, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, qk_scale: float,
                   softcap2: float, window_size: tuple[int, int], deterministic: bool = False,
                   dropout_p: float = 0.0, seed: int | torch.Tensor | None = 0, config: BwdConfig | None = None,
                   dq: torch.Tensor | None = None, done: torch.Tensor | None = None) -> list[tuple]:
    """Writes dk, dv (the inputs' layout) and adds dQ into ``dq_acc`` (zeroed contiguous fp32 of q's shape,
    so that one contiguous copy makes dQ of it). ``dq`` (dense inputs, d <= 128: ``fused_dq_convert``): dQ in
    q's dtype, contiguous, converted from ``dq_acc`` by ``dq_convert_kernel`` under the last wave; ``done``
    then int32 zeros, at least batch x KV heads (the programs' counts). ``deterministic``: the key blocks add
    into each query block in a fixed order (bitwise reproducible dQ). ``dropout_p``, ``seed``: the forward's
    dropout (its mask is drawn again from the same Philox counters; ``seed`` an int or the forward's seed
    tensor, ``ioattn.dropout.kernel_seed``).
    ``lse``, ``delta``: float32 of the forward's lse shape. Call only where ``gluon_backward_supported``.
    Returns the launches it made as (``BwdLaunch``, its arguments), in order."""
    varlen = cu_seqlens_q is not None
    seed = kernel_seed(seed, dropout_p, q.device)
    slopes = lse
    if alibi_slopes is not None:
        slopes = alibi_slopes.contiguous()
    launches, parts_shape, n_locks = gluon_backward_launches(
        dout, q, k, v, lse, dk, dv, dq_acc, None if alibi_slopes is None else slopes, batch=batch,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, varlen=varlen, softmax_scale=softmax_scale,
        qk_scale=qk_scale, softcap2=softcap2, window_size=window_size, deterministic=deterministic,
        dropout_p=dropout_p, config=config, fused=dq is not None)
    # per (batch, head, query block): how many key blocks are done with it (deterministic only)
    # (an unused pointer otherwise, as cu_seqlens for dense inputs: no buffer to fill on every call)
    locks = torch.zeros(n_locks, dtype=torch.int32, device=q.device) if n_locks else lse
    parts = lse if parts_shape is None else torch.empty(parts_shape, dtype=torch.float32, device=q.device)
    made = []
    for launch in launches:
        args = launch.build(dout, q, k, v, lse, delta, dk, dv, dq_acc, parts, locks, slopes,
                            cu_seqlens_q if varlen else lse, cu_seqlens_k if varlen else lse, seed, float(dropout_p),
                            dq, done)
        launch.launcher(launch.grid, *args, **launch.flags)
        made.append((launch, args))
    return made
