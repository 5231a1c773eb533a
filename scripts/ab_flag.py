"""A/B of a module flag in one process, interleaved: per cell (``ioattn bench features`` cases, as
``ab_gluon.py`` takes them) the flag's values are set in turn, ``--rounds`` times, each timed with
``do_bench`` (``--pass fwd``: the forward alone; ``bwd``: the backward alone through ``torch.autograd.grad``),
and each later value's per-round time ratio to the first is reported as a median (with the range).

    PYTHONPATH=src python scripts/ab_flag.py --flag attn_bwd_gluon.DQ_CONVERT_UNDER_WAVE --values 0,1 \\
        --cells "128:window:16384,128:plain:4096" [--rounds 7] [--control]
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import torch
import triton
from ab_gluon import timed_call

from ioattn.bench.features import make_case
from ioattn.kernels.fastlaunch import set_plans

# Launch plans replay the launches a call recorded: a flag outside their keys would not be seen (every call
# takes the whole path here).
set_plans(False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pass", dest="direction", choices=("fwd", "bwd"), default="bwd")
    ap.add_argument("--flag", required=True, help="module.ATTR under ioattn.kernels, e.g. attn_bwd_gluon.X")
    ap.add_argument("--values", required=True, help="comma-separated ints, the first the baseline")
    ap.add_argument("--cells", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep", type=int, default=150, help="ms per timing")
    ap.add_argument("--control", action="store_true", help="time the first value twice per round")
    args = ap.parse_args()
    mod_name, attr = args.flag.rsplit(".", 1)
    module = importlib.import_module(f"ioattn.kernels.{mod_name}")
    shipped = getattr(module, attr)
    values = [type(shipped)(int(x)) for x in args.values.split(",")]
    values += [values[0]] if args.control else []
    try:
        for cell in args.cells.split(","):
            d, feature, s = cell.split(":")
            call, leaves, flops = make_case(feature, int(s), int(d), torch.device("cuda"), torch.bfloat16)
            fn = timed_call(args.direction, call, leaves)
            times = [[] for _ in values]
            for _ in range(args.rounds):
                for i, value in enumerate(values):
                    setattr(module, attr, value)
                    times[i].append(triton.testing.do_bench(fn, warmup=25, rep=args.rep))
            flops *= 2.5 if args.direction == "bwd" else 1.0
            tf = [flops / statistics.median(t) * 1e-9 for t in times]
            ratios = [sorted(a / b for a, b in zip(times[0], t, strict=True)) for t in times[1:]]
            print(f"{args.direction} {cell:<18} " + " ".join(f"{x:5.0f}" for x in tf) + " | "
                  + " ".join(f"{statistics.median(r):.3f} [{r[0]:.3f}-{r[-1]:.3f}]" for r in ratios), flush=True)
    finally:
        setattr(module, attr, shipped)


if __name__ == "__main__":
    main()
