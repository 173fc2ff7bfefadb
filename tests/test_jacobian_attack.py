"""Jacobian-based attacks: building blocks, the original's bugs behind flags, and end-to-end
runs of every policy on a small MNIST slice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ppoison_ext.attacks import load_transferset
from ppoison_ext.attacks.jbda import (
    AugmentedSet,
    JacobianAdversary,
    clamp_original,
    fgsm_untargeted,
    parse_policy,
    pgd_linf_targeted,
    pixel_bounds,
    rand_sample,
    step_size_for_round,
)
from ppoison_ext.datasets import get_dataset, get_transform
from ppoison_ext.datasets.transforms import MNIST_MEAN, MNIST_STD
from ppoison_ext.defenses import Blackbox
from ppoison_ext.models import get_net
from ppoison_ext.pipeline import jacobian, victim

FAST = ["-d", "-1", "-w", "0", "--no-progress"]
LO, HI = pixel_bounds(MNIST_MEAN, MNIST_STD)


# --- building blocks -------------------------------------------------------------------------


def test_parse_policy():
    assert parse_policy("jbda") == ("jbda", None)
    assert parse_policy("jbself") == ("jbself", None)
    assert parse_policy("jbtop3") == ("jbtop", 3)
    for bad in ("jbtop", "jbtop0", "random", "JBDA"):
        with pytest.raises(ValueError, match="policy"):
            parse_policy(bad)


def test_step_size_sign_uses_bankers_round():
    signs = [step_size_for_round(r, 5) > 0 for r in range(14)]
    # round(rho/5): 0..2 -> 0, 3..7 -> 1, 8..12 -> 2, 13 -> 3 (half to even at 2.5, 7.5, 12.5)
    assert signs == [True] * 3 + [False] * 5 + [True] * 5 + [False]
    assert step_size_for_round(7, None) == 0.1


def test_pixel_bounds_and_original_clamp():
    assert LO.item() == pytest.approx(-0.1307 / 0.3081) and HI.item() == pytest.approx(0.8693 / 0.3081)
    x = torch.tensor([-0.4, 0.5, 2.5])
    d = torch.tensor([0.1, 0.1, -0.1])
    # the original clamps x + d into [0, 1] of whatever units x is in
    assert torch.allclose(x + clamp_original(x, d), torch.tensor([0.0, 0.6, 1.0]))


def test_fgsm_batched_equals_per_sample():
    torch.manual_seed(0)
    model = get_net("lenet", "mnist", num_classes=10).eval()
    x = torch.randn(6, 1, 28, 28)
    t = torch.randint(0, 10, (6,))
    batched = fgsm_untargeted(model, x, t, 0.1)
    single = torch.cat([fgsm_untargeted(model, x[i:i + 1], t[i:i + 1], 0.1) for i in range(6)])
    assert torch.equal(batched, single)
    assert torch.isclose(batched.abs(), torch.tensor(0.1)).logical_or(batched == 0).all()
    assert torch.equal(fgsm_untargeted(model, x, t, 0.0), torch.zeros_like(x))


def test_pgd_negative_step_original_vs_fixed():
    torch.manual_seed(0)
    model = get_net("lenet", "mnist", num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    c = torch.tensor([3, 4])
    orig = pgd_linf_targeted(model, x, c, -0.1, orig_sign=True)
    assert torch.allclose(orig, torch.full_like(x, -0.1))  # clamp(min=0.1, max=-0.1): a constant shift
    fixed = pgd_linf_targeted(model, x, c, -0.1)
    assert fixed.abs().max() <= 0.1 + 1e-7 and fixed.unique().numel() > 1
    with torch.no_grad():
        assert (model(x + fixed).gather(1, c[:, None]) > model(x).gather(1, c[:, None])).all()


def test_rand_sample_sorted_without_replacement():
    np.random.seed(0)
    idx = rand_sample(20, 7)
    assert idx.numel() == 7 and idx.unique().numel() == 7 and torch.equal(idx, idx.sort().values)
    assert rand_sample(5, 9).tolist() == [0, 1, 2, 3, 4]


# --- the adversary on a synthetic victim (fast) ----------------------------------------------------


class _Recorder(torch.nn.Module):
    """A black box that remembers the images it was asked about."""

    def __init__(self, bb):
        super().__init__()
        self.bb, self.seen = bb, []

    @property
    def call_count(self):
        return self.bb.call_count

    def forward(self, x):
        self.seen.append(x.detach().cpu())
        return self.bb(x)


def _adversary(tmp_path, policy="jbda", seeds=8, budget=32, **kw):
    torch.manual_seed(0)
    vic = get_net("lenet", "mnist", num_classes=10)
    bb = _Recorder(Blackbox(vic))
    adv = JacobianAdversary(bb, policy=policy, budget=budget, model_adv_name="lenet", modelfamily="mnist",
                            num_classes=10, testset=None, out_dir=tmp_path, device="cpu", train_epochs=1,
                            final_train_epochs=1, bounds=(LO, HI), progress=False, **kw)
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    x = torch.stack([ds[i][0] for i in range(seeds)])
    adv.setup(x, list(range(seeds)))
    return adv, bb, x


def test_fixed_aliasing_grows_unique_images(tmp_path):
    adv, _, x_seed = _adversary(tmp_path)
    D, model, s = adv.run()
    assert [r["size"] for r in s["rounds"]] == [16, 32] and s["queries"] == 32
    assert D.num_unique() == 32 and [r["unique"] for r in s["rounds"]] == [16, 32]
    assert torch.equal(D.x[:8], x_seed) and D.origin[:8].tolist() == list(range(8))
    assert (D.origin[8:] == -1).all()
    assert (tmp_path / "checkpoint.32.pth.tar").is_file() and (tmp_path / "train.32.log.tsv").is_file()


def test_orig_aliasing_keeps_the_set_stuck(tmp_path):
    adv, _, x_seed = _adversary(tmp_path, orig_aliasing=True)
    D, _, s = adv.run()
    assert len(D) == 32 and s["queries"] == 32
    assert D.num_unique() == 8 and [r["unique"] for r in s["rounds"]] == [8, 8]
    seeds = {tuple(r.flatten().tolist()) for r in x_seed}
    assert not any(tuple(r.flatten().tolist()) in seeds for r in D.x)  # the originals were overwritten


def test_jbself_stores_what_it_queried(tmp_path):
    adv, bb, _ = _adversary(tmp_path, policy="jbself", budget=16)
    D, _, _ = adv.run()
    assert torch.allclose(D.x[8:], bb.seen[1])  # second call: the augmented queries
    # the original stored x + d with the label of x - d (with its clamp the two are symmetric about x)
    adv, bb, _ = _adversary(tmp_path / "orig", policy="jbself", budget=16, orig_jbself_store=True,
                            orig_clamp=True)
    D, _, _ = adv.run()
    assert not torch.allclose(D.x[8:], bb.seen[1])
    x = D.x[:8]
    assert torch.allclose(D.x[8:] - x, -(bb.seen[1] - x), atol=1e-6)


def test_fixed_clamp_keeps_valid_pixels_orig_clamp_does_not(tmp_path):
    adv, _, x_seed = _adversary(tmp_path, budget=16)
    D, _, _ = adv.run()
    aug = D.x[8:]
    assert aug.min() >= LO.item() - 1e-6 and aug.max() <= HI.item() + 1e-6
    assert aug.max() > 1.5  # bright pixels keep their value in normalised units
    adv, _, _ = _adversary(tmp_path / "orig", budget=16, orig_clamp=True)
    D, _, _ = adv.run()
    aug = D.x[8:]
    assert aug.min() >= -1e-6 and aug.max() <= 1 + 1e-6  # squeezed into normalised [0, 1]


def test_topk_cap_uses_k_and_stops_at_budget(tmp_path):
    adv, bb, _ = _adversary(tmp_path, policy="jbtop2", seeds=8, budget=20, query_batch_size=4)
    D, _, s = adv.run()
    assert s["queries"] == 20 and len(D) == 20 and len(s["rounds"]) == 1  # ceil(12/2) = 6 rows x 2 classes
    adv, bb, _ = _adversary(tmp_path / "orig", policy="jbtop2", seeds=8, budget=20, orig_topk_cap=True)
    D, _, s = adv.run()
    # the original divides by 3: ceil(12/3) = 4 rows x 2 classes = 8 queries, then another round
    assert s["rounds"][0]["size"] == 16 and len(s["rounds"]) == 2 and len(D) == 20


def test_kappa_sampling_and_bad_arguments(tmp_path):
    adv, _, _ = _adversary(tmp_path, budget=30, kappa=5, sigma=1)
    D, _, s = adv.run()
    assert [r["size"] for r in s["rounds"]] == [16, 21, 26, 30]
    assert D.num_unique() == 30
    with pytest.raises(ValueError, match="bounds"):
        JacobianAdversary(lambda x: x, model_adv_name="lenet", modelfamily="mnist", num_classes=10,
                          testset=None, out_dir=tmp_path)
    with pytest.raises(ValueError, match="k must be"):
        JacobianAdversary(lambda x: x, policy="jbtop10", model_adv_name="lenet", modelfamily="mnist",
                          num_classes=10, testset=None, out_dir=tmp_path, bounds=(LO, HI))
    with pytest.raises(ValueError, match="kappa"):
        JacobianAdversary(lambda x: x, kappa=0, model_adv_name="lenet", modelfamily="mnist", num_classes=10,
                          testset=None, out_dir=tmp_path, bounds=(LO, HI))


def test_augmented_set_unique():
    x = torch.zeros(4, 1, 2, 2)
    x[1] += 1
    D = AugmentedSet(x, torch.zeros(4, 3), torch.arange(4))
    assert D.num_unique() == 2 and len(D.truncate(3)) == 3


# --- end to end through the CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("jb_victim")
    assert victim.main(["MNIST", "lenet", "-o", str(out), "--epochs", "1", "--train_subset", "128",
                        "--test_subset", "50"] + FAST) == 0
    return out


def _jb(victim_dir, out, policy, *extra):
    return jacobian.main([policy, str(victim_dir), "none", "", "--out_dir", str(out), "--testset", "MNIST",
                          "--queryset", "MNIST", "--seedsize", "8", "--budget", "24", "--train_epochs", "1",
                          "--final_train_epochs", "1", "--test_subset", "50", *extra] + FAST)


@pytest.mark.parametrize("policy", ["jbda", "jbself", "jbtop2"])
def test_jacobian_cli(victim_dir, tmp_path, policy):
    assert _jb(victim_dir, tmp_path, policy) == 0
    assert (tmp_path / "checkpoint.8.pth.tar").is_file()  # throw-away + first round at 8 queries
    ckpt = torch.load(tmp_path / "checkpoint.24.pth.tar", weights_only=True)  # the final substitute
    assert ckpt["arch"] == "lenet" and ckpt["epoch"] == 1
    params = json.loads((tmp_path / "params_transfer.json").read_text())
    assert params["policy"] == policy and params["log_prefix"] == "transfer" and params["queries"] == 24
    assert params["tau"] == 5 and params["sigma"] == 3 and params["kappa"] is None
    ts = load_transferset(tmp_path)
    assert len(ts) == 24 and ts.num_classes == 10 and ts.indices[8:].eq(-1).all()
    exact = torch.load(tmp_path / "jbda_images.pt", weights_only=True)
    assert exact.shape == (24, 1, 28, 28)
    # the uint8 copy is the exact images rounded to grey levels
    raw = torch.round((exact[:, 0] * MNIST_STD[0] + MNIST_MEAN[0]) * 255).clamp(0, 255).to(torch.uint8)
    assert torch.equal(torch.from_numpy(np.array(ts.images)), raw)
    dist = (tmp_path / "distancetransfer.log.tsv").read_text().splitlines()
    assert dist[-1].split("\t")[0] == "24"


def test_jacobian_cli_aliasing_flag(victim_dir, tmp_path):
    # budget 32: rounds 8 -> 16 -> 32, the second round augments all of D (no budget cut)
    assert _jb(victim_dir, tmp_path / "fixed", "jbda", "--budget", "32") == 0
    assert _jb(victim_dir, tmp_path / "orig", "jbda", "--budget", "32", "--orig_aliasing") == 0

    def unique(folder):
        x = torch.load(folder / "jbda_images.pt", weights_only=True)
        assert x.shape[0] == 32
        return torch.unique(x.flatten(1), dim=0).shape[0]

    assert unique(tmp_path / "fixed") == 32
    assert unique(tmp_path / "orig") == 8  # stuck at the seed size, the seeds themselves overwritten
    assert load_transferset(tmp_path / "orig").indices.eq(-1).all()


def test_jacobian_cli_errors(victim_dir, tmp_path):
    assert _jb(victim_dir, tmp_path, "jbnope") == 2
    assert jacobian.main(["jbda", str(victim_dir), "none", "", "--out_dir", str(tmp_path), "--testset",
                          "MNIST", "--queryset", "MNIST", "--seedsize", "30", "--budget", "20"] + FAST) == 2
