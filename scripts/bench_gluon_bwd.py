"""Time the backward alone on one GPU: the Gluon single pass, the portable backward (``IOATTN_GLUON_BWD=0``)
and SDPA's cuDNN and flash backends, in one process on the same inputs, in the FA2 benchmark's setup
(bf16, batch x seqlen = 16k tokens, nheads = 2048 / d; backward FLOPs = 2.5 x the forward's).

    PYTHONPATH=src python scripts/bench_gluon_bwd.py [--headdims 64,128] [--seqlens 2048,...] [--json F]

``--softcap X`` (or ``--alibi``: slopes uniform in [0, 0.1); ``--deterministic``; ``--dropout P``;
``--window L,R``) times ioattn with that option and the plain case beside it (``plain``; SDPA's peers run
with dropout, not the others); ``tl`` is then the portable backward with the option (with
``--deterministic``, the two-pass backward).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn
from ioattn.kernels import attn_bwd_gluon


def _time_bwd(fn, q, k, v, env: str | None = None) -> float:
    if env is not None:
        os.environ["IOATTN_GLUON_BWD"] = env
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                 warmup=50, rep=300)
    os.environ.pop("IOATTN_GLUON_BWD", None)
    return ms


def _sdpa(q, k, v, *, backend, causal, dropout_p=0.0):
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--json")
    ap.add_argument("--softcap", type=float, default=0.0)
    ap.add_argument("--alibi", action="store_true")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--window", default="", help="'LEFT,RIGHT': a sliding window (SDPA's peers not timed)")
    ap.add_argument("--alt", default="",
                    help="'d:BLOCK_M,BLOCK_N,stages[,dq_stages[,early_mask[,kv_regs[,dq_swizzle]]]]|...;...': "
                         "also time these")
    args = ap.parse_args()
    window = tuple(int(x) for x in args.window.split(",")) if args.window else (-1, -1)
    alt = {int(d): [attn_bwd_gluon.BwdConfig.parse(c) for c in cs.split("|")]
           for d, cs in (item.split(":") for item in args.alt.split(";") if item)}
    rows = []
    print(f"{'d':>4} {'causal':>6} {'seqlen':>6} | {'gluon':>6} {'tl':>6} {'cudnn':>6} {'flash':>6} | "
          f"{'g/tl':>5} {'g/cudnn':>7} {'g/flash':>7}")
    for d in (int(x) for x in args.headdims.split(",")):
        for causal in (False, True):
            for s in (int(x) for x in args.seqlens.split(",")):
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
                           for _ in range(3))
                qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
                slopes = torch.rand(h, device="cuda") * 0.1 if args.alibi else None
                ours = functools.partial(ioattn.flash_attn_func, causal=causal, softcap=args.softcap,
                                         alibi_slopes=slopes, deterministic=args.deterministic,
                                         dropout_p=args.dropout, window_size=window)
                extra = args.softcap or args.alibi or args.deterministic or args.dropout or args.window
                flops = 2.5 * 4 * s * s * d * h * b / (2 if causal else 1)
                ms = {"gluon": _time_bwd(ours, q, k, v, "1"), "tl": _time_bwd(ours, q, k, v, "0")}
                if extra:
                    plain = functools.partial(ioattn.flash_attn_func, causal=causal)
                    ms["plain"] = _time_bwd(plain, q, k, v, "1")
                select = attn_bwd_gluon.select_config
                for i, cfg in enumerate(alt.get(d, [])):
                    attn_bwd_gluon.select_config = lambda *_, cfg=cfg: cfg
                    ms[f"alt{i}"] = _time_bwd(ours, q, k, v, "1")
                attn_bwd_gluon.select_config = select
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    try:
                        if args.softcap or args.alibi or args.deterministic or args.window:
                            raise RuntimeError("no softcap, ALiBi, window or deterministic switch here")
                        ms[name] = _time_bwd(functools.partial(_sdpa, backend=backend, causal=causal,
                                                               dropout_p=args.dropout), qt, kt, vt)
                    except RuntimeError:
                        ms[name] = float("nan")
                tf = {n: flops / t * 1e-9 for n, t in ms.items()}
                rows.append({"headdim": d, "causal": causal, "seqlen": s, "tflops": tf})
                print(f"{d:>4} {causal!s:>6} {s:>6} | {tf['gluon']:6.0f} {tf['tl']:6.0f} {tf['cudnn']:6.0f} "
                      f"{tf['flash']:6.0f} | {tf['gluon'] / tf['tl']:5.2f} {tf['gluon'] / tf['cudnn']:7.2f} "
                      f"{tf['gluon'] / tf['flash']:7.2f} |" + "".join(f" {n} {x:4.0f}" for n, x in tf.items()
                                                             if n.startswith("alt") or n == "plain"),
                      flush=True)
                del q, k, v, qt, kt, vt
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
