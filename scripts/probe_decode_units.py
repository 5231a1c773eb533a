"""Probe: does the decode rate grow with the number of streaming programs past 128 (132 SMs on an H200)?

The bench's 16k / 64k cells run 128 (batch x KV head) Gluon programs, one per SM, on 132 SMs. Here the same
bytes per program with 128 and 132 programs (GQA 16/4 with batch 32 and 33; the bench's 32/8 with batch 16
beside), contiguous and paged (block 16), and sdpa-cudnn on the same inputs; five interleaved rounds, medians,
TB/s of K + V. If 132 programs read ~132/128 of 128's rate, spreading the tiles over every SM (a flat tile
partition) is worth building; if the rate is flat, DRAM is what holds it.

    PYTHONPATH=src python scripts/probe_decode_units.py [SEQLENS, default 16384,65536]
"""

import statistics
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ioattn import flash_attn_with_kvcache
from ioattn.bench.decode import _paged

dev = torch.device("cuda")
ROUNDS = 5
SHAPES = [(16, 32, 8), (32, 16, 4), (33, 16, 4)]  # (batch, nheads, nheads_k)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


gen = torch.Generator(device=dev).manual_seed(0)
seqlens = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [16384, 65536]
print(f"SMs {torch.cuda.get_device_properties(dev).multi_processor_count}")
for n in seqlens:
    fns, nbytes = {}, {}
    for batch, nheads, nheads_k in SHAPES:
        q = torch.randn(batch, 1, nheads, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(batch, n, nheads_k, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        lens = torch.full((batch,), n, dtype=torch.int32, device=dev)
        kp, vp, table = _paged(k, v, gen)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        tag = f"b{batch} h{nheads}/{nheads_k} units {batch * nheads_k}"

        def cudnn(qt=qt, kt=kt, vt=vt):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        fns[(tag, "cudnn")] = cudnn
        fns[(tag, "contig")] = lambda q=q, k=k, v=v, lens=lens: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)
        fns[(tag, "paged")] = lambda q=q, kp=kp, vp=vp, lens=lens, table=table: flash_attn_with_kvcache(
            q, kp, vp, cache_seqlens=lens, block_table=table)
        ref = cudnn().transpose(1, 2).float()
        for name in ("contig", "paged"):
            err = (fns[(tag, name)]().float() - ref).abs().max().item()
            assert err < 3e-2, (tag, name, err)
        for name in ("cudnn", "contig", "paged"):
            nbytes[(tag, name)] = 2 * k.numel() * 2
    times = {key: [] for key in fns}
    for _ in range(ROUNDS):
        for key, fn in fns.items():
            times[key].append(bench(fn))
    for key, ms in times.items():
        print(f"n={n:6d} {key[0]:28s} {key[1]:7s} {nbytes[key] / statistics.median(ms) * 1e-9:.3f} TB/s "
              f"{statistics.median(ms) * 1e3:8.1f} us")
