"""The Gluon decode kernel (sm_90): which calls it takes, and its results against attention_ref on
NaN-filled caches (test_kvcache.run_case), for paged caches of several page sizes and contiguous ones."""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU
from test_kvcache import run_case

import ioattn.ops.decode as decode_ops
from ioattn.kernels.decode_gluon import DecodeConfig, gluon_decode_supported, gluon_num_splits
from ioattn.kvcache import flash_attn_with_kvcache

HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
pytestmark = pytest.mark.skipif(not HOPPER, reason="the Gluon decode kernel runs on sm_90 only")


@pytest.fixture
def gluon_calls(monkeypatch):
    """Counts the calls that took the Gluon kernel (decode plans off: every call takes the whole path)."""
    monkeypatch.setattr(decode_ops._DECODE_PLANS, "enabled", False)
    calls = []
    real = decode_ops.gluon_decode

    def counting(*args, **kwargs):
        calls.append(args[4] is not None)  # paged?
        return real(*args, **kwargs)
    monkeypatch.setattr(decode_ops, "gluon_decode", counting)
    return calls


def _supported(dtype=torch.bfloat16, page=16, d=128, group=4, seqlen_q=1, rotary=False, scale=0.1, softcap=0.0,
               leftpad=False):
    q = torch.empty(2, seqlen_q, 2 * group, d, device="cuda", dtype=dtype)
    shape = (64, page, 2, d) if page else (2, 256, 2, d)
    k = torch.empty(shape, device="cuda", dtype=dtype)
    table = torch.zeros(2, 4, dtype=torch.int32, device="cuda") if page else None
    cos = torch.empty(256, 16, device="cuda", dtype=dtype) if rotary else None
    pads = torch.zeros(2, dtype=torch.int32, device="cuda") if leftpad else None
    return gluon_decode_supported(q, k, k, table, cos, None, scale, softcap, pads)


def test_which_calls_take_it(monkeypatch):
    assert _supported() and _supported(page=0) and _supported(page=256, d=64, dtype=torch.float16)
    assert _supported(group=16, seqlen_q=4)
    assert not _supported(page=8)  # pages under 16 rows: the portable kernel
    assert not _supported(page=48)  # not a power of two: boxes would cross pages
    assert not _supported(dtype=torch.float32)
    assert not _supported(d=96)
    assert not _supported(rotary=True)
    assert not _supported(group=16, seqlen_q=5)  # more than 64 packed rows
    assert not _supported(scale=-0.1) and _supported(scale=-0.1, softcap=5.0)
    assert _supported(page=0, leftpad=True) and not _supported(page=16, leftpad=True)  # pads split pages
    monkeypatch.setenv("IOATTN_GLUON", "0")
    assert not _supported()


def test_default_where_the_programs_fit_at_once(gluon_calls):
    """More (batch x KV head) programs than SMs: the portable kernel (several per SM overlap their starts)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = sms // 2 + 1  # x 2 KV heads: one program over
    run_case(lens=[50] * batch, seqlen_q=1, nheads=8, nheads_k=2, dtype=torch.bfloat16, block_size=16,
             num_splits=0)
    assert gluon_calls == []
    run_case(lens=[50] * (batch - 1), seqlen_q=1, nheads=8, nheads_k=2, dtype=torch.bfloat16, block_size=16,
             num_splits=0)
    assert gluon_calls == [True]


def test_num_splits_rule():
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cfg = DecodeConfig(64, 4)  # one program per SM at d = 128
    assert gluon_num_splits(dev, 256, 8, 1024, 128, cfg) == 1
    assert gluon_num_splits(dev, 16, 8, 16384, 128, cfg) == max(1, sms // 128)
    assert gluon_num_splits(dev, 4, 8, 65536, 128, cfg) == sms // 32
    assert gluon_num_splits(dev, 1, 1, 200, 128, cfg) == 1  # under 4 tiles a split


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [0, 16, 64, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode(dtype, block_size, group, gluon_calls):
    run_case(lens=[1500, 1, 17, 64, 0], seqlen_q=1, nheads=group * 2, nheads_k=2, dtype=dtype,
             block_size=block_size, num_splits=0, seed=group)
    assert gluon_calls == [block_size > 0]


@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("block_size", [0, 16])
def test_splits(num_splits, block_size, gluon_calls):
    # 16 splits leave most splits of the short sequence without keys: they must weigh nothing.
    run_case(lens=[2000, 23], seqlen_q=1, nheads=8, nheads_k=2, dtype=torch.bfloat16, block_size=block_size,
             num_splits=num_splits)
    assert len(gluon_calls) == 1


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("config", [DecodeConfig(64, 3), DecodeConfig(64, 4), DecodeConfig(128, 3),
                                    DecodeConfig(64, 6)])
def test_configs(d, config, gluon_calls, monkeypatch):
    monkeypatch.setattr(decode_ops, "GLUON_CONFIG", config)
    monkeypatch.setattr("ioattn.kernels.decode_gluon.CONFIG", config)
    for block_size in (0, 16, 256):
        run_case(lens=[1200, 5, 130], seqlen_q=1, nheads=8, nheads_k=2, dtype=torch.bfloat16,
                 block_size=block_size, num_splits=2, d=d)
    assert len(gluon_calls) == 3


@pytest.mark.parametrize("block_size", [0, 16])
def test_append_causal_speculative(block_size, gluon_calls):
    # 4 new tokens appended and queried causally (bottom-right), 4 heads a group: 16 packed rows.
    run_case(lens=[1000, 0, 9], seqlen_q=4, seqlen_new=4, nheads=8, nheads_k=2, dtype=torch.bfloat16,
             block_size=block_size, causal=True, num_splits=2)
    assert len(gluon_calls) == 1


@pytest.mark.parametrize("window_size", [(9, 0), (100, 3), (-1, 2)])
def test_windows(window_size, gluon_calls):
    out, lse = run_case(lens=[1500, 0, 40], seqlen_q=3, nheads=4, nheads_k=2, dtype=torch.float16, block_size=16,
                        window_size=window_size, num_splits=3)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert len(gluon_calls) == 1


@pytest.mark.parametrize("alibi", ["heads", "batch", None])
@pytest.mark.parametrize("block_size", [0, 64])
def test_softcap_alibi(alibi, block_size, gluon_calls):
    run_case(lens=[1500, 19], seqlen_q=2, nheads=8, nheads_k=2, dtype=torch.bfloat16, block_size=block_size,
             softcap=30.0 if alibi != "batch" else 0.0, alibi=alibi, causal=True, num_splits=2)
    assert len(gluon_calls) == 1


def test_cache_batch_idx_and_int_seqlens(gluon_calls):
    run_case(lens=[290, 290, 290], seqlen_q=1, seqlen_new=1, nheads=4, nheads_k=4, dtype=torch.bfloat16,
             block_size=0, int_seqlens=True, batch_cache_extra=3, num_splits=0)
    assert len(gluon_calls) == 1


@pytest.mark.parametrize("block_size", [0, 16])
@pytest.mark.parametrize("seqlen_new, causal", [(0, False), (3, True)])
def test_cache_leftpad(block_size, seqlen_new, causal, gluon_calls):
    """Contiguous caches take the Gluon kernel with its rows shifted by the pad; paged ones the portable kernel."""
    run_case(lens=[1500, 40, 300, 129], leftpad=[700, 40 if seqlen_new else 39, 0, 1], seqlen_q=seqlen_new or 1,
             seqlen_new=seqlen_new, nheads=8, nheads_k=2, dtype=torch.bfloat16, block_size=block_size, causal=causal,
             window_size=(500, -1), alibi="heads", num_splits=0, batch_cache_extra=3 if block_size == 0 else 0)
    assert gluon_calls == ([False] if block_size == 0 else [])


@pytest.mark.parametrize("nheads_k, append", [(1, False), (8, False), (8, True)])
def test_one_row_cache(nheads_k, append, gluon_calls):
    """A contiguous cache of one row in all (batch 1, capacity 1): its TMA view is one row, the shape on which
    ptxas crashed building the Gluon forward. With one key each query head's output is its KV head's value row;
    with ``append`` that row is the new token, written into the cache first. The Gluon kernel takes it: its
    one-row descriptor compiles (H100, CUDA 13)."""
    torch.manual_seed(nheads_k)
    group, d = 4, 128
    q = torch.randn(1, 1, group * nheads_k, d, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(1, 1, nheads_k, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_new = v_new = None
    if append:
        k_new, v_new = (torch.randn(1, 1, nheads_k, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([0 if append else 1], dtype=torch.int32, device="cuda")
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens)
    if append:
        assert torch.equal(k_cache, k_new) and torch.equal(v_cache, v_new)
    torch.testing.assert_close(out, v_cache.repeat_interleave(group, dim=2), rtol=0, atol=0)
    assert gluon_calls == [False]  # the Gluon kernel, contiguous
