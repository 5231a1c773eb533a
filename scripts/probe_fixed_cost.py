"""What a tile (forward) or a key block (backward) costs beyond its products: time the Gluon kernels on
two-sided windows of several widths at one seqlen (the same tiles and key blocks each time, only the blocks a
tile visits change), and fit time = a + b x (blocks visited) by least squares. With every program the same
length, a / b, divided by the waves, is the fixed cost of a tile in units of one block's products (the
intercept also holds the launch and the last wave's imbalance, equal across widths).

Shapes are the features bench's: bf16, 16k tokens, hidden 2048. Blocks visited are counted from the
geometry (128-row forward tiles over 128-key blocks; backward key blocks of 128 over the config's query
steps), rounded out to whole blocks as the kernels do.

    PYTHONPATH=src python scripts/probe_fixed_cost.py [--headdims 64,128] [--seqlens 4096,16384] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton

from ioattn import flash_attn_func
from ioattn.kernels.attn_bwd_gluon import select_config

TOKENS, HIDDEN = 16384, 2048


def visits(seqlen: int, w: int, rows: int, cols: int, align: int) -> float:
    """Blocks of ``cols`` visited by all tiles of ``rows`` under a (w, w) window (w < 0: none): from the
    tile's first allowed one rounded down to a multiple of ``align``, to its last rounded up to one (the d = 64
    forward starts and ends bands on half blocks)."""
    total = 0
    for start in range(0, seqlen, rows):
        end = min(start + rows, seqlen)
        if w < 0:
            lo, hi = 0, seqlen
        else:
            lo, hi = max(0, start - w), min(seqlen, end - 1 + w + 1)
        lo = lo // align * align
        total += -(-(hi - lo) // align) * align / cols
    return total


def time_cell(d: int, seqlen: int, w: int, direction: str, rounds: int) -> float:
    batch, nheads = TOKENS // seqlen, HIDDEN // d
    q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    kw = {"window_size": (w, w)} if w >= 0 else {}
    if direction == "fwd":
        def fn():
            with torch.no_grad():
                return flash_attn_func(q, k, v, **kw)
    else:
        out = flash_attn_func(q, k, v, **kw)
        dout = torch.randn_like(out)

        def fn():
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return statistics.median(triton.testing.do_bench(fn, warmup=25, rep=100) for _ in range(rounds))


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for d in (int(x) for x in args.headdims.split(",")):
        for s in (int(x) for x in args.seqlens.split(",")):
            widths = [s // 32, s // 16, s // 8, s // 4, s // 2, -1]
            for direction in ("fwd", "bwd"):
                if direction == "fwd":  # d = 64: 64-row tiles, bands on half blocks; else 128-row tiles
                    rows_, cols, align = (64, 128, 64) if d == 64 else (128, 128, 128)
                else:
                    cfg = select_config(d, False, False)
                    rows_, cols, align = cfg.block_n, cfg.block_m, cfg.block_m
                tiles = TOKENS // rows_ * (HIDDEN // d)
                xs, ys = [], []
                for w in widths:
                    n = visits(s, w, rows_, cols, align) * (TOKENS // s) * (HIDDEN // d)
                    ms = time_cell(d, s, w, direction, args.rounds)
                    xs.append(n)
                    ys.append(ms)
                    print(f"{direction} d={d} s={s} w={w:6d}: blocks {n:9.0f} ({n / tiles:5.1f} a tile) {ms:.4f} ms",
                          flush=True)
                a, b = fit(xs[:-1], ys[:-1])  # the windows; plain checks the line
                waves = tiles / sms
                fixed = a / b / tiles
                pred = a + b * xs[-1]
                print(f"  fit over the windows: {a * 1e3:.1f} us + {b * 1e6:.3f} ns a block; fixed cost a tile "
                      f"~{fixed:.2f} blocks ({waves:.1f} waves); plain predicted {pred:.4f} ms, measured "
                      f"{ys[-1]:.4f}", flush=True)
                rows.append({"pass": direction, "headdim": d, "seqlen": s, "widths": widths, "blocks": xs,
                             "ms": ys, "intercept_ms": a, "ms_per_block": b, "fixed_blocks": fixed})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
