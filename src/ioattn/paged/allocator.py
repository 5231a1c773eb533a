"""Physical block pool of PagedAttention (Kwon et al., arXiv 2309.06180, section 4.2): a free list, reference
counts, and a prefix-hash table whose unreferenced entries are evicted least-recently-used.

Pure bookkeeping on integers; the tensors live in :class:`ioattn.paged.cache.PagedKVCache`. A block is *free*
when its reference count is 0: either on the free list (content meaningless) or *evictable* (content is a
full cached block that a later sequence with the same prefix may take back, until the pool needs the space).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


class OutOfBlocksError(RuntimeError):
    """Raised when a request needs more free blocks than the pool holds; nothing has been changed.

    Attributes: ``needed`` (blocks the operation needs), ``available`` (free blocks, evictable included).
    """

    def __init__(self, needed: int, available: int, total: int, what: str = "operation") -> None:
        self.needed = needed
        self.available = available
        self.total = total
        super().__init__(
            f"out of KV-cache blocks: {what} needs {needed} free block(s), "
            f"only {available} of {total} available"
        )


def check_block_size(block_size: int) -> int:
    """Validate a block size: a power of two from 1 to 256."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if not 1 <= block_size <= 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [1, 256], got {block_size}")
    return block_size


def hash_block(prefix_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Key of a full block: a digest of the previous block's key and this block's token ids.

    Chaining the prefix makes equal keys mean equal *prefixes*, not just equal blocks; blake2b makes a
    collision (which would silently share wrong KV) negligible and keys stable across processes.
    """
    h = hashlib.blake2b(prefix_hash or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockAllocator:
    """Reference-counted pool of ``num_blocks`` block ids with an optional prefix cache.

    Invariants (checked by the property tests): every id is either free (ref 0, on the free list or in the
    evictor) or used (ref > 0), never both; ``num_free_blocks + num_used_blocks == num_blocks``; a hash maps
    to at most one block and back.
    """

    def __init__(self, num_blocks: int, *, enable_prefix_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self._block_to_hash: dict[int, bytes] = {}
        # Unreferenced cached blocks, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    # ---- counts --------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation may take: the free list plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with a reference count above 0."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        """Free blocks that still hold a cached prefix block."""
        return len(self._evictable)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def free_block_ids(self) -> set[int]:
        return set(self._free) | set(self._evictable)

    def evictable_block_ids(self) -> list[int]:
        """Evictable blocks in eviction order (least recently used first)."""
        return list(self._evictable)

    def block_hash(self, block: int) -> bytes | None:
        return self._block_to_hash.get(block)

    def cached_blocks(self) -> dict[bytes, int]:
        """A copy of the prefix-hash table."""
        return dict(self._hash_to_block)

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate(self, n: int, what: str = "allocation") -> list[int]:
        """Take ``n`` blocks (ref 1 each): from the free list first, then by evicting LRU cached blocks."""
        if n > self.num_free_blocks:
            raise OutOfBlocksError(n, self.num_free_blocks, self.num_blocks, what)
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._hash_to_block[self._block_to_hash.pop(block)]
            self._ref[block] = 1
            out.append(block)
        return out

    def incref(self, block: int) -> None:
        """Add a reference to a used block (fork, or a pending copy holding its source)."""
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is free; cannot add a reference")
        self._ref[block] += 1

    def decref(self, block: int) -> int:
        """Drop a reference; at 0 a cached block becomes evictable (most recent), any other returns to the
        free list.

        Returns the new reference count.
        """
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is already free")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if block in self._block_to_hash:
                self._evictable[block] = None
            else:
                self._free.append(block)
        return self._ref[block]

    # ---- prefix cache --------------------------------------------------------------------------------
    def lookup(self, block_hash: bytes) -> int | None:
        """The block cached under ``block_hash``, or None; changes nothing."""
        if not self.enable_prefix_caching:
            return None
        return self._hash_to_block.get(block_hash)

    def acquire_cached(self, block: int) -> None:
        """Take a reference on a cached block found by :meth:`lookup`, reviving it if it was evictable."""
        if block not in self._block_to_hash:
            raise ValueError(f"block {block} is not in the prefix cache")
        if self._ref[block] == 0:
            del self._evictable[block]
        self._ref[block] += 1

    def register(self, block: int, block_hash: bytes) -> bool:
        """Publish a used, full block under ``block_hash``; False (and nothing changes) if the hash is taken
        or prefix caching is off."""
        if not self.enable_prefix_caching or block_hash in self._hash_to_block:
            return False
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is free; only used blocks can be cached")
        if block in self._block_to_hash:
            raise ValueError(f"block {block} is already cached under another hash")
        self._hash_to_block[block_hash] = block
        self._block_to_hash[block] = block_hash
        return True
