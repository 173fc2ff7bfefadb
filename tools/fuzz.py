"""Long fuzz run of the ops and the MAD defense on adversarial posteriors.

    python tools/fuzz.py --inputs 1000000 --out fuzz.json

Each round draws a batch of edge-case posteriors (ppoison_ext.fuzzing.EDGE_KINDS) of a
random K, dtype and Gram form and checks: oracle outputs are vertices (argmax kept for
`argmax`), steps stay on the simplex (1e-6) and in the ε-ball (1e-5), projections are
feasible, MAD's released posteriors satisfy all of that end to end, and NaN/Inf inputs
raise a ValueError. Counts every input and every violation; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from ppoison_ext import ops, reference
from ppoison_ext.defenses import MAD
from ppoison_ext.fuzzing import EDGE_KINDS, check_ball, check_simplex, edge_probs


class Logits(nn.Module):
    def __init__(self, K):
        super().__init__()
        self.fc = nn.Linear(K, K)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(K))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="posterior rows to push through (default 1e6)")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
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
        oracle = rng.choice(list(ops.ORACLES))
        objmax = rng.random() < 0.5
        ydist = rng.choice(list(ops.YDISTS))
        eps = rng.choice([0.0, 1e-4, 0.01, 0.1, 0.5, 1.0, 2.5])
        case = f"K={K} {dtype} y={ykind} p={pkind} {form} {oracle} objmax={objmax} {ydist} eps={eps}"
        problems = []
        ystar, val = ops.mad_oracle(y, oracle=oracle, objmax=objmax, generator=g, **gargs)
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
