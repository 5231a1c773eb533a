"""Public attention functions with flash-attn 2.x names, layout and return conventions.

Every function validates its arguments here, once, then hands them to one core op per backend
(``ioattn.backend`` says which): the Triton kernels (``ioattn.ops.attention``) or the chunked
pure-PyTorch path (``ioattn.chunked``). The packed variants are thin adapters onto the same ops.
"""

from __future__ import annotations

import math

import torch

from . import validation as V
from .backend import select_backend

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]


def _options(q, headdim, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, batch, nheads):
    window = V.check_window(window_size)
    softcap = V.check_scalars(dropout_p, softcap, softmax_scale)
    V.check_alibi(alibi_slopes, batch, nheads, q.device)
    if causal:
        window = (window[0], 0)
    return {
        "softmax_scale": float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(headdim),
        "causal": bool(causal),
        "window_size": window,
        "softcap": float(softcap),
        "alibi_slopes": alibi_slopes,
        "dropout_p": float(dropout_p),
    }


def _finish(out, lse, return_attn_probs, s_dmask=None):
    """flash-attn's returns: out, or (out, softmax_lse, S_dmask); S_dmask an empty tensor without dropout (as
    flash-attn's), else what ``_s_dmask`` made."""
    if not return_attn_probs:
        return out
    return out, lse, (torch.empty((0,), dtype=out.dtype, device=out.device) if s_dmask is None else s_dmask)


def _rng_before(dropout_p: float, return_attn_probs: bool, device: torch.device):
    """The state of ``device``'s generator before a call whose S_dmask needs its dropout seed (the call draws
    it there first, ``ioattn.dropout.call_seed``) as a 1-tuple (its item None on meta tensors), else None."""
    if not (return_attn_probs and dropout_p > 0):
        return None
    from .dropout import rng_state

    return (rng_state(device),)


def _s_dmask(state, q, k, opts, cu_seqlens=None, max_seqlens=None):
    """flash-attn's S_dmask (testing only, O(seqlen_q * seqlen_k) memory): the attention probabilities
    before dropout, float64-computed, in q's dtype, negated where the call's dropout mask dropped them;
    (batch, nheads, seqlen_q, seqlen_k), varlen (batch, nheads, max_seqlen_q, max_seqlen_k) with each
    sequence's block at the top left and zeros past it. ``state``: ``_rng_before``'s, from which the seed the
    call drew is drawn again."""
    from .dropout import draw_seed, dropout_keep_mask, generator_at
    from .reference import attention_probs

    (state,) = state
    # (meta tensors have no generator, and their S_dmask no values)
    seed = 0 if state is None else draw_seed(q.device, generator_at(state, q.device))
    p = opts["dropout_p"]
    mods = dict(window_size=opts["window_size"], softcap=opts["softcap"], softmax_scale=opts["softmax_scale"])
    q, k, slopes = q.detach(), k.detach(), opts["alibi_slopes"]
    nheads = q.shape[-2]
    if cu_seqlens is None:
        probs = attention_probs(q, k, alibi_slopes=slopes, **mods)
        keep = dropout_keep_mask(seed, q.shape[0], nheads, q.shape[1], k.shape[1], p, q.device)
        return torch.where(keep, probs, -probs).to(q.dtype)
    starts_q, starts_k = (c.tolist() for c in cu_seqlens)
    batch = len(starts_q) - 1
    grid_q, grid_k = max_seqlens
    out = torch.zeros(batch, nheads, grid_q, grid_k, dtype=q.dtype, device=q.device)
    for b in range(batch):
        (q0, q1), (k0, k1) = starts_q[b:b + 2], starts_k[b:b + 2]
        if q1 == q0 or k1 == k0:
            continue
        slopes_b = slopes[b:b + 1] if slopes is not None and slopes.dim() == 2 else slopes
        probs = attention_probs(q[None, q0:q1], k[None, k0:k1], alibi_slopes=slopes_b, **mods)
        keep = dropout_keep_mask(seed, batch, nheads, grid_q, grid_k, p, q.device, batch_index=b, q_len=q1 - q0,
                                 k_len=k1 - k0)
        out[b, :, :q1 - q0, :k1 - k0] = torch.where(keep, probs, -probs)[0]
    return out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Exact attention, ``softmax(q k^T * softmax_scale) v``, without materialising the score matrix.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16 / bfloat16 / float32.
        k: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (MQA/GQA).
        v: (batch, seqlen_k, nheads_k, headdim).
        dropout_p: dropout probability on the attention weights (use 0.0 at evaluation).
        softmax_scale: scale of q k^T before the softmax; default 1 / sqrt(headdim).
        causal: causal mask, aligned to the bottom-right corner when seqlen_q != seqlen_k.
        window_size: (left, right) sliding window; a negative side (-1) is unbounded on that side (a side past
            2^29 counts as 2^29, which reaches every key of sequences up to 2^28 tokens).
        softcap: if > 0, scores become softcap * tanh(scores / softcap); <= 0 is off.
        alibi_slopes: float32 (nheads,) or (batch, nheads); adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: flash-attn's switch for a bitwise-reproducible backward. False takes the single-pass
            backward, whose dQ is summed with fp32 atomics (its last bits may vary between runs); True
            sums dQ in a fixed order (the Hopper kernel: key blocks take turns) or runs a separate dQ pass
            without atomics (elsewhere): bitwise reproducible, somewhat slower. True as well under
            ``torch.use_deterministic_algorithms(True)``.
        return_attn_probs: also return the log-sum-exp and flash-attn's S_dmask (for testing, as there).
    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype.
        softmax_lse (if return_attn_probs): float32 (batch, nheads, seqlen_q); -inf for a row with no key
            (flash-attn writes +inf there; -inf is log(0), which merges of partial results by lse take as is).
        S_dmask (if return_attn_probs): flash-attn's testing output. Without dropout an empty tensor, as
            there; with dropout the attention probabilities before dropout (batch, nheads, seqlen_q,
            seqlen_k) in q's dtype, negative where the call dropped them (flash-attn's sign convention; its
            values are unnormalised, its tests normalise them, and it pads both lengths to multiples of 128:
            ``[..., :seqlen_q, :seqlen_k]`` reads either). Materialised after the call from the seed it drew:
            O(seqlen_q * seqlen_k) memory, and under ``torch.compile`` a graph break.
    q, k, v whose last dimension is not contiguous are copied first (flash-attn's ``maybe_contiguous``).
    """
    q, k, v, (nheads, _, headdim) = V.qkv_unit_stride(q, k, v, rank=4)
    opts = _options(q, headdim, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    q.shape[0], nheads)
    rng = _rng_before(opts["dropout_p"], return_attn_probs, q.device)
    if select_backend(q.device) == "triton":
        from .ops.attention import flash_attention

        out, lse = flash_attention(q, k, v, deterministic=bool(deterministic), **opts)
    else:
        from .chunked import chunked_attention

        out, lse = chunked_attention(q, k, v, **opts)
    return _finish(out, lse, return_attn_probs, None if rng is None else _s_dmask(rng, q, k, opts))


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
):
    """Attention over a batch of variable-length sequences packed along the token dimension.

    Arguments:
        q: (total_q, nheads, headdim), the sequences' queries concatenated.
        k: (total_k, nheads_k, headdim).
        v: (total_k, nheads_k, headdim).
        cu_seqlens_q: int32 (batch + 1,), cumulative query lengths starting at 0; sequence b's queries are
            q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]. Empty sequences are allowed.
        cu_seqlens_k: int32 (batch + 1,), likewise for k and v.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (ints, no device read needed).
        Other arguments as in :func:`flash_attn_func`; alibi_slopes may be (nheads,) or (batch, nheads).
        block_table: optional int32 (batch, max_blocks): k and v are then a paged KV cache (num_blocks,
            block_size, nheads_k, headdim) and sequence b's keys the first cu_seqlens_k[b + 1] -
            cu_seqlens_k[b] positions of its pages block_table[b] (continuous batching over a paged cache,
            prefill and decode rows in one call). Forward only, without dropout.
    Returns:
        out: (total_q, nheads, headdim); softmax_lse (if return_attn_probs): float32 (nheads, total_q); S_dmask
        (if return_attn_probs) as in :func:`flash_attn_func`, with dropout (batch, nheads, max_seqlen_q,
        max_seqlen_k), each sequence's probabilities at the top left of its block. With ``block_table`` the
        caches, if their last dimension is strided, are copied too (as flash-attn does; they are only read).
    """
    if block_table is not None:
        from .kvcache import paged_varlen_attention

        out, lse = paged_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          block_table, dropout_p, softmax_scale, causal, window_size, softcap,
                                          alibi_slopes)
        return _finish(out, lse, return_attn_probs)
    q, k, v, (nheads, _, headdim) = V.qkv_unit_stride(q, k, v, rank=3)
    host = V.host_values_readable(q.device)
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device, host_check=host)
    batch_k = V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device,
                                 host_check=host)
    if batch_k != batch:
        raise ValueError(f"cu_seqlens_k must describe {batch} sequences like cu_seqlens_q, got {batch_k}")
    opts = _options(q, headdim, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    batch, nheads)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    rng = _rng_before(opts["dropout_p"], return_attn_probs, q.device)
    if select_backend(q.device) == "triton":
        from .ops.attention import flash_attention_varlen

        out, lse = flash_attention_varlen(*args, deterministic=bool(deterministic), **opts)
    else:
        from .chunked import chunked_attention_varlen

        out, lse = chunked_attention_varlen(*args, **opts)
    s_dmask = None
    if rng is not None:
        s_dmask = _s_dmask(rng, q, k, opts, (cu_seqlens_q, cu_seqlens_k), (int(max_seqlen_q), int(max_seqlen_k)))
    return _finish(out, lse, return_attn_probs, s_dmask)


def _unpack(packed: torch.Tensor, name: str, parts: int, rank: int) -> tuple[torch.Tensor, ...]:
    V._check_tensor(name, packed)
    if packed.dim() != rank or packed.shape[-3] != parts:
        where = "(batch, seqlen, " if rank == 5 else "(total, "
        raise ValueError(
            f"{name} must have shape {where}{parts}, nheads, headdim), got {tuple(packed.shape)}"
        )
    return packed.unbind(dim=-3)


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                              softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                              deterministic: bool = False, return_attn_probs: bool = False):
    """:func:`flash_attn_func` on qkv (batch, seqlen, 3, nheads, headdim); q, k, v are views (copied only where
    the last dimension is strided)."""
    q, k, v = _unpack(qkv, "qkv", 3, 5)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """:func:`flash_attn_func` with kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, "kv", 2, 5)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None,
                                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                     deterministic: bool = False, return_attn_probs: bool = False):
    """:func:`flash_attn_varlen_func` on qkv (total, 3, nheads, headdim) with one cu_seqlens."""
    q, k, v = _unpack(qkv, "qkv", 3, 4)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                    deterministic: bool = False, return_attn_probs: bool = False):
    """:func:`flash_attn_varlen_func` with kv (total_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, "kv", 2, 4)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
