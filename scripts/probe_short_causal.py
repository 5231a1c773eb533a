"""Probe: the d = 128 causal forward at 512-2k, where an H100 read 0.47-0.71x cuDNN in the FA2 bench.

Per cell (bf16, 16k tokens, 16 heads of 128; causal and not; ioattn and sdpa-cudnn): ``do_bench`` as the
bench calls it, a cache flush before each call (its default mean here, where the bench takes the median),
back-to-back calls timed by CUDA events (no flush: the GPU's time when the queue stays full), and the host's
time to enqueue a call (perf_counter over calls without a synchronisation; the host's time if the host is the
slower side). Microseconds a call.

    PYTHONPATH=src python scripts/probe_short_causal.py
"""

import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn

dev = torch.device("cuda")


def back_to_back(fn, n=50):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def host(fn, n=20):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    e = (time.perf_counter() - t) * 1e6 / n
    torch.cuda.synchronize()
    return e


print(torch.cuda.get_device_name())
for s in (512, 1024, 2048):
    for causal in (False, True):
        b = 16384 // s
        q, k, v = (torch.randn(b, s, 16, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def ours(q=q, k=k, v=v, causal=causal):
            with torch.no_grad():
                return ioattn.flash_attn_func(q, k, v, causal=causal)

        def cudnn(qt=qt, kt=kt, vt=vt, causal=causal):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        flops = 4 * s * s * 128 * 16 * b / (2 if causal else 1)
        for name, fn in (("ioattn", ours), ("cudnn", cudnn)):
            bench = triton.testing.do_bench(fn, warmup=25, rep=100)
            btb = back_to_back(fn)
            h = host(fn)
            print(f"s={s:5d} causal={causal!s:5s} {name:6s} bench {bench * 1e3:7.1f} us ({flops / bench * 1e-9:5.0f} "
                  f"TFLOPs/s)  back-to-back {btb:7.1f} us ({flops / btb * 1e-6:5.0f})  host {h:6.1f} us")
