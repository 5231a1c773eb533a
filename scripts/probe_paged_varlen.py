"""Time ``flash_attn_varlen_func`` with ``block_table`` (packed queries over a paged KV cache) against the same
call on the keys gathered into a contiguous packed run (the dense varlen kernels), for a few continuous-batching
steps: decode rows only, a prefill chunk beside decode rows, prefill only. The paged call also runs on each of
routes forced (``ops.decode.paged_varlen_route``): the split-KV decode kernel alone, the Gluon forward's paged
tiles alone, and both ("mixed": the short sequences on the first, the rest on the tiles; also with a program a
tile instead of one an SM). bf16, d = 128, GQA 32 / 8, pages of 16
tokens (``--page``) in shuffled order. Prints a table of microseconds and TFLOPs/s (causal FLOPs of the allowed pairs).

    PYTHONPATH=src python scripts/probe_paged_varlen.py [--json out.json] [--tiles "128,64,8,2|64,64,4,2"]

``--tiles``: the paged call again with the portable decode kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages)
forced, one column each (``ops.decode._decode``'s ``tiles``); ``--splits "2,4"``: likewise with the key split
count forced (the rule's own count is the first column's); ``--short "16:16,32:32"``: the mixed route again
with ``ops.decode.SHORT_PACKED_ROWS`` and ``WIDE_PACKED_ROWS`` (a sequence's packed rows at most for the split-KV
half, which are its tile's rows, without and with multi-row sequences beside the longest) at each pair.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

import ioattn
from ioattn.ops import decode as decode_ops

STEPS = {
    "decode 64 x 4k": [(1, 4096)] * 64,
    "prefill 512 + decode 32 x 4k": [(512, 4096)] + [(1, 4096)] * 32,
    "prefill 4 x 2k": [(2048, 2048)] * 4,
    "prefill 1k + decode 15 x 8k": [(1024, 1024)] + [(1, 8192)] * 15,
    "chunks 16 x 128 over 4k": [(128, 4096)] * 16,
    "chunks 32 x 64 over 4k": [(64, 4096)] * 32,
    "prefill 2 x 8k": [(8192, 8192)] * 2,
    "prefill 2k + decode 3 x 4k": [(2048, 2048)] + [(1, 4096)] * 3,
    "prefill 4 x 512 + decode 48 x 4k": [(512, 4096)] * 4 + [(1, 4096)] * 48,
    "prefill 512 + verify 32 x 4 over 4k": [(512, 4096)] + [(4, 4096)] * 32,
    "prefill 512 + verify 32 x 8 over 4k": [(512, 4096)] + [(8, 4096)] * 32,
    "prefill 512 + chunks 16 x 16 over 4k": [(512, 4096)] + [(16, 4096)] * 16,
}


def _case(lens, nheads=32, nheads_k=8, d=128, page=16, dtype=torch.bfloat16):
    pages_per = [-(-nk // page) for _, nk in lens]
    num_blocks = sum(pages_per)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    table = torch.zeros(len(lens), max(pages_per), dtype=torch.int32, device="cuda")
    at = 0
    for b, n in enumerate(pages_per):
        table[b, :n] = perm[at:at + n]
        at += n
    k_cache = torch.randn(num_blocks, page, nheads_k, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(nq for nq, _ in lens), nheads, d, device="cuda", dtype=dtype)
    cu_q = torch.tensor([0, *torch.tensor([nq for nq, _ in lens]).cumsum(0).tolist()], dtype=torch.int32,
                        device="cuda")
    cu_k = torch.tensor([0, *torch.tensor([nk for _, nk in lens]).cumsum(0).tolist()], dtype=torch.int32,
                        device="cuda")
    rows = torch.cat([table[b, torch.arange(nk, device="cuda") // page].long() for b, (_, nk) in enumerate(lens)])
    offs = torch.cat([torch.arange(nk, device="cuda") % page for _, nk in lens])
    return q, k_cache, v_cache, cu_q, cu_k, table, rows, offs


def _time_step(lens, tiles=(), splits=(), page=16, graph=False, shorts=()) -> tuple[list[float], float, list[float]]:
    """(microseconds of the paged call, the call on the gathered keys, gather + that call, the paged call on
    the split-KV kernel, on the Gluon tiles, on both (mixed, then mixed with a program a tile), then with each
    of ``tiles`` and ``splits``, then mixed with each of ``shorts`` as (``SHORT_PACKED_ROWS``,
    ``WIDE_PACKED_ROWS``); causal FLOPs; with
    ``graph`` the calls' host microseconds, and the times are CUDA graph replays)."""
    q, k_cache, v_cache, cu_q, cu_k, table, rows, offs = _case(lens, page=page)
    max_q, max_k = max(nq for nq, _ in lens), max(nk for _, nk in lens)
    k_flat, v_flat = k_cache[rows, offs], v_cache[rows, offs]
    flops = sum(4 * 128 * 32 * sum(min(nk, nk - nq + i + 1) for i in range(nq)) for nq, nk in lens)

    def paged():
        return ioattn.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, causal=True,
                                             block_table=table)

    def contig(k=k_flat, v=v_flat):
        return ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)

    def gather():
        return contig(k_cache[rows, offs], v_cache[rows, offs])

    def routed(route: str, persistent: bool | None = None):
        def call():
            saved = decode_ops.paged_varlen_route, decode_ops.gluon_paged_prefill
            decode_ops.paged_varlen_route = lambda *args: route
            decode_ops._PAGED_PLANS.enabled = False  # plans do not see the patched route
            if persistent is not None:
                decode_ops.gluon_paged_prefill = lambda *a, **k: saved[1](*a, **k, persistent=persistent)
            try:
                return paged()
            finally:
                decode_ops.paged_varlen_route, decode_ops.gluon_paged_prefill = saved
                decode_ops._PAGED_PLANS.enabled = True
        return call

    def short_rows(packed: int, wide: int):
        def call():
            saved = decode_ops.SHORT_PACKED_ROWS, decode_ops.WIDE_PACKED_ROWS
            decode_ops.SHORT_PACKED_ROWS, decode_ops.WIDE_PACKED_ROWS = packed, wide
            try:
                return routed("mixed")()
            finally:
                decode_ops.SHORT_PACKED_ROWS, decode_ops.WIDE_PACKED_ROWS = saved
        return call

    def forced(t, n=0):
        return lambda: decode_ops._decode(q, k_cache, v_cache, cu_k[1:] - cu_k[:-1], table, None, None, None, None,
                                          0, 128 ** -0.5, -1, 0, 0.0, True, False, n, tiles=t, cu_seqlens_q=cu_q,
                                          max_seqlen_q=max_q)[0]

    assert decode_ops.gluon_paged_prefill_supported(q, k_cache, v_cache, None, 128 ** -0.5, 0.0), "no Gluon tiles"
    calls = [paged, contig, gather, routed("split"), routed("tiles"), routed("mixed"), routed("mixed", False),
             *(forced(t) for t in tiles),
             *(forced(None, n) for n in splits), *(short_rows(*n) for n in shorts)]
    with torch.no_grad():
        for f in calls[1:]:
            torch.testing.assert_close(paged(), f(), rtol=2e-2, atol=2e-2)
        if graph:  # the kernels' time alone: each call replayed from a CUDA graph; the host's time apart
            host = [_host_us(f) for f in calls]
            calls = [_graphed(f) for f in calls]
        return [triton.testing.do_bench(f, warmup=50, rep=300) * 1e3 for f in calls], flops, host if graph else []


def _graphed(f):
    f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        f()
    return g.replay


def _host_us(f, n=30) -> float:
    """Microseconds of host time a call (its launches queue behind nothing: the loop is short)."""
    f()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        f()
    took = time.perf_counter() - start
    torch.cuda.synchronize()
    return took / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--tiles", default="")
    parser.add_argument("--splits", default="")
    parser.add_argument("--steps", default="", help="comma-separated step names (default: all)")
    parser.add_argument("--page", type=int, default=16, help="tokens a page")
    parser.add_argument("--short", default="",
                        help="SHORT:WIDE pairs (SHORT_PACKED_ROWS:WIDE_PACKED_ROWS) for the mixed route")
    parser.add_argument("--graph", action="store_true",
                        help="time CUDA graph replays (the kernels alone) and print each call's host time")
    args = parser.parse_args()
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles.split("|") if t]
    splits = [int(n) for n in args.splits.split(",") if n]
    shorts = [tuple(int(x) for x in n.split(":")) for n in args.short.split(",") if n]
    steps = {n: v for n, v in STEPS.items() if not args.steps or n in args.steps.split(",")}
    results = []
    print(f"{'step':32} {'paged us':>9} {'TF/s':>6} {'contig us':>9} {'TF/s':>6} {'gather+contig us':>16}"
          f" {'split-KV us':>11} {'Gluon us':>9} {'mixed us':>9} {'mixed/grid':>10}"
          + "".join(f" {str(t):>16}" for t in tiles) + "".join(f" {f'splits {n}':>16}" for n in splits)
          + "".join(f" {f'short {n[0]}:{n[1]}':>16}" for n in shorts))
    for name, lens in steps.items():
        t, flops, host = _time_step(lens, tiles, splits, args.page, args.graph, shorts)
        row = {"step": name, "paged_us": t[0], "contig_us": t[1], "gather_contig_us": t[2],
               "paged_tflops": flops / t[0] / 1e6, "contig_tflops": flops / t[1] / 1e6,
               "split_kv_us": t[3], "gluon_us": t[4], "mixed_us": t[5], "mixed_grid_us": t[6],
               "tiles_us": {str(tt): us for tt, us in zip(tiles, t[7:7 + len(tiles)], strict=True)},
               "splits_us": {n: us for n, us in zip(splits, t[7 + len(tiles):7 + len(tiles) + len(splits)],
                                                    strict=True)},
               "short_us": {f"{n[0]}:{n[1]}": us
                            for n, us in zip(shorts, t[7 + len(tiles) + len(splits):], strict=True)}}
        row["page"] = args.page
        row["graph"] = args.graph
        row["host_us"] = host
        results.append(row)
        print(f"{name:32} {t[0]:9.1f} {row['paged_tflops']:6.0f} {t[1]:9.1f} {row['contig_tflops']:6.0f} {t[2]:16.1f}"
              f" {t[3]:11.1f} {t[4]:9.1f} {t[5]:9.1f} {t[6]:10.1f}" + "".join(f" {us:16.1f}" for us in t[7:]))
        if host:
            print(f"{'  host us a call':32} {host[0]:9.1f} {'':6} {host[1]:9.1f} {'':6} {host[2]:16.1f} {host[3]:11.1f}"
                  f" {host[4]:9.1f} {host[5]:9.1f} {host[6]:10.1f}" + "".join(f" {us:16.1f}" for us in host[7:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
