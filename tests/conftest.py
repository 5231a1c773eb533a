"""Test set-up: without a CUDA device, the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton.jit decorates anything, so this runs before ioattn is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# Several pytest-xdist workers share one GPU, and each worker's caching allocator keeps what its largest test
# reserved: 14 workers on an 80 GB H100 ran out of memory where a 141 GB H200 did not. A worker hands its cached
# blocks back after a test that left more than this reserved.
_RESERVED_LIMIT = 1 << 30

@pytest.fixture(autouse=True)
def _no_plans_from_earlier_tests():
    """Launch plans recorded by one test are not replayed in another (a test may patch a rule a plan's key
    does not see)."""
    from ioattn.kernels.fastlaunch import clear_plans

    clear_plans()


if ON_GPU:

    @pytest.fixture(autouse=True)
    def _release_cached_gpu_memory():
        yield
        if torch.cuda.memory_reserved() > _RESERVED_LIMIT:
            torch.cuda.empty_cache()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``IOATTN_TEST_SHARD=k/n`` keeps every n-th collected test from the k-th (1-based), so the suite can run
    as n calls of a time-limited device (``scripts/gpu_check.sh``'s ``SHARD``). Collection order is
    deterministic, so n calls with k = 1..n run every test exactly once, and pytest-xdist's workers agree.
    It runs last, after ``-k`` / ``-m`` have deselected what they drop, so the shards split what is left."""
    shard = os.environ.get("IOATTN_TEST_SHARD", "")
    if not shard:
        return
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise pytest.UsageError(f"IOATTN_TEST_SHARD={shard}: expected k/n") from None
    if not 1 <= k <= n:
        raise pytest.UsageError(f"IOATTN_TEST_SHARD={shard}: need 1 <= k <= n")
    kept = [item for i, item in enumerate(items) if i % n == k - 1]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % n != k - 1])
    items[:] = kept
