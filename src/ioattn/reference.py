"""The reference: plain, materialised attention with flash-attn 2.x semantics.

This is the single source of truth for every test, `ioattn check` and the benchmarks. It builds the full
(seqlen_q, seqlen_k) score matrix, so use it only at sizes where that fits in memory.

Semantics (identical for every ioattn entry point):

* Layout ``(batch, seqlen, nheads, headdim)``. Grouped-query / multi-query attention when
  ``nheads % nheads_k == 0``: query head ``h`` reads key/value head ``h // (nheads // nheads_k)``.
* Scores ``s[i, j] = softmax_scale * <q_i, k_j>`` with ``softmax_scale = 1 / sqrt(headdim)`` by default.
* Softcap (``softcap > 0``): ``s = softcap * tanh(s / softcap)``, applied before the bias and masks.
* ALiBi: ``s[i, j] += -slope_h * |i + seqlen_k - seqlen_q - j|``; slopes shaped ``(nheads,)`` or
  ``(batch, nheads)``.
* Masks align bottom-right: query row ``i`` sits at key position ``i + seqlen_k - seqlen_q``. With
  ``window_size=(left, right)`` (-1 = unbounded) key ``j`` is allowed when
  ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``. ``causal=True`` is the
  window with ``right = 0`` (and ``left`` as given).
* ``lse[b, h, i] = logsumexp_j s[i, j]`` over allowed keys, float32. A row with no allowed key has output
  0 and lse ``-inf``, never NaN.
* Dropout: ``dropout_mask`` (batch, nheads, seqlen_q, seqlen_k) bool, True = kept; kept probabilities are
  scaled by ``1 / (1 - dropout_p)``. The lse is that of the scores before dropout.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_ref", "attention_probs", "allowed_mask", "alibi_bias", "repeat_kv"]


def repeat_kv(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """Expand (batch, seqlen, nheads_k, d) to (batch, seqlen, nheads, d) for grouped-query attention."""
    nheads_k = x.shape[2]
    if nheads_k == nheads:
        return x
    return x.repeat_interleave(nheads // nheads_k, dim=2)


def allowed_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Bool (seqlen_q, seqlen_k) of allowed (query, key) pairs, bottom-right aligned; None if all are."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    row = torch.arange(seqlen_q, device=device).view(-1, 1) + (seqlen_k - seqlen_q)
    col = torch.arange(seqlen_k, device=device).view(1, -1)
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= col >= row - left
    if right >= 0:
        ok &= col <= row + right
    return ok


def alibi_bias(alibi_slopes: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """ALiBi bias (batch, nheads, seqlen_q, seqlen_k): ``-slope * |i + seqlen_k - seqlen_q - j|``."""
    slopes = alibi_slopes.double()
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0).expand(batch, -1)
    row = torch.arange(seqlen_q, device=slopes.device).view(-1, 1) + (seqlen_k - seqlen_q)
    col = torch.arange(seqlen_k, device=slopes.device).view(1, -1)
    dist = (row - col).abs().to(slopes.dtype)
    return -slopes[:, :, None, None] * dist


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
    reorder_ops: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised attention. Returns ``(out, lse)``: out like ``q`` (batch, seqlen_q, nheads, d_v) in
    q's dtype, lse float32 (batch, nheads, seqlen_q).

    ``upcast=True`` computes in float64 (the truth); ``upcast=False`` computes in the inputs' dtype, which
    is what "PyTorch doing the same math in low precision" means in the tolerance rule.
    ``reorder_ops=True`` folds the scale into k instead of q, a different rounding order of the same math.
    """
    dtype_og = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    scores, probs = _scores_and_probs(q, k, causal, window_size, softcap, alibi_slopes, softmax_scale, reorder_ops)
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhts,bshd->bthd", probs, repeat_kv(v, q.shape[2]))
    return out.to(dtype_og), lse.float()


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The attention probabilities before dropout, float32 (batch, nheads, seqlen_q, seqlen_k), computed in
    float64: 0 at disallowed pairs and in rows with no allowed key."""
    return _scores_and_probs(q.double(), k.double(), causal, window_size, softcap, alibi_slopes, softmax_scale,
                             False)[1].float()


def _scores_and_probs(q, k, causal, window_size, softcap, alibi_slopes, softmax_scale, reorder_ops):
    """(scores with -inf where masked, softmax probabilities with 0 in rows without an allowed key), both
    (batch, nheads, seqlen_q, seqlen_k) in q's dtype."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k = k.shape[1]
    k = repeat_kv(k, nheads)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, batch, seqlen_q, seqlen_k).to(device=q.device, dtype=scores.dtype)
    mask = allowed_mask(seqlen_q, seqlen_k, causal=causal, window_size=window_size, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        # Rows with no allowed key give NaN from softmax; the semantics say 0.
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return scores, probs
