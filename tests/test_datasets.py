"""Tests of ppoison_ext.datasets: the embedded real data, and small generated fixtures for the rest."""
import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppoison_ext import datasets as D
from ppoison_ext.datasets import DatasetIntegrityError

EMB = D.embedded_root()

MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

EMBEDDED_MD5 = {
    "FashionMNIST/partial/t10k-images-idx3-ubyte.gz.first786432bytes": "de2e158fc42691264c88eda8d738a052",
    "FashionMNIST/partial/train-images-idx3-ubyte.gz.first786432bytes": "558b1544e1966e07d12092dee65b8ffb",
    "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "FashionMNIST/raw/train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "MNIST/raw/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "MNIST/raw/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "MNIST/raw/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "MNIST/raw/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "notMNIST/raw/t10k-images-idx3-ubyte.gz": "2c87c839a4ef9b238846600eec8c35b7",
    "notMNIST/raw/t10k-labels-idx1-ubyte.gz": "7ea9118cbafd0f6e3ee2ad771d782a01",
}

ALL_NAMES = ["MNIST", "FashionMNIST", "KMNIST", "EMNIST", "EMNISTLetters", "CIFAR10", "CIFAR100", "SVHN",
             "TinyImageNet200", "CUBS200", "Caltech256", "Indoor67", "Diabetic5", "ImageNet1k", "ImageFolder",
             "notMNIST"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("PPOISON_DATA", raising=False)
    monkeypatch.delenv("PPOISON_SKIP_MD5", raising=False)


# --------------------------------------------------------------------------- fixture writers

def write_idx(path, arr, gz=False):
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 0x0800 | arr.ndim
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return raw


def mnist_like(n, k, seed=0, h=28, w=28):
    rs = np.random.RandomState(seed)
    return rs.randint(0, 256, size=(n, h, w)).astype(np.uint8), (np.arange(n) % k).astype(np.uint8)


def write_png(path, color=(10, 20, 30), size=(8, 6)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def touch(path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def tree_state(root):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*"))


def md5(b):
    return hashlib.md5(b).hexdigest()


# --------------------------------------------------------------------------- registry

def test_registry():
    assert sorted(D.DATASETS) == sorted(ALL_NAMES)
    assert sorted(D.dataset_to_modelfamily) == sorted(ALL_NAMES)
    fam = D.dataset_to_modelfamily
    assert {n for n in ALL_NAMES if fam[n] == "mnist"} == {"MNIST", "FashionMNIST", "KMNIST", "EMNIST",
                                                           "EMNISTLetters", "notMNIST"}
    assert {n for n in ALL_NAMES if fam[n] == "cifar"} == {"CIFAR10", "CIFAR100", "SVHN", "TinyImageNet200"}
    expected_k = {"MNIST": 10, "FashionMNIST": 10, "KMNIST": 10, "EMNIST": 47, "EMNISTLetters": 26,
                  "CIFAR10": 10, "CIFAR100": 100, "SVHN": 10, "TinyImageNet200": 200, "CUBS200": 200,
                  "Caltech256": 256, "Indoor67": 67, "Diabetic5": 5, "ImageNet1k": 1000, "notMNIST": 10}
    for name, k in expected_k.items():
        assert D.num_classes(name) == k
    assert len(D.EMNIST.classes_list) == 47
    assert D.EMNISTLetters.classes_list == tuple("abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(ValueError, match="ImageFolder"):
        D.num_classes("ImageFolder")


def test_unknown_name():
    with pytest.raises(ValueError) as e:
        D.get_dataset("CIFAR-10")
    for n in ALL_NAMES:
        assert n in str(e.value)
    with pytest.raises(ValueError, match="Did you mean 'MNIST'"):
        D.get_dataset("mnist")
    with pytest.raises(ValueError):
        D.num_classes("nope")


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("bad", [1, None, "yes", 0.0])
def test_bad_train_type(name, bad, tmp_path):
    if name == "SVHN" and bad == "yes":
        with pytest.raises(ValueError, match="extra"):
            D.get_dataset(name, train=bad, root=tmp_path)
        return
    with pytest.raises(TypeError, match="train"):
        D.get_dataset(name, train=bad, root=tmp_path)


def test_data_root_precedence(monkeypatch, tmp_path):
    assert D.data_root() == EMB
    monkeypatch.setenv("PPOISON_DATA", str(tmp_path / "env"))
    assert D.data_root() == tmp_path / "env"
    assert D.data_root(tmp_path / "x") == tmp_path / "x"


# --------------------------------------------------------------------------- embedded real data

def test_embedded_md5():
    sums = {}
    for line in (EMB / "MD5SUMS").read_text().splitlines():
        d, rel = line.split()
        sums[rel] = d
    assert sums == EMBEDDED_MD5
    assert all(D.verify_embedded_data().values())
    for rel, d in EMBEDDED_MD5.items():
        assert md5((EMB / rel).read_bytes()) == d
    assert (EMB / "SOURCES.md").is_file()


def test_mnist_embedded():
    tr = D.get_dataset("MNIST", train=True)
    te = D.get_dataset("MNIST", train=False)
    assert tr.data.shape == (60000, 28, 28) and te.data.shape == (10000, 28, 28)
    assert tr.data.dtype == np.uint8 and len(tr) == 60000 and len(te) == 10000
    assert np.bincount(tr.targets).tolist() == MNIST_TRAIN_HIST
    assert np.bincount(te.targets).tolist() == MNIST_TEST_HIST
    assert tr.targets[:5] == [5, 0, 4, 1, 9] and te.targets[:3] == [7, 2, 1]
    assert len(tr.classes) == 10 and not tr.is_partial
    assert Path(tr.images_file).is_relative_to(EMB)
    # the decoded bytes are the official uncompressed files (raw md5 prefixes from SOURCES.md)
    hdr = struct.pack(">IIII", 2051, 60000, 28, 28)
    assert md5(hdr + tr.data.tobytes()).startswith("6bbc9ace")
    assert md5(struct.pack(">IIII", 2051, 10000, 28, 28) + te.data.tobytes()).startswith("2646ac64")
    assert md5(struct.pack(">II", 2049, 60000) + bytes(tr.targets)).startswith("a25bea73")
    assert md5(struct.pack(">II", 2049, 10000) + bytes(te.targets)).startswith("27ae3e4e")
    x, y = D.get_dataset("MNIST", train=False, transform=D.get_transform("mnist", "test"))[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 7
    ref = (torch.from_numpy(te.data[0]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x[0], ref)


def test_notmnist_embedded():
    tr = D.get_dataset("notMNIST", train=True)
    te = D.get_dataset("notMNIST", train=False)
    assert len(tr) == len(te) == 10000 and tr.data.shape == (10000, 28, 28)
    assert np.array_equal(tr.data, te.data) and tr.targets == te.targets
    assert np.bincount(te.targets).tolist() == [1000] * 10
    assert te.classes == list("ABCDEFGHIJ")
    assert abs(te.data.mean() - 108.8) < 0.05
    assert D.dataset_to_modelfamily["notMNIST"] == "mnist"


def test_fashion_embedded_partial():
    tr = D.get_dataset("FashionMNIST", train=True)
    te = D.get_dataset("FashionMNIST", train=False)
    assert tr.is_partial and te.is_partial
    assert tr.data.shape == (1813, 28, 28) and te.data.shape == (1770, 28, 28)
    assert len(tr.targets) == 1813 and len(te.targets) == 1770
    hdr_tr, hdr_te = struct.pack(">IIII", 2051, 60000, 28, 28), struct.pack(">IIII", 2051, 10000, 28, 28)
    assert md5(hdr_tr + tr.data.tobytes()) == "88dd48ca41524a9259375c86dd7b012f"
    assert md5(hdr_te + te.data.tobytes()) == "7c30455192104f0325cf2078dae5081e"
    full = D.read_idx(EMB / "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz", 2049)[0]
    assert te.targets == full[:1770].tolist()
    assert np.bincount(full).tolist() == [1000] * 10
    assert te.classes[0] == "T-shirt/top" and len(te.classes) == 10


def test_fashion_full_files_take_precedence(monkeypatch, tmp_path):
    imgs, labels = mnist_like(7, 10)
    write_idx(tmp_path / "FashionMNIST/raw/t10k-images-idx3-ubyte.gz", imgs, gz=True)
    write_idx(tmp_path / "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz", labels, gz=True)
    monkeypatch.setenv("PPOISON_DATA", str(tmp_path))
    te = D.get_dataset("FashionMNIST", train=False)
    assert len(te) == 7 and not te.is_partial and np.array_equal(te.data, imgs)
    # train files are not in the user root: the embedded (partial) copy is the fallback
    assert D.get_dataset("FashionMNIST", train=True).is_partial
    # an explicit root is searched alone
    with pytest.raises(FileNotFoundError) as e:
        D.get_dataset("FashionMNIST", train=True, root=tmp_path)
    assert str(tmp_path) in str(e.value) and "train-images-idx3-ubyte" in str(e.value)


def test_env_root_falls_back_to_embedded(monkeypatch, tmp_path):
    monkeypatch.setenv("PPOISON_DATA", str(tmp_path))
    assert len(D.get_dataset("MNIST", train=False)) == 10000
    with pytest.raises(FileNotFoundError) as e:
        D.get_dataset("MNIST", train=False, root=tmp_path / "data")
    msg = str(e.value)
    assert "MNIST" in msg and str(tmp_path / "data") in msg
    assert f"{tmp_path / 'data'}/MNIST/raw/" in msg and "t10k-images-idx3-ubyte.gz" in msg


def test_embedded_md5_mismatch_detected(monkeypatch):
    from ppoison_ext.datasets import _common
    monkeypatch.setattr(_common, "_EMBEDDED_SUMS", dict(_common.embedded_sums()))
    _common._EMBEDDED_SUMS["notMNIST/raw/t10k-labels-idx1-ubyte.gz"] = "0" * 32
    with pytest.raises(DatasetIntegrityError, match="md5 mismatch"):
        D.get_dataset("notMNIST", train=False)
    assert len(D.get_dataset("notMNIST", train=False, verify=False)) == 10000
    monkeypatch.setenv("PPOISON_SKIP_MD5", "1")
    assert len(D.get_dataset("notMNIST", train=False)) == 10000


# --------------------------------------------------------------------------- MNIST-like fixtures

def test_kmnist_ko_layout(tmp_path):
    imgs, labels = mnist_like(12, 10, seed=1)
    write_idx(tmp_path / "kmnist/KMNIST/raw/train-images-idx3-ubyte.gz", imgs, gz=True)
    write_idx(tmp_path / "kmnist/KMNIST/raw/train-labels-idx1-ubyte.gz", labels, gz=True)
    before = tree_state(tmp_path)
    ds = D.get_dataset("KMNIST", root=tmp_path, transform=D.get_transform("mnist", "train"))
    assert len(ds) == 12 and ds.classes[:3] == ["o", "ki", "su"] and ds.targets == labels.tolist()
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == 3
    assert tree_state(tmp_path) == before   # nothing written into the data folder
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        D.get_dataset("KMNIST", train=False, root=tmp_path)


def test_emnist_transposed(tmp_path):
    imgs, labels = mnist_like(9, 47, seed=2)
    labels = np.array([0, 10, 46, 1, 2, 3, 4, 5, 6], dtype=np.uint8)
    write_idx(tmp_path / "EMNIST/raw/emnist-balanced-test-images-idx3-ubyte", imgs)
    write_idx(tmp_path / "EMNIST/raw/emnist-balanced-test-labels-idx1-ubyte", labels)
    ds = D.get_dataset("EMNIST", train=False, root=tmp_path)
    assert len(ds.classes) == 47 and ds.classes[10] == "A" and ds.classes[46] == "t"
    assert np.array_equal(ds.data, imgs.transpose(0, 2, 1)) and ds.data.flags.c_contiguous
    img, y = ds[1]
    assert isinstance(img, Image.Image) and img.mode == "L" and y == 10
    assert np.array_equal(np.asarray(img), imgs[1].T)
    with pytest.raises(FileNotFoundError) as e:
        D.get_dataset("EMNIST", train=True, root=tmp_path)
    assert f"{tmp_path}/EMNIST/raw/" in str(e.value)
    assert "emnist-balanced-train-images-idx3-ubyte" in str(e.value)


def test_emnist_letters(tmp_path):
    imgs, _ = mnist_like(26, 26, seed=3)
    labels = np.arange(1, 27, dtype=np.uint8)      # the files use 1..26
    d = tmp_path / "emnist/EMNISTLetters/raw/gzip"     # the original's folder + the archive's gzip/
    write_idx(d / "emnist-letters-train-images-idx3-ubyte.gz", imgs, gz=True)
    write_idx(d / "emnist-letters-train-labels-idx1-ubyte.gz", labels, gz=True)
    ds = D.get_dataset("EMNISTLetters", root=tmp_path)
    assert ds.classes == list("abcdefghijklmnopqrstuvwxyz")
    assert ds.targets == list(range(26))
    assert np.array_equal(ds.data, imgs.transpose(0, 2, 1))
    assert D.num_classes("EMNISTLetters") == len(ds.classes)


def test_idx_corruption(tmp_path):
    imgs, labels = mnist_like(4, 10)
    raw = write_idx(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte", imgs)
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", labels)
    assert len(D.get_dataset("MNIST", train=False, root=tmp_path)) == 4
    # wrong magic
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").write_bytes(struct.pack(">I", 2049) + raw[4:])
    with pytest.raises(DatasetIntegrityError, match="magic"):
        D.get_dataset("MNIST", train=False, root=tmp_path)
    # header count does not match the bytes
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(DatasetIntegrityError, match="header"):
        D.get_dataset("MNIST", train=False, root=tmp_path)
    # a truncated .gz is refused unless declared partial (*.first<N>bytes)
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").unlink()
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DatasetIntegrityError, match="truncated"):
        D.get_dataset("MNIST", train=False, root=tmp_path)
    # label / image count mismatch
    write_idx(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz", imgs[:3], gz=True)
    with pytest.raises(DatasetIntegrityError, match="labels"):
        D.get_dataset("MNIST", train=False, root=tmp_path)


def test_partial_prefix_reader(tmp_path):
    imgs, labels = mnist_like(50, 10, seed=4)
    raw = struct.pack(">IIII", 2051, 50, 28, 28) + imgs.tobytes()
    comp = gzip.compress(raw, compresslevel=0)     # stored blocks: prefix length ~ bytes
    cut = 16 + 20 * 784 + 300
    (tmp_path / "MNIST/partial").mkdir(parents=True)
    (tmp_path / "MNIST/partial/t10k-images-idx3-ubyte.gz.first1bytes").write_bytes(comp[:cut])
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz", labels, gz=True)
    ds = D.get_dataset("MNIST", train=False, root=tmp_path)
    assert ds.is_partial and 0 < len(ds) < 50
    assert np.array_equal(ds.data, imgs[: len(ds)]) and ds.targets == labels[: len(ds)].tolist()


# --------------------------------------------------------------------------- transforms

def test_transforms():
    import torchvision.transforms as T
    mt = D.modelfamily_to_transforms
    assert sorted(mt) == ["cifar", "imagenet", "mnist"]
    assert all(sorted(v) == ["test", "train"] for v in mt.values())

    def types_of(c):
        return [type(t).__name__ for t in c.transforms]

    assert types_of(mt["mnist"]["train"]) == types_of(mt["mnist"]["test"]) == ["ToTensor", "Normalize"]
    assert tuple(mt["mnist"]["test"].transforms[1].mean) == (0.1307,)
    assert tuple(mt["mnist"]["test"].transforms[1].std) == (0.3081,)
    assert types_of(mt["cifar"]["train"]) == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert types_of(mt["cifar"]["test"]) == ["ToTensor", "Normalize"]
    crop = mt["cifar"]["train"].transforms[0]
    assert tuple(crop.size) == (32, 32) and crop.padding == 4
    for split in ("train", "test"):
        n = mt["cifar"][split].transforms[-1]
        assert tuple(n.mean) == (0.4914, 0.4822, 0.4465) and tuple(n.std) == (0.2023, 0.1994, 0.2010)
        n = mt["imagenet"][split].transforms[-1]
        assert list(n.mean) == [0.485, 0.456, 0.406] and list(n.std) == [0.229, 0.224, 0.225]
    assert types_of(mt["imagenet"]["train"]) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor",
                                                 "Normalize"]
    assert tuple(mt["imagenet"]["train"].transforms[0].size) == (224, 224)
    assert types_of(mt["imagenet"]["test"]) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert mt["imagenet"]["test"].transforms[0].size == 256
    assert tuple(mt["imagenet"]["test"].transforms[1].size) == (224, 224)
    assert isinstance(D.get_transform("cifar", "train"), T.Compose)
    assert D.get_transform("cifar", "train") is not D.get_transform("cifar", "train")

    rgb = Image.new("RGB", (40, 30), (255, 0, 128))
    assert D.get_transform("cifar", "train")(Image.new("RGB", (32, 32))).shape == (3, 32, 32)
    assert D.get_transform("imagenet", "train")(rgb).shape == (3, 224, 224)
    x = D.get_transform("imagenet", "test")(rgb)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 100, 100], torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224,
                                                            (128 / 255 - 0.406) / 0.225]), atol=1e-4, rtol=0)
    grey = Image.fromarray(np.full((28, 28), 51, np.uint8))
    torch.testing.assert_close(D.get_transform("mnist", "train")(grey),
                               torch.full((1, 28, 28), (0.2 - 0.1307) / 0.3081))
    with pytest.raises(ValueError):
        D.get_transform("svhn", "test")
    with pytest.raises(ValueError):
        D.get_transform("mnist", "val")


# --------------------------------------------------------------------------- CIFAR

def cifar_arrays(n, k, seed):
    rs = np.random.RandomState(seed)
    return rs.randint(0, 256, size=(n, 3072)).astype(np.uint8), (np.arange(n) % k).tolist()


def write_cifar10_py(root, per_batch=3, protocol=2):
    d = Path(root) / "cifar10/cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_arrays(per_batch, 10, i)
        batches[name] = (data, labels)
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{j}.png" for j in range(per_batch)]}, f, protocol=protocol)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f,
                    protocol=protocol)
    return batches, names


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python(tmp_path, protocol):
    batches, names = write_cifar10_py(tmp_path, protocol=protocol)
    tr = D.get_dataset("CIFAR10", train=True, root=tmp_path, verify=False)
    te = D.get_dataset("CIFAR10", train=False, root=tmp_path, verify=False)
    assert tr.format == "python" and len(tr) == 15 and len(te) == 3 and tr.classes == names
    exp = np.concatenate([batches[f"data_batch_{j}"][0] for j in range(1, 6)])
    assert np.array_equal(tr.data, exp.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert tr.data.shape == (15, 32, 32, 3) and tr.data.dtype == np.uint8
    assert te.targets == batches["test_batch"][1]
    x, y = D.get_dataset("CIFAR10", train=False, root=tmp_path, verify=False,
                         transform=D.get_transform("cifar", "test"))[1]
    assert x.shape == (3, 32, 32) and y == 1
    mean = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    std = torch.tensor([0.2023, 0.1994, 0.2010])[:, None, None]
    ref = (torch.from_numpy(te.data[1]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, ref)


def test_cifar_md5_verification(monkeypatch, tmp_path):
    write_cifar10_py(tmp_path)
    with pytest.raises(DatasetIntegrityError, match="md5 mismatch.*test_batch"):
        D.get_dataset("CIFAR10", train=False, root=tmp_path)
    monkeypatch.setenv("PPOISON_SKIP_MD5", "1")
    assert len(D.get_dataset("CIFAR10", train=False, root=tmp_path)) == 3
    with pytest.raises(DatasetIntegrityError):
        D.get_dataset("CIFAR10", train=False, root=tmp_path, verify=True)


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python-2 ``str`` (BINSTRING), like the official CIFAR pickles (cPickle, protocol 2)."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def py2_pickle(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def test_cifar100_python_and_env_root(monkeypatch, tmp_path):
    d = tmp_path / "cifar-100-python"      # torchvision layout: directly under the root
    d.mkdir()
    for name, n in (("train", 6), ("test", 4)):
        data, fine = cifar_arrays(n, 100, n)
        blob = {b"data": data, b"fine_labels": [x * 7 for x in fine], b"coarse_labels": [0] * n}
        (d / name).write_bytes(py2_pickle(blob))
    assert b"numpy.core.multiarray\n_reconstruct" in (d / "test").read_bytes()
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"] * 20}
    (d / "meta").write_bytes(py2_pickle(meta))
    monkeypatch.setenv("PPOISON_DATA", str(tmp_path))
    ds = D.get_dataset("CIFAR100", train=False, verify=False)
    assert len(ds) == 4 and len(ds.classes) == 100 and ds.targets == [0, 7, 14, 21]
    assert ds.classes[:2] == ["c0", "c1"]
    assert np.array_equal(ds.data, cifar_arrays(4, 100, 4)[0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar_binary(tmp_path):
    d10 = tmp_path / "cifar10/cifar-10-batches-bin"
    d10.mkdir(parents=True)
    recs = {}
    for i, name in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
        data, labels = cifar_arrays(2, 10, 10 + i)
        recs[name] = (data, labels)
        (d10 / name).write_bytes(np.concatenate([np.array(labels, np.uint8)[:, None], data], 1).tobytes())
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (d10 / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    tr = D.get_dataset("CIFAR10", root=tmp_path)     # verify does not apply to the binary version
    assert tr.format == "binary" and len(tr) == 10 and tr.classes == names
    first = recs["data_batch_1.bin"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(tr.data[:2], first)
    assert tr.targets[:2] == recs["data_batch_1.bin"][1]

    d100 = tmp_path / "cifar100/cifar-100-binary"
    d100.mkdir(parents=True)
    data, fine = cifar_arrays(5, 100, 99)
    fine = [3, 50, 99, 0, 1]
    (d100 / "test.bin").write_bytes(np.concatenate(
        [np.zeros((5, 1), np.uint8), np.array(fine, np.uint8)[:, None], data], 1).tobytes())
    (d100 / "train.bin").write_bytes(b"")
    (d100 / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
    te = D.get_dataset("CIFAR100", train=False, root=tmp_path)
    assert te.targets == fine and np.array_equal(te.data, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar_malicious_pickle_refused(tmp_path, protocol):
    write_cifar10_py(tmp_path)
    marker = tmp_path / "pwned"
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Evil(marker)}
    (tmp_path / "cifar10/cifar-10-batches-py/test_batch").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="refusing.*system"):
        D.get_dataset("CIFAR10", train=False, root=tmp_path, verify=False)
    assert not marker.exists()
    # other callables are refused as well
    blob = pickle.dumps({"data": np.zeros(1), "f": getattr}, protocol=protocol)
    (tmp_path / "x.pkl").write_bytes(blob)
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        D.safe_pickle_load(tmp_path / "x.pkl")


def test_cifar_missing_partial_copy(tmp_path):
    write_cifar10_py(tmp_path)
    (tmp_path / "cifar10/cifar-10-batches-py/data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as e:
        D.get_dataset("CIFAR10", root=tmp_path, verify=False)
    assert "data_batch_3" in str(e.value) and f"{tmp_path}/cifar10/" in str(e.value)


# --------------------------------------------------------------------------- SVHN

def test_svhn_with_fake_scipy(monkeypatch, tmp_path):
    rs = np.random.RandomState(5)
    X = rs.randint(0, 256, size=(32, 32, 3, 6)).astype(np.uint8)
    y = np.array([[10], [1], [2], [10], [9], [5]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn/test_32x32.mat").write_bytes(b"fake")
    (tmp_path / "svhn/extra_32x32.mat").write_bytes(b"fake")
    scipy_mod, io_mod = types.ModuleType("scipy"), types.ModuleType("scipy.io")
    io_mod.loadmat = lambda path: {"X": X, "y": y}
    scipy_mod.io = io_mod
    monkeypatch.setitem(sys.modules, "scipy", scipy_mod)
    monkeypatch.setitem(sys.modules, "scipy.io", io_mod)
    ds = D.get_dataset("SVHN", train=False, root=tmp_path, verify=False)
    assert ds.split == "test" and ds.classes == [str(i) for i in range(10)]
    assert ds.targets == [0, 1, 2, 0, 9, 5]
    assert ds.data.shape == (6, 32, 32, 3) and np.array_equal(ds.data[2], X[:, :, :, 2])
    x, t = D.get_dataset("SVHN", train="extra", root=tmp_path, verify=False,
                         transform=D.get_transform("cifar", "test"))[4]
    assert x.shape == (3, 32, 32) and t == 9
    with pytest.raises(DatasetIntegrityError, match="md5"):
        D.get_dataset("SVHN", train=False, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        D.get_dataset("SVHN", train=True, root=tmp_path)


def test_svhn_without_scipy(monkeypatch, tmp_path):
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn/test_32x32.mat").write_bytes(b"fake")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        D.get_dataset("SVHN", train=False, root=tmp_path, verify=False)


# --------------------------------------------------------------------------- folder datasets

def original_per_class(samples, ntest):
    """The original's get_partition_to_idxs (Caltech256 / Diabetic5), global RNG and all."""
    prev = np.random.get_state()
    np.random.seed(123)
    groups = {}
    for idx, s in enumerate(samples):
        groups.setdefault(s[1], []).append(idx)
    for idxs in groups.values():
        np.random.shuffle(idxs)
    part = {"train": [], "test": []}
    for idxs in groups.values():
        part["test"] += idxs[:ntest]
        part["train"] += idxs[ntest:]
    np.random.set_state(prev)
    return part


def tv_samples(folder):
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(folder)).samples


def test_scan_matches_torchvision(tmp_path):
    for c, n in (("b", 3), ("a", 2), ("c", 4)):
        for i in range(n):
            touch(tmp_path / c / f"img{(7 * i) % 5}_{i}.JPG")
    touch(tmp_path / "a/sub/deeper.png")
    touch(tmp_path / "a/notes.txt")
    classes, samples = D.scan_image_folder(tmp_path)
    assert classes == ["a", "b", "c"]
    assert samples == tv_samples(tmp_path)


def test_caltech256(tmp_path):
    base = tmp_path / "256_ObjectCategories"
    sizes = {"001.ak47": 30, "002.bat": 26, "003.cake": 10, "257.clutter": 5}
    for c, n in sizes.items():
        for i in range(n):
            touch(base / c / f"{c[:3]}_{i:04d}.jpg")
    write_png(base / "002.bat/002_0000.jpg")
    state = np.random.get_state()
    tr = D.get_dataset("Caltech256", train=True, root=tmp_path)
    te = D.get_dataset("Caltech256", train=False, root=tmp_path)
    assert np.array_equal(np.random.get_state()[1], state[1])     # global RNG untouched
    assert tr.classes == te.classes == ["001.ak47", "002.bat", "003.cake"]
    assert len(te) == 25 + 25 + 10 and len(tr) == 5 + 1 + 0
    assert np.bincount(te.targets).tolist() == [25, 25, 10]
    # exactly the original's split, in its order
    all_samples = [s for s in tv_samples(base) if s[1] != 3]
    part = original_per_class(all_samples, 25)
    assert te.samples == [all_samples[i] for i in part["test"]]
    assert tr.samples == [all_samples[i] for i in part["train"]]
    assert D.get_dataset("Caltech256", train=False, root=tmp_path).samples == te.samples   # deterministic
    i = next(k for k, (p, _) in enumerate(tr.samples + te.samples) if p.endswith("002_0000.jpg"))
    ds = tr if i < len(tr) else te
    x, y = ds[i if ds is tr else i - len(tr)]
    assert y == 1 and isinstance(x, Image.Image) and x.mode == "RGB"
    x, _ = D.get_dataset("Caltech256", train=ds is tr, root=tmp_path,
                         transform=D.get_transform("imagenet", "test"))[i if ds is tr else i - len(tr)]
    assert x.shape == (3, 224, 224)


def test_diabetic5(tmp_path):
    base = tmp_path / "diabetic_retinopathy/training_imgs"
    sizes = {"0": 205, "1": 201, "2": 150}
    for c, n in sizes.items():
        for i in range(n):
            touch(base / c / f"{i}_left.jpeg")
    tr = D.get_dataset("Diabetic5", train=True, root=tmp_path)
    te = D.get_dataset("Diabetic5", train=False, root=tmp_path)
    assert np.bincount(te.targets).tolist() == [200, 200, 150]
    assert np.bincount(tr.targets, minlength=3).tolist() == [5, 1, 0]
    samples = tv_samples(base)
    part = original_per_class(samples, 200)
    assert [s[0] for s in tr.samples] == [samples[i][0] for i in part["train"]]
    assert [s[0] for s in te.samples] == [samples[i][0] for i in part["test"]]


@pytest.mark.parametrize("n", [10, 37, 1000, 5003])
def test_fraction_split_matches_original(n):
    prev = np.random.get_state()
    np.random.seed(123)
    idxs = np.arange(n)
    test = np.random.choice(idxs, replace=False, size=int(0.2 * len(idxs))).tolist()
    train = list(set(idxs) - set(test))
    np.random.set_state(prev)
    assert D.fraction_split(n, 0.2) == ([int(i) for i in train], test)


def test_imagenet1k(tmp_path):
    base = tmp_path / "ILSVRC2012/training_imgs"
    for c in ("n01", "n02", "n03", "n04"):
        for i in range(10):
            touch(base / c / f"{c}_{i}.JPEG")
    tr = D.get_dataset("ImageNet1k", train=True, root=tmp_path)
    te = D.get_dataset("ImageNet1k", train=False, root=tmp_path)
    assert len(te) == 8 and len(tr) == 32 and tr.classes == ["n01", "n02", "n03", "n04"]
    samples = tv_samples(base)
    train_idxs, test_idxs = D.fraction_split(40, 0.2)
    assert te.samples == [samples[i] for i in test_idxs]
    assert tr.samples == [samples[i] for i in train_idxs]
    assert set(p for p, _ in tr.samples).isdisjoint(p for p, _ in te.samples)


def test_indoor67(tmp_path):
    base = tmp_path / "indoor"
    for c in ("bar", "kitchen"):
        for i in range(4):
            touch(base / "Images" / c / f"{c}{i}.jpg")
    (base / "TestImages.txt").write_text("bar/bar1.jpg\nkitchen/kitchen0.jpg\nkitchen/kitchen3.jpg\n")
    te = D.get_dataset("Indoor67", train=False, root=tmp_path)
    tr = D.get_dataset("Indoor67", train=True, root=tmp_path)
    assert [Path(p).name for p, _ in te.samples] == ["bar1.jpg", "kitchen0.jpg", "kitchen3.jpg"]
    assert te.targets == [0, 1, 1] and len(tr) == 5 and tr.classes == ["bar", "kitchen"]
    (base / "TestImages.txt").unlink()
    with pytest.raises(FileNotFoundError, match="TestImages.txt"):
        D.get_dataset("Indoor67", train=False, root=tmp_path)


def test_cubs200(tmp_path):
    base = tmp_path / "CUB_200_2011"
    files = []
    for c in ("001.Black_footed_Albatross", "002.Laysan_Albatross"):
        for i in range(3):
            files.append(f"{c}/{c[4:]}_{i}.jpg")
            touch(base / "images" / files[-1])
    touch(base / "images/002.Laysan_Albatross/stray.jpg")   # not in images.txt: left out
    (base / "images.txt").write_text("".join(f"{k + 1} {f}\n" for k, f in enumerate(files)))
    (base / "train_test_split.txt").write_text("".join(f"{k + 1} {int(k % 2 == 0)}\n" for k in range(6)))
    tr = D.get_dataset("CUBS200", train=True, root=tmp_path)
    te = D.get_dataset("CUBS200", train=False, root=tmp_path)
    assert [Path(p).name for p, _ in tr.samples] == [Path(files[k]).name for k in (0, 2, 4)]
    assert [Path(p).name for p, _ in te.samples] == [Path(files[k]).name for k in (1, 3, 5)]
    assert tr.targets == [0, 0, 1] and te.targets == [0, 1, 1] and len(tr.classes) == 2


@pytest.mark.parametrize("layout", ["official", "restructured"])
def test_tinyimagenet200(tmp_path, layout):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    for w in wnids:
        for i in range(3):
            sub = base / "train" / w / ("images" if layout == "official" else "")
            write_png(sub / f"{w}_{i}.JPEG", size=(64, 64))
    (base / "wnids.txt").write_text("\n".join(wnids))
    words = ["n01\tgoldfish, Carassius auratus", "n02\ttabby cat", "n03\tbus", "n99\tother"]
    (base / "words.txt").write_text("\n".join(words) + "\n")
    val = [("val_3.JPEG", "n03"), ("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")]
    if layout == "official":
        for f, w in val:
            write_png(base / "val/images" / f, size=(64, 64))
        (base / "val/val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in val))
    else:
        for f, w in val:
            write_png(base / "val" / w / f, size=(64, 64))
    tr = D.get_dataset("TinyImageNet200", train=True, root=tmp_path)
    te = D.get_dataset("TinyImageNet200", train=False, root=tmp_path,
                       transform=D.get_transform("cifar", "test"))
    assert tr.wnids == te.wnids == ["n01", "n02", "n03"]
    assert tr.classes == te.classes == ["goldfish, Carassius auratus", "tabby cat", "bus"]
    assert len(tr) == 9 and tr.targets == [0] * 3 + [1] * 3 + [2] * 3
    assert [(Path(p).name, t) for p, t in te.samples] == [("val_1.JPEG", 0), ("val_0.JPEG", 1),
                                                         ("val_2.JPEG", 1), ("val_3.JPEG", 2)]
    x, y = te[0]
    assert x.shape == (3, 64, 64) and y == 0     # CIFAR transforms on 64 px images, as in the original
    assert D.dataset_to_modelfamily["TinyImageNet200"] == "cifar"


def test_imagefolder(tmp_path):
    for c in ("cat", "dog"):
        write_png(tmp_path / "q" / c / "a.png")
    ds = D.get_dataset("ImageFolder", root=tmp_path / "q", transform=D.get_transform("imagenet", "test"))
    assert ds.classes == ["cat", "dog"] and len(ds) == 2 and ds.samples[1][1] == 1
    assert D.get_dataset("ImageFolder", train=False, root=tmp_path / "q").samples == ds.samples
    assert ds[0][0].shape == (3, 224, 224)
    assert D.num_classes("ImageFolder", root=tmp_path / "q") == 2
    with pytest.raises(ValueError, match="root"):
        D.get_dataset("ImageFolder")
    with pytest.raises(FileNotFoundError, match="nothere"):
        D.get_dataset("ImageFolder", root=tmp_path / "nothere")


# --------------------------------------------------------------------------- missing data messages

MISSING_HINTS = {
    "MNIST": "MNIST/raw/", "FashionMNIST": "FashionMNIST/raw/", "KMNIST": "KMNIST/raw/",
    "EMNIST": "EMNIST/raw/", "EMNISTLetters": "EMNIST/raw/", "notMNIST": "notMNIST/raw/",
    "CIFAR10": "cifar10/", "CIFAR100": "cifar100/", "SVHN": "svhn/", "TinyImageNet200": "tiny-imagenet-200/",
    "CUBS200": "CUB_200_2011/", "Caltech256": "256_ObjectCategories/", "Indoor67": "indoor/",
    "Diabetic5": "diabetic_retinopathy/training_imgs/", "ImageNet1k": "ILSVRC2012/training_imgs/",
}
MISSING_FILES = {
    "MNIST": "train-images-idx3-ubyte", "EMNIST": "emnist-balanced-train-images-idx3-ubyte",
    "EMNISTLetters": "emnist-letters-train-labels-idx1-ubyte", "CIFAR10": "data_batch_1",
    "CIFAR100": "cifar-100-python", "SVHN": "train_32x32.mat", "TinyImageNet200": "words.txt",
    "CUBS200": "train_test_split.txt", "Indoor67": "TestImages.txt",
}


@pytest.mark.parametrize("name", sorted(MISSING_HINTS))
def test_missing_data_message(name, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as e:
        D.get_dataset(name, root=root)
    msg = str(e.value)
    assert msg.startswith(name + ":")
    assert str(root) in msg and f"{root}/{MISSING_HINTS[name]}" in msg
    if name in MISSING_FILES:
        assert MISSING_FILES[name] in msg


def test_missing_without_root_mentions_env(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.get_dataset("CIFAR10")
    msg = str(e.value)
    assert "PPOISON_DATA" in msg and "$PPOISON_DATA/cifar10/" in msg and str(EMB) in msg


def test_dataloader_batches():
    ds = D.get_dataset("notMNIST", train=False, transform=D.get_transform("mnist", "test"))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64 and y.tolist() == ds.targets[:8]
