"""``ppoison prove-eval VICTIM_DIR --out DIR``: DAWN's watermarks against every thief we ship, on an
MNIST victim with notMNIST queries (spec ``detect-and-prove.md`` §II.5), in one process.

Per rate r (``--rates``), the victim behind :class:`~ppoison_ext.defenses.DAWN` alone, its key
derived from ``--seed`` (so a run repeats). Thieves, each at every budget (``--budgets``: prefixes
of one notMNIST query stream) and seed (``--seeds``):

* ``naive``: soft labels; ``top1``: hard labels;
* ``ddae``: D-DAE+, a restorer fitted on 10,000 Dirichlet posteriors pushed through a
  posterior-only simulation of DAWN (with probability r, the wrong-answer rule under a random key);
* ``consistency``: each image queried twice, the second copy one ulp away in one pixel (2× the
  queries), pairs whose answers disagree dropped;
* ``self-consistency``: a first clone on half the answers drops the served labels it contradicts
  with confidence > 0.9, then a clone trains on the rest;
* the same thieves, D-DAE+ excepted, training ``--long-epochs`` at the largest budget (one seed): a clone
  that fits its answers longer learns more of the marked ones;
* sybil split of the (longer-training) naive thief's largest budget over m ∈ {1, 5, 20} keys
  beside 10 benign keys (500 MNIST test images each): one sybil key's watermarks, and the union of
  every key's, each tested at α / keys (Bonferroni over the server's keys).

The watermark set W of a thief is the marked queries it sent. Innocent suspects: ``--innocents``
LeNets trained on MNIST with other seeds (I1) and as many clones of the undefended victim on the
thief's queries (I3, the hardest null); the I1 innocents train with the victim's recipe on
``--innocent-subset`` images for ``--innocent-epochs``. Each claim is judged against both nulls and the worse
(larger) p-value is reported; each innocent is also judged against the other innocents
(leave-one-out): the false claims, with a Clopper–Pearson bound. Clones: LeNet, SGD (lr 0.02,
momentum 0.9), ``--clone-epochs``, batch 64, as the demo's thief. Writes ``results.json`` and
``prove_eval.md``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import DDAE, build_recovery_table
from ..defenses import DAWN, Blackbox
from ..devices import as_device
from ..fileio import atomic_write_json, atomic_write_text
from ..modeldir import dataset_name, load_model_dir
from .detect import split_data
from .detect_eval import fit_lenet
from .settings import CommonSettings, device_setting, entry_points, setting
from .verify import argmax_of, clopper_pearson_upper, ownership_claim

logger = logging.getLogger(__name__)

__all__ = ["ProveEvalSettings", "build_parser", "main"]

THIEVES = ("naive", "top1", "ddae", "consistency", "self-consistency")
#: the thieves of the longer recipe (D-DAE+ restores nearly the identity at r ≤ 2 %: left out for time)
LONG_THIEVES = ("naive", "top1", "consistency", "self-consistency")
SYBILS = (1, 5, 20)


def one_ulp(x: Tensor) -> Tensor:
    """x with the lowest mantissa bit of each row's first value flipped."""
    out = x.clone().contiguous()
    out.view(out.shape[0], -1).view(torch.int32)[:, 0] ^= 1
    return out


def dawn_simulation(rate: float, seed: int):
    """A posterior-only DAWN for the thief's recovery table: with probability ``rate`` a row's top-1
    is swapped with a uniformly drawn other class (the thief knows neither key nor inputs)."""
    g = torch.Generator().manual_seed(seed)

    def perturb(x: Tensor, y: Tensor) -> Tensor:
        y, K = y.clone(), y.shape[1]
        rows = (torch.rand(y.shape[0], generator=g) < rate).nonzero().flatten()
        m = y[rows].argmax(1)
        w = (m + 1 + torch.randint(K - 1, (rows.numel(),), generator=g)) % K
        top, other = y[rows, m], y[rows, w]
        y[rows, w], y[rows, m] = top, other
        return y

    return perturb


@dataclass(kw_only=True)
class ProveEvalSettings(CommonSettings):
    """DAWN's watermarks against every thief, with innocent suspects (see the module docs)."""

    victim_dir: str = setting(metavar="VICTIM_DIR", help="an MNIST victim folder")
    out: str = setting("--out", metavar="DIR", help="output folder")
    rates: str = setting("--rates", default="0.005,0.02", metavar="R,...",
                         help="DAWN rates (default %(default)s)")
    budgets: str = setting("--budgets", default="500,2000,5000", metavar="N,...",
                           help="thief query budgets (default %(default)s)")
    seeds: int = setting("--seeds", default=3, metavar="N", help="thief seeds per cell (default %(default)s)")
    innocents: int = setting("--innocents", default=10, metavar="M", help="innocents per group (default 10)")
    innocent_epochs: int = setting("--innocent-epochs", default=1, metavar="N",
                                   help="epochs of the MNIST innocents (the demo victim's recipe otherwise; "
                                        "default %(default)s)")
    innocent_subset: Optional[int] = setting("--innocent-subset", default=30000, metavar="N",
                                             help="MNIST training images of each innocent "
                                                  "(default %(default)s)")
    clone_epochs: int = setting("--clone-epochs", default=4, metavar="N",
                                help="thief epochs at every budget (the demo's; default %(default)s)")
    long_epochs: int = setting("--long-epochs", default=20, metavar="N",
                               help="epochs of a longer-training thief at the largest budget, one seed "
                                    "(0: none; default %(default)s)")
    alpha: float = setting("--alpha", default=0.01, metavar="A",
                           help="false-claim probability (default %(default)s)")
    device_id: int = device_setting()

    def run(self) -> Dict[str, Any]:
        device, out, t0 = as_device(self.device_id), Path(self.out), time.time()
        out.mkdir(parents=True, exist_ok=True)
        try:
            rates = [float(r) for r in self.rates.split(",")]
            budgets = sorted(int(b) for b in self.budgets.split(","))
        except ValueError as err:
            raise ValueError(f"rates / budgets: comma-separated numbers ({err})") from None
        if not all(0.0 < r < 1.0 for r in rates) or not all(b > 1 for b in budgets):
            raise ValueError(f"rates must lie in (0, 1) and budgets be > 1, got {rates} and {budgets}")
        victim, params = load_model_dir(self.victim_dir, device=device)
        if dataset_name(params) != "MNIST":
            raise ValueError(f"victim_dir: prove-eval runs on an MNIST victim, got {dataset_name(params)}")
        train_x, train_y = split_data("MNIST", True, self.data_root)
        test_x, test_y = split_data("MNIST", False, self.data_root)
        letters = split_data("notMNIST", True, self.data_root)[0]
        g = torch.Generator().manual_seed(self.seed)
        Q = budgets[-1]
        if Q > letters.shape[0]:
            raise ValueError(f"budgets: at most {letters.shape[0]} notMNIST queries, got {Q}")
        queries = letters[torch.randperm(letters.shape[0], generator=g)[:Q]]
        benign = test_x[torch.randperm(test_x.shape[0], generator=g)[:5000]].split(500)
        victim_test = argmax_of(victim, test_x, device)

        def probs(model: nn.Module, x: Tensor) -> Tensor:
            with torch.no_grad():
                return torch.cat([F.softmax(model(c.to(device)), 1).cpu() for c in x.split(1000)])

        def quality(model: nn.Module) -> Dict[str, float]:
            pred = argmax_of(model, test_x, device)
            return {"accuracy": 100 * float((pred == test_y).double().mean()),
                    "fidelity": 100 * float((pred == victim_test).double().mean())}

        clean = probs(victim, queries)
        M, n_train = self.innocents, self.innocent_subset or train_x.shape[0]
        innocents = {
            "I1": [fit_lenet(train_x[:n_train], F.one_hot(train_y[:n_train], 10).float(), device,
                             epochs=self.innocent_epochs, seed=1000 + j, lr=0.05, batch_size=128, lr_step=2)
                   for j in range(M)],
            "I3": [fit_lenet(queries, clean, device, epochs=self.clone_epochs, seed=2000 + j)
                   for j in range(M)],
        }
        logger.info("innocents trained in %.0f s", time.time() - t0)
        results: Dict[str, Any] = {"settings": asdict(self), "rates": {}, "innocent_quality": {
            k: [quality(m) for m in ms] for k, ms in innocents.items()}}

        def judge(model: Optional[nn.Module], x: Tensor, labels: Tensor, keys: int = 1,
                  skip: Optional[nn.Module] = None) -> Dict[str, Any]:
            """The worse claim of the two nulls (leave ``skip`` out of them) for a watermark set."""
            hits = argmax_of(model, x, device) == labels
            claims = []
            for group in innocents.values():
                others = [m for m in group if m is not skip]
                null = torch.stack([argmax_of(m, x, device) == labels for m in others])
                claims.append(ownership_claim(hits, 10, null_hits=null, alpha=self.alpha, keys=[""] * keys))
            worst = max(claims, key=lambda c: c.p_value)
            return {"n": worst.n, "hits": worst.hits, "wsr": worst.wsr, "p_chance": worst.p_chance,
                    "p_null": worst.p_null, "claimed": worst.claimed, "claimed_2_64": worst.claimed_2_64,
                    "n_required": worst.n_required,
                    "null_wsr": {k: c.null_wsr for k, c in zip(innocents, claims)}}

        for rate in rates:
            key = hashlib.sha256(f"ppoison prove-eval {self.seed} {rate}".encode()).digest()
            dawn = DAWN(Blackbox(victim), key=key, rate=rate)
            answers = [dawn.perturb(x.to(device)) for x in (test_x, queries, one_ulp(queries))]
            (y_test, _), (served, marks), (served2, marks2) = [(a.y_prime.cpu(), a.marks) for a in answers]
            row: Dict[str, Any] = {"effective_rate": dawn.effective_rate, "cost": {
                "accuracy": 100 * float((y_test.argmax(1) == test_y).double().mean()),
                "undefended_accuracy": 100 * float((victim_test == test_y).double().mean()),
                "changed_argmax": float((y_test.argmax(1) != victim_test).double().mean()),
                "mean_l1": float((y_test - probs(victim, test_x)).abs().sum(1).mean())},
                "marked_of_queries": int((marks >= 0).sum()), "thieves": {}}
            table = build_recovery_table(dawn_simulation(rate, self.seed), queries, table_size=10_000,
                                         released=served, seed=self.seed, device="cpu")
            restored = DDAE(epochs=20, seed=self.seed).fit(table).restore(served)
            # the demo thief's recipe at every budget and seed; a longer one at the largest budget
            recipes = [(self.clone_epochs, budgets, self.seeds, THIEVES, "")]
            if self.long_epochs:
                recipes.append((self.long_epochs, [Q], 1, LONG_THIEVES, f", {self.long_epochs} epochs"))
            for epochs, recipe_budgets, seeds, names, suffix in recipes:
                for b in recipe_budgets:
                    x, w = queries[:b], marks[:b] >= 0
                    wm_x, wm_y = x[w], marks[:b][w]
                    both_x = torch.cat([wm_x, one_ulp(x)[marks2[:b] >= 0]])
                    both_y = torch.cat([wm_y, marks2[:b][marks2[:b] >= 0]])
                    agree = served[:b].argmax(1) == served2[:b].argmax(1)
                    for s in range(seeds):
                        seed = self.seed + 100 * s
                        train = {"naive": (x, served[:b]), "ddae": (x, restored[:b]),
                                 "top1": (x, F.one_hot(served[:b].argmax(1), 10).float()),
                                 "consistency": (x[agree], served[:b][agree])}
                        if "self-consistency" in names:
                            half = fit_lenet(x[:b // 2], served[:b // 2], device, epochs=epochs, seed=seed)
                            conf, pred = probs(half, x).max(1)
                            keep = ~((pred != served[:b].argmax(1)) & (conf > 0.9))
                            train["self-consistency"] = (x[keep], served[:b][keep])
                        clones = {name: fit_lenet(*train[name], device, epochs=epochs, seed=seed)
                                  for name in names}
                        for name, clone in clones.items():
                            wx, wy = (both_x, both_y) if name == "consistency" else (wm_x, wm_y)
                            cell = {**quality(clone), **judge(clone, wx, wy)}
                            if name in ("consistency", "self-consistency"):
                                cell["kept"] = int(train[name][0].shape[0])
                            row["thieves"].setdefault(name + suffix, {}).setdefault(str(b), []).append(cell)
                        if b == Q and s == 0 and "innocents" not in row:
                            row["innocents"] = self.false_claims(innocents, wm_x, wm_y, judge)
                        if b == Q and s == 0 and (suffix or not self.long_epochs):  # the last recipe's clone
                            row["sybil"] = self.sybil(clones["naive"], dawn, benign, queries, marks, judge,
                                                      device)
                    logger.info("rate %g, budget %d, %d epochs done at %.0f s", rate, b, epochs,
                                time.time() - t0)
            row["overhead_us"] = self.overhead(dawn, test_x, device)
            results["rates"][str(rate)] = row
        results["seconds"] = time.time() - t0
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "prove_eval.md", report(results))
        logger.info("wrote %s in %.0f s", out, results["seconds"])
        return results

    def sybil(self, clone: nn.Module, dawn: DAWN, benign: Sequence[Tensor], queries: Tensor, marks: Tensor,
              judge, device) -> Dict[str, Any]:
        """The first of m round-robin sybil keys' claim, and the union of every key's, at α / keys."""
        out = {}
        benign_marks = [dawn.perturb(x.to(device)).marks for x in benign]
        union_x = torch.cat([queries[marks >= 0]] + [x[bm >= 0] for x, bm in zip(benign, benign_marks)])
        union_y = torch.cat([marks[marks >= 0]] + [bm[bm >= 0] for bm in benign_marks])
        for m in SYBILS:
            idx = torch.arange(0, queries.shape[0], m)
            idx = idx[marks[idx] >= 0]
            keys = m + len(benign)
            out[str(m)] = {"one_key": judge(clone, queries[idx], marks[idx], keys),
                           "union": judge(clone, union_x, union_y, keys)}
        return out

    def false_claims(self, innocents: Dict[str, List[nn.Module]], wm_x: Tensor, wm_y: Tensor,
                     judge) -> Dict[str, Any]:
        """Each innocent judged as a suspect against the other innocents: claims of 2·M."""
        cells = {k: [judge(m, wm_x, wm_y, skip=m) for m in ms] for k, ms in innocents.items()}
        claims = sum(c["claimed"] for cs in cells.values() for c in cs)
        total = sum(len(cs) for cs in cells.values())
        wsr = {k: [c["wsr"] for c in cs] for k, cs in cells.items()}
        return {"claims": claims, "of": total, "upper95": clopper_pearson_upper(claims, total),
                "wsr": {k: {"mean": float(np.mean(v)), "max": float(np.max(v)),
                            "p95": float(np.percentile(v, 95))} for k, v in wsr.items()}}

    @staticmethod
    def overhead(dawn: DAWN, x: Tensor, device) -> Dict[str, float]:
        """µs per query of the DAWN-wrapped and the bare black box, batches of 1 and 256 (median of 7)."""
        out = {}
        for B in (1, 256):
            xb = x[:B].to(device)
            for name, d in (("dawn", dawn), ("bare", dawn.defense)):
                times = []
                for _ in range(7):
                    t = time.perf_counter()
                    d.perturb(xb)
                    times.append(time.perf_counter() - t)
                out[f"{name}_b{B}"] = 1e6 * float(np.median(times)) / B
        return out


def _cell(cells: List[Dict[str, Any]]) -> str:
    mean = lambda k: float(np.mean([c[k] for c in cells]))  # noqa: E731
    claimed = sum(c["claimed"] for c in cells)
    p = max(c["p_chance"] if c["p_null"] is None else max(c["p_chance"], c["p_null"]) for c in cells)
    return (f"{mean('accuracy'):.1f} | {mean('n'):.0f} | {mean('wsr'):.2f} | {p:.2g} | "
            f"{claimed}/{len(cells)} | {sum(c['claimed_2_64'] for c in cells)}/{len(cells)}")


def report(results: Dict[str, Any]) -> str:
    """The markdown tables of ``results``."""
    lines = []
    for rate, row in results["rates"].items():
        c, inn = row["cost"], row["innocents"]
        lines += [f"### DAWN r = {rate} (effective {row['effective_rate']:.5f})", "",
                  f"Defender: accuracy {c['accuracy']:.2f} % (undefended {c['undefended_accuracy']:.2f} %), "
                  f"answers with another top-1 {100 * c['changed_argmax']:.2f} %, "
                  f"mean L1 {c['mean_l1']:.4f}; "
                  f"marked {row['marked_of_queries']} of the thief's queries. Innocents judged as suspects: "
                  f"{inn['claims']} false claims of {inn['of']} (95 % upper bound {inn['upper95']:.3f}); "
                  "innocent WSR mean / max / p95: " + "; ".join(
                      f"{k} {v['mean']:.3f} / {v['max']:.3f} / {v['p95']:.3f}"
                      for k, v in inn["wsr"].items()),
                  "", "| thief | budget | clone acc % | n | WSR | worst p | claimed (α) | claimed (2⁻⁶⁴) |",
                  "|---|---|---|---|---|---|---|---|"]
        for thief, per in row["thieves"].items():
            for b, cells in per.items():
                lines.append(f"| {thief} | {b} | {_cell(cells)} |")
        lines += ["", "| sybil keys m | one key: n, WSR, p, claimed | union: n, WSR, p, claimed |",
                  "|---|---|---|"]
        for m, s in row["sybil"].items():
            one, union = s["one_key"], s["union"]
            fmt = lambda c: (f"{c['n']}, {c['wsr']:.2f}, {max(c['p_chance'], c['p_null'] or 0):.2g}, "  # noqa: E731
                             f"{'yes' if c['claimed'] else 'no'}")
            lines.append(f"| {m} | {fmt(one)} | {fmt(union)} |")
        o = row["overhead_us"]
        lines += ["", f"Serving cost per query: batch 1 {o['dawn_b1']:.0f} µs vs {o['bare_b1']:.0f} µs bare; "
                      f"batch 256 {o['dawn_b256']:.1f} µs vs {o['bare_b256']:.1f} µs.", ""]
    return "\n".join(lines) + f"\n{results['seconds']:.0f} s in all.\n"


build_parser, main = entry_points(ProveEvalSettings)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
