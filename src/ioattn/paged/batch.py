"""Per-batch metadata for the paged kernels, built once per step on the host ("plan", after FlashInfer) and
consumed per layer on the device ("run").

Conventions (flash-attn 2.x ``flash_attn_with_kvcache``): ``block_table`` int32 (batch, max_blocks_per_seq),
padded with 0 past each sequence's last block (a valid id, so a kernel that prefetches one block too far
reads memory that exists; ``cache_seqlens`` masks it); ``cache_seqlens`` int32 (batch,), the number of
tokens in each sequence's cache *including* the new ones; ``slot_mapping`` int64 (total_new_tokens,), where
token ``t`` of sequence ``b`` goes: ``block_table[b, t // block_size] * block_size + t % block_size``.
The new tokens of a sequence are its last ``query_lens[b]`` tokens (1 for decode).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .allocator import check_block_size


@dataclass(frozen=True)
class BatchMetadata:
    """Device tensors for one step of a batch of sequences.

    block_table: (batch, max_blocks_per_seq) int32. cache_seqlens: (batch,) int32.
    slot_mapping: (total_new_tokens,) int64. cu_seqlens_q: (batch + 1,) int32, offsets of each sequence's
    new tokens. max_seqlen_q, max_seqlen_k: host ints.
    """

    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def build_block_table(
    tables: Sequence[Sequence[int]], device: torch.device | str = "cpu", max_blocks: int | None = None
) -> torch.Tensor:
    """Pad per-sequence block lists into an int32 (batch, max_blocks) tensor on ``device``.

    One host tensor from the flattened ids (a loop over blocks, not tokens), one masked scatter, one copy.
    """
    lens = [len(t) for t in tables]
    width = max(lens, default=0) if max_blocks is None else max_blocks
    if lens and max(lens) > width:
        raise ValueError(f"max_blocks must be >= the longest block table ({max(lens)}), got {width}")
    flat = torch.tensor(list(itertools.chain.from_iterable(tables)), dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    table = torch.zeros((len(tables), width), dtype=torch.int32)
    table[torch.arange(width, dtype=torch.int32)[None, :] < lens_t[:, None]] = flat
    return table.to(device)


def build_slot_mapping(
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    query_lens: torch.Tensor,
    block_size: int,
    total_tokens: int,
) -> torch.Tensor:
    """Slots of the last ``query_lens[b]`` tokens of every sequence, vectorised on block_table's device.

    Args:
        block_table: (batch, max_blocks) int32. cache_seqlens, query_lens: (batch,) integer tensors.
        total_tokens: ``sum(query_lens)`` as a host int (so no device-to-host sync is needed).
    Returns:
        (total_tokens,) int64.
    """
    device = block_table.device
    batch = block_table.shape[0]
    query_lens = query_lens.to(device, torch.long)
    seq = torch.repeat_interleave(torch.arange(batch, device=device), query_lens, output_size=total_tokens)
    starts = torch.cumsum(query_lens, 0) - query_lens
    pos = (cache_seqlens.to(device, torch.long) - query_lens)[seq] + torch.arange(total_tokens, device=device)
    pos = pos - starts[seq]
    blocks = block_table[seq, pos // block_size].long()
    return blocks * block_size + pos % block_size


def build_batch_metadata(
    tables: Sequence[Sequence[int]],
    seqlens: Sequence[int],
    block_size: int,
    query_lens: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    max_blocks: int | None = None,
) -> BatchMetadata:
    """All the metadata of a batch from its block tables and lengths.

    Args:
        tables: per sequence, its physical block ids in logical order.
        seqlens: per sequence, its number of tokens (cached + new).
        query_lens: per sequence, how many of its last tokens are new this step (default 1: decode).
        max_blocks: pad the table to this width (fixed widths keep CUDA-graph shapes static).
    """
    check_block_size(block_size)
    if len(seqlens) != len(tables):
        raise ValueError(f"seqlens must have one entry per table ({len(tables)}), got {len(seqlens)}")
    q = [1] * len(tables) if query_lens is None else list(query_lens)
    if len(q) != len(tables):
        raise ValueError(f"query_lens must have one entry per table ({len(tables)}), got {len(q)}")
    for b, (t, n, nq) in enumerate(zip(tables, seqlens, q, strict=True)):
        if not 0 <= nq <= n or n > len(t) * block_size:
            raise ValueError(
                f"sequence {b}: need 0 <= query_len ({nq}) <= seqlen ({n}) <= blocks * block_size "
                f"({len(t)} * {block_size})"
            )
    block_table = build_block_table(tables, device, max_blocks)
    batch = len(tables)
    # One host-to-device copy for lengths, new-token counts and their offsets.
    host = torch.tensor([*seqlens, *q, 0, *itertools.accumulate(q)], dtype=torch.int32).to(device)
    cache_seqlens, q_t, cu_seqlens_q = host[:batch], host[batch : 2 * batch], host[2 * batch :]
    slot_mapping = build_slot_mapping(block_table, cache_seqlens, q_t, block_size, sum(q))
    return BatchMetadata(
        block_table=block_table,
        cache_seqlens=cache_seqlens,
        slot_mapping=slot_mapping,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max(q, default=0),
        max_seqlen_k=max(seqlens, default=0),
    )
