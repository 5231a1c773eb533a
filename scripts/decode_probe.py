"""What bounds decode: the device's read rate, and how cuDNN's decode kernels are launched against ours.

Modes (the decode suite's shape: bf16, d = 128, 32 query heads, 8 KV heads, batch x KV length = 256k):
  time  median ms and TB/s (K + V bytes) of sdpa-cudnn, ioattn contiguous, ioattn paged, and two plain
        reads of the same bytes (torch's sum and max over the K and V caches), interleaved in rounds
  ncu   one call of each implementation between cudaProfilerStart/Stop, for
        `ncu --profile-from-start off` (grid, block, registers, shared memory, DRAM bytes and throughput)
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ioattn import flash_attn_with_kvcache
from ioattn.bench.decode import _inputs, _paged


def inputs(seqlen_k: int):
    """The decode suite's inputs at one KV length: (q, k, v, paged k, paged v, block table, cache lengths)."""
    batch = 262144 // seqlen_k
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = _inputs(batch, seqlen_k, 32, 8, 128, torch.bfloat16, "cuda", gen)
    kp, vp, table = _paged(k, v, gen)
    lens = torch.full((batch,), seqlen_k, dtype=torch.int32, device="cuda")
    return q, k, v, kp, vp, table, lens


def peers(q, k, v, kp, vp, table, lens) -> dict:
    """sdpa-cudnn and ioattn's contiguous and paged decode on ``inputs``' tensors."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    return {
        "sdpa-cudnn": cudnn,
        "ioattn": lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens),
        "ioattn-paged": lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table),
    }


def impls(seqlen_k: int):
    tensors = inputs(seqlen_k)
    k, v = tensors[1:3]
    fns = {
        **peers(*tensors),
        "torch-sum": lambda: (k.sum(dtype=torch.float32), v.sum(dtype=torch.float32)),
        "torch-amax": lambda: (k.amax(), v.amax()),
    }
    return fns, 2 * k.numel() * k.element_size()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("time", "ncu"))
    p.add_argument("--seqlens", default="1024,4096,16384,65536")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    for seqlen_k in (int(s) for s in args.seqlens.split(",")):
        fns, nbytes = impls(seqlen_k)
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
        if args.mode == "ncu":
            torch.cuda.profiler.start()
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            continue
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
        ref = statistics.median(times["sdpa-cudnn"])
        line = [f"{seqlen_k:>6}"]
        for name, ts in times.items():
            ms = statistics.median(ts)
            line.append(f"{name} {nbytes / ms * 1e-9:.3f} TB/s ({ref / ms:.3f})")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
