"""``IOATTN_TEST_SHARD=k/n`` (tests/conftest.py): n shards run every collected test exactly once."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _collected(shard: str, *args: str) -> list[str]:
    env = {**os.environ, "IOATTN_TEST_SHARD": shard}
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_dropout.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if shard in ("0/2", "2"):
        assert res.returncode != 0 and "IOATTN_TEST_SHARD" in res.stdout + res.stderr
        return []
    assert res.returncode == 0, res.stdout + res.stderr
    return [line for line in res.stdout.splitlines() if "::" in line]


def test_shards_partition_the_suite():
    everything = _collected("")
    shards = [_collected(f"{k}/3") for k in (1, 2, 3)]
    assert len(everything) >= 6
    assert sorted(sum(shards, [])) == sorted(everything)  # every test once, none twice
    assert all(abs(len(s) - len(everything) / 3) < 1 for s in shards)


def test_shards_split_what_k_leaves():
    """-k deselects first, then the shards split the rest: two tests two apart in the whole file (split over
    the whole list both would land in one half) go one to each half."""
    kept = _collected("", "-k", "True")
    halves = [_collected(f"{k}/2", "-k", "True") for k in (1, 2)]
    assert len(kept) == 2 and [len(h) for h in halves] == [1, 1]
    assert sorted(sum(halves, [])) == sorted(kept)


def test_a_bad_shard_is_refused():
    _collected("0/2")
    _collected("2")
