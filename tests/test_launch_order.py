"""The backward's launch order: ``launch_order`` (sections of rows; within a section every row's first block,
then every row's second, ..., or from the last block with REVERSE) gives every (block, row) of the grid once,
in that order."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from ioattn.kernels.common import launch_order


@triton.jit
def _order_kernel(out_ptr, section, REVERSE: tl.constexpr):
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    n0 = tl.num_programs(0)
    block, row = launch_order(pid0, pid1, n0, tl.num_programs(1), section, REVERSE)
    lin = pid1 * n0 + pid0
    tl.store(out_ptr + 2 * lin, block)
    tl.store(out_ptr + 2 * lin + 1, row)


def _launched(n0: int, n1: int, section: int, reverse: bool) -> list[tuple[int, int]]:
    """(block, row) of each program, in launch order (program (pid0, pid1) launches at pid1 * n0 + pid0)."""
    out = torch.full((n0 * n1, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_kernel[(n0, n1)](out, section, REVERSE=reverse)
    return [tuple(p) for p in out.tolist()]


@pytest.mark.parametrize("n0", [1, 2, 5, 8])
@pytest.mark.parametrize("n1, section", [(1, 1), (3, 1), (3, 2), (4, 4)])
@pytest.mark.parametrize("reverse", [False, True])
def test_launch_order_covers_the_grid_in_its_order(n0, n1, section, reverse):
    order = _launched(n0, n1, section, reverse)
    assert sorted(order) == [(b, r) for b in range(n0) for r in range(n1)]
    for start in range(0, n1, section):  # a section's rows, block by block, before the next section's
        rows = list(range(start, min(start + section, n1)))
        blocks = list(range(n0))[::-1] if reverse else list(range(n0))
        span = order[start * n0:(start + len(rows)) * n0]
        assert span == [(b, r) for b in blocks for r in rows]
