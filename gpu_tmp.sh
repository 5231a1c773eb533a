#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD/src:$PWD/scripts:$PWD/tests PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 120 python -m pytest -q -n 8 -p no:cacheprovider tests/test_kvcache.py -k "plan" 2>&1 | tail -3
