"""Where the time of a short backward goes (FA2 bench shapes, bf16, 16k tokens, hidden 2048): for each
(seqlen, causal), do_bench of forward, forward+backward and backward alone, the host time of one backward
call (launches without waiting, averaged over many calls), and the per-kernel GPU times of a profiled
forward+backward. A backward whose host time exceeds its GPU time is launch-bound in the bench.

    PYTHONPATH=src python scripts/profile_short_bwd.py [--headdim 128] [--seqlens 512,1024,2048]
"""

from __future__ import annotations

import argparse
import time

import torch
import triton

import ioattn


def _host_ms(fn, n: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / n
    torch.cuda.synchronize()
    return host


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlens", default="512,1024,2048")
    ap.add_argument("--profile", default="512", help="seqlens whose causal forward+backward is profiled")
    args = ap.parse_args()
    d = args.headdim
    print(f"{'s':>6} {'causal':>6} | {'fwd':>7} {'fwdbwd':>7} {'bwd':>7} {'bwd host':>8} (ms)")
    for s in (int(x) for x in args.seqlens.split(",")):
        for causal in (False, True):
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
                       for _ in range(3))
            dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)

            def fwd(q=q, k=k, v=v, causal=causal):
                return ioattn.flash_attn_func(q, k, v, causal=causal)

            def fwdbwd(fwd=fwd, dout=dout):
                fwd().backward(dout)

            out = fwd()

            def bwd(out=out, q=q, k=k, v=v, dout=dout):
                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

            t_f = triton.testing.do_bench(fwd, warmup=25, rep=100)
            t_fb = triton.testing.do_bench(fwdbwd, warmup=25, rep=100, grad_to_none=(q, k, v))
            t_b = triton.testing.do_bench(bwd, warmup=25, rep=100)
            print(f"{s:>6} {causal!s:>6} | {t_f:7.3f} {t_fb:7.3f} {t_b:7.3f} {_host_ms(bwd):8.3f}", flush=True)
            if causal and str(s) in args.profile.split(","):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        q.grad = k.grad = v.grad = None
                        fwdbwd()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
