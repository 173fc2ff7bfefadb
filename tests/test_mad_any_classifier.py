"""MAD with default arguments on classifiers nobody here wrote, against the per-sample port
of the reference (tests/original_mad.py), which differentiates the proxy's NLL w.r.t. its
second-to-last parameter whatever the model.

Models: the PyTorch MNIST example ``Net`` (log-softmax output, dropout), torchvision
``resnet18``, ``mobilenet_v3_small`` and ``squeezenet1_1`` (a 1×1-conv head), as victim and
proxy, in float64. Eval mode, and train mode without dropout (resnet18: per-query BatchNorm
statistics), are compared value for value (≤ 1e-6). Train mode with dropout draws different
masks on the two sides, so those cases check invariants only: on the simplex, within ε,
and the top-1 kept by MAD-argmax.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import original_mad as orig
from ppoison_ext.defenses import MAD
from ppoison_ext.defenses.proxy import reference_jacobian_param


class ExampleNet(nn.Module):
    """The PyTorch MNIST example's ``Net`` (the reference README's (F)MNIST architecture)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def _build(name, seed):
    torch.manual_seed(seed)
    if name == "example_net":
        return ExampleNet(), (1, 28, 28)
    ctor = getattr(torchvision.models, name)
    return ctor(weights=None, num_classes=10), (3, 64, 64)


def _pair(name):
    victim, shape = _build(name, 0)
    proxy, _ = _build(name, 1)
    victim, proxy = victim.double().eval(), proxy.double().eval()
    torch.manual_seed(2)
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():  # spread the victim's posteriors over a few classes: logits of std ~3
        z = torch.log_softmax(victim(x), 1)
        victim.get_parameter(reference_jacobian_param(victim)).mul_(3.0 / float(z.std(1).mean()))
    return victim, proxy, x


MODELS = ["example_net", "resnet18", "mobilenet_v3_small", "squeezenet1_1"]
HAS_DROPOUT = {"example_net", "mobilenet_v3_small", "squeezenet1_1"}
CASES = list(itertools.product(["extreme", "argmax"], ["l1", "l2", "kl"], [False, True]))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", MODELS)
def test_default_mad_equals_the_reference(name, mode):
    victim, proxy, x = _pair(name)
    proxy.train(mode == "train")
    if mode == "train" and name in HAS_DROPOUT:
        pytest.skip("dropout masks differ between the two sides: see test_dropout_proxies_keep_the_guarantees")
    state = {k: v.clone() for k, v in proxy.state_dict().items()}
    eps = 0.5
    worst = 0.0
    for oracle, ydist, objmax in CASES:
        proxy.load_state_dict(state)  # the per-query reference updates BatchNorm running statistics
        want, y, _, _ = orig.mad_per_sample(x, victim, proxy, epsilon=eps, oracle=oracle, objmax=objmax,
                                            ydist=ydist, exact_max_k=10)
        proxy.load_state_dict(state)
        out = MAD(victim, epsilon=eps, proxy=proxy, oracle=oracle, objmax=objmax, ydist=ydist,
                  exact_max_k=10).perturb(x)
        torch.testing.assert_close(out.y, y, rtol=0, atol=1e-12)
        diff = float((out.y_prime - want).abs().max())
        worst = max(worst, diff)
        assert diff <= 1e-6, (name, mode, oracle, ydist, objmax, diff)
    assert worst <= 1e-6


@pytest.mark.parametrize("name", sorted(HAS_DROPOUT))
def test_dropout_proxies_keep_the_guarantees(name):
    victim, proxy, x = _pair(name)
    proxy.train()
    with torch.no_grad():
        y = torch.softmax(victim(x), 1)
    for oracle, ydist, eps in itertools.product(["extreme", "argmax"], ["l1", "l2"], [0.25, 1.0]):
        out = MAD(victim, epsilon=eps, proxy=proxy, oracle=oracle, ydist=ydist, objmax=True).perturb(x)
        yp = out.y_prime
        assert torch.isfinite(yp).all() and (yp >= 0).all()
        torch.testing.assert_close(yp.sum(1), torch.ones(3, dtype=yp.dtype), rtol=0, atol=1e-9)
        d = (yp - y).abs().sum(1) if ydist == "l1" else (yp - y).norm(dim=1)
        assert (d <= eps + 1e-9).all()
        if oracle == "argmax":
            assert torch.equal(yp.argmax(1), y.argmax(1))


def test_auto_takes_the_closed_form_only_when_it_holds():
    victim, proxy, x = _pair("example_net")
    mad = MAD(victim, epsilon=0.5, proxy=proxy)
    logits, h = mad._view.features(x)
    assert h is not None and mad._view.head_name == "fc2"  # log_softmax: a per-row constant shift
    sq_victim, sq, xs = _pair("squeezenet1_1")
    assert MAD(sq_victim, epsilon=0.5, proxy=sq)._view.features(xs)[1] is None  # a conv head
    assert reference_jacobian_param(sq) == "classifier.1.weight"
    with pytest.raises(ValueError, match="jacobian='auto'"):
        MAD(sq_victim, epsilon=0.5, proxy=sq, jacobian="fc")(xs)


class _Tempered(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 5)
        self.T = T

    def forward(self, x):
        return self.fc(self.body(x)) / self.T


@pytest.mark.parametrize("T", [0.5, 2.0, 1.01])
def test_a_temperature_head_never_takes_the_closed_form(T):
    torch.manual_seed(0)
    victim, proxy = _Tempered(1.0).double().eval(), _Tempered(T).double().eval()
    x = torch.randn(6, 8, dtype=torch.float64)
    mad = MAD(victim, epsilon=0.5, proxy=proxy, objmax=False)
    assert mad._view.features(x)[1] is None
    out = mad.perturb(x)
    want, _, _, sobj = orig.mad_per_sample(x, victim, proxy, epsilon=0.5, objmax=False, exact_max_k=10)
    torch.testing.assert_close(out.y_prime, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.sobj, sobj.to(out.sobj.dtype), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="does not return the output of an nn.Linear"):
        MAD(victim, epsilon=0.5, proxy=proxy, jacobian="fc")(x)
