"""write_kv: the per-step scatter of new tokens into a paged cache by slot mapping."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU

from ioattn.kvcache import write_kv

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, nheads_k, headdim", [(1, 1, 40), (16, 3, 64), (256, 2, 40)])
def test_scatter_matches_index_put(dtype, block_size, nheads_k, headdim):
    num_blocks = 7
    slots = num_blocks * block_size
    num_tokens = min(slots, 37)
    gen = torch.Generator().manual_seed(block_size * 10 + nheads_k)
    slot_mapping = torch.randperm(slots, generator=gen)[:num_tokens].to(torch.int64)
    slot_mapping[::5] = -1  # padding tokens of a batch are skipped
    k = torch.randn(num_tokens, nheads_k, headdim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, nheads_k, headdim, generator=gen).to(dtype)
    shape = (num_blocks, block_size, nheads_k, headdim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)

    expect_k, expect_v = k_cache.clone().view(slots, nheads_k, headdim), v_cache.clone().view(slots, nheads_k,
                                                                                              headdim)
    keep = slot_mapping >= 0
    expect_k[slot_mapping[keep]] = k[keep]
    expect_v[slot_mapping[keep]] = v[keep]

    k_cache_d, v_cache_d = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), k_cache_d, v_cache_d, slot_mapping.to(DEVICE))
    # Bit-exact copies, and every slot not named (NaN) left alone.
    torch.testing.assert_close(k_cache_d.cpu().view_as(expect_k), expect_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache_d.cpu().view_as(expect_v), expect_v, rtol=0, atol=0, equal_nan=True)
    assert int(torch.isnan(k_cache_d).sum()) == (slots - int(keep.sum())) * nheads_k * headdim


def test_strided_views_and_empty_step():
    # k and v as views of one packed (num_tokens, 2, nheads_k, d) tensor; caches as views of one kv cache.
    kv = torch.randn(5, 2, 2, 32)
    kv_cache = torch.zeros(4, 2, 8, 2, 32)
    slot_mapping = torch.tensor([0, 9, 31, 17, 8], dtype=torch.int64)
    kv_d, kv_cache_d = kv.to(DEVICE), kv_cache.to(DEVICE)
    write_kv(kv_d[:, 0], kv_d[:, 1], kv_cache_d[:, 0], kv_cache_d[:, 1], slot_mapping.to(DEVICE))
    flat = kv_cache_d.cpu().permute(1, 0, 2, 3, 4).reshape(2, 32, 2, 32)
    torch.testing.assert_close(flat[0, slot_mapping], kv[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(flat[1, slot_mapping], kv[:, 1], rtol=0, atol=0)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slot_mapping] = False
    assert torch.all(flat[:, untouched] == 0)
    write_kv(kv_d[:0, 0], kv_d[:0, 1], kv_cache_d[:, 0], kv_cache_d[:, 1], slot_mapping[:0].to(DEVICE))


@pytest.mark.parametrize("change, match", [
    (dict(k=torch.randn(3, 2, 16, 1)), "k must have shape"),
    (dict(v=torch.randn(3, 2, 8)), "v must have k's shape"),
    (dict(k_cache=torch.randn(4, 8, 2, 16).half()), "k_cache.dtype must equal k.dtype"),
    (dict(v_cache=torch.randn(4, 8, 2, 8)), "v_cache must have k_cache's shape"),
    (dict(k_cache=torch.randn(4, 8, 3, 16), v_cache=torch.randn(4, 8, 3, 16)), "must match k_cache's"),
    (dict(slot_mapping=torch.tensor([0, 1, 2], dtype=torch.int32)), "slot_mapping.dtype must be torch.int64"),
    (dict(slot_mapping=torch.tensor([0, 1])), r"slot_mapping must have shape \(3\)"),
    (dict(slot_mapping=torch.tensor([0, 1, 32])), "slot_mapping entries must be < num_blocks"),
])
def test_validation_names_the_argument(change, match):
    kwargs = dict(k=torch.randn(3, 2, 16), v=torch.randn(3, 2, 16), k_cache=torch.randn(4, 8, 2, 16),
                  v_cache=torch.randn(4, 8, 2, 16), slot_mapping=torch.tensor([0, 1, 2]))
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        write_kv(**kwargs)
