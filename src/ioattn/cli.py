"""The ``ioattn`` command: info, check, demo, bench, memory, serving-memory."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
from .backend import interpreting, select_backend, triton_available


def cmd_info(_args: argparse.Namespace) -> int:
    import numpy

    lines = [
        ("ioattn", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("numpy", numpy.__version__),
    ]
    try:
        import triton

        lines.append(("triton", triton.__version__))
    except ImportError:
        lines.append(("triton", "not installed"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(("device", f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                                f"{props.total_memory / 2**30:.0f} GiB)"))
    else:
        lines.append(("device", f"CPU only ({platform.processor() or platform.machine()})"))
    ok, why = triton_available()
    lines.append(("backend triton", ("usable: " if ok else "not usable: ") + why))
    lines.append(("backend chunked", "usable: pure PyTorch, any device"))
    lines.append(("TRITON_INTERPRET", "1" if interpreting() else "off"))
    lines.append(("CPU tensors use", select_backend(torch.device("cpu"))))
    if torch.cuda.is_available():
        lines.append(("CUDA tensors use", select_backend(torch.device("cuda"))))
    width = max(len(k) for k, _ in lines)
    for key, val in lines:
        print(f"{key:<{width}}  {val}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_checks

    return run_checks(device=args.device)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, seqlens=args.seqlens)


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ioattn", description="IO-aware exact attention in PyTorch + Triton.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends are usable").set_defaults(func=cmd_info)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = sub.add_parser("check", help="every public function against the float64 reference")
    p.add_argument("--device", default=default_device)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("demo", help="time and peak memory of standard attention against ioattn")
    p.add_argument("--device", default=default_device)
    p.add_argument("--seqlens", type=_parse_ints, default=None, help="comma-separated, e.g. 1024,2048,4096")
    p.set_defaults(func=cmd_demo)
    for name, help_text in (
        ("bench", "speed against the peers (FlashAttention-2 benchmark, decode); see `ioattn bench -h`"),
        ("memory", "the Rabe & Staats memory experiment; see `ioattn memory -h`"),
        ("serving-memory", "the PagedAttention KV-cache memory experiment; see `ioattn serving-memory -h`"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # These subcommands own their argument parsing.
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    if argv and argv[0] == "memory":
        from .bench.memory import main as memory_main

        return int(memory_main(argv[1:]) or 0)
    if argv and argv[0] == "serving-memory":
        from .bench.serving_memory import main as serving_main

        return int(serving_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
