"""Quick FlashAttention-2 speed figure on a GPU: forward and backward TFLOP/s of ioattn.flash_attn_func
against torch.nn.functional.scaled_dot_product_attention, same inputs, same process (triton do_bench).

Not a benchmark of record (that is ``ioattn bench``); a sanity check that the kernels are in the right
league. Usage: python scripts/quick_fa2_speed.py [--seqlen 4096] [--headdim 128]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import ioattn


def tflops(flops: float, ms: float) -> float:
    return flops / ms * 1e-9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--nheads", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--headdim", type=int, default=128)
    args = parser.parse_args()
    b, h, s, d = args.batch, args.nheads, args.seqlen, args.headdim
    print(f"{torch.cuda.get_device_name()}  batch {b} nheads {h} seqlen {s} headdim {d} bf16")
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    for causal in (False, True):
        fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
        bwd_flops = 2.5 * fwd_flops  # 5 matmuls against the forward's 2
        impls = {
            "ioattn": lambda causal=causal: ioattn.flash_attn_func(q, k, v, causal=causal),
            "sdpa": lambda causal=causal: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2),
        }
        for name, fn in impls.items():
            ms_fwd = do_bench(fn, warmup=25, rep=100)
            out = fn()
            ms_bwd = do_bench(lambda out=out: out.backward(dout, retain_graph=True), warmup=25, rep=100,
                              grad_to_none=[q, k, v])
            print(f"causal={causal!s:5} {name:7} fwd {ms_fwd:7.3f} ms {tflops(fwd_flops, ms_fwd):6.1f} TFLOP/s"
                  f"   bwd {ms_bwd:7.3f} ms {tflops(bwd_flops, ms_bwd):6.1f} TFLOP/s")


if __name__ == "__main__":
    main()
