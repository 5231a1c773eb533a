"""A/B of Gluon configs in one process, interleaved: per cell (head dim, feature, seqlen) the configs are
timed in turn, ``--rounds`` times, and each alternative's per-round ratio to the first config is reported as
a median (with the range). The cells are ``ioattn bench features`` cases (bf16, 16k tokens, hidden 2048;
plain and causal are the FA2 benchmark's shapes) through the public API; ``--pass fwd`` times the forward
(``FwdConfig``), ``--pass bwd`` the backward alone through ``torch.autograd.grad`` (``BwdConfig``). A
control row (``--control``: the first config against itself) shows the scatter of two timings of one kernel.
A config text stands for every feature of its head dim: fields it leaves out take ``BwdConfig``'s defaults
(``tail=1``, ``nested=1``), not the shipped softcap or dropout configs' (``select_config``).

    PYTHONPATH=src python scripts/ab_gluon.py --pass bwd --configs "64:128,128,2,1|128,128,2,1,0,0,0" \\
        --cells "64:plain:2048,64:causal:4096" [--rounds 5] [--control]
    PYTHONPATH=src python scripts/ab_gluon.py --pass fwd \\
        --configs "128:64,128,2,4,pingpong,1,1,1|64,128,2,4,pingpong,1,1,1,1" --cells "128:softcap:4096"
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics

import torch
import triton

from ioattn.bench.features import FEATURES, make_case
from ioattn.kernels import attn_bwd_gluon, attn_fwd_gluon, fastlaunch


@contextlib.contextmanager
def _installed(direction: str, d: int, cfg, maxnreg: int = 0, programs: int = 0):
    """The config the public API takes for head dim d while the block runs; ``maxnreg`` (forward): the
    one-warpgroup kernel compiled with at most that many registers a thread (launched through Triton's own
    path); ``programs`` (forward): the persistent schedules' grid capped at that many programs (the SM count
    the host reads, patched)."""
    if direction == "fwd":
        shipped = attn_fwd_gluon._CONFIGS[d]
        single = attn_fwd_gluon._launch_single
        num_sms = attn_fwd_gluon._num_sms
        attn_fwd_gluon._CONFIGS[d] = cfg
        if maxnreg:
            attn_fwd_gluon._launch_single = lambda grid, *args, **flags: single.kernel[grid](
                *fastlaunch._real(args), maxnreg=maxnreg, **flags)
        if programs:
            attn_fwd_gluon._num_sms = lambda device: min(num_sms(device), programs)
        try:
            yield
        finally:
            attn_fwd_gluon._CONFIGS[d] = shipped
            attn_fwd_gluon._launch_single = single
            attn_fwd_gluon._num_sms = num_sms
    else:
        shipped = attn_bwd_gluon.select_config
        attn_bwd_gluon.select_config = lambda *_: cfg
        try:
            yield
        finally:
            attn_bwd_gluon.select_config = shipped


def timed_call(direction: str, call, leaves):
    """What a cell times: the forward without autograd ("fwd"), or the backward alone through
    ``torch.autograd.grad`` on one forward's output ("bwd")."""
    if direction == "fwd":
        def fn():
            with torch.no_grad():
                return call()
        return fn
    out = call()
    dout = torch.randn_like(out)

    def fn():
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return fn


def time_variants(direction: str, d: int, feature: str, s: int, installs, rounds: int, rep: int):
    """One cell timed under each variant in turn, ``rounds`` times: ``installs`` gives, per variant, a function
    returning the context its timings run in. Returns (milliseconds per variant and round, the pass's FLOPs)."""
    call, leaves, flops = make_case(feature, s, d, torch.device("cuda"), torch.bfloat16)
    fn = timed_call(direction, call, leaves)
    times = [[] for _ in installs]
    for _ in range(rounds):
        for i, install in enumerate(installs):
            with install():
                times[i].append(triton.testing.do_bench(fn, warmup=25, rep=rep))
    return times, flops * (2.5 if direction == "bwd" else 1.0)


def summarize(times, flops):
    """(TFLOPs/s of each variant's median time, each later variant's sorted per-round time ratios first / it,
    the printed summary: the rates, then each ratio's median and range)."""
    tf = [flops / statistics.median(t) * 1e-9 for t in times]
    ratios = [sorted(a / b for a, b in zip(times[0], t, strict=True)) for t in times[1:]]
    text = (" ".join(f"{x:5.0f}" for x in tf) + " | "
            + " ".join(f"{statistics.median(r):.3f} [{r[0]:.3f}-{r[-1]:.3f}]" for r in ratios))
    return tf, ratios, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pass", dest="direction", choices=("fwd", "bwd"), default="bwd")
    ap.add_argument("--configs", required=True,
                    help="'d:cfg|cfg|...;d:...' (FwdConfig.parse / BwdConfig.parse texts)")
    ap.add_argument("--cells", required=True, help=f"'d:feature:seqlen,...' (feature: {', '.join(FEATURES)})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep", type=int, default=150, help="ms per timing")
    ap.add_argument("--control", action="store_true", help="time the first config twice per round")
    ap.add_argument("--json")
    args = ap.parse_args()
    parse = (attn_fwd_gluon.FwdConfig if args.direction == "fwd" else attn_bwd_gluon.BwdConfig).parse
    # a config text may end in "@N" (the forward's one-warpgroup kernel capped at N registers a thread) and
    # in "#P" (the forward's persistent grid capped at P programs)
    def variant(text):
        text, _, programs = text.partition("#")
        text, _, maxnreg = text.partition("@")
        return parse(text), int(maxnreg or 0), int(programs or 0)

    configs = {int(d): [variant(c) for c in cs.split("|")] for d, cs in (x.split(":") for x in args.configs.split(";"))}
    rows = []
    for cell in args.cells.split(","):
        d, feature, s = cell.split(":")
        d, s = int(d), int(s)
        cfgs = configs[d] + ([configs[d][0]] if args.control else [])
        installs = [functools.partial(_installed, args.direction, d, *cfg) for cfg in cfgs]
        times, flops = time_variants(args.direction, d, feature, s, installs, args.rounds, args.rep)
        tf, ratios, text = summarize(times, flops)
        print(f"{args.direction} d={d:<3} {feature:<8} s={s:<5} {text}", flush=True)
        rows.append({"pass": args.direction, "headdim": d, "feature": feature, "seqlen": s, "tflops": tf,
                     "ratio_median": [statistics.median(r) for r in ratios]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "configs": args.configs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
