"""What a benchmark run leaves behind: the JSON file, the text table, the PNG plots, the RESULTS.md section.

Every suite describes its rows with a :class:`Layout` (the row schema, the metric, how rows pivot into a
table and split into figures and panels); everything here works from that description alone, so a new
suite (paged decode, ...) gets JSON, tables and plots by declaring one.

The JSON document of a run is exactly::

    {"device": str, "date": "YYYY-MM-DD", "commit": str, "torch": str, "triton": str, "rows": [...]}

with every row carrying exactly the keys of its suite's schema (chosen by the row's ``mode``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DOC_SCHEMA: dict[str, type] = {"device": str, "date": str, "commit": str, "torch": str, "triton": str,
                               "rows": list}


@dataclass(frozen=True)
class Layout:
    """How one suite's rows are stored, tabulated and plotted."""

    schema: dict[str, type]      # every row has exactly these keys, with these types (float accepts int)
    modes: tuple[str, ...]       # the values of "mode" that belong to this suite
    metric: str                  # the key plotted and tabulated ("tflops", "gbps")
    metric_label: str            # its axis label
    row_keys: tuple[str, ...]    # a table row per distinct tuple of these
    column_key: str              # a table column per value of this (also the plots' x axis)
    figure_key: str              # a figure per value of this
    panel_keys: tuple[str, ...]  # a panel per distinct tuple of these within a figure
    line_key: str = "impl"       # a line per value of this within a panel


FA2_LAYOUT = Layout(
    schema={"impl": str, "mode": str, "headdim": int, "causal": bool, "seqlen": int, "batch": int,
            "nheads": int, "ms": float, "tflops": float},
    modes=("fwd", "bwd", "fwdbwd"),
    metric="tflops", metric_label="TFLOPs/s",
    row_keys=("mode", "headdim", "causal", "impl"), column_key="seqlen",
    figure_key="mode", panel_keys=("headdim", "causal"),
)

DECODE_LAYOUT = Layout(
    schema={"impl": str, "mode": str, "headdim": int, "nheads": int, "nheads_k": int, "batch": int,
            "seqlen_k": int, "block_size": int, "ms": float, "gbps": float},
    modes=("decode",),
    metric="gbps", metric_label="GB/s",
    row_keys=("headdim", "nheads", "nheads_k", "block_size", "impl"), column_key="seqlen_k",
    figure_key="mode", panel_keys=("headdim", "nheads", "nheads_k", "block_size"),
)

FEATURES_LAYOUT = Layout(
    schema={"impl": str, "mode": str, "feature": str, "headdim": int, "seqlen": int, "ms": float,
            "tflops": float, "relative": float},
    modes=("feature-fwd", "feature-bwd"),
    metric="relative", metric_label="TFLOPs/s relative to the plain case",
    row_keys=("mode", "headdim", "feature"), column_key="seqlen",
    figure_key="mode", panel_keys=("headdim",), line_key="feature",
)

LAYOUTS: tuple[Layout, ...] = (FA2_LAYOUT, DECODE_LAYOUT, FEATURES_LAYOUT)

_HEADERS = {"headdim": "d", "impl": "impl", "seqlen": "seqlen", "seqlen_k": "KV length"}


def layout_for_mode(mode: str) -> Layout:
    for layout in LAYOUTS:
        if mode in layout.modes:
            return layout
    raise ValueError(f"no suite has rows with mode {mode!r}")


# ---------------------------------------------------------------------------------------------- metadata

def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return "CPU " + line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "CPU " + (platform.processor() or platform.machine())
    return device.type


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD's hash, with '-dirty' when tracked files differ from it; 'unknown' outside a checkout.
    ``IOATTN_COMMIT`` overrides it, for copies of a checkout that travel without their .git."""
    if os.environ.get("IOATTN_COMMIT"):
        return os.environ["IOATTN_COMMIT"]
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=where, capture_output=True,
                               timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


def run_metadata(device: torch.device | str, date: _dt.date | None = None) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "date": (date or _dt.date.today()).isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def results_dir() -> Path:
    """benchmarks/results of the source checkout this package runs from, else of the current directory."""
    repo = Path(__file__).resolve().parents[3]
    root = repo if (repo / "pyproject.toml").exists() and (repo / "src" / "ioattn").is_dir() else Path.cwd()
    return root / "benchmarks" / "results"


def default_json_path(device: torch.device | str, suite: str, date: _dt.date | None = None,
                      root: str | os.PathLike | None = None) -> Path:
    """<results_dir>/<gpu-slug>-<yyyy-mm-dd>.json for the fa2 suite, ...-<suite>.json for others."""
    stem = f"{slug(device_name(device))}-{(date or _dt.date.today()).isoformat()}"
    return Path(root if root is not None else results_dir()) / (
        f"{stem}.json" if suite == "fa2" else f"{stem}-{suite}.json")


# -------------------------------------------------------------------------------------------------- JSON

def _type_ok(value: object, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def validate_document(doc: object) -> None:
    """Raise ValueError unless ``doc`` is exactly a results document (keys, types, date format)."""
    if not isinstance(doc, dict):
        raise ValueError(f"a results document is a JSON object, got {type(doc).__name__}")
    if set(doc) != set(DOC_SCHEMA):
        raise ValueError(f"document keys must be {sorted(DOC_SCHEMA)}, got {sorted(doc)}")
    for key, expected in DOC_SCHEMA.items():
        if not _type_ok(doc[key], expected):
            raise ValueError(f"{key!r} must be {expected.__name__}, got {doc[key]!r}")
    try:
        _dt.date.fromisoformat(doc["date"])
    except ValueError as e:
        raise ValueError(f"'date' must be YYYY-MM-DD, got {doc['date']!r}") from e
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["date"]):
        raise ValueError(f"'date' must be YYYY-MM-DD, got {doc['date']!r}")
    for i, row in enumerate(doc["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("mode"), str):
            raise ValueError(f"rows[{i}] must be an object with a string 'mode', got {row!r}")
        schema = layout_for_mode(row["mode"]).schema
        if set(row) != set(schema):
            raise ValueError(f"rows[{i}] keys must be {sorted(schema)}, got {sorted(row)}")
        for key, expected in schema.items():
            if not _type_ok(row[key], expected):
                raise ValueError(f"rows[{i}][{key!r}] must be {expected.__name__}, got {row[key]!r}")


def make_document(meta: dict[str, str], rows: Sequence[dict]) -> dict:
    """The results document: metadata then rows with their keys in schema order and floats as floats."""
    ordered = []
    for i, row in enumerate(rows):
        schema = layout_for_mode(row["mode"]).schema
        if set(row) != set(schema):
            raise ValueError(f"rows[{i}] keys must be {sorted(schema)}, got {sorted(row)}")
        ordered.append({k: float(row[k]) if t is float else row[k] for k, t in schema.items()})
    doc = {k: meta[k] for k in DOC_SCHEMA if k != "rows"}
    doc["rows"] = ordered
    validate_document(doc)
    return doc


def write_json(path: str | os.PathLike, meta: dict[str, str], rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = make_document(meta, rows)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def read_json(path: str | os.PathLike) -> dict:
    doc = json.loads(Path(path).read_text())
    validate_document(doc)
    return doc


def merge_rows(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """``old`` with the rows that ``new`` measures again replaced (same keys but the measured floats: time,
    metric and, for features, both TFLOPs/s and the ratio), then the rest of ``new``: several shorter runs
    add up to one results file."""
    def key(row: dict) -> tuple:
        layout = layout_for_mode(row["mode"])
        return tuple(row[k] for k, kind in layout.schema.items() if kind is not float)

    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in old]
    return merged + [r for r in new if key(r) in fresh]


# ------------------------------------------------------------------------------------------------- table

def _fmt_metric(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def format_table(rows: Sequence[dict], layout: Layout | None = None) -> str:
    """A markdown table like ANCHORS.md: a row per ``layout.row_keys``, a column per ``column_key``.

    Missing cells (a peer skipped at that size) show as '–'.
    """
    if not rows:
        return "(no results)"
    layout = layout or layout_for_mode(rows[0]["mode"])
    columns = sorted({r[layout.column_key] for r in rows})
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in layout.row_keys), {})[r[layout.column_key]] = r[layout.metric]
    line_order = _line_order(rows, layout.line_key)

    def sort_key(key: tuple) -> tuple:
        return tuple(line_order.index(v) if k == layout.line_key else (layout.modes.index(v) if k == "mode" else v)
                     for k, v in zip(layout.row_keys, key, strict=True))

    head = [_HEADERS.get(k, k) for k in layout.row_keys] + [str(c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells, key=sort_key):
        values = [_fmt_metric(cells[key][c]) if c in cells[key] else "–" for c in columns]
        lines.append("| " + " | ".join([str(v) for v in key] + values) + " |")
    return "\n".join(lines)


def _line_order(rows: Iterable[dict], key: str = "impl") -> list[str]:
    order: list[str] = []
    for r in rows:
        if r[key] not in order:
            order.append(r[key])
    return order


# ------------------------------------------------------------------------------------------------- plots

def _panel_title(layout: Layout, key: tuple) -> str:
    parts = []
    for name, value in zip(layout.panel_keys, key, strict=True):
        if name == "causal":
            parts.append("causal" if value else "non-causal")
        else:
            parts.append(f"{_HEADERS.get(name, name)}={value}")
    return ", ".join(parts)


def plot(rows: Sequence[dict], out_dir: str | os.PathLike, stem: str, title: str = "",
         layout: Layout | None = None) -> list[Path]:
    """One PNG per figure value (per mode): a panel per ``panel_keys``, metric against the column key on a
    log2 axis, a line per implementation. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return []
    layout = layout or layout_for_mode(rows[0]["mode"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    impls = _line_order(rows, layout.line_key)
    colours = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    written = []
    figure_values = [m for m in layout.modes if any(r[layout.figure_key] == m for r in rows)]
    for fig_value in figure_values:
        sub = [r for r in rows if r[layout.figure_key] == fig_value]
        panels = sorted({tuple(r[k] for k in layout.panel_keys) for r in sub})
        ncols = min(len(panels), 2 if len(panels) % 2 == 0 else 3)
        nrows = -(-len(panels) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            in_panel = [r for r in sub if tuple(r[k] for k in layout.panel_keys) == panel]
            for impl in impls:
                pts = sorted((r[layout.column_key], r[layout.metric]) for r in in_panel
                             if r[layout.line_key] == impl)
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker="o", label=impl, color=colours[impl])
            xs_all = sorted({r[layout.column_key] for r in in_panel})
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all)
            ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs_all])
            ax.set_ylim(bottom=0)
            ax.set_title(_panel_title(layout, panel))
            ax.set_xlabel(_HEADERS.get(layout.column_key, layout.column_key))
            ax.set_ylabel(f"{layout.metric_label}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{title} {fig_value}".strip())
        fig.tight_layout()
        path = out_dir / f"{stem}-{fig_value}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_paths(json_path: str | os.PathLike, plot_dir: str | os.PathLike | None = None) -> list[Path]:
    """The plot files that :func:`plot` writes for a results file (``<stem>-<mode>.png``), existing ones."""
    json_path = Path(json_path)
    plot_dir = Path(plot_dir) if plot_dir is not None else json_path.parent
    doc = read_json(json_path)
    modes = []
    for r in doc["rows"]:
        if r["mode"] not in modes:
            modes.append(r["mode"])
    layout = layout_for_mode(modes[0]) if modes else FA2_LAYOUT
    ordered = [m for m in layout.modes if m in modes]
    return [p for p in (plot_dir / f"{json_path.stem}-{m}.png" for m in ordered) if p.exists()]


def _joined(values: Iterable[int]) -> str:
    return " / ".join(str(v) for v in sorted(set(values)))


def render_results_md(json_path: str | os.PathLike, plot_dir: str | os.PathLike | None = None,
                      relative_to: str | os.PathLike | None = None) -> str:
    """The benchmarks/RESULTS.md section for one run: device, versions, commit, the table and the plots.

    Plot links are relative to ``relative_to`` (default: the directory above the JSON's, i.e. benchmarks/
    for benchmarks/results/<file>.json, where RESULTS.md lives).
    """
    json_path = Path(json_path)
    doc = read_json(json_path)
    base = Path(relative_to) if relative_to is not None else json_path.parent.parent
    rows = doc["rows"]
    layout = layout_for_mode(rows[0]["mode"]) if rows else FA2_LAYOUT
    lines = [
        f"## {doc['device']}, {doc['date']}",
        "",
        f"torch {doc['torch']}, triton {doc['triton']}, commit `{doc['commit']}`; "
        f"raw numbers in [`{json_path.name}`]({os.path.relpath(json_path, base)}).",
        "",
    ]
    if layout is FA2_LAYOUT:
        lines += [
            "FlashAttention-2 paper setup: batch × seqlen tokens, nheads × headdim hidden; "
            "FLOPs = 4·seqlen²·headdim·nheads·batch forward (halved when causal), backward 2.5× forward; "
            "bwd = (fwd+bwd) − fwd; medians of `triton.testing.do_bench`. "
            f"Here batch × seqlen = {_joined(r['batch'] * r['seqlen'] for r in rows)} tokens, "
            f"nheads × headdim = {_joined(r['nheads'] * r['headdim'] for r in rows)}.",
            "",
        ]
    lines += [f"{layout.metric_label}:", "", format_table(rows, layout), ""]
    for path in plot_paths(json_path, plot_dir):
        lines += [f"![{path.stem}]({os.path.relpath(path, base)})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- progress

class Progress:
    """A progress bar (tqdm when installed, plain lines otherwise) that also collects notes."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        self.notes: list[str] = []
        self._bar = None
        self._done = 0
        self._total = total
        self._enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, what: str) -> None:
        """One unit of work finished; ``what`` says which."""
        self._done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
        elif self._enabled:
            print(f"[{self._done}/{self._total}] {what}", flush=True)

    def note(self, message: str) -> None:
        """Record a skipped peer or an anomaly once; printed above the bar now and listed at the end."""
        if message in self.notes:
            return
        self.notes.append(message)
        if self._bar is not None:
            self._bar.write(f"note: {message}")
        elif self._enabled:
            print(f"note: {message}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
