"""Host time of ioattn's calls on one GPU: wall time per call over many calls with a shape so small that the
GPU never waits, so the queue never fills and the time is the host's (Python, dispatch, launches).

    PYTHONPATH=src python scripts/host_time.py [--headdim 128] [--seqlen 128] [--batch 4] [--heads 16]

Prints forward, backward through autograd, forward+backward through autograd (with and without the autograd
engine's device thread), SDPA's cuDNN backend beside them, and one KV-cache decode call.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn


def host_us(fn, n: int = 300) -> tuple[float, float]:
    """(host microseconds a call, microseconds a call including the final synchronisation)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    shape = (args.batch, args.seqlen, args.heads, args.headdim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    out = ioattn.flash_attn_func(q, k, v, causal=True)

    def fwd_bwd():
        return torch.autograd.grad(ioattn.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)

    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))

    def sdpa_fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return torch.autograd.grad(o, (qt, kt, vt), dout.transpose(1, 2))

    kc = torch.randn(64, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    qd = torch.randn(64, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((64,), 1000, device="cuda", dtype=torch.int32)
    cases = {
        "forward (no grad)": lambda: ioattn.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True),
        "backward (autograd)": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
        "forward+backward (autograd)": fwd_bwd,
        "sdpa-cudnn forward+backward": sdpa_fwd_bwd,
        "decode (flash_attn_with_kvcache)": lambda: ioattn.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lens),
    }
    for name, fn in cases.items():
        print(f"{name:36s} {host_us(fn)[0]:8.1f} us host")
    with torch.autograd.set_multithreading_enabled(False):
        print(f"{'forward+backward, calling thread':36s} {host_us(fwd_bwd)[0]:8.1f} us host")


if __name__ == "__main__":
    main()
