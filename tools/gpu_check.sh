#!/usr/bin/env bash
# GPU acceptance check of ppoison_ext's CUDA kernels, for a CUDA machine without network
# (H100/H200, Python 3 with a CUDA torch, nvcc). Run from anywhere; it works in the repo root.
#   bash tools/gpu_check.sh
# Steps (each runs even when an earlier one failed, each under its own `timeout`, all within
# GPU_CHECK_BUDGET_S seconds, default 540):
#   info, build (pip -e, fallback setup.py build_ext --inplace), tests (pytest -k cuda),
#   memcheck/racecheck of a small script calling every CUDA op (fast), benchmarks (-k cuda),
#   memcheck/racecheck of the cuda tests (slow: cut at the budget, reported PARTIAL).
# Output: $OUT (or ./gpu_check_out/): gpu_check.log (everything), summary.txt (one line a step),
# bench_cuda.json. Exit status 1 when a step FAILED or a required step timed out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
STEP_OUT="$OUT_DIR/.step_output"
: >"$LOG"
: >"$SUMMARY"

BUDGET="${GPU_CHECK_BUDGET_S:-540}"
T0=$SECONDS
FAILED=0
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PPOISON_FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

log() { echo "$*" | tee -a "$LOG"; }

# record NAME STATUS SECONDS NOTE: one summary line; FAIL and TIMEOUT make the exit status 1.
record() {
  printf '%-18s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY" >>"$LOG"
  case "$2" in FAIL | TIMEOUT) FAILED=1 ;; esac
}

# run_step NAME CAP_S CMD...: runs CMD under timeout min(CAP_S, time left), output appended to
# the log and kept in $STEP_OUT. Sets STEP_RC (124: timed out, -1: not run) and STEP_S.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0) - 5))
  local t=$((cap < left ? cap : left))
  STEP_S=0
  if ((t < 15)); then
    STEP_RC=-1
    return 0
  fi
  log ""
  log "===== [$name] $(date -u +%H:%M:%S) (timeout ${t}s): $*"
  local start=$SECONDS
  set +e
  timeout -k 10 "$t" "$@" >"$STEP_OUT" 2>&1
  STEP_RC=$?
  set -e
  STEP_S=$((SECONDS - start))
  cat "$STEP_OUT" >>"$LOG"
  tail -n 15 "$STEP_OUT"
  if ((STEP_RC == 137)); then STEP_RC=124; fi
  log "----- [$name] rc=$STEP_RC after ${STEP_S}s"
}

# Status of a required step from STEP_RC.
status_of() {
  case "$STEP_RC" in
    0) echo PASS ;;
    124) echo TIMEOUT ;;
    -1) echo SKIP ;;
    *) echo FAIL ;;
  esac
}

# Sanitizer errors printed so far (the run may have been cut by its timeout).
sanitizer_errors() {
  grep -cE '^========= (Invalid |Error: |Uninitialized |Barrier error)|ERROR SUMMARY: [1-9]|\([1-9][0-9]* errors' \
    "$STEP_OUT" || true
}

# pytest's last summary line ("N passed, M skipped in Ts").
pytest_line() { grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$STEP_OUT" | tail -n 1 || true; }

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [[ -n "$c" && -x "$c" ]]; then
      echo "$c"
      return 0
    fi
  done
  return 0
}

# ---------------------------------------------------------------- info
export PY ROOT
info() {
  echo "host: $(hostname)  date: $(date -u)  repo: $ROOT"
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" --version
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc not on PATH"; fi
  local rc=0
  "$PY" -c "import sys, torch; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'available', ok, torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 3)" || rc=$?
  local m
  for m in pytest pytest_benchmark hypothesis; do
    "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null || echo "$m: missing"
  done
  echo "compute-sanitizer: $(find_sanitizer)"
  return $rc
}
export -f info find_sanitizer
run_step info 60 bash -c info
record info "$(status_of)" "$STEP_S" "nvidia-smi, versions; FAIL = torch sees no GPU"

# ---------------------------------------------------------------- build
build() {
  rm -f ppoison_ext/_C*.so
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
    echo ">>> pip install -e failed; falling back to setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  if ! "$PY" -c "import ppoison_ext" 2>/dev/null; then
    echo ">>> ppoison_ext does not import after pip; building in place"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c "import ppoison_ext, sys; i = ppoison_ext.native_info(); print(i); sys.exit(0 if i['cuda'] else 4)"
}
export -f build
run_step build 330 bash -c build
record build "$(status_of)" "$STEP_S" "pip -e (fallback build_ext --inplace); native_info()['cuda'] must be True"

# ---------------------------------------------------------------- tests
run_step tests 200 "$PY" -m pytest tests -k cuda -q -x -p no:cacheprovider -rfE
case "$STEP_RC" in
  5) record tests FAIL "$STEP_S" "no cuda tests collected" ;;
  *) record tests "$(status_of)" "$STEP_S" "pytest tests -k cuda: $(pytest_line)" ;;
esac

# ---------------------------------------------------------------- sanitizers on a smoke script
SMOKE="$OUT_DIR/cuda_smoke.py"
cat >"$SMOKE" <<'EOF'
# Every CUDA op and code path once, small shapes, compared with the CPU kernels.
import os
import sys

sys.path.insert(0, os.getcwd())  # the repo root: this file lives in $OUT
import torch
from ppoison_ext import ops

dev = torch.device("cuda")
bad = []


def same(name, a, b, exact=False, rtol=1e-6, atol=1e-7):
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    for x, y in zip(a, b):
        x = x.cpu()
        ok = torch.equal(x, y) if exact else torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol)
        if not ok:
            bad.append(name)
            print("MISMATCH", name, (x.double() - y.double()).abs().max().item())


def raises(name, fn, exc=ValueError):
    try:
        fn()
    except exc:
        return
    bad.append(name)
    print("NO ERROR", name)


torch.manual_seed(0)
for dt in (torch.float64, torch.float32):
    tol = dict(rtol=1e-9, atol=1e-12) if dt == torch.float64 else dict(rtol=2e-4, atol=1e-5)
    for B, K in ((5, 2), (37, 9), (9, 20), (3, 40)):
        y = torch.softmax(torch.randn(B, K, dtype=torch.float64) * 3, -1).to(dt)
        p = torch.softmax(torch.randn(B, K, dtype=torch.float64) * 3, -1).to(dt)
        h = torch.randn(B, 7, dtype=dt)
        hsq = (h * h).sum(-1)
        hsq[0] = 0
        G = torch.randn(B, K, 37, dtype=dt)
        M = ops.jacobian_gram(G)
        c = lambda *ts: [t.to(dev) for t in ts]
        tag = f"{dt} B={B} K={K}"
        same("gram_fc " + tag, ops.jacobian_gram_fc(*c(p, hsq)), ops.jacobian_gram_fc(p, hsq), **tol)
        same("tvec_fc " + tag, ops.jacobian_tvec_fc(*c(p, h, y)), ops.jacobian_tvec_fc(p, h, y), **tol)
        same("gram " + tag, ops.jacobian_gram(*c(G)), M, **tol)
        gd = ops.jacobian_gram(*c(G))
        same("gram symmetric " + tag, gd, gd.transpose(1, 2).cpu(), exact=True)
        same("gram D=0 " + tag, ops.jacobian_gram(*c(G[:, :, :0])), ops.jacobian_gram(G[:, :, :0]), exact=True)
        same("tvec " + tag, ops.jacobian_tvec(*c(G, y)), ops.jacobian_tvec(G, y), **tol)
        idx = torch.randint(K, (B,))
        for gname, gargs in (("fc", dict(p=p, h_sqnorm=hsq)), ("dense", dict(gram=M)), ("identity", {})):
            gcuda = {k: v.to(dev) for k, v in gargs.items()}
            for oracle in ("extreme", "argmax", "argmin", "random"):
                for objmax in (False, True):
                    for emk in ((16, 4) if oracle == "argmax" else (16,)):
                        kw = dict(oracle=oracle, objmax=objmax, exact_max_k=emk, max_candidates=64)
                        a = ops.mad_oracle(y.to(dev), index=idx.to(dev), **gcuda, **kw)
                        b = ops.mad_oracle(y, index=idx, **gargs, **kw)
                        n = f"oracle {gname} {oracle} objmax={objmax} emk={emk} {tag}"
                        same(n + " y*", a[0], b[0], exact=True)
                        same(n + " value", a[1], b[1], **tol)
            ys = ops.mad_oracle(y, oracle="argmax", objmax=True, **gargs)[0]
            same(f"objective {gname} {tag}", ops.mad_objective(ys.to(dev), y.to(dev), **gcuda),
                 ops.mad_objective(ys, y, **gargs), **tol)
        for ydist in ("l1", "l2", "kl"):
            for eps in (0.0, 0.05, 0.3, 5.0):
                same(f"step {ydist} eps={eps} {tag}", ops.mad_step(*c(y, p), eps, ydist), ops.mad_step(y, p, eps, ydist),
                     **tol)
        v = torch.randn(B, K, dtype=dt) * 2
        v[0] = y[0]  # on the simplex already
        for r in (0.5, 1.0, 3.0):
            same(f"simplex r={r} {tag}", ops.project_simplex(v.to(dev), r), ops.project_simplex(v, r), **tol)
            same(f"l1 r={r} {tag}", ops.project_l1_ball(v.to(dev), r), ops.project_l1_ball(v, r), **tol)
        same(f"simplex feasible {tag}", ops.project_simplex(y.to(dev)[:1], 1.0), ops.project_simplex(y[:1], 1.0), exact=True)

y = torch.softmax(torch.randn(4, 6, dtype=torch.float64, device=dev), -1)
nan_y = y.clone()
nan_y[1, 2] = float("nan")
raises("nan y", lambda: ops.mad_oracle(nan_y))
raises("negative h_sqnorm", lambda: ops.mad_oracle(y, p=y, h_sqnorm=-torch.ones(4, dtype=y.dtype, device=dev)))
raises("index range", lambda: ops.mad_oracle(y, oracle="random", index=torch.full((4,), 6, device=dev)))
raises("nan v", lambda: ops.project_simplex(nan_y, 1.0))
raises("nan step", lambda: ops.mad_step(y, nan_y, 0.1, "kl"))
raises("nan G", lambda: ops.jacobian_gram(nan_y[:, :, None]))
for B0 in (ops.mad_oracle(y[:0])[0], ops.mad_step(y[:0], y[:0], 0.1), ops.project_l1_ball(y[:0], 1.0),
           ops.jacobian_gram_fc(y[:0], y[:0, 0])):
    assert B0.shape[0] == 0 and B0.is_cuda
torch.cuda.synchronize()
print("cuda smoke:", "OK" if not bad else f"{len(bad)} mismatches")
raise SystemExit(1 if bad else 0)
EOF

SAN="$(find_sanitizer)"
sanitize() {  # sanitize NAME TOOL CAP REQUIRED CMD...
  local name=$1 tool=$2 cap=$3 required=$4
  shift 4
  if [[ -z "$SAN" ]]; then
    record "$name" SKIP 0 "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
    return 0
  fi
  # No caching allocator: memcheck then sees each tensor's exact bounds.
  # API errors are off: torch's own probing calls would count; kernel launch errors raise anyway.
  run_step "$name" "$cap" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 \
    --report-api-errors no "$@"
  local errs
  errs="$(sanitizer_errors)"
  if ((STEP_RC == -1)); then
    record "$name" SKIP 0 "no time left"
  elif ((STEP_RC == 99)) || ((errs > 0)); then
    record "$name" FAIL "$STEP_S" "$tool reported errors ($errs lines) — see gpu_check.log"
  elif ((STEP_RC == 0)); then
    record "$name" PASS "$STEP_S" "$tool clean"
  elif ((STEP_RC == 124)) && [[ "$required" == 0 ]]; then
    record "$name" PARTIAL "$STEP_S" "cut at the time budget, no $tool error until then"
  elif ((STEP_RC == 124)); then
    record "$name" TIMEOUT "$STEP_S" "$tool run did not finish"
  else
    record "$name" FAIL "$STEP_S" "rc=$STEP_RC under $tool (test failure or crash)"
  fi
}

sanitize memcheck_smoke memcheck 100 1 "$PY" "$SMOKE"
sanitize racecheck_smoke racecheck 100 1 "$PY" "$SMOKE"

# ---------------------------------------------------------------- benchmarks
if [[ ! -d benchmarks ]]; then
  record bench SKIP 0 "no benchmarks/ folder"
elif ! "$PY" -c 'import pytest_benchmark' >/dev/null 2>&1; then
  record bench SKIP 0 "pytest-benchmark not installed (no pip index here)"
else
  # Short timing per cell so the whole grid fits; each cell still checks correctness.
  run_step bench 150 "$PY" -m pytest benchmarks -k cuda --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT_DIR/bench_cuda.json" --benchmark-max-time=0.05 --benchmark-min-rounds=3 \
    --benchmark-warmup=off
  case "$STEP_RC" in
    124) record bench PARTIAL "$STEP_S" "cut at the time budget (bench_cuda.json may be missing)" ;;
    -1) record bench SKIP 0 "no time left" ;;
    *) record bench "$(status_of)" "$STEP_S" "$(pytest_line)" ;;
  esac
fi

# ---------------------------------------------------------------- sanitizers on the cuda tests
sanitize memcheck_tests memcheck 150 0 "$PY" -m pytest tests -k cuda -q -x -p no:cacheprovider
sanitize racecheck_tests racecheck 120 0 "$PY" -m pytest tests -k cuda -q -x -p no:cacheprovider

rm -f "$STEP_OUT"
log ""
log "===== summary ($((SECONDS - T0))s of ${BUDGET}s)"
cat "$SUMMARY" | tee -a "$LOG"
if ((FAILED)); then
  echo "RESULT: FAIL" | tee -a "$SUMMARY" "$LOG"
  exit 1
fi
echo "RESULT: PASS" | tee -a "$SUMMARY" "$LOG"
