"""A/B of a kernel module's code in one process: this tree's Gluon forward or backward against a baseline
file of the same module (e.g. ``git show HEAD~1:src/ioattn/kernels/attn_bwd_gluon.py > /tmp/base.py``),
timed in turn per round through the public API, with cuDNN beside them for plain and causal forwards.

    PYTHONPATH=src python scripts/ab_module.py --pass bwd --base /tmp/base.py \\
        --cells 128:causal:4096,128:plain:4096 [--rounds 5]

A baseline from before the dropout seed became a device tensor (e628758 and earlier) takes ``--int-seed``: its
launcher gets a fixed int for the seed tensor (the time does not depend on the value, and reading the tensor
would synchronise). Its backward module must then import the same era's ``dropout_keep_wgmma`` (a copy of that
forward module beside the library's, its import line pointed at it).

Cells are ``ioattn bench features`` cases (bf16, 16k tokens, hidden 2048): ``d:feature:seqlen``. Prints, per
cell, TFLOPs/s of each side and the median of the per-round speed ratios new / base (and new / cuDNN).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import os
import statistics

import torch
import torch.nn.functional as F
import triton
from ab_gluon import timed_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn.kernels.attn_bwd_gluon as attn_bwd_gluon
import ioattn.kernels.launch as launch
import ioattn.ops.attention as attention
from ioattn.bench.features import make_case
from ioattn.kernels.fastlaunch import set_plans

# Where the public API looks each kernel's launcher up, and the module the baseline file stands for.
TARGETS = {"fwd": (attention, "gluon_forward", "attn_fwd_gluon"), "bwd": (launch, "gluon_backward", "attn_bwd_gluon")}
# Launch plans would replay this tree's launches for both sides: every call takes the whole path here.
set_plans(False)


def load_baseline(path: str, module: str):
    """The file as a module of ``ioattn.kernels`` (its relative imports resolve as the library's do)."""
    # A baseline module reads its plan switch at import (``set_plans`` reaches only this tree's tables).
    os.environ["IOATTN_FWD_PLANS"] = os.environ["IOATTN_BWD_PLANS"] = "0"
    spec = importlib.util.spec_from_file_location(f"ioattn.kernels.{module}_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def int_seed(fn):
    """``fn`` (a baseline launcher taking ``seed`` as an int) called with a seed tensor: a fixed int instead."""
    pos = list(inspect.signature(fn).parameters).index("seed")

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        if len(a) > pos and isinstance(a[pos], torch.Tensor):
            a = (*a[:pos], 0x5DEECE66D, *a[pos + 1:])
        if isinstance(kw.get("seed"), torch.Tensor):
            kw["seed"] = 0x5DEECE66D
        return fn(*a, **kw)

    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pass", dest="direction", choices=("fwd", "bwd"), default="bwd")
    ap.add_argument("--base", required=True, help="baseline file of the pass's kernel module")
    ap.add_argument("--cells", required=True, help="'d:feature:seqlen,...'")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--int-seed", action="store_true", help="the baseline takes the dropout seed as an int")
    args = ap.parse_args()
    owner, name, module = TARGETS[args.direction]
    new_fn = getattr(owner, name)
    base_fn = getattr(load_baseline(args.base, module), name)
    if args.int_seed:
        base_fn = int_seed(base_fn)
    if args.direction == "fwd":
        base_gluon_forward = base_fn

        def base_fn(*a, plan_key=None, **kw):  # the op hands this tree's plan key (None here) on
            return base_gluon_forward(*a, **kw)
    shipped_under_wave = base_under_wave = attn_bwd_gluon.DQ_CONVERT_UNDER_WAVE
    if args.direction == "bwd" and "dq" not in inspect.signature(base_fn).parameters:
        # a baseline from before the dQ conversion under the last wave: the op converts after it
        base_gluon_backward, base_under_wave = base_fn, False

        def base_fn(*a, dq=None, done=None, **kw):
            return base_gluon_backward(*a, **kw)
    for cell in args.cells.split(","):
        d, feature, s = cell.split(":")
        call, leaves, flops = make_case(feature, int(s), int(d), torch.device("cuda"), torch.bfloat16)
        timed = timed_call(args.direction, call, leaves)
        if args.direction == "fwd":
            q, k, v = (t.detach().transpose(1, 2) for t in leaves)

            def cudnn(q=q, k=k, v=v, causal=feature == "causal"):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            # cuDNN runs the same problem only without score mods or varlen
            sides = {"new": new_fn, "base": base_fn, **({"cudnn": None} if feature in ("plain", "causal") else {})}
        else:
            flops *= 2.5
            sides = {"new": new_fn, "base": base_fn}
        times = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, fn in sides.items():
                setattr(owner, name, fn or new_fn)
                attn_bwd_gluon.DQ_CONVERT_UNDER_WAVE = base_under_wave if side == "base" else shipped_under_wave
                times[side].append(triton.testing.do_bench(cudnn if fn is None else timed, warmup=25, rep=150))
        setattr(owner, name, new_fn)
        attn_bwd_gluon.DQ_CONVERT_UNDER_WAVE = shipped_under_wave
        tf = " ".join(f"{side} {flops / statistics.median(t) * 1e-9:.0f}" for side, t in times.items())
        ratios = " ".join(f"new/{side} {statistics.median(b / a for a, b in zip(times['new'], t, strict=True)):.3f}"
                          for side, t in times.items() if side != "new")
        print(f"{args.direction} {cell}: TFLOPs/s {tf} | {ratios}", flush=True)


if __name__ == "__main__":
    main()
