"""Probe: does a left-padded cache (``cache_leftpad``) decode at the rate of an unpadded one holding the same keys?

The bench's decode shape (bf16, d = 128, GQA 32/8, batch x keys = 256k) with caches twice as long as the keys,
the first half padding (``cache_leftpad`` = capacity / 2, NaN there), against the same keys in caches of their
own length, contiguous (the Gluon kernel where the programs fit at once, else the portable one) and paged (block
16; with a pad the portable kernel); five interleaved rounds, medians, TB/s of the K + V read. Outputs are
checked against each other first.

    PYTHONPATH=src python scripts/probe_leftpad.py [SEQLENS, default 4096,16384]
"""

import statistics
import sys

import torch
import triton

from ioattn import flash_attn_with_kvcache
from ioattn.bench.decode import PAGE, _paged

dev = torch.device("cuda")
ROUNDS = 5
TOKENS, NHEADS, NHEADS_K, D = 256 * 1024, 32, 8, 128


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


gen = torch.Generator(device=dev).manual_seed(0)
seqlens = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [4096, 16384]
rows = []
for n in seqlens:
    batch = TOKENS // n
    q = torch.randn(batch, 1, NHEADS, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, n, NHEADS_K, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    lens = torch.full((batch,), n, dtype=torch.int32, device=dev)
    k_pad = torch.full((batch, 2 * n, NHEADS_K, D), float("nan"), device=dev, dtype=torch.bfloat16)
    v_pad = torch.full_like(k_pad, float("nan"))
    k_pad[:, n:], v_pad[:, n:] = k, v
    pads = lens.clone()
    kp, vp, table = _paged(k, v, gen)
    kpp, vpp, table_p = _paged(k_pad.nan_to_num(), v_pad.nan_to_num(), gen)
    pad_pages = table_p[:, : n // PAGE].flatten().long()
    kpp[pad_pages] = vpp[pad_pages] = float("nan")
    long_lens = 2 * lens
    fns = {
        "contiguous": lambda q=q, k=k, v=v, lens=lens: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens),
        "contiguous, padded": lambda q=q, k=k_pad, v=v_pad, lens=long_lens, pads=pads: flash_attn_with_kvcache(
            q, k, v, cache_seqlens=lens, cache_leftpad=pads),
        "paged": lambda q=q, k=kp, v=vp, lens=lens, table=table: flash_attn_with_kvcache(
            q, k, v, cache_seqlens=lens, block_table=table),
        "paged, padded": lambda q=q, k=kpp, v=vpp, lens=long_lens, pads=pads, table=table_p: flash_attn_with_kvcache(
            q, k, v, cache_seqlens=lens, cache_leftpad=pads, block_table=table),
    }
    ref = fns["contiguous"]().float()
    for name, fn in fns.items():
        err = (fn().float() - ref).abs().max().item()
        assert err < 2e-2, (n, name, err)
    times = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            times[name].append(bench(fn))
    nbytes = 2 * k.numel() * 2
    for name in fns:
        ms = statistics.median(times[name])
        rows.append((n, name, ms, nbytes / ms / 1e9))
print(f"{'keys':>6} {'cache':<20} {'ms':>8} {'TB/s':>6}")
for n, name, ms, tbs in rows:
    print(f"{n:>6} {name:<20} {ms:8.4f} {tbs:6.3f}")
