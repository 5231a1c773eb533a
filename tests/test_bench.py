"""The benchmark harness on CPU: schema of the results file, FLOP counts, table, plots, failure handling.

No timing is asserted here (CONVENTIONS: benchmarks never run in a timed CI test); the numbers come from
the GPU runs committed under benchmarks/results/.
"""

import datetime
import json
import time
from pathlib import Path

import pytest
import torch

from ioattn.bench import fa2, main
from ioattn.bench import report as R
from ioattn.bench.fa2 import Config, flops, make_configs, measure_config, tflops
from ioattn.bench.peers import PEER_NAMES, ChunkedPeer, Peer, SdpaMathPeer
from ioattn.bench.timing import QUICK, median_ms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOC_TYPES = {"device": str, "date": str, "commit": str, "torch": str, "triton": str, "rows": list}
ROW_TYPES = {"impl": str, "mode": str, "headdim": int, "causal": bool, "seqlen": int, "batch": int,
             "nheads": int, "ms": float, "tflops": float}


def _is(value, expected):
    # bool is an int subclass in Python; the schema tells them apart.
    if expected is int:
        return type(value) is int
    if expected is float:
        return type(value) is float
    return isinstance(value, expected)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = out / "results" / "cpu-run.json"
    status = main(["--quick", "--device", "cpu", "--json", str(path), "--plot-dir", str(out / "plots"),
                   "--no-progress"])
    return status, path, out / "plots"


def test_quick_cpu_run_writes_the_exact_schema(quick_run):
    status, path, _ = quick_run
    assert status == 0
    doc = json.loads(path.read_text())
    assert set(doc) == set(DOC_TYPES)
    for key, expected in DOC_TYPES.items():
        assert _is(doc[key], expected), (key, doc[key])
    assert datetime.date.fromisoformat(doc["date"]) == datetime.date.today()
    assert len(doc["date"]) == 10
    assert doc["torch"] == torch.__version__
    assert doc["commit"]
    assert doc["rows"]
    for row in doc["rows"]:
        assert list(row) == list(ROW_TYPES), row
        for key, expected in ROW_TYPES.items():
            assert _is(row[key], expected), (key, row)
        assert row["impl"] in PEER_NAMES
        assert row["mode"] in ("fwd", "bwd", "fwdbwd")
        assert row["ms"] > 0 and row["tflops"] > 0
        # The shapes follow the rule batch = tokens // seqlen, nheads = hidden // headdim.
        assert row["batch"] * row["seqlen"] == 512 and row["nheads"] * row["headdim"] == 128
        expected_tflops = flops(row["batch"], row["seqlen"], row["nheads"], row["headdim"], row["causal"],
                                row["mode"]) / (row["ms"] * 1e-3) / 1e12
        assert row["tflops"] == pytest.approx(expected_tflops, rel=1e-9)
    impls = {r["impl"] for r in doc["rows"]}
    assert {"chunked", "sdpa-math"} <= impls
    assert {r["mode"] for r in doc["rows"]} <= {"fwd", "bwd", "fwdbwd"}
    assert {r["mode"] for r in doc["rows"]} >= {"fwd", "fwdbwd"}
    assert {r["causal"] for r in doc["rows"]} == {False, True}
    R.validate_document(doc)


def test_quick_cpu_run_writes_a_png_per_mode(quick_run):
    _, path, plot_dir = quick_run
    modes = {r["mode"] for r in json.loads(path.read_text())["rows"]}
    for mode in modes:
        png = plot_dir / f"{path.stem}-{mode}.png"
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png


def test_validation_rejects_documents_off_the_schema(quick_run):
    _, path, _ = quick_run
    good = json.loads(path.read_text())
    mutations = [
        lambda d: d.update(extra=1),
        lambda d: d.pop("commit"),
        lambda d: d.update(date="21/11/2026"),
        lambda d: d.update(torch=2.11),
        lambda d: d["rows"][0].update(headdim=True),
        lambda d: d["rows"][0].update(causal=1),
        lambda d: d["rows"][0].update(ms="1.0"),
        lambda d: d["rows"][0].pop("nheads"),
        lambda d: d["rows"][0].update(gbps=1.0),
        lambda d: d["rows"][0].update(mode="sideways"),
    ]
    for mutate in mutations:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError):
            R.validate_document(bad)


def test_decode_rows_have_their_own_schema():
    row = {"impl": "ioattn", "mode": "decode", "headdim": 128, "nheads": 32, "nheads_k": 8, "batch": 16,
           "seqlen_k": 16384, "block_size": 16, "ms": 0.5, "gbps": 4000.0}
    meta = {"device": "X", "date": "2026-11-21", "commit": "abc", "torch": "2", "triton": "3"}
    doc = R.make_document(meta, [row])
    assert list(doc["rows"][0]) == list(R.DECODE_LAYOUT.schema)
    with pytest.raises(ValueError):
        R.make_document(meta, [{**row, "tflops": 1.0}])


def test_flop_counts_follow_the_paper():
    # d=128, seqlen 2048: batch 8, 16 heads; 4 * 2048^2 * 128 * 16 * 8 FLOPs forward.
    (cfg,) = make_configs([128], [2048], [False])
    assert (cfg.batch, cfg.nheads) == (8, 16)
    fwd = flops(8, 2048, 16, 128, False, "fwd")
    assert fwd == 4 * 2048**2 * 128 * 16 * 8 == 274877906944
    assert flops(8, 2048, 16, 128, True, "fwd") == fwd / 2
    assert flops(8, 2048, 16, 128, False, "bwd") == 2.5 * fwd
    assert flops(8, 2048, 16, 128, True, "fwdbwd") == 3.5 * fwd / 2
    assert tflops(fwd, 1.0) == pytest.approx(274.877906944)
    with pytest.raises(ValueError):
        flops(8, 2048, 16, 128, False, "decode")


def test_configs_match_the_anchor_shapes():
    configs = make_configs([64, 128, 256], [512, 16384], [False, True])
    assert len(configs) == 12
    for c in configs:
        assert c.batch == 16384 // c.seqlen and c.nheads == 2048 // c.headdim
    assert Config(64, True, 512, 32, 32) in configs
    with pytest.raises(ValueError):
        make_configs([96], [512], [False])  # 96 does not divide 2048


def _row(impl, mode, d, causal, seqlen, value):
    return {"impl": impl, "mode": mode, "headdim": d, "causal": causal, "seqlen": seqlen,
            "batch": 16384 // seqlen, "nheads": 2048 // d, "ms": 1.0, "tflops": value}


ROWS = [
    _row("sdpa-flash", "bwd", 64, False, 1024, 218.4),
    _row("sdpa-flash", "fwd", 64, False, 1024, 287.0),
    _row("sdpa-flash", "fwd", 64, False, 512, 264.2),
    _row("flex", "fwd", 64, False, 1024, 364.0),
    _row("sdpa-flash", "fwd", 64, True, 512, 154.0),
]


def test_table_pivots_rows_by_impl_mode_headdim_causal_and_columns_by_seqlen():
    lines = R.format_table(ROWS).splitlines()
    assert lines[0] == "| mode | d | causal | impl | 512 | 1024 |"
    assert lines[2:] == [
        "| fwd | 64 | False | sdpa-flash | 264 | 287 |",
        "| fwd | 64 | False | flex | – | 364 |",
        "| fwd | 64 | True | sdpa-flash | 154 | – |",
        "| bwd | 64 | False | sdpa-flash | – | 218 |",
    ]


def test_plot_writes_a_figure_per_mode(tmp_path):
    paths = R.plot(ROWS, tmp_path, "run", "test")
    assert [p.name for p in paths] == ["run-fwd.png", "run-bwd.png"]
    for p in paths:
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5000


def test_results_md_names_device_versions_commit_and_plots(tmp_path):
    meta = {"device": "NVIDIA H200", "date": "2026-11-21", "commit": "0123abc", "torch": "2.11.0+cu130",
            "triton": "3.6.0"}
    path = R.write_json(tmp_path / "results" / "nvidia-h200-2026-11-21.json", meta, ROWS)
    R.plot(ROWS, path.parent, path.stem)
    md = R.render_results_md(path)
    for text in ("NVIDIA H200", "2026-11-21", "0123abc", "2.11.0+cu130", "3.6.0",
                 "| mode | d | causal | impl | 512 | 1024 |", "| fwd | 64 | False | flex | – | 364 |",
                 "(results/nvidia-h200-2026-11-21-fwd.png)", "(results/nvidia-h200-2026-11-21-bwd.png)",
                 "(results/nvidia-h200-2026-11-21.json)"):
        assert text in md, text


class ExplodingPeer(Peer):
    name = "flash-attn"
    needs_cuda = False

    def forward(self, q, k, v, causal):
        raise RuntimeError("kernel exploded")


class BackwardOOMPeer(SdpaMathPeer):
    def make_fn(self, q, k, v, causal, mode, dout=None):
        if mode == "fwdbwd":
            def oom():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
            return oom
        return super().make_fn(q, k, v, causal, mode, dout)


class WrongPeer(Peer):
    name = "xformers"
    needs_cuda = False

    def forward(self, q, k, v, causal):
        return torch.zeros_like(q) + 0 * q


def _measure(peers, modes=("fwd", "bwd", "fwdbwd"), rounds=1):
    progress = R.Progress(len(peers) * rounds, enabled=False)
    cfg = Config(headdim=32, causal=True, seqlen=64, batch=2, nheads=2)
    rows = measure_config(cfg, peers, modes, torch.device("cpu"), torch.float32, QUICK, progress, rounds)
    return rows, progress.notes


def test_a_failing_peer_is_skipped_with_a_note():
    rows, notes = _measure([ExplodingPeer(), ChunkedPeer()])
    assert {r["impl"] for r in rows} == {"chunked"}
    assert {r["mode"] for r in rows} <= {"fwd", "bwd", "fwdbwd"} and any(r["mode"] == "fwd" for r in rows)
    assert any("flash-attn" in n and "kernel exploded" in n for n in notes), notes


def test_a_peer_whose_backward_fails_keeps_its_forward():
    rows, notes = _measure([BackwardOOMPeer()])
    assert [(r["impl"], r["mode"]) for r in rows] == [("sdpa-math", "fwd")]
    assert any("OutOfMemoryError" in n and "forward+backward" in n for n in notes), notes


def test_a_peer_that_disagrees_is_noted():
    rows, notes = _measure([ChunkedPeer(), WrongPeer()], modes=("fwd",))
    assert {r["impl"] for r in rows} == {"chunked", "xformers"}
    assert any("xformers disagrees with SDPA" in n for n in notes), notes
    assert not any("chunked disagrees" in n for n in notes)


def test_unavailable_and_unfit_peers_are_skipped_with_reasons():
    rows, notes = _measure([SdpaMathPeer(), ChunkedPeer()], modes=("fwd",))
    assert {r["impl"] for r in rows} == {"sdpa-math", "chunked"}
    assert not notes
    math = SdpaMathPeer()
    ok, why = math.fits(16, 1 << 20, 32, 64, torch.bfloat16, torch.device("cpu"), backward=True)
    assert not ok and "GiB" in why
    ok, why = ChunkedPeer().fits(2, 8192, 16, 128, torch.bfloat16, torch.device("cpu"), backward=False)
    assert not ok and "4096" in why
    from ioattn.bench.peers import all_peers

    peers = all_peers()
    ok, why = peers["sdpa-flash"].available(torch.device("cpu"), torch.bfloat16, 64)
    assert not ok and "CUDA" in why


def test_rounds_time_every_peer_again_and_keep_the_median(monkeypatch):
    """Peers are timed in turn, round after round, and each keeps its medians; a peer that failed in the
    first round, or a mode that did, is not tried again."""
    scripted = {"fwd": iter([4.0, 12.0, 8.0]), "fwdbwd": iter([30.0, 50.0, 20.0])}
    timed = []

    class ScriptedPeer(ChunkedPeer):
        def make_fn(self, q, k, v, causal, mode, dout=None):
            def fn():
                timed.append(("chunked", mode))
                return next(scripted[mode])
            return fn

    def fake_median_ms(fn, device, budget, grad_to_none=None):
        ms = fn()  # a scripted peer returns its time; any other peer's call runs (or raises) and takes 1 ms
        return ms if isinstance(ms, float) else 1.0

    monkeypatch.setattr(fa2, "median_ms", fake_median_ms)
    rows, notes = _measure([ScriptedPeer(), ExplodingPeer(), BackwardOOMPeer()], rounds=3)
    assert timed == [("chunked", "fwd"), ("chunked", "fwdbwd")] * 3
    by = {(r["impl"], r["mode"]): r["ms"] for r in rows}
    assert set(by) == {("chunked", "fwd"), ("chunked", "bwd"), ("chunked", "fwdbwd"), ("sdpa-math", "fwd")}
    assert by[("chunked", "fwd")] == 8.0 and by[("chunked", "fwdbwd")] == 30.0
    assert by[("chunked", "bwd")] == 22.0  # median fwd + bwd less median fwd
    assert sum("kernel exploded" in n for n in notes) == 1
    assert sum("OutOfMemoryError" in n for n in notes) == 1


def test_cpu_timing_returns_the_median():
    ms = median_ms(lambda: time.sleep(0.002), "cpu", QUICK)
    assert 2.0 <= ms < 20.0


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        main(["fa2", "--peers", "sdpa-flash,nonesuch", "--device", "cpu"])
    with pytest.raises(SystemExit):
        main(["--modes", "sideways", "--device", "cpu"])
    with pytest.raises(SystemExit):
        main(["fa2", "--rounds", "0", "--device", "cpu"])


def test_default_results_path_names_device_and_date():
    path = R.default_json_path("cpu", "fa2", datetime.date(2026, 11, 21))
    repo = Path(__file__).resolve().parents[1]
    assert path.parent == repo / "benchmarks" / "results" == R.results_dir()
    assert path.name.endswith("-2026-11-21.json") and path.name.startswith("cpu")
    assert R.default_json_path("cpu", "decode", datetime.date(2026, 11, 21)).name.endswith("-decode.json")
    assert R.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_merge_replaces_rows_measured_again_and_keeps_the_rest(tmp_path):
    old = [_row("flex", "fwd", 64, False, 1024, 300.0), _row("flex", "fwd", 64, False, 512, 200.0)]
    new = [_row("flex", "fwd", 64, False, 1024, 364.0), _row("flex", "fwd", 64, True, 1024, 250.0)]
    merged = R.merge_rows(old, new)
    assert [(r["seqlen"], r["causal"], r["tflops"]) for r in merged] == [
        (1024, False, 364.0), (512, False, 200.0), (1024, True, 250.0)]


def test_merge_replaces_feature_rows_whose_ratio_moved():
    """A features row measured again replaces the old one though its ratio to plain moved too."""
    def feature(name, seqlen, tflops, relative):
        return {"impl": "ioattn", "mode": "feature-fwd", "feature": name, "headdim": 128, "seqlen": seqlen,
                "ms": 1.0, "tflops": tflops, "relative": relative}

    old = [feature("plain", 4096, 598.0, 1.0), feature("causal", 4096, 527.0, 0.882),
           feature("window", 4096, 432.0, 0.723)]
    new = [feature("plain", 4096, 605.0, 1.0), feature("causal", 4096, 557.0, 0.921)]
    merged = R.merge_rows(old, new)
    assert [(r["feature"], r["tflops"], r["relative"]) for r in merged] == [
        ("plain", 605.0, 1.0), ("causal", 557.0, 0.921), ("window", 432.0, 0.723)]


def test_cli_merge_adds_a_second_run_to_the_same_file(tmp_path):
    path = tmp_path / "r.json"
    common = ["--quick", "--device", "cpu", "--json", str(path), "--no-plot", "--no-progress",
              "--peers", "sdpa-math", "--modes", "fwd", "--causal", "false"]
    assert main(common + ["--seqlens", "128"]) == 0
    assert main(common + ["--seqlens", "256", "--merge"]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert sorted((r["impl"], r["seqlen"]) for r in rows) == [("sdpa-math", 128), ("sdpa-math", 256)]


def test_decode_rounds_keep_each_peers_median(monkeypatch):
    """The decode suite times the peers that ran in turn, round after round, and reports each one's median;
    a failing or unavailable peer is noted once and left out."""
    from ioattn.bench import decode

    scripted = {"ioattn": iter([3.0, 1.0, 2.0]), "sdpa-cudnn": iter([5.0, 4.0, 6.0])}
    order = []

    def peer(name):
        def fn():
            order.append(name)
            if name == "flex":
                raise RuntimeError("compile failed")
            return torch.zeros(2, 1, 4, 8)
        fn.peer = name
        return fn

    monkeypatch.setattr(decode, "_peer_fns", lambda q, k, v, paged, names, device: {
        "ioattn": peer("ioattn"), "sdpa-flash": "not on CPU", "sdpa-cudnn": peer("sdpa-cudnn"), "flex": peer("flex")})
    monkeypatch.setattr(decode, "median_ms", lambda fn, device, budget: next(scripted[fn.peer]))
    progress = R.Progress(4, enabled=False)
    rows = decode.run_decode_suite(torch.device("cpu"), seqlens=(64,), tokens=128, nheads=4, nheads_k=2,
                                   headdim=8, dtype=torch.float32, progress=progress, rounds=3)
    assert [(r["impl"], r["ms"]) for r in rows] == [("ioattn", 2.0), ("sdpa-cudnn", 5.0)]
    assert order == ["ioattn", "sdpa-cudnn", "flex"]  # the first call of each; the timings are scripted
    assert len(progress.notes) == 2 and "not on CPU" in progress.notes[0] and "compile failed" in progress.notes[1]
    R.validate_document(R.make_document({"device": "cpu", "date": "2026-11-21", "commit": "c", "torch": "t",
                                         "triton": "t"}, rows))
