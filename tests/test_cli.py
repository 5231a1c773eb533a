"""Smoke tests of the command line, each in a fresh process as a user would run it."""

import json
import os
import subprocess
import sys

import torch


def _run(*args, interpret=False, timeout=300):
    env = dict(os.environ)
    env.pop("IOATTN_BACKEND", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "ioattn", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_info_names_versions_and_backends():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    for word in ("torch", "triton", "backend triton", "backend chunked", "CPU tensors use"):
        assert word in res.stdout


def test_check_passes_and_reports_every_public_function():
    res = _run("check")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
                 "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
                 "memory_efficient_attention", "flash_attn_with_kvcache", "scaled_dot_product_attention"):
        assert name in res.stdout
    assert " 0 failed" in res.stdout and "FAIL" not in res.stdout


def test_demo_prints_a_row_per_length_with_a_small_error():
    res = _run("demo", "--seqlens", "128,256")
    assert res.returncode == 0, res.stderr
    # Progress lines ("  128  measuring ...") end in a carriage return; result rows have 7 columns.
    rows = [line.split() for line in res.stdout.splitlines()]
    rows = [r for r in rows if len(r) == 7 and r[0] in ("128", "256")]
    assert [r[0] for r in rows] == ["128", "256"]
    # The CPU runs the float32 chunked path, a GPU the bf16 kernels (bf16 keeps 8 bits of mantissa).
    bound = 2e-2 if torch.cuda.is_available() else 1e-4
    assert all(float(r[-1]) < bound for r in rows), rows


def test_bench_quick_cpu_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = _run("bench", "--quick", "--device", "cpu", "--json", str(out), "--no-plot", "--no-progress")
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["rows"] and {r["impl"] for r in doc["rows"]} >= {"chunked"}


def test_unknown_command_fails():
    res = _run("frobnicate")
    assert res.returncode != 0 and "invalid choice" in res.stderr
