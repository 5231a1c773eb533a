"""PagedAttention's KV-cache manager: unit tests per feature, and a hypothesis state machine that drives
random allocate / append / fork (copy-on-write) / free / swap / prefix reuse against an independent model,
writing token-dependent K/V into a real cache and reading it back through the block tables."""

from __future__ import annotations

import math
import random

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ioattn.paged import (
    BlockAllocator,
    BlockManager,
    OutOfBlocksError,
    PagedKVCache,
    build_batch_metadata,
    build_block_table,
)

LAYERS = 2


def expected_kv(token: int, pos: int, layer: int) -> tuple[list[float], list[float]]:
    """The K and V (nheads_k=1, headdim=2) we write for ``token`` at ``pos`` in ``layer``."""
    key = [float(token), float(pos + 1000 * layer)]
    return key, [-k - 0.5 for k in key]


def write_tokens(mgr: BlockManager, seq_id: int, tokens: list[int], num_new: int) -> None:
    """Write the last ``num_new`` tokens' K/V through the manager's slot mapping."""
    if num_new == 0:
        return
    meta = mgr.build_batch([seq_id], query_lens=[num_new])
    n = len(tokens)
    for layer in range(LAYERS):
        kv = [expected_kv(tokens[p], p, layer) for p in range(n - num_new, n)]
        key = torch.tensor([k for k, _ in kv], device=mgr.cache.device).view(num_new, 1, 2)
        value = torch.tensor([v for _, v in kv], device=mgr.cache.device).view(num_new, 1, 2)
        mgr.cache.store(layer, meta.slot_mapping, key, value)


def read_tokens(kv: torch.Tensor, table: list[int], n: int, bs: int) -> torch.Tensor:
    """K/V of the first ``n`` tokens through ``table``: (layers, 2, n, 2), from kv (layers, 2, blocks, bs,
    1, 2)."""
    kv = kv.cpu()
    pos = torch.arange(n)
    blocks = torch.tensor(table, dtype=torch.long)[pos // bs] if n else pos
    return kv[:, :, blocks, pos % bs, 0, :]


def expected_tokens(tokens: list[int]) -> torch.Tensor:
    out = torch.empty(LAYERS, 2, len(tokens), 2)
    for layer in range(LAYERS):
        for p, t in enumerate(tokens):
            k, v = expected_kv(t, p, layer)
            out[layer, 0, p] = torch.tensor(k)
            out[layer, 1, p] = torch.tensor(v)
    return out


def make_manager(num_blocks: int, bs: int, num_cpu_blocks: int = 0, prefix: bool = True,
                 device: str = "cpu") -> BlockManager:
    cache = PagedKVCache(LAYERS, num_blocks, bs, 1, 2, dtype=torch.float32, num_cpu_blocks=num_cpu_blocks,
                         device=device)
    cache.kv.fill_(float("nan"))  # unwritten slots show as NaN
    return BlockManager(
        num_blocks, bs, num_cpu_blocks=num_cpu_blocks, enable_prefix_caching=prefix, cache=cache
    )


def snapshot(mgr: BlockManager) -> tuple:
    """Everything an operation could change, for 'a failed operation changed nothing' checks."""
    a, c = mgr.allocator, mgr.cpu_allocator
    return (
        {s: (mgr.block_table(s), mgr.token_ids(s), mgr.is_swapped(s)) for s in mgr.seq_ids},
        [a.ref_count(b) for b in range(a.num_blocks)],
        [c.ref_count(b) for b in range(c.num_blocks)],
        sorted(a.free_block_ids()),
        a.evictable_block_ids(),
        a.cached_blocks(),
        mgr.pending_copies(),
        mgr.stats(),
        mgr.cache.kv.clone() if mgr.cache is not None else None,
    )


def assert_same_snapshot(before: tuple, after: tuple) -> None:
    assert before[:-1] == after[:-1]
    if before[-1] is not None:
        assert torch.equal(before[-1].nan_to_num(-7.0), after[-1].nan_to_num(-7.0))


# ---- unit tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, 3, 12, 512, -4])
def test_block_size_must_be_power_of_two_up_to_256(bs: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(8, bs)


@pytest.mark.parametrize("bs", [1, 2, 16, 256])
def test_allocate_append_only_last_block_wastes(bs: int) -> None:
    mgr = BlockManager(64, bs)
    n = 3 * bs + (bs // 2 if bs > 1 else 0)
    assert mgr.allocate(0, list(range(n))) == 0
    assert len(mgr.block_table(0)) == math.ceil(n / bs)
    st0 = mgr.stats()
    assert st0.stored_tokens == n and st0.allocated_slots == math.ceil(n / bs) * bs
    assert st0.waste * st0.allocated_slots < bs  # only the last block has empty slots
    used = mgr.num_used_blocks
    for i in range(2 * bs + 1):
        res = mgr.append_slot(0, 7)
        pos = n + i
        assert res.copy is None
        assert res.slot == mgr.block_table(0)[pos // bs] * bs + pos % bs == mgr.slot(0, pos)
        assert len(mgr.block_table(0)) == math.ceil((pos + 1) / bs)
    assert mgr.num_used_blocks == used + math.ceil((n + 2 * bs + 1) / bs) - math.ceil(n / bs)
    mgr.free(0)
    assert mgr.num_free_blocks == 64 and mgr.stats().stored_tokens == 0


def test_fork_shares_blocks_and_write_copies_on_write_in_one_batched_copy() -> None:
    bs = 4
    mgr = make_manager(16, bs)
    prompt = [5, 6, 7, 8, 9, 10]
    mgr.allocate(0, prompt)
    write_tokens(mgr, 0, prompt, len(prompt))
    mgr.fork(0, 1)
    mgr.fork(0, 2)
    table = mgr.block_table(0)
    assert mgr.block_table(1) == mgr.block_table(2) == table
    assert [mgr.allocator.ref_count(b) for b in table] == [3, 3]
    assert mgr.stats().sharing_saving == pytest.approx(1 - 2 / 6)
    calls = []
    original = mgr.cache.copy_blocks
    mgr.cache.copy_blocks = lambda s, d: (calls.append((list(s), list(d))), original(s, d))[1]
    results = mgr.append_slots([1, 2, 0], [11, 12, 13])
    # Two copies (children), the parent finds ref 1 and writes in place.
    assert [r.copy is not None for r in results] == [True, True, False]
    assert results[0].copy[0] == results[1].copy[0] == table[1]
    assert mgr.allocator.ref_count(table[1]) == 3  # parent + the two queued copies hold the source
    src, dst = mgr.flush_copies()
    assert calls == [(src, dst)] and len(src) == 2  # one batched copy for every layer, K and V
    assert mgr.allocator.ref_count(table[1]) == 1
    assert mgr.block_table(0) == table and mgr.block_table(1)[0] == mgr.block_table(2)[0] == table[0]
    for sid, tok in ((0, 13), (1, 11), (2, 12)):
        tokens = prompt + [tok]
        write_tokens(mgr, sid, tokens, 1)
        got = read_tokens(mgr.cache.kv, mgr.block_table(sid), len(tokens), bs)
        assert torch.equal(got, expected_tokens(tokens))


def test_pending_copy_source_cannot_be_reused_before_flush() -> None:
    mgr = BlockManager(4, 2)
    mgr.allocate(0, [1, 2, 3])  # blocks: full + half
    mgr.fork(0, 1)
    last = mgr.block_table(0)[1]
    res = mgr.append_slot(1, 4)
    assert res.copy == (last, mgr.block_table(1)[1])
    mgr.free(0)  # the source's only table reference goes, the queued copy still holds it
    assert mgr.allocator.ref_count(last) == 1 and last not in mgr.allocator.free_block_ids()
    assert mgr.num_free_blocks == 1
    mgr.flush_copies()
    assert last in mgr.allocator.free_block_ids() and mgr.num_free_blocks == 2


def test_free_cancels_a_queued_copy_into_its_blocks() -> None:
    mgr = BlockManager(4, 2)
    mgr.allocate(0, [1, 2, 3])
    mgr.fork(0, 1)
    mgr.append_slot(1, 4)
    mgr.free(1)
    assert mgr.pending_copies() == ([], [])
    assert mgr.allocator.ref_count(mgr.block_table(0)[1]) == 1
    mgr.free(0)
    assert mgr.num_free_blocks == 4


def test_exact_block_need_for_batched_appends_to_a_shared_block() -> None:
    mgr = BlockManager(3, 2)
    mgr.allocate(0, [1, 2, 3])  # 2 blocks, 1 free
    mgr.fork(0, 1)
    # Two appenders of a block with 2 references need one copy, not two.
    results = mgr.append_slots([0, 1], [4, 5])
    assert sum(r.copy is not None for r in results) == 1 and mgr.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        mgr.append_slots([0, 1], [6, 7])


def test_out_of_blocks_is_typed_and_changes_nothing() -> None:
    mgr = make_manager(4, 4, num_cpu_blocks=1)
    mgr.allocate(0, list(range(12)))  # 3 full blocks: each append takes a new block
    write_tokens(mgr, 0, list(range(12)), 12)
    mgr.fork(0, 1)
    before = snapshot(mgr)
    for op in (
        lambda: mgr.allocate(2, list(range(100, 108))),
        lambda: mgr.append_slots([0, 1], [1, 2]),
        lambda: mgr.swap_out([0]),
    ):
        with pytest.raises(OutOfBlocksError) as info:
            op()
        assert isinstance(info.value, RuntimeError) and info.value.needed > info.value.available
        assert "out of KV-cache blocks" in str(info.value)
        assert_same_snapshot(before, snapshot(mgr))
    assert not mgr.can_allocate(list(range(100, 108))) and mgr.can_allocate(list(range(100, 104)))


def test_reviving_evictable_prefix_blocks_counts_against_free_blocks() -> None:
    mgr = BlockManager(4, 2)
    mgr.allocate(0, [1, 2, 3, 4])
    mgr.free(0)  # 2 evictable cached blocks
    mgr.allocate(1, [9, 9, 9, 9])  # takes the 2 blocks of the free list
    before = snapshot(mgr)
    # 2 cached hits (taken out of the free pool) + 1 fresh block = 3 > 2 free.
    assert not mgr.can_allocate([1, 2, 3, 4, 5, 6])
    with pytest.raises(OutOfBlocksError) as info:
        mgr.allocate(2, [1, 2, 3, 4, 5, 6])
    assert (info.value.needed, info.value.available) == (3, 2)
    assert_same_snapshot(before, snapshot(mgr))
    assert mgr.allocate(2, [1, 2, 3, 4]) == 4


def test_prefix_cache_reuses_full_blocks_and_evicts_lru_only_when_unreferenced() -> None:
    bs = 4
    mgr = make_manager(8, bs)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    mgr.allocate(0, prompt)
    write_tokens(mgr, 0, prompt, 10)
    assert mgr.allocate(1, prompt[:8] + [99, 98, 97]) == 8  # both full blocks hit
    assert mgr.block_table(1)[:2] == mgr.block_table(0)[:2]
    assert mgr.block_table(1)[2] != mgr.block_table(0)[2]
    assert mgr.allocate(2, [0, 1, 2, 3, 9, 9, 9, 9]) == 4  # only the first block matches
    assert mgr.allocate(3, [1, 2, 3, 4, 5, 6, 7, 8]) == 0  # same tokens shifted: a different prefix
    mgr.free(1)
    mgr.free(2)
    mgr.free(3)
    head = mgr.block_table(0)[:2]
    mgr.free(0)
    assert mgr.num_free_blocks == 8 and mgr.stats().stored_tokens == 0
    evictable = mgr.allocator.evictable_block_ids()
    assert set(head) <= set(evictable)
    # A later sequence with the prefix revives the evictable blocks, with their K/V intact.
    assert mgr.allocate(4, prompt[:8] + [50]) == 8 and mgr.block_table(4)[:2] == head
    write_tokens(mgr, 4, prompt[:8] + [50], 1)
    got = read_tokens(mgr.cache.kv, mgr.block_table(4), 9, bs)
    assert torch.equal(got, expected_tokens(prompt[:8] + [50]))
    # Filling the pool evicts unreferenced cached blocks, least recently used first, never the used ones.
    lru = [b for b in mgr.allocator.evictable_block_ids()]
    mgr.allocate(5, list(range(200, 200 + 4 * mgr.num_free_blocks)))
    assert mgr.num_free_blocks == 0 and mgr.block_table(4)[:2] == head
    assert set(mgr.block_table(5)) >= set(lru)
    assert all(mgr.allocator.block_hash(b) is not None for b in head)


def test_prefix_cache_lru_order_evicts_tails_first() -> None:
    mgr = BlockManager(6, 2)
    mgr.allocate(0, [1, 2, 3, 4, 5, 6])
    table = mgr.block_table(0)
    mgr.free(0)
    assert mgr.allocator.evictable_block_ids()[:3] == table[::-1]


def test_prefix_caching_off_shares_nothing() -> None:
    mgr = BlockManager(8, 2, enable_prefix_caching=False)
    mgr.allocate(0, [1, 2, 3, 4])
    assert mgr.allocate(1, [1, 2, 3, 4]) == 0
    assert not set(mgr.block_table(0)) & set(mgr.block_table(1))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_swap_out_and_in_keeps_contents_and_sharing(device: str) -> None:
    """Preemption by swapping; on a GPU the host blocks live in pinned memory and come back through an
    asynchronous copy on the current stream."""
    bs = 2
    mgr = make_manager(8, bs, num_cpu_blocks=8, device=device)
    assert mgr.cache.kv_cpu.is_pinned() == (device == "cuda")
    prompt = [3, 1, 4, 1, 5]
    mgr.allocate(0, prompt)
    write_tokens(mgr, 0, prompt, 5)
    mgr.fork(0, 1)
    mgr.append_slots([0, 1], [9, 8])
    mgr.flush_copies()
    write_tokens(mgr, 0, prompt + [9], 1)
    write_tokens(mgr, 1, prompt + [8], 1)
    assert mgr.can_swap_out([0, 1])
    mapping = mgr.swap_out([0, 1])
    assert len(mapping) == 4  # 2 shared + 2 private last blocks, each moved once
    assert mgr.num_free_blocks == 8 - 0 and mgr.stats().logical_blocks == 0
    assert mgr.is_swapped(0) and mgr.cpu_allocator.ref_count(mgr.block_table(0)[0]) == 2
    with pytest.raises(ValueError, match="swapped out"):
        mgr.append_slot(0, 1)
    for sid, tok in ((0, 9), (1, 8)):
        got = read_tokens(mgr.cache.kv_cpu, mgr.block_table(sid), 6, bs)
        assert torch.equal(got, expected_tokens(prompt + [tok]))
    mgr.cache.kv.fill_(float("nan"))
    assert mgr.can_swap_in([0, 1])
    mgr.swap_in([0, 1])
    assert mgr.cpu_allocator.num_free_blocks == 8
    assert mgr.block_table(0)[:2] == mgr.block_table(1)[:2] and mgr.num_used_blocks == 4
    for sid, tok in ((0, 9), (1, 8)):
        got = read_tokens(mgr.cache.kv, mgr.block_table(sid), 6, bs)
        assert torch.equal(got, expected_tokens(prompt + [tok]))
    mgr.free(0)
    mgr.free(1)
    assert mgr.num_free_blocks == 8


def test_cache_layout_and_copy_blocks_all_layers() -> None:
    cache = PagedKVCache(3, 5, 4, 2, 8, dtype=torch.float32)
    assert cache.key_cache(1).shape == (5, 4, 2, 8) and cache.key_cache(1).is_contiguous()
    assert cache.value_cache(2).data_ptr() != cache.key_cache(2).data_ptr()
    cache.kv.copy_(torch.randn_like(cache.kv))
    before = cache.kv.clone()
    cache.copy_blocks([0, 3], [4, 1])
    assert torch.equal(cache.kv[:, :, 4], before[:, :, 0]) and torch.equal(cache.kv[:, :, 1], before[:, :, 3])
    assert torch.equal(cache.kv[:, :, [0, 2, 3]], before[:, :, [0, 2, 3]])


def _loop_metadata(tables, seqlens, qlens, bs):
    width = max(len(t) for t in tables)
    table = [t + [0] * (width - len(t)) for t in tables]
    slots = []
    for t, n, q in zip(tables, seqlens, qlens, strict=True):
        for pos in range(n - q, n):
            slots.append(t[pos // bs] * bs + pos % bs)
    return table, slots


@pytest.mark.parametrize("seed", range(5))
def test_batch_builders_match_a_python_loop(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    batch = rng.randint(1, 9)
    seqlens = [rng.choice([1, 2, 17, 97, rng.randint(1, 300)]) for _ in range(batch)]
    tables = [rng.sample(range(10_000), math.ceil(n / bs)) for n in seqlens]
    qlens = [rng.randint(0, n) if rng.random() < 0.5 else 1 for n in seqlens]
    meta = build_batch_metadata(tables, seqlens, bs, qlens)
    table, slots = _loop_metadata(tables, seqlens, qlens, bs)
    assert meta.block_table.dtype == torch.int32 and meta.block_table.tolist() == table
    assert meta.cache_seqlens.dtype == torch.int32 and meta.cache_seqlens.tolist() == seqlens
    assert meta.slot_mapping.dtype == torch.int64 and meta.slot_mapping.tolist() == slots
    assert meta.cu_seqlens_q.dtype == torch.int32
    assert meta.cu_seqlens_q.tolist() == [sum(qlens[:i]) for i in range(batch + 1)]
    assert meta.max_seqlen_q == max(qlens) and meta.max_seqlen_k == max(seqlens)
    wide = build_block_table(tables, max_blocks=max(len(t) for t in tables) + 3)
    assert wide.shape == (batch, max(len(t) for t in tables) + 3) and wide[:, -3:].eq(0).all()


def test_batch_builder_rejects_inconsistent_lengths() -> None:
    with pytest.raises(ValueError, match="sequence 0"):
        build_batch_metadata([[1]], [5], 4)
    with pytest.raises(ValueError, match="seqlens"):
        build_batch_metadata([[1], [2]], [1], 4)
    with pytest.raises(ValueError, match="max_blocks"):
        build_block_table([[1, 2, 3]], max_blocks=2)


def test_allocator_rejects_double_free_and_reference_to_free_block() -> None:
    alloc = BlockAllocator(2)
    (b,) = alloc.allocate(1)
    alloc.decref(b)
    with pytest.raises(ValueError):
        alloc.decref(b)
    with pytest.raises(ValueError):
        alloc.incref(b)


# ---- state machine ---------------------------------------------------------------------------------------
class PagedManagerMachine(RuleBasedStateMachine):
    """Drives the manager with a real cache; the model is the token list of each sequence."""

    @initialize(
        bs=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(4, 14),
        num_cpu_blocks=st.integers(0, 8),
        prefix=st.booleans(),
    )
    def setup(self, bs: int, num_blocks: int, num_cpu_blocks: int, prefix: bool) -> None:
        self.bs = bs
        self.mgr = make_manager(num_blocks, bs, num_cpu_blocks, prefix)
        self.tokens: dict[int, list[int]] = {}
        self.swapped: set[int] = set()
        self.prompts: list[list[int]] = []
        self.next_id = 0

    def _resident(self) -> list[int]:
        return sorted(s for s in self.tokens if s not in self.swapped)

    def _attempt(self, op) -> bool:
        before = snapshot(self.mgr)
        try:
            op()
        except OutOfBlocksError:
            assert_same_snapshot(before, snapshot(self.mgr))
            return False
        return True

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        tokens = data.draw(st.lists(st.integers(0, 3), max_size=3 * self.bs + 1), label="tokens")
        if self.prompts and data.draw(st.booleans(), label="reuse prefix"):
            old = data.draw(st.sampled_from(self.prompts), label="old prompt")
            tokens = old[: data.draw(st.integers(0, len(old)), label="cut")] + tokens
        sid = self.next_id
        fits = self.mgr.can_allocate(tokens)
        box: list[int] = []
        ok = self._attempt(lambda: box.append(self.mgr.allocate(sid, tokens)))
        assert ok == fits
        if ok:
            self.next_id += 1
            self.tokens[sid] = list(tokens)
            self.prompts.append(list(tokens))
            assert box[0] % self.bs == 0 and box[0] <= len(tokens)
            write_tokens(self.mgr, sid, tokens, len(tokens) - box[0])

    @precondition(lambda self: any(s not in self.swapped for s in self.tokens))
    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        resident = self._resident()
        sids = data.draw(st.lists(st.sampled_from(resident), min_size=1, unique=True), label="batch")
        toks = data.draw(st.lists(st.integers(0, 3), min_size=len(sids), max_size=len(sids)), label="tokens")
        if not self._attempt(lambda: self.mgr.append_slots(sids, toks)):
            return
        self.mgr.flush_copies()
        for sid, tok in zip(sids, toks, strict=True):
            self.tokens[sid].append(tok)
            write_tokens(self.mgr, sid, self.tokens[sid], 1)

    @precondition(lambda self: any(s not in self.swapped for s in self.tokens))
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self._resident()), label="parent")
        self.mgr.fork(parent, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[parent])
        self.next_id += 1

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)), label="seq")
        self.mgr.free(sid)
        del self.tokens[sid]
        self.swapped.discard(sid)

    @precondition(lambda self: any(s not in self.swapped for s in self.tokens))
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        sids = data.draw(st.lists(st.sampled_from(self._resident()), min_size=1, max_size=3, unique=True))
        fits = self.mgr.can_swap_out(sids)
        assert self._attempt(lambda: self.mgr.swap_out(sids)) == fits
        if fits:
            self.swapped.update(sids)

    @precondition(lambda self: bool(self.swapped))
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        sids = data.draw(st.lists(st.sampled_from(sorted(self.swapped)), min_size=1, max_size=3, unique=True))
        fits = self.mgr.can_swap_in(sids)
        assert self._attempt(lambda: self.mgr.swap_in(sids)) == fits
        if fits:
            self.swapped.difference_update(sids)

    @invariant()
    def tables_tokens_and_contents(self) -> None:
        mgr = self.mgr
        assert sorted(mgr.seq_ids) == sorted(self.tokens)
        for sid, tokens in self.tokens.items():
            table = mgr.block_table(sid)
            assert mgr.token_ids(sid) == tokens and mgr.is_swapped(sid) == (sid in self.swapped)
            assert len(table) == math.ceil(len(tokens) / self.bs)
            kv = mgr.cache.kv_cpu if sid in self.swapped else mgr.cache.kv
            assert torch.equal(read_tokens(kv, table, len(tokens), self.bs), expected_tokens(tokens))

    @invariant()
    def ref_counts_and_free_sets(self) -> None:
        mgr, alloc, host = self.mgr, self.mgr.allocator, self.mgr.cpu_allocator
        refs = [0] * alloc.num_blocks
        host_refs = [0] * host.num_blocks
        fill = {}
        for sid, tokens in self.tokens.items():
            for i, b in enumerate(mgr.block_table(sid)):
                if sid in self.swapped:
                    host_refs[b] += 1
                else:
                    refs[b] += 1
                    n = min(self.bs, len(tokens) - i * self.bs)
                    assert fill.setdefault(b, n) == n  # sharers agree on how full a block is
        for src in mgr.pending_copies()[0]:
            refs[src] += 1
        assert [alloc.ref_count(b) for b in range(alloc.num_blocks)] == refs
        assert [host.ref_count(b) for b in range(host.num_blocks)] == host_refs
        for pool, counts in ((alloc, refs), (host, host_refs)):
            free = pool.free_block_ids()
            used = {b for b, r in enumerate(counts) if r > 0}
            assert not free & used and len(free) == pool.num_free_blocks
            assert free | used == set(range(pool.num_blocks))
            assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
        cached = alloc.cached_blocks()
        assert len(set(cached.values())) == len(cached)
        assert set(alloc.evictable_block_ids()) == {b for b in cached.values() if refs[b] == 0}
        stats = mgr.stats()
        assert stats.stored_tokens == sum(fill.values())
        assert stats.logical_blocks == sum(len(mgr.block_table(s)) for s in self._resident())
        assert 0.0 <= stats.utilisation <= 1.0

    def teardown(self) -> None:
        if not hasattr(self, "mgr"):
            return
        for sid in list(self.tokens):
            self.mgr.free(sid)
        assert self.mgr.num_free_blocks == self.mgr.num_blocks
        assert self.mgr.cpu_allocator.num_free_blocks == self.mgr.cpu_allocator.num_blocks
        assert self.mgr.stats().stored_tokens == 0 and self.mgr.stats().logical_blocks == 0


PagedManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_paged_manager_state_machine = PagedManagerMachine.TestCase
