"""``ioattn.scaled_dot_product_attention`` against ``ioattn.flash_attn_func`` on the same values and torch's SDPA
(its default choice and cuDNN forced): bf16, 16k tokens, hidden 2048, TFLOPs/s (FA2 paper's count).

Inputs in SDPA's layouts: 'bhsd' contiguous (B, H, L, E) tensors (read as one batch of B x H heads), and 'view'
transposed views of (B, L, H, E) memory (read as B batches). The backward's dO has the output's layout
(``torch.randn_like``). Prints a table; ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import ioattn


def _flops(b, h, n, d, causal, mode):
    f = 4 * b * h * n * n * d / (2 if causal else 1)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]


def _time(fn, inputs, mode):
    if mode == "fwd":
        with torch.no_grad():
            return do_bench(lambda: fn(*inputs), warmup=50, rep=300)
    out = fn(*inputs)
    dout = torch.randn_like(out)

    def step():
        o = fn(*inputs)
        torch.autograd.grad(o, inputs, dout)

    return do_bench(step, warmup=50, rep=300)


def _decode_row(s_len: int, rows: int) -> list[str]:
    b = 262144 // s_len
    g = torch.Generator(device="cuda").manual_seed(s_len)
    q = torch.randn(b, 32, rows, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, 8, s_len, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    qg = q.clone().requires_grad_()
    nbytes = 2 * k.numel() * k.element_size()

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    fns = [lambda: ioattn.scaled_dot_product_attention(q, k, v, enable_gqa=True),
           lambda: ioattn.scaled_dot_product_attention(qg, k, v, enable_gqa=True),
           lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), cudnn]
    cells = []
    for i, fn in enumerate(fns):
        try:
            if i == 1:  # grads on: the attention kernels' forward
                ms = do_bench(fn, warmup=25, rep=200)
            else:
                with torch.no_grad():
                    ms = do_bench(fn, warmup=25, rep=200)
            cells.append(f"{ms * 1e3:8.1f} us {nbytes / ms / 1e6:6.0f} GB/s")
        except Exception as e:  # a backend that refuses the shape
            cells.append(f"{type(e).__name__:>20}")
    return cells


def decode(lengths, rows=1):
    """Decoding steps through the drop-in (no grad: the KV-cache kernels) against the same call with grads on
    (the attention kernels' forward) and torch's SDPA: (B, 32, rows, 128) queries over (B, 8, S, 128) keys and
    values in (B, H, S, E) memory (a cache grown by torch.cat), B x S = 256k tokens; GB/s of K + V read."""
    print("S      rows " + " ".join(f"{n:>20}" for n in ("sdpa(no grad)", "sdpa(grad on)", "torch", "torch-cudnn")))
    for s_len in lengths:
        print(f"{s_len:<6} {rows:<4} " + " ".join(f"{c:>20}" for c in _decode_row(s_len, rows)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode", default="", help="KV lengths of decoding steps to time instead (e.g. 4096,16384)")
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--headdims", default="128,64")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.decode:
        decode([int(x) for x in args.decode.split(",")])
        return
    rows = []
    for d in map(int, args.headdims.split(",")):
        h = 2048 // d
        for n in map(int, args.seqlens.split(",")):
            b = 16384 // n
            for causal in (False, True):
                g = torch.Generator(device="cuda").manual_seed(n + d)
                mem = [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
                view = [t.transpose(1, 2).requires_grad_() for t in mem]
                bhsd = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in mem]
                bshd = [t.detach().clone().requires_grad_() for t in mem]
                def ours(q, k, v, causal=causal):
                    return ioattn.scaled_dot_product_attention(q, k, v, is_causal=causal)

                def fa(q, k, v, causal=causal):
                    return ioattn.flash_attn_func(q, k, v, causal=causal)

                def torch_default(q, k, v, causal=causal):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                impls = {"sdpa(bhsd)": (ours, bhsd), "sdpa(view)": (ours, view), "flash_attn_func": (fa, bshd),
                         "torch(bhsd)": (torch_default, bhsd)}

                def cudnn(q, k, v, causal=causal):
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                impls["torch-cudnn(bhsd)"] = (cudnn, bhsd)
                for mode in args.modes.split(","):
                    for name, (fn, inputs) in impls.items():
                        try:
                            ms = _time(fn, inputs, mode)
                        except Exception as e:  # a backend that refuses the shape
                            print(f"{name} d={d} n={n} causal={causal} {mode}: {type(e).__name__}: {e}"[:200])
                            continue
                        rows.append({"impl": name, "mode": mode, "headdim": d, "seqlen": n, "causal": causal,
                                     "batch": b, "nheads": h, "ms": ms,
                                     "tflops": _flops(b, h, n, d, causal, mode) / ms / 1e9})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    names = list(dict.fromkeys(r["impl"] for r in rows))
    print("d  seqlen causal mode   " + " ".join(f"{n:>18}" for n in names))
    keys = list(dict.fromkeys((r["headdim"], r["seqlen"], r["causal"], r["mode"]) for r in rows))
    for key in keys:
        got = {r["impl"]: r["tflops"] for r in rows if (r["headdim"], r["seqlen"], r["causal"], r["mode"]) == key}
        print(f"{key[0]:<3}{key[1]:>6} {key[2]!s:>6} {key[3]:<7}" + " ".join(f"{got.get(n, 0):18.1f}" for n in names))


if __name__ == "__main__":
    main()
