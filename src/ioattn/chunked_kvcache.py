"""KV-cache attention in pure PyTorch: the any-device path behind ``flash_attn_with_kvcache`` and
``write_kv`` (CPU without the Triton interpreter, or ``IOATTN_BACKEND=chunked``).

Same semantics as the Triton decode kernels: new tokens are written (rotated when rotary tables are
given) at ``cache_seqlens[b] ..`` before the attention; each sequence's keys are gathered through its
block table (or its cache row) and attended with the chunked path, bottom-right aligned. Sequence
lengths are read on the host, which is fine for this path and never used on a GPU hot path.
"""

from __future__ import annotations

import torch

from .chunked import chunked_attention, chunked_attention_varlen
from .rotary import rotate


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates the first ``rotary_dim = 2 * cos.shape[-1]`` dims of x (..., seqlen, nheads, headdim) with
    cos/sin (seqlen, rotary_dim / 2); pairs (2j, 2j+1) if interleaved, else (j, j + rotary_dim / 2)."""
    return rotate(x, cos[:, None, :], sin[:, None, :], interleaved)


def _positions_to_rows(b: int, positions: torch.Tensor, block_table, cache_batch_idx, block_size: int):
    """(cache row or page, offset) of sequence b's token positions."""
    if block_table is not None:
        return block_table[b, positions // block_size].long(), positions % block_size
    row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
    return torch.full_like(positions, row), positions


def kv_write_torch(k, v, k_cache, v_cache, slot_mapping, seqlens, block_table, cache_batch_idx,
                   rotary_cos, rotary_sin, interleaved: bool) -> None:
    """Writes k, v into the cache in place: by ``slot_mapping`` (k, v (tokens, nheads_k, d); negative =
    padding) or appended at ``seqlens`` (k, v (batch, seqlen_new, nheads_k, d)), rotating k if asked."""
    if slot_mapping is not None:
        keep = slot_mapping >= 0
        slots, block_size = slot_mapping[keep], k_cache.shape[1]
        k_cache[slots // block_size, slots % block_size] = k[keep]
        v_cache[slots // block_size, slots % block_size] = v[keep]
        return
    block_size = k_cache.shape[1] if block_table is not None else 0
    for b in range(k.shape[0]):
        start = int(seqlens[b])
        positions = torch.arange(start, start + k.shape[1], device=k.device)
        kb = k[b]
        if rotary_cos is not None:
            kb = apply_rotary(kb, rotary_cos[positions], rotary_sin[positions], interleaved)
        rows, offs = _positions_to_rows(b, positions, block_table, cache_batch_idx, block_size)
        k_cache[rows, offs] = kb
        v_cache[rows, offs] = v[b]


def kvcache_attention_torch(q, k_cache, v_cache, seqlens, block_table, cache_batch_idx, cache_leftpad, rotary_cos,
                            rotary_sin, alibi_slopes, seqlen_new: int, softmax_scale: float, left: int, right: int,
                            softcap: float, interleaved: bool, rotary_per_row: bool):
    """Returns (out (batch, seqlen_q, nheads, d), lse float32 (batch, nheads, seqlen_q)) over each sequence's
    cache positions [cache_leftpad[b] (0 without), seqlens[b] + seqlen_new); masks and ALiBi count keys from
    the first, rotary positions are the cache's."""
    batch, seqlen_q = q.shape[:2]
    block_size = k_cache.shape[1] if block_table is not None else 0
    outs, lses = [], []
    for b in range(batch):
        length = int(seqlens[b]) + seqlen_new
        first = 0 if cache_leftpad is None else min(max(int(cache_leftpad[b]), 0), length)
        positions = torch.arange(first, length, device=q.device)
        rows, offs = _positions_to_rows(b, positions, block_table, cache_batch_idx, block_size)
        kb, vb = k_cache[rows, offs].unsqueeze(0), v_cache[rows, offs].unsqueeze(0)
        qb = q[b : b + 1]
        if rotary_cos is not None:
            base = int(seqlens[b])
            qpos = base + torch.arange(seqlen_q, device=q.device) if rotary_per_row else \
                torch.full((seqlen_q,), base, device=q.device)
            qb = apply_rotary(qb, rotary_cos[qpos], rotary_sin[qpos], interleaved)
        slopes = alibi_slopes[b : b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = chunked_attention(qb, kb, vb, softmax_scale=softmax_scale, causal=False,
                                     window_size=(left, right), softcap=softcap, alibi_slopes=slopes,
                                     dropout_p=0.0)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def paged_varlen_attention_torch(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes,
                                 softmax_scale: float, left: int, right: int, softcap: float):
    """Packed variable-length queries over a paged cache: each sequence's first ``seqlens_k[b]`` keys are
    gathered through its pages into one packed (total_k, nheads_k, d) run, then the chunked varlen path.
    Returns (out (total_q, nheads, d), lse float32 (nheads, total_q))."""
    lengths = [int(n) for n in seqlens_k]
    block_size = k_cache.shape[1]
    located = [_positions_to_rows(b, torch.arange(n, device=q.device), block_table, None, block_size)
               for b, n in enumerate(lengths)]
    pages = torch.cat([rows for rows, _ in located])
    offsets = torch.cat([offs for _, offs in located])
    cu_k = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32).to(q.device)
    max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    return chunked_attention_varlen(q, k_cache[pages, offsets], v_cache[pages, offsets], cu_seqlens_q, cu_k, max_q,
                                    max(lengths), softmax_scale=softmax_scale, causal=False,
                                    window_size=(left, right), softcap=softcap, alibi_slopes=alibi_slopes,
                                    dropout_p=0.0)
