"""Launchers and custom ops of KV-cache attention: cache writes, split-KV decode, the split combine.

Arguments arrive validated (``ioattn.kvcache`` checks them). Each op runs the Triton kernels or,
where ``ioattn.backend`` picks the chunked path, the pure-PyTorch ``ioattn.chunked_kvcache``. Nothing
in the Triton path reads a device tensor on the
host: sequence lengths, page tables and slot mappings are read by the kernels, and the split count is
a function of shapes only, so the ops run under ``torch.compile`` and inside CUDA graphs.
"""

import functools
from typing import NamedTuple

import torch

from ..backend import select_backend
from ..chunked_kvcache import kv_write_torch, kvcache_attention_torch, paged_varlen_attention_torch
from ..kernels import decode_gluon
from ..kernels import kv_write as kvw
from ..kernels.attn_fwd_gluon import gluon_enabled_on
from ..kernels.combine import combine_kernel
from ..kernels.decode import decode_kernel
from ..kernels.decode_gluon import CONFIG as GLUON_CONFIG
from ..kernels.decode_gluon import (
    DecodeConfig,
    PagedTensors,
    gluon_decode,
    gluon_decode_preferred,
    gluon_decode_supported,
    gluon_num_splits,
    gluon_paged_prefill,
    gluon_paged_prefill_supported,
)
from ..kernels.fastlaunch import (
    Launcher,
    PlanTable,
    Recording,
    cdiv,
    next_power_of_2,
    runtime_key,
)
from ._dispatch import EagerOp

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# Packed queries over a paged cache (``flash_attn_varlen_func(..., block_table=...)``) run on two kernels,
# chosen from host shapes (``paged_varlen_route``): the split-KV decode kernel, whose programs pack a GQA group's
# rows and stream each key once per group (decode rows at the DRAM's rate, prefill rows at about half the dense
# rate), and the Gluon forward's paged tiles (``gluon_paged_prefill``: 2 x 64 query rows of one head a tile, each
# key read once per tile; a decode row there holds a whole tile a head). A step whose longest sequence has fewer
# than ``PAGED_PREFILL_MIN_ROWS`` rows (decode, speculative verification) runs on the split-KV kernel alone; a
# step of one sequence on the tiles alone; any other step on both, "mixed": the sequences of at most
# ``short_query_rows`` rows on the split-KV kernel (their key splits sized for them alone), the rest on the tiles.
PAGED_PREFILL_MIN_ROWS = 64
# Packed rows (GQA group x query rows) a sequence has at most to take the split-KV half of a mixed step, which set
# that half's tile (BLOCK_M, the next power of two): 16, decode rows' tile, where the sequences beside the longest
# hold no more rows than their count (a prefill beside decode rows); else 32 (verification rows, short chunks, or
# several prefills beside decode rows), which keeps 32 packed rows off the tiles (2.1x on prefill 512 + verify
# 32 x 8 rows, GQA 4) for +2-3% on decode rows in a 32-row tile (notebook, "how many packed rows the split-KV half
# of a mixed step takes"). Plans do not key on these two: code that changes them turns plans off.
SHORT_PACKED_ROWS = 16
WIDE_PACKED_ROWS = 32


def multi_row_others(total_q: int, batch: int, max_seqlen_q: int) -> bool:
    """Whether a packed step's sequences other than its longest hold more than a row each on the whole, from host
    shapes alone: their rows, total_q - max_seqlen_q, exceed their count (a loose max_seqlen_q reads False)."""
    return total_q - max_seqlen_q > batch - 1


def short_query_rows(group: int, wide: bool = False) -> int:
    """Query rows a sequence has at most to take the split-KV kernel in a mixed step: ``SHORT_PACKED_ROWS``
    packed rows of its GQA group, ``WIDE_PACKED_ROWS`` with ``wide`` (``multi_row_others``)."""
    return max(1, (WIDE_PACKED_ROWS if wide else SHORT_PACKED_ROWS) // group)


def paged_varlen_route(total_q: int, batch: int, max_seqlen_q: int) -> str:
    """"split" (the split-KV kernel), "tiles" (the Gluon paged tiles) or "mixed" (both, by sequence length) for
    a packed call of ``batch`` sequences over a paged cache (``PAGED_PREFILL_MIN_ROWS``). A loose max_seqlen_q
    (above the longest sequence's rows) is bounded by total_q."""
    longest = min(max_seqlen_q, total_q)
    if longest < PAGED_PREFILL_MIN_ROWS:
        return "split"
    return "tiles" if batch <= 1 else "mixed"


_launch_decode = Launcher(decode_kernel)
_launch_combine = Launcher(combine_kernel)
_launch_kv_write = Launcher(kvw.kv_write_kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one by one: more splits only cost time


def decode_tiles(device: torch.device, rows: int, headdim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``rows`` = query heads per group x seqlen_q."""
    block_m = max(16, next_power_of_2(rows))
    if device.type != "cuda":
        return min(block_m, 32), 16, 4, 1
    block_m = min(block_m, 64)
    # Decode is bandwidth-bound: small key tiles keep a program's registers and shared memory low (96 regs,
    # 38 KB at d = 128, GQA 4) so five fit on an SM, and three stages keep two tiles in flight per program.
    return block_m, 32, 4, 3 if block_m <= 32 else 2


def choose_num_splits(device: torch.device, batch: int, nheads: int, nheads_k: int, seqlen_q: int,
                      max_seqlen_k: int, headdim: int, *, paged: bool = True) -> int:
    """Split count from shapes alone (``max_seqlen_k`` is the cache's capacity, never its contents).

    Flash-Decoding's rule: split the keys when (batch, KV head, query block) programs are too few to keep
    every SM streaming. All programs of a split KV run at once and are equally long, so the SM holding the
    most of them sets the time: we fill each SM with at most four (rounding the split count down; one
    program over makes a fifth on some SMs, or a second wave, and cost up to 30% on an H200), with at
    least four key tiles per split. A contiguous cache streams best at three programs per SM (measured on
    an H200: 4.26 against 4.14 TB/s at 16k keys), a paged one at four (its page-table reads want more
    programs in flight).
    """
    block_m, block_n, _, _ = decode_tiles(device, (nheads // nheads_k) * seqlen_q, headdim)
    programs = batch * nheads_k * cdiv((nheads // nheads_k) * seqlen_q, block_m)
    wanted = (4 if paged else 3) * _sm_count(device) // max(programs, 1)
    return max(1, min(wanted, cdiv(max_seqlen_k, 4 * block_n), MAX_SPLITS))


def _scales(softmax_scale: float, softcap: float) -> tuple[float, float]:
    # Logits in log2 units for exp2 (kernels/common.py): with softcap, tanh takes scale / softcap.
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 0.0


def _decode(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, rotary_cos, rotary_sin,
            alibi_slopes, seqlen_new, softmax_scale, window_left, window_right, softcap,
            rotary_interleaved, rotary_per_row, num_splits, tiles=None, gluon=None, cu_seqlens_q=None,
            max_seqlen_q=0, by_seq=False, record=None, cache_leftpad=None):
    """``num_splits`` 0: the rule of the kernel that runs. ``tiles``: (BLOCK_M, BLOCK_N, num_warps,
    num_stages) of the portable kernel in place of ``decode_tiles``; ``gluon``: False forces the portable
    kernel, a ``DecodeConfig`` the Gluon one with that config (the sweep's knobs). Without those two, a call
    shaped like two earlier ones launches the plan the second recorded (``_decode_plan_key``).
    ``cu_seqlens_q``: q packs the sequences' queries (total_q, nheads, d), sequence b's are rows
    [cu_seqlens_q[b], cu_seqlens_q[b + 1]), at most ``max_seqlen_q``; out is (total_q, nheads, d) and lse
    (nheads, total_q); the portable kernel runs it, without a plan. Sequences of more than ``max_seqlen_q``
    rows are left out (their rows of out and lse unwritten), so a caller may run a short ``max_seqlen_q`` here
    and the longer sequences on another kernel; ``by_seq`` keeps the split outputs by (sequence, row of it),
    batch x max_seqlen_q rows, instead of by packed row (for a short ``max_seqlen_q`` beside long prefills);
    ``record`` (a ``fastlaunch.Recording``, packed queries only) takes the launches, their builders taking a
    ``decode_gluon.PagedTensors``, and the split buffers' shapes (``parts``). ``cache_leftpad``: int32 (batch,),
    each sequence's first cache position (flash-attn's; not with packed queries)."""
    assert cu_seqlens_q is None or cache_leftpad is None, "packed queries take no cache_leftpad"
    if cu_seqlens_q is not None and q.dim() == 3:
        # As one batch row of total_q tokens for the buffers and the combine; the kernel's grid and its
        # batch strides (0) go by sequence.
        out, lse = _decode(q.unsqueeze(0), k_cache, v_cache, cache_seqlens, block_table, None, None, None,
                           alibi_slopes, 0, softmax_scale, window_left, window_right, softcap, True, False,
                           num_splits, tiles, False, cu_seqlens_q, max_seqlen_q, by_seq, record)
        return out[0], lse[0]
    tensors = (q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, rotary_cos,
               rotary_sin, cache_leftpad)
    plan_key = None
    if tiles is None and gluon is None:
        plan_key = _decode_plan_key(tensors, seqlen_new, softmax_scale, window_left, window_right, softcap,
                                    rotary_interleaved, rotary_per_row, num_splits)
        if plan_key is not None:
            planned = _decode_planned(plan_key, tensors)
            if planned is not None:
                return planned
    batch, seqlen_q, nheads, headdim = q.shape
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, seqlen_q = cu_seqlens_q.shape[0] - 1, max_seqlen_q
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    paged = block_table is not None
    use_gluon = tiles is None and gluon is not False and gluon_decode_supported(
        q, k_cache, v_cache, block_table, rotary_cos, alibi_slopes, softmax_scale, softcap, cache_leftpad) and (
        gluon is not None or gluon_decode_preferred(q.device, batch, nheads_k))
    gluon_cfg = gluon if isinstance(gluon, DecodeConfig) else GLUON_CONFIG
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)
    if num_splits == 0 and use_gluon:
        num_splits = gluon_num_splits(q.device, batch, nheads_k, capacity, headdim, gluon_cfg, MAX_SPLITS)
    elif num_splits == 0:
        num_splits = choose_num_splits(q.device, batch, nheads, nheads_k, seqlen_q, capacity, headdim, paged=paged)
    by_seq = varlen and by_seq and num_splits > 1 and batch > 0
    out, lse, out_part, lse_part = _decode_buffers(q, num_splits, batch if by_seq else 0, seqlen_q)
    if num_splits > 1:
        o_strides = out_part.stride()[:4]
        l_strides = (lse_part.stride(0), lse_part.stride(1), lse_part.stride(3), lse_part.stride(2))
    else:
        o_strides = (0, *out.stride()[:3])
        l_strides = (0, *lse.stride())
    if varlen and not by_seq:  # every sequence's rows in the one batch row, at their cu_seqlens_q offsets
        o_strides = (o_strides[0], 0, *o_strides[2:])
        l_strides = (l_strides[0], 0, *l_strides[2:])
    assert record is None or not use_gluon, "a packed call's plan records the portable kernel's launch"
    if use_gluon:
        launcher, grid, flags, build, args = gluon_decode(
            q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, seqlen_new,
            softmax_scale, window_left, window_right, softcap, num_splits, out_part, lse_part, o_strides,
            l_strides, gluon_cfg, cache_leftpad)  # the config the split rule read (and the plan key holds)

        def build_all(q, k_cache, v_cache, out_part, lse_part, cache_seqlens, block_table, cache_batch_idx,
                      alibi_slopes, rotary_cos, rotary_sin, cache_leftpad=None, build=build):
            return build(q, k_cache, v_cache, out_part, lse_part, cache_seqlens, block_table, cache_batch_idx,
                         alibi_slopes, cache_leftpad)
    else:
        block_m, block_n, num_warps, num_stages = tiles or decode_tiles(q.device, group * seqlen_q, headdim)
        block_d = max(16, next_power_of_2(headdim))
        qk_scale, softcap2 = _scales(softmax_scale, softcap)
        rotary_dim = 0 if rotary_cos is None else 2 * rotary_cos.shape[1]
        statics = (0 if varlen else q.stride(0), q.stride(1), q.stride(2),
                   k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                   v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                   *o_strides, *l_strides,
                   block_table.stride(0) if paged else 0,
                   alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
                   rotary_cos.stride(0) if rotary_dim else 0,
                   nheads_k, seqlen_q, seqlen_new, num_splits, batch * nheads_k, capacity,
                   qk_scale, softcap2, window_left, window_right)

        def build_all(q, k_cache, v_cache, out_part, lse_part, cache_seqlens, block_table, cache_batch_idx,
                      alibi_slopes, rotary_cos, rotary_sin, cache_leftpad=None, cu_seqlens_q=None):
            dummy = cache_seqlens
            return (q, k_cache, v_cache, out_part, lse_part, cache_seqlens,
                    dummy if block_table is None else block_table,
                    dummy if cache_batch_idx is None else cache_batch_idx,
                    dummy if alibi_slopes is None else alibi_slopes,
                    dummy if rotary_cos is None else rotary_cos, dummy if rotary_sin is None else rotary_sin,
                    dummy if cu_seqlens_q is None else cu_seqlens_q,
                    dummy if cache_leftpad is None else cache_leftpad,
                    *statics)

        launcher, grid = _launch_decode, (batch * nheads_k * cdiv(group * seqlen_q, block_m), num_splits)
        flags = dict(
            GROUP=group, HEADDIM=headdim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1,
            HAS_BATCH_IDX=cache_batch_idx is not None,
            SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
            HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
            ROTARY_DIM=rotary_dim, ROTARY_INTERLEAVED=rotary_interleaved, ROTARY_PER_ROW=rotary_per_row,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", VARLEN_Q=varlen,
            num_warps=num_warps, num_stages=num_stages,
        )
        if by_seq:  # only then (a sweep's baseline kernel may predate the flag)
            flags["PARTS_BY_SEQ"] = True
        if cache_leftpad is not None:  # the same
            flags["HAS_LEFTPAD"] = True
        args = build_all(q, k_cache, v_cache, out_part, lse_part, cache_seqlens, block_table, cache_batch_idx,
                         alibi_slopes, rotary_cos, rotary_sin, cache_leftpad, cu_seqlens_q)
        launcher(grid, *args, **flags)
        if record is not None:  # a packed call's tensors (3D q and out, 2D lse: the same pointers)
            record.add(launcher, grid, flags, lambda e, b=build_all: b(
                e.q, e.k_cache, e.v_cache, e.out_part, e.lse_part, e.seqlens_k, e.block_table, None, e.alibi_slopes,
                None, None, None, e.cu_seqlens_q), args)
    combine = None
    if num_splits > 1:
        combine = _combine(out_part, lse_part, out, lse, cu_seqlens_q if by_seq else None)
        if record is not None:
            record.add(*combine[:3], lambda e, b=combine[3], cu=by_seq: b(
                e.out_part, e.lse_part, e.out, e.lse, e.cu_seqlens_q if cu else None), combine[4])
            record.buffers["parts"] = (out_part.shape, lse_part.shape)
    if plan_key is not None:
        made = ((launcher, grid, flags, build_all, args), *(() if combine is None else (combine,)))
        _DECODE_PLANS.keep(plan_key, tensors, made, lambda launches: _DecodePlan(launches, num_splits))
    return out, lse


def _decode_buffers(q, num_splits: int, seqs: int = 0, rows: int = 0) -> tuple:
    """(out, lse, out_part, lse_part): the per-split fp32 buffers with splits, else out and lse again. ``seqs``
    > 0: the split buffers hold ``seqs`` sequences of ``rows`` rows (packed queries by sequence)."""
    batch, seqlen_q, nheads, headdim = q.shape
    out = q.new_empty(batch, seqlen_q, nheads, headdim)
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    if num_splits <= 1:
        return out, lse, out, lse
    if seqs:
        batch, seqlen_q = seqs, rows
    out_part = torch.empty(num_splits, batch, seqlen_q, nheads, headdim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(num_splits, batch, seqlen_q, nheads, dtype=torch.float32, device=q.device)
    return out, lse, out_part, lse_part


def _combine(out_part, lse_part, out, lse, cu_seqlens_q=None) -> tuple:
    """Launches the split combine; returns it as (launcher, grid, constexprs, builder, arguments), the builder
    taking (out_part, lse_part, out, lse) of another call of the same shapes. ``cu_seqlens_q``: the partial
    results are packed queries' by (sequence, row of it) (``_decode``'s ``by_seq``), out and lse one batch row."""
    num_splits, batch, seqlen_q, nheads, headdim = out_part.shape
    block_s = max(2, next_power_of_2(num_splits))
    block_d = max(16, next_power_of_2(headdim))
    statics = (*out_part.stride()[:4], *lse_part.stride(), out.stride(0), out.stride(1), out.stride(2),
               *lse.stride(), seqlen_q, num_splits)

    def build(out_part, lse_part, out, lse, cu_seqlens_q=None):
        return (out_part, lse_part, out, lse, lse if cu_seqlens_q is None else cu_seqlens_q, *statics)

    grid = (batch * seqlen_q, nheads)
    flags = dict(HEADDIM=headdim, BLOCK_S=block_s, BLOCK_D=block_d, VARLEN=cu_seqlens_q is not None,
                 num_warps=1 if block_s * block_d <= 1024 else (2 if block_s * block_d <= 4096 else 4))
    args = build(out_part, lse_part, out, lse, cu_seqlens_q)
    _launch_combine(grid, *args, **flags)
    return _launch_combine, grid, flags, build, args


# ---------------------------------------------------------------------------------------------------------
# Decode plans: a decode call through the public API (no tiles or Gluon config given) records its launches,
# worked out from shapes, with the compiled kernels its launchers found; the next call like it (same
# ``_decode_plan_key``) makes its outputs and launches them, with no support check, split rule, tile rule,
# descriptor layout or launcher key again. As the dense forward's (``attn_fwd_gluon.forward_plan_key``).


class _DecodePlan(NamedTuple):
    launches: tuple  # ((launcher, compiled entry, grid, builder), ...): the decode launch, then the split combine's
    num_splits: int


# ``IOATTN_DECODE_PLANS=0`` at import: none (every call takes the whole path).
_DECODE_PLANS = PlanTable("IOATTN_DECODE_PLANS")


def _describe(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _decode_plan_key(tensors: tuple, *scalars) -> tuple | None:
    """Everything a decode call's launches depend on but its tensors' data: the current device and Triton's
    knobs (``Launcher``'s key), every tensor's shape, strides, dtype and device (or its absence), the
    scalars (the new tokens' count, scale, window, softcap, rotary flags, the split count asked for), whether
    the Gluon path is on, the Gluon config and the SM counts the rules read (patched ones make new keys).
    None where plans or the direct launch are off, q is not on a GPU, or no call with q's and the cache's
    shapes came before (the first of a shape takes the whole path; ``PlanTable.sighted``). The tensors'
    alignment (Triton specialises pointers on it; the Gluon path needs it) and launch hooks are checked a
    call (``_decode_planned``)."""
    q, k_cache = tensors[0], tensors[1]
    if not (_DECODE_PLANS.active() and q.is_cuda and _DECODE_PLANS.sighted((q.shape, k_cache.shape))):
        return None
    return (*runtime_key(),
            *map(_describe, tensors), *scalars, gluon_enabled_on(q), GLUON_CONFIG, _sm_count(q.device),
            decode_gluon._num_sms(q.device))


def _decode_planned(key: tuple, tensors: tuple):
    """(out, lse) through the plan an earlier call with ``key`` left, or None where there is none or it does
    not apply now (unaligned data, launch hooks)."""
    plan = _DECODE_PLANS.ready(key, tensors)
    if plan is None:
        return None
    (launcher, entry, grid, build), *combine = plan.launches
    (q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, rotary_cos, rotary_sin,
     cache_leftpad) = tensors
    out, lse, out_part, lse_part = _decode_buffers(q, plan.num_splits)
    launcher.launch_entry(entry, grid, build(q, k_cache, v_cache, out_part, lse_part, cache_seqlens, block_table,
                                             cache_batch_idx, alibi_slopes, rotary_cos, rotary_sin, cache_leftpad))
    for c_launcher, c_entry, c_grid, c_build in combine:
        c_launcher.launch_entry(c_entry, c_grid, c_build(out_part, lse_part, out, lse))
    return out, lse


def _kv_write(k, v, k_cache, v_cache, slot_mapping, cache_seqlens, block_table, cache_batch_idx,
              rotary_cos, rotary_sin, rotary_interleaved):
    if slot_mapping is not None:
        # (num_tokens, nheads_k, d) seen as one sequence of num_tokens new tokens.
        k, v = k.unsqueeze(0), v.unsqueeze(0)
        addressing = kvw.SLOT_MAPPING.value
    else:
        addressing = (kvw.APPEND_PAGED if block_table is not None else kvw.APPEND_CONTIGUOUS).value
    batch, seqlen_new, nheads_k, headdim = k.shape
    if batch * seqlen_new == 0:
        return
    block_d = max(16, next_power_of_2(headdim))
    block_h = min(next_power_of_2(nheads_k), max(1, 4096 // block_d))
    rotary_dim = 0 if rotary_cos is None else 2 * rotary_cos.shape[1]
    paged = addressing != kvw.APPEND_CONTIGUOUS.value
    dummy = k_cache
    grid = (batch * seqlen_new, cdiv(nheads_k, block_h))
    _launch_kv_write(
        grid, k, v, k_cache, v_cache,
        slot_mapping if slot_mapping is not None else dummy,
        cache_seqlens if cache_seqlens is not None else dummy,
        block_table if block_table is not None else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        rotary_cos if rotary_dim else dummy, rotary_sin if rotary_dim else dummy,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if block_table is not None else 0,
        rotary_cos.stride(0) if rotary_dim else 0,
        seqlen_new, nheads_k,
        HEADDIM=headdim, BLOCK_H=block_h, BLOCK_D=block_d, PAGE_SIZE=k_cache.shape[1] if paged else 1,
        ADDRESSING=addressing, HAS_BATCH_IDX=cache_batch_idx is not None,
        ROTARY_DIM=rotary_dim, INTERLEAVED=rotary_interleaved, num_warps=4,
    )


def _kvcache_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None, cache_batch_idx: torch.Tensor | None, cache_leftpad: torch.Tensor | None,
    rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, seqlen_new: int, softmax_scale: float,
    window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
    rotary_per_row: bool, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (batch, seqlen_q, nheads, d) over cache positions [cache_leftpad[b], cache_seqlens[b] +
    seqlen_new) of each sequence (from 0 without cache_leftpad); returns out like q and lse float32 (batch,
    nheads, seqlen_q)."""
    if q.numel() == 0:  # a batch of none: nothing to attend (kv_write has appended nothing either)
        batch, seqlen_q, nheads, _ = q.shape
        return q.new_zeros(q.shape), q.new_empty(batch, nheads, seqlen_q, dtype=torch.float32)
    if select_backend(q.device) != "triton":  # the any-device path; num_splits is a kernel-only knob
        return kvcache_attention_torch(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx,
                                       cache_leftpad, rotary_cos, rotary_sin, alibi_slopes, seqlen_new,
                                       softmax_scale, window_left, window_right, softcap, rotary_interleaved,
                                       rotary_per_row)
    return _decode(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, rotary_cos, rotary_sin,
                   alibi_slopes, seqlen_new, softmax_scale, window_left, window_right, softcap,
                   rotary_interleaved, rotary_per_row, num_splits, cache_leftpad=cache_leftpad)


kvcache_attention = EagerOp("ioattn::kvcache_attention", _kvcache_attention)


@kvcache_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, rotary_cos, rotary_sin,
      alibi_slopes, seqlen_new, softmax_scale, window_left, window_right, softcap, rotary_interleaved,
      rotary_per_row, num_splits):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(batch, nheads, seqlen_q, dtype=torch.float32)


def _paged_varlen_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
    seqlens_k: torch.Tensor, block_table: torch.Tensor, alibi_slopes: torch.Tensor | None, max_seqlen_q: int,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed variable-length queries q (total_q, nheads, d) over a paged KV cache: sequence b's
    queries are rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]), its keys the first ``seqlens_k[b]`` positions of
    its pages ``block_table[b]``, aligned bottom-right. Returns out like q and lse float32 (nheads, total_q)."""
    if q.numel() == 0:  # no query rows
        return q.new_zeros(q.shape), q.new_empty(q.shape[1], 0, dtype=torch.float32)
    if select_backend(q.device) != "triton":
        return paged_varlen_attention_torch(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table,
                                            alibi_slopes, softmax_scale, window_left, window_right, softcap)
    tensors = (q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes)
    scalars = (max_seqlen_q, softmax_scale, window_left, window_right, softcap, num_splits)
    key = _paged_plan_key(tensors, scalars)
    if key is not None:
        planned = _paged_planned(key, tensors)
        if planned is not None:
            return planned
    record = None if key is None else Recording()
    route = "split"
    if num_splits <= 1 and gluon_paged_prefill_supported(q, k_cache, v_cache, alibi_slopes, softmax_scale, softcap):
        route = paged_varlen_route(q.shape[0], cu_seqlens_q.shape[0] - 1, max_seqlen_q)
    if route == "tiles":
        out, lse = gluon_paged_prefill(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes,
                                       max_seqlen_q, softmax_scale, window_left, window_right, softcap, record=record)
    else:
        short = max_seqlen_q
        if route == "mixed":
            wide = multi_row_others(q.shape[0], cu_seqlens_q.shape[0] - 1, max_seqlen_q)
            short = short_query_rows(q.shape[1] // k_cache.shape[2], wide)
        out, lse = _decode(q, k_cache, v_cache, seqlens_k, block_table, None, None, None, alibi_slopes, 0,
                           softmax_scale, window_left, window_right, softcap, True, False, num_splits,
                           cu_seqlens_q=cu_seqlens_q, max_seqlen_q=short, by_seq=route == "mixed", record=record)
        if route == "mixed":  # the longer sequences' rows
            gluon_paged_prefill(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes,
                                max_seqlen_q, softmax_scale, window_left, window_right, softcap, short_rows=short,
                                out=out, lse=lse, record=record)
    if record is not None:
        _PAGED_PLANS.keep(key, tensors, record.launches, lambda launches: _PagedPlan(
            launches, record.buffers.get("parts"), record.buffers.get("tile_list", 0)))
    return out, lse


# Paged varlen plans: the same for ``flash_attn_varlen_func(..., block_table=...)``, whose whole path works out a
# route, tiles, splits, descriptors and up to four launches (the split-KV kernel and its combine, the tile list
# and the Gluon tiles). A plan replays them on a call with the same shapes (total_q, the batch, max_seqlen_q
# included), as decode steps of a steady batch make.


class _PagedPlan(NamedTuple):
    launches: tuple  # ((launcher, compiled entry, grid, builder of a ``PagedTensors``), ...), in launch order
    parts: tuple | None  # the split buffers' shapes (out_part, lse_part), None without splits
    tile_list: int  # the tile list's length, 0 without one


_PAGED_PLANS = PlanTable("IOATTN_DECODE_PLANS")


def _paged_plan_key(tensors: tuple, scalars: tuple) -> tuple | None:
    """As ``_decode_plan_key``, for a paged varlen call: ``tensors`` (q, k_cache, v_cache, cu_seqlens_q,
    seqlens_k, block_table, alibi_slopes), ``scalars`` (max_seqlen_q, scale, window, softcap, num_splits); also
    the tiles' config for q's head dim. A shape's first call makes none (``PlanTable.sighted``)."""
    q, k_cache, cu_seqlens_q = tensors[0], tensors[1], tensors[3]
    if not (_PAGED_PLANS.active() and q.is_cuda
            and _PAGED_PLANS.sighted((q.shape, k_cache.shape, cu_seqlens_q.shape, scalars[0]))):
        return None
    return (*runtime_key(),
            *map(_describe, tensors), *scalars, gluon_enabled_on(q), decode_gluon.PAGED_CONFIGS.get(q.shape[-1]),
            _sm_count(q.device), decode_gluon._num_sms(q.device))


def _paged_planned(key: tuple, tensors: tuple):
    """(out, lse) through the plan an earlier paged varlen call with ``key`` left, or None (as ``_decode_planned``)."""
    plan = _PAGED_PLANS.ready(key, tensors)
    if plan is None:
        return None
    q = tensors[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    out_part = lse_part = tile_list = None
    if plan.parts is not None:
        out_part = torch.empty(plan.parts[0], dtype=torch.float32, device=q.device)
        lse_part = torch.empty(plan.parts[1], dtype=torch.float32, device=q.device)
    if plan.tile_list:
        tile_list = torch.empty(plan.tile_list, dtype=torch.int32, device=q.device)
    env = PagedTensors(*tensors, out, lse, out if out_part is None else out_part, lse if lse_part is None else lse_part,
                       tile_list)
    for launcher, entry, grid, build in plan.launches:
        launcher.launch_entry(entry, grid, build(env))
    return out, lse


paged_varlen_attention = EagerOp("ioattn::paged_varlen_attention", _paged_varlen_attention)


@paged_varlen_attention.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes, max_seqlen_q, softmax_scale,
      window_left, window_right, softcap, num_splits):
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


def _kv_write_op(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor | None, cache_seqlens: torch.Tensor | None,
    block_table: torch.Tensor | None, cache_batch_idx: torch.Tensor | None,
    rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None, rotary_interleaved: bool,
) -> None:
    """Writes new K/V tokens into the caches in place: by ``slot_mapping`` (k, v: (num_tokens, nheads_k, d))
    or appended at ``cache_seqlens`` (k, v: (batch, seqlen_new, nheads_k, d)), rotating k when cos/sin
    are given."""
    if k.numel() == 0:  # no token to write
        return
    write = _kv_write if select_backend(k.device) == "triton" else kv_write_torch
    write(k, v, k_cache, v_cache, slot_mapping, cache_seqlens, block_table, cache_batch_idx,
          rotary_cos, rotary_sin, rotary_interleaved)


kv_write = EagerOp("ioattn::kv_write", _kv_write_op, mutates_args=("k_cache", "v_cache"))


@kv_write.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, cache_seqlens, block_table, cache_batch_idx, rotary_cos,
      rotary_sin, rotary_interleaved):
    return None
