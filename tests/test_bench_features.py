"""The features suite's FLOP accounting and row schema (its timing needs a GPU)."""

import pytest
import torch

from ioattn.bench import features, report
from ioattn.bench.timing import QUICK
from ioattn.reference import allowed_mask


@pytest.mark.parametrize("n,window", [(1, (-1, -1)), (17, (-1, 0)), (64, (8, 8)), (97, (3, -1)), (50, (0, 0))])
def test_allowed_pairs_counts_the_reference_mask(n, window):
    mask = allowed_mask(n, n, window_size=window)
    expected = n * n if mask is None else int(mask.sum())
    assert features.allowed_pairs(n, window) == expected


@pytest.mark.parametrize("sq,sk,window", [(30, 70, (-1, 0)), (70, 30, (-1, 0)), (40, 90, (5, 7)), (90, 40, (0, 0)),
                                          (13, 50, (3, -1))])
def test_allowed_pairs_with_other_key_counts(sq, sk, window):
    """seqlen_q != seqlen_k: the reference mask's bottom-right alignment."""
    mask = allowed_mask(sq, sk, window_size=window)
    expected = sq * sk if mask is None else int(mask.sum())
    assert features.allowed_pairs(sq, window, sk) == expected


def test_mixed_lengths_cover_the_tokens_and_vary():
    lengths = features._mixed_lengths(16384, 2048)
    assert sum(lengths) == 16384 and min(lengths) > 0 and len(set(lengths)) > 1


def test_window_case_counts_fewer_flops_than_plain():
    _, _, plain = features.make_case("plain", 64, 16, torch.device("cpu"), torch.float32)
    _, _, window = features.make_case("window", 64, 16, torch.device("cpu"), torch.float32)
    _, _, causal = features.make_case("causal", 64, 16, torch.device("cpu"), torch.float32)
    assert window < causal < plain
    assert causal == pytest.approx(plain * (64 * 65 / 2) / (64 * 64))


def test_rows_validate_against_the_layout():
    meta = {"device": "x", "date": "2026-11-21", "commit": "c", "torch": "t", "triton": "t"}
    row = {"impl": "ioattn", "mode": "feature-fwd", "feature": "gqa-4", "headdim": 128, "seqlen": 4096,
           "ms": 1.0, "tflops": 400.0, "relative": 0.97}
    report.validate_document(report.make_document(meta, [row]))
    assert "gqa-4" in report.format_table([row])


def test_measure_times_features_in_rounds_and_keeps_medians(monkeypatch):
    """Features are timed in turn, round after round; each keeps its median fwd and fwd + bwd times; a
    feature whose case cannot be made, or whose timing fails, is noted and left out."""
    scripted = {"plain": iter([(4.0, 1.0), (12.0, 9.0), (8.0, 2.0)]), "causal": iter([(20.0, 5.0)] * 3)}
    order = []

    def fake_time(call, leaves, device, budget):
        feature = call()
        order.append(feature)
        if feature == "softcap":
            raise RuntimeError("kernel failed")
        return next(scripted[feature])

    def make(feature):
        if feature == "window":
            raise ValueError("no such case")
        return (lambda: feature), (), 123.0

    monkeypatch.setattr(features, "_time", fake_time)
    out, notes = features.measure(["plain", "causal", "window", "softcap"], make, "cpu", QUICK, rounds=3)
    assert order == ["plain", "causal", "softcap", "plain", "causal", "plain", "causal"]
    assert set(out) == {"plain", "causal"}
    assert out["plain"] == (8.0, 10.0 - 8.0, 123.0)  # medians of fwd (4, 12, 8) and fwd + bwd (5, 21, 10)
    assert out["causal"] == (20.0, 5.0, 123.0)
    assert len(notes) == 2 and "no such case" in notes[0] and "kernel failed" in notes[1]
