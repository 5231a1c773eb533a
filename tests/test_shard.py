"""``IOATTN_TEST_SHARD=k/n`` (tests/conftest.py): n shards run every collected test exactly once."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _collected(shard: str) -> list[str]:
    env = {**os.environ, "IOATTN_TEST_SHARD": shard}
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_dropout.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    if shard.startswith("0/"):
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


def test_a_bad_shard_is_refused():
    _collected("0/2")
