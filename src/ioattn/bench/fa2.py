"""The ``fa2`` suite: the FlashAttention-2 paper's speed figures (arXiv 2307.08691, figures 4-6).

Setup as in the paper and in ANCHORS.md: batch × seqlen = 16k tokens, hidden 2048 (nheads = 2048 /
headdim), head dims 64 / 128 / 256, causal and not, seqlen 512 to 16k. FLOPs = 4·seqlen²·headdim·nheads·batch
for the forward, halved when causal; the backward counts 2.5× the forward. Each configuration gets fresh
inputs, and every peer runs on those same inputs before the next configuration (interleaved), so drift
in clocks or temperature spreads over all peers alike. The backward is timed as (fwd+bwd) − fwd.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from .peers import PEER_NAMES, Peer, all_peers
from .report import FA2_LAYOUT, Progress
from .timing import FULL, QUICK, TimingBudget, median_ms, rounds_count, synchronize

T = TypeVar("T")

NAME = "fa2"
DESCRIPTION = "FlashAttention-2 paper speed figures: fwd / bwd / fwd+bwd TFLOPs/s against seqlen"
LAYOUT = FA2_LAYOUT

MODES = ("fwd", "bwd", "fwdbwd")
TOKENS = 16384
HIDDEN = 2048
HEADDIMS = (64, 128, 256)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
BWD_FLOPS_RATIO = 2.5

# --quick: on a GPU, a small slice of the real figure; on a CPU, tiny shapes that exercise the harness.
# On a GPU, FlexAttention's compilations (a forward and a backward graph per shape) dominate the minute,
# so the quick slice is non-causal unless --causal says otherwise.
QUICK_CUDA = {"headdims": (128,), "seqlens": (1024, 4096), "causal": "false", "tokens": TOKENS, "hidden": HIDDEN}
QUICK_CPU = {"headdims": (64,), "seqlens": (128, 256), "causal": "both", "tokens": 512, "hidden": 128}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# How far a peer's output may sit from the first peer's before it is reported as disagreeing.
_AGREE_ATOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-3}


@dataclass(frozen=True)
class Config:
    headdim: int
    causal: bool
    seqlen: int
    batch: int
    nheads: int

    def __str__(self) -> str:
        return (f"d={self.headdim} {'causal' if self.causal else 'non-causal'} seqlen={self.seqlen} "
                f"(batch {self.batch}, {self.nheads} heads)")


def make_configs(headdims: Sequence[int], seqlens: Sequence[int], causals: Sequence[bool],
                 tokens: int = TOKENS, hidden: int = HIDDEN) -> list[Config]:
    """The paper's shapes: batch = tokens // seqlen, nheads = hidden // headdim."""
    configs = []
    for headdim in headdims:
        if hidden % headdim:
            raise ValueError(f"headdim {headdim} must divide the hidden size {hidden}")
        for causal in causals:
            for seqlen in seqlens:
                if seqlen > tokens:
                    raise ValueError(f"seqlen {seqlen} exceeds the token budget {tokens} (batch would be 0)")
                configs.append(Config(headdim, causal, seqlen, tokens // seqlen, hidden // headdim))
    return configs


def flops(batch: int, seqlen: int, nheads: int, headdim: int, causal: bool, mode: str) -> float:
    """FLOPs of one call as the FlashAttention-2 paper counts them."""
    fwd = 4.0 * seqlen * seqlen * headdim * nheads * batch / (2 if causal else 1)
    ratios = {"fwd": 1.0, "bwd": BWD_FLOPS_RATIO, "fwdbwd": 1.0 + BWD_FLOPS_RATIO}
    if mode not in ratios:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return fwd * ratios[mode]


def tflops(flop_count: float, ms: float) -> float:
    return flop_count / (ms * 1e-3) / 1e12


def _row(peer: str, mode: str, cfg: Config, ms: float) -> dict:
    return {"impl": peer, "mode": mode, "headdim": cfg.headdim, "causal": cfg.causal, "seqlen": cfg.seqlen,
            "batch": cfg.batch, "nheads": cfg.nheads, "ms": ms,
            "tflops": tflops(flops(cfg.batch, cfg.seqlen, cfg.nheads, cfg.headdim, cfg.causal, mode), ms)}


def _failure(exc: BaseException, caught: list[warnings.WarningMessage]) -> str:
    message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    # SDPA says why a forced backend cannot run in a warning, before raising "No available kernel".
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if "kernel not used" in str(w.message)]
    return message[:240] + (f" ({'; '.join(reasons)[:240]})" if reasons else "")


def _attempt(progress: Progress, peer: str, what: str, cfg: Config, thunk: Callable[[], T]) -> T | None:
    """``thunk()``, or None with a note when it raises (OOM, unsupported shape, missing kernel)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return thunk()
        except Exception as exc:
            progress.note(f"{peer} {what} failed at {cfg}: {_failure(exc, caught)}")
            return None


def _reference_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      device: torch.device) -> tuple[str, torch.Tensor] | None:
    """Every peer's output is checked against SDPA's (its fused backends on CUDA, where the math one would
    not fit at long lengths); None when SDPA cannot run, and the first peer's output serves instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    backends = sdpa_kernel(fused) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), torch.no_grad(), backends:
            warnings.simplefilter("ignore")
            out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal)
    except Exception:
        return None
    return "SDPA", out.transpose(1, 2)


def _peer_times(peer: Peer, cfg: Config, inputs: tuple[torch.Tensor, ...], backward: bool,
                device: torch.device, budget: TimingBudget, progress: Progress) -> dict[str, float]:
    """The peer's median times (fwd, and fwdbwd with ``backward``); what fails is noted and left out."""
    q, k, v, dout = inputs
    times: dict[str, float] = {}
    fwd = _attempt(progress, peer.name, "forward", cfg, lambda: median_ms(
        peer.make_fn(q, k, v, cfg.causal, "fwd"), device, budget, grad_to_none=(q, k, v)))
    if fwd is None:
        return times
    times["fwd"] = fwd
    if backward:
        fwdbwd = _attempt(progress, peer.name, "forward+backward", cfg, lambda: median_ms(
            peer.make_fn(q, k, v, cfg.causal, "fwdbwd", dout), device, budget, grad_to_none=(q, k, v)))
        if fwdbwd is not None:
            times["fwdbwd"] = fwdbwd
    return times


def _time_peer(peer: Peer, cfg: Config, inputs: tuple[torch.Tensor, ...], backward: bool,
               device: torch.device, budget: TimingBudget, progress: Progress
               ) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The peer's output (for the agreement check) and its median times; what fails is noted and left out."""
    q, k, v, _ = inputs

    def first_output() -> torch.Tensor:
        # The first call (with autograd, as timed) also compiles whatever the peer compiles.
        out = peer.forward(q, k, v, cfg.causal).detach()
        synchronize(device)
        return out

    out = _attempt(progress, peer.name, "forward", cfg, first_output)
    if out is None:
        return None, {}
    return out, _peer_times(peer, cfg, inputs, backward, device, budget, progress)


def _release(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device: torch.device) -> None:
    q.grad = k.grad = v.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_config(cfg: Config, peers: Sequence[Peer], modes: Sequence[str], device: torch.device,
                   dtype: torch.dtype, budget: TimingBudget, progress: Progress, rounds: int = 1) -> list[dict]:
    """Time every peer on one configuration's fresh inputs; a peer that fails is noted and skipped.

    ``rounds`` > 1: after the first round (which also checks each output against SDPA's) every peer that ran
    is timed again, peer after peer, ``rounds - 1`` more times; each time is the median over the rounds, so
    a drift of clocks or temperature during one peer's turn weighs once, not on every cell."""
    shape = (cfg.batch, cfg.seqlen, cfg.nheads, cfg.headdim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=dtype)
    backward = any(m != "fwd" for m in modes)
    baseline = _reference_output(q, k, v, cfg.causal, device)
    measured: dict[str, dict[str, list[float]]] = {}
    ran: list[Peer] = []
    for peer in peers:
        ok, why = peer.available(device, dtype, cfg.headdim)
        if ok:
            ok, why = peer.fits(cfg.batch, cfg.seqlen, cfg.nheads, cfg.headdim, dtype, device, backward)
            why = f"at {cfg}: {why}" if not ok else why
        if not ok:
            progress.note(f"{peer.name} skipped: {why}")
            progress.step(f"{peer.name} {cfg}")
            continue
        out, times = _time_peer(peer, cfg, (q, k, v, dout), backward, device, budget, progress)
        if out is not None:
            if baseline is None:
                baseline = (peer.name, out)
            else:
                err = (out.float() - baseline[1].float()).abs().max().item()
                if not err <= _AGREE_ATOL.get(dtype, 3e-2):
                    progress.note(f"{peer.name} disagrees with {baseline[0]} at {cfg}: max |diff| {err:.3g}")
            del out
        _release(q, k, v, device)
        if times:
            measured[peer.name] = {mode: [ms] for mode, ms in times.items()}
            ran.append(peer)
        progress.step(f"{peer.name} {cfg}")
    for r in range(1, rounds):
        for peer in peers:
            if peer in ran:
                # a mode that failed in the first round is not tried again
                times = _peer_times(peer, cfg, (q, k, v, dout), "fwdbwd" in measured[peer.name], device, budget,
                                    progress)
                for mode, ms in times.items():
                    measured[peer.name][mode].append(ms)
                _release(q, k, v, device)
            progress.step(f"{peer.name} {cfg} (round {r + 1})")
    rows: list[dict] = []
    for peer in ran:
        times = {mode: statistics.median(ms) for mode, ms in measured[peer.name].items()}
        if "bwd" in modes and "fwdbwd" in times:
            times["bwd"] = times["fwdbwd"] - times["fwd"]
            if times["bwd"] <= 0:
                progress.note(f"{peer.name} at {cfg}: fwd+bwd ({times['fwdbwd']:.3f} ms) not above fwd "
                              f"({times['fwd']:.3f} ms); bwd dropped")
                del times["bwd"]
        rows.extend(_row(peer.name, mode, cfg, times[mode]) for mode in MODES
                    if mode in modes and mode in times)
    return rows


def _csv(kind: type, choices: Sequence | None = None):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, "
                                             f"got {text!r}") from e
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        bad = [x for x in values if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not among {list(choices)}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fa2 suite's options (those shared by every suite are added by ``ioattn.bench``)."""
    parser.add_argument("--modes", type=_csv(str, MODES), default=MODES, help="fwd,bwd,fwdbwd (default all)")
    parser.add_argument("--headdims", type=_csv(int), default=None, help="default 64,128,256")
    parser.add_argument("--seqlens", type=_csv(int), default=None, help="default 512,1024,...,16384")
    parser.add_argument("--causal", choices=("both", "true", "false"), default=None,
                        help="default both (--quick on a GPU: false)")
    parser.add_argument("--peers", type=_csv(str, PEER_NAMES), default=PEER_NAMES,
                        help=f"comma-separated, from {','.join(PEER_NAMES)} (default all; unavailable ones "
                             "are skipped with the reason)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"batch × seqlen (default {TOKENS}, the paper's; --quick on CPU uses "
                             f"{QUICK_CPU['tokens']})")
    parser.add_argument("--rounds", type=rounds_count, default=1,
                        help="time every peer this many times per configuration, peer after peer, and keep the "
                             "median (default 1)")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"nheads × headdim (default {HIDDEN}; --quick on CPU uses "
                             f"{QUICK_CPU['hidden']})")


def plan(args: argparse.Namespace, device: torch.device) -> tuple[list[Config], torch.dtype, TimingBudget]:
    """The configurations, dtype and timing budget that ``args`` ask for on ``device``."""
    quick = (QUICK_CUDA if device.type == "cuda" else QUICK_CPU) if args.quick else {}
    headdims = args.headdims or quick.get("headdims", HEADDIMS)
    seqlens = args.seqlens or quick.get("seqlens", SEQLENS)
    tokens = args.tokens or quick.get("tokens", TOKENS)
    hidden = args.hidden or quick.get("hidden", HIDDEN)
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[
        args.causal or quick.get("causal", "both")]
    default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = _DTYPES[args.dtype] if args.dtype else default_dtype
    configs = make_configs(headdims, seqlens, causals, tokens, hidden)
    return configs, dtype, QUICK if args.quick else FULL


def run(args: argparse.Namespace, device: torch.device, progress_enabled: bool = True
        ) -> tuple[list[dict], list[str]]:
    """Run the suite; returns the result rows and the notes (skipped peers, failures, anomalies)."""
    configs, dtype, budget = plan(args, device)
    peers = [p for name, p in all_peers().items() if name in args.peers]
    torch.manual_seed(args.seed)
    progress = Progress(len(configs) * len(peers) * args.rounds, desc="fa2", enabled=progress_enabled)
    rows: list[dict] = []
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.quick:
        # Tiny shapes gain nothing from more threads, and on a busy CI runner OpenMP's spinning threads
        # make each call ten times slower and the timings meaningless.
        torch.set_num_threads(1)
    try:
        for cfg in configs:
            rows.extend(measure_config(cfg, peers, args.modes, device, dtype, budget, progress, args.rounds))
    finally:
        torch.set_num_threads(threads)
        progress.close()
    return rows, progress.notes
