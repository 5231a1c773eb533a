"""Attention over a KV cache for inference: ``flash_attn_with_kvcache`` and ``write_kv``.

``flash_attn_with_kvcache`` has flash-attn 2.x's signature and semantics: a contiguous cache
(batch_cache, seqlen_cache, nheads_k, d) or a paged one (num_blocks, block_size, nheads_k, d) with a
block_table; new k/v appended in place at ``cache_seqlens`` (rotated when rotary_cos/sin are given);
one to many query tokens per sequence (decode, chunked prefill, speculative verification), aligned
bottom-right to the sequence's keys. It runs two launches (the cache write, only when k is given, then
split-KV attention) plus the split combine, none of which reads a device tensor on the host.

``write_kv`` is the block manager's per-layer, per-step scatter of new tokens by slot mapping.

``paged_varlen_attention`` checks and runs ``flash_attn_varlen_func``'s ``block_table`` form: packed
variable-length queries over a paged cache (forward only), on the same split-KV kernel and combine.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from . import validation as V
from .backend import _triton_importable

__all__ = ["flash_attn_with_kvcache", "write_kv"]


@functools.cache
def _kv_ops():
    """(kv_write, kvcache_attention, paged_varlen_attention): the custom ops of ``ioattn.ops.decode``, which run
    the Triton kernels or, where ``ioattn.backend`` picks it, the chunked path; without Triton installed (that
    module imports the kernels) the chunked path's functions themselves, on any device (``num_splits`` and
    ``max_seqlen_q`` are kernel-only knobs)."""
    try:
        from .ops import decode
    except ModuleNotFoundError:
        if _triton_importable():  # a Triton without what the kernels need: say so
            raise
        from . import chunked_kvcache as ck

        def kvcache_attention(*args):
            return ck.kvcache_attention_torch(*args[:-1])

        def paged_varlen_attention(*args):
            return ck.paged_varlen_attention_torch(*args[:7], *args[8:12])

        return ck.kv_write_torch, kvcache_attention, paged_varlen_attention
    return decode.kv_write, decode.kvcache_attention, decode.paged_varlen_attention


def _check_index(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    t = V._check_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name}.dtype must be {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(
        want >= 0 and got != want for want, got in zip(shape, t.shape, strict=True)
    ):
        want = ", ".join("*" if s < 0 else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device ({device}), got {t.device}")
    V.check_last_dim_contiguous(name, t)
    return t


def _check_cache(name: str, cache: object, ref: torch.Tensor, ref_name: str = "q") -> torch.Tensor:
    cache = V._check_tensor(name, cache)
    if cache.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (batch_cache, seqlen_cache, nheads_k, headdim) or "
                         f"(num_blocks, block_size, nheads_k, headdim), got shape {tuple(cache.shape)}")
    V.check_last_dim_contiguous(name, cache)
    V.check_same((ref_name, name), (ref, cache))
    return cache


def _check_caches(k_cache, v_cache, q: torch.Tensor, nheads: int, headdim: int, k_name: str = "k_cache",
                  v_name: str = "v_cache") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Checks the K and V caches against q (rank 4, dtype, device, shapes, heads, head dim); returns
    (k_cache, v_cache, nheads_k)."""
    k_cache = _check_cache(k_name, k_cache, q)
    v_cache = _check_cache(v_name, v_cache, q)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{v_name} must have {k_name}'s shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    nheads_k = k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"q's nheads ({nheads}) must be divisible by {k_name}'s nheads_k ({nheads_k})")
    if k_cache.shape[3] != headdim:
        raise ValueError(f"{k_name}'s headdim must equal q's ({headdim}), got {k_cache.shape[3]}")
    if not 1 <= headdim <= V.MAX_HEADDIM:
        raise ValueError(f"headdim must be between 1 and {V.MAX_HEADDIM}, got {headdim}")
    return k_cache, v_cache, nheads_k


def _check_pages(block_table: torch.Tensor, lengths: torch.Tensor, block_size: int, num_blocks: int,
                 first: torch.Tensor | None = None) -> None:
    """The pages each sequence uses (its first ceil(lengths[b] / block_size) entries, from the page of position
    ``first[b]`` on where given) lie in [0, num_blocks); other entries are never read (padding such as -1 is
    fine there). Reads the tables on the host, so only where that is cheap (``host_values_readable``)."""
    if not V.host_values_readable(block_table.device) or block_table.numel() == 0:
        return
    cols = torch.arange(block_table.shape[1])
    used = cols < ((lengths.long() + block_size - 1) // block_size)[:, None]
    if first is not None:
        used &= cols >= (first.long() // block_size)[:, None]
    pages = block_table[used]
    if pages.numel() > 0:
        lo, hi = int(pages.min()), int(pages.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table entries must be in [0, {num_blocks}) for the pages a sequence uses, "
                             f"got [{lo}, {hi}]")


def _check_rotary(rotary_cos, rotary_sin, k, headdim: int, capacity: int, q: torch.Tensor) -> None:
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is None:
        return
    if k is None:
        raise ValueError("rotary_cos/rotary_sin need the new k and v to append (flash-attn rotates q and k)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        V._check_tensor(name, t)
        V.check_dtype(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (seqlen_ro, rotary_dim / 2), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, "
                         f"got {tuple(rotary_sin.shape)}")
    seqlen_ro, half = rotary_cos.shape
    if not 1 <= 2 * half <= headdim:
        raise ValueError(f"rotary_cos.shape[1] (rotary_dim / 2) must be in [1, {headdim // 2}], got {half}")
    if seqlen_ro < capacity:
        raise ValueError(f"rotary_cos/rotary_sin must have at least the cache's {capacity} positions, "
                         f"got seqlen_ro = {seqlen_ro}")


def _check_cache_seqlens(cache_seqlens, batch: int, seqlen_new: int, capacity: int,
                         device: torch.device) -> torch.Tensor:
    """The (batch,) int32 tensor of cache lengths before the append (an int or None becomes one)."""
    limit = capacity - seqlen_new
    if cache_seqlens is None or isinstance(cache_seqlens, numbers.Integral):  # ints, numpy's included
        n = limit if cache_seqlens is None else int(cache_seqlens)
        if isinstance(cache_seqlens, bool) or not 0 <= n <= limit:
            raise ValueError(f"cache_seqlens must be in [0, {limit}] (capacity {capacity} minus "
                             f"{seqlen_new} new tokens), got {cache_seqlens!r}")
        return torch.full((batch,), n, dtype=torch.int32, device=device)
    t = _check_index("cache_seqlens", cache_seqlens, (batch,), torch.int32, device)
    if V.host_values_readable(device) and batch > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > limit:
            raise ValueError(f"cache_seqlens must be in [0, {limit}] (capacity {capacity} minus "
                             f"{seqlen_new} new tokens), got values in [{lo}, {hi}]")
    return t


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Attention of new queries over a KV cache, appending new keys/values to it first (in place).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), seqlen_q >= 1. Query i of sequence b sits at key position
            L - seqlen_q + i, L = cache_seqlens[b] + seqlen_new (bottom-right alignment).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim) contiguous cache, or with
            block_table (num_blocks, block_size, nheads_k, headdim) paged cache; nheads % nheads_k == 0.
            Their last dimension must be contiguous (they are written in place); q, k and v are copied
            where theirs is not, as flash-attn does.
        k, v: optional (batch, seqlen_new, nheads_k, headdim), written to the cache at positions
            cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 before the attention.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2), needs k and v. k is rotated at its
            positions; q at cache_seqlens[b] + i when causal or windowed, else at cache_seqlens[b]
            (flash-attn's rule). Only the first rotary_dim dims are rotated.
        cache_seqlens: int or int32 (batch,): cache lengths before the append; None = full cache.
        cache_batch_idx: optional int32 (batch,): cache row of each sequence (contiguous cache only).
        cache_leftpad: optional int32 (batch,): the cache position where each sequence's keys start (left
            padding before it is never read), at most cache_seqlens[b]. Masks and ALiBi count keys from there;
            rotary positions and the append stay the cache's. flash-attn takes it on contiguous caches only;
            here paged caches take it too.
        block_table: optional int32 (batch, max_blocks): pages of each sequence (paged cache).
        softmax_scale: default 1 / sqrt(headdim).
        causal, window_size, softcap, alibi_slopes: as in :func:`ioattn.flash_attn_func`.
        rotary_interleaved: pairs (2j, 2j+1) (GPT-J) if True, else (j, j + rotary_dim / 2) (GPT-NeoX).
        num_splits: how many key splits (Flash-Decoding); 0 chooses from batch, heads and SM count.
        return_softmax_lse: also return the log-sum-exp.
    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype.
        softmax_lse (if return_softmax_lse): float32 (batch, nheads, seqlen_q).
    """
    V._check_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must have rank 4 (batch, seqlen_q, nheads, headdim), got shape {tuple(q.shape)}")
    V.check_dtype("q", q)
    if q.stride(-1) != 1:
        (q,) = V.unit_stride(q)  # flash-attn's maybe_contiguous
    batch, seqlen_q, nheads, headdim = q.shape
    if seqlen_q < 1:
        raise ValueError(f"q's seqlen_q must be >= 1, got {seqlen_q}")
    k_cache, v_cache, nheads_k = _check_caches(k_cache, v_cache, q, nheads, headdim)

    if block_table is not None:
        block_table = _check_index("block_table", block_table, (batch, -1), torch.int32, q.device)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx applies to a contiguous cache only, not with block_table")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        rows = k_cache.shape[0]
        if cache_batch_idx is not None:
            cache_batch_idx = _check_index("cache_batch_idx", cache_batch_idx, (batch,), torch.int32,
                                           q.device)
            if V.host_values_readable(q.device) and batch > 0:
                lo, hi = int(cache_batch_idx.min()), int(cache_batch_idx.max())
                if lo < 0 or hi >= rows:
                    raise ValueError(f"cache_batch_idx entries must be in [0, {rows}), got [{lo}, {hi}]")
        elif rows < batch:
            raise ValueError(f"k_cache's batch_cache ({rows}) must be >= q's batch ({batch}) "
                             "without cache_batch_idx")

    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            V._check_tensor(name, t)
            V.check_same(("q", name), (q, t))
            if t.dim() != 4 or t.shape[0] != batch or t.shape[2:] != (nheads_k, headdim):
                raise ValueError(f"{name} must have shape ({batch}, seqlen_new, {nheads_k}, {headdim}), "
                                 f"got {tuple(t.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            k, v = V.unit_stride(k, v)
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise ValueError(f"k's seqlen_new ({seqlen_new}) exceeds the cache's capacity ({capacity})")
    _check_rotary(rotary_cos, rotary_sin, k, headdim, capacity, q)
    seqlens = _check_cache_seqlens(cache_seqlens, batch, seqlen_new, capacity, q.device)
    if cache_leftpad is not None:
        cache_leftpad = _check_index("cache_leftpad", cache_leftpad, (batch,), torch.int32, q.device)
        if V.host_values_readable(q.device) and batch > 0:
            bad = ((cache_leftpad < 0) | (cache_leftpad > seqlens)).nonzero()
            if bad.numel() > 0:
                i = int(bad[0, 0])
                raise ValueError(f"cache_leftpad entries must be in [0, cache_seqlens[b]], got cache_leftpad[{i}] = "
                                 f"{int(cache_leftpad[i])} with cache_seqlens[{i}] = {int(seqlens[i])}")
    if block_table is not None:
        _check_pages(block_table, seqlens + seqlen_new, k_cache.shape[1], k_cache.shape[0], cache_leftpad)

    left, right = V.check_window(window_size)
    if causal:
        right = 0
    softcap = V.check_scalars(0.0, softcap, softmax_scale)
    V.check_alibi(alibi_slopes, batch, nheads, q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    # q takes the rotary of each row's own position under a causal mask or a window, else the cache length's
    # for every row; as in flash-attn, a window side as wide as the cache capacity or wider does not count as
    # one (the mask keeps the side as given).
    rotary_per_row = 0 <= left < capacity or 0 <= right < capacity
    kv_write, kvcache_attention, _ = _kv_ops()

    if k is not None:
        kv_write(k, v, k_cache, v_cache, None, seqlens, block_table, cache_batch_idx,
                 rotary_cos, rotary_sin, bool(rotary_interleaved))
    out, lse = kvcache_attention(q, k_cache, v_cache, seqlens, block_table, cache_batch_idx, cache_leftpad,
                                 rotary_cos, rotary_sin, alibi_slopes, seqlen_new, scale, left, right, float(softcap),
                                 bool(rotary_interleaved), rotary_per_row, num_splits)
    return (out, lse) if return_softmax_lse else out


def paged_varlen_attention(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                           dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes):
    """``flash_attn_varlen_func`` with ``block_table`` (flash-attn 2.x's paged varlen forward): packed
    variable-length queries (total_q, nheads, d) over a paged cache (num_blocks, block_size, nheads_k, d);
    sequence b's keys are the first ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` positions of its pages
    ``block_table[b]``, aligned bottom-right with its queries. Forward only. Returns (out, lse (nheads,
    total_q))."""
    V._check_tensor("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must have rank 3 (total_q, nheads, headdim), got shape {tuple(q.shape)}")
    V.check_dtype("q", q)
    total_q, nheads, headdim = q.shape
    # flash-attn's maybe_contiguous, the caches included (this path only reads them)
    q, k_cache, v_cache = V.unit_stride(q, k_cache, v_cache)
    k_cache, v_cache, _ = _check_caches(k_cache, v_cache, q, nheads, headdim, "k", "v")
    host = V.host_values_readable(q.device)
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, q.device, host_check=host)
    if V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, None, max_seqlen_k, q.device, host_check=host) != batch:
        raise ValueError(f"cu_seqlens_k must describe {batch} sequences like cu_seqlens_q, "
                         f"got {cu_seqlens_k.shape[0] - 1}")
    block_table = _check_index("block_table", block_table, (batch, -1), torch.int32, q.device)
    capacity = block_table.shape[1] * k_cache.shape[1]
    seqlens_k = torch.diff(cu_seqlens_k)  # int32, on the device: no host read
    if host:
        longest = int(seqlens_k.max())
        if longest > capacity:
            raise ValueError(f"a sequence of cu_seqlens_k holds {longest} keys, more than its block_table "
                             f"row's {capacity} (block_table.shape[1] * block_size)")
        _check_pages(block_table, seqlens_k, k_cache.shape[1], k_cache.shape[0])
    softcap = V.check_scalars(dropout_p, softcap, softmax_scale)
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0 with block_table (the paged path is forward-only), got {dropout_p}")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("block_table: the paged varlen path is forward-only (inference); call it under "
                         "torch.no_grad() or torch.inference_mode(), or on tensors that do not require grad")
    left, right = V.check_window(window_size)
    if causal:
        right = 0
    V.check_alibi(alibi_slopes, batch, nheads, q.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    op = _kv_ops()[2]

    return op(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes, int(max_seqlen_q), scale,
              left, right, float(softcap), 0)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatters new tokens into a paged KV cache in place, one launch for all of a step's tokens.

    Arguments:
        k, v: (num_tokens, nheads_k, headdim), the cache's dtype.
        k_cache, v_cache: (num_blocks, block_size, nheads_k, headdim).
        slot_mapping: int64 (num_tokens,): token t goes to page slot_mapping[t] // block_size, offset
            slot_mapping[t] % block_size; a negative slot (padding) is skipped.
    """
    for name, t in (("k", k), ("v", v)):
        V._check_tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (num_tokens, nheads_k, headdim), got {tuple(t.shape)}")
        V.check_dtype(name, t)
        V.check_last_dim_contiguous(name, t)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    k_cache = _check_cache("k_cache", k_cache, k, "k")
    v_cache = _check_cache("v_cache", v_cache, k, "k")
    V.check_same(("k", "v"), (k, v))
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k's (nheads_k, headdim) must match k_cache's {tuple(k_cache.shape[2:])}, "
                         f"got {tuple(k.shape[1:])}")
    slot_mapping = _check_index("slot_mapping", slot_mapping, (k.shape[0],), torch.int64, k.device)
    if V.host_values_readable(k.device) and slot_mapping.numel() > 0:
        slots = k_cache.shape[0] * k_cache.shape[1]
        if int(slot_mapping.max()) >= slots:
            raise ValueError(f"slot_mapping entries must be < num_blocks * block_size ({slots}), "
                             f"got {int(slot_mapping.max())}")
    kv_write = _kv_ops()[0]

    kv_write(k, v, k_cache, v_cache, slot_mapping, None, None, None, None, None, True)
