"""``ioattn bench``: speed against the peers, one suite at a time.

    ioattn bench [fa2] [--modes fwd,bwd,fwdbwd] [--headdims 64,128,256] [--seqlens 512,...,16384]
                 [--causal both|true|false] [--peers ...] [--quick] [--json PATH] [--plot-dir DIR]
                 [--device cuda]

A suite is a module in this package registered in :data:`SUITES`, with

* ``NAME`` (the sub-command), ``DESCRIPTION`` (its help line) and ``LAYOUT`` (a :class:`report.Layout`:
  the row schema, the metric, how rows pivot into the table and split into figures);
* ``add_arguments(parser)`` for its own options;
* ``run(args, device, progress_enabled) -> (rows, notes)``, timing with :mod:`.timing` and its peers.

Everything after the run (the JSON file, the table, the plots) is shared, in :mod:`.report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from . import decode, fa2, features, report

SUITES: dict[str, ModuleType] = {fa2.NAME: fa2, decode.NAME: decode, features.NAME: features}
DEFAULT_SUITE = fa2.NAME


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a small subset in under a minute (tiny shapes on CPU, for CI)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default benchmarks/results/<device>-<date>.json)")
    parser.add_argument("--plot-dir", type=Path, default=None,
                        help="where the PNG plots go (default: beside the JSON file)")
    parser.add_argument("--merge", action="store_true",
                        help="add to the results file if it exists (same device), replacing the rows "
                             "measured again, so a long benchmark can run in several shorter commands")
    parser.add_argument("--no-plot", action="store_true", help="write no plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ioattn bench", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     epilog=f"Without a SUITE, {DEFAULT_SUITE} runs; "
                                            "`ioattn bench SUITE -h` lists its options.")
    sub = parser.add_subparsers(dest="suite", metavar="SUITE")
    for name, suite in SUITES.items():
        p = sub.add_parser(name, help=suite.DESCRIPTION, description=suite.DESCRIPTION)
        suite.add_arguments(p)
        _common_arguments(p)
    return parser


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ioattn bench: --device cuda asked for, but torch sees no CUDA device "
                         "(use --device cpu --quick to exercise the harness)")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    """Run one suite, print its table, write its JSON and plots. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES and argv[0] not in ("-h", "--help"):
        argv.insert(0, DEFAULT_SUITE)
    args = build_parser().parse_args(argv)
    suite = SUITES[args.suite]
    device = _resolve_device(args.device)
    meta = report.run_metadata(device)
    print(f"ioattn bench {suite.NAME} on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {meta['commit']})", flush=True)

    rows, notes = suite.run(args, device, progress_enabled=not args.no_progress)

    if notes:
        print("\nNotes:")
        for note in notes:
            print(f"  - {note}")
    print(f"\n{suite.LAYOUT.metric_label}:\n{report.format_table(rows, suite.LAYOUT)}\n")
    if not rows:
        print("ioattn bench: no peer produced a result; nothing written", file=sys.stderr)
        return 1
    json_path = args.json or report.default_json_path(device, suite.NAME)
    if args.merge and Path(json_path).exists():
        previous = report.read_json(json_path)
        if previous["device"] != meta["device"]:
            print(f"ioattn bench: {json_path} holds results from {previous['device']}, not "
                  f"{meta['device']}; not merged, nothing written", file=sys.stderr)
            return 1
        rows = report.merge_rows(previous["rows"], rows)
    report.write_json(json_path, meta, rows)
    print(f"wrote {json_path}")
    if not args.no_plot:
        title = f"{meta['device']}, {suite.NAME}"
        for path in report.plot(rows, args.plot_dir or Path(json_path).parent, Path(json_path).stem, title,
                                suite.LAYOUT):
            print(f"wrote {path}")
    return 0
