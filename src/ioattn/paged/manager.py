"""Block tables of PagedAttention (Kwon et al., arXiv 2309.06180, sections 4.2-4.5): allocation,
token-by-token append, fork with copy-on-write, prefix reuse, swapping, and memory statistics.

Every mutating method checks that it has the blocks it needs before it changes anything, so an
:class:`OutOfBlocksError` leaves every table, count and cache as it was. Copy-on-write copies are queued and
run as one batched copy over all layers (:meth:`BlockManager.flush_copies`); until then the source block is
held by an extra reference, so it cannot be reused before it has been read. The step's contract, as in vLLM:
append the batch, flush the copies, then write the new tokens' K/V (the last sharer of a block writes into
it in place, and may do so while a copy from it is queued: the copy only moves slots that the copier then
overwrites with its own token).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .allocator import BlockAllocator, OutOfBlocksError, check_block_size, hash_block
from .batch import BatchMetadata, build_batch_metadata
from .cache import PagedKVCache


@dataclass
class _Sequence:
    block_table: list[int]
    token_ids: list[int]
    block_hashes: list[bytes]  # keys of the full blocks, in order (prefix chain)
    swapped: bool = False


@dataclass(frozen=True)
class AppendResult:
    """Where an appended token goes: its ``slot`` (block * block_size + offset) and, if the last block was
    shared, the copy-on-write pair ``copy = (src, dst)``."""

    slot: int
    copy: tuple[int, int] | None = None


@dataclass(frozen=True)
class MemoryStats:
    """Device-pool statistics.

    utilisation = stored_tokens / allocated_slots (physical: a shared block counts once); waste = 1 -
    utilisation; sharing_saving = 1 - used_blocks / logical_blocks, where logical_blocks is what the running
    sequences would hold with no sharing (the sum of their block-table lengths).
    """

    num_blocks: int
    free_blocks: int
    used_blocks: int
    evictable_blocks: int
    stored_tokens: int
    allocated_slots: int
    logical_blocks: int
    utilisation: float
    waste: float
    sharing_saving: float


@dataclass
class _Pending:
    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)


class BlockManager:
    """Per-sequence block tables over a :class:`BlockAllocator`, optionally backed by a :class:`PagedKVCache`.

    Args:
        num_blocks: device blocks in the pool.
        block_size: tokens per block, a power of two in [1, 256].
        num_cpu_blocks: host blocks for swapping.
        enable_prefix_caching: reuse full blocks of equal prefixes across sequences.
        cache: the K/V tensors to copy on copy-on-write and swapping; None for a metadata-only manager
            (the same bookkeeping, no tensors: for simulations and tests of the bookkeeping).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        num_cpu_blocks: int = 0,
        enable_prefix_caching: bool = True,
        cache: PagedKVCache | None = None,
    ) -> None:
        self.block_size = check_block_size(block_size)
        if cache is not None and (cache.num_blocks, cache.block_size, cache.num_cpu_blocks) != (
            num_blocks,
            block_size,
            num_cpu_blocks,
        ):
            raise ValueError(
                "cache must match (num_blocks, block_size, num_cpu_blocks) = "
                f"{(num_blocks, block_size, num_cpu_blocks)}, got "
                f"{(cache.num_blocks, cache.block_size, cache.num_cpu_blocks)}"
            )
        self.allocator = BlockAllocator(num_blocks, enable_prefix_caching=enable_prefix_caching)
        self.cpu_allocator = BlockAllocator(num_cpu_blocks, enable_prefix_caching=False)
        self.cache = cache
        self._seqs: dict[int, _Sequence] = {}
        self._fill = [0] * num_blocks  # tokens held by each device block (kept while evictable)
        self._cpu_fill = [0] * num_cpu_blocks
        self._stored_tokens = 0  # sum of _fill over used device blocks
        self._logical_blocks = 0  # sum of table lengths of resident sequences
        self._pending = _Pending()
        self._holds: Counter[int] = Counter()  # references held by queued copies, per source block

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used_blocks

    @property
    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids of ``seq_id`` in logical order (host block ids while it is swapped out)."""
        return list(self._get(seq_id).block_table)

    def token_ids(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).token_ids)

    def num_tokens(self, seq_id: int) -> int:
        return len(self._get(seq_id).token_ids)

    def is_swapped(self, seq_id: int) -> bool:
        return self._get(seq_id).swapped

    def slot(self, seq_id: int, position: int) -> int:
        """Slot of token ``t = position``: ``block_table[t // block_size] * block_size + t % block_size``."""
        seq = self._resident(seq_id)
        if not 0 <= position < len(seq.token_ids):
            raise ValueError(f"position must be in [0, {len(seq.token_ids)}), got {position}")
        bs = self.block_size
        return seq.block_table[position // bs] * bs + position % bs

    def pending_copies(self) -> tuple[list[int], list[int]]:
        """Queued copy-on-write pairs (src, dst) not yet flushed."""
        return list(self._pending.src), list(self._pending.dst)

    def stats(self) -> MemoryStats:
        used = self.allocator.num_used_blocks
        slots = used * self.block_size
        util = self._stored_tokens / slots if slots else 1.0
        logical = self._logical_blocks
        return MemoryStats(
            num_blocks=self.num_blocks,
            free_blocks=self.allocator.num_free_blocks,
            used_blocks=used,
            evictable_blocks=self.allocator.num_evictable_blocks,
            stored_tokens=self._stored_tokens,
            allocated_slots=slots,
            logical_blocks=logical,
            utilisation=util,
            waste=1.0 - util,
            sharing_saving=1.0 - used / logical if logical else 0.0,
        )

    # ---- allocation ----------------------------------------------------------------------------------
    def _prompt_plan(self, token_ids: Sequence[int]) -> tuple[list[bytes], list[int]]:
        """Keys of the prompt's full blocks, and the cached blocks of its longest cached prefix."""
        bs = self.block_size
        hashes: list[bytes] = []
        prev = None
        for i in range(len(token_ids) // bs):
            prev = hash_block(prev, token_ids[i * bs : (i + 1) * bs])
            hashes.append(prev)
        hits: list[int] = []
        for h in hashes:
            block = self.allocator.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hashes, hits

    def _blocks_needed(self, num_tokens: int, hits: list[int]) -> int:
        """Free blocks a prompt takes: fresh blocks, plus each cached hit that is evictable (reviving it
        removes it from the free pool)."""
        fresh = -(-num_tokens // self.block_size) - len(hits)
        return fresh + sum(1 for b in hits if self.allocator.ref_count(b) == 0)

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether :meth:`allocate` of this prompt would succeed now (cached prefix blocks included)."""
        _, hits = self._prompt_plan(token_ids)
        return self._blocks_needed(len(token_ids), hits) <= self.allocator.num_free_blocks

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Give ``seq_id`` blocks for its prompt, reusing cached blocks of its longest cached prefix.

        Returns the number of prompt tokens whose K/V is already in the cache (a multiple of block_size);
        the caller writes the rest (``slot_mapping`` of the last ``len - cached`` tokens).
        """
        if seq_id in self._seqs:
            raise ValueError(f"seq_id {seq_id} is already allocated")
        tokens = [int(t) for t in token_ids]
        hashes, hits = self._prompt_plan(tokens)
        needed = self._blocks_needed(len(tokens), hits)
        if needed > self.allocator.num_free_blocks:
            free = self.allocator.num_free_blocks
            raise OutOfBlocksError(needed, free, self.num_blocks, f"prompt of {seq_id}")
        bs = self.block_size
        for block in hits:
            if self.allocator.ref_count(block) == 0:
                self._stored_tokens += self._fill[block]
            self.allocator.acquire_cached(block)
        fresh = self.allocator.allocate(-(-len(tokens) // bs) - len(hits), f"prompt of {seq_id}")
        table = hits + fresh
        for i, block in enumerate(fresh, start=len(hits)):
            self._fill[block] = min(bs, len(tokens) - i * bs)
            self._stored_tokens += self._fill[block]
            if i < len(hashes):
                self.allocator.register(block, hashes[i])
        self._seqs[seq_id] = _Sequence(table, tokens, hashes)
        self._logical_blocks += len(table)
        return len(hits) * bs

    def _sharers(self, block: int) -> int:
        """Block tables that hold ``block`` (its references less those of queued copies, which only read it
        before any new token is written)."""
        return self.allocator.ref_count(block) - self._holds[block]

    def append_slot(self, seq_id: int, token_id: int) -> AppendResult:
        """Append one token: a new block only when the last is full; copy-on-write when the last is shared.

        The copy is queued (see :meth:`flush_copies`); with a cache, flush before writing the token's K/V.
        """
        return self.append_slots([seq_id], [token_id])[0]

    def append_slots(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[AppendResult]:
        """Append one token to each sequence (distinct ids), all or nothing; copy-on-write is queued."""
        if len(seq_ids) != len(token_ids):
            raise ValueError(
                f"seq_ids and token_ids must have the same length, got {len(seq_ids)}, {len(token_ids)}"
            )
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids must be distinct")
        seqs = [self._resident(s) for s in seq_ids]
        # Exact need: a last block with r references and a appenders among them is copied min(a, r - 1)
        # times (the last appender to reach it finds ref 1 and writes in place).
        appenders = Counter(s.block_table[-1] for s in seqs if len(s.token_ids) % self.block_size)
        needed = sum(1 for s in seqs if len(s.token_ids) % self.block_size == 0)
        needed += sum(min(a, self._sharers(b) - 1) for b, a in appenders.items())
        if needed > self.allocator.num_free_blocks:
            raise OutOfBlocksError(needed, self.allocator.num_free_blocks, self.num_blocks, "append")
        return [self._append(seq, int(tok)) for seq, tok in zip(seqs, token_ids, strict=True)]

    def _append(self, seq: _Sequence, token_id: int) -> AppendResult:
        bs = self.block_size
        pos = len(seq.token_ids)
        copy = None
        if pos % bs == 0:
            (block,) = self.allocator.allocate(1, "append")
            self._fill[block] = 0
            seq.block_table.append(block)
            self._logical_blocks += 1
        else:
            block = seq.block_table[-1]
            if self._sharers(block) > 1:
                (new,) = self.allocator.allocate(1, "copy-on-write")
                # The queued copy holds our reference to the source until it has run.
                self._pending.src.append(block)
                self._pending.dst.append(new)
                self._holds[block] += 1
                self._fill[new] = self._fill[block]
                self._stored_tokens += self._fill[new]
                seq.block_table[-1] = new
                copy, block = (block, new), new
        seq.token_ids.append(token_id)
        self._fill[block] += 1
        self._stored_tokens += 1
        if (pos + 1) % bs == 0:
            key = hash_block(seq.block_hashes[-1] if seq.block_hashes else None, seq.token_ids[-bs:])
            seq.block_hashes.append(key)
            self.allocator.register(block, key)
        return AppendResult(block * bs + pos % bs, copy)

    def flush_copies(self) -> tuple[list[int], list[int]]:
        """Run all queued copy-on-write copies as one batched copy (if there is a cache), release the sources.

        Returns the (src, dst) lists that were copied.
        """
        src, dst = self._pending.src, self._pending.dst
        self._pending = _Pending()
        self._holds.clear()
        if self.cache is not None:
            self.cache.copy_blocks(src, dst)
        for block in src:
            self._release(block)
        return src, dst

    # ---- sharing and release -------------------------------------------------------------------------
    def fork(self, parent_id: int, child_id: int) -> None:
        """Make ``child_id`` share every block of ``parent_id`` (parallel sampling, beam search); no copy."""
        parent = self._resident(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"child_id {child_id} is already allocated")
        for block in parent.block_table:
            self.allocator.incref(block)
        self._seqs[child_id] = _Sequence(
            list(parent.block_table), list(parent.token_ids), list(parent.block_hashes)
        )
        self._logical_blocks += len(parent.block_table)

    def _release(self, block: int) -> None:
        if self.allocator.decref(block) == 0:
            self._stored_tokens -= self._fill[block]
            if self.allocator.block_hash(block) is None:
                self._fill[block] = 0

    def free(self, seq_id: int) -> None:
        """Release ``seq_id``'s blocks (cached full blocks stay reusable until evicted) and forget it."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        if seq.swapped:
            for block in seq.block_table:
                if self.cpu_allocator.decref(block) == 0:
                    self._cpu_fill[block] = 0
            return
        self._drop_pending_into(set(seq.block_table))
        self._logical_blocks -= len(seq.block_table)
        # Tail first, so that the prefix blocks are the most recently used and evicted last.
        for block in reversed(seq.block_table):
            self._release(block)

    def _drop_pending_into(self, blocks: set[int]) -> None:
        """Cancel queued copies whose destination is about to be released (their data is no longer wanted)."""
        keep = _Pending()
        for s, d in zip(self._pending.src, self._pending.dst, strict=True):
            if d in blocks and self._sharers(d) == 1:
                self._holds[s] -= 1
                self._release(s)
            else:
                keep.src.append(s)
                keep.dst.append(d)
        self._pending = keep

    # ---- swapping ------------------------------------------------------------------------------------
    def _unique_blocks(self, seq_ids: Iterable[int]) -> list[int]:
        return list(dict.fromkeys(b for s in seq_ids for b in self._seqs[s].block_table))

    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        """Whether the host pool has room for the distinct blocks of these resident sequences."""
        for s in seq_ids:
            self._resident(s)
        return len(self._unique_blocks(seq_ids)) <= self.cpu_allocator.num_free_blocks

    def can_swap_in(self, seq_ids: Sequence[int]) -> bool:
        """Whether the device pool has room for the distinct blocks of these swapped-out sequences."""
        for s in seq_ids:
            self._swapped(s)
        return len(self._unique_blocks(seq_ids)) <= self.allocator.num_free_blocks

    def swap_out(self, seq_ids: Sequence[int]) -> dict[int, int]:
        """Move the sequences (e.g. the beams of one request, swapped together so their sharing survives) to
        host memory; blocks they share with resident sequences stay on the device too.

        Returns the mapping device block -> host block.
        """
        for s in seq_ids:
            self._resident(s)
        blocks = self._unique_blocks(seq_ids)
        if len(blocks) > self.cpu_allocator.num_free_blocks:
            host = self.cpu_allocator
            raise OutOfBlocksError(len(blocks), host.num_free_blocks, host.num_blocks, "swap-out (host)")
        self.flush_copies()  # a pending destination's data must exist before it is moved
        cpu = self.cpu_allocator.allocate(len(blocks), "swap-out (host)")
        mapping = dict(zip(blocks, cpu, strict=True))
        if self.cache is not None:
            self.cache.swap_out(blocks, cpu)
        for dev, host in mapping.items():
            self._cpu_fill[host] = self._fill[dev]
        for s in seq_ids:
            seq = self._seqs[s]
            for block in seq.block_table:
                self.cpu_allocator.incref(mapping[block])
            self._logical_blocks -= len(seq.block_table)
            for block in reversed(seq.block_table):
                self._release(block)
            seq.block_table = [mapping[b] for b in seq.block_table]
            seq.swapped = True
        for host in cpu:  # drop the allocation's own reference; the tables hold theirs
            self.cpu_allocator.decref(host)
        return mapping

    def swap_in(self, seq_ids: Sequence[int]) -> dict[int, int]:
        """Bring swapped-out sequences back into fresh device blocks (their full blocks are published to the
        prefix cache again). Returns the mapping host block -> device block."""
        for s in seq_ids:
            self._swapped(s)
        blocks = self._unique_blocks(seq_ids)
        if len(blocks) > self.allocator.num_free_blocks:
            raise OutOfBlocksError(len(blocks), self.allocator.num_free_blocks, self.num_blocks, "swap-in")
        dev = self.allocator.allocate(len(blocks), "swap-in")
        mapping = dict(zip(blocks, dev, strict=True))
        if self.cache is not None:
            self.cache.swap_in(blocks, dev)
        for host, block in mapping.items():
            self._fill[block] = self._cpu_fill[host]
            self._stored_tokens += self._fill[block]
        for s in seq_ids:
            seq = self._seqs[s]
            host_table, seq.block_table = seq.block_table, [mapping[b] for b in seq.block_table]
            for block in seq.block_table:
                self.allocator.incref(block)
            for host in host_table:
                if self.cpu_allocator.decref(host) == 0:
                    self._cpu_fill[host] = 0
            for block, key in zip(seq.block_table, seq.block_hashes, strict=False):
                if self.allocator.block_hash(block) is None:
                    self.allocator.register(block, key)
            self._logical_blocks += len(seq.block_table)
            seq.swapped = False
        for block in dev:  # drop the allocation's own reference; the tables hold theirs
            self.allocator.decref(block)
        return mapping

    # ---- batches -------------------------------------------------------------------------------------
    def build_batch(
        self,
        seq_ids: Sequence[int],
        query_lens: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        max_blocks: int | None = None,
    ) -> BatchMetadata:
        """``block_table``, ``cache_seqlens``, ``slot_mapping`` (of each sequence's last ``query_lens``
        tokens, default 1) and ``cu_seqlens_q`` of these resident sequences, on ``device`` (default: the
        cache's device)."""
        if device is None:
            device = self.cache.device if self.cache is not None else "cpu"
        seqs = [self._resident(s) for s in seq_ids]
        return build_batch_metadata(
            [s.block_table for s in seqs],
            [len(s.token_ids) for s in seqs],
            self.block_size,
            query_lens,
            device,
            max_blocks,
        )

    # ---- lookup helpers ------------------------------------------------------------------------------
    def _get(self, seq_id: int) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"seq_id {seq_id} is not allocated") from None

    def _resident(self, seq_id: int) -> _Sequence:
        seq = self._get(seq_id)
        if seq.swapped:
            raise ValueError(f"seq_id {seq_id} is swapped out; swap it in first")
        return seq

    def _swapped(self, seq_id: int) -> _Sequence:
        seq = self._get(seq_id)
        if not seq.swapped:
            raise ValueError(f"seq_id {seq_id} is not swapped out")
        return seq
