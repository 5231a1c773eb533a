"""Decode tuning sweep: the bench's shapes (GQA 32/8, d = 128, bf16, batch x KV length = 256k tokens), one
process, medians of triton.testing.do_bench, TB/s of K + V read.

Every variant runs on the same inputs as sdpa-cudnn, contiguous and paged (block 16), in ROUNDS interleaved
rounds (each round times every variant once); the table shows the median over rounds and, against cuDNN,
the median of the per-round ratios. Variants: ``v3`` is the library's default path; the others change one
knob of it (tiles, split count). With ``--baseline DIR`` holding the previous kernels (``decode_v2.py``,
``combine_v2.py``: a combine program per 32 heads looping over the splits), ``v2`` times them too. Every
variant's output is checked against cuDNN's before it is timed. Writes JSON to the first argument if given;
prints a short table last.
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

from ioattn.bench.decode import _paged
from ioattn.ops.decode import LOG2E, _decode, choose_num_splits, decode_tiles

TOKENS, NHEADS, NHEADS_K, D = 1 << 18, 32, 8, 128
SEQLENS = (1024, 4096, 16384, 65536)
ROUNDS = 5
TILES = [(16, 32, 4, 4), (16, 64, 4, 2)]  # beside the default (16, 32, 4, 3): (BLOCK_M, BLOCK_N, warps, stages)
dev = torch.device("cuda")

parser = argparse.ArgumentParser()
parser.add_argument("json", nargs="?")
parser.add_argument("--baseline", type=Path, default=None)
args = parser.parse_args()


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def v2_decode(q, kc, vc, seqlens, table, splits):
    """The previous launch for the plain case: one program per (batch, KV head, split), 32-head combine."""
    batch, seqlen_q, nheads, headdim = q.shape
    nheads_k = kc.shape[2]
    block_m, block_n, warps, stages = decode_tiles(q.device, nheads // nheads_k, headdim)
    out = q.new_empty(q.shape)
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    if splits > 1:
        out_part = torch.empty(splits, *q.shape, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(splits, batch, seqlen_q, nheads, dtype=torch.float32, device=q.device)
        o_strides = out_part.stride()[:4]
        l_strides = (lse_part.stride(0), lse_part.stride(1), lse_part.stride(3), lse_part.stride(2))
    else:
        out_part, lse_part = out, lse
        o_strides, l_strides = (0, *out.stride()[:3]), (0, *lse.stride())
    paged = table is not None
    v2.decode_kernel[(batch * nheads_k, 1, splits)](
        q, kc, vc, out_part, lse_part, seqlens, table if paged else seqlens, seqlens, seqlens, seqlens, seqlens,
        q.stride(0), q.stride(1), q.stride(2), *kc.stride()[:3], *vc.stride()[:3], *o_strides, *l_strides,
        table.stride(0) if paged else 0, 0, 0, nheads_k, seqlen_q, 0, splits, headdim ** -0.5 * LOG2E, 0.0, -1, -1,
        GROUP=nheads // nheads_k, HEADDIM=headdim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=headdim,
        PAGED=paged, PAGE_SIZE=kc.shape[1] if paged else 1, HAS_BATCH_IDX=False, SOFTCAP=False,
        HAS_ALIBI=False, HAS_LEFT=False, HAS_RIGHT=False, ROTARY_DIM=0, ROTARY_INTERLEAVED=False,
        ROTARY_PER_ROW=False, PRECISION="tf32", num_warps=warps, num_stages=stages)
    if splits > 1:
        block_h = min(triton.next_power_of_2(nheads), 4096 // headdim)
        v2c.combine_kernel[(batch * seqlen_q, triton.cdiv(nheads, block_h))](
            out_part, lse_part, out, lse, *out_part.stride()[:4], *lse_part.stride(),
            out.stride(0), out.stride(1), out.stride(2), *lse.stride(), seqlen_q, nheads, splits,
            HEADDIM=headdim, BLOCK_H=block_h, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=headdim,
            num_warps=4)
    return out, lse


v2 = v2c = None
if args.baseline is not None:
    v2 = load(args.baseline / "decode_v2.py", "decode_v2")
    v2c = load(args.baseline / "combine_v2.py", "combine_v2")


def variants(n, layout):
    """name -> (splits, tiles or None, v2?) for this length and layout."""
    paged = layout == "paged"
    splits = choose_num_splits(dev, TOKENS // n, NHEADS, NHEADS_K, 1, n, D, paged=paged)
    out = {"v3": (splits, None, False)}
    if v2 is not None:
        out["v2"] = (splits, None, True)
    for tiles in TILES:
        out[f"v3-tiles={tiles[1:]}"] = (splits, tiles, False)
    if n >= 16384:  # three and four programs per SM
        for alt in {16384: (3, 4), 65536: (12, 16)}[n]:
            if alt != splits:
                out[f"v3-splits={alt}"] = (alt, None, False)
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
        for name, (splits, tiles, old) in variants(n, layout).items():
            if old:
                fn = (lambda q=q, kc=kc, vc=vc, seqlens=seqlens, table=table, splits=splits:
                      v2_decode(q, kc, vc, seqlens, table, splits))
            else:
                fn = (lambda q=q, kc=kc, vc=vc, seqlens=seqlens, table=table, splits=splits, tiles=tiles:
                      _decode(q, kc, vc, seqlens, table, None, None, None, None, 0, D ** -0.5, -1, -1, 0.0,
                              False, False, splits, tiles=tiles))
            err = (fn()[0].float() - ref).abs().max().item()
            if not err < 3e-2:
                raise AssertionError(f"{layout} n={n} {name}: max |diff| {err}")
            fns[(name, layout)] = fn
    times = {key: [] for key in fns}
    for _ in range(ROUNDS):
        for key, fn in fns.items():
            times[key].append(bench(fn))
    for (name, layout), ms in times.items():
        ratios = [c / t for c, t in zip(times[("cudnn", "-")], ms, strict=True)]
        row = {"seqlen": n, "layout": layout, "variant": name, "ms": ms,
               "tbps": kv_bytes / statistics.median(ms) * 1e-9, "vs_cudnn": statistics.median(ratios)}
        results["rows"].append(row)
        print(f"n={n:5d} {layout:6s} {name:18s} {row['tbps']:.3f} TB/s  {row['vs_cudnn']:.3f} x cuDNN  "
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
    print(f"  {layout:6s} {name:18s} " + "  ".join(cells))
