"""scripts/fuzz_api.py, the random API sweep run on the GPU: its cases repeat from their seeds, reach every entry
point, pass here at small sizes (in Triton's interpreter on a CPU), and a wrong result fails them."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from conftest import DEVICE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_api  # noqa: E402

import ioattn  # noqa: E402


def _size(case: dict) -> int:
    """Scores a case's reference materialises, times its head dim (its cost in the interpreter)."""
    heads, d = case["nheads"], case["d"]
    if "seqlen_k" in case:
        return case["batch"] * heads * case["seqlen_q"] * case["seqlen_k"] * d
    if "lens_q" in case:
        return heads * d * sum(a * b for a, b in zip(case["lens_q"], case["lens_k"], strict=True))
    return heads * d * case["seqlen_q"] * sum(n + case["seqlen_new"] for n in case["lens"])


def _small_case(api: str, skip: int = 0, limit: int = 600_000) -> dict:
    """The ``skip``-th drawn case of ``api`` under ``limit``, in float32: at these sizes the 16-bit cases
    hold a few dozen elements a gradient, and one rounded the other way (P in 16 bits) can read 1 ulp where
    torch's same-dtype result happens to be exact, past the rule's 3x (seen in the interpreter; the sweep's
    GPU cases are larger)."""
    found = (c for c in map(fuzz_api.draw_case, range(10_000)) if c["api"] == api and _size(c) <= limit)
    for _ in range(skip):
        next(found)
    return dict(next(found), dtype="float32")


def test_cases_repeat_from_their_seed():
    assert fuzz_api.draw_case(1234) == fuzz_api.draw_case(1234)
    assert fuzz_api.draw_case(1234) != fuzz_api.draw_case(1235)
    assert {fuzz_api.draw_case(i)["api"] for i in range(100)} == set(fuzz_api.RUNNERS)


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("api", sorted(fuzz_api.RUNNERS))
def test_small_cases_pass(api, skip):
    case = _small_case(api, skip)
    lines: list[str] = []
    ok, bad = fuzz_api.run_case(case, torch.device(DEVICE), lines)
    assert ok is not False, (case, bad)
    assert ok is None or lines  # a case that ran checked something


def test_a_wrong_output_fails(monkeypatch):
    real = ioattn.flash_attn_func

    def off(*args, **kwargs):
        out, lse, s = real(*args, **kwargs)
        return out * 1.02, lse, s
    monkeypatch.setattr(ioattn, "flash_attn_func", off)
    ok, bad = fuzz_api.run_case(_small_case("dense"), torch.device(DEVICE))
    assert ok is False and any(line.startswith("out:") for line in bad)


def test_a_raise_is_a_failure(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(ioattn, "flash_attn_varlen_func", broken)
    ok, bad = fuzz_api.run_case(_small_case("paged"), torch.device(DEVICE))
    assert ok is False and bad == ["raised RuntimeError: boom"]
