"""Where a banded forward loses against plain: ``gluon_forward`` timed directly (no API overhead) on
shapes with the same key blocks a tile as a sliding window but without its masks, or with the window
under other schedules, interleaved in rounds. TFLOPs/s count only the allowed (query, key) pairs.

    PYTHONPATH=src python scripts/probe_band.py [--headdim 128] [--rounds 5] [--graph] [--json out.json]

A case is ``name:seqlen_q:seqlen_k:left:right:config[:section]`` (config: ``FwdConfig.parse`` text, or ``-``
for the shipped config of ``--headdim``; section: heads a section of the dynamic schedule, instead of the L2
rule); ``--cases`` replaces the default set, which is d = 128's (128-key blocks, its configs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
import triton

from ioattn.bench.features import allowed_pairs
from ioattn.kernels import attn_fwd_gluon
from ioattn.kernels.fastlaunch import set_plans

# Launch plans would keep a patched section for later calls: none are recorded here.
set_plans(False)

SHIPPED = "-"
NO_CHAIN = "64,128,2,4,pingpong,1,1,1,1,1,1,0"
NO_DYNAMIC = "64,128,2,4,pingpong,1,1,0,1,1,1,1"
BIG = 1 << 20
DEFAULT_CASES = [
    f"plain:4096:4096:-1:-1:{SHIPPED}",
    f"plain-9blk:4096:1152:-1:-1:{SHIPPED}",
    f"plain-9blk-nochain:4096:1152:-1:-1:{NO_CHAIN}",
    f"right-9blk-dyn:4096:1152:-1:{BIG}:{SHIPPED}",
    f"right-9blk-grid:4096:1152:-1:{BIG}:{NO_DYNAMIC}",
    f"window512:4096:4096:512:512:{SHIPPED}",
    f"window512-grid:4096:4096:512:512:{NO_DYNAMIC}",
    f"causal:4096:4096:-1:0:{SHIPPED}",
    f"causal-grid:4096:4096:-1:0:{NO_DYNAMIC}",
    f"plain16k:16384:16384:-1:-1:{SHIPPED}",
    f"plain16k-33blk:16384:4224:-1:-1:{SHIPPED}",
    f"right16k-33blk-dyn:16384:4224:-1:{BIG}:{SHIPPED}",
    f"window2048:16384:16384:2048:2048:{SHIPPED}",
]


@contextlib.contextmanager
def _section(heads: int | None):
    """The dynamic schedule's section size forced to ``heads`` while the block runs (None: the L2 rule)."""
    shipped = attn_fwd_gluon.order_section
    if heads is not None:
        attn_fwd_gluon.order_section = lambda rows, row_bytes: min(heads, rows)
    try:
        yield
    finally:
        attn_fwd_gluon.order_section = shipped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=";".join(DEFAULT_CASES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep", type=int, default=100, help="ms per timing")
    ap.add_argument("--tokens", type=int, default=16384, help="batch x seqlen_q")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--graph", action="store_true",
                    help="time a CUDA graph of the call (triton.testing.do_bench_cudagraph: no host time)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.headdim != 128 and args.cases == ";".join(DEFAULT_CASES):
        ap.error("the default cases are d = 128's (128-key blocks and d = 128 configs): give --cases")
    d = args.headdim
    nheads = 2048 // d
    cases = []
    for text in args.cases.split(";"):
        name, sq, sk, left, right, cfg, *section = text.split(":")
        sq, sk, left, right = int(sq), int(sk), int(left), int(right)
        section = int(section[0]) if section else None
        batch = max(args.tokens // sq, 1)
        q = torch.randn(batch, sq, nheads, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, sk, nheads, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        config = None if cfg == SHIPPED else attn_fwd_gluon.FwdConfig.parse(cfg)
        def fn(q=q, k=k, v=v, w=(left, right), c=config, heads=section):
            with _section(heads):
                return attn_fwd_gluon.gluon_forward(q, k, v, d ** -0.5, window_size=w, config=c)
        flops = 4.0 * d * nheads * batch * allowed_pairs(sq, (left, right), sk)
        cases.append((name, fn, flops))
    times = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):
        for name, fn, _ in cases:
            if args.graph:
                times[name].append(triton.testing.do_bench_cudagraph(fn, rep=args.rep))
            else:
                times[name].append(triton.testing.do_bench(fn, warmup=25, rep=args.rep))
    rows = []
    for name, _, flops in cases:
        ms = statistics.median(times[name])
        rows.append({"case": name, "ms": ms, "tflops": flops / ms * 1e-9,
                     "spread": (max(times[name]) - min(times[name])) / ms})
        print(f"{name:<22} {ms:8.4f} ms {rows[-1]['tflops']:6.1f} TFLOPs/s  (spread {rows[-1]['spread']:.3f})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
