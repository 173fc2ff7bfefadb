#!/usr/bin/env bash
# Tests tools/gpu_check.sh's own logic without a GPU (a few seconds): the no-GPU exit, and
# simulated steps (GPU_CHECK_DRY_RUN=1) for PASS, failures, timeouts, NOT RUN for lack of time and
# a stop from outside. Exit status 0 when every scenario gives the expected result.
#   bash tools/gpu_check_selftest.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
bad=0

# expect NAME EXIT_CODE RESULT_PREFIX [grep pattern that summary.txt must contain]... -- ENV...
expect() {
  local name=$1 code=$2 result=$3
  shift 3
  local pats=()
  while [[ $# -gt 0 && "$1" != -- ]]; do
    pats+=("$1")
    shift
  done
  shift
  local out="$TMP/$name" rc
  env OUT="$out" "$@" bash "$ROOT/tools/gpu_check.sh" >"$TMP/$name.stdout" 2>&1
  rc=$?
  local last
  last="$(tail -n 1 "$out/summary.txt" 2>/dev/null)"
  local ok=1
  if ((rc != code)); then ok=0; fi
  if [[ "$last" != "$result"* ]]; then ok=0; fi
  local p
  for p in "${pats[@]}"; do
    if ! grep -qE "$p" "$out/summary.txt"; then
      ok=0
      echo "  $name: summary lacks /$p/"
    fi
  done
  if ((ok)); then
    echo "ok   $name: exit $rc, $last"
  else
    echo "FAIL $name: exit $rc (want $code), '$last' (want '$result...')"
    bad=1
  fi
}

NOSMI="$TMP/nosmi"
mkdir -p "$NOSMI"
# no nvidia-smi anywhere on PATH: exit 2, RESULT: NO GPU
expect no_gpu 2 "RESULT: NO GPU" '^build +NOT RUN' -- PATH="$NOSMI:/usr/bin:/bin" GPU_CHECK_DRY_RUN=0
expect dry_pass 0 "RESULT: PASS" '^bench +PASS' '^build: rebuilt from source$' '^build +PASS .*rebuilt from source' -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_WHEEL=none
# a prebuilt wheel is used, and named; one that fails to load falls back to the rebuild
WHL=ppoison_ext-0.1.0-cp310-abi3-linux_x86_64.whl
expect dry_wheel 0 "RESULT: PASS" "^build: wheel $WHL\$" "^build +PASS .*wheel $WHL" -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_WHEEL="$TMP/$WHL"
expect dry_wheel_fails 0 "RESULT: PASS" "^build: rebuilt from source \(the wheel $WHL failed\)" -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_WHEEL="$TMP/$WHL" GPU_CHECK_SIMULATE="wheel=1"
expect dry_failures 1 "RESULT: FAIL (4 of 9" '^smoke +FAIL' '^tests +FAIL' '^memcheck +TIMEOUT' \
  '^racecheck +FAIL' '^initcheck +PASS' '^bench +PASS .*cut at .* by design' -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_SIMULATE="smoke=3 tests=1 memcheck=124 racecheck=99 initcheck=3 bench=124"
expect build_fails_stops 1 "RESULT: FAIL (8 of 9" '^build +FAIL' '^smoke +NOT RUN +0s +0s +build failed' -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_SIMULATE="build=1"
expect no_time_is_fail 1 "RESULT: FAIL" '^smoke +NOT RUN .*no time left' '^tests +PASS' -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_BUDGET_S=30 CAP_PREFLIGHT=5 CAP_BUILD=5 CAP_SMOKE=2 CAP_TESTS=5 \
  CAP_MEMCHECK=2 CAP_RACECHECK=2 CAP_SYNCCHECK=2 CAP_INITCHECK=2 CAP_BENCH=3 GPU_CHECK_SIMULATE="build=0:9"
expect step_limit 1 "RESULT: FAIL (1 of 9" '^tests +TIMEOUT' -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_BUDGET_S=60 CAP_PREFLIGHT=5 CAP_BUILD=5 CAP_SMOKE=5 CAP_TESTS=3 \
  CAP_MEMCHECK=5 CAP_RACECHECK=5 CAP_SYNCCHECK=5 CAP_INITCHECK=5 CAP_BENCH=5 GPU_CHECK_SIMULATE="tests=0:30"
# a sanitizer that does not support the device: NOT RUN (tool unavailable), not kernel errors
expect sanitizer_unsupported 1 "RESULT: FAIL (4 of 9" '^memcheck +NOT RUN .*tool unavailable' \
  '^initcheck +NOT RUN .*tool unavailable' '^smoke +PASS' -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_SIMULATE="memcheck=1 racecheck=1 synccheck=1 initcheck=1 unsupported=1"
# stopped from outside mid-build: the summary is still written, at once
start=$SECONDS
expect stopped 124 "RESULT: FAIL" '^build +TIMEOUT .*stopped' '^smoke +NOT RUN' -- \
  GPU_CHECK_DRY_RUN=1 GPU_CHECK_SIMULATE="build=0:30" timeout 3
if ((SECONDS - start > 10)); then
  echo "FAIL stopped: took $((SECONDS - start))s, the signal was not handled at once"
  bad=1
fi
exit $bad
