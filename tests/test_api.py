"""The top-level API (``import ppoison_ext as pp``) and the pure-PyTorch fallback without ``_C``."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ppoison_ext as pp
from ppoison_ext.testing import tol


def test_every_public_name_resolves():
    assert set(pp.__all__) <= set(dir(pp))
    missing = []
    for name in pp.__all__:
        try:
            getattr(pp, name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name}: {err}")
    assert not missing, missing
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pp.nope  # noqa: B018


def test_import_is_lazy():
    code = ("import sys, ppoison_ext; "
            "print(sorted(m for m in ('torch', 'torchvision', 'fastapi', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_native_info_keys():
    info = pp.native_info()
    assert set(info) >= {"native", "reason", "cuda", "cuda_version", "torch", "torch_cuda"}
    assert info["native"] is pp.HAS_OPS


def _mad_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    x = torch.randn(16, 6, dtype=torch.float32)
    return model, x


_CHILD = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class HideNative(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ppoison_ext._C":
                raise ImportError("hidden by the test")
            return None

    sys.meta_path.insert(0, HideNative())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import ppoison_ext as pp
        assert pp.HAS_OPS is False, pp.native_info()
        info = pp.native_info()
        assert info["native"] is False and "hidden by the test" in info["reason"], info
        sys.path.insert(0, sys.argv[2])
        from test_api import _mad_case
        model, x = _mad_case()
        outputs = {eps: pp.MAD(model, epsilon=eps, oracle=oracle)(x)
                   for eps, oracle in ((0.5, "extreme"), (1.0, "argmax"))}
        outputs["projection"] = pp.ops.project_simplex(x, 1.0)
    ours = [w for w in caught if "ppoison_ext" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "pip install --no-build-isolation -e ." in str(ours[0].message)
    assert "hidden by the test" in str(ours[0].message)
    torch.save(outputs, sys.argv[1])
""")


@pytest.mark.skipif(not pp.HAS_OPS, reason="compares the fallback with the native kernels")
def test_fallback_without_native_matches(tmp_path):
    out = tmp_path / "fallback.pt"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(Path(__file__).parent)],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fallback = torch.load(out)
    model, x = _mad_case()
    for eps, oracle in ((0.5, "extreme"), (1.0, "argmax")):
        torch.testing.assert_close(fallback[eps], pp.MAD(model, epsilon=eps, oracle=oracle)(x),
                                   **tol(torch.float32, 10))
    torch.testing.assert_close(fallback["projection"], pp.ops.project_simplex(x, 1.0), **tol(torch.float32))


def test_no_native_env_switch():
    code = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ppoison_ext as pp
            assert pp.HAS_OPS is False
            import torch
            y = pp.ops.mad_step(torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.0, 0.0, 1.0]]), 0.2)
        assert len([w for w in caught if "PPOISON_NO_NATIVE" in str(w.message)]) == 1
        print(y.sum().item())
    """)
    env = dict(os.environ, PPOISON_NO_NATIVE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert abs(float(proc.stdout) - 1.0) < 1e-6


@pytest.mark.parametrize("error", [
    "/x/_C.abi3.so: undefined symbol: _ZN3c106detail14torchCheckFailEPKcS2_jRKSs",
    "libc10_cuda.so: cannot open shared object file: No such file or directory",
])
def test_mismatch_warning_says_rebuild(error):
    # A _C built for another torch (or a CUDA torch in a CPU one): the one warning names the loader's
    # error and the rebuild command, and native_info() gives the same reason.
    code = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class Mismatch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "ppoison_ext._C":
                    raise ImportError(sys.argv[1])

        sys.meta_path.insert(0, Mismatch())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ppoison_ext as pp
            assert pp.HAS_OPS is False
            reason = pp.native_info()["reason"]
        ours = [str(w.message) for w in caught if "ppoison_ext" in str(w.message)]
        assert len(ours) == 1, ours
        print(ours[0])
        print(reason)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PPOISON_NO_NATIVE"}
    proc = subprocess.run([sys.executable, "-c", code, error], capture_output=True, text=True, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, reason = proc.stdout.splitlines()
    hint = "built for another torch or platform: rebuild with `pip install --no-build-isolation .`"
    for text in (message, reason):
        assert error in text and hint in text, text
    assert "-e ." not in message
