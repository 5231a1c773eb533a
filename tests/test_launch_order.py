"""The backward's launch orders: ``launch_order`` (sections of rows, the first block of every row first) and
``band_order`` (two-sided windows: middle-out) give every (block, row) of the grid once, in the order their
docstrings state."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from ioattn.kernels.common import band_order, launch_order


@triton.jit
def _order_kernel(out_ptr, section, REVERSE: tl.constexpr, BAND: tl.constexpr):
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    n0 = tl.num_programs(0)
    block, row = launch_order(pid0, pid1, n0, tl.num_programs(1), section, REVERSE)
    if BAND:
        block = band_order(block, n0)
    lin = pid1 * n0 + pid0
    tl.store(out_ptr + 2 * lin, block)
    tl.store(out_ptr + 2 * lin + 1, row)


def _launched(n0: int, n1: int, section: int, reverse: bool, band: bool) -> list[tuple[int, int]]:
    """(block, row) of each program, in launch order (program (pid0, pid1) launches at pid1 * n0 + pid0)."""
    out = torch.full((n0 * n1, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_kernel[(n0, n1)](out, section, REVERSE=reverse, BAND=band)
    return [tuple(p) for p in out.tolist()]


@pytest.mark.parametrize("n0", [1, 2, 5, 8])
@pytest.mark.parametrize("n1, section", [(1, 1), (3, 1), (3, 2), (4, 4)])
@pytest.mark.parametrize("reverse, band", [(False, False), (True, False), (False, True)])
def test_orders_cover_the_grid_in_their_order(n0, n1, section, reverse, band):
    order = _launched(n0, n1, section, reverse, band)
    assert sorted(order) == [(b, r) for b in range(n0) for r in range(n1)]
    # rows run section by section
    rows = [r for _, r in order]
    assert [r // section for r in rows] == sorted(r // section for r in rows)
    mid = (n0 - 1) // 2
    for row in range(n1):
        blocks = [b for b, r in order if r == row]
        if band:  # the middle block first, then alternately up and down: distance from the middle never falls
            assert blocks[0] == mid
            assert all(abs(a - mid) <= abs(b - mid) for a, b in zip(blocks, blocks[1:], strict=False))
            assert blocks[-1] in (0, n0 - 1)
        else:
            assert blocks == (list(range(n0))[::-1] if reverse else list(range(n0)))
