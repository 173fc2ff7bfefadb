"""The `ppoison` command and `python -m ppoison_ext.pipeline.<step>`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppoison_ext import __version__, cli

REPO = Path(__file__).resolve().parents[1]
OURS = {"train-victim": ["DS_NAME", "MODEL_ARCH", "--train_subset", "--data-root", "--seed", "--no-progress"],
        "train-attacker": ["--budgets", "--argmaxed", "--optimizer_choice", "--data-root", "--seed"],
        "eval-bbox": ["VIC_DIR", "DEFENSE_ARGS", "--out_dir", "--batch_size", "--data-root", "--seed"],
        "jacobian": ["--model_adv", "--queryset", "--testset", "--kappa", "--orig_aliasing",
                     "--orig_jbself_store", "--orig_clamp", "--orig_topk_cap", "--data-root", "--seed",
                     "--no-progress"],
        "transfer": ["PI", "--out_dir", "--queryset", "--no-resume", "--merge-shards", "--data-root",
                     "--seed", "--no-progress"]}
STEPS = {"ppoison_ext.pipeline.victim": "DS_NAME", "ppoison_ext.pipeline.attacker": "--budgets",
         "ppoison_ext.pipeline.evaluate": "DEFENSE_ARGS", "ppoison_ext.pipeline.jacobian": "--orig_aliasing",
         "ppoison_ext.pipeline.transfer": "--out_dir"}


def _exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 0


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("sub", sorted(OURS))
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"ppoison {sub}" in out
    for flag in OURS[sub]:
        assert flag in out, flag


def test_help_subcommand_alias(capsys):
    with pytest.raises(SystemExit):
        cli.main(["help", "eval-bbox"])
    assert "--out_dir" in capsys.readouterr().out


def test_transfer_and_demo_are_lazy(capsys):
    for sub in ("transfer", "demo"):
        module = cli.SUBCOMMANDS[sub][0]
        if _exists(module):
            with pytest.raises(SystemExit) as e:
                cli.main([sub, "--help"])
            assert e.value.code == 0
        else:
            assert cli.main([sub, "--help"]) == 2
            assert "not available" in capsys.readouterr().err


def test_unknown_subcommand_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-vctim"])
    assert e.value.code == 2
    assert "unknown subcommand" in capsys.readouterr().err
    assert cli.main(["train-victim", "NoSuchSet", "lenet", "-o", str(tmp_path), "-d", "-1"]) == 2


_RUN_MODULES = """
import contextlib, io, runpy, sys
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # python -m <module>
        except SystemExit as e:
            assert e.code == 0, (module, e.code)
    print("=== " + module)
    print(buf.getvalue())
sys.argv = ["ppoison", "--version"]
try:
    runpy.run_module("ppoison_ext.cli", run_name="__main__", alter_sys=True)  # python -m ppoison_ext.cli
except SystemExit as e:
    assert e.code == 0, e.code
"""


def test_step_modules_run_with_python_m():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # python -m finds the checkout from the working directory
    modules = [m for m in STEPS if _exists(m)]
    # one real `python -m ppoison_ext.pipeline.victim --help`; the others run as __main__ in one
    # interpreter (saves a torch import per module on slow machines)
    first = subprocess.Popen([sys.executable, "-m", modules[0], "--help"], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rest = subprocess.Popen([sys.executable, "-c", _RUN_MODULES] + modules[1:],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out0, err0 = first.communicate(timeout=180)
    out1, err1 = rest.communicate(timeout=180)
    assert first.returncode == 0, err0[-2000:]
    assert rest.returncode == 0, err1[-2000:]
    assert f"python -m {modules[0]}" in out0 and STEPS[modules[0]] in out0
    sections = {chunk.split("\n", 1)[0].strip(): chunk for chunk in out1.split("=== ")[1:]}
    for module in modules[1:]:
        text = sections[module]
        assert STEPS[module] in text, module
        assert f"python -m {module}" in text, module
    assert out1.rstrip().endswith(__version__)

