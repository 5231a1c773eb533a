"""Forward speed of the Gluon Hopper kernel against the portable ioattn kernel, SDPA (cuDNN, flash) and
flex, on the FA2 benchmark shapes: bf16, batch x seqlen = 16k tokens, hidden 2048, d 64 / 128.

TFLOPs/s = 4 * seqlen^2 * d * nheads * batch (halved when causal) / time; do_bench medians, every peer in
one process on the same inputs, interleaved per shape. Each peer's output is checked against SDPA's first.
"""

from __future__ import annotations

import math

import torch
import triton

from ioattn.bench.peers import all_peers
from ioattn.kernels.attn_fwd_gluon import gluon_forward
from ioattn.ops.attention import flash_attention

PEERS = ("gluon", "gluon-overlap", "ioattn", "sdpa-cudnn", "sdpa-flash", "flex")


def _fns(q, k, v, causal):
    scale = 1.0 / math.sqrt(q.shape[-1])
    peers = all_peers()
    fns = {
        "gluon": lambda: gluon_forward(q, k, v, scale, causal, overlap=False)[0],
        "gluon-overlap": lambda: gluon_forward(q, k, v, scale, causal, overlap=True)[0],
        "ioattn": lambda: flash_attention(q, k, v, softmax_scale=scale, causal=causal,
                                          window_size=(-1, 0) if causal else (-1, -1), softcap=0.0,
                                          alibi_slopes=None, dropout_p=0.0, deterministic=True)[0],
    }
    for name in ("sdpa-cudnn", "sdpa-flash", "flex"):
        peer = peers[name]
        fns[name] = (lambda p: lambda: p.forward(q, k, v, causal))(peer)
    return fns


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for d in (64, 128):
        for causal in (False, True):
            for seqlen in (2048, 4096, 8192, 16384):
                batch, nheads = 16384 // seqlen, 2048 // d
                q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                flops = 4 * seqlen * seqlen * d * nheads * batch / (2 if causal else 1)
                fns = _fns(q, k, v, causal)
                ref = fns["sdpa-flash"]().float()
                row = {}
                for name in PEERS:
                    try:
                        err = ((fns[name]().float() - ref).norm() / ref.norm()).item()
                        ms = triton.testing.do_bench(fns[name], warmup=25, rep=100, return_mode="median")
                        row[name] = f"{flops / ms * 1e-9:.0f}" + ("" if err < 2e-2 else f" (err {err:.1e})")
                    except Exception as e:  # a peer that cannot run this shape
                        row[name] = f"n/a ({type(e).__name__})"
                rows.append((d, causal, seqlen, row))
                print(d, causal, seqlen, row, flush=True)
    print("\n| d | causal | seqlen | " + " | ".join(PEERS) + " |")
    print("|---|---|---|" + "---|" * len(PEERS))
    for d, causal, seqlen, row in rows:
        print(f"| {d} | {causal} | {seqlen} | " + " | ".join(row[p] for p in PEERS) + " |")


if __name__ == "__main__":
    main()
