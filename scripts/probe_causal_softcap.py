"""Causal softcap's backward: the Gluon backward (the default routing) against the portable one
(``IOATTN_GLUON_BWD=0``), interleaved in one process, ``--rounds`` times; FA2 bench shapes (bf16, 16k tokens,
hidden 2048), softcap 30. Prints TFLOPs/s of each and the median ratio Gluon / portable with its range
(``ab_gluon.summarize``). (Written when the default routing sent causal softcap at d >= 128 to the portable
backward: benchmarks/NOTES.md.)

    PYTHONPATH=src:scripts python scripts/probe_causal_softcap.py [--headdims 128,256] [--seqlens 2048,4096,16384]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import triton
from ab_gluon import summarize

import ioattn
from ioattn.kernels.fastlaunch import set_plans

set_plans(False)  # plans do not key on the environment: every call takes the whole path


@contextlib.contextmanager
def _gluon_bwd(value: str | None):
    old = os.environ.pop("IOATTN_GLUON_BWD", None)
    if value is not None:
        os.environ["IOATTN_GLUON_BWD"] = value
    try:
        yield
    finally:
        os.environ.pop("IOATTN_GLUON_BWD", None)
        if old is not None:
            os.environ["IOATTN_GLUON_BWD"] = old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", default="128,256")
    ap.add_argument("--seqlens", default="2048,4096,16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--softcap", type=float, default=30.0)
    args = ap.parse_args()
    for d in (int(x) for x in args.headdims.split(",")):
        for s in (int(x) for x in args.seqlens.split(",")):
            batch, nheads = 16384 // s, 2048 // d
            q, k, v = (torch.randn(batch, s, nheads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            out = ioattn.flash_attn_func(q, k, v, causal=True, softcap=args.softcap)
            dout = torch.randn_like(out)
            flops = 2.5 * 4.0 * s * s * d * nheads * batch / 2

            def fn(out=out, leaves=(q, k, v), dout=dout):
                return torch.autograd.grad(out, leaves, dout, retain_graph=True)

            times = [[], []]
            for _ in range(args.rounds):
                for i, value in enumerate(("0", None)):
                    with _gluon_bwd(value):
                        times[i].append(triton.testing.do_bench(fn, warmup=25, rep=150))
            _, _, text = summarize(times, flops)
            print(f"bwd causal softcap d={d:<3} s={s:<5} portable, gluon: {text}", flush=True)


if __name__ == "__main__":
    main()
