"""Dropout's cost, in one process: ioattn (Gluon forward on Hopper, portable backward), ioattn with the portable
forward (``IOATTN_GLUON=0``), ioattn with dropout's backward in two passes, and SDPA's flash / efficient /
cuDNN backends, each with and without dropout, forward and backward (fwd+bwd minus fwd, as the fa2 suite times
them). bf16, batch x seqlen = 16k tokens, hidden 2048, the fa2 suite's shapes; TFLOPs/s count every (query,
key) pair (half for causal).

    PYTHONPATH=src python scripts/bench_dropout.py [--headdims 64,128] [--seqlens 4096,16384] [--p 0.1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn
from ioattn.bench.timing import FULL, median_ms
from ioattn.kernels import launch

TOKENS, HIDDEN = 16384, 2048


def _ioattn(portable: bool = False, two_pass: bool = False):
    """portable: the portable forward (IOATTN_GLUON=0); two_pass: dropout's backward in two passes (the rule
    before launch.DROPOUT_SINGLE_PASS)."""
    def run(q, k, v, causal, p, dout=None):
        if portable:
            os.environ["IOATTN_GLUON"] = "0"
        launch.DROPOUT_SINGLE_PASS = not two_pass
        try:
            out = ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=causal)
            if dout is not None:  # the backward runs under the same routing
                out.backward(dout)
            return out
        finally:
            os.environ.pop("IOATTN_GLUON", None)
            launch.DROPOUT_SINGLE_PASS = True
    return run


def _sdpa(backend: str):
    def run(q, k, v, causal, p, dout=None):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 dropout_p=p, is_causal=causal).transpose(1, 2)
            if dout is not None:
                out.backward(dout)
        return out
    return run


IMPLS = {"ioattn": _ioattn(), "ioattn-portable": _ioattn(portable=True), "ioattn-twopass": _ioattn(two_pass=True),
         "sdpa-flash": _sdpa("FLASH_ATTENTION"),
         "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"), "sdpa-cudnn": _sdpa("CUDNN_ATTENTION")}


def _time(fn, q, k, v, dout, causal, p) -> tuple[float, float]:
    """(forward ms, forward + backward ms), medians after warm-up."""
    fwd = median_ms(lambda: fn(q, k, v, causal, p), "cuda", FULL, grad_to_none=(q, k, v))
    both = median_ms(lambda: fn(q, k, v, causal, p, dout), "cuda", FULL, grad_to_none=(q, k, v))
    return fwd, both


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for d in (int(x) for x in args.headdims.split(",")):
        for seqlen in (int(x) for x in args.seqlens.split(",")):
            for causal in (False, True):
                b, h = TOKENS // seqlen, HIDDEN // d
                q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)
                flops = 4.0 * b * h * d * seqlen * seqlen / (2 if causal else 1)
                for name in args.impls.split(","):
                    fn = IMPLS[name]
                    for p in (0.0, args.p):
                        try:
                            fwd, both = _time(fn, q, k, v, dout, causal, p)
                        except Exception as e:  # noqa: BLE001 - a peer without this case is reported
                            print(f"{name} d={d} s={seqlen} causal={causal} p={p}: {type(e).__name__}: {e}"[:200])
                            continue
                        row = {"impl": name, "headdim": d, "seqlen": seqlen, "causal": causal, "dropout_p": p,
                               "fwd_ms": fwd, "bwd_ms": both - fwd, "fwd_tflops": flops / fwd / 1e9,
                               "bwd_tflops": 2.5 * flops / (both - fwd) / 1e9}
                        rows.append(row)
                        print(f"{name:15s} d={d:3d} s={seqlen:5d} causal={causal!s:5s} p={p:.2f}: "
                              f"fwd {row['fwd_tflops']:6.1f}  bwd {row['bwd_tflops']:6.1f} TFLOPs/s", flush=True)
                del q, k, v, dout
                torch.cuda.empty_cache()
    print("\nwith dropout: TFLOPs/s (relative to the same impl without dropout)")
    key = {(r["impl"], r["headdim"], r["seqlen"], r["causal"], r["dropout_p"]): r for r in rows}
    for r in rows:
        if r["dropout_p"] == 0:
            continue
        plain = key.get((r["impl"], r["headdim"], r["seqlen"], r["causal"], 0.0))
        rel = (f"({r['fwd_tflops'] / plain['fwd_tflops']:.2f} / {r['bwd_tflops'] / plain['bwd_tflops']:.2f})"
               if plain else "")
        print(f"{r['impl']:15s} d={r['headdim']:3d} s={r['seqlen']:5d} causal={r['causal']!s:5s} "
              f"fwd {r['fwd_tflops']:6.1f} bwd {r['bwd_tflops']:6.1f} {rel}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
