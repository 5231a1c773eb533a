"""Decode tuning sweep: the bench's shapes (GQA 32/8, d = 128, bf16, batch x KV length = 256k tokens), one
process, medians of triton.testing.do_bench, TB/s of K + V read.

Stage A times every (BLOCK_N, num_warps, num_stages) in CONFIGS for the contiguous and the paged (block 16)
cache at the heuristic split count; stage B sweeps the split count with each layout's two best configs (and
the default's). Beside them: the device copy ceiling and sdpa-cudnn on the same inputs. Every variant's output is
checked against sdpa's before it is timed. Writes JSON to argv[1] if given; prints a short table last.
"""

import json
import math
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ioattn.bench.decode import _paged
from ioattn.ops.decode import _decode, choose_num_splits, decode_tiles

TOKENS, NHEADS, NHEADS_K, D = 1 << 18, 32, 8, 128
SEQLENS = (1024, 4096, 16384, 65536)
CONFIGS = [(32, 4, 3), (32, 4, 4), (32, 4, 2), (32, 2, 3), (64, 4, 2), (64, 2, 2), (16, 4, 3), (16, 4, 4),
           (64, 4, 3)]
SPLITS = {1024: (1, 2), 4096: (1, 2, 3, 4), 16384: (2, 3, 4, 5, 6, 8), 65536: (8, 12, 16, 20, 21, 32, 48, 64)}
dev = torch.device("cuda")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_ceiling():
    src = torch.randn(1 << 29, device=dev, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / bench(lambda: dst.copy_(src)) * 1e-9


copy_tbps = copy_ceiling()

results = {"device": torch.cuda.get_device_name(), "copy_tbps": copy_tbps, "cudnn": {}, "A": [], "B": []}
gen = torch.Generator(device=dev).manual_seed(0)
cases = {}
for n in SEQLENS:
    batch = TOKENS // n
    q = torch.randn(batch, 1, NHEADS, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, n, NHEADS_K, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2).float()

        def cudnn(qt=qt, kt=kt, vt=vt):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        ms = bench(cudnn)
    kv_bytes = 2 * k.numel() * 2
    results["cudnn"][n] = kv_bytes / ms * 1e-9
    seqlens = torch.full((batch,), n, dtype=torch.int32, device=dev)
    cases[n] = (q, {"contig": (k, v, None), "paged": _paged(k, v, gen)}, seqlens, ref, kv_bytes)


def run(n, layout, splits, tiles):
    q, caches, seqlens, ref, kv_bytes = cases[n]
    kc, vc, table = caches[layout]

    def fn():
        return _decode(q, kc, vc, seqlens, table, None, None, None, None, 0, D ** -0.5, -1, -1, 0.0,
                       False, False, splits, tiles=tiles)
    err = (fn()[0].float() - ref).abs().max().item()
    if not err < 3e-2:
        raise AssertionError(f"{layout} n={n} splits={splits} tiles={tiles}: max |diff| {err}")
    return kv_bytes / bench(fn) * 1e-9


def heuristic(n):
    return choose_num_splits(dev, TOKENS // n, NHEADS, NHEADS_K, 1, n, D)


for layout in ("contig", "paged"):
    for bn, warps, stages in CONFIGS:
        for n in SEQLENS:
            tbps = run(n, layout, heuristic(n), (16, bn, warps, stages))
            results["A"].append({"layout": layout, "block_n": bn, "warps": warps, "stages": stages,
                                 "seqlen": n, "splits": heuristic(n), "tbps": tbps})
            print(f"A {layout:6s} bn={bn:3d} w={warps} s={stages} n={n:5d} splits={heuristic(n):2d} "
                  f"{tbps:.3f} TB/s", flush=True)


def gmean(rows):
    return math.exp(sum(math.log(r["tbps"]) for r in rows) / len(rows))


best = {}
for layout in ("contig", "paged"):
    scores = {c: gmean([r for r in results["A"] if r["layout"] == layout
                        and (r["block_n"], r["warps"], r["stages"]) == c]) for c in CONFIGS}
    best[layout] = sorted(scores, key=scores.get, reverse=True)[:2]
default = decode_tiles(dev, NHEADS // NHEADS_K, D)[1:]
for layout in ("contig", "paged"):
    for cfg in dict.fromkeys([*best[layout], default]):
        for n in SEQLENS:
            for splits in SPLITS[n]:
                tbps = run(n, layout, splits, (16, *cfg))
                results["B"].append({"layout": layout, "config": cfg, "seqlen": n, "splits": splits,
                                     "tbps": tbps})
                print(f"B {layout:6s} cfg={cfg} n={n:5d} splits={splits:2d} {tbps:.3f} TB/s", flush=True)

if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1, default=str)

print(f"\ncopy {copy_tbps:.2f} TB/s; default tiles {default}; best {best}")
print("A (heuristic splits), TB/s at 1k/4k/16k/64k:")
for layout in ("contig", "paged"):
    for c in CONFIGS:
        vals = [r["tbps"] for r in results["A"] if r["layout"] == layout
                and (r["block_n"], r["warps"], r["stages"]) == c]
        print(f"  {layout:6s} {c}: " + " ".join(f"{x:.2f}" for x in vals))
print("B best splits per length:")
for layout in ("contig", "paged"):
    for cfg in dict.fromkeys([*best[layout], default]):
        line = []
        for n in SEQLENS:
            rows = [r for r in results["B"] if r["layout"] == layout and r["config"] == cfg and r["seqlen"] == n]
            top = max(rows, key=lambda r: r["tbps"])
            line.append(f"{n // 1024}k: {top['tbps']:.2f}@{top['splits']}")
        print(f"  {layout:6s} {cfg}: " + ", ".join(line))
print("cudnn: " + " ".join(f"{results['cudnn'][n]:.2f}" for n in SEQLENS))
