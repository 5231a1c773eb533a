"""Forward speed of the Gluon Hopper kernel against the portable ioattn kernel, in one process.

``features``: the ``ioattn bench features`` cases (d=128, bf16, 16k tokens, hidden 2048), forward only,
each timed with the Gluon kernel routed (``IOATTN_GLUON=1``) and with the portable kernel
(``IOATTN_GLUON=0``); relatives are over the plain case with the Gluon kernel, as the features suite counts
them (TFLOPs/s over the pairs a mask allows).
``direct``: ``gluon_forward`` itself at 16k (``--direct-seqlens``), d=128, for masks and varlen (no interface
checks), with the shipped config and each d=128 candidate of ``configs``.
``configs``: Gluon configs (``FwdConfig``: tiles and schedule) against the portable kernel and cuDNN's
SDPA at d=64 and d=128 on the FA2 shapes (batch x seqlen = 16k, hidden 2048), causal and not; each output
is checked against the portable kernel's first (cuDNN's with ``--no-portable``). The candidates of a row are
timed in ``--rounds`` interleaved rounds and each keeps its median. ``--baseline FILE`` adds another version of
the kernel module (e.g. ``git show REV:src/ioattn/kernels/attn_fwd_gluon.py``) with its shipped config, as
"baseline".

do_bench medians (L2 flushed between calls). ``--json PATH`` writes every row.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys

import torch
import triton

from ioattn.bench.features import allowed_pairs, make_case
from ioattn.bench.peers import SdpaPeer
from ioattn.kernels.attn_fwd_gluon import _CONFIGS, FwdConfig, gluon_forward
from ioattn.ops.attention import flash_attention

FEATURES = ("plain", "causal", "varlen", "varlen-mixed", "gqa-4", "window", "softcap", "alibi")
# Candidates, read offline first (scripts/compile_gluon_fwd.py --config): at d=64 the shipped one-warpgroup
# tiles (three programs per SM); at d=128 the warp-specialised ping-pong schedule on (64, 128) per consumer
# (180 KB, one program per SM, consumers at 240 registers) as shipped before v4 (persistent for dense inputs
# without a right window, one tile per program otherwise), with the dynamic schedule for causal and right
# windows, and with the output through a bulk tensor store (197 KB).
CONFIGS = {64: [_CONFIGS[64]],
           128: [FwdConfig(64, 128, 2, 4, "pingpong", True, True),
                 FwdConfig(64, 128, 2, 4, "pingpong", True, True, True),
                 FwdConfig(64, 128, 2, 4, "pingpong", True, True, True, True)]}


def _key(cfg: FwdConfig) -> str:
    return ",".join(map(str, cfg[:4])) + ("" if cfg.schedule == "single" else f" {cfg.schedule}") + (
        " ovl" if cfg.overlap else "") + (" pers" if cfg.persistent else "") + (" dyn" if cfg.dynamic else "") + (
        " tma" if cfg.tma_store else "")


# ``--baseline FILE``: another version of attn_fwd_gluon.py (its shipped config), timed as "baseline".
BASELINE = None


def _load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("ioattn.kernels._baseline_fwd_gluon", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def bench_features(seqlens) -> list[dict]:
    rows = []
    for seqlen in seqlens:
        plain_gluon = None
        for feature in FEATURES:
            call, _, flops = make_case(feature, seqlen, 128, torch.device("cuda"), torch.bfloat16)
            row = {"suite": "features", "feature": feature, "seqlen": seqlen}
            with torch.no_grad():
                for route in ("1", "0"):
                    os.environ["IOATTN_GLUON"] = route
                    tflops = flops / _ms(call) * 1e-9
                    row["gluon" if route == "1" else "portable"] = tflops
            os.environ.pop("IOATTN_GLUON")
            plain_gluon = plain_gluon or row["gluon"]
            row["rel_gluon"] = row["gluon"] / plain_gluon
            row["rel_portable"] = row["portable"] / plain_gluon
            rows.append(row)
            print(f"features {seqlen:>6} {feature:<13} gluon {row['gluon']:6.1f} ({row['rel_gluon']:.3f})  "
                  f"portable {row['portable']:6.1f} ({row['rel_portable']:.3f})", flush=True)
    return rows


def _config_row(d: int, causal: bool, seqlen: int, rounds: int, portable_timed: bool = True) -> dict:
    batch, nheads = 16384 // seqlen, 2048 // d
    q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * seqlen * seqlen * d * nheads * batch / (2 if causal else 1)
    scale = 1.0 / math.sqrt(d)
    window = (-1, 0) if causal else (-1, -1)

    def portable():
        return flash_attention(q, k, v, softmax_scale=scale, causal=causal, window_size=window, softcap=0.0,
                               alibi_slopes=None, dropout_p=0.0, deterministic=True)[0]

    cudnn = SdpaPeer("sdpa-cudnn", "CUDNN_ATTENTION")
    if portable_timed:
        os.environ["IOATTN_GLUON"] = "0"
        ref = portable().float()
        os.environ.pop("IOATTN_GLUON")
    else:
        ref = cudnn.forward(q, k, v, causal).float()
    fns = {"sdpa-cudnn": lambda: cudnn.forward(q, k, v, causal)}
    if BASELINE is not None:
        fns["baseline"] = lambda: BASELINE.gluon_forward(q, k, v, scale, window)[0]
    for cfg in CONFIGS[d]:
        def fn(cfg=cfg):
            return gluon_forward(q, k, v, scale, window, config=cfg)[0]

        err = ((fn().float() - ref).norm() / ref.norm()).item()
        if err < 1e-2:
            fns[_key(cfg)] = fn
        else:
            print(f"config {_key(cfg)} d={d} causal={causal} seqlen={seqlen}: error {err:.2e}")
    times = {name: [] for name in (["portable"] if portable_timed else []) + list(fns)}
    for _ in range(rounds):
        if portable_timed:
            os.environ["IOATTN_GLUON"] = "0"
            times["portable"].append(_ms(portable))
            os.environ.pop("IOATTN_GLUON")
        for name, fn in fns.items():
            times[name].append(_ms(fn))
    row = {"suite": "configs", "d": d, "causal": causal, "seqlen": seqlen}
    row.update({name: flops / sorted(ts)[len(ts) // 2] * 1e-9 for name, ts in times.items()})
    row.update({f"{name} / cudnn": row[name] / row["sdpa-cudnn"] for name in fns if name != "sdpa-cudnn"})
    return row


def bench_configs(headdims, seqlens, rounds, portable_timed=True) -> list[dict]:
    rows = []
    for d in headdims:
        for causal in (False, True):
            for seqlen in seqlens:
                row = _config_row(d, causal, seqlen, rounds, portable_timed)
                rows.append(row)
                shown = {k: (round(v, 3 if "/" in k else 1) if isinstance(v, float) else v) for k, v in row.items()}
                print("configs", shown, flush=True)
    return rows


def bench_direct(seqlen: int = 16384, configs=(None,), only=None) -> list[dict]:
    """gluon_forward called directly (no interface checks) at d=128: masks that cost more than their
    geometry says, and varlen with and without the public entry point's host-side cu_seqlens checks.
    ``configs``: d=128 configs timed for the gluon_forward cases (None: the shipped one), interleaved."""
    import ioattn

    nheads, d = 16, 128
    batch = 16384 // seqlen
    q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seqlen
    qv, kv, vv = (t.view(batch * seqlen, nheads, d) for t in (q, k, v))

    def cases(cfg):
        gf = functools.partial(gluon_forward, config=cfg)
        named = {
            "plain": (lambda: gf(q, k, v, scale), (-1, -1)),
            "causal": (lambda: gf(q, k, v, scale, (-1, 0)), (-1, 0)),
            "window-both": (lambda: gf(q, k, v, scale, (seqlen // 8, seqlen // 8)), (seqlen // 8,) * 2),
            "window-left": (lambda: gf(q, k, v, scale, (seqlen // 8, -1)), (seqlen // 8, -1)),
            "window-right": (lambda: gf(q, k, v, scale, (-1, seqlen // 8)), (-1, seqlen // 8)),
            "varlen-direct": (lambda: gf(qv, kv, vv, scale, (-1, -1), 0.0, None, cu, cu, seqlen, seqlen), (-1, -1)),
        }
        if cfg is None:
            named["varlen-api"] = (lambda: ioattn.flash_attn_varlen_func(qv, kv, vv, cu, cu, seqlen, seqlen),
                                   (-1, -1))
            named["dense-api"] = (lambda: ioattn.flash_attn_func(q, k, v), (-1, -1))
        return named

    rows = []
    for name in cases(None):
        if only is not None and name not in only:
            continue
        row = {"suite": "direct", "case": name, "seqlen": seqlen}
        for cfg in configs:
            named = cases(cfg)
            if name not in named:
                continue
            fn, window = named[name]
            flops = 4.0 * d * nheads * batch * allowed_pairs(seqlen, window)
            row["shipped" if cfg is None else _key(cfg)] = flops / _ms(fn) * 1e-9
        rows.append(row)
        print("direct", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suites", default="features,direct,configs")
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configs row")
    ap.add_argument("--no-portable", action="store_true", help="configs: do not time the portable kernel")
    ap.add_argument("--direct-seqlens", default="16384")
    ap.add_argument("--baseline", help="another attn_fwd_gluon.py, timed with its shipped config")
    ap.add_argument("--direct-cases", help="comma-separated subset of the direct suite's cases")
    ap.add_argument("--only-shipped", action="store_true", help="configs: the shipped config as the only candidate")
    ap.add_argument("--json", type=str)
    args = ap.parse_args()
    if args.only_shipped:
        CONFIGS.update({d: [cfg] for d, cfg in _CONFIGS.items()})
    global BASELINE
    if args.baseline:
        BASELINE = _load_baseline(args.baseline)
    seqlens = [int(x) for x in args.seqlens.split(",")]
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("IOATTN_COMMIT", ""),
            "shipped_configs": {str(k): _key(v) for k, v in _CONFIGS.items()}}
    print(info)
    rows = []
    suites = args.suites.split(",")
    if "features" in suites:
        rows += bench_features(seqlens)
    if "direct" in suites:
        for seqlen in (int(x) for x in args.direct_seqlens.split(",")):
            rows += bench_direct(seqlen, [None] + CONFIGS[128] * (not args.only_shipped),
                                 args.direct_cases.split(",") if args.direct_cases else None)
    if "configs" in suites:
        rows += bench_configs([int(x) for x in args.headdims.split(",")], seqlens, args.rounds,
                              not args.no_portable)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
