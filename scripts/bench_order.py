"""Causal launch order of the Gluon backward: ``common.launch_order``'s L2-sized sections (the default)
against the plain row-by-row order (every section one KV head), beside SDPA's cuDNN and flash backends, in one
process on the same inputs, interleaved over rounds; the FA2 benchmark's setup (bf16, batch x seqlen = 16k
tokens, nheads = 2048 / d; backward FLOPs = 2.5 x the forward's). The table shows medians over rounds
(TFLOPs/s) and the median of the per-round ratios sectioned / row-major, / cuDNN, / flash. ``--modes fwd``
adds the causal forward (no row-major variant: its order is the dynamic schedule's, not this knob's).
The backward routes to the Gluon kernel at d = 64, 128 and 256 by default.

    PYTHONPATH=src python scripts/bench_order.py [--headdims 128] [--seqlens 2048,...] [--rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn
from ioattn.kernels import attn_bwd_gluon
from ioattn.kernels.fastlaunch import set_plans

# Launch plans replay a call's worked-out launches, the section included: both arms take the whole path here.
set_plans(False)

_PATCHED = (attn_bwd_gluon,)


@contextlib.contextmanager
def row_major():
    saved = [m.order_section for m in _PATCHED]
    for m in _PATCHED:
        m.order_section = lambda rows, row_bytes: 1
    try:
        yield
    finally:
        for m, f in zip(_PATCHED, saved, strict=True):
            m.order_section = f


def _sdpa(q, k, v, backend):
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _timer(mode, fn, inputs):
    if mode == "fwd":
        return lambda: fn(*inputs)
    out = fn(*inputs)
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def _ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(b) / time(a): above 1 when a is faster."""
    if b not in times:
        return float("nan")
    return statistics.median(y / x for x, y in zip(times[a], times[b], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", default="128")
    ap.add_argument("--modes", default="bwd")
    ap.add_argument("--seqlens", default="2048,4096,8192,16384")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"{'mode':>4} {'d':>4} {'seqlen':>6} | {'sect':>5} {'rowmaj':>6} {'cudnn':>5} {'flash':>5} | "
          f"{'s/r':>5} {'s/cudnn':>7} {'s/flash':>7}")
    for mode in args.modes.split(","):
        for d in (int(x) for x in args.headdims.split(",")):
            for s in (int(x) for x in args.seqlens.split(",")):
                b, h = 16384 // s, 2048 // d
                grad = mode == "bwd"
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)
                           for _ in range(3))
                qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(grad) for t in (q, k, v))
                flops = (2.5 if grad else 1.0) * 4 * s * s * d * h * b / 2

                def ours(q, k, v):
                    return ioattn.flash_attn_func(q, k, v, causal=True)

                fns = {"sect": _timer(mode, ours, (q, k, v))}
                if mode == "bwd":
                    with row_major():
                        fns["rowmaj"] = _timer(mode, ours, (q, k, v))
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    fns[name] = _timer(mode, lambda q, k, v, be=backend: _sdpa(q, k, v, be), (qt, kt, vt))
                times = {n: [] for n in fns}
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        ctx = row_major() if name == "rowmaj" else contextlib.nullcontext()
                        with ctx:
                            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=150))
                tf = {n: flops / statistics.median(t) * 1e-9 for n, t in times.items()}

                row = {"mode": mode, "headdim": d, "seqlen": s, "tflops": tf,
                       **{f"sect_over_{n}": _ratio(times, "sect", n) for n in ("rowmaj", "cudnn", "flash")}}
                rows.append(row)
                print(f"{mode:>4} {d:>4} {s:>6} | {tf['sect']:5.0f} {tf.get('rowmaj', float('nan')):6.0f} "
                      f"{tf['cudnn']:5.0f} {tf['flash']:5.0f} | {row['sect_over_rowmaj']:5.3f} "
                      f"{row['sect_over_cudnn']:7.3f} {row['sect_over_flash']:7.3f}", flush=True)
                del q, k, v, qt, kt, vt, fns
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
