"""A serving loop end to end: the block manager's tables and slot mappings drive the attention kernels.

Seeded runs of a small serving engine: prompts allocated with prefix caching (a later prompt reuses an earlier
one's full blocks), a chunked prefill of each prompt's uncached tokens through ``flash_attn_varlen_func`` with
``block_table``, then decoding steps through ``flash_attn_with_kvcache`` on the manager's block tables, with
forks (parallel sampling: the shared last block is copied on write in one batched copy), swapping out to host
memory and back (new block ids, same contents), frees and a prompt that revives freed prefix blocks. Each
token's K/V is a function of (token, position, layer), so a block reused through the prefix cache holds what
the sequence would have written itself. Half the steps write the new token's K/V through ``PagedKVCache.store``
at the manager's slots, the other half let the kernel append it at ``cache_seqlens`` through the block table.
Every attention call is checked against ``attention_ref`` over each sequence's logical keys (the tolerance
rule), both layers, and the cache starts NaN so a slot read outside a sequence's table fails. The run also
asserts that it took each path it claims to test (a prefix hit, a copy-on-write, a swap, both write modes).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import DEVICE, ON_GPU

import ioattn
from ioattn.paged import BlockManager, PagedKVCache
from ioattn.reference import attention_ref
from ioattn.testing import tolerance_check

LAYERS, NHEADS, NHEADS_K = 2, 4, 2
HEADDIM = 128 if ON_GPU else 32
VOCAB, MAX_POS = 5, 1024


class Engine:
    """The manager, its cache and the model of what each sequence holds (tokens), with K/V drawn from fixed
    per-token and per-position tables."""

    def __init__(self, block_size: int, dtype: torch.dtype, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tok_tab = torch.randn(LAYERS, 2, VOCAB, NHEADS_K, HEADDIM, generator=gen)
        self.pos_tab = 0.5 * torch.randn(LAYERS, 2, MAX_POS, NHEADS_K, HEADDIM, generator=gen)
        self.dtype, self.bs, self.gen = dtype, block_size, gen
        self.cache = PagedKVCache(LAYERS, 96, block_size, NHEADS_K, HEADDIM, dtype=dtype, device=DEVICE,
                                  num_cpu_blocks=32)
        self.cache.kv.fill_(float("nan"))
        self.mgr = BlockManager(96, block_size, num_cpu_blocks=32, enable_prefix_caching=True, cache=self.cache)
        self.tokens: dict[int, list[int]] = {}
        self.swapped: set[int] = set()
        self.seen = {"prefix hit": 0, "copy-on-write": 0, "swap": 0, "store": 0, "kernel append": 0}

    def kv(self, sid: int, layer: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions start.. of the sequence, (n, NHEADS_K, HEADDIM) in the cache's dtype."""
        toks = torch.tensor(self.tokens[sid][start:], dtype=torch.long)
        pos = torch.arange(start, start + len(toks))
        k = self.tok_tab[layer, 0, toks] + self.pos_tab[layer, 0, pos]
        v = self.tok_tab[layer, 1, toks] + self.pos_tab[layer, 1, pos]
        return k.to(self.dtype), v.to(self.dtype)

    def queries(self, n: int) -> torch.Tensor:
        return torch.randn(n, NHEADS, HEADDIM, generator=self.gen).to(self.dtype)

    def check(self, out: torch.Tensor, sids: list[int], qs: list[torch.Tensor], layer: int) -> None:
        """out (total new tokens, NHEADS, HEADDIM) against attention_ref, bottom-right causal per sequence."""
        refs = {True: [], False: []}
        for sid, q in zip(sids, qs, strict=True):
            k, v = self.kv(sid, layer)
            for upcast in refs:
                refs[upcast].append(attention_ref(q[None], k[None], v[None], causal=True, upcast=upcast)[0][0])
        out = out.reshape(-1, NHEADS, HEADDIM).cpu()
        assert torch.isfinite(out).all(), "a NaN slot was read"
        floor = 1e-5 if self.dtype == torch.float32 else 1e-4
        res = tolerance_check(out, torch.cat(refs[True]), torch.cat(refs[False]), floor=floor, name="out")
        assert res.ok, res

    def allocate(self, sid: int, prompt: list[int]) -> int:
        """Allocates and writes the prompt's uncached tokens; returns how many were cached."""
        cached = self.mgr.allocate(sid, prompt)
        self.tokens[sid] = list(prompt)
        self.seen["prefix hit"] += cached > 0
        meta = self.mgr.build_batch([sid], query_lens=[len(prompt) - cached])
        for layer in range(LAYERS):
            k, v = self.kv(sid, layer, cached)
            self.cache.store(layer, meta.slot_mapping, k, v)
        return cached

    def prefill(self, sids: list[int], new: list[int]) -> None:
        """Attention of each sequence's last ``new`` tokens over its whole table, as one varlen call."""
        meta = self.mgr.build_batch(sids, query_lens=new)
        cu_k = torch.nn.functional.pad(meta.cache_seqlens.cumsum(0, dtype=torch.int32), (1, 0))
        qs = [self.queries(n) for n in new]
        for layer in range(LAYERS):
            out = ioattn.flash_attn_varlen_func(
                torch.cat(qs).to(DEVICE), self.cache.key_cache(layer), self.cache.value_cache(layer),
                meta.cu_seqlens_q, cu_k, meta.max_seqlen_q, meta.max_seqlen_k, causal=True,
                block_table=meta.block_table)
            self.check(out, sids, qs, layer)

    def decode(self, sids: list[int], rng: random.Random) -> None:
        """One new token for each sequence (copy-on-write flushed first), its K/V written by the cache's
        scatter or by the kernel's append, then one query row each against the whole sequence."""
        results = self.mgr.append_slots(sids, [rng.randrange(VOCAB) for _ in sids])
        copied, _ = self.mgr.flush_copies()
        self.seen["copy-on-write"] += len(copied)
        for sid, res in zip(sids, results, strict=True):
            self.tokens[sid] = self.mgr.token_ids(sid)
            assert res.slot == self.mgr.slot(sid, len(self.tokens[sid]) - 1)
        meta = self.mgr.build_batch(sids)
        by_kernel = rng.random() < 0.5
        self.seen["kernel append" if by_kernel else "store"] += 1
        qs = [self.queries(1) for _ in sids]
        q = torch.stack(qs).to(DEVICE)  # (batch, 1, NHEADS, HEADDIM)
        for layer in range(LAYERS):
            new_k = torch.stack([self.kv(s, layer, len(self.tokens[s]) - 1)[0] for s in sids]).to(DEVICE)
            new_v = torch.stack([self.kv(s, layer, len(self.tokens[s]) - 1)[1] for s in sids]).to(DEVICE)
            kc, vc = self.cache.key_cache(layer), self.cache.value_cache(layer)
            if by_kernel:
                out = ioattn.flash_attn_with_kvcache(q, kc, vc, new_k, new_v, cache_seqlens=meta.cache_seqlens - 1,
                                                     block_table=meta.block_table, causal=True)
                flat_k = kc.reshape(-1, NHEADS_K, HEADDIM)
                assert torch.equal(flat_k[meta.slot_mapping].cpu(), new_k[:, 0].cpu())  # the manager's slots
            else:
                self.cache.store(layer, meta.slot_mapping, new_k[:, 0], new_v[:, 0])
                out = ioattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=meta.cache_seqlens,
                                                     block_table=meta.block_table, causal=True)
            self.check(out, sids, qs, layer)

    def resident(self) -> list[int]:
        return sorted(s for s in self.tokens if s not in self.swapped)


@pytest.fixture(params=["triton", "chunked"])
def backend(request, monkeypatch):
    if request.param == "chunked":
        monkeypatch.setenv("IOATTN_BACKEND", "chunked")
    return request.param


@pytest.mark.parametrize("block_size,seed", [(1, 2), (4, 0), (16, 1)] + ([(256, 3)] if ON_GPU else []))
def test_serving_loop_matches_reference(block_size, seed, backend):
    dtype = torch.bfloat16 if ON_GPU and seed % 2 else torch.float16
    rng = random.Random(seed)
    eng = Engine(block_size, dtype, seed)
    bs = block_size
    base = [rng.randrange(VOCAB) for _ in range(2 * bs + 3)]
    # The second prompt leaves the first one's tokens right after two blocks, the third at its first token.
    prompts = {0: base, 1: base[: 2 * bs] + [(base[2 * bs] + 1) % VOCAB, rng.randrange(VOCAB)],
               2: [(base[0] + 1) % VOCAB] + [rng.randrange(VOCAB) for _ in range(bs)]}
    cached = {sid: eng.allocate(sid, p) for sid, p in prompts.items()}
    assert cached == {0: 0, 1: 2 * bs, 2: 0}  # the second prompt reuses the first one's two full blocks
    eng.prefill([0, 1, 2], [len(prompts[s]) - cached[s] for s in (0, 1, 2)])

    next_id = 3
    for step in range(10):
        action = ("fork", "fork", "swap out", "swap in", "free", "revive")[step % 6] if step < 6 else "decode"
        if action == "fork":  # parallel sampling: the child shares every block, the last one partly filled
            parent = [s for s in eng.resident() if len(eng.tokens[s]) % bs][0] if bs > 1 else eng.resident()[0]
            eng.mgr.fork(parent, next_id)
            eng.tokens[next_id] = list(eng.tokens[parent])
            next_id += 1
        elif action == "swap out":
            victim = eng.resident()[-1]
            before = eng.mgr.block_table(victim)
            eng.mgr.swap_out([victim])
            eng.swapped.add(victim)
            eng.seen["swap"] += 1
            assert eng.mgr.is_swapped(victim) and len(eng.mgr.block_table(victim)) == len(before)
        elif action == "swap in":
            eng.mgr.swap_in(sorted(eng.swapped))
            eng.swapped.clear()
        elif action == "free":
            eng.mgr.free(0)  # its full prompt blocks stay in the prefix cache (shared, or evictable)
            del eng.tokens[0]
        elif action == "revive":
            got = eng.allocate(next_id, base[: 2 * bs + 1])
            assert got == (2 * bs + 1) // bs * bs  # its full blocks are found again through the prefix cache
            eng.prefill([next_id], [1])
            next_id += 1
        batch = eng.resident()
        if step % 3 == 2:
            batch = sorted(rng.sample(batch, max(1, len(batch) // 2)) + batch[:1])
            batch = sorted(set(batch))
        eng.decode(batch, rng)

    if bs == 1:  # every append opens a block of its own: nothing is ever copied on write
        eng.seen.pop("copy-on-write")
    assert all(n > 0 for n in eng.seen.values()), eng.seen
    for sid in list(eng.tokens):
        eng.mgr.free(sid)
    assert eng.mgr.num_free_blocks == eng.mgr.num_blocks
