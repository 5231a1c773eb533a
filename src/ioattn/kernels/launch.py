"""Host launchers for the FlashAttention-2 kernels: allocate outputs, compute grids and strides, pick a
config. Dense inputs are (batch, seqlen, nheads, d); varlen inputs are (total, nheads, d) with
int32 cu_seqlens, read only inside the kernels (no host sync, CUDA-graph safe).

Inputs are never copied: the kernels take every stride, so q, k, v may be views of a packed qkv.
fp32 inputs run with ``input_precision="ieee"`` dots (true fp32, no TF32 rounding).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..backend import interpreting
from ..dropout import kernel_seed
from . import attn_bwd_gluon
from .attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .attn_bwd_gluon import gluon_backward, gluon_backward_supported
from .attn_fwd import attn_fwd_kernel
from .attn_fwd_gluon import device_capability, gluon_enabled_on
from .common import bh_grid
from .fastlaunch import (
    Launcher,
    PlanTable,
    TmaDesc,
    cdiv,
    next_power_of_2,
    runtime_key,
)

LOG2E = 1.4426950408889634


_launch_fwd = Launcher(attn_fwd_kernel)
_launch_preprocess = Launcher(attn_bwd_preprocess_kernel)
_launch_dq = Launcher(attn_bwd_dq_kernel)
_launch_dkdv = Launcher(attn_bwd_dkdv_kernel)


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# One table for every tunable choice, keyed by (kernel, padded head dim ceiling, causal); "interp" rows
# keep the interpreter fast. Hopper starting points: BLOCK_M 128, BLOCK_N 64, 8 warps (FA2 partitioning).
_CONFIGS: dict[tuple[str, int, bool], AttnConfig] = {
    # Hopper rows for headdims 64 and 128 (backward: 256 too): chosen by scripts/sweep_fa2.py on an H200
    # (benchmarks/NOTES.md, FA2 tuning v2 and Backward v3).
    ("fwd", 64, False): AttnConfig(128, 64, 8, 3),
    ("fwd", 64, True): AttnConfig(128, 64, 8, 3),
    ("fwd", 128, False): AttnConfig(128, 64, 8, 3),
    ("fwd", 128, True): AttnConfig(128, 64, 8, 4),
    ("fwd", 256, False): AttnConfig(64, 32, 4, 2),
    ("fwd", 256, True): AttnConfig(64, 32, 4, 2),
    # dK/dV programs: block_n keys held on chip, block_m queries streamed.
    # Triton 3.6 has miscompiled some shapes (wrong dK, wrong fwd output at (128, 64, 4 warps, 4 stages)):
    # the sweep checks every candidate against an fp32 reference before timing it.
    ("dkdv", 64, False): AttnConfig(32, 128, 4, 3),
    ("dkdv", 64, True): AttnConfig(128, 64, 4, 2),
    ("dkdv", 128, False): AttnConfig(64, 128, 8, 3),
    ("dkdv", 128, True): AttnConfig(64, 128, 8, 2),
    ("dkdv", 256, False): AttnConfig(64, 64, 8, 2),
    ("dkdv", 256, True): AttnConfig(64, 64, 8, 2),
    # dQ programs: block_m queries held on chip, block_n keys streamed.
    ("dq", 64, False): AttnConfig(128, 64, 8, 2),
    ("dq", 64, True): AttnConfig(64, 64, 4, 3),
    ("dq", 128, False): AttnConfig(128, 64, 8, 3),
    ("dq", 128, True): AttnConfig(128, 64, 8, 4),
    ("dq", 256, False): AttnConfig(64, 16, 4, 3),
    ("dq", 256, True): AttnConfig(64, 16, 4, 3),
    # Single-pass backward (deterministic=False): dK/dV programs that also add dQ's share into an fp32
    # buffer (TMA reduce-add on sm_90). Best rows of the Backward v4 sweep; used only where _SINGLE_PASS
    # says the single pass beat the two-pass backward in that sweep.
    ("fused", 64, False): AttnConfig(64, 128, 8, 3),
    ("fused", 64, True): AttnConfig(64, 128, 8, 3),
    ("fused", 128, False): AttnConfig(64, 128, 8, 3),
    ("fused", 128, True): AttnConfig(64, 128, 8, 2),
}
# (head dim ceiling, causal) where the single pass is faster on an H200 (benchmarks/NOTES.md, Backward v4):
# d=128 causal (+5% at 16k, even at 2k-4k); at d=64 and d=128 non-causal it lost 4-11%.
_SINGLE_PASS = {(128, True)}
# With dropout the mask's Philox work dominates a backward tile, and the two-pass backward draws it twice (the
# dK/dV and the dQ programs); the single pass draws it once: with dropout it takes d = 64 (+34-40% on an H200;
# d = 128 non-causal lost 14%: benchmarks/NOTES.md, "Dropout backward"). False restores the rule above (A/B).
DROPOUT_SINGLE_PASS = True
# Softcap's tanh in the backward: tanh.approx (the kernels take it for 16-bit inputs only) except in the
# non-causal dQ kernel at head dims up to 64, whose (128, 64, 8, 2) build ptxas (CUDA 12.8, bundled with
# Triton 3.6) schedules with a cp.async address hazard when tanh.approx is in it: it faulted at d = 48 on an
# H200 (benchmarks/NOTES.md, "Backward fast tanh"; scripts/compile_bwd.py --dq screens builds for it).
_INTERP_CONFIG = AttnConfig(32, 32, 1, 1)  # fewer, larger tiles: interpreter cost is per op
_OVERRIDES: dict[tuple[str, int, bool], AttnConfig] = {}


@contextlib.contextmanager
def configs_overridden(table: dict[tuple[str, int, bool], AttnConfig]) -> Iterator[None]:
    """Replace table entries while the block runs (``scripts/sweep_fa2.py`` times candidates this way)."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(table)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _ceiling(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def single_pass_backward(block_d: int, causal: bool, dropout: bool = False) -> bool:
    """Whether the non-deterministic backward takes the single pass (an override forces it, for sweeps)."""
    ceiling = _ceiling(block_d)
    return (("fused", ceiling, causal) in _OVERRIDES or (ceiling, causal) in _SINGLE_PASS
            or (dropout and DROPOUT_SINGLE_PASS and ceiling == 64))


def get_config(kernel: str, block_d: int, causal: bool, dtype: torch.dtype, dropout: bool = False) -> AttnConfig:
    """The tile shape of ``kernel``; with ``dropout`` at least 32 keys a tile (``ioattn.dropout`` draws its
    keep mask per group of 32 keys)."""
    cfg = _get_config(kernel, block_d, causal, dtype)
    if dropout and cfg.block_n < 32:
        cfg = replace(cfg, block_n=32)
    return cfg


def _get_config(kernel: str, block_d: int, causal: bool, dtype: torch.dtype) -> AttnConfig:
    ceiling = _ceiling(block_d)
    key = (kernel, ceiling, causal)
    if key in _OVERRIDES:
        cfg = _OVERRIDES[key]
    elif interpreting():
        return _INTERP_CONFIG
    else:
        cfg = _CONFIGS[key]
    if dtype == torch.float32:
        # 4-byte tiles: halve the held tile and keep two stages (one at d=256) so shared memory fits
        # (<= 227 KB on Hopper).
        held_m = kernel not in ("dkdv", "fused")
        return AttnConfig(max(16, cfg.block_m // 2) if held_m else cfg.block_m,
                          cfg.block_n if held_m else max(16, cfg.block_n // 2),
                          cfg.num_warps, min(cfg.num_stages, 1 if ceiling == 256 else 2))
    return cfg


def _block_d(headdim: int) -> int:
    # tl.dot needs every dimension >= 16; lanes past headdim are masked in the kernel, never padded here.
    return max(16, next_power_of_2(headdim))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _seq_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides; a varlen tensor has no batch dimension (stride 0)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


class Problem(NamedTuple):
    """Everything a launch needs besides the tensors, derived once from the inputs (a tuple: made every call,
    in a fraction of a frozen dataclass's time)."""

    batch: int
    nheads: int
    nheads_k: int
    headdim: int
    max_seqlen_q: int
    max_seqlen_k: int
    varlen: bool
    softmax_scale: float
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float

    @property
    def causal(self) -> bool:
        return self.window_right == 0

    def flags(self, dtype: torch.dtype, alibi: bool) -> dict:
        return {
            "HEAD_DIM": self.headdim,
            "BLOCK_D": _block_d(self.headdim),
            "IS_VARLEN": self.varlen,
            "SOFTCAP": self.softcap > 0,
            "HAS_ALIBI": alibi,
            "HAS_LEFT": self.window_left >= 0,
            "HAS_RIGHT": self.window_right >= 0,
            "DROPOUT": self.dropout_p > 0,
            "DOT_PRECISION": _dot_precision(dtype),
        }

    def log2_units(self) -> tuple[float, float]:
        """(qk_scale, softcap2) for ``common.apply_softcap``: log2(e) folded into the scale (exp2)."""
        if self.softcap > 0:
            return self.softmax_scale / self.softcap, self.softcap * LOG2E
        return self.softmax_scale * LOG2E, 0.0


def make_problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                 softcap, dropout_p) -> Problem:
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
    else:
        batch, max_seqlen_q, max_seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    return Problem(batch, q.shape[-2], k.shape[-2], q.shape[-1], max_seqlen_q, max_seqlen_k, varlen,
                   softmax_scale, window_left, window_right, softcap, dropout_p)


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """(batch, nheads, seqlen_q) dense, (nheads, total_q) varlen."""
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _alibi_args(alibi_slopes: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    if alibi_slopes is None:
        return dummy, 0
    slopes = alibi_slopes.contiguous()  # (nheads,) or (batch, nheads) float32: tiny, not a user input tensor
    return slopes, (slopes.stride(0) if slopes.dim() == 2 else 0)


def attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, prob: Problem, seed: int | torch.Tensor | None):
    """Returns (out, lse): out like q (contiguous), lse float32 of ``lse_shape``. ``seed``: the call's dropout
    seed (``ioattn.dropout.kernel_seed`` takes an int or a seed tensor; unused without dropout)."""
    seed = kernel_seed(seed, prob.dropout_p, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(q, prob.varlen), dtype=torch.float32, device=q.device)
    cfg = get_config("fwd", _block_d(prob.headdim), prob.causal, q.dtype, prob.dropout_p > 0)
    grid = bh_grid(cdiv(prob.max_seqlen_q, cfg.block_m), prob.nheads, prob.batch)
    if math.prod(grid) == 0:
        return out, lse
    slopes, stride_ab = _alibi_args(alibi_slopes, q)
    qk_scale, softcap2 = prob.log2_units()
    _launch_fwd(
        grid, q, k, v, out, lse,
        cu_seqlens_q if prob.varlen else q, cu_seqlens_k if prob.varlen else q, slopes,
        *_seq_strides(q, prob.varlen), *_seq_strides(k, prob.varlen), *_seq_strides(v, prob.varlen),
        *_seq_strides(out, prob.varlen), *_lse_strides(lse, prob.varlen), stride_ab,
        prob.nheads, prob.nheads // prob.nheads_k, prob.max_seqlen_q, prob.max_seqlen_k,
        qk_scale, softcap2, prob.window_left, prob.window_right, prob.dropout_p, seed,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        BH_AXES=len(grid) == 3, **prob.flags(q.dtype, alibi_slopes is not None),
    )
    return out, lse


def _fused_dq_buffer(q: torch.Tensor, prob: Problem, block_d: int, block_m: int, tma: bool):
    """(fp32 zeroed buffer (z, rows, block_d), rows, descriptor or None) for the single-pass backward:
    z = batch * nheads and rows = seqlen_q dense, z = nheads and rows = total_q varlen."""
    rows = q.shape[0] if prob.varlen else prob.max_seqlen_q
    z = prob.nheads if prob.varlen else prob.batch * prob.nheads
    acc = torch.zeros((z, rows, block_d), dtype=torch.float32, device=q.device)
    desc = None
    if tma:
        desc = TmaDesc(acc, tuple(acc.shape), acc.stride(), (1, block_m, block_d))
    return acc, rows, desc


def _fused_dq_out(acc: torch.Tensor, dq: torch.Tensor, prob: Problem) -> torch.Tensor:
    """Copies the fp32 (z, rows, block_d) buffer into dq (the inputs' layout and dtype)."""
    d = prob.headdim
    if prob.varlen:
        dq.copy_(acc[..., :d].transpose(0, 1))
    else:
        dq.copy_(acc.view(prob.batch, prob.nheads, prob.max_seqlen_q, -1)[..., :d].transpose(1, 2))
    return dq


def _tma_reduce_available(t: torch.Tensor) -> bool:
    return t.is_cuda and not interpreting() and device_capability(t.device)[0] >= 9


def _dq_under_wave_buffers(q: torch.Tensor, prob: Problem, fused: bool, unused: torch.Tensor):
    """(dq, done) of a backward whose dQ ``dq_convert_kernel`` converts (``fused``): dQ in q's dtype and the
    int32 counts the conversion waits on (zeroed by the preprocess); else (None, ``unused``)."""
    if not fused:
        return None, unused
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(prob.batch * prob.nheads, dtype=torch.int32, device=q.device))


def _preprocess_builder(out, dout, lse_strides: tuple, dq_acc, prob: Problem):
    """The delta preprocess's positional arguments from one call's tensors, ``build(out, dout, delta, cu_q,
    dq, done)``: ``dq`` the fp32 buffer it zeroes (``dq_acc`` here; None: it zeroes none, and ``dq`` is any
    tensor), ``done`` the int32 counts it zeroes with ZERO_DONE (else any tensor). The strides are these
    tensors'; holds no tensor, so a plan keeps none alive."""
    statics = (*_seq_strides(out, prob.varlen), *_seq_strides(dout, prob.varlen), *lse_strides,
               *((0, 0, 0) if dq_acc is None else _seq_strides(dq_acc, False)), prob.nheads, prob.max_seqlen_q)

    def build(out, dout, delta, cu_q, dq, done):
        return (out, dout, delta, cu_q, dq, done, *statics)

    return build


def attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, prob: Problem,
             seed: int | torch.Tensor | None, deterministic: bool = False, *, plan_key: tuple | None = None):
    """Returns (dq, dk, dv), contiguous, in the inputs' dtype.

    ``deterministic=False`` (flash-attn's default) takes FA2's single pass where it measured faster
    (``_SINGLE_PASS``, and with dropout; always under the interpreter, so CI covers it): the dK/dV programs also
    add dQ's share into an fp32 buffer (one TMA reduce-add per tile on sm_90, fp32 atomics elsewhere), five
    products per tile instead of seven, one draw of the dropout mask instead of two; the order of those
    additions varies from run to run, so dQ may differ in its last bits. Otherwise, and always with
    ``deterministic=True``, a separate dQ pass runs: no atomics, bitwise reproducible. On sm_90 the
    backward takes the Gluon warp-specialised single pass where it measured faster (d = 64, 128 and 256;
    ``attn_bwd_gluon.py``, its ``gluon_backward_supported`` says where and how ``IOATTN_GLUON_BWD`` changes
    that); with ``deterministic=True`` its key blocks add into each dQ block
    in a fixed order, so it is bitwise reproducible too.
    ``plan_key`` (``backward_plan_key`` of these arguments) records a plan of a dense Gluon backward's launches
    that ``gluon_backward_planned`` takes for the next backwards like it. ``seed``: the forward's (an int or
    its seed tensor, ``ioattn.dropout.kernel_seed``).
    """
    seed = kernel_seed(seed, prob.dropout_p, q.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()  # the incoming gradient, not a user input: the kernels need unit d-stride
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    bd = _block_d(prob.headdim)
    lse_strides = _lse_strides(lse, prob.varlen)
    qk_scale, softcap2 = prob.log2_units()
    cu_q = cu_seqlens_q if prob.varlen else q
    gluon = gluon_backward_supported(q, k, v, dout, dropout_p=prob.dropout_p, alibi_slopes=alibi_slopes,
                                     cu_seqlens_q=cu_seqlens_q)

    cfg = get_config("dq", bd, prob.causal, q.dtype, prob.dropout_p > 0)
    grid = bh_grid(cdiv(prob.max_seqlen_q, cfg.block_m), prob.nheads, prob.batch)
    # Hopper: the Gluon single pass (kernels/attn_bwd_gluon.py) sums dQ in an fp32 buffer laid out as dq, so
    # that its conversion is one contiguous copy. Dense rows are all covered by the preprocess grid, which
    # zeroes them; varlen rows past the last sequence would not be.
    zero_dq = gluon and not prob.varlen and math.prod(grid) > 0
    # Dense inputs at d <= 128: the conversion of dQ runs under the attention kernel's last wave
    # (attn_bwd_gluon.dq_convert_kernel), counting finished programs in ``done``, which the preprocess zeroes.
    fused = zero_dq and prob.max_seqlen_k > 0 and attn_bwd_gluon.fused_dq_convert(prob.headdim)
    dq, done = _dq_under_wave_buffers(q, prob, fused, delta)
    if gluon:
        dq_acc = (torch.empty if zero_dq else torch.zeros)(q.shape, dtype=torch.float32, device=q.device)
    if math.prod(grid) > 0:
        build_pre = _preprocess_builder(out, dout, lse_strides, dq_acc if zero_dq else None, prob)
        pre_args = build_pre(out, dout, delta, cu_q, dq_acc if zero_dq else delta, done)
        pre_flags = dict(HEAD_DIM=prob.headdim, BLOCK_D=bd, BLOCK_M=cfg.block_m, IS_VARLEN=prob.varlen,
                         ZERO_DQ=zero_dq, ZERO_DONE=fused, BH_AXES=len(grid) == 3)
        _launch_preprocess(grid, *pre_args, **pre_flags)
    if gluon:
        made = gluon_backward(dout, q, k, v, lse, delta, dk, dv, dq_acc, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                              batch=prob.batch, max_seqlen_q=prob.max_seqlen_q, max_seqlen_k=prob.max_seqlen_k,
                              softmax_scale=prob.softmax_scale, qk_scale=qk_scale, softcap2=softcap2,
                              window_size=(prob.window_left, prob.window_right), deterministic=deterministic,
                              dropout_p=prob.dropout_p, seed=seed, dq=dq, done=done)
        if plan_key is not None and zero_dq and alibi_slopes is None and not deterministic:
            _record_bwd_plan(plan_key, (q, k, v, dout, out, lse, seed if prob.dropout_p > 0 else None),
                             (_launch_preprocess, grid, pre_flags, build_pre, pre_args), made)
        return (dq if fused else dq_acc.to(q.dtype)), dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # The portable kernels' arguments (host time the Gluon path does not spend).
    flags = prob.flags(q.dtype, alibi_slopes is not None)
    slopes, stride_ab = _alibi_args(alibi_slopes, q)
    cu_k = cu_seqlens_k if prob.varlen else q
    scalars = (prob.softmax_scale, qk_scale, softcap2, prob.window_left, prob.window_right, prob.dropout_p, seed)
    qkv_do_strides = (*_seq_strides(q, prob.varlen), *_seq_strides(k, prob.varlen),
                      *_seq_strides(v, prob.varlen), *_seq_strides(dout, prob.varlen))
    fused = not deterministic and (interpreting() or single_pass_backward(bd, prob.causal, prob.dropout_p > 0))
    if math.prod(grid) > 0:
        if not fused:
            _launch_dq(
                grid, q, k, v, dout, lse, delta, dq, cu_q, cu_k, slopes,
                *qkv_do_strides, *_seq_strides(dq, prob.varlen), *lse_strides, stride_ab,
                prob.nheads, prob.nheads // prob.nheads_k, prob.max_seqlen_q, prob.max_seqlen_k, *scalars,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                FAST_TANH=bd > 64 or prob.causal, BH_AXES=len(grid) == 3, **flags,
            )
    cfg = get_config("fused" if fused else "dkdv", bd, prob.causal, q.dtype, prob.dropout_p > 0)
    grid = bh_grid(cdiv(prob.max_seqlen_k, cfg.block_n), prob.nheads_k, prob.batch)
    if fused:
        # No bulk reduce-add into an empty buffer (seqlen_q = 0): a descriptor needs rows.
        tma = _tma_reduce_available(q) and (q.shape[0] if prob.varlen else prob.max_seqlen_q) > 0
        dq_acc, dq_rows, dq_desc = _fused_dq_buffer(q, prob, bd, cfg.block_m, tma)
    else:
        tma, dq_acc, dq_rows, dq_desc = False, q, 0, None
    if math.prod(grid) > 0:
        _launch_dkdv(
            grid, q, k, v, dout, lse, delta, dk, dv, dq_acc, dq_desc, cu_q, cu_k, slopes,
            *qkv_do_strides, *_seq_strides(dk, prob.varlen), *_seq_strides(dv, prob.varlen),
            *lse_strides, stride_ab,
            prob.nheads, prob.nheads_k, prob.nheads // prob.nheads_k, prob.max_seqlen_q, prob.max_seqlen_k,
            dq_rows, *scalars,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            FUSED_DQ=fused, DQ_TMA=tma, FAST_TANH=True, BH_AXES=len(grid) == 3, **flags,
        )
    if fused:
        _fused_dq_out(dq_acc, dq, prob)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Backward plans: a dense Gluon backward (no ALiBi, not deterministic) records its launches, worked out from
# shapes, with the compiled kernels its launchers found; the next backward like it (``backward_plan_key``) makes
# its buffers and launches them, with no support check, config, descriptor layout or specialisation key again.


class _BwdPlan(NamedTuple):
    launches: tuple  # ((launcher, compiled entry, grid, build), ...): the delta preprocess first
    parts_shape: tuple | None
    fused: bool  # dQ converted by the plan's launches (``dq_convert_kernel``), not after them


# Plans by what decides a backward's launches (``backward_plan_key``). ``IOATTN_BWD_PLANS=0`` at import: none
# (every backward takes the whole path).
_BWD_PLANS = PlanTable("IOATTN_BWD_PLANS")


def backward_plan_key(dout, q, k, v, out, lse, prob: Problem) -> tuple | None:
    """Everything a dense backward's launches depend on but its tensors' data: the current device and Triton's knobs
    (``Launcher``'s key), every tensor's shape, strides, dtype and device, the problem's scalars (with dropout the
    seed is a tensor, checked for alignment a call like the others), the configs and SM count the host reads
    (patched ones make new plans), ``IOATTN_GLUON_BWD`` (which routes some inputs) and
    ``attn_bwd_gluon.DQ_CONVERT_UNDER_WAVE``. None where plans or the direct launch are off, the Gluon path is
    (``gluon_enabled_on``), dO has no unit d-stride (``attn_bwd`` copies it) or the Gluon backward has no config for
    the head dim (no plan could apply), or no backward with q's and k's shapes came before (the first of a shape
    takes the whole path; ``PlanTable.sighted``). The tensors' alignment and launch hooks are checked a call
    (``gluon_backward_planned``)."""
    d = q.shape[-1]
    if (not _BWD_PLANS.active() or dout.stride(-1) != 1 or d not in attn_bwd_gluon._CONFIGS
            or not _BWD_PLANS.sighted((q.shape, k.shape)) or not gluon_enabled_on(q)):
        return None
    dropout = prob.dropout_p > 0
    return (*runtime_key(),
            dout.shape, dout.stride(), q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
            out.shape, out.stride(), lse.shape, lse.stride(), dout.dtype, q.dtype, k.dtype, v.dtype, out.dtype,
            lse.dtype, dout.device, q.device, k.device, v.device, out.device, lse.device, prob.softmax_scale,
            prob.window_left, prob.window_right, prob.softcap, dropout,
            attn_bwd_gluon.select_config(d, prob.softcap != 0.0, dropout),
            _dq_table_entry(_block_d(d), prob.causal), attn_bwd_gluon._num_sms(q.device),
            os.environ.get("IOATTN_GLUON_BWD", "").strip(), attn_bwd_gluon.DQ_CONVERT_UNDER_WAVE)


def _dq_table_entry(block_d: int, causal: bool) -> tuple:
    """What ``get_config("dq", ...)`` reads from the tables (compiled Triton; the dtype and dropout it also
    reads are in the plan key): the override and the shipped entry, without its microseconds of env reads."""
    key = ("dq", _ceiling(block_d), causal)
    return _OVERRIDES.get(key), _CONFIGS.get(key)


def _record_bwd_plan(key: tuple, tensors: tuple, pre: tuple, made: list) -> None:
    """Keeps the launches ``attn_bwd`` just made for ``key`` (``PlanTable.keep``: ``tensors`` aligned, every
    launcher found a compiled kernel): ``pre`` the delta preprocess's (launcher, grid, flags, build, arguments),
    ``made`` ``gluon_backward``'s."""
    parts_shape = next((tuple(args[0].shape) for launch, args in made
                        if launch.launcher is attn_bwd_gluon._launch_tail_sum), None)
    fused = any(launch.launcher is attn_bwd_gluon._launch_dq_convert for launch, _ in made)
    _BWD_PLANS.keep(key, tensors, (pre, *((launch.launcher, launch.grid, launch.flags, launch.build, args)
                                          for launch, args in made)),
                    lambda launches: _BwdPlan(launches, parts_shape, fused))


def gluon_backward_planned(plan_key: tuple | None, dout, q, k, v, out, lse, prob: Problem,
                           seed: torch.Tensor | None):
    """(dq, dk, dv) of a dense backward through the plan earlier backwards with the same ``plan_key``
    (``backward_plan_key``) left, or None where there is none or it does not apply now (unaligned data, launch
    hooks). The key holds every tensor's device and ``IOATTN_GLUON_BWD``, and is None with the Gluon path off.
    ``seed``: the forward's seed tensor with dropout, else None."""
    plan = _BWD_PLANS.ready(plan_key, (q, k, v, dout, out, lse, seed))
    if plan is None:
        return None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    dq_acc = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # the preprocess zeroes it
    parts = lse if plan.parts_shape is None else torch.empty(plan.parts_shape, dtype=torch.float32,
                                                               device=q.device)
    dq, done = _dq_under_wave_buffers(q, prob, plan.fused, lse)
    p = float(prob.dropout_p)
    (pre, pre_entry, pre_grid, build_pre), *rest = plan.launches
    pre.launch_entry(pre_entry, pre_grid, build_pre(out, dout, delta, q, dq_acc, done))
    for launcher, entry, grid, build in rest:
        launcher.launch_entry(entry, grid, build(dout, q, k, v, lse, delta, dk, dv, dq_acc, parts, lse, lse, lse, lse,
                                                 0 if seed is None else seed, p, dq, done))
    return (dq if plan.fused else dq_acc.to(q.dtype)), dk, dv
