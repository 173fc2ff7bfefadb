"""DAWN (spec detect-and-prove.md §II.1.12, T1–T5) and the statistics of an ownership claim (§II.4),
with the golden values the spec gives; scipy and brute force as independent references."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import random
import string

import numpy as np
import pytest
import torch
from torch import nn

from ppoison_ext.defenses import DAWN, Blackbox, MAD, new_watermark_key, read_watermark_key
from ppoison_ext.defenses.dawn import query_bytes
from ppoison_ext.pipeline.verify import (binomial_sf, clopper_pearson_upper, n_required, poisson_binomial_sf,
                                         verify_ownership)

scipy_stats = pytest.importorskip("scipy.stats")


def _spec_key() -> bytes:
    """The original's default_key(256), derived as §II.1.2 describes (public: only for the goldens)."""
    state = random.getstate()
    try:
        random.seed(42)
        return "".join(random.choices(string.ascii_uppercase + string.digits, k=256)).encode()
    finally:
        random.setstate(state)


class Fixed(nn.Module):
    """A 'victim' returning the logits log(p) of a fixed posterior p whatever the input."""

    def __init__(self, p):
        super().__init__()
        self.register_buffer("logp", torch.as_tensor(p, dtype=torch.float32).log())
        self.lin = nn.Linear(1, 1)  # a parameter, so the device is known

    def forward(self, x):
        return self.logp.expand(x.shape[0], -1)


def test_t1_key():
    key = _spec_key()
    assert key.startswith(b"XAJI0Y6DPBHSAHXTHV3A3ZMF8MDD4V30T9NT3W5UZBIKCIDK")
    digest = "e1b4f2065793a91b86cae5bdb0157c186ef86ac853456fcc8d4b6080214a43fe"
    assert hashlib.sha256(key).hexdigest() == digest


T2 = [(torch.zeros(1, 28, 28), "fd4ba62c0b3d8715", False),
      (torch.ones(1, 28, 28), "7b3b9e0db0c66127", False),
      (-torch.ones(1, 28, 28), "2530214f11869200", False),
      ((torch.arange(784, dtype=torch.float32) / 784).view(1, 28, 28), "89c471fe63b6f606", False),
      (torch.full((1, 28, 28), 225 / 1000, dtype=torch.float32), "00725d2478edc030", True)]


def test_t2_decisions_and_t4_one_ulp():
    key = _spec_key()
    d = DAWN(Blackbox(Fixed([0.7, 0.2, 0.1])), key=key, rate=0.005)
    assert d.bound == 327 and d.effective_rate == 0.0050048828125
    x = torch.stack([t[0] for t in T2])
    for row, (_, prefix, _) in zip(query_bytes(x), T2):
        assert hmac.new(key, row, hashlib.sha256).hexdigest()[:16] == prefix
    assert d.select(x)[0] == [i for i, t in enumerate(T2) if t[2]]
    # the first i with all i/1000 selected is 225
    first = next(i for i in range(1000) if d.select(torch.full((1, 1, 28, 28), i / 1000))[0])
    assert first == 225
    flipped = torch.zeros(1, 28, 28)
    flipped.view(-1).view(torch.int32)[0] ^= 1  # the lowest mantissa bit of the first pixel
    assert hmac.new(key, query_bytes(flipped[None])[0], hashlib.sha256).hexdigest()[:16] == "6c17ee5e280bb4c4"


def test_t3_rate():
    d = DAWN(Blackbox(Fixed([0.5, 0.5])), key=_spec_key(), rate=0.005)
    rng = np.random.default_rng(0)
    chunks = (torch.from_numpy(rng.standard_normal((20_000, 1, 28, 28), dtype=np.float32)) for _ in range(10))
    selected = sum(len(d.select(x)[0]) for x in chunks)
    assert abs(selected / 200_000 - 0.0050049) <= 4 * math.sqrt(0.005 * 0.995 / 200_000)


def test_t5_wrong_label_keyed_uniform_and_on_the_simplex():
    K, p = 7, torch.tensor([0.05, 0.1, 0.4, 0.2, 0.1, 0.1, 0.05])
    d = DAWN(Blackbox(Fixed(p)), key=b"k" * 32, rate=0.99)
    x = torch.randn(10_000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = d.perturb(x)
    marked = out.marks >= 0
    assert marked.float().mean() > 0.98
    labels = out.marks[marked]
    assert (labels != 2).all()  # never the answer's own top-1
    counts = torch.bincount(labels, minlength=K)[[0, 1, 3, 4, 5, 6]]
    assert scipy_stats.chisquare(counts.numpy()).pvalue > 1e-3
    yp = out.y_prime[marked]
    assert torch.equal(yp.argmax(1), labels)  # ŷ is the answer's top-1
    assert torch.equal(yp.sort(1).values, out.y[marked].sort(1).values)  # a swap: the same masses
    assert torch.equal(out.y_prime[~marked], out.y[~marked])
    again = d.perturb(x[5000:])  # a re-query, in other batches, gets the same answers
    assert torch.equal(again.y_prime, out.y_prime[5000:]) and torch.equal(again.marks, out.marks[5000:])
    other = DAWN(Blackbox(Fixed(p)), key=b"j" * 32, rate=0.99).perturb(x[:2000]).marks
    assert (other != out.marks[:2000]).float().mean() > 0.5  # another key, other labels


def test_wraps_a_defense_and_declares_its_capabilities():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    mad = MAD(model, epsilon=0.5, oracle="argmax")
    d = DAWN(mad, key=b"k" * 16, rate=0.3)
    assert d.batch_independent == mad.batch_independent and not d.keeps_top1 and not d.stateful
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out, inner = d.perturb(x), mad.perturb(x)
    unmarked = out.marks < 0
    assert 0 < unmarked.sum() < 64
    assert torch.equal(out.y_prime[unmarked], inner.y_prime[unmarked])
    assert torch.allclose(out.y_prime.sum(1), inner.y_prime.sum(1))


def test_bad_arguments_name_themselves(tmp_path):
    bb = Blackbox(Fixed([0.5, 0.5]))
    for kwargs, err, what in [({"key": b"short"}, ValueError, "key"), ({"key": "str" * 8}, TypeError, "key"),
                              ({"key": b"k" * 16, "rate": 0.0}, ValueError, "rate"),
                              ({"key": b"k" * 16, "rate": 1.0}, ValueError, "rate"),
                              ({"key": b"k" * 16, "rate": "x"}, TypeError, "rate")]:
        with pytest.raises(err, match=what):
            DAWN(bb, **kwargs)
    with pytest.raises(TypeError, match="defense"):
        DAWN(DAWN(bb, key=b"k" * 16), key=b"k" * 16)
    path = tmp_path / "wm.key"
    key = new_watermark_key(path)
    assert read_watermark_key(path) == key and len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        new_watermark_key(path)
    (tmp_path / "bad").write_text("00ff\n")
    with pytest.raises(ValueError, match="128"):
        read_watermark_key(tmp_path / "bad")
    with pytest.raises(ValueError, match="hex"):
        (tmp_path / "bad").write_text("not hex")
        read_watermark_key(tmp_path / "bad")


@pytest.mark.parametrize("n,k,p0,want", [(100, 50, 0.1, 5.832039e-24), (100, 20, 0.1, 1.978561e-3),
                                         (100, 15, 0.1, 7.257297e-2), (50, 25, 1 / 9, 1.051785e-11),
                                         (20, 20, 0.1, 1.0e-20), (13, 7, 0.1, 9.928549e-5),
                                         (250, 125, 0.1, 1.954184e-57), (20, 10, 0.1, 7.150904e-6)])
def test_binomial_tail_goldens(n, k, p0, want):
    assert binomial_sf(k, n, p0) == pytest.approx(want, rel=1e-6)


def test_binomial_tail_against_scipy():
    for n, p in itertools.product((1, 7, 60, 400), (0.01, 0.1, 0.5, 0.93)):
        for h in range(0, n + 2, max(1, n // 9)):
            want = scipy_stats.binom.sf(h - 1, n, p)
            assert binomial_sf(h, n, p) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_smallest_watermark_sets():
    alpha = 2.0 ** -64
    for p0, (half, full) in [(0.1, (81, 20)), (1 / 9, (89, 21)), (0.2, (185, 28)), (0.3, (473, 37))]:
        assert (n_required(0.5, p0, alpha), n_required(1.0, p0, alpha)) == (half, full)
    for w, want in [(0.9, (3, 7, 24)), (0.5, (5, 23, 81)), (0.3, (14, 71, 267)), (0.2, (56, 251, 921))]:
        assert tuple(n_required(w, 0.1, a) for a in (0.01, 1e-6, alpha)) == want
    assert n_required(0.1, 0.1, 0.01) is None


def test_poisson_binomial_goldens_and_brute_force():
    p = (0.1, 0.2, 0.05, 0.3, 0.1, 0.02, 0.15, 0.1, 0.05, 0.2)
    for k, want in [(0, 1.0), (1, 0.7544738), (3, 0.1171461), (6, 3.010110e-4), (10, 9.0e-11)]:
        assert poisson_binomial_sf(k, p) == pytest.approx(want, rel=1e-6)
    c, M = (0, 1, 0, 3, 0, 0, 2, 1, 0, 1), 20
    assert poisson_binomial_sf(6, [(ci + 1) / (M + 2) for ci in c]) == pytest.approx(3.089369e-5, rel=1e-6)
    q = np.random.default_rng(3).uniform(0, 1, 11)
    for h in range(12):
        brute = sum(np.prod([qi if b else 1 - qi for qi, b in zip(q, bits)])
                    for bits in itertools.product((0, 1), repeat=11) if sum(bits) >= h)
        assert poisson_binomial_sf(h, q) == pytest.approx(brute, rel=1e-9)


def test_clopper_pearson_goldens():
    assert clopper_pearson_upper(0, 10) == pytest.approx(0.2589, abs=1e-4)
    assert clopper_pearson_upper(0, 30) == pytest.approx(0.0950, abs=1e-4)
    assert clopper_pearson_upper(0, 10, 0.975) == pytest.approx(0.3085, abs=1e-4)
    assert clopper_pearson_upper(0, 30, 0.975) == pytest.approx(0.1157, abs=1e-4)
    want = scipy_stats.beta.ppf(0.95, 4, 20 - 3)  # the exact bound of 3 in 20
    assert clopper_pearson_upper(3, 20) == pytest.approx(want, rel=1e-9)


def test_verify_ownership_bad_input(tmp_path):
    with pytest.raises(ValueError, match="ledger.sqlite"):
        verify_ownership(nn.Linear(2, 2), tmp_path)
    with pytest.raises(TypeError, match="model"):
        verify_ownership("model", tmp_path)
    with pytest.raises(ValueError, match="alpha"):
        verify_ownership(nn.Linear(2, 2), tmp_path, alpha=0.0)
