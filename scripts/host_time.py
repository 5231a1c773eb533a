"""Host time of ioattn's calls on one GPU: wall time per call over many calls with a shape so small that the
GPU never waits, so the queue never fills and the time is the host's (Python, dispatch, launches).

    PYTHONPATH=src python scripts/host_time.py [--headdim 128] [--seqlen 128] [--batch 4] [--heads 16]

Prints forward, backward through autograd, forward+backward through autograd (with and without the autograd
engine's device thread), SDPA's cuDNN backend beside them, a forward and a forward+backward whose shape changes
every call (no launch plan ever hits), one KV-cache decode call, and paged varlen calls on each route (and a
chunk beside decode rows whose shape changes every 32 calls, as a 32-layer model's steps).
``--pieces`` also times the parts of a Gluon forward call (Triton's launch path, descriptors, allocations),
``--profile N`` prints the N costliest functions (cProfile, own time) of a forward, a forward+backward, a decode
call and the paged varlen calls, ``--plans-ab R`` times a few rows with launch plans off and on in turn, R rounds,
in one process (hosts differ between processes).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn


def host_us(fn, n: int = 300, blocks: int = 15) -> tuple[float, float]:
    """(host microseconds a call, microseconds a call including the final synchronisation): the median over
    ``blocks`` blocks of ``n // blocks`` calls each (a busy host's stalls fall in a few blocks)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = max(1, n // blocks)
    hosts, totals = [], []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(per):
            fn()
        hosts.append((time.perf_counter() - t) / per * 1e6)
        torch.cuda.synchronize()
        totals.append((time.perf_counter() - t) / per * 1e6)
    return statistics.median(hosts), statistics.median(totals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--pieces", action="store_true", help="also time the parts of a Gluon forward call")
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest functions of each call")
    ap.add_argument("--plans-ab", type=int, default=0, metavar="ROUNDS",
                    help="also time some rows with launch plans off and on in turn, ROUNDS times, in this process")
    ap.add_argument("--threads", action="store_true",
                    help="also split a forward+backward's time between the calling and the autograd device thread")
    args = ap.parse_args()
    shape = (args.batch, args.seqlen, args.heads, args.headdim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    out = ioattn.flash_attn_func(q, k, v, causal=True)

    def fwd_bwd():
        return torch.autograd.grad(ioattn.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)

    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))

    def sdpa_fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return torch.autograd.grad(o, (qt, kt, vt), dout.transpose(1, 2))

    kc = torch.randn(64, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    qd = torch.randn(64, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((64,), 1000, device="cuda", dtype=torch.int32)
    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt.detach(), kt.detach(), vt.detach(), is_causal=True)

    # Shapes that never repeat within a timing (more than a plan table holds): what a call costs where launch
    # plans never hit (the key made and handed on, the sighting marked, no plan recorded). Compare these rows
    # with plans on and off: the slices add a few us of their own (autograd records them in forward+backward).
    many = 4096
    qm, km, vm = (torch.randn(many, 16, 2, args.headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    dm = torch.randn_like(qm)
    turn = iter(range(10**9))

    def new_shape_fwd():
        b = 1 + next(turn) % many
        return ioattn.flash_attn_func(qm[:b].detach(), km[:b].detach(), vm[:b].detach(), causal=True)

    def new_shape_fwd_bwd():
        b = 1 + next(turn) % many
        qb, kb, vb = qm[:b], km[:b], vm[:b]
        return torch.autograd.grad(ioattn.flash_attn_func(qb, kb, vb, causal=True), (qb, kb, vb), dm[:b])

    paged = _paged_varlen_calls()
    cases = {
        "forward (no grad)": lambda: ioattn.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True),
        "forward (inputs require grad)": lambda: ioattn.flash_attn_func(q, k, v, causal=True),
        "sdpa-cudnn forward (no grad)": sdpa_fwd,
        "backward (autograd)": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
        "forward+backward (autograd)": fwd_bwd,
        "sdpa-cudnn forward+backward": sdpa_fwd_bwd,
        "forward, a new shape each call": new_shape_fwd,
        "forward+backward, a new shape each": new_shape_fwd_bwd,
        "decode (flash_attn_with_kvcache)": lambda: ioattn.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lens),
        **paged,
    }
    for name, fn in cases.items():
        print(f"{name:36s} {host_us(fn)[0]:8.1f} us host")
    with torch.autograd.set_multithreading_enabled(False):
        print(f"{'forward+backward, calling thread':36s} {host_us(fwd_bwd)[0]:8.1f} us host")
    if args.plans_ab:
        plans_ab({name: cases[name] for name in ("forward (no grad)", "forward+backward (autograd)",
                                                 "forward, a new shape each call",
                                                 "forward+backward, a new shape each",
                                                 "decode (flash_attn_with_kvcache)", *paged)}, args.plans_ab)
    if args.pieces:
        pieces(q.detach(), k.detach(), v.detach())
    if args.threads:
        threads(q, k, v, dout)
    if args.profile:
        for name in ("forward (no grad)", "forward, a new shape each call", "decode (flash_attn_with_kvcache)",
                     *paged):
            profile(name, cases[name], args.profile)
        with torch.autograd.set_multithreading_enabled(False):
            profile("forward+backward, calling thread", fwd_bwd, args.profile)


def _paged_varlen_calls() -> dict:
    """``flash_attn_varlen_func`` with ``block_table`` on small steps, one per route (``ops.decode.
    paged_varlen_route``): decode rows (the split-KV kernel), one chunk (the Gluon tiles on sm_90), a chunk beside
    decode rows (both). GQA 32 / 8, d = 128, pages of 16, 256 keys a sequence."""
    kc = torch.randn(8 * 16, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.randperm(8 * 16, device="cuda", dtype=torch.int32).view(8, 16)

    def call(rows: list[int]):
        q = torch.randn(sum(rows), 32, 128, device="cuda", dtype=torch.bfloat16)
        cu_q = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        cu_k = torch.arange(len(rows) + 1, dtype=torch.int32, device="cuda") * 256
        return lambda: ioattn.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(rows), 256, causal=True,
                                                     block_table=table[:len(rows)])

    # A model's step: 32 layers' calls of one shape, each step's chunk one row longer than the last (no shape
    # repeats within a timing): the first two calls of a step take the whole path, the rest its plan.
    q_all = torch.randn(64 + 400 + 7, 32, 128, device="cuda", dtype=torch.bfloat16)
    cu_k = torch.arange(9, dtype=torch.int32, device="cuda") * 256
    steps = [torch.tensor([0, *range(64 + n, 64 + n + 8)], dtype=torch.int32, device="cuda") for n in range(400)]
    turn = iter(range(10**9))

    def layered():
        n = next(turn) // 32 % len(steps)
        return ioattn.flash_attn_varlen_func(q_all[:64 + n + 7], kc, vc, steps[n], cu_k, 64 + n, 256, causal=True,
                                             block_table=table)

    return {"paged varlen, decode rows": call([1] * 8), "paged varlen, one chunk": call([64]),
            "paged varlen, chunk + decode rows": call([64] + [1] * 7),
            "paged varlen, a new step / 32 calls": layered}


def plans_ab(cases: dict, rounds: int) -> None:
    """Each case with launch plans off and on in turn (``fastlaunch.set_plans``, which also drops the plans
    held), ``rounds`` times in this process: the medians, and the median of the per-round differences."""
    from ioattn.kernels.fastlaunch import set_plans

    print(f"launch plans off / on in one process, {rounds} rounds (median us host; median of on - off):")
    try:
        for name, fn in cases.items():
            off, on = [], []
            for _ in range(rounds):
                set_plans(False)
                off.append(host_us(fn)[0])
                set_plans(True)
                on.append(host_us(fn)[0])
            diff = statistics.median(b - a for a, b in zip(off, on, strict=True))
            print(f"  {name:36s} off {statistics.median(off):7.1f}  on {statistics.median(on):7.1f}  "
                  f"on - off {diff:+7.1f}")
    finally:
        set_plans(True)


def profile(name: str, fn, top: int, n: int = 300) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumtime"):
        print(f"\n--- {name}: {n} calls, by {key} ---")
        pstats.Stats(prof).sort_stats(key).print_stats(top)


def _py_work(n: int = 2000) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def threads(q, k, v, dout) -> None:
    """Where a forward+backward's host time goes when autograd runs the backward on its device thread: the
    hand-off there and back, and the backward's own Python on each thread (with and without multithreading)."""
    from ioattn.ops import attention as A

    marks: dict[str, list[float]] = {"enter": [], "exit": []}
    original = A.FlashAttnFunction.backward

    def timed_backward(ctx, *grads):
        marks["enter"].append(time.perf_counter())
        out = original(ctx, *grads)
        marks["exit"].append(time.perf_counter())
        return out

    from ioattn.kernels.attn_bwd_gluon import gluon_backward_supported
    from ioattn.kernels.launch import make_problem

    def glue():  # the backward's kind of Python (library functions, tensor metadata), no CUDA call
        for _ in range(10):
            gluon_backward_supported(q, k, v, dout, dropout_p=0.0, alibi_slopes=None)
            make_problem(q, k, None, 0, 0, 0.1, -1, 0, 0.0, 0.0)

    def launches():  # eight small kernels launched from C++ (torch ops), little Python
        y = torch.empty_like(dout)
        for _ in range(8):
            y.fill_(1.0)

    class Work(torch.autograd.Function):
        """A clone whose backward runs ``Work.body`` (pure Python, library glue, or launches)."""
        body = staticmethod(_py_work)

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            marks["enter"].append(time.perf_counter())
            Work.body()
            marks["exit"].append(time.perf_counter())
            return g

    x = torch.randn(16, device="cuda", requires_grad=True)
    gx = torch.ones(16, device="cuda")
    def clone_grad():
        y = Work.apply(x)
        marks["forward"] = time.perf_counter()
        return torch.autograd.grad(y, (x,), gx)

    def ioattn_grad():
        out = A.flash_attention(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=True, window_size=(-1, 0),
                                softcap=0.0, alibi_slopes=None, dropout_p=0.0, deterministic=False)[0]
        marks["forward"] = time.perf_counter()
        return torch.autograd.grad(out, (q, k, v), dout)

    def body(fn):
        def call():
            Work.body = staticmethod(fn)
            return clone_grad()
        return call

    cases = {
        "python work, main thread": lambda: _py_work(),
        "clone+backward (py work)": body(_py_work),
        "library glue, main thread": glue,
        "clone+backward (glue)": body(glue),
        "8 launches, main thread": launches,
        "clone+backward (launches)": body(launches),
        "ioattn forward+backward": ioattn_grad,
    }
    A.FlashAttnFunction.backward = staticmethod(timed_backward)
    try:
        for mt in (True, False):
            for name, fn in cases.items():
                n = 300
                with torch.autograd.set_multithreading_enabled(mt):
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                    spans = []
                    for _ in range(n):
                        marks["enter"].clear()
                        marks["exit"].clear()
                        t0 = time.perf_counter()
                        fn()
                        t1 = time.perf_counter()
                        if marks["enter"]:
                            spans.append((t0, marks["forward"], marks["enter"][0], marks["exit"][0], t1))
                    torch.cuda.synchronize()
                if spans:
                    us = [sum(s[i + 1] - s[i] for s in spans) / len(spans) * 1e6 for i in range(4)]
                    total = sum(s[4] - s[0] for s in spans) / len(spans) * 1e6
                    print(f"{name:28s} multithreading={mt!s:5s} total {total:7.1f} us: forward {us[0]:6.1f},"
                          f" to backward {us[1]:6.1f}, in backward {us[2]:6.1f}, after {us[3]:6.1f}")
                else:
                    print(f"{name:28s} multithreading={mt!s:5s} total {host_us(fn)[0]:7.1f} us")
                torch.cuda.synchronize()
        gc.disable()
        try:
            print(f"{'ioattn forward+backward, gc off':40s} {host_us(ioattn_grad)[0]:7.1f} us")
        finally:
            gc.enable()
    finally:
        A.FlashAttnFunction.backward = original


def pieces(q, k, v) -> None:
    """The parts of one Gluon forward call (d = q's head dim, causal), each timed alone."""
    from triton import knobs
    from triton.runtime import driver

    from ioattn.kernels import attn_fwd_gluon as G
    from ioattn.kernels.fastlaunch import TmaDesc

    d = q.shape[-1]
    cfg = G._CONFIGS[d]
    scale = d ** -0.5
    rows = []

    def add(name, fn):
        rows.append((name, host_us(fn, 2000)[0]))

    add("gluon_forward (direct)", lambda: G.gluon_forward(q, k, v, scale, (-1, 0)))
    add("gluon_forward_supported", lambda: G.gluon_forward_supported(
        q, k, v, window_size=(-1, 0), softcap=0.0, alibi_slopes=None, dropout_p=0.0, softmax_scale=scale))
    add("gluon_enabled_on", lambda: G.gluon_enabled_on(q, k, v))
    add("torch.cuda.get_device_capability", lambda: torch.cuda.get_device_capability(q.device))
    add("torch.empty (out)", lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device))
    add("torch.tensor(0) (seed)", lambda: torch.tensor(0, dtype=torch.int64))
    add("descriptor (one TmaDesc)", lambda: G._descriptor(q, cfg.block_m))
    add("descriptor (one TensorDescriptor)", lambda: G._descriptor(q, cfg.block_m).real())
    add("_tile_counter", lambda: G._tile_counter(q.device))
    # Triton's launch path with the arguments built once: the binder, the cache key, the launcher.
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    descs = (G._descriptor(q, cfg.block_m), G._descriptor(k, cfg.block_n), G._descriptor(v, cfg.block_n))
    sargs = (*descs, descs[0], out, lse, lse, lse, q, G._tile_counter(q.device),
             out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), 0,
             q.stride(-2), k.stride(-2), v.stride(-2), q.shape[2], 1, q.shape[1], k.shape[1],
             scale * 1.4426950408889634, 1.0, -1, 0, 0, 0.0)
    num_m = -(-q.shape[1] // (2 * cfg.block_m))
    num_tiles = num_m * q.shape[0] * q.shape[2]
    grid = (min(num_tiles, G._num_sms(q.device)),)
    flags = dict(HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.stages, IS_VARLEN=False,
                 SOFTCAP=0, HAS_ALIBI=0, HAS_LEFT=False, HAS_RIGHT=True, DROPOUT=False, OVERLAP=cfg.overlap,
                 num_warps=cfg.warps, PINGPONG=cfg.schedule == "pingpong", CHAIN=False, DYNAMIC=True, O_TMA=False,
                 PAIRED=False)
    add("Launcher (cached compiled kernel)", lambda: G._launch_sched(grid, *sargs, num_tiles, 1, **flags))
    sargs = tuple(a.real() if isinstance(a, TmaDesc) else a for a in sargs)
    kern = G.attn_fwd_gluon_ws_sched_kernel
    compiled = kern[grid](*sargs, num_tiles, 1, **flags)
    add("kernel[grid](...) (Triton's run)", lambda: kern[grid](*sargs, num_tiles, 1, **flags))
    device = driver.active.get_current_device()
    binder = kern.device_caches[device][4]
    add("  binder (specialisation)", lambda: binder(*sargs, num_tiles, 1, **flags))
    bound, spec, options = binder(*sargs, num_tiles, 1, **flags)
    print("specialisation:", spec)
    add("  str(options)", lambda: str(options))
    values = tuple(bound.values())
    stream = driver.active.get_current_stream(device)
    add("  get_current_device + stream", lambda: driver.active.get_current_stream(driver.active.get_current_device()))
    add("  compiled.run (launcher)", lambda: compiled.run(grid[0], 1, 1, stream, compiled.function,
                                                          compiled.packed_metadata, None,
                                                          knobs.runtime.launch_enter_hook,
                                                          knobs.runtime.launch_exit_hook, *values))
    print()
    for name, us in rows:
        print(f"{name:40s} {us:8.1f} us")


if __name__ == "__main__":
    main()
