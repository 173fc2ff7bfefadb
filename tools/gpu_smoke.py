"""Quick CUDA-vs-CPU smoke of every native op: the first step of tools/gpu_check.sh and the
program that check runs under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

    python tools/gpu_smoke.py                 # full smoke on cuda (well under a minute)
    python tools/gpu_smoke.py --quick         # the sanitizer run: few shapes, every kernel and branch
    python tools/gpu_smoke.py --device cpu    # the same checks CPU-vs-CPU (tests this script without a GPU)

Every op runs on the device and on the CPU with the same inputs; results must agree within
documented tolerances, not bit for bit (the backends may sum in different orders, and the
projections use different algorithms: Condat on the CPU, Michelot on CUDA):

* float64: |a - b| <= 1e-12 * max(1, max|b|) + 1e-12 * |b|
* float32: |a - b| <= 1e-6  * max(1, max|b|) + 1e-5  * |b|
* exact where the result is discrete or must be identical: the oracle's y* (a vertex), the
  random oracle for one seed, a row already feasible returned unchanged by the projections,
  the symmetry of the explicit Gram, error messages (NaN/Inf) equal to the CPU's, and
  grad2_allocate on tie-heavy rows (both backends walk grad2_math.h's code in the same donor
  order: CUDA's from one batch sort, the CPU's from a sort per row).

Covered for each op: float32 and float64, K across a warp (2 ... 40 classes), B = 0, a
batch size on each side of the row kernels' launch shapes (utils.cuh's row_launch: one row,
blocks of 32 spread over the SMs, full blocks), a non-contiguous input, and a non-default stream (the default stream is kept busy meanwhile,
so an op that launched on it instead of the current stream would leave its output
unwritten when the current stream reads it; best effort: it relies on the allocator handing
the op a block the smoke filled with NaN just before).

Exit status: 0 all checks passed; 3 some check failed (each printed as MISMATCH/ERROR);
2 the device is not available; anything else: a crash.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import torch  # noqa: E402

from ppoison_ext import ops  # noqa: E402

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6)}  # (rtol, atol·scale)


class Smoke:
    def __init__(self, device: torch.device, quick: bool):
        self.dev = device
        self.quick = quick
        self.checks = 0
        self.bad: list = []

    # ------------------------------------------------------------------ comparisons
    def fail(self, name: str, why: str) -> None:
        self.bad.append(name)
        print(f"MISMATCH {name}: {why}", flush=True)

    def compare(self, name: str, got, want, exact=()) -> None:
        """got (device) vs want (CPU); outputs whose index is in `exact` must be identical."""
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        if len(got) != len(want):
            self.fail(name, f"{len(got)} outputs vs {len(want)}")
            return
        for i, (a, b) in enumerate(zip(got, want)):
            self.checks += 1
            label = f"{name}[{i}]" if len(got) > 1 else name
            if a.device.type != self.dev.type:
                self.fail(label, f"output on {a.device}, expected {self.dev.type}")
                continue
            if a.shape != b.shape or a.dtype != b.dtype:
                self.fail(label, f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
                continue
            a = a.cpu()
            if i in exact:
                if not torch.equal(a, b):
                    diff = (a.double() - b.double()).abs()
                    self.fail(label, f"not identical: {int((diff != 0).sum())} entries differ, max {diff.max().item():.3g}")
                continue
            rtol, atol = TOL[b.dtype]
            if b.numel() == 0:
                continue
            fa, fb = torch.isfinite(a), torch.isfinite(b)
            if not torch.equal(fa, fb):
                self.fail(label, "NaN/Inf in different places")
                continue
            a64, b64 = a.double()[fb], b.double()[fb]
            scale = max(1.0, b64.abs().max().item()) if b64.numel() else 1.0
            err = (a64 - b64).abs()
            lim = atol * scale + rtol * b64.abs()
            if bool((err > lim).any()):
                self.fail(label, f"max |diff| {err.max().item():.3g} (scale {scale:.3g}, {b.dtype})")

    # ------------------------------------------------------------------ running an op both ways
    def to_dev(self, x, noncontig=False):
        if isinstance(x, torch.Tensor):
            t = x.to(self.dev)
            return _noncontig(t) if noncontig else t
        if isinstance(x, dict):
            return {k: self.to_dev(v, noncontig) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(self.to_dev(v, noncontig) for v in x)
        return x

    def case(self, name, fn, *args, exact=(), noncontig=False, **kw):
        """fn(*args, **kw) on the CPU and on the device (inputs copied there); compared."""
        want = fn(*args, **kw)
        try:
            got = fn(*self.to_dev(args, noncontig), **self.to_dev(kw, noncontig))
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            self.fail(name, f"raised {type(e).__name__}: {e}")
            return None
        self.compare(name, got, want, exact)
        return got

    def stream_case(self, name, fn, *args, exact=(), **kw):
        """As case(), on a fresh non-default stream while the default stream is busy."""
        want = fn(*args, **kw)
        if self.dev.type != "cuda":
            return self.case(name, fn, *args, exact=exact, **kw)
        a, k = self.to_dev(args), self.to_dev(kw)
        default = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(default)  # the inputs made on the default stream are ready
        with torch.cuda.stream(side):  # blocks filled with NaN for the op's outputs to land in
            wanted = want if isinstance(want, (tuple, list)) else (want,)
            decoys = [torch.full(w.shape, math.nan, dtype=w.dtype, device=self.dev) for w in wanted]
            del decoys
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(10_000_000 if self.quick else 100_000_000)  # ~5 / 50 ms of GPU time
        try:
            with torch.cuda.stream(side):
                got = fn(*a, **k)
                got = tuple(t.clone() for t in got) if isinstance(got, tuple) else got.clone()
            side.synchronize()
        except Exception as e:  # noqa: BLE001
            self.fail(name, f"raised {type(e).__name__}: {e}")
            return None
        torch.cuda.synchronize()
        self.compare(name, got, want, exact)
        return got

    def same_error(self, name, fn, *args, **kw):
        """fn raises on the device exactly what it raises on the CPU (type and message)."""
        self.checks += 1

        def err_of(call_args, call_kw):
            try:
                fn(*call_args, **call_kw)
            except Exception as e:  # noqa: BLE001
                return type(e).__name__, str(e).splitlines()[0] if str(e) else ""
            return None

        want = err_of(args, kw)
        got = err_of(self.to_dev(args), self.to_dev(kw))
        if want is None:
            self.fail(name, "the CPU raised nothing")
        elif got != want:
            self.fail(name, f"device raised {got}, CPU raised {want}")


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (transposed storage or a strided slice)."""
    if t.dim() == 1:
        out = torch.empty(2 * t.shape[0], dtype=t.dtype, device=t.device)[::2]
    elif t.dim() == 2:
        out = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device=t.device).t()
    else:
        out = torch.empty(t.shape[0], t.shape[2], t.shape[1], dtype=t.dtype, device=t.device).transpose(1, 2)
    out.copy_(t)
    return out


def _inputs(B, K, dtype, g, D=37):
    soft = lambda s: torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * s, -1).to(dtype)  # noqa: E731
    y, p = soft(3.0), soft(3.0)
    h = torch.relu(torch.randn(B, 7, generator=g, dtype=torch.float64)).to(dtype)
    hsq = (h.double() ** 2).sum(-1).to(dtype)
    if B > 1:
        hsq[0] = 0  # G = 0 for one sample
    G = torch.randn(B, K, D, generator=g, dtype=torch.float64).to(dtype)
    M = ops.jacobian_gram(G)
    idx = torch.randint(K, (B,), generator=g)
    v = (torch.randn(B, K, generator=g, dtype=torch.float64) * 2).to(dtype)
    if B > 1:
        v[0] = y[0]  # on the simplex up to rounding
    return dict(y=y, p=p, h=h, hsq=hsq, G=G, M=M, idx=idx, v=v)


def _feasible_rows(K, dtype):
    """Rows exactly on the simplex (dyadic entries: sums are exact) and inside the L1 ball."""
    one_hot = torch.zeros(K, dtype=torch.float64)
    one_hot[K // 2] = 1.0
    half = torch.zeros(K, dtype=torch.float64)
    half[0], half[-1] = 0.5, 0.5
    rows = [one_hot, half]
    if K & (K - 1) == 0:  # K a power of two: the uniform row 1/K is exact
        rows.append(torch.full((K,), 1.0 / K, dtype=torch.float64))
    inside = torch.zeros(K, dtype=torch.float64)
    inside[0], inside[1] = -0.25, 0.25
    return torch.stack(rows).to(dtype), torch.stack(rows + [inside]).to(dtype)


def run(sm: Smoke, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = ((5, 2), (6, 33)) if sm.quick else ((5, 2), (37, 9), (9, 20), (3, 40), (4, 32))
    for dt in (torch.float64, torch.float32):
        for B, K in shapes:
            d = _inputs(B, K, dt, g, D=19 if sm.quick else 37)
            y, p, h, hsq, G, M, idx, v = (d[k] for k in ("y", "p", "h", "hsq", "G", "M", "idx", "v"))
            tag = f"{str(dt)[6:]} B={B} K={K}"
            sm.case(f"jacobian_gram_fc {tag}", ops.jacobian_gram_fc, p, hsq)
            sm.case(f"jacobian_tvec_fc {tag}", ops.jacobian_tvec_fc, p, h, y)
            gd = sm.case(f"jacobian_gram {tag}", ops.jacobian_gram, G)
            if gd is not None:  # mirrored from one sum: exactly symmetric on the device too
                sm.compare(f"jacobian_gram symmetric {tag}", gd, gd.transpose(1, 2).cpu(), exact=(0,))
            sm.case(f"jacobian_gram D=0 {tag}", ops.jacobian_gram, G[:, :, :0])
            sm.case(f"jacobian_tvec {tag}", ops.jacobian_tvec, G, y)
            grams = {"fc": dict(p=p, h_sqnorm=hsq), "dense": dict(gram=M), "identity": {}}
            for gname, gargs in grams.items():
                for oracle in ops.ORACLES:
                    for objmax in (False, True):
                        # argmax: exact search (K <= 16) and greedy (K > exact_max_k = 4)
                        for emk in ((16, 4) if oracle == "argmax" else (16,)):
                            kw = dict(oracle=oracle, objmax=objmax, exact_max_k=emk, max_candidates=64)
                            sm.case(f"mad_oracle {gname} {oracle} objmax={objmax} emk={emk} {tag}",
                                    ops.mad_oracle, y, index=idx, **gargs, **kw, exact=(0,))
                ys = ops.mad_oracle(y, oracle="argmax", objmax=True, **gargs)[0]
                sm.case(f"mad_objective {gname} {tag}", ops.mad_objective, ys, y, **gargs)
            for ydist in ops.YDISTS:
                for eps in ((0.05, 5.0) if sm.quick else (0.0, 0.05, 0.3, 5.0)):
                    sm.case(f"mad_step {ydist} eps={eps} {tag}", ops.mad_step, y, p, eps, ydist)
            for r in ((0.5, 3.0) if sm.quick else (0.5, 1.0, 3.0)):
                sm.case(f"project_simplex r={r} {tag}", ops.project_simplex, v, r)
                sm.case(f"project_l1_ball r={r} {tag}", ops.project_l1_ball, v, r)
            sm.case(f"grad2_allocate {tag}", ops.grad2_allocate, y, v, [0.0, 0.05, 0.3, 1.0, 2.0])
            simplex_rows, l1_rows = _feasible_rows(K, dt)
            for fn, rows in ((ops.project_simplex, simplex_rows), (ops.project_l1_ball, l1_rows)):
                out = sm.case(f"{fn.__name__} feasible rows {tag}", fn, rows, 1.0, exact=(0,))
                if out is not None:  # returned unchanged, not merely equal to the CPU's
                    sm.compare(f"{fn.__name__} feasible unchanged {tag}", out, rows, exact=(0,))

        # ---- once per dtype: non-contiguous inputs, a non-default stream, B = 0
        B, K = (6, 33) if sm.quick else (9, 40)
        d = _inputs(B, K, dt, g)
        y, p, h, hsq, G, M, idx, v = (d[k] for k in ("y", "p", "h", "hsq", "G", "M", "idx", "v"))
        ys = ops.mad_oracle(y, p=p, h_sqnorm=hsq, oracle="argmax", objmax=True)[0]
        calls = [
            ("jacobian_gram_fc", ops.jacobian_gram_fc, (p, hsq), {}, ()),
            ("jacobian_tvec_fc", ops.jacobian_tvec_fc, (p, h, y), {}, ()),
            ("jacobian_gram", ops.jacobian_gram, (G,), {}, ()),
            ("jacobian_tvec", ops.jacobian_tvec, (G, y), {}, ()),
            ("mad_oracle fc argmax", ops.mad_oracle, (y,), dict(p=p, h_sqnorm=hsq, oracle="argmax", objmax=True,
                                                                 exact_max_k=4, max_candidates=64), (0,)),
            ("mad_oracle dense extreme", ops.mad_oracle, (y,), dict(gram=M, oracle="extreme"), (0,)),
            ("mad_oracle random", ops.mad_oracle, (y,), dict(oracle="random", index=idx), (0,)),
            ("mad_objective fc", ops.mad_objective, (ys, y), dict(p=p, h_sqnorm=hsq), ()),
            ("mad_objective dense", ops.mad_objective, (ys, y), dict(gram=M), ()),
            ("mad_step kl", ops.mad_step, (y, p, 0.05, "kl"), {}, ()),
            ("mad_step l1", ops.mad_step, (y, ys, 0.3, "l1"), {}, ()),
            ("project_simplex", ops.project_simplex, (v, 1.0), {}, ()),
            ("project_l1_ball", ops.project_l1_ball, (v, 0.5), {}, ()),
            ("grad2_allocate", ops.grad2_allocate, (y, v, [0.1, 1.0]), {}, ()),
        ]
        tag = f"{str(dt)[6:]} B={B} K={K}"
        for name, fn, args, kw, exact in calls:
            sm.case(f"{name} non-contiguous {tag}", fn, *args, **kw, exact=exact, noncontig=True)
            sm.stream_case(f"{name} side stream {tag}", fn, *args, **kw, exact=exact)
            sm.case(f"{name} B=0 {tag}", fn, *[a[:0] if isinstance(a, torch.Tensor) else a for a in args],
                    **{k: (a[:0] if isinstance(a, torch.Tensor) else a) for k, a in kw.items()}, exact=exact)

        # ---- random oracle drawn from one seed: identical on both devices
        for s in (seed, seed + 1):
            sm.compare(
                f"mad_oracle random seed={s} {tag}",
                ops.mad_oracle(y.to(sm.dev), p=p.to(sm.dev), h_sqnorm=hsq.to(sm.dev), oracle="random",
                               generator=torch.Generator().manual_seed(s)),
                ops.mad_oracle(y, p=p, h_sqnorm=hsq, oracle="random", generator=torch.Generator().manual_seed(s)),
                exact=(0, 1),
            )

        # ---- NaN / Inf: the device raises the CPU's error, argument named, in the CPU's order
        nan_y, inf_p = y.clone(), p.clone()
        nan_y[1, 2] = math.nan
        inf_p[0, 3] = math.inf
        nan_G = G.clone()
        nan_G[-1, 0, 1] = math.nan
        errs = [
            ("oracle nan y", ops.mad_oracle, (nan_y,), {}),
            ("oracle inf p", ops.mad_oracle, (y,), dict(p=inf_p)),
            ("oracle nan y and inf p", ops.mad_oracle, (nan_y,), dict(p=inf_p)),
            ("oracle negative h_sqnorm", ops.mad_oracle, (y,), dict(p=p, h_sqnorm=-hsq - 1)),
            ("oracle index range", ops.mad_oracle, (y,), dict(oracle="random", index=torch.full((B,), K))),
            ("objective nan y_tilde", ops.mad_objective, (nan_y, y), {}),
            ("step inf y_star", ops.mad_step, (y, inf_p, 0.1, "kl"), {}),
            ("simplex nan v", ops.project_simplex, (nan_y, 1.0), {}),
            ("l1 inf v", ops.project_l1_ball, (inf_p, 1.0), {}),
            ("gram nan G", ops.jacobian_gram, (nan_G,), {}),
            ("tvec nan G", ops.jacobian_tvec, (nan_G, y), {}),
            ("gram_fc inf p", ops.jacobian_gram_fc, (inf_p, hsq), {}),
            ("tvec_fc nan y", ops.jacobian_tvec_fc, (p, h, nan_y), {}),
            ("grad2 nan c", ops.grad2_allocate, (y, nan_y, 0.1), {}),
        ]
        for name, fn, args, kw in errs:
            sm.same_error(f"error {name} {tag}", fn, *args, **kw)



def run_modelguard(sm: Smoke, seed: int) -> None:
    """modelguard_w_solve CUDA vs CPU: random y (distinct entries, a unique optimum), a tie at the
    top (infeasible for a tiny ε), non-contiguous, a side stream, B = 0 and the NaN error."""
    g = torch.Generator().manual_seed(seed + 17)
    for dt in (torch.float64, torch.float32):
        for B, K in (((5, 2), (33, 10)) if sm.quick else ((5, 2), (37, 10), (9, 100), (300, 17))):
            y = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * 3, 1).to(dt)
            tag = f"{str(dt)[6:]} B={B} K={K}"
            for eps in ((0.1, 1.0) if sm.quick else (0.0, 0.05, 0.5, 1.0, 2.0)):
                sm.case(f"modelguard_w_solve eps={eps} {tag}", ops.modelguard_w_solve, y, eps, exact=(2,))
        y = torch.softmax(torch.randn(9, 12, generator=g, dtype=torch.float64) * 3, 1).to(dt)
        tied = y.clone()
        tied[:, 1] = tied[:, 0] = tied.max(1).values
        tag = f"{str(dt)[6:]} B=9 K=12"
        # infeasible: x = y bit for bit; the objective Σ log(y + offset)·y within tolerance (device log)
        sm.case(f"modelguard_w_solve tied top {tag}", ops.modelguard_w_solve, tied, 1e-6, exact=(0, 2))
        sm.case(f"modelguard_w_solve non-contiguous {tag}", ops.modelguard_w_solve, y, 0.5, exact=(2,),
                noncontig=True)
        sm.stream_case(f"modelguard_w_solve side stream {tag}", ops.modelguard_w_solve, y, 0.5, exact=(2,))
        sm.case(f"modelguard_w_solve B=0 {tag}", ops.modelguard_w_solve, y[:0], 0.5, exact=(0, 1, 2))
        bad = y.clone()
        bad[2, 3] = math.nan
        sm.same_error(f"error modelguard_w_solve nan y {tag}", ops.modelguard_w_solve, bad, 0.5)
        sm.same_error(f"error modelguard_w_solve negative y {tag}", ops.modelguard_w_solve, -y, 0.5)

def run_grad2_ties_and_shapes(sm: Smoke, seed: int) -> None:
    """grad2_allocate bit for bit on tie-heavy rows (equal c, −0.0 next to +0.0, zeros in p) up to
    K = 5000 (torch's CUDA sort switches to its segmented radix sort above 4096), and, full smoke
    only, one K = 20000 call timed: the donor order is one batch sort, so it takes milliseconds
    (a sort on one device thread, O(K²), took seconds). Then the thread-per-row ops at batch sizes
    on each side of row_launch's shapes (1 row; blocks of 32 on many SMs; full blocks)."""
    g = torch.Generator().manual_seed(seed + 29)
    eps = [0.0, 0.3, 1.0, 2.0]
    vals = torch.tensor([-0.0, 0.0, 0.25, -1.5], dtype=torch.float64)

    def tie_heavy(B, K, dt):
        p = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * 3, 1)
        p = torch.where(torch.rand(B, K, generator=g) < 0.3, 0.0, p)
        p[:, 0] += 1e-3
        return (p / p.sum(1, keepdim=True)).to(dt), vals[torch.randint(4, (B, K), generator=g)].to(dt)

    for dt in (torch.float64, torch.float32):
        for B, K in (((3, 2), (5, 300)) if sm.quick else ((3, 2), (33, 64), (5, 300), (2, 5000))):
            p, c = tie_heavy(B, K, dt)
            sm.case(f"grad2_allocate ties {str(dt)[6:]} B={B} K={K}", ops.grad2_allocate, p, c, eps, exact=(0,))
    if not sm.quick:
        p, c = tie_heavy(2, 20000, torch.float32)
        pd, cd = p.to(sm.dev), c.to(sm.dev)
        ops.grad2_allocate(pd[:, :50], cd[:, :50], eps)  # the sort's first call out of the timing
        if sm.dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = ops.grad2_allocate(pd, cd, eps)
        if sm.dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        print(f"grad2_allocate B=2 K=20000 E=4 on {sm.dev}: {secs * 1e3:.1f} ms", flush=True)
        sm.compare("grad2_allocate ties float32 B=2 K=20000", got, ops.grad2_allocate(p, c, eps), exact=(0,))
        if secs > 1.0:
            sm.fail("grad2_allocate K=20000 time", f"{secs:.2f} s > 1 s: a per-row O(K^2) path?")

    # Batch sizes around row_launch's shapes (H100/H200: 132 SMs; 1 row, 32-thread blocks up to
    # 32·SMs rows, wider blocks, full 256-thread blocks from 256·SMs rows)
    K = 5
    for B in ((1, 300) if sm.quick else (1, 300, 5000, 40000)):
        d = _inputs(B, K, torch.float32, g, D=3)
        y, p, hsq, idx, v = (d[k] for k in ("y", "p", "hsq", "idx", "v"))
        ys = ops.mad_oracle(y, p=p, h_sqnorm=hsq, oracle="extreme")[0]
        tag = f"float32 B={B} K={K}"
        # extreme, not argmax: no near-tie between vertices can make y* differ among 40000 rows
        sm.case(f"mad_oracle fc extreme {tag}", ops.mad_oracle, y, p=p, h_sqnorm=hsq, oracle="extreme",
                exact=(0,))
        sm.case(f"mad_oracle random {tag}", ops.mad_oracle, y, oracle="random", index=idx, exact=(0,))
        sm.case(f"mad_objective fc {tag}", ops.mad_objective, ys, y, p=p, h_sqnorm=hsq)
        sm.case(f"mad_step kl {tag}", ops.mad_step, y, ys, 0.05, "kl")
        sm.case(f"project_simplex {tag}", ops.project_simplex, v, 1.0)
        sm.case(f"project_l1_ball {tag}", ops.project_l1_ball, v, 0.5)
        sm.case(f"grad2_allocate {tag}", ops.grad2_allocate, y, v, [0.1, 1.0], exact=(0,))
        sm.case(f"modelguard_w_solve {tag}", ops.modelguard_w_solve, y, 0.5, exact=(2,))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="device to compare with the CPU (default cuda)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (the compute-sanitizer runs)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible to torch", torch.__version__, file=sys.stderr)
        return 2
    t0 = time.time()
    sm = Smoke(dev, a.quick)
    run(sm, a.seed)
    run_modelguard(sm, a.seed)
    run_grad2_ties_and_shapes(sm, a.seed)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_smoke ({dev}, {'quick' if a.quick else 'full'}, pid {os.getpid()}): {sm.checks} checks, "
          f"{len(sm.bad)} failed, {time.time() - t0:.1f}s")
    return 3 if sm.bad else 0


if __name__ == "__main__":
    sys.exit(main())
