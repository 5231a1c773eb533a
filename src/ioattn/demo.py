"""``ioattn demo``, the main job: standard (materialised) attention against ioattn for growing sequence
lengths: time and peak memory of each, and ioattn's max error against the float64 reference.

On a GPU ioattn runs its Triton kernels in bf16; on a CPU, the chunked PyTorch path in float32. Standard
attention is skipped, with a message, before it would run out of memory. The error is measured on a
sample of query rows against all keys, so it is available at every length.
"""

from __future__ import annotations

import math

import torch

from .backend import select_backend
from .bench.memory import available_bytes, mib, peak_memory_bytes, standard_attention, standard_estimate, timed
from .interface import flash_attn_func
from .reference import attention_ref

ERROR_ROWS = 32


def _config(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"dtype": torch.bfloat16, "heads": 16, "headdim": 128,
                "seqlens": [1024, 2048, 4096, 8192, 16384, 32768, 65536], "repeats": 10}
    return {"dtype": torch.float32, "heads": 2, "headdim": 64,
            "seqlens": [1024, 2048, 4096, 8192, 16384], "repeats": 2}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def run_demo(device: str = "cpu", seqlens: list[int] | None = None) -> int:
    dev = torch.device(device)
    cfg = _config(dev)
    seqlens = seqlens or cfg["seqlens"]
    dtype, heads, d = cfg["dtype"], cfg["heads"], cfg["headdim"]
    backend = select_backend(dev)
    print(f"ioattn demo on {dev}: batch 1, {heads} heads, headdim {d}, {str(dtype).replace('torch.', '')}; "
          f"ioattn runs its {backend} backend")
    print(f"{'seqlen':>7}  {'standard ms':>11}  {'ioattn ms':>9}  {'standard MiB':>12}  "
          f"{'ioattn MiB':>10}  {'memory saved':>12}  {'max error':>9}")
    for n in seqlens:
        print(f"{n:>7}  measuring ...", end="\r", flush=True)
        t_std, t_io, m_std, m_io, err = _measure(n, dev, cfg)
        saved = f"{m_std / max(m_io, 1):,.1f}x" if m_std is not None else "-"
        print(f"{n:>7}  {_ms(t_std):>11}  {_ms(t_io):>9}  {mib(m_std):>12}  {mib(m_io):>10}  {saved:>12}  "
              f"{err:>9.2e}", flush=True)
        if not math.isfinite(err):
            print("ioattn produced a non-finite value")
            return 1
    return 0


@torch.no_grad()
def _measure(n: int, dev: torch.device, cfg: dict):
    """(standard s, ioattn s, standard peak bytes, ioattn peak bytes, ioattn max error) at seqlen n."""
    q, k, v = (torch.randn(1, n, cfg["heads"], cfg["headdim"], device=dev, dtype=cfg["dtype"]) for _ in range(3))
    ours = lambda: flash_attn_func(q, k, v)  # noqa: E731
    standard = lambda: standard_attention(q, k, v)  # noqa: E731
    rows = torch.randperm(n, device=dev)[:ERROR_ROWS].sort().values
    ref, _ = attention_ref(q[:, rows], k, v, upcast=True)
    err = (ours()[:, rows].double() - ref.double()).abs().max().item()
    t_io, m_io = timed(ours, dev, cfg["repeats"]), peak_memory_bytes(ours, dev)
    need = standard_estimate(n, cfg["heads"], q.element_size(), "fwd")
    if need >= 0.7 * available_bytes(dev):
        print(f"  (standard attention skipped at {n}: it needs about {need / 2**30:.1f} GiB, "
              f"more than 70% of the {available_bytes(dev) / 2**30:.1f} GiB free)")
        return None, t_io, None, m_io, err
    return timed(standard, dev, cfg["repeats"]), t_io, peak_memory_bytes(standard, dev), m_io, err
