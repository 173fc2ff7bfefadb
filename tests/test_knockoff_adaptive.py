"""Knockoff Nets' adaptive (gradient-bandit) policy."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ppoison_ext.attacks.knockoff import AdaptivePolicy, KnockoffNets, load_hierarchy
from ppoison_ext.attacks.transferset import load_transferset
from ppoison_ext.checkpoint import save_checkpoint
from ppoison_ext.fileio import atomic_write_json
from ppoison_ext.models import get_net
from ppoison_ext.pipeline import transfer as T

K = 4


class Blobs(torch.utils.data.Dataset):
    """C classes of constant 8×8 images whose grey level encodes the class."""

    def __init__(self, n_per_class=300, C=6):
        self.targets = np.repeat(np.arange(C), n_per_class)
        self.data = np.repeat((self.targets * 40).astype(np.uint8)[:, None, None], 8, 1).repeat(8, 2)
        self.classes = [f"c{i}" for i in range(C)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.data[i]).float()[None] / 255.0, int(self.targets[i])


class Oracle(nn.Module):
    """Confident (top-1 − top-2 ≈ 1) only on images of class ``rich``; uniform elsewhere."""

    def __init__(self, rich, fail_after=None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.rich, self.fail_after, self.calls = rich, fail_after, 0

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        c = torch.round(x[:, 0, 0, 0] * 255 / 40).long()
        logits = torch.zeros(len(x), K)
        logits[c == self.rich, 0] = 10.0
        return F.softmax(logits, dim=1)


def tiny_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, K))


def test_flat_policy_prefers_the_rewarding_class(tmp_path):
    ds, rich = Blobs(), 3
    attack = KnockoffNets(strategy="adaptive", reward="cert", nqueries=160, batch_size=8, alpha=0.5, progress=False)
    ts = attack.build_transferset(Oracle(rich), ds, tmp_path, num_classes=K)
    assert len(ts) == 160 and len(set(ts.indices.tolist())) == 160  # no image twice
    pi = attack.policy.action_probs()
    assert pi.argmax() == rich and pi[rich] > 0.5, pi
    labels = ds.targets[ts.indices.numpy()]
    assert (labels[80:] == rich).mean() > 0.5  # later batches mostly query the rewarding class
    assert (labels[:16] == rich).mean() < 0.5  # the first ones are near uniform


def test_hierarchical_policy(tmp_path):
    ds, rich = Blobs(), 4
    hier = {"low": ["c0", "c1", "c2"], "high": [3, "c4", 5]}
    attack = KnockoffNets(strategy="adaptive", reward="cert", nqueries=160, batch_size=8, alpha=0.5,
                          hierarchy=hier, progress=False)
    attack.build_transferset(Oracle(rich), ds, tmp_path, num_classes=K)
    pol = attack.policy
    assert pol.group_names == ["low", "high"]
    assert pol.H_root[1] > pol.H_root[0]
    assert pol.action_probs().argmax() == rich
    np.testing.assert_allclose(pol.action_probs().sum(), 1.0)


@pytest.mark.parametrize("reward", ["div", "loss", "all"])
def test_rewards_with_online_model(tmp_path, reward):
    torch.manual_seed(0)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    attack = KnockoffNets(strategy="adaptive", reward=reward, nqueries=64, batch_size=16, online_model=model,
                          progress=False)
    ts = attack.build_transferset(Oracle(2), Blobs(30), tmp_path, num_classes=K)
    assert len(ts) == 64
    assert np.isfinite(attack.policy.H_root).all() and np.isfinite(attack.policy.baseline)
    assert attack.policy.n_rewards == 64
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed == (reward != "div")


def test_adaptive_resume_equals_uninterrupted(tmp_path):
    def make(out, fail_after=None, resume=True):
        torch.manual_seed(0)
        attack = KnockoffNets(strategy="adaptive", reward="all", nqueries=100, batch_size=8, online_model=tiny_model(),
                              progress=False)
        return attack, attack.build_transferset(Oracle(1, fail_after), Blobs(40), out, num_classes=K, resume=resume)

    ref_attack, ref = make(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "cut", fail_after=5)
    assert len(load_transferset(tmp_path / "cut")) == 40
    attack, ts = make(tmp_path / "cut")
    assert torch.equal(ts.indices, ref.indices) and torch.equal(ts.y, ref.y)
    np.testing.assert_array_equal(attack.policy.H_root, ref_attack.policy.H_root)
    for a, b in zip(attack.online_model.parameters(), ref_attack.online_model.parameters()):
        assert torch.equal(a, b)


def test_adaptive_arguments(tmp_path):
    ds = Blobs(10)
    with pytest.raises(ValueError, match="never repeats"):
        KnockoffNets(strategy="adaptive", reward="cert", budget=20, nqueries=30).build_transferset(
            Oracle(0), ds, tmp_path, num_classes=K)
    with pytest.raises(ValueError, match="needs online_model"):
        KnockoffNets(strategy="adaptive", reward="loss").build_transferset(Oracle(0), ds, tmp_path, num_classes=K)
    with pytest.raises(ValueError, match="strategy"):
        KnockoffNets(strategy="greedy")
    with pytest.raises(ValueError, match="reward"):
        KnockoffNets(strategy="adaptive", reward="fun")
    with pytest.raises(ValueError, match="sequential"):
        KnockoffNets(strategy="adaptive", reward="cert").build_transferset(Oracle(0), ds, tmp_path, num_classes=K,
                                                                          num_shards=2)
    with pytest.raises(ValueError, match="does not place labels"):
        AdaptivePolicy(ds.targets, np.arange(60), reward="cert", hierarchy={"a": [0, 1]})
    with pytest.raises(ValueError, match="both"):
        load_hierarchy({"a": [0], "b": [0]})
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"x": ["c0", "c1"]}))
    assert load_hierarchy(path, ds.classes) == {"x": [0, 1]}

    class NoLabels(Blobs):
        def __init__(self):
            super().__init__(10)
            self.n = len(self.targets)
            del self.targets

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.from_numpy(self.data[i]).float()[None] / 255.0, 0

    with pytest.raises(TypeError, match="targets"):
        KnockoffNets(strategy="adaptive", reward="cert").build_transferset(Oracle(0), NoLabels(), tmp_path / "n",
                                                                          num_classes=K)


def test_adaptive_pipeline_end_to_end(tmp_path):
    vic = tmp_path / "victim"
    vic.mkdir()
    torch.manual_seed(0)
    save_checkpoint(vic / "checkpoint.pth.tar", get_net("lenet", "mnist"), arch="lenet", epoch=0, best_acc=0.0)
    atomic_write_json(vic / "params.json", {"model_arch": "lenet", "num_classes": 10, "dataset": "MNIST"})
    out = tmp_path / "out"
    assert T.main(["adaptive", str(vic), "mad", "epsilon:0.3", "--out_dir", str(out), "--queryset", "notMNIST",
                   "--budget", "2000", "--nqueries", "200", "--batch_size", "50", "-d", "-1", "--no-progress"]) == 0
    ts = load_transferset(out)
    assert len(ts) == 200 and len(set(ts.indices.tolist())) == 200
    params = json.loads((out / "params_transfer.json").read_text())
    assert params["policy"] == "adaptive" and params["reward"] == "all"
    assert (out / "distancetransfer.log.tsv").read_text().splitlines()[1].startswith("200\t")


def test_extract_trains_a_surrogate(tmp_path):
    torch.manual_seed(0)
    surrogate = tiny_model()
    before = [p.detach().clone() for p in surrogate.parameters()]
    attack = KnockoffNets(strategy="random", budget=120, batch_size=32, progress=False)
    with pytest.raises(ValueError, match="transform"):
        attack.extract(Oracle(2), Blobs(20), tmp_path, surrogate, epochs=2, num_classes=K)
    out = attack.extract(Oracle(2), Blobs(20), tmp_path, surrogate, epochs=2, num_classes=K,
                         transform=torchvision.transforms.ToTensor())
    assert out is surrogate and not out.training
    assert any(not torch.equal(a, b) for a, b in zip(before, surrogate.parameters()))
    assert len(load_transferset(tmp_path)) == 120
    with pytest.raises(TypeError, match="surrogate"):
        attack.extract(Oracle(2), Blobs(20), tmp_path, "lenet")
