"""Compile the backward's kernels for sm_90 without a GPU: the portable single pass with dQ over
candidate configs, (``--dq``) the two-pass dQ kernel's shipped rows with softcap, or (``--gluon``) the Gluon
backward over its feature variants.

For each: compile through TTGIR to PTX (ptxas ships in the Triton wheel), print shared memory, registers,
spills and the Hopper instructions that must be there (wgmma, the TMA reduce-add
``cp.reduce.async.bulk.tensor`` or fp32 ``red`` for dQ), and ``sb-hazards``: source registers of a
variable-latency instruction overwritten before ptxas waits on the read barrier that guards them
(``scoreboard_hazards``). Used to prune configs before a GPU sweep.

    PYTHONPATH=src python scripts/compile_bwd.py [--dq | --gluon] [--headdims 64,128] [--dump DIR]

Why the scoreboard check: the bundled ptxas (CUDA 12.8) scheduled the dQ kernel at d = 48, (128, 64, 8, 2),
softcap with ``tanh.approx`` so that a cp.async (LDGSTS) had the high word of its 64-bit global address
overwritten by an IMAD ~13 cycles after issue, with no wait on the read barrier the LDGSTS had set; when the
memory pipe was busy the copy read the new word and faulted (illegal address on an H200, never under
compute-sanitizer, which serialises memory instructions). benchmarks/NOTES.md, Backward fast tanh.
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import re
import subprocess
import tempfile

import torch
import triton
from compile_gluon_fwd import FLAGS, FWD_VARIANTS, _desc_type, ptxas_report  # one reading for every report
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from ioattn.kernels.attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from ioattn.kernels.attn_bwd_gluon import (
    BwdConfig,
    attn_bwd_gluon_kernel,
    attn_bwd_gluon_wide_kernel,
    dq_descriptor,
    nested_steps,
    select_config,
)
from ioattn.kernels.launch import _CONFIGS, AttnConfig

PTR_ARGS = {"Q", "K", "V", "DOut", "DK", "DV"}
F32_PTR_ARGS = {"Lse", "Delta", "DQacc", "alibi_slopes", "Parts"}
I32_PTR_ARGS = {"cu_seqlens_q", "cu_seqlens_k", "dq_lock", "dq_done"}
FLOAT_ARGS = {"softmax_scale", "qk_scale", "softcap2", "dropout_p"}


def constexpr_defaults(kernel) -> dict:
    """The kernel's constexpr parameters that have a default (as a launch that leaves them out sets them)."""
    return {p.name: p.default for p in kernel.params if p.is_constexpr and p.default is not inspect.Parameter.empty}


def _portable_signature(kernel, consts: dict, elem_ty: str, sig: dict | None = None):
    """(signature, attributes) of a portable backward kernel as the JIT specialises a dense call whose
    pointers and strides are multiples of 16; entries already in ``sig`` stay as given."""
    sig, attrs = dict(sig or {}), {}
    for i, name in enumerate(kernel.arg_names):
        if name in sig:
            continue
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR_ARGS or name == "DQ":
            sig[name] = elem_ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in F32_PTR_ARGS:
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in I32_PTR_ARGS:
            sig[name] = "*i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed" and consts.get("DROPOUT"):  # a pointer to the call's seed (``kernel_seed``)
            sig[name] = "*i64"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "seed":  # 0: unused
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if name.startswith("stride") and not name.endswith("_ab"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _compile_portable(kernel, consts: dict, dtype, cfg: AttnConfig, sig: dict | None = None):
    ty = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    consts = {**constexpr_defaults(kernel), **consts}
    sig, attrs = _portable_signature(kernel, consts, ty, sig)
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def compile_variant(d: int, causal: bool, cfg: AttnConfig, fused: bool, dtype=torch.bfloat16):
    consts = {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
              "IS_VARLEN": False, "SOFTCAP": False, "HAS_ALIBI": False, "HAS_LEFT": False,
              "HAS_RIGHT": causal, "DROPOUT": False, "DOT_PRECISION": "tf32", "FUSED_DQ": fused,
              "DQ_TMA": fused}
    if fused:
        acc = torch.empty(4, 64, d)
        sig = {"dq_desc": mangle_type(TensorDescriptor(acc, list(acc.shape), list(acc.stride()),
                                                       [1, cfg.block_m, d]))}
    else:
        sig = {"dq_desc": "constexpr"}
        consts["dq_desc"] = None
    return _compile_portable(attn_bwd_dkdv_kernel, consts, dtype, cfg, sig)


def compile_dq_variant(d: int, causal: bool, cfg: AttnConfig, softcap: bool = True, fast_tanh: bool = True,
                       dtype=torch.bfloat16, **flags: bool):
    """The two-pass dQ kernel as the JIT specialises a dense call whose strides are multiples of 16 (flags:
    HAS_LEFT, HAS_ALIBI, DROPOUT, IS_VARLEN)."""
    consts = {"HEAD_DIM": d, "BLOCK_D": max(16, triton.next_power_of_2(d)), "BLOCK_M": cfg.block_m,
              "BLOCK_N": cfg.block_n, "IS_VARLEN": False, "SOFTCAP": softcap, "HAS_ALIBI": False,
              "HAS_LEFT": False, "HAS_RIGHT": causal, "DROPOUT": False, "DOT_PRECISION": "tf32",
              "FAST_TANH": fast_tanh, **flags}
    return _compile_portable(attn_bwd_dq_kernel, consts, dtype, cfg)


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
_NO_DEST = ("ST", "LDGSTS", "BRA", "BAR", "DEPBAR", "RED", "EXIT", "WARPSYNC", "LDGDEPBAR", "BSSY", "BSYNC",
            "NOP", "WARPGROUP", "HGMMA", "CALL", "RET", "ISETP", "FSETP", "PLOP3", "ATOMS", "FENCE", "MEMBAR",
            "ERRBAR", "CCTL", "UTMA", "SYNCS", "ARRIVES", "R2UR", "VOTEU", "DSETP", "HSETP2", "P2R")


def _sass(cubin: bytes) -> list[tuple[int, str, int, int, int]]:
    """(address, instruction, write barrier, read barrier, wait mask) from ``cuobjdump -sass``; the control
    bits sit in bits 46-57 of each instruction's second 64-bit word (7 = no barrier)."""
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = _SASS.search(line)
        if m:
            hi = int(re.search(r"/\* (0x[0-9a-f]{16}) \*/", lines[i + 1]).group(1), 16)
            out.append((int(m.group(1), 16), m.group(2), (hi >> 46) & 7, (hi >> 49) & 7, (hi >> 52) & 0x3F))
    return out


def _regs(tok: str, n: int = 1) -> set[int]:
    m = re.search(r"(?<![A-Z])R(\d+)(\.64)?", tok)
    if not m or int(m.group(1)) == 255:
        return set()
    r = int(m.group(1))
    return set(range(r, r + (2 if m.group(2) else n)))


def _dest_and_sources(ins: str) -> tuple[str, set[int], set[int]]:
    body = re.sub(r"^@!?U?P\w+\s+", "", ins)
    op, _, rest = body.partition(" ")
    ops = [x.strip() for x in re.split(r",(?![^\[]*\])", rest)] if rest else []
    if op.startswith(("HGMMA", "WARPGROUP")):  # wgmma registers: ordered by WARPGROUP.ARRIVE / DEPBAR
        return op, set(), set()
    wide = 4 if (".128" in op or ".M88.4" in op) else 2 if (".64" in op or ".M88.2" in op) else 1
    dest: set[int] = set()
    srcs = ops
    if ops and not op.startswith(_NO_DEST) and not op.startswith("U"):
        dest = _regs(ops[0], wide if op.startswith(("LD", "MUFU", "S2R", "SHFL")) else 2 if "WIDE" in op else 1)
        srcs = ops[1:]
    src: set[int] = set()
    for t in srcs:
        if t.startswith("["):
            for m in re.finditer(r"(?<![A-Z])R\d+(?:\.64)?", t):
                src |= _regs(m.group(0))
        else:
            src |= _regs(t, wide if op.startswith(("ST", "RED", "ATOM")) else 1)
    return op, dest, src


def scoreboard_hazards(cubin: bytes) -> list[str]:
    """Reads and writes that ptxas's dependency barriers do not guard, over every path of the control flow:
    a register read or rewritten while a variable-latency instruction may still write it (RAW/WAW), or
    rewritten while one may still read it (WAR; a later load through the same in-order memory pipe is
    exempt). Wgmma registers are left to WARPGROUP.DEPBAR (not modelled)."""
    ins = _sass(cubin)
    index = {a: i for i, (a, *_) in enumerate(ins)}
    succ = []
    for i, (_, t, *_) in enumerate(ins):
        body, cond = re.sub(r"^@!?U?P\w+\s+", "", t), t.startswith("@")
        nxt = [i + 1] if i + 1 < len(ins) else []
        if body.startswith("BRA"):
            target = index.get(int(re.search(r"0x([0-9a-f]+)", body).group(1), 16))
            succ.append(([target] if target is not None else []) + (nxt if cond else []))
        elif body.startswith(("EXIT", "RET")):
            succ.append(nxt if cond else [])
        else:
            succ.append(nxt)
    state: list[frozenset | None] = [None] * len(ins)
    state[0] = frozenset()
    work, found = [0], set()
    while work:
        i = work.pop()
        addr, t, wr, rd, wait = ins[i]
        waits = {b for b in range(6) if wait >> b & 1}
        m = re.match(r"DEPBAR\.LE SB(\d), 0x0", re.sub(r"^@!?P\w+\s+", "", t))
        if m:
            waits.add(int(m.group(1)))
        live = {e for e in state[i] if e[2] not in waits}
        op, dest, src = _dest_and_sources(t)
        for kind, reg, _, who in live:
            if kind == "W" and reg in src | dest:
                found.add(f"{ins[who][0]:05x}->{addr:05x} {'RAW' if reg in src else 'WAW'} R{reg}: {ins[who][1]} | {t}")
            if kind == "R" and reg in dest and not (op.startswith(("LD", "S2R", "SHFL")) and wr != 7):
                found.add(f"{ins[who][0]:05x}->{addr:05x} WAR R{reg}: {ins[who][1]} | {t}")
        if wr != 7:
            live |= {("W", r, wr, i) for r in dest}
        if rd != 7:
            live |= {("R", r, rd, i) for r in src}
        out = frozenset(live)
        for j in succ[i]:
            new = out if state[j] is None else state[j] | out
            if new != state[j]:
                state[j] = new
                work.append(j)
    return sorted(found)


def compile_gluon_variant(d: int, config: BwdConfig | None = None, dtype=torch.bfloat16, **flags: bool):
    """flags: any of compile_gluon_fwd.FLAGS, DETERMINISTIC, DROPOUT, TAIL (default False) or SIGNAL (default:
    as shipped, on for dense inputs: the dQ conversion under the last wave)."""
    cfg = config or select_config(d, flags.get("SOFTCAP", False), flags.get("DROPOUT", False))
    consts = {"HEAD_DIM": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "NUM_STAGES": cfg.stages,
              "DQ_STAGES": cfg.dq_stages, **{f: flags.get(f, False) for f in FLAGS},
              "DETERMINISTIC": flags.get("DETERMINISTIC", False), "DROPOUT": flags.get("DROPOUT", False),
              "EARLY_MASK": bool(cfg.early_mask), "KV_REGS": cfg.kv_regs, "TAIL": flags.get("TAIL", False),
              "NESTED": nested_steps(cfg, flags.get("HAS_LEFT", False) or flags.get("HAS_RIGHT", False),
                                     flags.get("TAIL", False)),
              "SIGNAL": flags.get("SIGNAL", not flags.get("IS_VARLEN", False)), "num_warps": 4}
    return _compile_gluon_bwd(attn_bwd_gluon_kernel, d, cfg, dtype, consts)


def _compile_gluon_bwd(kernel, d: int, cfg: BwdConfig, dtype, consts: dict):
    """A Gluon backward kernel (either one) compiled for sm_90a: its signature from its argument names."""
    consts = {**constexpr_defaults(kernel), **consts}
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "dq_desc":
            sig[name] = mangle_type(dq_descriptor(torch.empty(4, 64, 2, d), cfg.block_m, d // 2, cfg.dq_swizzle).real())
        elif name.endswith("_desc"):
            sig[name] = _desc_type(dtype, cfg.block_n if name[0] in "kv" else cfg.block_m, d)
        elif name in ("DK", "DV"):
            sig[name] = "*bf16" if dtype == torch.bfloat16 else "*fp16"
        elif name in F32_PTR_ARGS:
            sig[name] = "*fp32"
        elif name in I32_PTR_ARGS:
            sig[name] = "*i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":  # with dropout a pointer to the call's seed (``kernel_seed``), else 0: unused
            sig[name] = "*i64" if consts.get("DROPOUT") else "i64"
        else:
            sig[name] = "i32"
    src = GluonASTSource(kernel, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_gluon_wide_variant(d: int, config: BwdConfig | None = None, dtype=torch.bfloat16, **flags: bool):
    """The wide (d = 256) Gluon backward; flags: any of ``WIDE_FLAGS``."""
    cfg = config or select_config(d, flags.get("SOFTCAP", False), flags.get("DROPOUT", False))
    consts = {"HEAD_DIM": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "NUM_STAGES": cfg.stages,
              "BUFS": cfg.dq_stages, **{f: flags.get(f, False) for f in WIDE_FLAGS}, "num_warps": 4}
    return _compile_gluon_bwd(attn_bwd_gluon_wide_kernel, d, cfg, dtype, consts)


WIDE_FLAGS = ("IS_VARLEN", "SOFTCAP", "HAS_ALIBI", "HAS_LEFT", "HAS_RIGHT", "DROPOUT", "DETERMINISTIC")
WIDE_VARIANTS = {"plain": {}, "causal": {"HAS_RIGHT": True}, "window": {"HAS_LEFT": True, "HAS_RIGHT": True},
                 "softcap": {"SOFTCAP": True}, "varlen-causal": {"IS_VARLEN": True, "HAS_RIGHT": True},
                 "deterministic": {"DETERMINISTIC": True},
                 "deterministic-window": {"DETERMINISTIC": True, "HAS_LEFT": True, "HAS_RIGHT": True},
                 "alibi": {"HAS_ALIBI": True}, "alibi-causal": {"HAS_ALIBI": True, "HAS_RIGHT": True},
                 "dropout": {"DROPOUT": True}, "dropout-causal": {"DROPOUT": True, "HAS_RIGHT": True},
                 "causal-softcap": {"HAS_RIGHT": True, "SOFTCAP": True}}


# The Gluon backward's variants: the forward's, and the ordered dQ of deterministic=True.
# (The forward's ALiBi split, HAS_ALIBI 2, is the forward's alone.)
BWD_VARIANTS = {**{k: v for k, v in FWD_VARIANTS.items() if not k.startswith("alibi-sides")},
                "deterministic": {"DETERMINISTIC": True},
                "deterministic-window": {"DETERMINISTIC": True, "HAS_LEFT": True, "HAS_RIGHT": True},
                "tail": {"TAIL": True}, "tail-softcap": {"TAIL": True, "SOFTCAP": True},
                "tail-dropout": {"TAIL": True, "DROPOUT": True}}


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
    ap.add_argument("--wide", action="store_true", help="the wide (d = 256) Gluon backward's variants")
    ap.add_argument("--config",
                    help="BLOCK_M,BLOCK_N,stages[,dq_stages[,early_mask[,kv_regs[,dq_swizzle]]]] for --gluon")
    ap.add_argument("--dq", action="store_true", help="the two-pass dQ kernel's rows with softcap, fast tanh")
    args = ap.parse_args()
    if args.dq:
        for d in (int(x) for x in args.headdims.split(",")):
            ceiling = 64 if d <= 64 else 128 if d <= 128 else 256
            for causal in (False, True):
                cfg = _CONFIGS[("dq", ceiling, causal)]
                for fast in (True, False):
                    k = compile_dq_variant(d, causal, cfg, fast_tanh=fast)
                    label = f"dq d={d} {tuple(vars(cfg).values())} causal={causal} softcap fast_tanh={fast}"
                    report(k, label, args.dump, f"dq_d{d}_{int(causal)}_{int(fast)}")
        return
    if args.wide:
        config = BwdConfig.parse(args.config) if args.config else None
        for name, flags in WIDE_VARIANTS.items():
            k = compile_gluon_wide_variant(256, config, **flags)
            report(k, f"gluon wide d=256 {name}", args.dump, f"gluon_wide_{name}")
        return
    if args.gluon:
        config = BwdConfig.parse(args.config) if args.config else None
        for d in (int(x) for x in args.headdims.split(",")):
            for name, flags in BWD_VARIANTS.items():
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
    hazards = scoreboard_hazards(k.asm["cubin"])
    print(f"{label}: smem {k.metadata.shared} B, {ptxas_report(ptx)}, {counts}, sb-hazards {len(hazards)}",
          flush=True)
    for h in hazards[:4]:
        print(f"    {h}")
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{stem}.ttgir").write_text(k.asm["ttgir"])
        (dump / f"{stem}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
