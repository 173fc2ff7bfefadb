#!/usr/bin/env bash
# GPU acceptance check of ppoison_ext's CUDA kernels, for the lent GPU machine (H200/H100: Python 3
# with a CUDA torch, nvcc, ninja, compute-sanitizer, no network). Run from anywhere:
#   bash tools/gpu_check.sh
#
# Steps, in order; each has a cap (seconds) and may also use time earlier steps left unused (up to
# one more cap), always leaving the later steps their caps; all ends by GPU_CHECK_BUDGET_S (350 s):
#   preflight  15  nvidia-smi; python, torch (CUDA build, sees the GPU, capability in the arch
#                  list); pytest; ninja; nvcc major == torch.version.cuda major; compute-sanitizer
#   build     120  a prebuilt wheel when there is one (GPU_CHECK_WHEEL=path, else the newest
#                  dist/ppoison_ext-*-abi3-*.whl: carry=["dist"] in the device tool's run), installed
#                  with pip --no-deps --force-reinstall and used if it loads with its CUDA kernels;
#                  else (or GPU_CHECK_WHEEL=none) pip install --no-build-isolation --no-deps -e . for
#                  TORCH_CUDA_ARCH_LIST=9.0. native_info()['cuda'] must be True. The log and the
#                  summary say which: "build: wheel <name>" or "build: rebuilt from source"
#   smoke      25  tools/gpu_smoke.py: every op CUDA vs CPU with tolerances, B = 0, non-contiguous
#                  input, a non-default stream
#   tests      75  pytest -k "cuda and not cpu" -m "not slow" on tests/test_op_*.py,
#                  tests/test_defenses.py, tests/test_defense_fidelity.py (explicit paths; a collection
#                  error fails the step but does not stop the other files), pytest-timeout with
#                  --timeout-method=signal when installed, pytest-xdist (-n 4) when installed
#   memcheck 25, racecheck 25, synccheck 15, initcheck 20
#                  compute-sanitizer --tool <t> on tools/gpu_smoke.py --quick ("device not supported":
#                  NOT RUN, tool unavailable)
#   bench      25  pytest benchmarks -k cuda, reduced repetitions (PPOISON_BENCH_QUICK=1,
#                  PPOISON_BENCH_ROUNDS=3, --benchmark-max-time=0.01); cut by SIGINT at its limit
#                  so bench_cuda.json still holds what finished (a cut with results is a PASS)
# Caps sum to 345 s, so a second run fits in the 15 device-minutes of an issue with the machine's
# start. Override a cap with CAP_<STEP>=seconds (e.g. CAP_TESTS=90) and the total with
# GPU_CHECK_BUDGET_S.
#
# Every step is required: the summary lists each as PASS, FAIL, TIMEOUT or NOT RUN, and any
# status other than PASS makes the result FAIL. A failed preflight or build stops the run (the
# rest is NOT RUN) to save device time.
#
# Output in $OUT (or ./gpu_check_out/): gpu_check.log (everything), summary.txt (one line a step
# and the RESULT line last), bench_cuda.json.
# Exit status: 0 RESULT: PASS; 1 RESULT: FAIL; 2 RESULT: NO GPU (no nvidia-smi, or it sees no GPU:
# nothing else ran).
#
# On the lent machine (device tool): run(command="bash tools/gpu_check.sh", timeout_s=420); the
# files come back from $OUT. Then give_back, unless a rerun follows at once.
#
# Testing this script without a GPU: GPU_CHECK_DRY_RUN=1 replaces every step's command by a
# simulation; GPU_CHECK_SIMULATE="build=0:3 tests=1 memcheck=124" gives a step's exit status and
# seconds (default 0:0), and "wheel=1" a prebuilt wheel that fails to load. The summary logic, the
# caps and the budget are the real ones.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
STEP_OUT="$OUT_DIR/.step_output"
BENCH_JSON="$OUT_DIR/bench_cuda.json"
: >"$LOG"
: >"$SUMMARY"
rm -f "$BENCH_JSON"

BUDGET="${GPU_CHECK_BUDGET_S:-350}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
SIMULATE=" ${GPU_CHECK_SIMULATE:-} "
MIN_STEP_S=5 # a step with less time than this left is NOT RUN
T0=$SECONDS
DEADLINE=$((T0 + BUDGET))
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PPOISON_FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

STEPS=(preflight build smoke tests memcheck racecheck synccheck initcheck bench)
declare -A CAP=([preflight]=15 [build]=120 [smoke]=25 [tests]=75 [memcheck]=25 [racecheck]=25
  [synccheck]=15 [initcheck]=20 [bench]=25)
for s in "${STEPS[@]}"; do
  v="CAP_${s^^}"
  if [[ -n "${!v:-}" ]]; then CAP[$s]="${!v}"; fi
done
total_caps=0
for s in "${STEPS[@]}"; do total_caps=$((total_caps + CAP[$s])); done
if ((total_caps > BUDGET)); then
  echo "warning: the caps sum to ${total_caps}s, over the ${BUDGET}s budget: the last steps may be NOT RUN" >&2
fi
declare -A STATUS NOTE SECS LIMIT
HEADER=()

log() { echo "$*" | tee -a "$LOG"; }

# The sum of the caps of the steps after $1: the time this step must leave for them.
reserve_after() {
  local s seen=0 sum=0
  for s in "${STEPS[@]}"; do
    if ((seen)); then sum=$((sum + CAP[$s])); fi
    if [[ "$s" == "$1" ]]; then seen=1; fi
  done
  echo "$sum"
}

record() { # record STEP STATUS NOTE (seconds from STEP_S)
  STATUS[$1]=$2
  NOTE[$1]=$3
  SECS[$1]=${STEP_S:-0}
  log ">>> $1: $2 (${STEP_S:-0}s) $3"
}

# Simulated command for GPU_CHECK_DRY_RUN=1: "name=rc:secs" in GPU_CHECK_SIMULATE.
simulate() {
  local spec rc secs
  spec="$(sed -n "s/.* $1=\([0-9]*\(:[0-9]*\)\{0,1\}\) .*/\1/p" <<<"$SIMULATE")"
  rc="${spec%%:*}"
  secs=0
  if [[ "$spec" == *:* ]]; then secs="${spec#*:}"; fi
  echo "[dry run] $1: sleep ${secs}s, exit ${rc:-0}"
  sleep "$secs"
  case "$1" in # what the real command prints, so the summary logic gets its input
    build)
      if [[ -n "$WHEEL" && "$SIMULATE" != *" wheel=1 "* ]]; then
        echo "build: wheel ${WHEEL##*/}"
      else
        echo "build: rebuilt from source${WHEEL:+ (the wheel ${WHEEL##*/} failed)}"
      fi
      ;;
    smoke) echo "gpu_smoke (dry run): 0 checks, 0 failed, 0.0s" ;;
    memcheck | racecheck | synccheck | initcheck)
      if [[ "$SIMULATE" == *" unsupported=1 "* ]]; then echo "========= Error: Device not supported"; fi ;;
    tests | bench) echo "1 passed in 0.01s" ;;
  esac
  if [[ "$1" == bench ]]; then echo '{"benchmarks": [{}]}' >"$BENCH_JSON"; fi
  return "${rc:-0}"
}

# run_step NAME [--sigint] CMD...: runs CMD under timeout (its cap plus unused time, less what the
# later steps need), output appended to the log and kept in $STEP_OUT. Sets STEP_RC (124: timed
# out, -1: not run for lack of time) and STEP_S.
run_step() {
  local name=$1 sig=TERM
  shift
  if [[ "${1:-}" == --sigint ]]; then
    sig=INT
    shift
  fi
  local left=$((DEADLINE - SECONDS))
  local t=$((left - $(reserve_after "$name")))
  if ((t > 2 * CAP[$name])); then t=$((2 * CAP[$name])); fi # unused time from earlier steps: up to one more cap
  STEP_S=0
  : >"$STEP_OUT"
  if ((t < MIN_STEP_S)); then
    STEP_RC=-1
    LIMIT[$name]=0
    log ">>> $name: no time left (${left}s to the deadline, $(reserve_after "$name")s kept for later steps)"
    return 0
  fi
  LIMIT[$name]=$t
  log ""
  log "===== [$name] $(date -u +%H:%M:%S) limit ${t}s (cap ${CAP[$name]}s): $*"
  local start=$SECONDS
  # In the background, so that a signal to this script is handled at once (see on_signal).
  if [[ "$DRY" == 1 ]]; then
    timeout -k 5 -s "$sig" "$t" bash -c "simulate $name" >"$STEP_OUT" 2>&1 &
  else
    timeout -k 5 -s "$sig" "$t" "$@" >"$STEP_OUT" 2>&1 &
  fi
  STEP_PID=$!
  wait "$STEP_PID"
  STEP_RC=$?
  STEP_PID=""
  STEP_S=$((SECONDS - start))
  cat "$STEP_OUT" >>"$LOG"
  tail -n 12 "$STEP_OUT"
  if ((STEP_RC == 137)); then STEP_RC=124; fi
  log "----- [$name] rc=$STEP_RC after ${STEP_S}s"
}

# pytest's last summary line ("N passed, M skipped in Ts").
pytest_line() {
  grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)' "$STEP_OUT" | tail -n 1 |
    sed 's/=//g; s/^ *//; s/ *$//' || true
}
pytest_count() { pytest_line | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }

# Every step not run yet becomes NOT RUN with this note.
not_run_rest() {
  local s
  for s in "${STEPS[@]}"; do
    if [[ -z "${STATUS[$s]:-}" ]]; then
      STATUS[$s]="NOT RUN"
      NOTE[$s]="$1"
      SECS[$s]=0
    fi
  done
}

finish() { # finish [NO_GPU]: summary, RESULT line, exit status
  local s failed=0 passed=0 result code
  not_run_rest "${NOT_RUN_NOTE:-not reached}"
  rm -f "$STEP_OUT"
  {
    echo "ppoison_ext GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes'), budget ${BUDGET}s$([[ "$DRY" == 1 ]] && echo ', DRY RUN (simulated steps)')"
    for s in "${HEADER[@]}"; do echo "$s"; done
    printf '%-10s %-8s %6s %6s  %s\n' step status time limit note
    for s in "${STEPS[@]}"; do
      printf '%-10s %-8s %5ss %5ss  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${LIMIT[$s]:-0}" "${NOTE[$s]}"
      if [[ "${STATUS[$s]}" == PASS ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    done
  } >"$SUMMARY"
  if [[ "${1:-}" == NO_GPU ]]; then
    result="RESULT: NO GPU (${NO_GPU_WHY:-no GPU}); nothing was checked"
    code=2
  elif ((failed)); then
    result="RESULT: FAIL ($failed of ${#STEPS[@]} steps not PASS; $((SECONDS - T0))s of ${BUDGET}s)"
    code=1
  else
    result="RESULT: PASS (${#STEPS[@]} steps; $((SECONDS - T0))s of ${BUDGET}s)"
    code=0
  fi
  echo "$result" >>"$SUMMARY"
  log ""
  log "===== summary ($OUT_DIR/summary.txt)"
  tee -a "$LOG" <"$SUMMARY"
  exit "$code"
}

CURRENT=""
STEP_PID=""
on_signal() { # stopped from outside (e.g. the device tool's limit): stop the step, still write the summary
  if [[ -n "$STEP_PID" ]]; then
    kill -TERM "$STEP_PID" 2>/dev/null # timeout passes it on to the step's command
    wait "$STEP_PID" 2>/dev/null
    STEP_PID=""
    if [[ -s "$STEP_OUT" ]]; then cat "$STEP_OUT" >>"$LOG"; fi
  fi
  if [[ -n "$CURRENT" && -z "${STATUS[$CURRENT]:-}" ]]; then
    STEP_S=0
    record "$CURRENT" TIMEOUT "the check itself was stopped (signal) during this step"
  fi
  NOT_RUN_NOTE="the check was stopped before this step"
  finish
}
trap on_signal TERM INT HUP

# ---------------------------------------------------------------- preflight
find_nvcc() {
  local c
  for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc \
    /usr/local/cuda-*/bin/nvcc; do
    if [[ -n "$c" && -x "$c" ]]; then
      echo "$c"
      return 0
    fi
  done
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    if [[ -n "$c" && -x "$c" ]]; then
      echo "$c"
      return 0
    fi
  done
}

# preflight: prints what it found; exits 10 for "no GPU", 1 for any other problem (all listed).
preflight() {
  local bad=0 smi torch_cuda cap nvcc nvcc_ver
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "NO GPU: nvidia-smi is not on PATH"
    return 10
  fi
  if ! smi="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)" || [[ -z "$smi" ]]; then
    echo "NO GPU: nvidia-smi failed: $smi"
    return 10
  fi
  echo "GPU: $smi"
  if ! command -v "$PY" >/dev/null 2>&1; then
    echo "FAIL: python '$PY' not found (set PYTHON)"
    return 1
  fi
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  # One python: torch (a CUDA build that sees the GPU, whose capability is in TORCH_CUDA_ARCH_LIST),
  # the test modules, ninja as torch finds it. stdout: torch.version.cuda; the report on stderr.
  if ! torch_cuda="$("$PY" - <<'EOF'
import importlib, os, sys
say = lambda *a: print(*a, file=sys.stderr)
bad = []
import torch
print(torch.version.cuda or "")
say("torch:", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for m in ("pytest", "pytest_benchmark", "numpy", "hypothesis", "pytest_timeout"):
    try:
        say(f"{m}:", getattr(importlib.import_module(m), "__version__", "present"))
    except ImportError:
        say(f"{m}: missing" + {"pytest_benchmark": " (the bench step will be NOT RUN = FAIL)",
                               "pytest_timeout": " (optional)", "hypothesis": " (not used by the selected tests)"}.get(m, ""))
        if m == "pytest":
            bad.append("pytest is missing (no package index there: carry a wheel)")
from torch.utils.cpp_extension import is_ninja_available
if is_ninja_available():
    say("ninja: found by torch")
else:
    bad.append("ninja is missing: torch would compile the 11 sources one at a time and overrun the build cap")
if torch.version.cuda is None:
    bad.append("torch is a CPU-only build")
elif not torch.cuda.is_available():
    bad.append("nvidia-smi sees a GPU but torch.cuda.is_available() is False")
else:
    cap = "%d.%d" % torch.cuda.get_device_capability(0)
    say("device:", torch.cuda.get_device_name(0), "capability", cap)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").replace("+PTX", "").split()
    if cap not in archs:
        bad.append(f"the GPU's capability {cap} is not in TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}")
for b in bad:
    say("FAIL:", b)
sys.exit(1 if bad else 0)
EOF
  )"; then
    bad=1
  fi
  nvcc="$(find_nvcc)"
  if [[ -z "$nvcc" ]]; then
    echo "FAIL: nvcc not found (CUDA_HOME/bin, PATH, /usr/local/cuda*/bin)"
    bad=1
  else
    nvcc_ver="$("$nvcc" --version 2>&1 | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)"
    echo "nvcc: $nvcc release ${nvcc_ver:-?}"
    if [[ -n "$torch_cuda" && "${nvcc_ver%%.*}" != "${torch_cuda%%.*}" ]]; then
      echo "FAIL: nvcc $nvcc_ver and torch's CUDA $torch_cuda differ in the major version (the extension would not load)"
      bad=1
    fi
  fi
  local san
  san="$(find_sanitizer)"
  echo "compute-sanitizer: ${san:-NOT FOUND (the four sanitizer steps will be NOT RUN = FAIL)}"
  echo "disk free: $(df -h . | awk 'NR == 2 {print $4}'), cpus: $(nproc), MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  return $bad
}

CURRENT=preflight
export -f preflight find_nvcc find_sanitizer simulate
export PY SIMULATE BENCH_JSON
run_step preflight bash -c preflight
while IFS= read -r line; do HEADER+=("$line"); done < <(grep -E '^(GPU|python|torch|device|nvcc|ninja|compute-sanitizer):' "$STEP_OUT")
case "$STEP_RC" in
  0) record preflight PASS "GPU, torch, ninja, nvcc major, sanitizer all found" ;;
  10)
    record preflight FAIL "no GPU"
    NO_GPU_WHY="$(grep -m1 '^NO GPU' "$STEP_OUT" | sed 's/^NO GPU: //')"
    NOT_RUN_NOTE="no GPU"
    finish NO_GPU
    ;;
  124) record preflight TIMEOUT "preflight did not finish" ;;
  -1) record preflight "NOT RUN" "no time" ;;
  *) record preflight FAIL "$(grep -E '^FAIL' "$STEP_OUT" | sed 's/^FAIL: //' | paste -sd ';' -)" ;;
esac
if [[ "${STATUS[preflight]}" != PASS ]]; then
  NOT_RUN_NOTE="preflight failed"
  finish
fi
if [[ "$DRY" == 1 ]]; then SAN=/dry-run/compute-sanitizer; else SAN="$(find_sanitizer)"; fi
PYBIN="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null || true)"
if [[ -n "$PYBIN" ]]; then export PATH="$PYBIN:$PATH"; fi # ninja from the python's own bin folder

# ---------------------------------------------------------------- build
# A prebuilt wheel saves the build's minutes of device time; "none" (or no wheel) rebuilds.
WHEEL="${GPU_CHECK_WHEEL:-}"
if [[ "$WHEEL" == none ]]; then
  WHEEL=""
elif [[ -z "$WHEEL" ]]; then
  WHEEL="$(ls -t dist/ppoison_ext-*-abi3-*.whl 2>/dev/null | head -n 1)"
fi
export WHEEL

# Installs $WHEEL and checks, away from the source tree, that it loads with its CUDA kernels; then
# copies its libraries (_C, _C_cuda) into ppoison_ext/: the later steps import the repository's package.
wheel_install() {
  local pkg
  if [[ ! -f "$WHEEL" ]]; then
    echo ">>> wheel $WHEEL: no such file"
    return 1
  fi
  "$PY" -m pip install --no-deps --force-reinstall --no-index "$WHEEL" || return 1
  pkg="$(cd / && PYTHONPATH="" "$PY" -c '
import os, sys, ppoison_ext
info = ppoison_ext.native_info()
print(ppoison_ext.__file__, info, file=sys.stderr)
if not (info["native"] and info["cuda"]):
    sys.exit(1)
print(os.path.dirname(ppoison_ext.__file__))')" || return 1
  echo ">>> copying the wheel's libraries into ppoison_ext/:" "$pkg"/_C*.so
  cp "$pkg"/_C*.so ppoison_ext/
}

build() {
  rm -f ppoison_ext/_C*.so
  if [[ -n "$WHEEL" ]]; then
    if wheel_install; then
      echo "build: wheel ${WHEEL##*/}"
      "$PY" -c "import ppoison_ext, sys; i = ppoison_ext.native_info(); print(i); sys.exit(0 if i['cuda'] else 4)"
      return
    fi
    echo ">>> the wheel ${WHEEL##*/} did not install, or not with its CUDA kernels: rebuilding from source"
    rm -f ppoison_ext/_C*.so
  fi
  echo "build: rebuilt from source${WHEEL:+ (the wheel ${WHEEL##*/} failed)}"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS PPOISON_FORCE_CUDA=$PPOISON_FORCE_CUDA"
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
    echo ">>> pip install -e failed; falling back to setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  if ! ls ppoison_ext/_C*.so >/dev/null 2>&1; then
    local so
    so="$(cd / && "$PY" -c 'import importlib.util as u; print(u.find_spec("ppoison_ext._C").origin)' 2>/dev/null || true)"
    if [[ -n "$so" && -f "$so" ]]; then
      echo ">>> copying the editable build's libraries into ppoison_ext/:" "$(dirname "$so")"/_C*.so
      cp "$(dirname "$so")"/_C*.so ppoison_ext/
    else
      echo ">>> no ppoison_ext/_C*.so after pip; building in place"
      "$PY" setup.py build_ext --inplace || return 1
    fi
  fi
  "$PY" -c "import ppoison_ext, sys; i = ppoison_ext.native_info(); print(i); sys.exit(0 if i['cuda'] else 4)"
}
CURRENT=build
export -f build wheel_install
run_step build bash -c build
BUILD_HOW="$(grep -m1 '^build: ' "$STEP_OUT")"
if [[ -n "$BUILD_HOW" ]]; then HEADER+=("$BUILD_HOW"); fi
case "$STEP_RC" in
  0)
    if [[ "$BUILD_HOW" == "build: wheel "* ]]; then
      record build PASS "${BUILD_HOW#build: }; native_info()['cuda'] True"
    else
      record build PASS "${BUILD_HOW#build: }: pip -e for sm_${TORCH_CUDA_ARCH_LIST//./}; native_info()['cuda'] True; $(grep -c '\[[0-9]*/[0-9]*\]' "$STEP_OUT") ninja steps"
    fi
    ;;
  4) record build FAIL "built without the CUDA kernels (native_info()['cuda'] False)" ;;
  124) record build TIMEOUT "the build did not finish in ${LIMIT[build]}s" ;;
  -1) record build "NOT RUN" "no time" ;;
  *) record build FAIL "rc=$STEP_RC: $(grep -m1 -iE 'error' "$STEP_OUT" | cut -c1-150)" ;;
esac
if [[ "${STATUS[build]}" != PASS ]]; then
  NOT_RUN_NOTE="build failed"
  finish
fi

# ---------------------------------------------------------------- smoke
CURRENT=smoke
run_step smoke "$PY" tools/gpu_smoke.py
smoke_line="$(grep -m1 '^gpu_smoke' "$STEP_OUT" | sed 's/^gpu_smoke ([^)]*): //')"
case "$STEP_RC" in
  0) record smoke PASS "$smoke_line" ;;
  3) record smoke FAIL "$smoke_line; first: $(grep -m1 '^MISMATCH' "$STEP_OUT" | cut -c1-150)" ;;
  124) record smoke TIMEOUT "did not finish in ${LIMIT[smoke]}s" ;;
  -1) record smoke "NOT RUN" "no time left" ;;
  *) record smoke FAIL "rc=$STEP_RC (crash): $(tail -n 1 "$STEP_OUT" | cut -c1-150)" ;;
esac

# ---------------------------------------------------------------- tests
TEST_FILES=()
missing=()
for f in tests/test_op_*.py tests/test_defenses.py tests/test_defense_fidelity.py; do
  if [[ -f "$f" ]]; then TEST_FILES+=("$f"); else missing+=("$f"); fi
done
PYTEST_TIMEOUT=()
if [[ "$DRY" != 1 ]] && "$PY" -c 'import pytest_timeout' 2>/dev/null; then
  # signal: a slow test fails alone (thread would end the whole run at the first one)
  PYTEST_TIMEOUT=(--timeout=60 --timeout-method=signal)
fi
PYTEST_XDIST=()
if [[ "$DRY" != 1 ]] && "$PY" -c 'import xdist' 2>/dev/null; then PYTEST_XDIST=(-n 4); fi
CURRENT=tests
# "cuda and not cpu": -k cuda alone also selects every CPU case of tests/test_op_cuda_review.py
run_step tests "$PY" -m pytest "${TEST_FILES[@]}" -k "cuda and not cpu" -m "not slow" -q -p no:cacheprovider \
  -rfEs --continue-on-collection-errors --durations=8 "${PYTEST_TIMEOUT[@]}" "${PYTEST_XDIST[@]}"
line="$(pytest_line)"
passed="$(pytest_count passed)"
if ((${#missing[@]})); then
  record tests FAIL "missing test files: ${missing[*]}; $line"
else
  case "$STEP_RC" in
    0)
      if ((passed > 0)); then record tests PASS "$line"; else record tests FAIL "no cuda test passed: $line"; fi
      ;;
    5) record tests FAIL "no cuda tests selected (torch sees no GPU under pytest?)" ;;
    124) record tests TIMEOUT "did not finish in ${LIMIT[tests]}s: $line" ;;
    -1) record tests "NOT RUN" "no time left" ;;
    *)
      errs="$(grep -E '^ERROR ' "$STEP_OUT" | head -n 3 | cut -c1-100 | paste -sd ';' -)"
      record tests FAIL "rc=$STEP_RC: $line${errs:+; $errs}"
      ;;
  esac
fi

# ---------------------------------------------------------------- compute-sanitizer on the smoke
# Sanitizer errors in the step's output (the run may have been cut by its timeout).
sanitizer_errors() {
  grep -cE '^========= (Invalid|Error|Uninitialized|Race reported|Barrier error)|ERROR SUMMARY: [1-9]|\([1-9][0-9]* errors' \
    "$STEP_OUT" || true
}
for tool in memcheck racecheck synccheck initcheck; do
  CURRENT=$tool
  if [[ -z "$SAN" ]]; then
    STEP_S=0
    record "$tool" "NOT RUN" "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
    continue
  fi
  # No caching allocator: memcheck and initcheck then see each tensor's own bounds. API errors off:
  # torch's probing calls would count; a kernel launch error raises in the smoke anyway.
  run_step "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 \
    --report-api-errors no --print-limit 20 "$PY" tools/gpu_smoke.py --quick
  errs="$(sanitizer_errors)"
  summ="$(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$STEP_OUT" | sed 's/^========= //')"
  if ((STEP_RC == -1)); then
    record "$tool" "NOT RUN" "no time left"
  elif grep -qi 'device not supported' "$STEP_OUT"; then # the tool cannot run here: no kernel verdict
    record "$tool" "NOT RUN" "tool unavailable: compute-sanitizer says the device is not supported"
  elif ((STEP_RC == 99)) || ((errs > 0)); then
    record "$tool" FAIL "$tool reported errors ($errs lines): $(grep -m1 -E '^========= (Invalid|Error|Uninitialized|Race|Barrier)' "$STEP_OUT" | cut -c1-120)"
  elif ((STEP_RC == 0)); then
    record "$tool" PASS "clean${summ:+: $summ}"
  elif ((STEP_RC == 3)) && [[ "${STATUS[smoke]}" != PASS ]]; then
    record "$tool" PASS "clean${summ:+: $summ} (the smoke's mismatches are reported in its own step)"
  elif ((STEP_RC == 3)); then
    record "$tool" FAIL "the smoke passed alone but mismatched under $tool: suspect a race or an uninitialized read"
  elif ((STEP_RC == 124)); then
    record "$tool" TIMEOUT "did not finish in ${LIMIT[$tool]}s (no $tool error until then)"
  else
    record "$tool" FAIL "rc=$STEP_RC under $tool (crash or tool failure): $(tail -n 1 "$STEP_OUT" | cut -c1-120)"
  fi
done

# ---------------------------------------------------------------- benchmarks
CURRENT=bench
if [[ "$DRY" != 1 ]] && ! "$PY" -c 'import pytest_benchmark' >/dev/null 2>&1; then
  STEP_S=0
  record bench "NOT RUN" "pytest-benchmark not installed (no package index there: carry a wheel)"
else
  # SIGINT at the limit: pytest stops and pytest-benchmark still writes the results so far.
  run_step bench --sigint env PPOISON_BENCH_QUICK="${PPOISON_BENCH_QUICK:-1}" PPOISON_BENCH_ROUNDS=3 \
    "$PY" -m pytest benchmarks -k cuda --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$BENCH_JSON" --benchmark-max-time=0.01 --benchmark-min-rounds=3 --benchmark-warmup=off
  n="$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['benchmarks']))" "$BENCH_JSON" 2>/dev/null || echo 0)"
  line="$(pytest_line)"
  case "$STEP_RC" in
    0)
      if ((n > 0)); then record bench PASS "$n results in bench_cuda.json; $line"; else record bench FAIL "no results: $line"; fi
      ;;
    5) record bench FAIL "no cuda benchmarks selected" ;;
    124) # the step is cut at its limit by design: what finished is the result
      if ((n > 0)); then record bench PASS "cut at ${LIMIT[bench]}s by design; $n results in bench_cuda.json"
      else record bench TIMEOUT "cut at ${LIMIT[bench]}s before any result"; fi
      ;;
    -1) record bench "NOT RUN" "no time left" ;;
    *) record bench FAIL "rc=$STEP_RC: $line ($n results in bench_cuda.json)" ;;
  esac
fi

CURRENT=""
finish
