"""Probe: does a paged decode read faster when a program streams whole pages (all KV heads of a page, 32 KB
contiguous at block 16) instead of one KV head's 256-byte rows strided by 2 KB?

Load-only kernels (no products, no softmax: a running bf16 max of every K and V element, one value stored
per program) over the decode suite's caches (bf16, d = 128, 8 KV heads, batch x KV length = 256k, pages of
16 tokens shuffled as the bench shuffles them), with HEADS KV heads per program (a [16, HEADS * 128] tile a
page), against sdpa-cudnn and ioattn's shipped paged and contiguous decode on the same inputs; interleaved
rounds, do_bench medians, TB/s of K + V and x cuDNN. If HEADS = 8 streams clearly (>= 2%) above HEADS = 1 and
above cuDNN, a decode kernel whose programs own whole pages is worth building.

    PYTHONPATH=src python scripts/probe_decode_pages.py [--seqlens 1024,4096,16384,65536] [--rounds 5]
"""

import argparse
import statistics

import torch
import triton
import triton.language as tl
from decode_probe import inputs, peers

NHEADS_K, D, PAGE = 8, 128, 16  # the decode suite's KV heads and head dim (decode_probe.inputs), pages


@triton.jit
def _stream(k_ptr, v_ptr, table_ptr, out_ptr, pages_per_seq, pages_per_split, stride_p, stride_t,
            n_groups, PAGED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Program (batch * n_groups + group, split): the pages [split * pages_per_split, +pages_per_split) of
    its sequence, columns [group * COLS, + COLS) of each 16-token page (HEADS heads' rows side by side)."""
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // n_groups
    col0 = (bg % n_groups) * COLS
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    acc = tl.full([ROWS, COLS], float("-inf"), tl.float32).to(tl.bfloat16)
    p0 = split * pages_per_split
    p1 = tl.minimum(p0 + pages_per_split, pages_per_seq)
    for p in range(p0, p1):
        if PAGED:
            page = tl.load(table_ptr + b * pages_per_seq + p).to(tl.int64)
            base = page * stride_p
        else:
            base = b.to(tl.int64) * pages_per_seq * stride_p + p * stride_p
        offs = base + rows[:, None] * stride_t + col0 + cols[None, :]
        acc = tl.maximum(acc, tl.load(k_ptr + offs)).to(tl.bfloat16)
        acc = tl.maximum(acc, tl.load(v_ptr + offs)).to(tl.bfloat16)
    tl.store(out_ptr + bg * tl.num_programs(1) + split, tl.max(tl.max(acc, 1), 0))


def stream_fn(k, v, table, heads: int, warps: int, stages: int, programs_target: int):
    """A load-only call over a paged ((pages, 16, 8, 128), table given) or contiguous ((batch, seqlen, 8, 128),
    table None) cache; returns (fn, grid)."""
    paged = table is not None
    if paged:
        batch, pages_per_seq = table.shape
    else:
        batch, pages_per_seq = k.shape[0], k.shape[1] // PAGE
    n_groups = NHEADS_K // heads
    splits = max(1, min(pages_per_seq, programs_target // (batch * n_groups)))
    per = triton.cdiv(pages_per_seq, splits)
    splits = triton.cdiv(pages_per_seq, per)
    out = torch.empty(batch * n_groups * splits, device=k.device, dtype=torch.bfloat16)
    stride_p = PAGE * NHEADS_K * D
    grid = (batch * n_groups, splits)

    def fn():
        _stream[grid](k, v, table if paged else k, out, pages_per_seq, per, stride_p, NHEADS_K * D, n_groups,
                      PAGED=paged, ROWS=PAGE, COLS=heads * D, num_warps=warps, num_stages=stages)
        return out

    return fn, grid


VARIANTS = [  # (heads, warps, stages)
    (1, 4, 3), (1, 4, 4), (2, 4, 3), (4, 4, 3), (4, 8, 3), (8, 8, 2), (8, 8, 3),
]


def time_length(seqlen_k: int, rounds: int, target: int) -> None:
    """Times every implementation at one KV length and prints a line each."""
    tensors = inputs(seqlen_k)
    q, k, v, kp, vp, table, _ = tensors
    batch = q.shape[0]
    fns = peers(*tensors)
    grids = {}
    for heads, warps, stages in VARIANTS:
        for paged in (True, False):
            name = f"{'paged' if paged else 'contig'} h{heads} w{warps} s{stages}"
            fns[name], grids[name] = stream_fn(kp if paged else k, vp if paged else v, table if paged else None,
                                               heads, warps, stages, target)
    # the load-only kernels read every element: check one against torch
    got = torch.stack([fns["paged h8 w8 s2"]().float().max(), fns["contig h1 w4 s3"]().float().max()])
    want = torch.maximum(k.amax(), v.amax()).float()
    assert torch.equal(got, want.expand(2)), (got, want)
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))
    nbytes = 2 * k.numel() * k.element_size()
    ref = statistics.median(times["sdpa-cudnn"])
    print(f"--- KV length {seqlen_k}, batch {batch}, {nbytes / 1e9:.2f} GB of K + V", flush=True)
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"{name:<22} {nbytes / ms * 1e-9:6.3f} TB/s  x cuDNN {ref / ms:.3f}  "
              f"[{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f} us] {grids.get(name, '')}", flush=True)



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="1024,4096,16384,65536")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--programs", type=int, default=0, help="programs to aim for (default 4 x SMs)")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    target = args.programs or 4 * sms
    for seqlen_k in (int(s) for s in args.seqlens.split(",")):
        time_length(seqlen_k, args.rounds, target)


if __name__ == "__main__":
    main()
