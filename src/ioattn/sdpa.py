"""``torch.nn.functional.scaled_dot_product_attention`` on ioattn's kernels: same signature, same semantics.

Code written against SDPA's (..., heads, seqlen, headdim) layout calls ``ioattn.scaled_dot_product_attention``
unchanged, or installs it in SDPA's place (``torch.nn.functional.scaled_dot_product_attention = ...``): every
call ioattn can compute runs on its kernels, and every other call goes to the SDPA that torch had when ioattn
was imported, so nothing a model does stops working.

ioattn computes, where its Triton kernels run (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``) or
where ``IOATTN_BACKEND`` names a backend: float16 / bfloat16 / float32 inputs of at least three dimensions with
equal leading (batch) dimensions, one head dim (query's, key's and value's) up to 256, ``is_causal`` (SDPA's
top-left alignment), ``attn_mask`` None or a ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` /
``causal_lower_right``), dropout in [0, 1), ``scale`` > 0 and ``enable_gqa``. Every other call is torch's: a
tensor ``attn_mask``, value's head dim unlike query's, float64, broadcast batch dimensions, nested tensors and
other tensor subclasses, two-dimensional inputs, and calls on devices where ioattn would take its chunked
PyTorch path (a CPU without the interpreter, devices without Triton), where torch has fused kernels of its own.

Decoding steps (at most ``DECODE_ROWS`` query rows, no gradient, no dropout) run the KV-cache kernels over
key and value as a full cache, read in place (``flash_attn_with_kvcache``: split-KV, a GQA group's query heads
packed so each KV head is read once).

Layouts. ioattn's kernels read (batch, seqlen, heads, headdim) with the batches one after another along the
sequence; SDPA's callers hold (batch, heads, seqlen, headdim) tensors, often transposed views of the former (a
projection's output viewed as heads, then ``transpose(1, 2)``): those are passed through as they are. Tensors
laid out as (batch, heads, seqlen, headdim) in memory (a rotary embedding's output, torch's own attention
modules) are read as one batch of batch x heads heads instead, again without a copy: head h of batch b is
head b * heads + h, and with GQA its KV head b * heads_k + h // group is the one the grouping picks. A call
takes whichever reading copies fewer of its three tensors (the others are copied into it). The dropout mask
is the same under either reading (it is drawn by batch x heads plane), so the output does not depend on the
layout. The output is a (..., heads, seqlen, headdim) view: of (batch, seqlen, heads, headdim) memory, as SDPA's
flash and cuDNN backends return it, or of (seqlen, batch, heads, headdim) memory under the second reading.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .backend import select_backend
from .interface import flash_attn_func
from .kvcache import flash_attn_with_kvcache

# torch's SDPA as it was when ioattn was imported: the calls ioattn does not compute go there even after a user
# installs this function in its place.
_torch_sdpa = F.scaled_dot_product_attention

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEADDIM = 256
# Calls of at most this many query rows, without gradients or dropout, are decoding steps: they run the KV-cache
# kernels (split-KV over the keys, a GQA group's query heads packed so each KV head is read once).
DECODE_ROWS = 4
# Tensor types computed here. Not torch.overrides.has_torch_function: it is true for every call inside a torch
# function mode, a ``with torch.device(...)`` block included.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _causal_bias_variant(attn_mask) -> str | None:
    """'upper_left' / 'lower_right' for a ``CausalBias``, else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # an older torch: no CausalBias to recognise
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    return "lower_right" if attn_mask.variant == CausalVariant.LOWER_RIGHT else "upper_left"


def _computable(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple[bool, str | None]:
    """(whether ioattn computes the call, its causal alignment: None, 'upper_left' or 'lower_right')."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and not t.is_nested for t in tensors):
        return False, None
    if any(type(t) not in _PLAIN for t in tensors):  # tensor subclasses (DTensor, ...) dispatch through torch's
        return False, None
    if any(t.dim() < 3 or t.dim() != query.dim() for t in tensors):
        return False, None
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False, None
    if key.device != query.device or value.device != query.device:
        return False, None
    if key.shape[:-3] != query.shape[:-3] or value.shape[:-3] != query.shape[:-3]:
        return False, None
    d = query.shape[-1]
    if not 0 < d <= _MAX_HEADDIM or key.shape[-1] != d or value.shape[-1] != d:
        return False, None
    hq, hk = query.shape[-3], key.shape[-3]
    if value.shape[-3] != hk:
        return False, None
    if hk == 0 or (hq != hk and not (enable_gqa and hq % hk == 0)):
        return False, None
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return False, None
    if scale is not None and not (isinstance(scale, (int, float)) and 0.0 < scale < math.inf):
        return False, None  # torch takes any scale, zero and negative ones included
    variant = "upper_left" if is_causal else None
    if attn_mask is not None:
        variant = _causal_bias_variant(attn_mask)
        if variant is None or is_causal:  # is_causal with a mask: torch's error
            return False, None
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[-2], key.shape[-2]):
            return False, None
    if select_backend(query.device) == "chunked" and not os.environ.get("IOATTN_BACKEND", "").strip():
        # Where ioattn would take its chunked PyTorch path (CPU, devices without Triton), torch's own SDPA has
        # fused kernels: on a CPU its flash kernel ran 1.6-2.5x the chunked path (benchmarks/NOTES.md).
        return False, None
    return True, variant


def _batch_major(t: torch.Tensor) -> bool:
    """Whether t (B, H, L, E) read as (B, L, H, E) has its batches end to end along the sequence."""
    b, _, length, _ = t.shape
    return t.stride(-1) == 1 and (b == 1 or length == 1 or t.stride(0) == length * t.stride(2))


def _head_major(t: torch.Tensor) -> bool:
    """Whether t (B, H, L, E) merges its batch and head dims without a copy (one batch of B * H heads)."""
    b, h = t.shape[:2]
    return t.stride(-1) == 1 and (b == 1 or h == 1 or t.stride(0) == h * t.stride(1))


def _as_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, E) -> (1, L, B * H, E), a view (t must be ``_head_major``)."""
    b, h, length, e = t.shape
    return t.reshape(b * h, length, e).transpose(0, 1).unsqueeze(0)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` computed by ioattn.

    Arguments (as torch's):
        query: (..., heads, seqlen_q, headdim).
        key, value: (..., heads_k, seqlen_k, headdim); heads_k == heads, or with ``enable_gqa`` a divisor.
        attn_mask: None, or a ``CausalBias`` (``torch.nn.attention.bias.causal_upper_left`` /
            ``causal_lower_right``); any other mask runs torch's SDPA.
        dropout_p: dropout probability on the attention weights, applied whenever it is > 0 (as torch's).
        is_causal: a causal mask aligned top-left (row i sees keys 0..i), torch's convention;
            ``causal_lower_right`` aligns it bottom-right, as ``ioattn.flash_attn_func(causal=True)``.
        scale: scale of q k^T; default 1 / sqrt(headdim).
        enable_gqa: let heads_k divide heads (grouped-query attention).
    Returns: (..., heads, seqlen_q, headdim) in query's dtype, a view that is not contiguous (as SDPA's flash
    backend returns it). A query row that sees no key (lower-right causal with seqlen_q > seqlen_k) gets zeros,
    as torch's SDPA gives.
    Installed in SDPA's place, it computes what it can whatever ``torch.nn.attention.sdpa_kernel`` selects
    (a test that forces torch's math backend as its reference should call torch's function); tensor
    subclasses go to torch's SDPA.
    """
    if (isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor) and min(key.dim(), value.dim()) >= 2
            and not key.is_nested and key.shape[-2] != value.shape[-2]):
        # refused here: torch 2.13's CPU kernel reads past value's rows instead
        raise ValueError(f"key and value need the same sequence length, got {key.shape[-2]} and {value.shape[-2]}")
    ok, variant = _computable(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if not ok:
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    lead = query.shape[:-3]
    batch = math.prod(lead)
    hq, seqlen_q, d = query.shape[-3:]
    q, k, v = (t.reshape(batch, *t.shape[-3:]) for t in (query, key, value))
    causal, window = False, (-1, -1)
    if variant == "lower_right":
        causal = True
    elif variant == "upper_left":
        seqlen_k = k.shape[2]
        if seqlen_q <= seqlen_k:
            # Top-left: row i sees keys 0..i, so keys past the last row are never seen; bottom-right over the
            # first seqlen_q keys is the same mask.
            k, v, causal = k[:, :, :seqlen_q], v[:, :, :seqlen_q], True
        else:
            # Bottom-right, key j is allowed for j <= i + (seqlen_k - seqlen_q) + right: right = seqlen_q -
            # seqlen_k gives j <= i.
            window = (-1, seqlen_q - seqlen_k)
    if (seqlen_q <= DECODE_ROWS and batch > 0 and seqlen_q > 0 and k.shape[2] > 1 and dropout_p == 0
            and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        # A decoding step: the keys and values as a full contiguous cache, read in place (a cache's last dim must
        # be unit-stride: the KV-cache call copies none). One key (a first step) takes the attention kernels.
        out = flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                      causal=causal, window_size=window)
        return out.transpose(1, 2).reshape(*lead, hq, seqlen_q, d)
    tensors = (q, k, v)
    head_major = [_head_major(t) for t in tensors]
    batch_major = [_batch_major(t) for t in tensors]
    by_heads = batch > 0 and sum(head_major) > sum(batch_major)
    if by_heads:
        q, k, v = (_as_heads(t if ok else t.contiguous()) for t, ok in zip(tensors, head_major, strict=True))
    else:
        q, k, v = (t.transpose(1, 2) if ok else t.transpose(1, 2).contiguous()
                   for t, ok in zip(tensors, batch_major, strict=True))
    out = flash_attn_func(q, k, v, dropout_p=float(dropout_p), softmax_scale=scale, causal=causal,
                          window_size=window)
    if by_heads:
        # a view straight from (1, L, B x H, E): indexing out[0] would cost the backward a zeroed copy of dO
        out = out.view(seqlen_q, batch, hq, d).permute(1, 2, 0, 3)
    else:
        out = out.transpose(1, 2)
    return out.reshape(*lead, hq, seqlen_q, d)
