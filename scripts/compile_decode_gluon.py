"""Compile the Gluon decode kernel for sm_90 without a GPU: shared memory, registers, spills and the Hopper
instructions in its PTX, per variant (paged page 16 / 64 / 256, contiguous; d 64 / 128; config)."""

from __future__ import annotations

import argparse
import pathlib

import torch
import triton
from compile_gluon_fwd import report
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from ioattn.kernels.decode_gluon import CONFIG, DecodeConfig, _descriptor, decode_gluon_kernel


def compile_variant(d: int, page: int, cfg: DecodeConfig, dtype=torch.bfloat16, **flags):
    """page 0: contiguous cache."""
    paged = page > 0
    box = min(page, cfg.block_n) if paged else cfg.block_n
    cache = torch.empty(64, page if paged else 1024, 8, d, dtype=dtype)
    desc = mangle_type(_descriptor(cache, box).real())
    elem = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    sig = {"k_desc": desc, "v_desc": desc, "Q": elem, "Out": elem, "Lse": "*fp32", "CacheSeqlens": "*i32",
           "BlockTable": "*i32", "CacheBatchIdx": "*i32", "Alibi": "*fp32", "LeftPad": "*i32"}
    for name in ("stride_qb", "stride_qs", "stride_qh", "stride_kh", "stride_vh", "stride_osplit", "stride_ob",
                 "stride_os", "stride_oh", "stride_lsplit", "stride_lb", "stride_lh", "stride_ls", "stride_btb",
                 "stride_ab", "capacity", "nheads_k", "seqlen_q", "seqlen_new", "num_splits"):
        sig[name] = "i32"
    sig.update(score_scale="fp32", tanh_scale="fp32", window_left="i32", window_right="i32")
    consts = {"GROUP": 4, "HEAD_DIM": d, "BLOCK_N": cfg.block_n, "NUM_STAGES": cfg.stages, "PAGED": paged,
              "PAGE_SIZE": page if paged else 1, "HAS_BATCH_IDX": False, "SOFTCAP": False, "HAS_ALIBI": False,
              "HAS_LEFT": False, "HAS_RIGHT": False, "HAS_LEFTPAD": False}
    consts.update(flags)
    for k in consts:
        sig[k] = "constexpr"
    src = GluonASTSource(decode_gluon_kernel, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=pathlib.Path)
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--pages", default="0,16,64,256")
    ap.add_argument("--config", default=f"{CONFIG.block_n},{CONFIG.stages}", help="BLOCK_N,STAGES")
    ap.add_argument("--features", action="store_true",
                    help="also softcap + ALiBi + window + batch index (+ cache_leftpad, contiguous)")
    args = ap.parse_args()
    cfg = DecodeConfig(*(int(x) for x in args.config.split(",")))
    variants = [{}]
    if args.features:
        variants.append({"SOFTCAP": True, "HAS_ALIBI": True, "HAS_LEFT": True, "HAS_RIGHT": True,
                         "HAS_BATCH_IDX": True})
    for d in (int(x) for x in args.headdims.split(",")):
        for page in (int(x) for x in args.pages.split(",")):
            named = [("plain", "p", {})] + [("features", "f", flags) for flags in variants[1:]]
            if args.features and not page:  # cache_leftpad: contiguous caches only
                named.append(("features + leftpad", "fl", {**variants[1], "HAS_LEFTPAD": True}))
            for name, tag, flags in named:
                k = compile_variant(d, page, cfg, **flags)
                report(k, f"d={d} page={page or 'contig'} {cfg} {name}", args.dump, f"d{d}_p{page}_{tag}")


if __name__ == "__main__":
    main()
