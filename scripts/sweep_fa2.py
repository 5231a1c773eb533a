"""Sweep the FlashAttention-2 kernels' configs on a GPU and print the table to ship in ``launch._CONFIGS``.

Phase 1 (parallel, one process per CPU core up to --workers): each candidate is compiled and checked
against an fp32 reference at a small shape (the miscompile that pinned the old dK/dV shape showed up as a
wrong result, not a crash), so a failing config can never be chosen. Phase 2 (this process, serial): every
passing candidate is timed with ``triton.testing.do_bench`` (median) at seqlen 4096 of the FA2 benchmark
(16k tokens, hidden 2048); the three fastest and the current default are re-timed at 2048 and 16384, and
the one with the lowest mean time relative to the best at each length wins.

Kinds: ``fwd``; ``dkdv`` and ``dq`` (the deterministic backward's two kernels, each timed with the other
at its current default; the times are of the whole backward); ``fused`` (the single-pass backward, dQ by
TMA reduce-add, ``deterministic=False``).

    PYTHONPATH=src python scripts/sweep_fa2.py --out OUTDIR        # on the GPU
    PYTHONPATH=src python scripts/sweep_fa2.py --smoke             # on CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
import traceback

TOKENS, HIDDEN = 16384, 2048
SEQLEN, OTHER_SEQLENS = 4096, (2048, 16384)
CHECK_SEQLEN = 2048


def candidates(kind: str, headdim: int, smoke: bool):
    from ioattn.kernels.launch import AttnConfig

    if smoke:
        return [AttnConfig(32, 32, 1, 1), AttnConfig(16, 32, 1, 1)]
    if headdim == 256:
        # Read offline for sm_90 (Triton 3.6, ptxas -v): 8 warps on 64-row wgmma tiles keep the spills to
        # tens of bytes; the old (32, 32, 4, 2) rows use mma.sync and spill (dK/dV 340 B).
        if kind == "dq":
            return [AttnConfig(*c) for c in ((64, 64, 8, 2), (64, 64, 8, 1), (128, 32, 8, 2), (128, 32, 8, 1),
                                             (64, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2), (64, 16, 4, 3))]
        return [AttnConfig(*c) for c in ((16, 64, 8, 2), (16, 64, 8, 3), (16, 64, 8, 1), (32, 64, 8, 2),
                                         (32, 64, 8, 3), (32, 64, 8, 1), (64, 64, 8, 2), (16, 64, 4, 2))]
    if kind == "fused":  # read offline first (scripts/compile_bwd.py): 8 warps keep spills to tens of bytes
        if headdim == 64:
            return [AttnConfig(*c) for c in ((64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3),
                                             (128, 64, 8, 2), (32, 128, 8, 3))]
        return [AttnConfig(*c) for c in ((64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2),
                                         (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2))]
    if headdim == 128 and kind == "dq":  # around v2's winners: deeper pipelines, 128-key tiles
        return [AttnConfig(*c) for c in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                                         (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 8, 3),
                                         (64, 128, 8, 3), (64, 64, 8, 3))]
    if headdim == 128 and kind == "dkdv":
        return [AttnConfig(*c) for c in ((64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 8, 2),
                                         (128, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (32, 128, 4, 3),
                                         (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3))]
    if kind == "fwd":
        shapes = [(128, 64), (128, 128), (64, 64)]
    elif kind == "dq":
        shapes = [(64, 64), (128, 32), (128, 64), (128, 128)]
    else:  # dK/dV programs hold block_n keys and stream block_m queries
        shapes = [(32, 128), (64, 64), (64, 128), (128, 64), (128, 128)]
    return [AttnConfig(bm, bn, w, s) for (bm, bn), w, s in itertools.product(shapes, (4, 8), (2, 3, 4))
            if not (kind != "fwd" and w == 4 and bm * bn >= 128 * 128)]


def make_inputs(headdim: int, seqlen: int, batch: int, device: str, seed: int = 0, dtype=None):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    nheads = HIDDEN // headdim
    shape = (batch, seqlen, nheads, headdim)
    # The interpreter computes in numpy, which has no bfloat16: fp16 stands in for the CPU smoke run.
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float16
    return [torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4)]


def runner(kind: str, headdim: int, causal: bool, cfg, q, k, v, dout, others=None):
    """A thunk running the kernel(s) of ``kind`` with ``cfg`` (and the ``others`` table) in force,
    returning (out,) or grads."""
    from ioattn.kernels.launch import attn_bwd, attn_fwd, configs_overridden, make_problem

    seqlen = q.shape[1]
    prob = make_problem(q, k, None, seqlen, seqlen, headdim ** -0.5, -1, 0 if causal else -1, 0.0, 0.0)
    table = {**(others or {}), (kind, headdim, causal): cfg}
    if kind == "fwd":
        def run():
            with configs_overridden(table):
                return attn_fwd(q, k, v, None, None, None, prob, 0)[:1]
        return run
    out, lse = attn_fwd(q, k, v, None, None, None, prob, 0)

    def run():
        with configs_overridden(table):
            return attn_bwd(dout, q, k, v, out, lse, None, None, None, prob, 0,
                            deterministic=kind != "fused")
    return run


_REFS: dict = {}


def _reference(headdim: int, causal: bool, device: str, seqlen: int, dtype=None):
    """(inputs, fp32 reference results, low-precision SDPA's error against them) at the check shape."""
    import torch
    import torch.nn.functional as F

    key = (headdim, causal, seqlen, dtype)
    if key not in _REFS:
        q, k, v, dout = make_inputs(headdim, seqlen, 1, device, seed=1, dtype=dtype)

        def sdpa(dtype):
            xs = [x.to(dtype).transpose(1, 2).requires_grad_(True) for x in (q, k, v)]
            o = F.scaled_dot_product_attention(*xs, is_causal=causal)
            grads = torch.autograd.grad(o, xs, dout.to(dtype).transpose(1, 2))
            return [o.transpose(1, 2).float()] + [g.transpose(1, 2).float() for g in grads]

        ref = sdpa(torch.float32)
        low = sdpa(q.dtype)
        base_err = [(a - b).abs().max().item() for a, b in zip(low, ref, strict=True)]
        _REFS[key] = ((q, k, v, dout), ref, base_err)
    return _REFS[key]


def check(task):
    """Worker: compile and check one candidate. Returns (task, ok, message, seconds)."""
    import torch

    kind, headdim, causal, cfg, device, seqlen = task
    t0 = time.perf_counter()
    try:
        (q, k, v, dout), ref, base_err = _reference(headdim, causal, device, seqlen)
        got = runner(kind, headdim, causal, cfg, q, k, v, dout)()
        ref_sel = ref[:1] if kind == "fwd" else ref[1:]
        base_sel = base_err[:1] if kind == "fwd" else base_err[1:]
        errs = [(g.float() - r).abs().max().item() for g, r in zip(got, ref_sel, strict=True)]
        ok = all(e <= 3 * b + 2e-3 for e, b in zip(errs, base_sel, strict=True))
        msg = "err " + " ".join(f"{e:.2e}/{b:.2e}" for e, b in zip(errs, base_sel, strict=True))
        if device == "cuda":
            # fp32 inputs derive their tiles from the same row (launch.get_config): they must still fit.
            (q, k, v, dout), ref, _ = _reference(headdim, causal, device, 128, torch.float32)
            got = runner(kind, headdim, causal, cfg, q, k, v, dout)()
            err32 = max((g - r).abs().max().item()
                        for g, r in zip(got, ref[:1] if kind == "fwd" else ref[1:], strict=True))
            ok = ok and err32 <= 1e-3
            msg += f", fp32 {err32:.1e}"
    except Exception as exc:  # a config that does not compile or run is simply not a candidate
        ok, msg = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        traceback.print_exc(limit=2)
    return task, ok, msg, time.perf_counter() - t0


def bench_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tflops(kind: str, headdim: int, causal: bool, seqlen: int, ms: float) -> float:
    batch, nheads = TOKENS // seqlen, HIDDEN // headdim
    fwd = 4.0 * seqlen * seqlen * headdim * nheads * batch / (2 if causal else 1)
    return fwd * (1.0 if kind == "fwd" else 2.5) / (ms * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two configs (CPU interpreter)")
    parser.add_argument("--kinds", default="fwd,dkdv,dq")
    parser.add_argument("--headdims", default="64,128")
    parser.add_argument("--default-only", default="",
                        help="kinds timed at their current row only (a baseline in the same process)")
    parser.add_argument("--write-launch", metavar="PATH",
                        help="rewrite the chosen rows of this launch.py's table in place")
    args = parser.parse_args()
    global TOKENS, HIDDEN, SEQLEN, OTHER_SEQLENS, CHECK_SEQLEN
    if args.smoke:
        TOKENS, HIDDEN, SEQLEN, OTHER_SEQLENS, CHECK_SEQLEN = 128, 64, 64, (32,), 40
    import torch

    from ioattn.kernels.launch import _CONFIGS, get_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kinds = args.kinds.split(",")
    headdims = [int(x) for x in args.headdims.split(",")]
    defaults = {(kind, d, c): (_CONFIGS[(kind, d, c)] if device == "cuda"
                               else get_config(kind, d, c, torch.bfloat16))
                for kind in kinds for d in headdims for c in (False, True)}
    tasks = [(kind, d, c, cfg, device, CHECK_SEQLEN) for kind in kinds for d in headdims for c in (False, True)
             for cfg in dict.fromkeys([defaults[(kind, d, c)],
                                       *([] if kind in args.default_only.split(",")
                                         else candidates(kind, d, args.smoke))])]
    t0 = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            checked = pool.map(check, tasks, chunksize=1)
    else:
        checked = [check(t) for t in tasks]
    print(f"phase 1: {len(tasks)} candidates compiled and checked in {time.perf_counter() - t0:.0f} s",
          flush=True)
    passing: dict[tuple, list] = {}
    records = []
    for (kind, d, c, cfg, _, _), ok, msg, secs in checked:
        records.append({"kind": kind, "headdim": d, "causal": c, "config": list(cfg.__dict__.values()),
                        "ok": ok, "check": msg, "check_s": round(secs, 1)})
        if ok:
            passing.setdefault((kind, d, c), []).append(cfg)
        else:
            print(f"REJECTED {kind} d={d} causal={c} {cfg}: {msg}", flush=True)

    def time_at(kind, d, c, cfg, seqlen, inputs_cache):
        if (d, seqlen) not in inputs_cache:
            inputs_cache.clear()
            inputs_cache[(d, seqlen)] = make_inputs(d, seqlen, TOKENS // seqlen, device)
        fn = runner(kind, d, c, cfg, *inputs_cache[(d, seqlen)], others=winners)
        return bench_ms(fn, device)

    # Each kind is timed with the kinds already chosen in force (e.g. dK/dV after the new dQ row).
    chosen, timings, winners = {}, [], {}
    t0 = time.perf_counter()
    for d in headdims:
        cache: dict = {}
        for c in (False, True):
            for kind in kinds:
                key = (kind, d, c)
                cands = passing.get(key, [])
                if not cands:
                    print(f"NO PASSING CONFIG for {key}", flush=True)
                    continue
                t_main = {cfg: time_at(kind, d, c, cfg, SEQLEN, cache) for cfg in cands}
                for cfg, ms in t_main.items():
                    timings.append({"kind": kind, "headdim": d, "causal": c, "seqlen": SEQLEN,
                                    "config": list(cfg.__dict__.values()), "ms": ms,
                                    "tflops": tflops(kind, d, c, SEQLEN, ms)})
                finalists = sorted(t_main, key=t_main.get)[:3]
                if defaults[key] in t_main and defaults[key] not in finalists:
                    finalists.append(defaults[key])
                per_len = {SEQLEN: {f: t_main[f] for f in finalists}}
                for seqlen in OTHER_SEQLENS:
                    per_len[seqlen] = {f: time_at(kind, d, c, f, seqlen, cache) for f in finalists}
                    for f, ms in per_len[seqlen].items():
                        timings.append({"kind": kind, "headdim": d, "causal": c, "seqlen": seqlen,
                                        "config": list(f.__dict__.values()), "ms": ms,
                                        "tflops": tflops(kind, d, c, seqlen, ms)})
                cache.clear()
                score = {f: statistics.mean(per_len[s][f] / min(per_len[s].values()) for s in per_len)
                         for f in finalists}
                best = min(score, key=score.get)
                chosen[key] = (best, defaults[key], per_len)
                winners[key] = best
    print(f"phase 2: timed in {time.perf_counter() - t0:.0f} s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "torch": torch.__version__, "triton": __import__("triton").__version__,
                   "commit": os.environ.get("IOATTN_COMMIT", ""), "checks": records,
                   "timings": timings}, fh, indent=1)

    print("\nchosen configs (kernel, headdim, causal): AttnConfig(block_m, block_n, warps, stages)")
    lens = sorted({SEQLEN, *OTHER_SEQLENS})
    print(f"{'key':<28} {'chosen':<22} {'default':<22} " + " ".join(f"{s:>13}" for s in lens))
    for (kind, d, c), (best, default, per_len) in chosen.items():
        cells = []
        for s in lens:
            new = tflops(kind, d, c, s, per_len[s][best])
            old = per_len[s].get(default)
            cells.append(f"{new:6.0f}/{tflops(kind, d, c, s, old):<6.0f}" if old else f"{new:6.0f}/   -  ")
        fmt = lambda cfg: f"({cfg.block_m},{cfg.block_n},{cfg.num_warps},{cfg.num_stages})"  # noqa: E731
        print(f"{kind + ' d' + str(d) + (' causal' if c else ''):<28} {fmt(best):<22} {fmt(default):<22} "
              + " ".join(f"{x:>13}" for x in cells))
    print("TFLOPs/s chosen/default per seqlen (bwd kinds: of the whole backward)")
    print("\n".join(f'    ("{k}", {d}, {c}): AttnConfig{tuple(b.__dict__.values())},'
                    for (k, d, c), (b, _, _) in chosen.items()))
    if args.write_launch:
        write_launch(args.write_launch, {key: best for key, (best, _, _) in chosen.items()})
    sys.stdout.flush()


def write_launch(path: str, rows: dict) -> None:
    """Replace the ``_CONFIGS`` rows named in ``rows`` in ``path`` (the sweep's output becomes the table)."""
    text = open(path).read()
    for (kind, d, c), cfg in rows.items():
        pattern = re.compile(rf'(\("{kind}", {d}, {c}\): )AttnConfig\([^)]*\)')
        text, n = pattern.subn(rf"\g<1>AttnConfig{tuple(cfg.__dict__.values())}", text)
        if n != 1:
            raise SystemExit(f"{path}: found {n} rows for {(kind, d, c)}")
    with open(path, "w") as fh:
        fh.write(text)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
