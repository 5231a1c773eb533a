"""The pure-PyTorch KV-cache path (what CPU tensors run without the Triton interpreter, and what
IOATTN_BACKEND=chunked forces): the same cases as test_kvcache.py and test_write_kv.py, against the same
reference and NaN-poisoned caches, with the backend switched."""

import pytest
import test_kvcache as kv
import test_write_kv as wk


@pytest.fixture(autouse=True)
def chunked_backend(monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", "chunked")


def test_contiguous_gqa():
    for group in (1, 4):
        kv.test_decode_contiguous(kv.DTYPES[0], group)


def test_paged_block_sizes():
    for block_size, group in kv.PAGED_CASES:
        kv.test_decode_paged(block_size, group)


@pytest.mark.parametrize("interleaved", [True, False])
def test_append_with_rotary(interleaved):
    kv.test_append_with_rotary(16, interleaved, True)


def test_prefill_window_softcap_alibi_batch_idx():
    kv.test_chunked_prefill_causal(kv.DTYPES[0])
    kv.test_window_and_empty_rows()
    kv.test_softcap_alibi("batch")
    kv.test_int_cache_seqlens_and_batch_idx()


@pytest.mark.parametrize("leftpad", [False, True])
def test_torch_compile_fullgraph(leftpad):
    kv.test_torch_compile_fullgraph(leftpad)


@pytest.mark.parametrize("case", kv.LEFTPAD_CASES, ids=str)
def test_cache_leftpad(case):
    kv.test_cache_leftpad(case)


@pytest.mark.parametrize("block_size", [0, 16])
def test_cache_leftpad_empty_sequence(block_size):
    kv.test_cache_leftpad_empty_sequence(block_size)


def test_write_kv_strided():
    wk.test_strided_views_and_empty_step()
