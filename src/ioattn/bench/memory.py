"""The Rabe & Staats experiment (arXiv 2112.05682, Table 2): peak memory and time of attention's forward
("inference") and forward + backward ("differentiation") for standard attention, PyTorch's
``scaled_dot_product_attention`` and the chunked path, on the same inputs in one run.

How memory is measured:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  before the call (the inputs).
* CPU: torch's profiler with ``profile_memory=True`` records every allocation and free of torch's CPU
  allocator with its size and timestamp (the raw kineto ``[memory]`` events); the running sum of those
  sizes in time order is the bytes the call holds beyond its inputs, and its maximum is the peak. This
  counts every tensor, temporaries inside an op included; it does not count BLAS-internal scratch,
  which every method shares. ``tests/test_chunked.py`` checks it against the arithmetic: standard
  attention's forward must hold at least two (N, N) float32 matrices.

Time is measured separately, without the profiler: the median of ``repeats`` calls after the memory
measurement's call, which serves as the warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from ..chunked import PAPER_CHUNKS, chunked_attention

METHODS = ("standard", "chunked", "sdpa")
QUERY_CHUNK, KEY_CHUNK = PAPER_CHUNKS


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints a few status lines per session straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated by ``fn()`` beyond what was allocated when it started (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu or cuda, got {device}")
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in sizes:
        held += nbytes
        peak = max(peak, held)
    return peak


def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the (N, N) matrix materialised; (b, s, h, d) layout."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return chunked_attention(q, k, v, softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                             query_chunk_size=QUERY_CHUNK, key_chunk_size=KEY_CHUNK)[0]


_FUNCS = {"standard": standard_attention, "sdpa": sdpa_attention, "chunked": chunked}


def _call(method: str, mode: str, q, k, v, dout) -> Callable[[], None]:
    fn = _FUNCS[method]

    def run() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v)
        else:
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)

    return run


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def standard_estimate(seqlen: int, heads: int, elem: int, mode: str) -> int:
    # Forward holds scores, the softmax and an einsum copy (3 N x N); the backward adds about two more.
    return (3 if mode == "fwd" else 5) * heads * seqlen * seqlen * elem


def timed(fn: Callable[[], None], device: torch.device, repeats: int, *, warmup: bool = True,
          slow_seconds: float = 5.0) -> float:
    """Median seconds of up to ``repeats`` calls of ``fn`` after one warm-up call (``warmup``); a call
    slower than ``slow_seconds`` is timed once."""
    if warmup:
        fn()
    times: list[float] = []
    for _ in range(repeats):
        if times and times[0] > slow_seconds:
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_memory_experiment(
    seqlens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536),
    heads: int = 1,
    headdim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    modes: tuple[str, ...] = ("fwd", "fwdbwd"),
    progress: bool = True,
    repeats: int = 3,
    methods: tuple[str, ...] = METHODS,
    max_call_seconds: float = 120.0,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Measures peak memory (bytes beyond the inputs) and median time per (seqlen, mode, method).

    Standard attention is skipped, with a message, where its (N, N) matrices would not fit in the memory
    available now. Any method is skipped, with a message, where one call would take longer than
    ``max_call_seconds``, predicted from its time at the previous length times the quadratic growth.
    Inputs are (1, seqlen, heads, headdim).
    Returns one dict per measurement: seqlen, mode, method, heads, headdim, peak_bytes, seconds, skipped
    (None, or why it was skipped). ``on_row(rows)`` is called after each measurement (to save progress).
    """
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    jobs = [(n, mode, m) for n in seqlens for mode in modes for m in methods]
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(jobs, desc="memory", disable=not progress) if tqdm is not None else jobs
    rows = []
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (mode, method) -> (seqlen, seconds)
    for n, mode, method in bar:
        if tqdm is not None:
            bar.set_postfix_str(f"N={n} {mode} {method}")
        row = {"seqlen": n, "mode": mode, "method": method, "heads": heads, "headdim": headdim,
               "peak_bytes": None, "seconds": None, "skipped": None}
        if method == "standard":
            need, avail = standard_estimate(n, heads, elem, mode), available_bytes(device)
            if need > 0.7 * avail:
                row["skipped"] = f"needs ~{need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB available"
                print(f"skip standard {mode} N={n}: {row['skipped']}", file=sys.stderr)
                rows.append(row)
                continue
        if (mode, method) in last:
            prev_n, prev_s = last[(mode, method)]
            predicted = prev_s * (n / prev_n) ** 2
            if predicted > max_call_seconds:
                row["skipped"] = f"one call would take ~{predicted:.0f} s (limit {max_call_seconds:.0f} s)"
                print(f"skip {method} {mode} N={n}: {row['skipped']}", file=sys.stderr)
                rows.append(row)
                continue
        gen = torch.Generator().manual_seed(n)
        q, k, v, dout = (torch.randn(1, n, heads, headdim, generator=gen).to(device=device, dtype=dtype)
                         for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(mode == "fwdbwd")
        fn = _call(method, mode, q, k, v, dout)
        row["peak_bytes"] = peak_memory_bytes(fn, device)
        row["seconds"] = timed(fn, device, repeats, warmup=False)  # the profiled call was the warm-up
        last[(mode, method)] = (n, row["seconds"])
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        del q, k, v, dout, fn
    return rows


def ratios(rows: list[dict], seqlen: int) -> dict[str, float]:
    """Standard attention's peak over the chunked path's at ``seqlen``, per mode (where both ran)."""
    found = {(r["mode"], r["method"]): r["peak_bytes"] for r in rows if r["seqlen"] == seqlen}
    out = {}
    for mode in ("fwd", "fwdbwd"):
        std, ch = found.get((mode, "standard")), found.get((mode, "chunked"))
        if std and ch:
            out[mode] = std / ch
    return out


def mib(b: int | None) -> str:
    """Bytes as MiB for tables; '-' for a measurement that was skipped."""
    return "-" if b is None else f"{b / 2**20:,.1f}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one line per (seqlen, mode), peak MiB and seconds per method, and the ratio."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    head = ["N", "mode"] + [f"{m} MiB" for m in methods] + [f"{m} s" for m in methods] + ["standard/chunked"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["seqlen"], r["mode"]) for r in rows}, key=lambda t: (t[1] != "fwd", t[0]))
    for n, mode in keys:
        by = {r["method"]: r for r in rows if r["seqlen"] == n and r["mode"] == mode}
        mem = [mib(by[m]["peak_bytes"]) if m in by else "-" for m in methods]
        sec = [f"{by[m]['seconds']:.4g}" if m in by and by[m]["seconds"] is not None else "-"
               for m in methods]
        ratio = ratios(rows, n).get(mode)
        cells = [str(n), mode] + mem + sec + [f"{ratio:.1f}x" if ratio else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metadata(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "device_type": device.type, "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ioattn memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", type=lambda s: tuple(int(x) for x in s.split(",")),
                        default=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
                        help="comma-separated sequence lengths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-call-seconds", type=float, default=120.0,
                        help="skip a method where one call is predicted to take longer")
    parser.add_argument("--json", metavar="PATH", help="write metadata and rows as JSON")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    meta = _metadata(device)

    def save(rows: list[dict]) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "query_chunk": QUERY_CHUNK, "key_chunk": KEY_CHUNK, "rows": rows},
                          f, indent=1)

    rows = run_memory_experiment(args.seqlens, heads=args.heads, headdim=args.headdim, device=device,
                                 progress=not args.no_progress, repeats=args.repeats,
                                 max_call_seconds=args.max_call_seconds, on_row=save)
    save(rows)
    print(format_table(rows))
    for n in args.seqlens:
        r = ratios(rows, n)
        if r:
            print(f"N={n}: standard/chunked peak memory " +
                  ", ".join(f"{mode} {x:.1f}x" for mode, x in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
