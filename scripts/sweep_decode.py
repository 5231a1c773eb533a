"""Decode tuning sweep: the bench's shapes (GQA 32/8, d = 128, bf16, batch x KV length = 256k tokens), one
process, medians of triton.testing.do_bench, TB/s of K + V read.

Every variant runs on the same inputs as sdpa-cudnn, contiguous and paged (block 16), in ROUNDS interleaved
rounds (each round times every variant once); the table shows the median over rounds and, against cuDNN,
the median of the per-round ratios. Variants: ``now`` is the library's default path, ``portable`` the portable
kernel at its own split rule; the others change one knob (split counts with ``--splits``; portable tile shapes
with ``--tiles``; Gluon configs with ``--gluon``, each at the Gluon rule's split count and the ``--splits``
ones). With ``--baseline FILE`` holding a previous
``kernels/decode.py`` with today's signature (e.g. ``git show HEAD~1:src/ioattn/kernels/decode.py``),
``baseline`` times that kernel through today's launcher. Every variant's output is checked against cuDNN's
before it is timed. Writes JSON to the first argument if given; prints a short table last.
"""

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn.ops.decode as ops
from ioattn.bench.decode import _paged
from ioattn.kernels.decode_gluon import DecodeConfig
from ioattn.kernels.fastlaunch import Launcher, set_plans
from ioattn.ops.decode import _decode

set_plans(False)  # the "now" rows would replay plans; a sweep times whole calls, as before plans

TOKENS, NHEADS, NHEADS_K, D = 1 << 18, 32, 8, 128
SEQLENS = (1024, 4096, 16384, 65536)
ROUNDS = 5
TILES = [(16, 32, 4, 4), (16, 64, 4, 2)]  # beside the default (16, 32, 4, 3): (BLOCK_M, BLOCK_N, warps, stages)
SPLITS = {}  # split counts beside each kernel's rule, per KV length (--splits)
dev = torch.device("cuda")

parser = argparse.ArgumentParser()
parser.add_argument("json", nargs="?")
parser.add_argument("--baseline", type=Path, default=None)
parser.add_argument("--tiles", nargs="*", default=None, metavar="M,N,WARPS,STAGES",
                    help=f"also time these tiles (no value: {TILES}), each at every split count")
parser.add_argument("--splits", nargs="*", default=None, metavar="SEQLEN:S,S",
                    help="split counts to time beside the rule's, per KV length (default: "
                         + " ".join(f"{n}:{','.join(map(str, s))}" for n, s in SPLITS.items()) + ")")
parser.add_argument("--seqlens", default=",".join(map(str, SEQLENS)))
parser.add_argument("--gluon", nargs="*", default=(), metavar="BLOCK_N,STAGES",
                    help="Gluon decode configs to time, each at the rule's and the other split counts")
parser.add_argument("--rounds", type=int, default=ROUNDS)
args = parser.parse_args()
if args.tiles is not None:
    TILES = [tuple(int(x) for x in t.split(",")) for t in args.tiles] if args.tiles else TILES
if args.splits is not None:
    SPLITS = {int(n): tuple(int(x) for x in s.split(",")) for n, s in (item.split(":") for item in args.splits)}
SEQLENS = tuple(int(n) for n in args.seqlens.split(","))


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def load_baseline(path: Path):
    """The file as a module of ``ioattn.kernels``, so its relative imports resolve as the library's do."""
    spec = importlib.util.spec_from_file_location("ioattn.kernels.decode_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decode_kernel


baseline_kernel = load_baseline(args.baseline) if args.baseline is not None else None
# The launcher ``_decode`` calls for the portable kernel (bound at import), for the baseline file's kernel.
BASELINE_LAUNCH = Launcher(baseline_kernel) if baseline_kernel is not None else None


def decode(q, kc, vc, seqlens, table, splits, tiles, kernel, gluon):
    """The library's launch (splits 0: the rule of the kernel that runs), with ``kernel`` in place of today's
    portable decode kernel when given; ``gluon`` False: the portable kernel, a DecodeConfig: the Gluon one."""
    current = ops._launch_decode
    if kernel is not None:
        ops._launch_decode = BASELINE_LAUNCH
    try:
        return _decode(q, kc, vc, seqlens, table, None, None, None, None, 0, D ** -0.5, -1, -1, 0.0, False, False,
                       splits, tiles=tiles, gluon=gluon)
    finally:
        ops._launch_decode = current


def variants(n):
    """name -> (splits, tiles or None, kernel or None, gluon) for this length."""
    out = {"now": (0, None, None, None), "portable": (0, None, None, False)}
    if baseline_kernel is not None:
        out["baseline"] = (0, None, baseline_kernel, False)
    for alt in SPLITS.get(n, ()):
        out[f"portable splits={alt}"] = (alt, None, None, False)
    for tiles in TILES if args.tiles is not None else ():
        name = "tiles=" + ",".join(map(str, tiles[1:]))
        out[name] = (0, tiles, None, False)
        for alt in SPLITS.get(n, ()):
            out[f"{name} splits={alt}"] = (alt, tiles, None, False)
    for text in args.gluon:
        cfg = DecodeConfig(*(int(x) for x in text.split(",")))
        out[f"gluon={text}"] = (0, None, None, cfg)
        for alt in SPLITS.get(n, ()):
            out[f"gluon={text} splits={alt}"] = (alt, None, None, cfg)
    return out


def copy_ceiling():
    src = torch.randn(1 << 29, device=dev, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / bench(lambda: dst.copy_(src)) * 1e-9


results = {"device": torch.cuda.get_device_name(), "copy_tbps": copy_ceiling(), "rows": []}
gen = torch.Generator(device=dev).manual_seed(0)
for n in SEQLENS:
    batch = TOKENS // n
    q = torch.randn(batch, 1, NHEADS, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, n, NHEADS_K, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def cudnn(qt=qt, kt=kt, vt=vt):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    ref = cudnn().transpose(1, 2).float()
    kv_bytes = 2 * k.numel() * 2
    seqlens = torch.full((batch,), n, dtype=torch.int32, device=dev)
    caches = {"contig": (k, v, None), "paged": _paged(k, v, gen)}
    fns = {("cudnn", "-"): cudnn}
    for layout, (kc, vc, table) in caches.items():
        for name, (splits, tiles, kernel, gluon) in variants(n).items():
            fn = (lambda q=q, kc=kc, vc=vc, seqlens=seqlens, table=table, splits=splits, tiles=tiles, kernel=kernel,
                  gluon=gluon: decode(q, kc, vc, seqlens, table, splits, tiles, kernel, gluon))
            err = (fn()[0].float() - ref).abs().max().item()
            if not err < 3e-2:
                raise AssertionError(f"{layout} n={n} {name}: max |diff| {err}")
            fns[(name, layout)] = fn
    times = {key: [] for key in fns}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            times[key].append(bench(fn))
    for (name, layout), ms in times.items():
        ratios = [c / t for c, t in zip(times[("cudnn", "-")], ms, strict=True)]
        row = {"seqlen": n, "layout": layout, "variant": name, "ms": ms,
               "tbps": kv_bytes / statistics.median(ms) * 1e-9, "vs_cudnn": statistics.median(ratios)}
        results["rows"].append(row)
        print(f"n={n:5d} {layout:6s} {name:26s} {row['tbps']:.3f} TB/s  {row['vs_cudnn']:.3f} x cuDNN  "
              f"spread {(max(ms) - min(ms)) / statistics.median(ms):.1%}", flush=True)
    del q, k, v, caches, fns
    torch.cuda.empty_cache()

if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)

print(f"\ncopy {results['copy_tbps']:.2f} TB/s; TB/s (x cuDNN, median of per-round ratios) at 1k/4k/16k/64k")
keys = dict.fromkeys((r["layout"], r["variant"]) for r in results["rows"])
for layout, name in sorted(keys):
    cells = []
    for n in SEQLENS:
        row = next((r for r in results["rows"] if (r["layout"], r["variant"], r["seqlen"]) == (layout, name, n)),
                   None)
        cells.append(f"{row['tbps']:.2f} ({row['vs_cudnn']:.3f})" if row else "-")
    print(f"  {layout:6s} {name:26s} " + "  ".join(cells))
