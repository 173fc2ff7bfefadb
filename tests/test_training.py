"""ppoison_ext.training: soft CE, optimizers, and train_model's original semantics + resuming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from ppoison_ext.training import (
    LOG_COLUMNS,
    class_weights,
    get_optimizer,
    soft_cross_entropy,
    test_step,
    train_model,
    training_state,
)


def _data(n=60, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    return x, y


def _model(seed=1, d=6, k=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, k))


def _rows(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# --- soft_cross_entropy / get_optimizer ------------------------------------------------------


def test_soft_cross_entropy_formula_and_no_renormalisation():
    z = torch.randn(5, 4)
    t = torch.softmax(torch.randn(5, 4), 1) * 0.5  # rows sum to 0.5: used as-is
    expected = (-(t * F.log_softmax(z, 1)).sum(1)).mean()
    torch.testing.assert_close(soft_cross_entropy(z, t), expected)
    labels = torch.tensor([0, 3, 1, 1, 2])
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(soft_cross_entropy(z, one_hot), F.cross_entropy(z, labels))
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    torch.testing.assert_close(soft_cross_entropy(z, t, w), (-(t * F.log_softmax(z, 1) * w).sum(1)).mean())
    with pytest.raises(ValueError, match="targets"):
        soft_cross_entropy(z, t[:, :3])


def test_get_optimizer_original_choices():
    params = list(_model().parameters())
    sgd = get_optimizer(params, "sgd", lr=0.3, momentum=0.9)
    assert sgd.defaults["lr"] == 0.3 and sgd.defaults["momentum"] == 0 and sgd.defaults["weight_decay"] == 0
    sgdm = get_optimizer(params, "sgdm", lr=0.01, momentum=0.5)
    assert sgdm.defaults["momentum"] == 0.5 and sgdm.defaults["weight_decay"] == 0
    adam = get_optimizer(params, "adam", lr=0.5)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3  # lr ignored, as the original
    adagrad = get_optimizer(params, "adagrad", lr=0.5)
    assert isinstance(adagrad, torch.optim.Adagrad) and adagrad.defaults["lr"] == 1e-2
    with pytest.raises(ValueError, match="optimizer name"):
        get_optimizer(params, "rmsprop")
    with pytest.raises(ValueError, match="lr"):
        get_optimizer(params, "sgd", lr=-1)


def test_class_weights_from_targets_and_subsets():
    x, _ = _data(6)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    ds = TensorDataset(x, y)
    torch.testing.assert_close(class_weights(ds, 3), torch.tensor([1 / 3, 1 / 2, 1.0]))
    torch.testing.assert_close(class_weights(Subset(ds, [0, 3, 5]), 3), torch.ones(3))
    with pytest.raises(ValueError, match="no training sample"):
        class_weights(Subset(ds, [0, 1]), 3)


# --- train_model ---------------------------------------------------------------------------


def test_log_checkpoint_and_schedule(tmp_path):
    x, y = _data()
    model, s = train_model(_model(), TensorDataset(x, y), tmp_path, testset=TensorDataset(x[:20], y[:20]),
                           epochs=4, lr_step=2, batch_size=16, device="cpu", seed=0, progress=False,
                           arch="mlp")
    header, rows = _rows(tmp_path / "train.log.tsv")
    assert header == LOG_COLUMNS
    assert [(r[1], r[2]) for r in rows] == [(str(e), sp) for e in range(1, 5) for sp in ("train", "test")]
    assert len({r[0] for r in rows}) == 1  # one run_id
    assert [h["lr"] for h in s["history"]] == pytest.approx([0.1, 0.1, 0.01, 0.01])  # StepLR after each epoch
    test_accs = [h["test_acc"] for h in s["history"]]
    assert s["best_test_acc"] == max(test_accs)
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    best_epoch = max(i + 1 for i, a in enumerate(test_accs) if a == max(test_accs))  # >=: the last tie wins
    assert ckpt["epoch"] == best_epoch and ckpt["best_acc"] == test_accs[best_epoch - 1]
    assert ckpt["arch"] == "mlp" and ckpt["num_classes"] == 2 and ckpt["optimizer"] is not None
    assert float(rows[-1][5]) == pytest.approx(s["best_test_acc"])
    assert not model.training  # left in eval mode after the last test step, as the original


def test_no_testset_logs_minus_one_and_checkpoints_every_epoch(tmp_path):
    x, y = _data()
    _, s = train_model(_model(), TensorDataset(x, y), tmp_path, epochs=2, device="cpu", progress=False,
                       checkpoint_suffix=".60", save_last=False)
    _, rows = _rows(tmp_path / "train.60.log.tsv")
    assert [r[3:] for r in rows if r[2] == "test"] == [["-1.0", "-1.0", "-1.0"]] * 2
    assert torch.load(tmp_path / "checkpoint.60.pth.tar", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "last.60.pth.tar").exists()


def test_loss_normalisation_quirk_and_soft_target_accuracy(tmp_path):
    x, _ = _data(40)
    t = torch.softmax(torch.randn(40, 2), 1)
    model = _model()
    # lr 0 leaves the weights unchanged; a model without dropout gives the same logits in train mode
    frozen = nn.Sequential(model[0], model[1], model[3])
    with torch.no_grad():
        logits = frozen(x)
    _, s = train_model(frozen, TensorDataset(x, t), tmp_path, epochs=1, lr=0.0, batch_size=40, device="cpu",
                       criterion=soft_cross_entropy, progress=False, save_last=False)
    h = s["history"][0]
    # the sum of batch means over N samples
    assert h["train_loss"] == pytest.approx(float(soft_cross_entropy(logits, t)) / 40, rel=1e-5)
    acc = 100.0 * float((logits.argmax(1) == t.argmax(1)).float().mean())
    assert h["train_acc"] == pytest.approx(acc)


def test_resume_continues_bit_for_bit_and_skips_finished(tmp_path):
    x, y = _data()
    kw = dict(testset=TensorDataset(x[:20], y[:20]), lr_step=2, batch_size=16, device="cpu", seed=3,
              progress=False)
    full, _ = train_model(_model(), TensorDataset(x, y), tmp_path / "a", epochs=4, **kw)
    train_model(_model(), TensorDataset(x, y), tmp_path / "b", epochs=2, **kw)  # "killed" after 2 epochs
    assert training_state(tmp_path / "b")["epoch"] == 2
    # a killed run may have logged an unfinished epoch: those rows are dropped on resume
    log = tmp_path / "b" / "train.log.tsv"
    run_id = _rows(log)[1][0][0]
    log.write_text(log.read_text() + f"{run_id}\t3\ttrain\t9\t9\t9\n")
    resumed, s = train_model(_model(seed=99), TensorDataset(x, y), tmp_path / "b", epochs=4, resume="auto",
                             **kw)
    assert s["resumed_from"] == 2 and not s["skipped"]
    assert _same(full, resumed)
    _, rows = _rows(log)
    assert [(r[1], r[2]) for r in rows] == [(str(e), sp) for e in range(1, 5) for sp in ("train", "test")]
    assert {r[0] for r in rows} == {run_id}
    before = log.read_text()
    again, s2 = train_model(_model(seed=5), TensorDataset(x, y), tmp_path / "b", epochs=4, resume=True, **kw)
    assert s2["skipped"] and _same(full, again) and log.read_text() == before


def test_resume_from_checkpoint_path(tmp_path):
    x, y = _data()
    train_model(_model(), TensorDataset(x, y), tmp_path, epochs=1, device="cpu", progress=False,
                save_last=False)
    _, s = train_model(_model(), TensorDataset(x, y), tmp_path, epochs=2, device="cpu", progress=False,
                       resume=tmp_path / "checkpoint.pth.tar", save_last=False)
    assert s["resumed_from"] == 1 and [h["epoch"] for h in s["history"]] == [2]
    with pytest.raises(FileNotFoundError, match="resume"):
        train_model(_model(), TensorDataset(x, y), tmp_path, epochs=1, device="cpu", resume=tmp_path / "nope")


def test_weighted_loss_and_test_step(tmp_path):
    x, y = _data()
    ds = TensorDataset(x, y)
    model, _ = train_model(_model(), ds, tmp_path, epochs=1, device="cpu", weighted_loss=True, progress=False,
                           num_classes=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=60)
    loss, acc = test_step(model, loader, "cpu")
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)) / 60, rel=1e-5)
    assert acc == pytest.approx(100.0 * float((logits.argmax(1) == y).float().mean()))


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"epochs": -1}, ValueError, "epochs"),
    ({"lr": -0.1}, ValueError, "lr"),
    ({"lr_step": 0}, ValueError, "lr_step"),
    ({"checkpoint_suffix": 3}, TypeError, "checkpoint_suffix"),
    ({"optimizer": "sgd"}, TypeError, "optimizer"),
    ({"arch": nn.Linear}, TypeError, "arch"),
])
def test_bad_arguments(tmp_path, kwargs, exc, word):
    x, y = _data(8)
    with pytest.raises(exc, match=word):
        train_model(_model(), TensorDataset(x, y), tmp_path, device="cpu", progress=False, **kwargs)
    with pytest.raises(TypeError, match="model"):
        train_model("net", TensorDataset(x, y), tmp_path)


def test_progress_goes_to_stderr_never_stdout(tmp_path, capsys):
    x, y = _data(16)
    kw = dict(epochs=1, device="cpu", save_last=False)
    train_model(_model(), TensorDataset(x, y), tmp_path, progress=True, **kw)
    out, err = capsys.readouterr()
    assert out == "" and "train" in err
    train_model(_model(), TensorDataset(x, y), tmp_path, progress=False, **kw)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
