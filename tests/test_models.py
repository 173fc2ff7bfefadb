"""Model zoo: forward shapes, the last-Linear property, weight copying, ImageNet weight lookup.

mnist and cifar models are all built and run. The imagenet family is every torchvision
classification model (~80, up to 630M parameters), too many to build in a fast run; the
last-Linear property is a property of each model *class*'s forward code, so one small
member of each torchvision class runs here, and `test_every_imagenet_name_has_a_tested_class`
ties every name to one of them. `PPOISON_TEST_FULL_ZOO=1` runs all names at full size.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from ppoison_ext.models import (
    DEFAULT_NUM_CLASSES,
    MODEL_NAMES,
    copy_weights_,
    find_imagenet_weights,
    get_net,
    imagenet,
    last_linear,
    last_linear_name,
    remap_cadene_state_dict,
)

K = 7
DEPTH_KW = {"resnet": {"depth": 20}, "preresnet": {"depth": 20}}
HEAVY = {"resnext"}  # ResNeXt-29 16x64d: ~10 GFLOPs per image; run at batch 1


def assert_logits_are_last_linear(model: nn.Module, x: torch.Tensor, k: int = K) -> nn.Linear:
    """model(x) == lin(h) where lin = last_linear(model) and h is lin's captured input."""
    lin = last_linear(model, x)
    assert isinstance(lin, nn.Linear)
    captured = {}
    handle = lin.register_forward_hook(lambda m, inp, out: captured.update(h=inp[0], out=out))
    model.eval()
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        again = lin(captured["h"])
    assert y.shape == (x.shape[0], k)
    assert lin.out_features == k
    assert captured["out"] is y
    torch.testing.assert_close(y, again, rtol=0, atol=0)
    return lin


# --- mnist / cifar: every name ------------------------------------------------------------------

SMALL_FAMILIES = [(fam, name) for fam in ("mnist", "cifar") for name in MODEL_NAMES[fam]]


@pytest.mark.parametrize("family,name", SMALL_FAMILIES, ids=[f"{f}-{n}" for f, n in SMALL_FAMILIES])
def test_small_family_forward_and_last_linear(family, name):
    model = get_net(name, family, num_classes=K, **DEPTH_KW.get(name, {}))
    assert model.input_size == {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}[family]
    batch = 1 if name in HEAVY else 2
    assert_logits_are_last_linear(model, torch.randn(batch, *model.input_size))


def test_family_names_and_defaults():
    assert MODEL_NAMES["mnist"] == ["lenet"]
    assert set(MODEL_NAMES["cifar"]) == {
        "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
        "resnet18", "resnet34", "resnet50", "resnet", "resnext", "wrn_16_1", "wrn_16_2", "wrn_40_1",
        "wrn_40_2", "preresnet", "densenet",
    }
    assert set(MODEL_NAMES["imagenet"]) == set(torchvision.models.list_models(module=torchvision.models))
    assert get_net("lenet", "mnist").fc2.out_features == DEFAULT_NUM_CLASSES["mnist"] == 10


def test_cifar_architecture_details():
    # resnet18/34/50 are the CIFAR ResNets of depth 20/32/56: 3 stages of (depth-2)/6 blocks.
    for name, depth in (("resnet18", 20), ("resnet34", 32), ("resnet50", 56)):
        m = get_net(name, "cifar", num_classes=10)
        assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [(depth - 2) // 6] * 3
        assert (m.fc.in_features, m.fc.out_features) == (64, 10)
    vgg = get_net("vgg16", "cifar", num_classes=10)
    assert isinstance(vgg.classifier, nn.Linear) and vgg.classifier.in_features == 512
    assert sum(isinstance(l, nn.Conv2d) for l in vgg.features) == 13
    # VGG Linear init N(0, 0.01), bias 0
    assert abs(vgg.classifier.weight.std().item() - 0.01) < 0.002
    assert torch.count_nonzero(vgg.classifier.bias) == 0
    lenet = get_net("lenet", "mnist", num_classes=10)
    assert [(n, type(l).__name__) for n, l in lenet.named_children()] == [
        ("conv1", "Conv2d"), ("conv2", "Conv2d"), ("fc1", "Linear"), ("fc2", "Linear")
    ]
    assert (lenet.fc1.in_features, lenet.fc1.out_features, lenet.conv2.out_channels) == (800, 500, 50)
    d = get_net("densenet", "cifar")
    assert d.growthRate == 12 and len(d.dense1) == 3  # depth 22, bottleneck: (22-4)/6 per block
    wrn = get_net("wrn_40_2", "cifar")
    assert len(wrn.block1.layer) == 6 and wrn.fc.in_features == 128
    assert get_net("resnet", "cifar", depth=32).layer1.__len__() == 5
    assert get_net("preresnet", "cifar", depth=56, block_name="Bottleneck").fc.in_features == 256


# --- imagenet: one member of every torchvision class --------------------------------------------

# name -> (test input side, extra builder kwargs); sizes are the smallest the class allows.
IMAGENET_REPS = {
    "alexnet": (64, {}),
    "convnext_tiny": (32, {}),
    "densenet121": (32, {}),
    "efficientnet_b0": (32, {}),
    "googlenet": (64, {}),
    "inception_v3": (80, {}),
    "maxvit_t": (224, {}),
    "mnasnet0_5": (32, {}),
    "mobilenet_v2": (32, {}),
    "mobilenet_v3_small": (32, {}),
    "regnet_x_400mf": (32, {}),
    "resnet18": (32, {}),
    "shufflenet_v2_x0_5": (32, {}),
    "swin_t": (32, {}),
    "vgg11": (32, {}),
    "vit_b_32": (32, {"image_size": 32}),
}


@pytest.mark.parametrize("name", sorted(IMAGENET_REPS))
def test_imagenet_class_forward_and_last_linear(name):
    size, kw = IMAGENET_REPS[name]
    model = get_net(name, "imagenet", num_classes=K, **kw)
    x = torch.randn(1, 3, size, size)
    lin = assert_logits_are_last_linear(model, x)
    assert model.last_linear is lin
    assert not any(k.startswith("last_linear") for k in model.state_dict())
    if name in ("inception_v3", "googlenet"):
        # aux classifiers are removed: a plain logits tensor in training mode too
        model.train()
        out = model(torch.randn(2, 3, size, size))
        assert isinstance(out, torch.Tensor) and out.shape == (2, K)


def _builder_class(name: str) -> type:
    return inspect.signature(torchvision.models.get_model_builder(name)).return_annotation


def test_every_imagenet_name_has_a_tested_class():
    tested = {_builder_class(n) for n in IMAGENET_REPS} | {torchvision.models.SqueezeNet}
    for name in MODEL_NAMES["imagenet"]:
        assert _builder_class(name) in tested, name


def test_imagenet_input_sizes_and_alias():
    with torch.device("meta"):
        assert get_net("inception_v3", "imagenet").input_size == (3, 299, 299)
        assert get_net("inceptionv3", "imagenet").input_size == (3, 299, 299)  # Cadene name
        assert get_net("resnet50", "imagenet").input_size == (3, 224, 224)
        assert get_net("vit_b_16", "imagenet", image_size=64).input_size == (3, 64, 64)


_FULL_ZOO = (
    sorted(set(MODEL_NAMES["imagenet"]) - imagenet.NO_LINEAR_HEAD)
    if os.environ.get("PPOISON_TEST_FULL_ZOO") == "1"
    else [pytest.param(None, marks=pytest.mark.skip(reason="full imagenet zoo: PPOISON_TEST_FULL_ZOO=1"))]
)


@pytest.mark.slow
@pytest.mark.parametrize("name", _FULL_ZOO)
def test_full_imagenet_zoo(name):
    """Every imagenet-family name at its native input size (~2-3 min on 2 CPU cores)."""
    model = get_net(name, "imagenet", num_classes=K)
    assert_logits_are_last_linear(model, torch.randn(1, *model.input_size))


def test_squeezenet_has_no_linear_head():
    model = get_net("squeezenet1_1", "imagenet", num_classes=K)
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, K)
    assert isinstance(model.last_conv, nn.Conv2d) and model.last_conv.out_channels == K
    with pytest.raises(ValueError, match="SqueezeNet"):
        last_linear(model)
    assert imagenet.NO_LINEAR_HEAD == {"squeezenet1_0", "squeezenet1_1"}


def test_last_linear_alias_assignment_and_pickle():
    model = get_net("resnet18", "imagenet", num_classes=10)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.last_linear is model.fc
    model.last_linear = nn.Linear(512, 3)  # Cadene-style head replacement
    assert model.fc.out_features == 3 and model.last_linear is model.fc
    assert "fc.weight" in model.state_dict() and "last_linear.weight" not in model.state_dict()
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is type(model) and clone.last_linear is clone.fc
    torch.testing.assert_close(clone.fc.weight, model.fc.weight)


# --- last_linear on arbitrary models ---------------------------------------------------------------


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return 2 * self.fc(x)


class _NoLinear(nn.Module):
    def forward(self, x):
        return x


class _Reshaped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).view(x.shape[0], 3)


def test_last_linear_errors_and_views():
    with pytest.raises(ValueError, match="_Scaled"):
        last_linear(_Scaled())
    with pytest.raises(ValueError, match="_NoLinear"):
        last_linear(_NoLinear(), torch.randn(2, 4))
    m = _Reshaped()
    m.a.eval()
    assert last_linear(m) is m.b and last_linear_name(m) == "b"
    assert m.training and m.b.training and not m.a.training  # modes restored
    with pytest.raises(ValueError, match="input size"):
        last_linear(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)))


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_names_and_families():
    with pytest.raises(ValueError, match="known families"):
        get_net("lenet", "svhn")
    with pytest.raises(ValueError, match=r"known: \['lenet'\]"):
        get_net("vgg16", "mnist")
    with pytest.raises(ValueError, match="exists in the 'mnist' family"):
        get_net("lenet", "cifar")
    with pytest.raises(ValueError, match="Cadene"):
        get_net("nasnetalarge", "imagenet")
    with pytest.raises(ValueError, match="depth="):
        get_net("resnet", "cifar")
    with pytest.raises(ValueError, match="num_classes"):
        get_net("lenet", "mnist", num_classes=0)
    with pytest.raises(ValueError, match="imagenet family"):
        get_net("vgg16", "cifar", pretrained="imagenet")
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        get_net("lenet", "mnist", pretrained="/nonexistent/no_such_file.pth")


# --- weights from a local file ---------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["checkpoint", "bare", "dataparallel"])
def test_pretrained_path_copies_by_name(tmp_path, caplog, wrap):
    src = get_net("vgg11", "cifar", num_classes=10)
    sd = src.state_dict()
    path = tmp_path / "src.pth"
    if wrap == "checkpoint":
        torch.save({"epoch": 1, "arch": "vgg11", "state_dict": sd}, path)
    elif wrap == "bare":
        torch.save(sd, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    with caplog.at_level(logging.INFO, logger="ppoison_ext.models"):
        dst = get_net("vgg11", "cifar", pretrained=str(path), num_classes=26)
    assert dst.classifier.out_features == 26
    for k, v in dst.state_dict().items():
        if not k.startswith("classifier."):
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    assert "classifier.weight" in caplog.text and "shape mismatch" in caplog.text


def test_copy_weights_report():
    src = {"fc1.weight": torch.ones(500, 800), "fc2.weight": torch.ones(10, 500),
           "extra.weight": torch.ones(3)}
    model = get_net("lenet", "mnist", num_classes=26)
    report = copy_weights_(src, model)
    assert report.copied == ["fc1.weight"]
    assert report.not_in_model == ["extra.weight"]
    assert report.shape_mismatch == ["fc2.weight: source (10, 500) != model (26, 500)"]
    assert set(report.skipped) == {"extra.weight", "fc2.weight"}
    assert "fc1.bias" in report.not_in_source
    assert torch.all(model.fc1.weight == 1)


def test_cadene_keys_are_remapped(tmp_path):
    src = get_net("resnet18", "imagenet", num_classes=10)
    sd = {("last_linear." + k[3:] if k.startswith("fc.") else k): v for k, v in src.state_dict().items()}
    path = tmp_path / "cadene.pth"
    torch.save({"state_dict": sd}, path)
    dst = get_net("resnet18", "imagenet", pretrained=path, num_classes=10)
    torch.testing.assert_close(dst.fc.weight, src.fc.weight, rtol=0, atol=0)
    with torch.device("meta"):
        alex = get_net("alexnet", "imagenet")
        vgg = get_net("vgg11", "imagenet")
    fake = {"_features.0.weight": 0, "linear0.weight": 0, "linear1.bias": 0, "last_linear.weight": 0}
    assert list(remap_cadene_state_dict(fake, alex)) == [
        "features.0.weight", "classifier.1.weight", "classifier.4.bias", "classifier.6.weight"
    ]
    assert list(remap_cadene_state_dict(fake, vgg)) == [
        "features.0.weight", "classifier.0.weight", "classifier.3.bias", "classifier.6.weight"
    ]


# --- ImageNet weights: local files only -------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub, no $PPOISON_PRETRAINED_DIR, and any download attempt fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(imagenet.PRETRAINED_DIR_ENV, raising=False)

    def no_network(*a, **k):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path


def _torchvision_state_dict(name: str) -> dict:
    return torchvision.models.get_model(name, weights=None).state_dict()


def test_imagenet_weights_from_hub_cache(offline):
    sd = _torchvision_state_dict("squeezenet1_1")
    url = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1.url
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(sd, hub / Path(urlparse(url).path).name)  # torchvision's file name
    assert find_imagenet_weights("squeezenet1_1") == hub / "squeezenet1_1-b8a52dc0.pth"
    model = get_net("squeezenet1_1", "imagenet", pretrained="imagenet")  # K = 1000 keeps the head
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_imagenet_weights_from_env_dir_replace_head(offline, monkeypatch):
    wdir = offline / "weights"
    wdir.mkdir()
    monkeypatch.setenv(imagenet.PRETRAINED_DIR_ENV, str(wdir))
    sd = _torchvision_state_dict("shufflenet_v2_x0_5")
    torch.save(sd, wdir / "shufflenet_v2_x0_5.pth")
    model = get_net("shufflenet_v2_x0_5", "imagenet", pretrained="imagenet", num_classes=K)
    assert model.fc.out_features == K and model.last_linear is model.fc
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    model.eval()
    assert_logits_are_last_linear(model, torch.randn(1, 3, 32, 32))


def test_imagenet_weights_missing(offline, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        get_net("resnet18", "imagenet", pretrained="imagenet", num_classes=10)
    msg = str(e.value)
    assert "never downloads" in msg and "PPOISON_PRETRAINED_DIR" in msg
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth") in msg
    monkeypatch.setenv(imagenet.PRETRAINED_DIR_ENV, str(offline / "w"))
    with pytest.raises(FileNotFoundError, match=r"w/resnet18\.pth"):
        find_imagenet_weights("resnet18")


def test_imagenet_weights_densenet_old_keys(offline, monkeypatch):
    # torchvision's DenseNet files use the old "norm.1" key names
    monkeypatch.setenv(imagenet.PRETRAINED_DIR_ENV, str(offline))
    sd = _torchvision_state_dict("densenet121")
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
           for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert old.keys() != sd.keys()
    torch.save(old, offline / "densenet121.pth")
    model = get_net("densenet121", "imagenet", pretrained="imagenet", num_classes=K)
    torch.testing.assert_close(model.features.denseblock1.denselayer1.norm1.weight,
                               sd["features.denseblock1.denselayer1.norm1.weight"], rtol=0, atol=0)


def test_imagenet_weights_wrong_arch(offline, monkeypatch):
    monkeypatch.setenv(imagenet.PRETRAINED_DIR_ENV, str(offline))
    torch.save(_torchvision_state_dict("squeezenet1_0"), offline / "squeezenet1_1.pth")
    with pytest.raises(ValueError, match="do not fit"):
        get_net("squeezenet1_1", "imagenet", pretrained="imagenet")
