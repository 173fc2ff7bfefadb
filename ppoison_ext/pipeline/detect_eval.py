"""``ppoison detect-eval VICTIM_DIR --out DIR``: PRADA, D-ADD and SEAT, calibrated on the first half
of the victim's test split (:mod:`.detect`), against benign and attacking accounts on the second.

Accounts: ten benign accounts of ``--account-size`` images (disjoint, each in its own shuffled
order) and a non-i.i.d. user (80 % one digit); attacks of ``--budget`` queries: Knockoff (random
notMNIST letters, three orderings), JBDA and JB-top-3 (the package's attack from MNIST seeds, against
the undefended victim), and an adaptive mixer (half notMNIST inside MNIST cover traffic); each attack
also split round-robin over k ∈ {5, 20} sybil keys. A key's queries are answered unpoisoned until it
is flagged, then refused (``on_detect=refuse``).

Reported per detector: flagged accounts (TPR, FPR with counts), benign queries refused after a false
flag, ROC AUC of a per-account suspicion score, queries to the first flag, attacker queries answered
before detection, the accuracy of a LeNet clone trained on those answers (beside the undefended
victim's and top-1 labels'), detector time per query and per-key state size. Writes
``results.json``, ``detect_eval.md`` and ``roc.png``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..attacks.jbda import JacobianAdversary, pixel_bounds
from ..datasets.transforms import MNIST_MEAN, MNIST_STD
from ..detectors import DADD, PRADA, SEAT, Detector, KeyState, victim_forward
from ..detectors.base import Rows, Values
from ..devices import as_device
from ..fileio import atomic_write_json, atomic_write_text
from ..losses import soft_cross_entropy
from ..modeldir import dataset_name, load_model_dir
from ..models import get_net, last_linear
from ..training import Steps, fit
from .detect import benign_halves, split_data
from .settings import CommonSettings, device_setting, entry_points, setting
from .verify import argmax_of

logger = logging.getLogger(__name__)

__all__ = ["DetectEvalSettings", "build_parser", "main"]

#: per-account suspicion from its decided scores (higher: more suspicious), for the ROC
SUSPICION: Dict[str, Callable[[Tensor, Detector], float]] = {
    "prada": lambda s, d: -float(s.min()) if s.numel() else -1.0,
    "dadd": lambda s, d: float(s.max()) if s.numel() else -math.inf,
    "seat": lambda s, d: float((s < d.thresh).double().mean()) if s.numel() else 0.0,
}


def state_bytes(value: Any) -> int:
    """Bytes a key's detector state holds (tensors, rows, numbers, nested lists and dicts)."""
    if isinstance(value, KeyState):
        return state_bytes(value.data)
    if isinstance(value, Rows):
        return value.n * (value.data.shape[1] + 1) * 8  # the rows and their squared norms
    if isinstance(value, Values):
        return value.n * 8
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 8


def auc(negatives: List[float], positives: List[float]) -> float:
    """ROC AUC: P(a positive scores above a negative), ties counting ½."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs) if pairs else math.nan


def jbda_stream(model: nn.Module, seeds: Tensor, policy: str, budget: int, device) -> Tensor:
    """The queries of the package's JBDA-family attack ``policy`` from ``seeds`` against the
    undefended ``model``, in the order it sends them (``budget`` of them)."""
    sent: List[Tensor] = []

    def blackbox(x: Tensor) -> Tensor:
        sent.append(x.detach().cpu())
        with torch.no_grad():
            return F.softmax(model(x), 1)

    with tempfile.TemporaryDirectory() as tmp:
        adv = JacobianAdversary(blackbox, policy=policy, budget=budget, model_adv_name="lenet",
                                modelfamily="mnist", num_classes=10, testset=None, out_dir=tmp, device=device,
                                train_epochs=5, bounds=pixel_bounds(MNIST_MEAN, MNIST_STD), progress=False)
        adv.setup(seeds)
        adv.augment()
    return torch.cat(sent)[:budget]


def fit_lenet(x: Tensor, y: Tensor, device, *, epochs: int, seed: int, lr: float = 0.02, adam: bool = False,
              batch_size: int = 64, lr_step: Optional[int] = None) -> nn.Module:
    """A LeNet trained on inputs x with soft labels y [N, K] (SGD with momentum 0.9, or Adam), in
    eval mode."""
    torch.manual_seed(seed)
    net = get_net("lenet", "mnist", num_classes=y.shape[1]).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr) if adam else torch.optim.SGD(net.parameters(), lr=lr,
                                                                                  momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, lr_step) if lr_step else None
    fit(net, TensorDataset(x, y), Steps(soft_cross_entropy), epochs=epochs, batch_size=batch_size, seed=seed,
        optimizer=opt, scheduler=sched, device=device, desc="clone")
    return net.eval()


def train_clone(x: Tensor, y: Tensor, test: Tuple[Tensor, Tensor], device, epochs: int = 30,
                seed: int = 0) -> float:
    """Test accuracy (%) of a LeNet trained on inputs x with soft labels y (Adam, 1e-3, batch 64)."""
    if x.shape[0] == 0:
        return 10.0  # no answer: a guess
    clone = fit_lenet(x, y, device, epochs=epochs, seed=seed, lr=1e-3, adam=True)
    return 100.0 * float((argmax_of(clone, test[0], device, 1000) == test[1]).double().mean())


@dataclass(kw_only=True)
class DetectEvalSettings(CommonSettings):
    """Detectors against benign and attacking accounts (see the module docs)."""

    victim_dir: str = setting(metavar="VICTIM_DIR", help="an MNIST victim folder")
    out: str = setting("--out", metavar="DIR", help="output folder")
    fpr: float = setting("--fpr", default=0.01, metavar="F", help="calibration target (default %(default)s)")
    budget: int = setting("--budget", default=1600, metavar="N",
                          help="queries per attack (default %(default)s)")
    account_size: int = setting("--account-size", default=500, metavar="N",
                                help="queries per benign account (default %(default)s)")
    seat_epochs: int = setting("--seat-epochs", default=1, metavar="N",
                               help="SEAT encoder epochs (default 1)")
    device_id: int = device_setting()

    def run(self) -> Dict[str, Any]:
        device, out = as_device(self.device_id), Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.seed)
        model, params = load_model_dir(self.victim_dir, device=device)
        if dataset_name(params) != "MNIST":
            raise ValueError(f"victim_dir: detect-eval runs on an MNIST victim, got {dataset_name(params)}")
        train = split_data("MNIST", True, self.data_root)
        (cal_x, _), (ev_x, ev_y) = benign_halves(*split_data("MNIST", False, self.data_root))
        letters = split_data("notMNIST", False, self.data_root)[0]
        n, B = self.account_size, self.budget
        g = torch.Generator().manual_seed(self.seed)
        t0 = time.time()
        detectors = {
            "prada": PRADA.calibrate(model, benign=list(cal_x.split(n)), fpr=self.fpr),
            "dadd": DADD.calibrate(model, train_x=train[0], train_y=train[1], benign=list(cal_x.split(n)),
                                   fpr=self.fpr),
            "seat": SEAT.calibrate(model, train_x=train[0], epochs=self.seat_epochs, seed=self.seed),
        }
        logger.info("calibrated in %.0f s: %s", time.time() - t0,
                    {k: d.config() for k, d in detectors.items()})
        shuffled = lambda x: x[torch.randperm(x.shape[0], generator=g)]  # noqa: E731
        accounts = {f"benign{i}": shuffled(c) for i, c in enumerate(ev_x[:10 * n].split(n))}
        ones = ev_x[ev_y == 1]
        accounts["non-iid"] = shuffled(torch.cat([ones[:int(0.8 * n)], ev_x[ev_y != 1][:n - int(0.8 * n)]]))
        attacks = {f"knockoff-{s}": shuffled(letters)[:B] for s in range(3)}
        seeds = shuffled(ev_x)[:100]
        attacks["jbda"] = jbda_stream(model, seeds, "jbda", B, device)
        attacks["jbtop3"] = jbda_stream(model, seeds, "jbtop3", B, device)
        cover = shuffled(ev_x[:B])
        mixed = torch.stack([letters[i // 2] if i % 2 else cover[i // 2] for i in range(B)])
        attacks["mixer"] = mixed
        logger.info("streams ready in %.0f s", time.time() - t0)
        results = {"detectors": {k: d.config() for k, d in detectors.items()}, "accounts": {}, "sybil": {},
                   "clones": {}, "cost": {}}
        head = last_linear(model)
        streams = {**accounts, **attacks}
        # one victim forward per stream, shared by the detectors, the sybil splits and the clones
        # (serving computes it anyway: not timed)
        forwards = {acc: [t.cpu() for t in victim_forward(model, x.to(device), head)]
                    for acc, x in streams.items()}

        def run_key(det: Detector, acc: str, idx: Any = slice(None)) -> Tuple[Tensor, KeyState, float]:
            x, (logits, h) = streams[acc][idx], forwards[acc]
            t = time.perf_counter()
            state = det.new_state()
            scores = det.observe(state, det.records(x, logits[idx], h[idx]))
            return scores, state, (time.perf_counter() - t) / max(1, x.shape[0])

        answered: Dict[Tuple[str, str, int], Tensor] = {}
        for name, det in detectors.items():
            rows, secs, mem = {}, [], []
            for acc, x in streams.items():
                scores, st, dt = run_key(det, acc)
                secs.append(dt)
                mem.append(state_bytes(st))
                rows[acc] = {"queries": x.shape[0], "flagged": st.flag, "flagged_at": st.flagged_at,
                             "suspicion": SUSPICION[name](scores[~scores.isnan()], det)}
            results["accounts"][name] = rows
            results["cost"][name] = {"us_per_query": 1e6 * sum(secs) / len(secs),
                                     "max_state_MB": max(mem) / 2 ** 20}
            for attack, x in attacks.items():
                for k in (1, 5, 20):
                    keep = []
                    for j in range(k):  # round-robin sybil keys
                        idx = torch.arange(j, x.shape[0], k)
                        st = run_key(det, attack, idx)[1] if k > 1 else None
                        at = (st.flagged_at if st else rows[attack]["flagged_at"])
                        keep.append(idx[:at - 1] if at else idx)
                    kept = torch.cat(keep).sort().values
                    answered[(name, attack, k)] = kept
                    results["sybil"].setdefault(name, {}).setdefault(attack, {})[k] = int(kept.numel())
        logger.info("detectors run in %.0f s", time.time() - t0)
        test = (ev_x, ev_y)
        for attack in ("knockoff-0", "jbda", "mixer"):
            x, y = attacks[attack], F.softmax(forwards[attack][0], 1)
            row = {"undefended": train_clone(x, y, test, device),
                   "top1": train_clone(x, F.one_hot(y.argmax(1), 10).float(), test, device)}
            for name in detectors:
                for k in (1, 20):
                    idx = answered[(name, attack, k)]
                    row[f"{name}+refuse k={k}"] = train_clone(x[idx], y[idx], test, device)
            results["clones"][attack] = row
        results["seconds"] = time.time() - t0
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "detect_eval.md", report(results, list(accounts), list(attacks)))
        plot_roc(results, list(accounts), list(attacks), out / "roc.png")
        logger.info("wrote %s in %.0f s", out, results["seconds"])
        return results


def report(results: Dict[str, Any], benign: List[str], attacks: List[str]) -> str:
    """The markdown tables of ``results``."""
    lines = ["| detector | benign keys flagged | benign queries refused | " + " | ".join(attacks) +
             " | AUC | µs/query | state MB |", "|---" * (len(attacks) + 6) + "|"]
    for name, rows in results["accounts"].items():
        fp = sum(rows[a]["flagged"] for a in benign)
        lost = sum(rows[a]["queries"] - rows[a]["flagged_at"] + 1 for a in benign if rows[a]["flagged"])
        cells = [f"at {rows[a]['flagged_at']}" if rows[a]["flagged"] else "no" for a in attacks]
        score = auc([rows[a]["suspicion"] for a in benign], [rows[a]["suspicion"] for a in attacks])
        cost = results["cost"][name]
        lines.append(f"| {name} | {fp}/{len(benign)} | {lost}/{sum(rows[a]['queries'] for a in benign)} | " +
                     " | ".join(cells) +
                     f" | {score:.3f} | {cost['us_per_query']:.0f} | {cost['max_state_MB']:.2f} |")
    lines += ["", "Attacker queries answered before detection (round-robin over k keys, of each budget):", "",
              "| detector | attack | k = 1 | k = 5 | k = 20 |", "|---|---|---|---|---|"]
    for name, per in results["sybil"].items():
        for attack, ks in per.items():
            lines.append(f"| {name} | {attack} | " + " | ".join(str(ks[k]) for k in (1, 5, 20)) + " |")
    lines += ["", "Clone accuracy (%) on the evaluation half:", ""]
    cols = list(next(iter(results["clones"].values())))
    lines += ["| attack | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for attack, row in results["clones"].items():
        lines.append(f"| {attack} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_roc(results: Dict[str, Any], benign: List[str], attacks: List[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, rows in results["accounts"].items():
        neg = [rows[a]["suspicion"] for a in benign]
        pos = [rows[a]["suspicion"] for a in attacks]
        cuts = sorted(set(neg + pos), reverse=True)
        fpr = [0.0] + [sum(v >= c for v in neg) / len(neg) for c in cuts]
        tpr = [0.0] + [sum(v >= c for v in pos) / len(pos) for c in cuts]
        ax.plot(fpr, tpr, marker=".", label=f"{name} (AUC {auc(neg, pos):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="benign accounts flagged", ylabel="attack accounts flagged", title="per-account ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


build_parser, main = entry_points(DetectEvalSettings)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
