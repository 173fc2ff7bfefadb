"""PRADA, D-ADD and SEAT against the spec's minimum tests (shared/docs/detect-and-prove.md §I.1.10,
§I.2.12, §I.3.7: golden values computed there by scratch numpy/scipy implementations), plus the
detector contract: chunked observation equals whole, a detector folder round-trips."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from ppoison_ext.detectors import DADD, PRADA, SEAT, load_detector, victim_forward
from ppoison_ext.detectors.dadd import frechet_distance, window_score
from ppoison_ext.detectors.prada import pooled, shapiro_w
from ppoison_ext.detectors.seat import encoder_of
from ppoison_ext.models import get_net


def _records(xs, classes):
    return torch.cat([torch.as_tensor(np.asarray(xs), dtype=torch.float32),
                      torch.as_tensor(classes, dtype=torch.float32)[:, None]], 1)


# ---------------------------------------------------------------------------------------------
# PRADA


def test_prada_hand_example_t1():
    det = PRADA([2])
    st = det.new_state()
    queries = [(0, 0), (3, 4), (6, 8), (0, 1), (10, 0), (3, 4.5), (20, 0)]
    want_T = [0, 0, 0.976311, 0.976311, 0.976311, 0.976311, 1.302738]
    want_G = [1, 2, 3, 4, 5, 5, 6]
    for q, T, G in zip(queries, want_T, want_G):
        det.observe(st, _records([q], [0]))
        assert st.data["T"][0] == pytest.approx(T, abs=1e-6)
        assert st.data["G"][0].n == G
    assert st.data["Gd"][0].values.tolist() == pytest.approx([0, 5, 5, 1, 8.062258, 10], abs=1e-6)
    assert st.data["D"][0].values.tolist() == pytest.approx([5, 5, 1, 8.062258, 0.5, 10], abs=1e-6)


def test_prada_duplicate_query_is_not_added():
    det = PRADA([2])
    st = det.new_state()
    det.observe(st, _records([(1, 2), (1, 2)], [0, 0]))
    assert st.data["G"][0].n == 1 and st.data["D"][0].values.tolist() == [0.0]


def test_shapiro_w_t2():
    assert shapiro_w(np.arange(1, 102)) == pytest.approx(0.95471989, abs=1e-6)
    assert shapiro_w(np.r_[np.full(90, 0.4), np.linspace(0.5, 3, 20)]) == pytest.approx(0.45857419, abs=1e-6)
    from statistics import NormalDist
    scores = [NormalDist().inv_cdf((i - 0.375) / 200.25) for i in range(1, 201)]
    assert shapiro_w(scores) == pytest.approx(0.99954634, abs=1e-6)


def test_outlier_rejection_t3():
    values = list(range(1, 101)) + [1000]
    t = torch.tensor(values, dtype=torch.float64)
    assert float(t.mean()) == pytest.approx(59.9010, abs=1e-4)
    assert float(t.std(correction=0)) == pytest.approx(98.2999, abs=1e-4)
    kept = pooled([values])
    assert kept.size == 100 and float(kept.max()) == 100


def test_float_distance_not_uint8_wrap_t4():
    st, det = PRADA([2]).new_state(), PRADA([2])
    det.observe(st, _records([(10, 200), (30, 100)], [0, 0]))
    assert float(st.data["D"][0].values[0]) == pytest.approx(101.9804, abs=1e-4)  # the uint8 path: 12.6491


def _stream(name):
    if name == "S1":
        X = np.random.default_rng(2024).standard_normal((400, 16))
    else:
        rng = np.random.default_rng(7)
        Q = list(rng.standard_normal((10, 16)))
        for _ in range(5):
            for q in list(Q):
                Q.append(q + 0.1 * np.sign(rng.standard_normal(16)))
        X = np.stack(Q)
    c = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0).astype(int)
    return _records(X, c)


def _run_stream(records, delta):
    det = PRADA([16], delta=delta, latch=False)
    st, scores, flags = det.new_state(), [], []
    for r in records:
        scores.append(float(det.observe(st, r[None])[0]))
        flags.append(st.flag)
    return st, scores, flags


def test_prada_seeded_stream_s1_t5():
    st, scores, flags = _run_stream(_stream("S1"), 0.978)
    tests = [(i + 1, w) for i, w in enumerate(scores) if not math.isnan(w)]
    assert len(tests) == 29
    assert tests[0][0] == 111 and tests[0][1] == pytest.approx(0.99011963, abs=1e-6)
    assert tests[1][0] == 121 and tests[1][1] == pytest.approx(0.99060363, abs=1e-6)
    assert tests[-1][0] == 391 and tests[-1][1] == pytest.approx(0.97854387, abs=1e-6)
    assert max(w for _, w in tests) == pytest.approx(0.99120544, abs=1e-6)
    assert st.data["pool_size"] == 384 and not any(flags)
    assert {c: g.n for c, g in st.data["G"].items()} == {0: 64, 1: 87, 2: 97, 3: 85}
    want_T = {0: 3.13680418, 1: 2.99578817, 2: 2.97067918, 3: 3.13487043}
    assert {c: pytest.approx(t, abs=1e-6) for c, t in want_T.items()} == st.data["T"]


def test_prada_seeded_stream_s2_t5():
    st, scores, flags = _run_stream(_stream("S2"), 0.9)
    tests = [(i + 1, w) for i, w in enumerate(scores) if not math.isnan(w)]
    assert len(tests) == 20
    assert tests[0][0] == 121 and tests[0][1] == pytest.approx(0.34818620, abs=1e-6)
    assert tests[1][0] == 131 and tests[1][1] == pytest.approx(0.34428859, abs=1e-6)
    assert tests[-1][0] == 311 and tests[-1][1] == pytest.approx(0.73711730, abs=1e-6)
    assert st.data["pool_size"] == 299
    assert sum(flags) == 200 and flags.index(True) == 120
    assert {c: g.n for c, g in st.data["G"].items()} == {0: 6, 2: 6, 3: 13}
    want_T = {0: 1.92413378, 2: 1.77557746, 3: 0.32548641}
    assert {c: pytest.approx(t, abs=1e-6) for c, t in want_T.items()} == st.data["T"]
    mins = np.concatenate([ds.values for ds in st.data["D"].values()]).tolist()
    assert min(mins) == pytest.approx(0.4, abs=1e-6) and max(mins) == pytest.approx(5.313917, abs=1e-6)


@pytest.mark.parametrize("delta", [0.985, 0.988])
def test_latched_flag_is_the_running_or_of_prada_own(delta):
    _, _, own = _run_stream(_stream("S1"), delta)
    det = PRADA([16], delta=delta, latch=True)
    st, latched = det.new_state(), []
    for r in _stream("S1"):
        det.observe(st, r[None])
        latched.append(st.flag)
    assert any(own) and latched == list(itertools.accumulate(own, lambda a, b: a or b))
    assert st.flagged_at == own.index(True) + 1


# ---------------------------------------------------------------------------------------------
# D-ADD


def test_frechet_g1_g2():
    fd = frechet_distance(torch.tensor([0., 0]), torch.diag(torch.tensor([4., 1])), torch.tensor([1., 2]),
                          torch.diag(torch.tensor([1., 9])))
    assert fd == pytest.approx(10.0, abs=1e-12)
    fd = frechet_distance(torch.tensor([1., 0]), torch.tensor([[2., 1], [1, 2]]), torch.tensor([0., 1]),
                          torch.diag(torch.tensor([1., 3])))
    assert fd == pytest.approx(2.5166852264521182, abs=1e-12)


def test_window_one_sample_g3_and_rank1_g4():
    assert window_score(torch.tensor([[3., 4]]), torch.tensor([0]), torch.zeros(1, 2),
                        torch.eye(2)[None]) == pytest.approx(27.0, abs=1e-12)
    sigma = torch.tensor([[1, .5, 0], [.5, 2, .3], [0, .3, .5]], dtype=torch.float64)
    rows = torch.tensor([[1., 0, 0], [0, 2, 1]])
    score = window_score(rows, torch.tensor([0, 0]), torch.zeros(1, 3), sigma[None])
    assert score == pytest.approx(3.55042375, abs=1e-7)


def _g5():
    means = torch.tensor([[0., 0], [5, 5]])
    covs = torch.stack([torch.eye(2), torch.tensor([[2, .5], [.5, 1]])])
    h = torch.tensor([[0., 1], [1, 0], [-1, 0], [5, 6], [6, 5], [0, 0]])
    return means, covs, h, torch.tensor([0, 0, 0, 1, 1, 0])


def test_window_score_g5_and_threshold():
    means, covs, h, c = _g5()
    assert window_score(h, c, means, covs) == pytest.approx(1.17510283, abs=1e-7)
    logits = nn.functional.one_hot(c, 2).float()
    for tau, flagged in ((1.1751, True), (1.1752, False)):
        det = DADD(means, covs, tau=tau, window=6)
        st = det.new_state()
        scores = det.observe(st, det.records(h, logits, h))
        assert scores[:5].isnan().all() and float(scores[5]) == pytest.approx(1.17510283, abs=1e-7)
        assert st.flag is flagged


def test_window_counts_g6():
    means, covs, h, c = _g5()
    det = DADD(means, covs, tau=1.5, window=16)
    st = det.new_state()
    label0 = nn.functional.one_hot(torch.zeros(16, dtype=torch.long), 2)
    quiet = det.records(h, label0, torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))
    loud = det.records(h, label0, torch.full((16, 2), 9.0))
    for i in range(10):
        det.observe(st, loud if i == 4 else quiet)
    assert (st.data["windows"], st.data["flagged_windows"], st.flagged_at) == (10, 1, 80)


def test_window_score_equals_frechet_per_class():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    sigma = a @ a.T / 6
    h = torch.randn(5, 6, generator=g, dtype=torch.float64)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    want = frechet_distance(mu, sigma, h.mean(0), torch.cov(h.T, correction=0))
    # (√ of the zero eigenvalues of a rank-deficient S: ~1e-8, spec §I.2.12 G4)
    got = window_score(h, torch.zeros(5, dtype=torch.long), mu[None], sigma[None])
    assert got == pytest.approx(want, rel=1e-7)


# ---------------------------------------------------------------------------------------------
# SEAT


def test_seat_state_machine():
    det = SEAT(nn.Identity(), thresh=0.5, k=1, num_clusters=2, buffer_size=3)
    det.record_width = 1
    st = det.new_state()
    enc = torch.tensor([0, 3, 3.2, 10, 10.1, 20, 20.3, 20.35, 40])[:, None]
    scores = det.observe(st, enc)
    assert [i + 1 for i in range(9) if math.isnan(scores[i])] == [1, 6, 9]
    # records are float32: 20.35 - 20.3 = 0.0500011
    assert scores[~scores.isnan()].tolist() == pytest.approx([3.0, 0.2, 6.8, 0.1, 0.3, 0.05], abs=1e-5)
    assert [bool(s < 0.5) for s in scores] == [False, False, True, False, True, False, True, True, False]
    assert (st.data["detections"], st.data["alarms"], st.flagged_at) == (4, 2, 5)
    assert st.data["hist"].data.flatten().tolist() == [40.0] and st.data["moved"] == 0


# ---------------------------------------------------------------------------------------------
# The contract, on the real LeNet and MNIST


@pytest.fixture(scope="module")
def lenet_and_data():
    from ppoison_ext.datasets import get_dataset, get_transform
    torch.manual_seed(0)
    model = get_net("lenet", "mnist", num_classes=10).eval()
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    x = torch.stack([ds[i][0] for i in range(400)])
    y = torch.tensor([ds[i][1] for i in range(400)])
    return model, x, y


def _detectors(model, x, y):
    means, covs = DADD.reference(model, x, y)
    return [PRADA([1, 28, 28], delta=0.95), DADD(means, covs, tau=50.0, window=16),
            SEAT(encoder_of(model), thresh=1.0, k=2, num_clusters=5)]


def test_chunked_observation_equals_whole_and_replay(lenet_and_data):
    model, x, y = lenet_and_data
    logits, h = victim_forward(model, x[:240])
    for det in _detectors(model, x, y):
        records = det.records(x[:240], logits, h)
        whole = det.new_state()
        scores = det.observe(whole, records)
        st = det.new_state()
        chunks = [det.observe(st, records[i:i + n]) for i, n in ((0, 7), (7, 100), (107, 133))]
        torch.testing.assert_close(torch.cat(chunks), scores, equal_nan=True, rtol=0, atol=0)
        replayed = det.new_state()
        det.observe(replayed, records)
        for state in (st, replayed):
            assert (state.queries, state.flag, state.flagged_at) == (240, whole.flag, whole.flagged_at)
            assert state.score == whole.score or math.isnan(whole.score)


def test_detector_folder_round_trip(lenet_and_data, tmp_path):
    model, x, y = lenet_and_data
    for det in _detectors(model, x, y):
        det.save(tmp_path / det.name)
        back = load_detector(tmp_path / det.name, model)
        assert type(back) is type(det) and back.config() == det.config()
        torch.testing.assert_close(back.run(model, x[:64])[0], det.run(model, x[:64])[0], equal_nan=True)
    assert load_detector(tmp_path / "prada", model, latch=False).latch is False
    with pytest.raises(ValueError, match="unknown keys"):
        load_detector(tmp_path / "prada", model, bogus=1)
    with pytest.raises(ValueError, match="not a detector folder"):
        load_detector(tmp_path, model)


def test_calibrate(lenet_and_data):
    model, x, y = lenet_and_data
    accounts = [x[:200], x[200:400]]
    prada = PRADA.calibrate(model, benign=accounts, fpr=0.0)
    minima = [float(s[~s.isnan()].min()) for s in (prada.run(model, a)[0] for a in accounts)]
    assert prada.delta == pytest.approx(min(minima))
    assert not any(prada.run(model, a)[1].flag for a in accounts)
    dadd = DADD.calibrate(model, train_x=x, train_y=y, benign=accounts, fpr=0.1)
    scores = torch.cat([dadd.run(model, a)[0] for a in accounts])
    scores = scores[~scores.isnan()]
    assert 0 < float((scores > dadd.tau).float().mean()) <= 0.1 + 1e-9
    seat = SEAT.calibrate(model, train_x=x, train_rows=64, calib_rows=128, k=1)
    assert seat.thresh > 0 and seat.record_width == 500


@pytest.mark.parametrize("make, err", [
    (lambda: PRADA([1, 28, 28], delta=1.5), ValueError),
    (lambda: PRADA([], delta=0.5), ValueError),
    (lambda: PRADA([4], latch="yes"), TypeError),
    (lambda: DADD(torch.zeros(2, 3), torch.zeros(2, 3, 2), tau=1.0), ValueError),
    (lambda: DADD(torch.zeros(2, 3), torch.zeros(2, 3, 3), tau=1.0, window=0), ValueError),
    (lambda: SEAT(nn.Identity(), thresh=float("nan")), ValueError),
    (lambda: SEAT(nn.Identity(), thresh=1.0, k=0), ValueError),
])
def test_bad_arguments(make, err):
    with pytest.raises(err):
        make()


def test_records_shape_is_checked():
    det = PRADA([2])
    with pytest.raises(ValueError, match=r"records must have shape \[n, 3\]"):
        det.observe(det.new_state(), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# The batched neighbour search against brute-force ports of the spec (§I.1, §I.3): numpy, every
# distance of every query computed, one query at a time


def _prada_port(x, classes):
    """Each query's nearest-distance to its class's growing set (NaN for a class's first query)
    and the sets' final sizes and thresholds."""
    G, Gd, T, out = {}, {}, {}, []
    for xi, c in zip(x, classes):
        if c not in G:
            G[c], Gd[c], T[c] = [xi], [0.0], 0.0
            out.append(math.nan)
            continue
        d = float(np.sqrt(((np.stack(G[c]) - xi) ** 2).sum(1)).min())
        out.append(d)
        if d > T[c]:
            G[c].append(xi)
            Gd[c].append(d)
            T[c] = max(float(np.mean(Gd[c]) - np.std(Gd[c])), T[c])
    return out, {c: len(g) for c, g in G.items()}, T


def _seat_port(e, k, thresh, num_clusters, buffer_size):
    hist, buffered, moved, detections, scores = [], 0, 0, 0, []
    for ei in e:
        if moved == 0 and buffered < k:
            hist.append(ei)
            buffered += 1
            scores.append(math.nan)
            continue
        dist = np.sort(np.sqrt(((np.stack(hist) - ei) ** 2).sum(1)))
        scores.append(float(dist[:k].mean()))
        hist.append(ei)
        buffered += 1
        if buffered >= buffer_size:
            moved, buffered = moved + buffered, 0
        if scores[-1] < thresh:
            detections += 1
            if detections % num_clusters == 0:
                hist, buffered, moved = [], 0, 0
    return scores


def test_batched_search_equals_brute_force_ports(lenet_and_data):
    model, x, _ = lenet_and_data
    # 400 MNIST images and 200 repeats of some of them (distance 0, never added) in a fixed order
    g = torch.Generator().manual_seed(3)
    stream = torch.cat([x, x[torch.randint(400, (200,), generator=g)]])[torch.randperm(600, generator=g)]
    logits = model(stream).detach()
    det = PRADA([1, 28, 28], delta=0.0)
    st = det.new_state()
    det.observe(st, det.records(stream, logits, None))
    flat, classes = stream.flatten(1).double().numpy(), logits.argmax(1).tolist()
    want, sizes, T = _prada_port(flat, classes)
    order = {c: [i for i, ci in enumerate(classes) if ci == c and not math.isnan(want[i])] for c in sizes}
    for c, rows in order.items():  # D_c holds the class's distances in query order
        np.testing.assert_allclose(st.data["D"][c].values, [want[i] for i in rows], rtol=1e-12, atol=1e-12)
    assert {c: g.n for c, g in st.data["G"].items()} == sizes
    assert st.data["T"] == pytest.approx(T, rel=1e-12)
    enc = encoder_of(model)
    e = enc(stream).detach()
    for k in (1, 3):
        median = np.quantile(_seat_port(e.double().numpy(), k, -1.0, 1, 10**9)[k:], 0.5)
        seat = SEAT(enc, thresh=float(median), k=k, num_clusters=7, buffer_size=50)
        got = seat.observe(seat.new_state(), e)
        want = _seat_port(e.double().numpy(), k, seat.thresh, 7, 50)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        assert int((got < seat.thresh).sum()) >= 14  # the alarms (history cleared) were exercised
