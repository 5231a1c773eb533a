"""The FlashAttention-2 op family: one custom op pair (fwd, bwd), one autograd.Function, and the dense and
varlen entry points as thin adapters onto them.

Dense calls pass ``cu_seqlens = None`` and the kernels take their ``IS_VARLEN=False`` branch. The dropout
seed is drawn before the forward op, on the inputs' device (``ioattn.dropout.call_seed``: a (1,) int64
tensor, no host read, so a captured CUDA graph draws a fresh one each replay), and is an input of both ops:
their kernels read it, the backward's to regenerate the forward's mask. Drawn outside the op, a call's seed is
a random op torch.compile keeps apart from another call's (a random draw inside an op that looks pure let
two calls with equal arguments be merged into one, with one mask).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..dropout import call_seed
from ..kernels.attn_fwd_gluon import forward_plan_key, gluon_forward, gluon_forward_planned, gluon_forward_supported
from ..kernels.common import check_grid_bounds
from ..kernels.launch import attn_bwd, attn_fwd, backward_plan_key, gluon_backward_planned, lse_shape, make_problem
from ._dispatch import EagerOp

__all__ = ["flash_attention", "flash_attention_varlen"]


def _flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
    softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse). ``seed``: with dropout the call's (1,) int64 seed tensor on q's device
    (``ioattn.dropout.call_seed``), else None.

    On Hopper the forward (dense or varlen, any mask, softcap, ALiBi, GQA, dropout) takes the Gluon kernel
    (TMA + async wgmma) where ``gluon_forward_supported`` says it applies and is faster; ``IOATTN_GLUON=0``
    turns it off. Both kernels drop the same elements for the same seed (``ioattn.dropout``)."""
    window = (window_left, window_right)
    _check_grid(q, cu_seqlens_q)
    if dropout_p > 0 and seed is None:
        raise ValueError("dropout_p > 0 needs the call's seed tensor (ioattn.dropout.call_seed)")
    if q.numel() == 0 or k.numel() == 0:  # no query or no key (a batch of none): nothing to launch
        lse = torch.full(lse_shape(q, cu_seqlens_q is not None), float("-inf"), dtype=torch.float32,
                         device=q.device)
        return q.new_zeros(q.shape), lse  # contiguous, as the kernels' outputs
    plan_key = None
    if cu_seqlens_q is None and alibi_slopes is None:
        # A dense call like earlier ones takes their plan: no support check, config or launch key again.
        plan_key = forward_plan_key(q, k, v, softmax_scale, window, softcap, dropout_p)
        planned = gluon_forward_planned(plan_key, q, k, v, dropout_p, seed)
        if planned is not None:
            return planned
    if gluon_forward_supported(q, k, v, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
                               dropout_p=dropout_p, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q):
        out, lse = gluon_forward(q, k, v, softmax_scale, window, softcap, alibi_slopes, cu_seqlens_q,
                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, plan_key=plan_key)
        return out, lse
    prob = make_problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                        window_right, softcap, dropout_p)
    return attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, prob, seed)


flash_attn_fwd = EagerOp("ioattn::flash_attn_fwd", _flash_attn_fwd)


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, softcap, alibi_slopes, dropout_p, seed):
    out = q.new_empty(q.shape)
    lse = q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return out, lse


def _flash_attn_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
    softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0 or k.numel() == 0:  # the forward's empty case: no gradient reaches anything
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    prob = make_problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                        window_right, softcap, dropout_p)
    seed_arg = seed if dropout_p > 0 else None  # the forward's seed tensor, read by the kernels, not here
    if dropout_p > 0 and seed is None:
        raise ValueError("dropout_p > 0 needs the forward's seed tensor")
    plan_key = None
    if cu_seqlens_q is None and alibi_slopes is None and not deterministic:
        # A dense backward like earlier ones takes their plan (their launches worked out).
        plan_key = backward_plan_key(dout, q, k, v, out, lse, prob)
        planned = gluon_backward_planned(plan_key, dout, q, k, v, out, lse, prob, seed_arg)
        if planned is not None:
            return planned
    return attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, prob, seed_arg,
                    deterministic, plan_key=plan_key)


flash_attn_bwd = EagerOp("ioattn::flash_attn_bwd", _flash_attn_bwd)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, softcap, alibi_slopes, dropout_p, seed, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class FlashAttnFunction(torch.autograd.Function):
    """The family's one autograd.Function: dense when cu_seqlens are None, varlen otherwise.

    ``deterministic`` picks the backward (``launch.attn_bwd``): False (flash-attn's default) the single
    pass with dQ summed by fp32 atomics, True the two-pass backward without atomics (bitwise reproducible).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                window_left, window_right, softcap, alibi_slopes, dropout_p, deterministic):
        seed = _call_seed(q, cu_seqlens_q, dropout_p)
        out, lse = flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed)
        ctx.params = (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                      dropout_p, deterministic)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # lse's gradient is never used: no zeros made for it
        return out, lse

    @staticmethod
    @once_differentiable  # no second derivative: a create_graph=True backward through it raises, not zeros
    def backward(ctx, dout, _dlse):
        if dout is None:  # grads are not materialised: nothing reached out
            return (None,) * 14
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed = ctx.saved_tensors
        if not dout.is_contiguous():
            # out's layout (contiguous): a gradient through a transpose or an expand would otherwise send the
            # Hopper backward, which needs dO's rows end to end, to the portable kernels.
            dout = dout.contiguous()
        (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, dropout_p,
         deterministic) = ctx.params
        dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                                    alibi_slopes, dropout_p, seed, deterministic)
        return dq, dk, dv, *([None] * 11)


def _forward_ad_level() -> int:
    """The innermost active forward-mode AD level, -1 when none."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1)


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, left, right,
               softcap, alibi_slopes, dropout_p, deterministic):
    """FlashAttnFunction where autograd may want a derivative (grad mode with an input that requires grad, or
    a forward-AD level, which the Function refuses with its own error); otherwise the forward op alone
    (inference: no autograd node to record, which is host time a call). Under
    ``torch.use_deterministic_algorithms(True)`` the backward is the deterministic one whatever ``deterministic``
    says, as PyTorch's own ops honour that switch."""
    if _forward_ad_level() >= 0 or torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
            or (alibi_slopes is not None and alibi_slopes.requires_grad)):
        deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
        return FlashAttnFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       softmax_scale, left, right, softcap, alibi_slopes, dropout_p, deterministic)
    return flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, left,
                          right, softcap, alibi_slopes, dropout_p, _call_seed(q, cu_seqlens_q, dropout_p))


def _call_seed(q, cu_seqlens_q, dropout_p: float) -> torch.Tensor | None:
    """The call's dropout seed (``ioattn.dropout.call_seed``; None without dropout), drawn after the grid's
    bound is checked (a refused call moves no generator) and for an empty call too (the generator moves as
    for any call)."""
    if dropout_p <= 0:
        return None
    _check_grid(q, cu_seqlens_q)
    return call_seed(q, dropout_p)


def _check_grid(q, cu_seqlens_q) -> None:
    """``check_grid_bounds`` for a dense or varlen call: its sequences and heads."""
    check_grid_bounds(q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1, q.shape[-2])


def flash_attention(q, k, v, *, softmax_scale: float, causal: bool, window_size: tuple[int, int],
                    softcap: float, alibi_slopes, dropout_p: float, deterministic: bool):
    """Dense attention: q (b, sq, h, d), k/v (b, sk, h_k, d) -> (out like q, lse float32 (b, h, sq)).
    ``window_size`` already has right = 0 when ``causal``; ``deterministic`` picks the backward."""
    left, right = window_size
    return _attention(q, k, v, None, None, q.shape[1], k.shape[1], softmax_scale, left, right, softcap,
                      alibi_slopes, dropout_p, deterministic)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                           softmax_scale: float, causal: bool, window_size: tuple[int, int], softcap: float,
                           alibi_slopes, dropout_p: float, deterministic: bool):
    """Varlen attention over packed (total, h, d) -> (out like q, lse float32 (h, total_q)).
    cu_seqlens are read only on the device; the grid comes from max_seqlen_q. ``deterministic`` picks the
    backward."""
    left, right = window_size
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, left, right,
                      softcap, alibi_slopes, dropout_p, deterministic)
