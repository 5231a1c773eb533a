"""Smoke test of the PagedAttention memory experiment: a small saturated run through the real BlockManager."""

from __future__ import annotations

import json

import pytest

from ioattn.bench import serving_memory as sm


@pytest.fixture(scope="module")
def doc() -> dict:
    # 2 GB at 800 KiB/token = 2,432 slots: one max-length reservation fits; 300 Alpaca-like requests
    # saturate it.
    return sm.run_experiment(300, seed=1, block_size=16, kv_gb=2.0, traces=("alpaca",))


def test_trace_matches_published_means_and_max_length() -> None:
    for spec in sm.TRACES.values():
        trace = sm.make_trace(spec, 20_000, seed=3)
        mean_in = sum(p for p, _ in trace) / len(trace)
        mean_out = sum(o for _, o in trace) / len(trace)
        assert mean_in == pytest.approx(spec.mean_input, rel=0.05)
        assert mean_out == pytest.approx(spec.mean_output, rel=0.05)
        assert all(p >= 1 and o >= 1 and p + o <= sm.MAX_SEQ_LEN for p, o in trace)
    assert sm.make_trace(sm.TRACES["alpaca"], 50, seed=7) == sm.make_trace(sm.TRACES["alpaca"], 50, seed=7)


def test_paged_wastes_less_and_fits_more_than_contiguous(doc: dict) -> None:
    rows = {r["policy"]: r for r in doc["rows"]}
    for r in rows.values():
        print(r)
        assert r["steady_steps"] > 0  # the budget was saturated, so the averages mean something
        # Only a long request with 6 sequences can outgrow this small pool on its own.
        assert r["dropped"] == 0 if r["policy"] in ("paged", "contiguous-max", "parallel-2") else r["dropped"] <= 3
        assert 0.0 < r["utilisation"] <= 1.0 and r["waste"] == pytest.approx(1.0 - r["utilisation"])
        assert 0.0 < r["token_share"] <= 1.0
    paged = rows["paged"]
    assert paged["waste"] < rows["contiguous-oracle"]["waste"] < rows["contiguous-max"]["waste"]
    assert paged["requests_in_flight"] > rows["contiguous-max"]["requests_in_flight"]
    assert paged["waste"] < 0.5 * 16 / 20  # at most about half a block per sequence is empty
    assert paged["sharing_saving"] == 0.0


def test_sharing_saves_memory_and_beams_share_more_than_samples(doc: dict) -> None:
    rows = {r["policy"]: r for r in doc["rows"]}
    for width in (2, 4, 6):
        par, beam = rows[f"parallel-{width}"], rows[f"beam-{width}"]
        assert 0.0 < par["sharing_saving"] < 1.0 - 1.0 / width
        assert par["sharing_saving"] < beam["sharing_saving"] < 1.0 - 1.0 / width
        assert par["sequences_in_flight"] == pytest.approx(width * par["requests_in_flight"])
    assert rows["parallel-2"]["sharing_saving"] < rows["parallel-6"]["sharing_saving"]


def test_main_writes_json_and_plot(tmp_path) -> None:
    out_json, out_png = tmp_path / "sm.json", tmp_path / "sm.png"
    argv = ["--requests", "30", "--kv-gb", "2", "--traces", "alpaca", "--policies", "contiguous-max,paged,beam-2",
            "--json", str(out_json), "--plot", str(out_png)]
    assert sm.main(argv) == 0
    doc = json.loads(out_json.read_text())
    assert [r["policy"] for r in doc["rows"]] == ["contiguous-max", "paged", "beam-2"]
    assert doc["settings"]["budget_tokens"] == 2_000_000_000 // sm.KV_BYTES_PER_TOKEN // 16 * 16
    assert out_png.stat().st_size > 10_000
