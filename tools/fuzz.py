"""Long fuzz run of the ops, the MAD defense and the field defenses on adversarial posteriors.

    python tools/fuzz.py --inputs 1000000 --out fuzz.json

Each round draws a batch of edge-case posteriors (ppoison_ext.fuzzing.EDGE_KINDS) of a
random K, dtype and Gram form and checks:

* invariants: oracle outputs are vertices (argmax kept for `argmax`), steps stay on the
  simplex (1e-6) and in the ε-ball (1e-5), projections are feasible, MAD's released
  posteriors satisfy all of that end to end, and NaN/Inf inputs raise a ValueError;
* values, every round: each native op against its pure-PyTorch twin
  (ppoison_ext.reference) on the same inputs: the four Jacobian ops, mad_oracle (the same
  `index` for `random`; where the chosen vertices differ, the native one must score as
  well as the twin's: a tie), mad_objective, mad_step (for `kl`, a branch decided the other
  way by a KL within 1e-9·ε of ε counts as a tie), project_simplex, project_l1_ball
  (tolerances: fuzzing.VALUE_TOL, scaled by each row's magnitude);
* values, on a sample of rows per round (--port-rows, default 16; 2 for the exact argmax
  search of 11 ≤ K ≤ 16, whose port loops over 2^(K−1) vertices in Python): the per-sample
  port of the reference code, tests/original_mad.py, in float64 with the explicit G
  (identity, or √‖h‖²·(1pᵀ − I) for the Gram forms): its oracles (ties allowed as above,
  within 64·eps of the op's dtype; rows whose angular objective takes the direction of a
  Gᵀy below the Gram form's rounding, 64·eps·‖G‖², are counted as degenerate, not compared),
  its line search on the native y* (for kl not where some y_k = y*_k = 0: the reference's
  F.kl_div is NaN there, 0·log 0), and its alternating projections (l1/l2, ε > 0) against
  MAD's `optim="projections"` plus MAD's final step back into the ball;
* the field defenses, every round, end to end on a logits victim whose posteriors are the
  round's y (tests/field_properties.py, the checks of the property tests): GRAD² (random
  target among all_ones/min_ip/max_norm/a tensor/a watermark, full or fc Jacobian, per-sample
  or batch, 1 or 3 seeded surrogates), Adaptive Misinformation (random variant, τ, ν's
  default, adaptive or not, temperature, score model), ModelGuard-W, ModelGuard-S (the stream
  then a frozen copy on the round's p), MADGR, ReverseSigmoidGR and RandomGR, each for what it
  promises (simplex, ε-ball, top-1, the same answers for the same seed, ...); ModelGuard-S and
  MADGR on the round's first rows only where their checks' memory grows as B²K or BK².

The port and the field checks live in the test folder, so this tool inserts the repository's
tests/ folder into sys.path to import them (acceptable for a tool; the library never imports it).
Counts every input, every violation and every mismatch (by check name); exits 1 on any.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import random
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from ppoison_ext import ops, reference
from ppoison_ext.defenses import MAD
from ppoison_ext.fuzzing import (
    EDGE_KINDS,
    VALUE_TOL,
    check_ball,
    check_simplex,
    compare_close,
    edge_probs,
    mismatched_rows,
)
from ppoison_ext.testing import IdentityLogits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import field_properties as fp  # noqa: E402  the field defenses' checks, shared with the property tests
import original_mad as orig  # noqa: E402  the per-sample port of the reference code


Logits = IdentityLogits


def _row_scale(gargs, y):
    """Per-row magnitude of the objective values: ‖h‖² (fc), max |M| (dense), 1 (G = I)."""
    if "h_sqnorm" in gargs:
        return gargs["h_sqnorm"].double().abs()
    if "gram" in gargs:
        return gargs["gram"].double().abs().flatten(1).amax(1)
    return torch.ones(y.shape[0], dtype=torch.float64)


def _value_of(ystar, y, gargs, angular):
    obj, sobj = reference.mad_objective(ystar, y, **gargs)
    return (obj if angular else sobj).double()


def twin_checks(y, ystar, val, index, yp, oracle, objmax, ydist, eps, gargs, dtype, g):
    """Native ops against their pure-PyTorch twins on this round's inputs."""
    rtol = VALUE_TOL[dtype]
    B, K = y.shape
    out = []
    scale = _row_scale(gargs, y)
    # oracle: same index for `random`; differing vertices must be ties
    t_star, t_val = reference.mad_oracle(y, oracle=oracle, objmax=objmax, index=index, **gargs)
    greedy = oracle == "argmax" and K > 16
    angular = objmax or greedy
    vtol = 4.0 * rtol * (1.0 if angular else 1.0 + scale)
    out += compare_close("twin mad_oracle value", val, t_val, rtol, vtol)
    diff = (ystar != t_star).any(1)
    if diff.any():
        y_eval = reference._smooth(y) if greedy else y
        ga = {k: v[diff] for k, v in gargs.items()}
        v_n = _value_of(ystar[diff], y_eval[diff], ga, angular)
        v_t = _value_of(t_star[diff], y_eval[diff], ga, angular)
        tie_tol = 1e-5 if dtype == torch.float32 else 1e-9
        out += compare_close("twin mad_oracle vertex (not a tie)", v_n, v_t, tie_tol, vtol[diff] * 10)
    # step on the native y*
    t_step = reference.mad_step(y, ystar, eps, ydist)
    bad = mismatched_rows(yp, t_step, rtol, rtol)
    if bad.any() and ydist == "kl":  # a KL within 1e-9·ε of ε may be decided either way
        for e in (eps * (1 - 1e-9) - 1e-13, eps * (1 + 1e-9) + 1e-13):
            bad &= mismatched_rows(yp, reference.mad_step(y, ystar, max(e, 0.0), ydist), rtol, rtol)
    if bad.any():
        out += compare_close("twin mad_step", yp[bad], t_step[bad], rtol, rtol)
    # objective of the released rows
    obj, sobj = ops.mad_objective(yp, y, **gargs)
    t_obj, t_sobj = reference.mad_objective(yp, y, **gargs)
    out += compare_close("twin mad_objective obj", obj, t_obj, rtol, 4.0 * rtol)
    out += compare_close("twin mad_objective sobj", sobj, t_sobj, rtol, 4.0 * rtol * (1.0 + scale))
    # Jacobian ops
    p = gargs.get("p", y)
    hsq = gargs.get("h_sqnorm", torch.ones(B, dtype=dtype))
    jtol = 2e-5 if dtype == torch.float32 else 1e-10  # these twins compute in the input dtype
    out += compare_close("twin jacobian_gram_fc", ops.jacobian_gram_fc(p, hsq),
                         reference.jacobian_gram_fc(p, hsq), jtol, jtol * 4.0 * hsq.double().abs())
    h = torch.randn(B, 4, generator=g, dtype=torch.float64).to(dtype)
    hmax = h.double().abs().amax(1)
    out += compare_close("twin jacobian_tvec_fc", ops.jacobian_tvec_fc(p, h, y),
                         reference.jacobian_tvec_fc(p, h, y), jtol, jtol * 4.0 * hmax)
    if K <= 256:
        G = torch.randn(B, K, 3, generator=g, dtype=torch.float64).to(dtype)
        gmax = G.double().abs().flatten(1).amax(1)
        out += compare_close("twin jacobian_gram", ops.jacobian_gram(G), reference.jacobian_gram(G),
                             jtol, jtol * 3.0 * gmax ** 2)
        out += compare_close("twin jacobian_tvec", ops.jacobian_tvec(G, y), reference.jacobian_tvec(G, y),
                             jtol, jtol * gmax)
    return out


def projection_twin_checks(v, radius, x, z, dtype):
    ptol = 2e-6 if dtype == torch.float32 else 1e-12
    atol = ptol * (v.double().abs().amax(1) + radius)
    return (compare_close("twin project_simplex", x, reference.project_simplex(v, radius), 0.0, atol)
            + compare_close("twin project_l1_ball", z, reference.project_l1_ball(v, radius), 0.0, atol))


def _explicit_G(gargs, K, i):
    """The port's G [K, D] for row i, float64: I, or √‖h‖²·(1pᵀ − I) (H = 1: row k = (p − e_k)·h)."""
    if not gargs:
        return torch.eye(K, dtype=torch.float64)
    p = gargs["p"][i].double()
    hsq = gargs["h_sqnorm"][i].double()
    return torch.sqrt(hsq) * (p[None, :] - torch.eye(K, dtype=torch.float64))


def port_checks(rows, y, ystar, index, yp, oracle, objmax, ydist, eps, pargs, dtype, counts):
    """Rows of this round against the per-sample port (tests/original_mad.py), float64."""
    out = []
    K = y.shape[1]
    rtol = VALUE_TOL[dtype]
    tie_tol = 1e-5  # the port's argmax vertices are float32, like the reference's
    proj_rows = []
    for i in rows:
        yr, sr = y[i].double(), ystar[i].double()
        G = _explicit_G(pargs, K, i)
        counts["port_rows"] += 1
        # oracle
        try:
            if oracle == "extreme":
                ps, _ = orig.oracle_extreme(G, yr, objmax)
            elif oracle == "argmax":
                ps, _ = orig.oracle_argmax_preserving(G, yr, objmax, exact_max_k=16)
            elif oracle == "argmin":
                ps = orig.oracle_argmin(yr)
            else:
                ps = orig.oracle_rand(yr, index[i])
        except (AssertionError, IndexError, TypeError, AttributeError, RuntimeError) as err:
            # the reference's own assert / a NaN angular objective (Gᵀy = 0) leaving y* unset
            counts["port_oracle_skipped"] += 1
            ps = None
            if oracle in ("argmin", "random"):
                out.append(f"port oracle: raised {type(err).__name__}")
        if ps is not None:
            ps = ps.double()
            if not torch.allclose(ps, sr, rtol=0, atol=1e-6):
                greedy = oracle == "argmax" and K > 16
                ye = (yr + 1e-8) / (yr + 1e-8).sum() if greedy else yr
                f = orig.calc_objective if (objmax or greedy) else orig.calc_surrogate_objective
                vn, vp = float(f(sr, ye, G)), float(f(ps, ye, G))
                # the angular objective takes directions of Gᵀy, Gᵀy*: below the rounding of the
                # op's Gram form (≈ eps·‖G‖²) such a direction is noise (e.g. p − e_k of 1e-26),
                # and its values (in [0, 4]) tie within 4·64·eps
                angular, rounding = f is orig.calc_objective, 64 * torch.finfo(dtype).eps
                floor = rounding * float((G * G).sum())
                if not (math.isfinite(vn) and math.isfinite(vp)):
                    counts["port_oracle_skipped"] += 1  # the port's NaN angular objective (Gᵀy = 0)
                elif angular and min(float((G.t() @ v).square().sum()) for v in (sr, ps, ye)) <= floor:
                    counts["port_oracle_degenerate"] += 1
                elif (oracle in ("argmin", "random")
                      or abs(vn - vp) > tie_tol * max(abs(vn), abs(vp), 1e-300)
                      + (4 * rounding if angular else floor)):
                    out.append(f"port oracle: vertex value {vn:.17g} vs the port's {vp:.17g}")
        # line search on the native y*. Not comparable for kl when some class has y_k = y*_k = 0:
        # the reference's F.kl_div(ỹ.log(), y) is then NaN at every α (0·log 0), so the port never
        # finds a feasible point and returns y (the reference itself fails its assert
        # `feasible_low or feasible_high`); the op counts such terms as 0, the definition.
        if ydist == "kl" and bool(((yr == 0) & (sr == 0)).any()):
            counts["port_linesearch_skipped"] += 1
            want = None
        else:
            want = yr + orig.linesearch(yr, sr, ydist, eps)
        if want is not None and mismatched_rows(yp[i:i + 1], want[None], rtol, rtol).any():
            alt = [yr + orig.linesearch(yr, sr, ydist, max(e, 0.0))
                   for e in (eps * (1 - 1e-9) - 1e-13, eps * (1 + 1e-9) + 1e-13)] if ydist == "kl" else []
            if all(mismatched_rows(yp[i:i + 1], a[None], rtol, rtol).any() for a in alt):
                out += compare_close("port linesearch", yp[i:i + 1], want[None], rtol, rtol)
        if ydist != "kl" and eps > 0:
            proj_rows.append(i)
    if proj_rows:  # alternating projections: MAD's (float64) vs the port's + MAD's final step back
        yr, sr = y[proj_rows].double(), ystar[proj_rows].double()
        mad = MAD(nn.Identity(), epsilon=eps, ydist=ydist, optim="projections")
        got = mad._projections(yr, sr)
        port = torch.stack([yr[j] + orig.projections(yr[j], sr[j], eps, ydist)
                            for j in range(len(proj_rows))])
        d = (port - yr).abs().sum(1) if ydist == "l1" else (port - yr).norm(dim=1)
        scale = torch.where(d > eps, eps / d.clamp(min=1e-300), torch.ones_like(d))
        out += compare_close("port projections", got, yr + scale[:, None] * (port - yr), 0.0, 1e-10)
        counts["port_projection_rows"] += len(proj_rows)
    return out


def field_checks(y, y_next, eps, rng, counts):
    """The field defenses on this round's posteriors y [B, K] (y_next: ModelGuard-S's frozen copy's
    queries); ``counts["field_rows <name>"]`` counts the rows each defense answered."""
    B, K = y.shape
    seed = rng.randrange(1000)
    n_s = min(B, max(2, int((2 ** 25 / K) ** 0.5)))  # ModelGuard-S: B²K comparisons
    n_m = min(B, max(1, 2 ** 24 // K ** 2))  # MADGR: B K² cosines
    variant = rng.choice(fp.AM_VARIANT_NAMES)
    adaptive = rng.random() < 0.8
    cfg = {
        "GRAD2": (B, dict(target=rng.choice(fp.GRAD2_TARGETS), jacobian=rng.choice(["full", "fc"]),
                          batch_independent=rng.random() < 0.5, surrogates=rng.choice([1, 1, 3]), seed=seed)),
        "AM": (B, dict(tau=rng.choice([0.5, 0.9, 0.99, 0.999, 1.5]) if adaptive else rng.random(),
                       variant=variant, adaptive=adaptive, temperature=rng.choice([1.0, 1.0, 0.5, 3.0]),
                       score_model=variant == "grad2" and rng.random() < 0.5, seed=seed)),
        "ModelGuard-W": (B, {}),
        "ModelGuard-S": (n_s, dict(ydist=rng.choice(["l1", "l2"]), cut=rng.randrange(n_s + 1))),
        "MADGR": (n_m, dict(seed=seed)),
        "ReverseSigmoidGR": (B, dict(beta=rng.choice([0.0, 0.1, 0.5, 1.0, 1.28, 5.0]),
                                     gamma=rng.choice([0.0, 0.1, 0.2, 1.0, 5.0]))),
        "RandomGR": (B, dict(eps=min(eps, 2.0), seed=seed)),
    }
    run = {"GRAD2": lambda n, a: fp.grad2_problems(y[:n], eps, **a),
           "AM": lambda n, a: fp.am_problems(y[:n], **a),
           "ModelGuard-W": lambda n, a: fp.modelguard_w_problems(y[:n], eps),
           "ModelGuard-S": lambda n, a: fp.modelguard_s_problems(y[:n], eps, y_next=y_next[:n], **a),
           "MADGR": lambda n, a: fp.mad_gr_problems(y[:n], eps, **a),
           "ReverseSigmoidGR": lambda n, a: fp.reverse_sigmoid_gr_problems(y[:n], **a),
           "RandomGR": lambda n, a: fp.random_gr_problems(y[:n], **a)}
    out = []
    for name, (n, a) in cfg.items():
        t0 = time.time()
        out += [f"{e} {a}" for e in run[name](n, a)]
        counts[f"field_rows {name}"] += n
        counts[f"field_seconds {name}"] += time.time() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="posterior rows to push through (default 1e6)")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port-rows", type=int, default=16,
                    help="rows per round checked against the per-sample port (default 16)")
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    args = ap.parse_args(argv)
    logging.getLogger("ppoison_ext.defenses.modelguard").setLevel(logging.ERROR)  # infeasible rows, counted
    rng = random.Random(args.seed)
    field_rng = random.Random(f"field {args.seed}")  # own stream: the other checks' rounds stay as before
    counts = collections.Counter()
    errors = collections.Counter()
    examples = []
    t0 = time.time()
    bar = tqdm(total=args.inputs, unit="rows", desc="fuzz")
    while counts["rows"] < args.inputs:
        K = rng.choice([2, 3, 5, 10, 16, 26, 47, 100, 256, 1000])
        B = max(1, args.batch // max(1, K // 64))
        dtype = rng.choice([torch.float32, torch.float64])
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        ykind, pkind = rng.choice(EDGE_KINDS), rng.choice(EDGE_KINDS)
        y = edge_probs(B, K, ykind, dtype=dtype, generator=g)
        p = edge_probs(B, K, pkind, dtype=dtype, generator=g)
        hsq = (torch.rand(B, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-6, 6)).to(dtype)
        form = rng.choice(["fc", "identity"] + (["dense"] if K <= 100 else []))
        gargs = {"fc": {"p": p, "h_sqnorm": hsq}, "identity": {},
                 "dense": {"gram": reference.jacobian_gram_fc(p.double(), hsq.double()).to(dtype)}}[form]
        pargs = {} if form == "identity" else {"p": p, "h_sqnorm": hsq}  # the port's G comes from these
        oracle = rng.choice(list(ops.ORACLES))
        objmax = rng.random() < 0.5
        ydist = rng.choice(list(ops.YDISTS))
        eps = rng.choice([0.0, 1e-4, 0.01, 0.1, 0.5, 1.0, 2.5])
        case = f"K={K} {dtype} y={ykind} p={pkind} {form} {oracle} objmax={objmax} {ydist} eps={eps}"
        problems = []
        index = torch.randint(K, (B,), generator=g) if oracle == "random" else None
        ystar, val = ops.mad_oracle(y, oracle=oracle, objmax=objmax, index=index, **gargs)
        problems += ["oracle: " + e for e in check_simplex(ystar, 1e-5)]
        if not torch.isfinite(val).all():
            problems.append("oracle: non-finite value")
        if oracle == "argmax" and not torch.equal(ystar.argmax(1), y.argmax(1)):
            problems.append("oracle: argmax changed")
        yp = ops.mad_step(y, ystar, eps, ydist)
        problems += ["step: " + e for e in check_simplex(yp) + check_ball(y, yp, eps, ydist)]
        obj, sobj = ops.mad_objective(yp, y, **gargs)
        if not (torch.isfinite(obj).all() and torch.isfinite(sobj).all()):
            problems.append("objective: non-finite")
        v = (torch.randn(B, K, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-20, 6)).to(dtype)
        radius = 10 ** rng.uniform(-4, 3)
        x = ops.project_simplex(v, radius)
        if not torch.isfinite(x).all() or (x < 0).any():
            problems.append("project_simplex: infeasible")
        z = ops.project_l1_ball(v, radius)
        if not torch.isfinite(z).all() or (z.double().abs().sum(1) > radius * (1 + 1e-5) + 1e-30).any():
            problems.append("project_l1_ball: infeasible")
        counts["rows"] += B
        counts["op_calls"] += 5
        # values: every native op against its twin, and a sample of rows against the port
        problems += twin_checks(y, ystar, val, index, yp, oracle, objmax, ydist, eps, gargs, dtype, g)
        problems += projection_twin_checks(v, radius, x, z, dtype)
        counts["twin_rounds"] += 1
        n_port = min(B, 2 if (oracle == "argmax" and 10 < K <= 16) else args.port_rows)
        rows = sorted(rng.sample(range(B), n_port))
        problems += port_checks(rows, y, ystar, index, yp, oracle, objmax, ydist, eps, pargs, dtype, counts)
        # end to end through the MAD defense on a logits victim (every 4th round)
        if counts["rounds"] % 4 == 0 and K <= 256:
            victim = Logits(K)
            torch.manual_seed(counts["rounds"])
            proxy = nn.Sequential(nn.Linear(K, 8), nn.ReLU(), nn.Linear(8, K))
            xb = torch.randn(B, K, generator=g) * 10 ** rng.uniform(-1, 4)
            optim = "projections" if (ydist != "kl" and rng.random() < 0.3) else "linesearch"
            out = MAD(victim, epsilon=eps, proxy=proxy, oracle=oracle, ydist=ydist, objmax=objmax, optim=optim,
                      seed=1).perturb(xb)
            problems += ["MAD: " + e for e in check_simplex(out.y_prime) + check_ball(out.y, out.y_prime, eps, ydist)]
            if oracle == "argmax" and not torch.equal(out.y_prime.argmax(1), out.y.argmax(1)):
                problems.append("MAD: argmax changed")
            counts["mad_rows"] += B
        # the field defenses end to end, every round
        problems += field_checks(y, p, eps, field_rng, counts)
        # bad input must raise a named ValueError
        bad = y.clone()
        bad[rng.randrange(B), rng.randrange(K)] = rng.choice([math.nan, math.inf, -math.inf])
        try:
            ops.mad_step(bad, ystar, 0.1, "l1")
            problems.append("NaN input accepted")
        except ValueError as err:
            if "y contains NaN" not in str(err):
                problems.append(f"NaN input: unnamed error {err}")
        counts["nan_inputs"] += 1
        counts["rounds"] += 1
        for prob in problems:
            errors[prob.split(":")[0]] += 1
            if len(examples) < 20:
                examples.append(f"{prob} [{case}]")
        bar.update(B)
    bar.close()
    summary = {"rows": counts["rows"], "mad_rows": counts["mad_rows"], "rounds": counts["rounds"],
               "op_calls": counts["op_calls"], "nan_inputs_rejected": counts["nan_inputs"],
               "twin_rounds": counts["twin_rounds"], "port_rows": counts["port_rows"],
               "port_projection_rows": counts["port_projection_rows"],
               "port_oracle_skipped": counts["port_oracle_skipped"],
               "port_linesearch_skipped_kl_zeros": counts["port_linesearch_skipped"],
               "field_rows": {k.split(" ", 1)[1]: v for k, v in counts.items()
                              if k.startswith("field_rows ")},
               "field_seconds": {k.split(" ", 1)[1]: round(v, 1) for k, v in counts.items()
                                 if k.startswith("field_seconds ")},
               "violations": dict(errors), "examples": examples, "seconds": round(time.time() - t0, 1),
               "torch": torch.__version__, "seed": args.seed}
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
