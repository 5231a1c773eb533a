"""Where a backward's GPU time goes, kernel by kernel, for ``ioattn bench features`` cells: for each cell the
backward alone (``torch.autograd.grad`` on one forward's output) under ``triton.testing.do_bench`` (the
bench's timing, cache flush included), then the same call profiled (``torch.profiler``, ``--calls`` calls)
with each kernel's mean time per call. The attention kernel's share against the side kernels (the
preprocess that computes delta and zeroes the fp32 dQ buffer, the dQ conversion) says how much of a cell's
ratio to plain is the O(n) work around it.

    PYTHONPATH=src python scripts/probe_bwd_pieces.py --cells "128:plain:4096,128:window:16384" [--calls 20]
"""

from __future__ import annotations

import argparse
import collections

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from ioattn.bench.features import make_case


def _backward(call, leaves):
    out = call()
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


def _short(name: str) -> str:
    for key, short in (("preprocess", "preprocess"), ("attn_bwd", "attention"), ("copy", "dq convert"),
                       ("dq_convert", "dq convert under the wave"),
                       ("elementwise", "elementwise"), ("tail_sum", "tail sum"), ("fill", "fill")):
        if key in name:
            return short
    return name[:40]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="128:plain:4096,128:plain:16384,128:window:4096,128:window:16384")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--timeline", action="store_true",
                    help="also each kernel's start and end (µs) in the last profiled call, from its first kernel")
    args = ap.parse_args()
    for cell in args.cells.split(","):
        d, feature, s = cell.split(":")
        call, leaves, flops = make_case(feature, int(s), int(d), torch.device("cuda"), torch.bfloat16)
        fn = _backward(call, leaves)
        ms = triton.testing.do_bench(fn, warmup=50, rep=300)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
        per = collections.Counter()
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[_short(ev.name)] += ev.device_time / args.calls
        total = sum(per.values())
        pieces = "  ".join(f"{k} {v:.1f}" for k, v in per.most_common())
        print(f"{cell:<20} bench {ms * 1e3:8.1f} us ({2.5 * flops / ms / 1e9:.0f} TFLOPs/s)  kernels {total:8.1f} us"
              f" = {pieces}  side {100 * (total - per['attention']) / total:.1f}%", flush=True)
        if args.timeline:
            kernels = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                             key=lambda ev: ev.time_range.start)
            per_call = len(kernels) // args.calls
            last = kernels[-per_call:]
            t0 = last[0].time_range.start
            print("    " + "  ".join(f"{_short(ev.name)} [{ev.time_range.start - t0:.0f}, {ev.time_range.end - t0:.0f}]"
                                     for ev in last), flush=True)


if __name__ == "__main__":
    main()
