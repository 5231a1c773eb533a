"""The ``features`` suite: ioattn's speed with each feature switched on, against the plain case, at equal
FLOPs (TFLOPs/s counted over the (query, key) pairs a mask allows). A feature that is off must cost
nothing, and one that is on should keep its speed within 10% of the plain case.

Shapes as in the fa2 suite: batch × seqlen = 16k tokens, hidden 2048 (nheads = 2048 / headdim), bf16.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch

from ..interface import flash_attn_func, flash_attn_varlen_func
from .report import FEATURES_LAYOUT, Progress
from .timing import FULL, QUICK, median_ms, rounds_count

NAME = "features"
DESCRIPTION = "ioattn with each feature on (varlen, GQA, masks, softcap, ALiBi, dropout) against the plain case"
LAYOUT = FEATURES_LAYOUT
TOKENS, HIDDEN = 16384, 2048
FEATURES = ("plain", "causal", "varlen", "varlen-mixed", "gqa-4", "window", "softcap", "alibi", "dropout",
            "deterministic")


def allowed_pairs(seqlen: int, window: tuple[int, int], seqlen_k: int | None = None) -> int:
    """Number of (query, key) pairs a bottom-right aligned (left, right) window allows (-1 = unbounded) for
    ``seqlen`` queries and ``seqlen_k`` keys (default: as many as queries)."""
    seqlen_k = seqlen if seqlen_k is None else seqlen_k
    i = torch.arange(seqlen, dtype=torch.int64) + (seqlen_k - seqlen)
    lo = (i - window[0]).clamp(min=0) if window[0] >= 0 else torch.zeros_like(i)
    hi = (i + window[1]).clamp(max=seqlen_k - 1) if window[1] >= 0 else torch.full_like(i, seqlen_k - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def _mixed_lengths(total: int, seqlen: int) -> list[int]:
    """Lengths that sum to ``total`` and vary from seqlen / 4 to 7 seqlen / 4 around a mean of seqlen."""
    lengths, k = [], 0
    while sum(lengths) < total:
        lengths.append(seqlen // 4 + (k % 4) * seqlen // 2)
        k += 1
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def make_case(feature: str, seqlen: int, headdim: int, device: torch.device, dtype: torch.dtype):
    """(call, leaf tensors, forward FLOPs) for one feature at one shape."""
    batch, nheads = TOKENS // seqlen, HIDDEN // headdim
    nheads_k = nheads // 4 if feature == "gqa-4" else nheads
    shape = (batch, seqlen)

    def leaf(heads: int) -> torch.Tensor:
        return torch.randn(*shape, heads, headdim, device=device, dtype=dtype, requires_grad=True)

    q, k, v = leaf(nheads), leaf(nheads_k), leaf(nheads_k)
    pairs = [seqlen] * batch
    kwargs: dict = {}
    window = (-1, -1)
    if feature == "causal":
        kwargs["causal"], window = True, (-1, 0)
    elif feature == "window":
        window = (seqlen // 8, seqlen // 8)
        kwargs["window_size"] = window
    elif feature == "softcap":
        kwargs["softcap"] = 30.0
    elif feature == "alibi":
        kwargs["alibi_slopes"] = torch.rand(nheads, device=device, dtype=torch.float32) * 0.1
    elif feature == "dropout":
        kwargs["dropout_p"] = 0.1
    elif feature == "deterministic":
        kwargs["deterministic"] = True
    if feature.startswith("varlen"):
        lengths = [seqlen] * batch if feature == "varlen" else _mixed_lengths(TOKENS, seqlen)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        qv, kv, vv = (t.detach().view(TOKENS, t.shape[2], headdim).requires_grad_() for t in (q, k, v))
        call = lambda: flash_attn_varlen_func(qv, kv, vv, cu, cu, max(lengths), max(lengths))  # noqa: E731
        flops = sum(4.0 * n * n * headdim * nheads for n in lengths)
        return call, (qv, kv, vv), flops
    call = lambda: flash_attn_func(q, k, v, **kwargs)  # noqa: E731
    flops = 4.0 * headdim * nheads * sum(allowed_pairs(n, window) for n in pairs)
    return call, (q, k, v), flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headdims", default="128", help="comma-separated head dims (default 128)")
    parser.add_argument("--seqlens", default="4096,16384", help="comma-separated seqlens (default 4096,16384)")
    parser.add_argument("--features", default=",".join(FEATURES), help=f"subset of {','.join(FEATURES)}")
    parser.add_argument("--rounds", type=rounds_count, default=1,
                        help="time the features in turn this many times and keep each one's median (default 1)")


def _time(call: Callable[[], torch.Tensor], leaves, device, budget) -> tuple[float, float]:
    """(forward ms, backward ms) with bwd = (fwd + bwd) - fwd, as the fa2 suite times them."""
    out = call()
    dout = torch.randn_like(out)
    fwd = median_ms(call, device, budget)
    both = median_ms(lambda: call().backward(dout), device, budget, grad_to_none=list(leaves))
    return fwd, both - fwd


def measure(features, make: Callable, device, budget, rounds: int = 1) -> tuple[dict, list[str]]:
    """{feature: (fwd ms, bwd ms, flops)} for one (head dim, seqlen): ``make(feature)`` gives (call, leaves,
    flops). With ``rounds`` > 1 the features are timed in turn, ``rounds`` times, and each keeps its median
    fwd and fwd + bwd times (a drift during one feature's turn weighs once). A feature that fails is noted and
    left out."""
    cases, notes = {}, []
    for feature in features:
        try:
            cases[feature] = make(feature)
        except Exception as e:  # noqa: BLE001 - a failing feature is reported, the rest still run
            notes.append(f"{feature}: {type(e).__name__}: {e}")
    times: dict[str, list[tuple[float, float]]] = {f: [] for f in cases}
    for _ in range(rounds):
        for feature, (call, leaves, _) in list(cases.items()):
            try:
                times[feature].append(_time(call, leaves, device, budget))
            except Exception as e:  # noqa: BLE001
                notes.append(f"{feature}: {type(e).__name__}: {e}")
                del cases[feature]
    out = {}
    for feature, (_, _, flops) in cases.items():
        fwd = statistics.median(t[0] for t in times[feature])
        both = statistics.median(t[0] + t[1] for t in times[feature])
        out[feature] = (fwd, both - fwd, flops)
    return out, notes


def _make_at(feature: str, *, seqlen: int, headdim: int, device: torch.device):
    return make_case(feature, seqlen, headdim, device, torch.bfloat16)


def run(args: argparse.Namespace, device: torch.device, progress_enabled: bool = True):
    if device.type != "cuda":
        raise SystemExit("ioattn bench features: needs a CUDA device (the interpreter would time Python)")
    headdims = [int(x) for x in args.headdims.split(",")]
    seqlens = [int(x) for x in args.seqlens.split(",")]
    features = ["plain"] + [f for f in args.features.split(",") if f and f != "plain"]
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise SystemExit(f"ioattn bench features: unknown features {unknown}; choose from {FEATURES}")
    budget = QUICK if args.quick else FULL
    rows, notes = [], []
    progress = Progress(len(headdims) * len(seqlens), NAME, progress_enabled)
    torch.manual_seed(args.seed)
    for headdim in headdims:
        for seqlen in seqlens:
            progress.step(f"d={headdim} seqlen={seqlen}")
            make = functools.partial(_make_at, seqlen=seqlen, headdim=headdim, device=device)
            measured, failed = measure(features, make, device, budget, args.rounds)
            notes.extend(f"d={headdim} seqlen={seqlen} {n}" for n in failed)
            if "plain" not in measured:  # nothing to compare against
                continue
            plain = {}
            for feature, (fwd, bwd, flops) in measured.items():
                for mode, ms, mult in (("feature-fwd", fwd, 1.0), ("feature-bwd", bwd, 2.5)):
                    tflops = mult * flops / (ms * 1e-3) / 1e12
                    plain.setdefault(mode, tflops)  # plain comes first
                    rows.append({"impl": "ioattn", "mode": mode, "feature": feature, "headdim": headdim,
                                 "seqlen": seqlen, "ms": ms, "tflops": tflops, "relative": tflops / plain[mode]})
    progress.close()
    return rows, notes
