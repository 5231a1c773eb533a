"""A/B of a module flag in one process, interleaved: per cell (``ioattn bench features`` cases, as
``ab_gluon.py`` takes them) the flag's values are set in turn, ``--rounds`` times, each timed with
``do_bench`` (``--pass fwd``: the forward alone; ``bwd``: the backward alone through ``torch.autograd.grad``),
and each later value's per-round time ratio to the first is reported as a median (with the range).

    PYTHONPATH=src python scripts/ab_flag.py --flag attn_bwd_gluon.DQ_CONVERT_UNDER_WAVE --values 0,1 \\
        --cells "128:window:16384,128:plain:4096" [--rounds 7] [--control]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib

from ab_gluon import summarize, time_variants

from ioattn.kernels.fastlaunch import set_plans

# Launch plans replay the launches a call recorded: a flag outside their keys would not be seen (every call
# takes the whole path here).
set_plans(False)


@contextlib.contextmanager
def _set(module, attr: str, value):
    shipped = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, shipped)


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
    values = [type(getattr(module, attr))(int(x)) for x in args.values.split(",")]
    values += [values[0]] if args.control else []
    installs = [functools.partial(_set, module, attr, value) for value in values]
    for cell in args.cells.split(","):
        d, feature, s = cell.split(":")
        times, flops = time_variants(args.direction, int(d), feature, int(s), installs, args.rounds, args.rep)
        print(f"{args.direction} {cell:<18} {summarize(times, flops)[2]}", flush=True)


if __name__ == "__main__":
    main()
