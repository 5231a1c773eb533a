"""How close the d = 128 attention kernels run to the L2's rate (probe for `ncu`).

Runs ioattn's and cuDNN's forward (and, with --bwd, backward) once each between cudaProfilerStart/Stop at the
FA2 bench's shapes (bf16, 16k tokens, 16 heads of 128), for
  ncu --profile-from-start off --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
      python3 scripts/probe_l2.py --seqlens 2048,16384
which reports each kernel's L2, L1 and DRAM throughput against their peaks next to the SM's.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ioattn import flash_attn_func


def profile(seqlen: int, args: argparse.Namespace) -> None:
    """Warms up, then runs each implementation once inside the profiler's range."""
    d = args.headdim
    batch, heads = 16384 // seqlen, 2048 // d
    q, k, v = (torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)

    def ours():
        o = flash_attn_func(q, k, v, causal=args.causal)
        if args.bwd:
            torch.autograd.grad(o, (q, k, v), do)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=args.causal)
        if args.bwd:
            torch.autograd.grad(o, (q, k, v), do.transpose(1, 2))

    for fn in (ours, cudnn, ours, cudnn):
        fn()
    torch.cuda.synchronize()
    print(f"seqlen {seqlen}: profiling ioattn then cuDNN", flush=True)
    torch.cuda.profiler.start()
    ours()
    cudnn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="2048,16384")
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--bwd", action="store_true")
    args = p.parse_args()
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        profile(seqlen, args)


if __name__ == "__main__":
    main()
