"""Checkpoint / params.json I/O: atomic writes, weights_only round trips, every error path."""

from __future__ import annotations

import json
import os
import stat
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from ppoison_ext import fileio as ckpt_io
from ppoison_ext.checkpoint import convert_reference_checkpoint, load_checkpoint, read_state_dict, save_checkpoint
from ppoison_ext.fileio import atomic_save_bytes, atomic_write, atomic_write_json, atomic_write_text
from ppoison_ext.modeldir import load_model_dir, modelfamily_for_dataset, read_params
from ppoison_ext.models import get_net


def _trained(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    return opt


def _assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


@pytest.fixture
def lenet_ckpt(tmp_path):
    model = get_net("lenet", "mnist", num_classes=10)
    opt = _trained(model, torch.randn(2, 1, 28, 28))
    path = save_checkpoint(tmp_path / "checkpoint.pth.tar", model, arch="lenet", epoch=3, best_acc=97.5,
                           optimizer=opt)
    return path, model


# --- atomic writes -----------------------------------------------------------------------------


def test_atomic_writes_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write_json(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_save_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "again")  # overwrite
    assert (tmp_path / "t.txt").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "sub", "t.txt"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.json"]
    mode = stat.S_IMODE((tmp_path / "b.bin").stat().st_mode)
    assert mode == 0o666 & ~ckpt_io._umask()  # not mkstemp's 0o600


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    os.chmod(target, 0o640)

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})  # serialised before touching the file
    assert target.read_text() == "old"
    atomic_write_text(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # keeps the replaced file's mode


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trip_weights_only(tmp_path, lenet_ckpt):
    path, model = lenet_ckpt
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "arch", "state_dict", "best_acc", "optimizer", "created_on", "num_classes"}
    assert raw["arch"] == "lenet" and raw["epoch"] == 3 and raw["best_acc"] == 97.5
    assert raw["num_classes"] == 10 and isinstance(raw["created_on"], str)
    assert raw["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert len(raw["optimizer"]["state"]) == len(list(model.parameters()))
    fresh = get_net("lenet", "mnist", num_classes=10)
    out = load_checkpoint(path, fresh)
    _assert_same_weights(model, fresh)
    assert out["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar"]


def test_save_checkpoint_extra_and_type_checks(tmp_path):
    model = get_net("lenet", "mnist")
    path = save_checkpoint(tmp_path / "c.pth", model, arch="lenet", epoch=0, best_acc=-1,
                           extra={"budget": 1000, "history": [0.5, {"a": torch.ones(2)}]})
    raw = torch.load(path, weights_only=True)
    assert raw["budget"] == 1000 and raw["optimizer"] is None
    with pytest.raises(TypeError, match="architecture name"):
        save_checkpoint(tmp_path / "x.pth", model, arch=type(model), epoch=0, best_acc=0)
    with pytest.raises(TypeError, match="extra\\['bad'\\]"):
        save_checkpoint(tmp_path / "x.pth", model, arch="lenet", epoch=0, best_acc=0,
                        extra={"bad": nn.Linear})
    with pytest.raises(ValueError, match="collides"):
        save_checkpoint(tmp_path / "x.pth", model, arch="lenet", epoch=0, best_acc=0, extra={"epoch": 1})
    assert not (tmp_path / "x.pth").exists()


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_load_empty_and_truncated(tmp_path, lenet_ckpt):
    path, _ = lenet_ckpt
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pth.*empty"):
        load_checkpoint(empty)
    data = path.read_bytes()
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.pth.*truncated or corrupt"):
        load_checkpoint(half, get_net("lenet", "mnist"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.pth.*truncated or corrupt"):
        load_checkpoint(garbage)


def test_load_legacy_format_truncated(tmp_path):
    model = get_net("lenet", "mnist")
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": model.state_dict()}, path, _use_new_zipfile_serialization=False)
    load_checkpoint(path, get_net("lenet", "mnist"))  # the torch<1.6 format loads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="legacy.pth.*truncated or corrupt"):
        load_checkpoint(path)


def test_load_not_a_dict_and_no_state_dict(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.ones(2)], p)
    with pytest.raises(ValueError, match="list.pth holds a list, not a checkpoint dict"):
        load_checkpoint(p)
    p = tmp_path / "nostate.pth"
    torch.save({"epoch": 1, "best_acc": 3.0}, p)
    with pytest.raises(ValueError, match="nostate.pth has no 'state_dict'.*best_acc"):
        load_checkpoint(p)
    p = tmp_path / "badstate.pth"
    torch.save({"state_dict": [1, 2]}, p)
    with pytest.raises(ValueError, match="'state_dict' is a list"):
        load_checkpoint(p)


def test_load_bare_state_dict(tmp_path):
    model = get_net("lenet", "mnist")
    p = tmp_path / "bare.pth"
    torch.save(model.state_dict(), p)
    fresh = get_net("lenet", "mnist")
    load_checkpoint(p, fresh)
    _assert_same_weights(model, fresh)
    assert read_state_dict(p).keys() == model.state_dict().keys()


def test_load_wrong_num_classes(lenet_ckpt):
    path, _ = lenet_ckpt
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, get_net("lenet", "mnist", num_classes=26))
    msg = str(e.value)
    assert str(path) in msg and "checkpoint has K=10 classes, model has 26" in msg
    assert "fc2.weight: checkpoint [10, 500] vs model [26, 500]" in msg


def test_load_other_architecture(lenet_ckpt):
    path, _ = lenet_ckpt
    with pytest.raises(ValueError, match="saved arch 'lenet'.*differ in shape.*missing from the checkpoint"):
        load_checkpoint(path, get_net("resnet18", "cifar", num_classes=10))
    m = get_net("lenet", "mnist", num_classes=10)
    extra = nn.Sequential(m)  # keys "0.conv1.weight", ...
    with pytest.raises(ValueError, match="strict=False"):
        load_checkpoint(path, extra)


def _reference_checkpoint(path, model, opt, legacy: bool):
    """A checkpoint as the original code wrote it: 'arch' is the model class, from a
    package (knockoff) that is not installed when the file is read."""
    names = ["knockoff", "knockoff.models", "knockoff.models.cifar", "knockoff.models.cifar.resnet"]
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ResNet", (nn.Module,), {"__module__": "knockoff.models.cifar.resnet"})
    mods["knockoff.models.cifar.resnet"].ResNet = cls
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(mods)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy format: "Couldn't retrieve source code for container"
            torch.save({"epoch": 7, "arch": cls, "state_dict": model.state_dict(), "best_acc": 91.25,
                        "optimizer": opt.state_dict(), "created_on": "2020-04-26 12:00:00"},
                       path, _use_new_zipfile_serialization=not legacy)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reference_checkpoint_refused_then_converted(tmp_path, legacy):
    model = get_net("resnet18", "cifar", num_classes=10)
    opt = _trained(model, torch.randn(2, 3, 32, 32))
    ref = tmp_path / "model_best.pth.tar"
    _reference_checkpoint(ref, model, opt, legacy)
    with pytest.raises(ValueError) as e:
        load_checkpoint(ref, get_net("resnet18", "cifar", num_classes=10))
    msg = str(e.value)
    assert str(ref) in msg and "knockoff.models.cifar.resnet.ResNet" in msg
    assert "convert_reference_checkpoint" in msg and "weights_only" in msg

    out = convert_reference_checkpoint(ref, tmp_path / "converted.pth.tar", arch="resnet18")
    raw = torch.load(out, weights_only=True)
    assert raw["arch"] == "resnet18" and raw["reference_arch"] == "knockoff.models.cifar.resnet.ResNet"
    assert raw["epoch"] == 7 and raw["best_acc"] == 91.25 and raw["num_classes"] == 10
    assert raw["optimizer"]["param_groups"][0]["lr"] == 0.1
    fresh = get_net("resnet18", "cifar", num_classes=10)
    load_checkpoint(out, fresh)
    _assert_same_weights(model, fresh)
    no_name = convert_reference_checkpoint(ref, tmp_path / "c2.pth")
    assert torch.load(no_name, weights_only=True)["arch"] == "knockoff.models.cifar.resnet.ResNet"


def test_convert_reference_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_reference_checkpoint(tmp_path / "missing", tmp_path / "out")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="bad.pth"):
        convert_reference_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- params.json and model folders --------------------------------------------------------------------


def _params(**over):
    p = {"dataset": "MNIST", "model_arch": "lenet", "num_classes": 10, "out_path": "x", "epochs": 3,
         "pretrained": None, "created_on": "2020-01-01"}
    p.update(over)
    return {k: v for k, v in p.items() if v is not ...}


def test_read_params_ok(tmp_path):
    atomic_write_json(tmp_path / "params.json", _params())
    assert read_params(tmp_path)["model_arch"] == "lenet"
    assert read_params(tmp_path / "params.json")["num_classes"] == 10
    atomic_write_json(tmp_path / "params_train.json", _params(dataset=..., testdataset="CIFAR10"))
    assert read_params(tmp_path, "params_train.json")["testdataset"] == "CIFAR10"


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"model_arch": "lenet", "num_classes": 10,', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps(_params(model_arch=...)), "'model_arch'"),
        (json.dumps(_params(model_arch=3)), "'model_arch' must be"),
        (json.dumps(_params(num_classes=...)), "'num_classes'"),
        (json.dumps(_params(num_classes="10")), "'num_classes' must be a positive integer"),
        (json.dumps(_params(num_classes=True)), "'num_classes' must be a positive integer"),
        (json.dumps(_params(num_classes=0)), "'num_classes' must be a positive integer"),
        (json.dumps(_params(dataset=...)), "no dataset key"),
        (json.dumps(_params(dataset=["MNIST"])), "'dataset' must be a dataset name"),
    ],
    ids=["malformed", "not-object", "no-arch", "arch-type", "no-k", "k-str", "k-bool", "k-zero", "no-dataset",
         "dataset-type"],
)
def test_read_params_errors(tmp_path, content, match):
    p = tmp_path / "params.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        read_params(tmp_path)
    assert str(p) in str(e.value)


def test_read_params_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        read_params(tmp_path)


def test_load_model_dir(tmp_path, lenet_ckpt):
    src_path, model = lenet_ckpt  # tmp_path/checkpoint.pth.tar
    atomic_write_json(tmp_path / "params.json", _params())
    loaded, params = load_model_dir(tmp_path)
    assert params["model_arch"] == "lenet" and not loaded.training
    _assert_same_weights(model, loaded)
    # model_best.pth.tar wins over checkpoint.pth.tar
    other = get_net("lenet", "mnist", num_classes=10)
    save_checkpoint(tmp_path / "model_best.pth.tar", other, arch="lenet", epoch=9, best_acc=99.0)
    loaded, _ = load_model_dir(tmp_path)
    _assert_same_weights(other, loaded)
    # wrong K in params.json
    atomic_write_json(tmp_path / "params.json", _params(num_classes=26))
    with pytest.raises(ValueError, match="checkpoint has K=10 classes, model has 26"):
        load_model_dir(tmp_path)


def test_load_model_dir_family_and_errors(tmp_path, monkeypatch):
    model = get_net("resnet18", "cifar", num_classes=10)
    save_checkpoint(tmp_path / "checkpoint.pth.tar", model, arch="resnet18", epoch=1, best_acc=50.0)
    atomic_write_json(tmp_path / "params.json", _params(dataset="SVHN", model_arch="resnet18"))
    # the dataset -> family map falls back to the built-in one when ppoison_ext.datasets is missing
    monkeypatch.setitem(sys.modules, "ppoison_ext.datasets", None)
    loaded, _ = load_model_dir(tmp_path)
    _assert_same_weights(model, loaded)
    # an explicit family overrides the dataset's
    with pytest.raises(ValueError, match="does not fit"):
        load_model_dir(tmp_path, modelfamily="imagenet")
    with pytest.raises(FileNotFoundError, match="model_best.pth.tar"):
        load_model_dir(tmp_path, checkpoint_names=("model_best.pth.tar",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_dir(tmp_path / "nope")


def test_modelfamily_for_dataset(monkeypatch):
    from ppoison_ext import modeldir

    monkeypatch.setattr(modeldir, "dataset_to_modelfamily", {})  # the built-in fallback alone
    assert modelfamily_for_dataset("FashionMNIST") == "mnist"
    assert modelfamily_for_dataset("TinyImageNet200") == "cifar"
    assert modelfamily_for_dataset("Caltech256") == "imagenet"
    monkeypatch.setattr(modeldir, "dataset_to_modelfamily", {"MyDigits": "mnist"})
    assert modelfamily_for_dataset("MyDigits") == "mnist"
    assert modelfamily_for_dataset("CIFAR100") == "cifar"  # unknown to the map: built-in fallback
    monkeypatch.setattr(modeldir, "dataset_to_modelfamily", lambda name: {"MyDigits": "mnist"}[name])
    assert modelfamily_for_dataset("MyDigits") == "mnist"
    assert modelfamily_for_dataset("KMNIST") == "mnist"


def test_atomic_write_removes_a_killed_writers_temporary_file(tmp_path):
    target = tmp_path / "train.log.tsv"
    stale = tmp_path / ".train.log.tsv.abc123.tmp"  # what a SIGKILL inside atomic_write leaves
    other = tmp_path / ".other.tsv.abc123.tmp"
    stale.write_text("half")
    other.write_text("not ours")
    atomic_write_text(target, "row\n")
    assert target.read_text() == "row\n"
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tsv.abc123.tmp", "train.log.tsv"]


def test_tsv_run_log_append_and_drop(tmp_path):
    from ppoison_ext.fileio import append_tsv, drop_tsv_rows

    log = tmp_path / "run.log.tsv"
    append_tsv(log, ["run_id", "epoch"], [])
    assert log.read_text() == "run_id\tepoch\n"
    append_tsv(log, ["run_id", "epoch"], [["a", 1], ["a", 2.5]])
    append_tsv(log, ["ignored"], [["b", 1]])  # the header is written only when the file is new
    assert log.read_text() == "run_id\tepoch\na\t1\na\t2.5\nb\t1\n"
    drop_tsv_rows(log, lambda fields: fields[0] == "a" and float(fields[1]) > 2)
    assert log.read_text() == "run_id\tepoch\na\t1\nb\t1\n"
    drop_tsv_rows(tmp_path / "missing.tsv", lambda fields: True)  # a missing file: nothing happens
    assert not (tmp_path / "missing.tsv").exists()
