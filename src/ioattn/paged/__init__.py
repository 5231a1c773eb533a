"""PagedAttention's KV-cache memory manager (Kwon et al., arXiv 2309.06180).

- :class:`BlockAllocator`: the pool of physical blocks: free list, reference counts, prefix cache with LRU.
- :class:`PagedKVCache`: the K/V tensors, (num_blocks, block_size, nheads_k, headdim) per layer, with one
  batched block copy for copy-on-write and host swapping.
- :class:`BlockManager`: per-sequence block tables: allocate, append_slot, fork, free, swap, statistics.
- :func:`build_batch_metadata`: ``block_table`` / ``cache_seqlens`` / ``slot_mapping`` for a batch.
"""

from .allocator import BlockAllocator, OutOfBlocksError, hash_block
from .batch import BatchMetadata, build_batch_metadata, build_block_table, build_slot_mapping
from .cache import PagedKVCache
from .manager import AppendResult, BlockManager, MemoryStats

__all__ = [
    "AppendResult",
    "BatchMetadata",
    "BlockAllocator",
    "BlockManager",
    "MemoryStats",
    "OutOfBlocksError",
    "PagedKVCache",
    "build_batch_metadata",
    "build_block_table",
    "build_slot_mapping",
    "hash_block",
]
