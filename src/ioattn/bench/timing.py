"""Timing: the median of many repeats after warm-up, the same for every suite and every peer.

On CUDA this is ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed between
calls, warm-up and repeat counts derived from a first estimate of the call's time). Elsewhere (the CPU
``--quick`` run that exercises the harness in CI) the same procedure runs on ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingBudget:
    """Milliseconds spent warming up and repeating one function (as in ``do_bench``)."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0


FULL = TimingBudget(25.0, 100.0)
QUICK = TimingBudget(10.0, 40.0)

# A CPU call can take seconds; these bounds keep a CPU run within its minute whatever the estimate says.
_CPU_MIN_REPEATS = 3
_CPU_MAX_REPEATS = 200


def _reset_grads(grad_to_none: Sequence[torch.Tensor] | None) -> None:
    if grad_to_none is not None:
        for t in grad_to_none:
            t.grad = None


def _median_ms_cpu(fn: Callable[[], object], budget: TimingBudget,
                   grad_to_none: Sequence[torch.Tensor] | None) -> float:
    _reset_grads(grad_to_none)
    fn()
    _reset_grads(grad_to_none)
    start = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-6)
    n_warmup = min(_CPU_MAX_REPEATS, int(budget.warmup_ms / estimate_ms))
    n_repeat = min(_CPU_MAX_REPEATS, max(_CPU_MIN_REPEATS, int(budget.rep_ms / estimate_ms)))
    for _ in range(n_warmup):
        _reset_grads(grad_to_none)
        fn()
    times = []
    for _ in range(n_repeat):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_ms(fn: Callable[[], object], device: torch.device | str, budget: TimingBudget = FULL,
              grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median time of ``fn()`` in milliseconds after warm-up.

    ``grad_to_none``: leaf tensors whose ``.grad`` is reset before every call, so a timed backward never
    pays for accumulating into an existing gradient.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):
            return float(do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms,
                                  grad_to_none=grad_to_none, return_mode="median"))
    return _median_ms_cpu(fn, budget, grad_to_none)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory_bytes(device: torch.device | str) -> int:
    """Bytes that a new allocation could still take on ``device`` (used by the memory guards)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory cached by PyTorch's allocator is free for PyTorch's own allocations.
        reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + reserved)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def rounds_count(text: str) -> int:
    """``--rounds``: a positive integer (argparse type)."""
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
