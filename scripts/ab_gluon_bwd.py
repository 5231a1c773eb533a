"""A/B of Gluon backward configs in one process, interleaved: per cell (head dim, causal, seqlen) the
configs are timed in turn, ``--rounds`` times, and each alternative's per-round ratio to the first config
is reported as a median (with the range). The FA2 benchmark's setup (bf16, 16k tokens, hidden 2048); the
backward alone through ``torch.autograd.grad``. A control row (``--control``: the first config against
itself) shows the scatter of two timings of one kernel.

    PYTHONPATH=src python scripts/ab_gluon_bwd.py --configs "64:128,128,2,1|128,128,2,1,0,0,0" \\
        --cells "64:0:2048,64:1:4096" [--rounds 5] [--control]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton

import ioattn
from ioattn.kernels import attn_bwd_gluon


def _time_cell(d: int, causal: bool, s: int, cfgs, rounds: int, rep: int) -> list[list[float]]:
    """Milliseconds per config and round (the configs in turn within each round)."""
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_(True) for _ in range(3))
    out = ioattn.flash_attn_func(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    times = [[] for _ in cfgs]
    shipped = attn_bwd_gluon.select_config
    try:
        for _ in range(rounds):
            for i, cfg in enumerate(cfgs):
                attn_bwd_gluon.select_config = lambda *_, cfg=cfg: cfg
                times[i].append(triton.testing.do_bench(
                    lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=25, rep=rep))
    finally:
        attn_bwd_gluon.select_config = shipped
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True, help="'d:cfg|cfg|...;d:...' (BwdConfig fields, comma-separated)")
    ap.add_argument("--cells", required=True, help="'d:causal:seqlen,...'")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep", type=int, default=150, help="ms per timing")
    ap.add_argument("--control", action="store_true", help="time the first config twice per round")
    ap.add_argument("--json")
    args = ap.parse_args()
    configs = {int(d): [attn_bwd_gluon.BwdConfig.parse(c) for c in cs.split("|")]
               for d, cs in (x.split(":") for x in args.configs.split(";"))}
    rows = []
    for cell in args.cells.split(","):
        d, causal, s = (int(x) for x in cell.split(":"))
        cfgs = configs[d] + ([configs[d][0]] if args.control else [])
        times = _time_cell(d, bool(causal), s, cfgs, args.rounds, args.rep)
        flops = 2.5 * 4 * s * s * 2048 * (16384 // s) / (2 if causal else 1)
        tf = [flops / statistics.median(t) * 1e-9 for t in times]
        ratios = [sorted(a / b for a, b in zip(times[0], t, strict=True)) for t in times[1:]]
        print(f"d={d:<3} causal={causal} s={s:<5} " + " ".join(f"{x:5.0f}" for x in tf) + " | "
              + " ".join(f"{statistics.median(r):.3f} [{r[0]:.3f}-{r[-1]:.3f}]" for r in ratios), flush=True)
        rows.append({"headdim": d, "causal": bool(causal), "seqlen": s, "tflops": tf,
                     "ratio_median": [statistics.median(r) for r in ratios]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "configs": args.configs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
