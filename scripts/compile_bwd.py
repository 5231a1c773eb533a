"""Compile the backward's dK/dV kernels for sm_90 without a GPU: the portable single pass with dQ over
candidate configs, or (``--gluon``) the Gluon backward over its feature variants.

For each: compile through TTGIR to PTX (ptxas ships in the Triton wheel), print shared memory, registers,
spills and the Hopper instructions that must be there (wgmma, the TMA reduce-add
``cp.reduce.async.bulk.tensor`` or fp32 ``red`` for dQ). Used to prune configs before a GPU sweep.

    PYTHONPATH=src python scripts/compile_bwd.py [--gluon] [--headdims 64,128] [--dump DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import re

import torch
import triton
from compile_gluon_fwd import FLAGS, VARIANTS, _desc_type, ptxas_report  # one reading for every report
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from ioattn.kernels.attn_bwd import attn_bwd_dkdv_kernel
from ioattn.kernels.attn_bwd_gluon import _CONFIGS as GLUON_CONFIGS
from ioattn.kernels.attn_bwd_gluon import attn_bwd_gluon_kernel, dq_descriptor
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


def compile_gluon_variant(d: int, config: tuple[int, int, int, int] | None = None, dtype=torch.bfloat16,
                          **flags: bool):
    """flags: any of compile_gluon_fwd.FLAGS (default False)."""
    block_m, block_n, stages, warps = config or GLUON_CONFIGS[d]
    ty = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    consts = {"HEAD_DIM": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": stages,
              **{f: flags.get(f, False) for f in FLAGS}, "num_warps": warps}
    sig = {}
    for name in attn_bwd_gluon_kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "dq_desc":
            sig[name] = mangle_type(dq_descriptor(torch.empty(4, 64, d), block_m))
        elif name.endswith("_desc"):
            sig[name] = _desc_type(dtype, block_n if name[0] in "kv" else block_m, d)
        elif name in ("DK", "DV"):
            sig[name] = ty
        elif name in F32_PTR_ARGS:
            sig[name] = "*fp32"
        elif name in I32_PTR_ARGS:
            sig[name] = "*i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = GluonASTSource(attn_bwd_gluon_kernel, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


CANDIDATES = {
    64: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2)],
    128: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2),
          (32, 128, 4, 2)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=pathlib.Path)
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--gluon", action="store_true", help="the Gluon backward's feature variants")
    ap.add_argument("--config", help="BLOCK_M,BLOCK_N,stages,warps for --gluon")
    args = ap.parse_args()
    if args.gluon:
        config = tuple(int(x) for x in args.config.split(",")) if args.config else None
        for d in (int(x) for x in args.headdims.split(",")):
            for name, flags in VARIANTS.items():
                k = compile_gluon_variant(d, config, **flags)
                report(k, f"gluon d={d} {name}", args.dump, f"gluon_d{d}_{name}")
        return
    for d in (int(x) for x in args.headdims.split(",")):
        for c in CANDIDATES[d]:
            cfg = AttnConfig(*c)
            for causal in (False, True):
                try:
                    k = compile_variant(d, causal, cfg, fused=True)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"d={d} {c} causal={causal}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                report(k, f"d={d} {c} causal={causal}", args.dump, f"d{d}_{'_'.join(map(str, c))}_{int(causal)}")


def report(k, label: str, dump: pathlib.Path | None, stem: str) -> None:
    ptx = k.asm["ptx"]
    counts = {n: len(re.findall(p, ptx)) for n, p in
              (("wgmma", r"wgmma\.mma_async"), ("tma-reduce", r"cp\.reduce\.async\.bulk"),
               ("red", r"\bred\.global"), ("atom", r"\batom\.global"), ("bar.sync", r"bar\.sync"))}
    print(f"{label}: smem {k.metadata.shared} B, {ptxas_report(ptx)}, {counts}", flush=True)
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{stem}.ttgir").write_text(k.asm["ttgir"])
        (dump / f"{stem}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
