#!/usr/bin/env bash
# The device script: install, the GPU test suite, the benchmarks. Logs and JSON go under
# $OUT; a short summary prints last. Knobs (environment):
#   TESTS=tests|<pytest targets>|none   BENCH=quick|full|none   BENCH_ARGS="..."   DECODE=1|0
#   FEATURES=1|0   FEATURE_ARGS="..." (default --quick)
#   TEST_TIMEOUT=seconds (default 575)  BENCH_TIMEOUT=seconds (default 300)  WORKERS=pytest-xdist workers (14)
#   SHARD=k/n: only every n-th collected test from the k-th (tests/conftest.py, IOATTN_TEST_SHARD)
#   FUZZ=seconds (default 0: off)  FUZZ_SEED=n: random public-API calls against the reference
#   (scripts/fuzz_api.py, 10 processes; failures in $OUT/fuzz-failures.json)
# The whole suite takes 400-550 s with 14 workers (H200; 550 s on an H100 at 79b8f70, close to a 10-minute
# device call): run it with BENCH=none and CEILINGS=0, the benchmarks in another call (TESTS=none), and as
# calls with SHARD=k/n (together every test once): SHARD=1/2 took 535 of 560 s on an H100 at 8ede435, so use
# n = 3 from there. The log lists the slowest tests (--durations).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The editable install has been seen to leave the package unimportable there; the source path always works.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TESTS=${TESTS:-tests}
BENCH=${BENCH:-quick}
DECODE=${DECODE:-1}
summary=()

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
python3 -m ioattn info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv >>"$OUT/info.txt" 2>&1
[ "${CEILINGS:-1}" = 1 ] && summary+=("$(python3 scripts/ceilings.py "$OUT/ceilings.json" 2>&1 | tail -n 1)")

if [ "$TESTS" != none ]; then
    start=$SECONDS
    [ -n "${SHARD:-}" ] && export IOATTN_TEST_SHARD=$SHARD
    # shellcheck disable=SC2086
    timeout "${TEST_TIMEOUT:-575}" python3 -m pytest -q -n "${WORKERS:-14}" -p no:cacheprovider --durations=25 $TESTS \
        >"$OUT/tests.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
    summary+=("tests${SHARD:+ (shard $SHARD)}: rc=$rc in $((SECONDS - start)) s: $(tail -n 1 "$OUT/tests.log")")
fi

if [ "${FUZZ:-0}" != 0 ]; then
    start=$SECONDS
    timeout $((FUZZ + 120)) python3 scripts/fuzz_api.py --seconds "$FUZZ" --workers 10 --seed "${FUZZ_SEED:-0}" \
        --out "$OUT" >"$OUT/fuzz.log" 2>&1
    rc=$?
    grep -A3 "^FAIL" "$OUT/fuzz.log" | head -40
    summary+=("fuzz: rc=$rc in $((SECONDS - start)) s: $(tail -n 1 "$OUT/fuzz.log")")
fi

if [ "$BENCH" != none ]; then
    args=${BENCH_ARGS:-}
    [ "$BENCH" = quick ] && args="--quick $args"
    start=$SECONDS
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-300}" python3 -m ioattn bench fa2 $args --json "$OUT/bench.json" \
        --plot-dir "$OUT" >"$OUT/bench.log" 2>&1
    summary+=("bench fa2: rc=$? in $((SECONDS - start)) s")
    if [ "${FEATURES:-1}" = 1 ]; then
        start=$SECONDS
        timeout "${BENCH_TIMEOUT:-300}" python3 -m ioattn bench features ${FEATURE_ARGS:---quick} \
            --json "$OUT/features.json" --no-plot >"$OUT/features.log" 2>&1
        summary+=("bench features: rc=$? in $((SECONDS - start)) s")
    fi
    if [ "$DECODE" = 1 ]; then
        start=$SECONDS
        timeout "${BENCH_TIMEOUT:-300}" python3 -m ioattn bench decode --json "$OUT/decode.json" \
            >"$OUT/decode.log" 2>&1
        summary+=("bench decode: rc=$? in $((SECONDS - start)) s")
    fi
fi

echo "================ summary ================"
[ -f "$OUT/bench.log" ] && tail -n 60 "$OUT/bench.log"
[ -f "$OUT/decode.log" ] && tail -n 20 "$OUT/decode.log"
[ -f "$OUT/features.log" ] && tail -n 30 "$OUT/features.log"
printf '%s\n' "${summary[@]}"
