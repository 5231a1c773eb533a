"""Compile the backward's dK/dV kernel (two-pass or single-pass with dQ) for sm_90 without a GPU.

For each head dim and config: compile through TTGIR to PTX (ptxas ships in the Triton wheel), print shared
memory, registers, spills and the Hopper instructions that must be there (wgmma, the TMA reduce-add
``cp.reduce.async.bulk.tensor`` for the fused dQ). Used to prune configs before a GPU sweep.

    PYTHONPATH=src python scripts/compile_bwd.py [--fused-only]
"""

from __future__ import annotations

import argparse
import pathlib
import re

import torch
import triton
from compile_gluon_fwd import ptxas_report  # the same ptxas -v reading for every offline report
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from ioattn.kernels.attn_bwd import attn_bwd_dkdv_kernel
from ioattn.kernels.launch import AttnConfig

PTR_ARGS = {"Q", "K", "V", "DOut", "DK", "DV"}
F32_PTR_ARGS = {"Lse", "Delta", "DQacc", "alibi_slopes"}
I32_PTR_ARGS = {"cu_seqlens_q", "cu_seqlens_k"}
FLOAT_ARGS = {"softmax_scale", "qk_scale", "softcap2", "dropout_p"}


def compile_variant(d: int, causal: bool, cfg: AttnConfig, fused: bool, dtype=torch.bfloat16):
    ty = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    consts = {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
              "IS_VARLEN": False, "SOFTCAP": False, "HAS_ALIBI": False, "HAS_LEFT": False,
              "HAS_RIGHT": causal, "DROPOUT": False, "DOT_PRECISION": "tf32", "FUSED_DQ": fused,
              "DQ_TMA": fused}
    sig, attrs = {}, {}
    for i, name in enumerate(attn_bwd_dkdv_kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name == "dq_desc":
            if fused:
                acc = torch.empty(4, 64, d)
                sig[name] = mangle_type(TensorDescriptor(acc, list(acc.shape), list(acc.stride()),
                                                         [1, cfg.block_m, d]))
            else:
                sig[name] = "constexpr"
                consts[name] = None
        elif name in PTR_ARGS:
            sig[name] = ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in F32_PTR_ARGS:
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in I32_PTR_ARGS:
            sig[name] = "*i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if name.startswith("stride") and not name.endswith("_ab"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(attn_bwd_dkdv_kernel, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


CANDIDATES = {
    64: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2)],
    128: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2),
          (32, 128, 4, 2)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=pathlib.Path)
    ap.add_argument("--headdims", default="64,128")
    args = ap.parse_args()
    for d in (int(x) for x in args.headdims.split(",")):
        for c in CANDIDATES[d]:
            cfg = AttnConfig(*c)
            for causal in (False, True):
                try:
                    k = compile_variant(d, causal, cfg, fused=True)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"d={d} {c} causal={causal}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                ptx = k.asm["ptx"]
                counts = {n: len(re.findall(p, ptx)) for n, p in
                          (("wgmma", r"wgmma\.mma_async"), ("tma-reduce", r"cp\.reduce\.async\.bulk"),
                           ("red", r"\bred\.global"), ("bar.sync", r"bar\.sync"))}
                print(f"d={d} {c} causal={causal}: smem {k.metadata.shared} B, {ptxas_report(ptx)}, {counts}",
                      flush=True)
                if args.dump:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    stem = f"d{d}_{'_'.join(map(str, c))}_{int(causal)}"
                    (args.dump / f"{stem}.ttgir").write_text(k.asm["ttgir"])
                    (args.dump / f"{stem}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
