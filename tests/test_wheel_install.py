"""`pip install` works, not only `pip install -e`: build the wheel, install it elsewhere, use it from elsewhere.

The wheel is built offline from a copy of the sources (no build isolation: the test environment's setuptools)
and installed with ``pip install --no-deps --target DIR``; the test environment's packages supply the
dependencies. Every check then runs in a subprocess with ``PYTHONPATH=DIR`` and a working directory outside the
repository, so only the installed copy can answer: model sizes by name, the shipped recipes (copied out with
``mmoe-recipes``), and one training step of a shipped recipe on data written by ``mmoe-synthetic``. Console
scripts are not on PATH with ``--target``; they run as ``python -m`` and their entry points are checked in the
wheel's metadata.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from helpers import CONSOLE_SCRIPTS, REPO

pytestmark = pytest.mark.slow


def _pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the --target folder it is installed into)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building offline needs setuptools >= 77 (pyproject [build-system]); {setuptools.__version__}")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # a copy, so the build writes no build/ or egg-info into the working tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("mmoe", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(work / "dist"), str(src), cwd=work)
    (wheel,) = (work / "dist").glob("mmoe-*.whl")
    target = work / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=work)
    return wheel, target


def _run(args: list[str], *, site: Path, cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_wheel_carries_the_configs_and_the_commands(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = zf.read(info).decode()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {f"mmoe/configs/{p.relative_to(REPO / 'configs').as_posix()}" for p in REPO.glob("configs/*/*.yaml")}
    assert len(shipped) > 20 and shipped <= names, sorted(shipped - names)
    assert "mmoe/configs/__init__.py" in names and "mmoe/cli/recipes.py" in names
    assert {"mmoe/viz/viewer.js", "mmoe/viz/viewer.css"} <= names  # mmoe-viz --html inlines them
    assert "mmoe/data/grounded_words.json" in names  # pair_mask_words: default
    assert not any(n.startswith(("tests/", "tools/", "configs/", "datasets/")) for n in names)
    scripts = entry_points.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    assert {k.strip(): v.strip() for k, v in (x.split("=") for x in scripts.strip().splitlines())} == CONSOLE_SCRIPTS
    runtime = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    requires = {re.match(r"Requires-Dist: *([A-Za-z0-9._-]+)", line).group(1).lower() for line in runtime}
    assert {"pycocoevalcap", "sentencepiece", "scipy", "torch", "lightning"} <= requires
    assert "License-Expression: MIT" in meta


def test_installed_copy_works_from_another_directory(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    check = textwrap.dedent(
        f"""
        from pathlib import Path
        import mmoe
        from mmoe.model import create_model, list_models
        from mmoe.resources import config_root
        site = Path({str(site)!r}).resolve()
        assert Path(mmoe.__file__).resolve().is_relative_to(site), mmoe.__file__
        assert config_root().resolve() == site / "mmoe" / "configs", config_root()
        names = list_models()
        assert "tiny_mhmoe" in names and "base_mhmoe" in names, names
        model = create_model("tiny_mhmoe")
        assert model.config.moe is not None and model.config.moe.num_heads == 4
        assert sum(p.numel() for p in model.parameters()) > 0
        print("ok", len(names))
        """
    )
    assert _run(["-c", check], site=site, cwd=work).startswith("ok ")
    listing = _run(["-m", "mmoe.cli.recipes", "list", "pretrain"], site=site, cwd=work)
    assert "pretrain/tiny_mhmoe " in listing
    assert _run(["-m", "mmoe.cli.recipes", "copy", "pretrain/tiny_mhmoe", "tiny.yaml"], site=site, cwd=work)
    # the recipe's own data paths (data/shapes/shards/...), written by mmoe-synthetic in this directory
    _run(["-m", "mmoe.cli.make_synthetic", "--out", "data/shapes", "--num-train", "8", "--num-val", "4",
          "--shards", "--shard-maxcount", "8"], site=site, cwd=work)  # fmt: skip
    _run(["-m", "mmoe.train.cli", "fit", "--config", "tiny.yaml", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--trainer.default_root_dir=run", "--data.init_args.batch_size=3",
          "--data.init_args.num_workers=0", "--data.init_args.shuffle_buffer=4"], site=site, cwd=work)  # fmt: skip
    assert (work / "run" / "checkpoints" / "last.ckpt").is_file()
    assert "backbone: tiny_mhmoe" in (work / "run" / "version_0" / "config.yaml").read_text()
