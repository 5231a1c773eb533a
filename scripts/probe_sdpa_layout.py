"""Where ``ioattn.scaled_dot_product_attention`` spends its GPU time under each reading of SDPA's layout: per-kernel
CUDA time (torch.profiler) of forward + backward steps, (B, H, L, E) memory read as B x H heads ('bhsd') against
transposed views of (B, L, H, E) memory read as B batches ('view'), and 'bhsd-pad': (B, H, L, E) memory with
each head's rows 64 elements apart from the next's (head stride L x E + 64: not a power of two).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import ioattn


def _inputs(kind, b, h, n, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    if kind == "view":
        return [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                .requires_grad_() for _ in range(3)]
    if kind == "bhsd":
        return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                for _ in range(3)]
    out = []
    for _ in range(3):
        flat = torch.randn(b * h * (n * d + 64), device="cuda", dtype=torch.bfloat16, generator=g)
        out.append(flat.as_strided((b, h, n, d), (h * (n * d + 64), n * d + 64, d, 1)).detach().requires_grad_())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="64:2048:1,128:2048:1,128:8192:1,128:8192:0")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    for cell in args.cells.split(","):
        d, n, causal = (int(x) for x in cell.split(":"))
        h, b = 2048 // d, 16384 // n
        for kind in ("view", "bhsd", "bhsd-pad"):
            q, k, v = _inputs(kind, b, h, n, d)

            dout = torch.randn_like(ioattn.scaled_dot_product_attention(q, k, v, is_causal=bool(causal)))

            def step(q=q, k=k, v=v, causal=bool(causal), dout=dout):
                o = ioattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
                torch.autograd.grad(o, (q, k, v), dout)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            times = defaultdict(float)
            for ev in prof.key_averages():
                if ev.device_type.name == "CUDA":
                    times[ev.key[:60]] += ev.device_time_total / args.steps
            total = sum(times.values())
            top = sorted(times.items(), key=lambda kv: -kv[1])[:6]
            print(f"d={d} n={n} causal={causal} {kind:9s} total {total:8.1f} us: "
                  + "; ".join(f"{name} {t:.0f}" for name, t in top))


if __name__ == "__main__":
    main()
