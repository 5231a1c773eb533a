"""The ``decode`` suite: one query token per sequence against a KV cache, in GB/s of K+V read.

Setup as in ANCHORS.md's decode table: bf16, d = 128, 32 query heads and 8 KV heads (GQA 4),
batch × KV length = 256k tokens, KV length 1k to 64k. Bandwidth = K+V bytes of the cache read / time;
the query, output and page table are negligible beside them. Peers on the same inputs, interleaved per
configuration: ioattn's contiguous and paged (block 16) kernels, SDPA's flash and cudnn backends,
FlexAttention's decoding kernel, and flash-attn / FlashInfer when installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .report import DECODE_LAYOUT, Progress
from .timing import FULL, QUICK, TimingBudget, median_ms, rounds_count, synchronize

NAME = "decode"
DESCRIPTION = "decode attention over a KV cache: GB/s of K+V read against KV length"
LAYOUT = DECODE_LAYOUT

TOKENS = 1 << 18
SEQLENS = (1024, 4096, 16384, 65536)
PEERS = ("ioattn", "ioattn-paged", "sdpa-flash", "sdpa-cudnn", "flex", "flash-attn", "flashinfer")
PAGE = 16
# --quick on CPU: tiny shapes that exercise the harness (the kernels then run in Triton's interpreter).
QUICK_CPU = {"tokens": 256, "seqlens": (64, 128), "nheads": 4, "nheads_k": 2, "headdim": 32}
_AGREE_ATOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda text: [int(x) for x in text.split(",") if x]
    parser.add_argument("--seqlens", type=ints, default=None, help="KV lengths, e.g. 1024,4096")
    parser.add_argument("--tokens", type=int, default=None, help="batch × KV length (default 262144)")
    parser.add_argument("--peers", type=lambda t: t.split(","), default=list(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--rounds", type=rounds_count, default=1,
                        help="time every peer in turn this many times per KV length and keep the median (default 1)")


def _inputs(batch: int, seqlen_k: int, nheads: int, nheads_k: int, headdim: int, dtype, device, gen):
    q = torch.randn(batch, 1, nheads, headdim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, device=device, dtype=dtype, generator=gen)
    return q, k, v


def _paged(k: torch.Tensor, v: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same cache in shuffled pages of PAGE tokens, with its (batch, pages) int32 block table."""
    batch, seqlen_k, nheads_k, headdim = k.shape
    pages = batch * math.ceil(seqlen_k / PAGE)
    order = torch.randperm(pages, device=k.device, generator=gen)
    table = order.view(batch, -1).to(torch.int32)
    k_pages = torch.empty(pages, PAGE, nheads_k, headdim, device=k.device, dtype=k.dtype)
    v_pages = torch.empty_like(k_pages)
    pad = pages // batch * PAGE - seqlen_k  # a last, partly used page per sequence
    k_pages[order] = F.pad(k, (0, 0, 0, 0, 0, pad)).view(pages, PAGE, nheads_k, headdim)
    v_pages[order] = F.pad(v, (0, 0, 0, 0, 0, pad)).view(pages, PAGE, nheads_k, headdim)
    return k_pages, v_pages, table


def _peer_fns(q, k, v, paged, names: Sequence[str], device) -> dict[str, Callable[[], torch.Tensor] | str]:
    """Per peer a zero-argument function returning (batch, 1, nheads, d), or why it cannot run."""
    from ..kvcache import flash_attn_with_kvcache

    batch, seqlen_k = k.shape[:2]
    seqlens = torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)
    fns: dict[str, Callable[[], torch.Tensor] | str] = {}
    fns["ioattn"] = lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    fns["ioattn-paged"] = lambda: flash_attn_with_kvcache(q, paged[0], paged[1], cache_seqlens=seqlens,
                                                          block_table=paged[2])
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa(backend_name: str) -> Callable[[], torch.Tensor] | str:
        if device.type != "cuda":
            return "needs a CUDA device"
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run() -> torch.Tensor:
            with sdpa_kernel(getattr(SDPBackend, backend_name)):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
        return run

    fns["sdpa-flash"] = sdpa("FLASH_ATTENTION")
    fns["sdpa-cudnn"] = sdpa("CUDNN_ATTENTION")
    if device.type != "cuda" or importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        fns["flex"] = "needs a CUDA device and torch.nn.attention.flex_attention"
    else:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        fns["flex"] = lambda: flex(qt, kt, vt, enable_gqa=True).transpose(1, 2)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_with_kvcache as fa_kvcache

        fns["flash-attn"] = lambda: fa_kvcache(q, k, v, cache_seqlens=seqlens)
    else:
        fns["flash-attn"] = "flash_attn is not installed (or no CUDA device)"
    fns["flashinfer"] = _flashinfer(q, paged, seqlen_k, device)
    return {name: fns[name] for name in names if name in fns}


def _flashinfer(q, paged, seqlen_k, device) -> Callable[[], torch.Tensor] | str:
    if device.type != "cuda" or importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (or no CUDA device)"
    import flashinfer

    k_pages, v_pages, table = paged
    batch, _, nheads, headdim = q.shape
    pages_per_seq = table.shape[1]
    indptr = torch.arange(batch + 1, device=device, dtype=torch.int32) * pages_per_seq
    last_len = torch.full((batch,), seqlen_k - (pages_per_seq - 1) * PAGE, dtype=torch.int32, device=device)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(indptr, table.flatten(), last_len, nheads, k_pages.shape[2], headdim, PAGE,
                 q_data_type=q.dtype, kv_data_type=k_pages.dtype)
    return lambda: wrapper.run(q[:, 0], (k_pages, v_pages)).unsqueeze(1)


def run_decode_suite(device: torch.device, *, seqlens: Sequence[int] = SEQLENS, tokens: int = TOKENS,
                     nheads: int = 32, nheads_k: int = 8, headdim: int = 128, dtype=torch.bfloat16,
                     peers: Sequence[str] = PEERS, budget: TimingBudget = FULL, seed: int = 0,
                     progress: Progress | None = None, rounds: int = 1) -> list[dict]:
    """Time every peer at every KV length (batch = tokens // seqlen_k) and return the rows of
    :data:`DECODE_LAYOUT`; a peer that cannot run or fails is noted on ``progress`` and left out.
    ``rounds`` > 1: the peers that ran are timed again in turn, ``rounds - 1`` more times, and each keeps its
    median (a drift during one peer's turn weighs once)."""
    progress = progress or Progress(len(seqlens) * len(peers), NAME, enabled=False)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows: list[dict] = []
    for seqlen_k in seqlens:
        batch = max(1, tokens // seqlen_k)
        q, k, v = _inputs(batch, seqlen_k, nheads, nheads_k, headdim, dtype, device, gen)
        paged = _paged(k, v, gen)
        kv_bytes = 2 * k.numel() * k.element_size()
        baseline: torch.Tensor | None = None
        where = f"seqlen_k={seqlen_k} batch={batch}"
        timed: dict[str, tuple[Callable[[], torch.Tensor], list[float]]] = {}
        for name, fn in _peer_fns(q, k, v, paged, peers, device).items():
            if isinstance(fn, str):
                progress.note(f"{name} skipped: {fn}")
                progress.step(f"{name} {where}")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = fn()
                    synchronize(device)
                    ms = median_ms(fn, device, budget)
            except Exception as exc:  # a peer's failure (unsupported shape, OOM) must not end the suite
                progress.note(f"{name} failed at {where}: {type(exc).__name__}: {str(exc)[:200]}")
                progress.step(f"{name} {where}")
                continue
            if baseline is None:
                baseline = out.float()
            else:
                err = (out.float() - baseline).abs().max().item()
                if not err <= _AGREE_ATOL.get(dtype, 3e-2):
                    progress.note(f"{name} disagrees with the first peer at {where}: max |diff| {err:.3g}")
            timed[name] = (fn, [ms])
            progress.step(f"{name} {where}")
        for _ in range(rounds - 1):
            for name, (fn, times) in timed.items():
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        times.append(median_ms(fn, device, budget))
                except Exception as exc:  # as in the first round; the rounds it ran keep their times
                    progress.note(f"{name} failed at {where}: {type(exc).__name__}: {str(exc)[:200]}")
        for name, (_, times) in timed.items():
            ms = statistics.median(times)
            rows.append({"impl": name, "mode": "decode", "headdim": headdim, "nheads": nheads,
                         "nheads_k": nheads_k, "batch": batch, "seqlen_k": seqlen_k,
                         "block_size": PAGE if name in ("ioattn-paged", "flashinfer") else 0,
                         "ms": ms, "gbps": kv_bytes / (ms * 1e-3) / 1e9})
        del q, k, v, paged, baseline, timed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace, device: torch.device, progress_enabled: bool = True
        ) -> tuple[list[dict], list[str]]:
    """The suite entry of ``ioattn bench decode``."""
    shape = {"nheads": 32, "nheads_k": 8, "headdim": 128, "tokens": TOKENS, "seqlens": SEQLENS}
    dtype = torch.bfloat16
    if args.quick and device.type != "cuda":
        shape, dtype = dict(QUICK_CPU), torch.float16
    elif args.quick:
        shape["seqlens"] = (1024, 16384)
    if args.seqlens:
        shape["seqlens"] = tuple(args.seqlens)
    if args.tokens:
        shape["tokens"] = args.tokens
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"ioattn bench decode: unknown peers {unknown}; choose from {','.join(PEERS)}")
    progress = Progress(len(shape["seqlens"]) * len(args.peers), NAME, enabled=progress_enabled)
    try:
        rows = run_decode_suite(device, seqlens=shape["seqlens"], tokens=shape["tokens"],
                                nheads=shape["nheads"], nheads_k=shape["nheads_k"], headdim=shape["headdim"],
                                dtype=dtype, peers=args.peers, budget=QUICK if args.quick else FULL,
                                seed=args.seed, progress=progress, rounds=args.rounds)
    finally:
        progress.close()
    return rows, progress.notes
