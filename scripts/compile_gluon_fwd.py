"""Compile the Gluon forward kernel for sm_90 without a GPU and report what the PTX holds.

For each (head dim, feature set, dtype) variant: compile through TTGIR to PTX and cubin (ptxas ships in the
Triton wheel), print shared memory, registers and spills, and count the Hopper instructions that must be
there (wgmma.mma_async, cp.async.bulk.tensor, mbarrier). ``--dump DIR`` writes the TTGIR and PTX.
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type

from ioattn.kernels.attn_fwd_gluon import (
    _CONFIGS,
    _GL_DTYPES,
    _SINGLE_MAXNREG,
    FwdConfig,
    attn_fwd_gluon_kernel,
    attn_fwd_gluon_ws_kernel,
    attn_fwd_gluon_ws_sched_kernel,
)
from ioattn.kernels.decode_gluon import PAGED_CONFIGS
from ioattn.kernels.decode_gluon import _descriptor as _paged_descriptor


def _desc_type(dtype: torch.dtype, rows: int, d: int) -> str:
    t = torch.empty(rows, d, dtype=dtype)
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], _GL_DTYPES[dtype])
    return mangle_type(TensorDescriptor(t, [rows, d], [d, 1], [rows, d], layout))


FLAGS = ("IS_VARLEN", "SOFTCAP", "HAS_ALIBI", "HAS_LEFT", "HAS_RIGHT")


def compile_variant(d: int, dtype: torch.dtype, overlap: bool, config: FwdConfig | None = None, sched: bool = False,
                    page: int = 0, **flags: bool):
    """flags: any of FLAGS or DROPOUT (default False); causal is HAS_RIGHT alone, a sliding window both.
    ``sched``: the warp-specialised kernel the host launches for a dense input of whole query tiles
    (``attn_fwd_gluon_ws_sched_kernel`` where it takes the dynamic or paired schedule or the bulk store).
    ``page`` > 0: the warp-specialised kernel over a paged cache of that page size (varlen queries,
    ``decode_gluon.gluon_paged_prefill``'s launch)."""
    cfg = config or (PAGED_CONFIGS[d] if page else _CONFIGS[d])
    block_m, block_n, stages, warps = cfg.block_m, cfg.block_n, cfg.stages, cfg.warps
    elem = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    kv_desc = _desc_type(dtype, block_n, d)
    if page:
        flags = {**flags, "IS_VARLEN": True}
        cache = torch.empty(64, page, 8, d, dtype=dtype)
        kv_desc = mangle_type(_paged_descriptor(cache, min(page, block_n)).real())
    sig = {"q_desc": _desc_type(dtype, block_m, d), "k_desc": kv_desc,
           "v_desc": kv_desc, "Out": elem, "Lse": "*fp32",
           "cu_seqlens_q": "*i32", "cu_seqlens_k": "*i32", "alibi_slopes": "*fp32"}
    for name in ("stride_ob", "stride_os", "stride_oh", "stride_lb", "stride_lh", "stride_ab", "stride_qh",
                 "stride_kh", "stride_vh", "nheads", "group", "max_seqlen_q", "max_seqlen_k"):
        sig[name] = "i32"
    sig.update(score_scale="fp32", tanh_scale="fp32", window_left="i32", window_right="i32",
               seed="*i64" if flags.get("DROPOUT") else "i64",
               dropout_p="fp32")
    consts = {"HEAD_DIM": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": stages,
              **{f: flags.get(f, False) for f in FLAGS}, "DROPOUT": flags.get("DROPOUT", False),
              "OVERLAP": overlap, "num_warps": warps}
    kernel = attn_fwd_gluon_kernel
    if cfg.schedule != "single":
        kernel = attn_fwd_gluon_ws_kernel
        sig.update(num_tiles="i32", block_table="*i32", stride_btb="i32", tile_list="*i32")
        consts["PINGPONG"] = cfg.schedule == "pingpong"
        consts["PAGE_SIZE"] = page
        # Chained tiles as the host routes them to this kernel: the persistent static schedule, dense, no
        # right window.
        consts["CHAIN"] = (cfg.chain and cfg.persistent and not flags.get("IS_VARLEN", False)
                           and not flags.get("HAS_RIGHT", False))
        if sched and not flags.get("IS_VARLEN", False):
            # gluon_forward's routing of a dense input of whole query tiles (seqlen_q <= seqlen_k, 8 tiles or
            # more): the dynamic or paired schedule, the bulk store.
            right, left = flags.get("HAS_RIGHT", False), flags.get("HAS_LEFT", False)
            paired = cfg.paired and cfg.chain and right and not left
            dynamic = cfg.dynamic and right and not paired
            persistent = dynamic or paired or (cfg.persistent and not right)
            o_tma = cfg.tma_store and not flags.get("SOFTCAP", False) and not flags.get("DROPOUT", False)
            if dynamic or paired or o_tma:
                kernel = attn_fwd_gluon_ws_sched_kernel
                del sig["block_table"], sig["stride_btb"], sig["tile_list"], consts["PAGE_SIZE"]
                sig = {**dict(list(sig.items())[:3]), "o_desc": _desc_type(dtype, block_m, d),
                       **dict(list(sig.items())[3:8]), "tile_counter": "*i32", **dict(list(sig.items())[8:]),
                       "section": "i32"}
                consts.update(DYNAMIC=dynamic, O_TMA=o_tma, PAIRED=paired,
                              CHAIN=cfg.chain and persistent and not dynamic)
    consts = {p.name: p.default for p in kernel.params  # defaulted constexprs a launch leaves out
              if p.is_constexpr and p.default is not inspect.Parameter.empty and p.name not in consts} | consts
    for k in consts:
        sig[k] = "constexpr"
    src = GluonASTSource(kernel, sig, consts)
    options = {"num_warps": warps}
    if kernel is attn_fwd_gluon_kernel and flags.get("DROPOUT", False) and warps == 4 and d == 64:
        options["maxnreg"] = _SINGLE_MAXNREG  # as gluon_forward launches it
    if os.environ.get("MAXNREG"):  # another bound, for a probe
        options["maxnreg"] = int(os.environ["MAXNREG"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(ptx: str) -> str:
    """Registers and spill bytes from ptxas -v on the PTX (the wheel's ptxas; no driver needed). For a
    warp-specialised kernel the registers are the launch cap; each partition's ``setmaxnreg`` moves it."""
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(src), "-o", str(src.with_suffix(".o"))],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"regs {regs.group(1) if regs else '?'}, spill stores {spill.group(1) if spill else '?'} B"


HOPPER_PATTERNS = (("wgmma", r"wgmma\.mma_async"), ("tma", r"cp\.async\.bulk\.tensor"), ("mbarrier", r"mbarrier\."),
                   ("bar.sync", r"bar\.sync"), ("tanh.approx", r"tanh\.approx"), ("ex2.approx", r"ex2\.approx"),
                   ("setmaxnreg", r"setmaxnreg"))


def hopper_counts(ptx: str) -> dict[str, int]:
    """How many of each Hopper instruction (and the softmax's MUFU ops) the PTX holds."""
    return {name: len(re.findall(pat, ptx)) for name, pat in HOPPER_PATTERNS}


def report(kernel, label: str, dump: pathlib.Path | None, stem: str) -> None:
    """One line per compiled variant (shared memory, registers, spills, instruction counts); with ``dump``,
    its TTGIR and PTX written there as ``stem``.ttgir / .ptx."""
    ptx = kernel.asm["ptx"]
    print(f"{label}: smem {kernel.metadata.shared} B, {ptxas_report(ptx)}, {hopper_counts(ptx)}", flush=True)
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{stem}.ttgir").write_text(kernel.asm["ttgir"])
        (dump / f"{stem}.ptx").write_text(ptx)


VARIANTS = {
    "plain": {}, "causal": {"HAS_RIGHT": True}, "window": {"HAS_LEFT": True, "HAS_RIGHT": True},
    "varlen-causal": {"IS_VARLEN": True, "HAS_RIGHT": True}, "softcap": {"SOFTCAP": True},
    "alibi": {"HAS_ALIBI": True}, "all": {f: True for f in FLAGS},
}
# The forward's variants: the backward has no dropout.
FWD_VARIANTS = {**VARIANTS, "softcap-fixed-max": {"SOFTCAP": 2}, "dropout": {"DROPOUT": True},
                "dropout-causal": {"DROPOUT": True, "HAS_RIGHT": True}, "alibi-sides": {"HAS_ALIBI": 2},
                "alibi-sides-causal": {"HAS_ALIBI": 2, "HAS_RIGHT": True}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=pathlib.Path)
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--variants", default=",".join(FWD_VARIANTS))
    ap.add_argument("--overlap", action="store_true", help="also the other loop (overlapped or not)")
    ap.add_argument("--config", help="FwdConfig.parse's text instead of the shipped table")
    ap.add_argument("--sched", action="store_true", help="the kernel the host routes dense whole tiles to")
    ap.add_argument("--page", type=int, default=0, help="over a paged cache of this page size (varlen queries)")
    args = ap.parse_args()
    config = FwdConfig.parse(args.config) if args.config else None
    for d in (int(x) for x in args.headdims.split(",")):
        cfg = config or (PAGED_CONFIGS[d] if args.page else _CONFIGS[d])
        base = cfg.overlap
        for name in args.variants.split(","):
            for dtype, overlap in ((torch.bfloat16, base), (torch.float16, base), (torch.bfloat16, not base)):
                if overlap != base and not args.overlap or dtype == torch.float16 and name != "plain":
                    continue
                k = compile_variant(d, dtype, overlap, config, args.sched, args.page, **FWD_VARIANTS[name])
                page = f" page={args.page}" if args.page else ""
                report(k, f"d={d}{page} {name} {str(dtype)[6:]} overlap={overlap}", args.dump,
                       f"d{d}_{name}_{str(dtype)[6:]}_{'ovl' if overlap else 'v1'}")


if __name__ == "__main__":
    main()
