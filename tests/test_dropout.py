"""The dropout keep mask: bit-exact with Triton's tl.randint4x (mapped as tl.rand maps), sub-blocks
consistent with the whole grid, and the kept fraction right."""

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from ioattn.dropout import draw_seed, dropout_keep_mask, philox_uniform4


@triton.jit
def _tl_rand4_kernel(out_ptr, offset_ptr, seed, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    offset = tl.load(offset_ptr + idx, mask=inside, other=0)
    r0, r1, r2, r3 = tl.randint4x(seed, offset)
    tl.store(out_ptr + idx * 4, tl.random.uint_to_uniform_float(r0), mask=inside)
    tl.store(out_ptr + idx * 4 + 1, tl.random.uint_to_uniform_float(r1), mask=inside)
    tl.store(out_ptr + idx * 4 + 2, tl.random.uint_to_uniform_float(r2), mask=inside)
    tl.store(out_ptr + idx * 4 + 3, tl.random.uint_to_uniform_float(r3), mask=inside)


def _tl_rand4(seed: int, offset: torch.Tensor) -> torch.Tensor:
    out = torch.full((*offset.shape, 4), float("nan"), dtype=torch.float32, device=offset.device)
    _tl_rand4_kernel[(triton.cdiv(offset.numel(), 256),)](out, offset, seed, offset.numel(), BLOCK=256)
    return out


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 + 7, 2**32 + 3, 2**62 - 1, 3_141_592_653_589_793_238])
def test_philox_bit_exact_with_tl_randint4x(seed):
    gen = torch.Generator().manual_seed(seed % 1000)
    offset = torch.cat([
        torch.arange(0, 600),
        torch.arange(2**31 - 100, 2**31 + 100),  # int32 sign boundary of the low word
        torch.arange(2**32 - 150, 2**32 + 150),  # the high counter word starts counting
        torch.randint(2**32, 2**62, (400,), generator=gen),
        torch.tensor([2**63 - 1]),
    ]).to(device=DEVICE, dtype=torch.int64)
    expected = _tl_rand4(seed, offset)
    got = philox_uniform4(seed, offset)
    assert got.shape == (offset.numel(), 4)
    mismatched = int((got.view(torch.int32) != expected.view(torch.int32)).sum())
    print(f"seed {seed}: {mismatched} of {offset.numel()} differ")
    assert mismatched == 0
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


def test_keep_mask_is_the_documented_grid_function():
    seed, batch, nheads, sq, sk, p = 77, 2, 3, 5, 7, 0.3
    mask = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE)
    assert mask.shape == (batch, nheads, sq, sk) and mask.dtype == torch.bool
    b, h, i, j = 1, 2, 4, 6
    counter = ((b * nheads + h) * sq + i) * math.ceil(sk / 4) + j // 4
    offset = torch.tensor([counter], dtype=torch.int64, device=DEVICE)
    assert bool(mask[b, h, i, j]) == bool(_tl_rand4(seed, offset)[0, j % 4] >= p)
    row = ((b * nheads + h) * sq + i) * math.ceil(sk / 4) + torch.arange(math.ceil(sk / 4), device=DEVICE)
    assert torch.equal(mask[b, h, i], _tl_rand4(seed, row).flatten()[:sk] >= p)


def test_sub_blocks_match_the_whole_grid():
    seed, batch, nheads, sq, sk, p = draw_seed(), 3, 2, 37, 53, 0.25
    full = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE)
    block = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE,
                              q_start=5, k_start=11, q_len=13, k_len=29)
    assert torch.equal(block, full[:, :, 5:18, 11:40])
    one = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE, batch_index=2, q_start=30, k_start=40)
    assert torch.equal(one, full[2:3, :, 30:, 40:])


def test_kept_fraction_and_seed_dependence():
    p = 0.3
    a = dropout_keep_mask(123, 2, 4, 64, 256, p, DEVICE)
    n = a.numel()
    kept = float(a.float().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    print(f"kept {kept:.5f}, expected {1 - p}, sigma {sigma:.2e}")
    assert abs(kept - (1 - p)) < 5 * sigma
    b = dropout_keep_mask(124, 2, 4, 64, 256, p, DEVICE)
    assert 0.3 < float((a != b).float().mean()) < 0.5  # independent masks differ in 2p(1-p) = 42%


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(5)
    s1 = draw_seed()
    torch.manual_seed(5)
    assert draw_seed() == s1
    assert 0 <= s1 < 2**62
