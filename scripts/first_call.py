"""Wall time of ioattn's first calls in a process: what a user waits for while Triton compiles the kernels a call
needs (cold: an empty ``TRITON_CACHE_DIR``) or loads them from its disk cache (warm: the same directory again, a
new process). Run it twice with the same empty directory:

    TRITON_CACHE_DIR=$(mktemp -d) sh -c 'PYTHONPATH=src python scripts/first_call.py; \\
        PYTHONPATH=src python scripts/first_call.py'

Prints seconds per step: the import, then each call's first run (synchronised) and a second run of it.
"""

from __future__ import annotations

import os
import time

t0 = time.perf_counter()
import torch  # noqa: E402

import ioattn  # noqa: E402

print(f"import torch + ioattn          {time.perf_counter() - t0:7.2f} s   cache {os.environ.get('TRITON_CACHE_DIR')}")


def timed(name: str, fn) -> None:
    for run in ("first", "second"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(f"{name:30s} {run:6s} {time.perf_counter() - t:7.2f} s", flush=True)


def main() -> None:
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16

    def qkv(d, s=2048, b=2, h=16, hk=16):
        return (torch.randn(b, s, n, d, device=dev, dtype=bf16, requires_grad=True) for n in (h, hk, hk))

    q, k, v = qkv(128)
    timed("fwd d=128 causal", lambda: ioattn.flash_attn_func(q, k, v, causal=True))
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    timed("bwd d=128 causal", lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    q64, k64, v64 = qkv(64)
    timed("fwd+bwd d=64", lambda: ioattn.flash_attn_func(q64, k64, v64).sum().backward())
    kc = torch.randn(64, 16, 8, 128, device=dev, dtype=bf16)
    vc = torch.randn_like(kc)
    table = torch.arange(64, device=dev, dtype=torch.int32).view(4, 16)
    qd = torch.randn(4, 1, 32, 128, device=dev, dtype=bf16)
    lens = torch.full((4,), 200, device=dev, dtype=torch.int32)
    timed("decode, paged cache", lambda: ioattn.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lens,
                                                                        block_table=table))


if __name__ == "__main__":
    main()
