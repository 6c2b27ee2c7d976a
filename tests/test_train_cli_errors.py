"""A refused configuration ends in one line naming the cause; the full traceback only on request.

Through a subprocess, as a user runs ``mmoe``: the output is short, its last line is ``mmoe: error: <cause>``, the
exit status is 2; ``--traceback`` or ``MMOE_TRACEBACK=1`` brings back Python's traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONFIGS

from mmoe.train.cli import ConfigError, config_error_cause

RECIPE = CONFIGS / "pretrain" / "tiny_mhmoe.yaml"


def _mmoe(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mmoe.train.cli", "fit", f"--config={RECIPE}"]
    cmd += [f"--trainer.default_root_dir={tmp_path / 'run'}", *extra]
    run_env = {k: v for k, v in os.environ.items() if k != "MMOE_TRACEBACK"}
    run_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize(
    ("override", "cause", "names"),
    [
        (
            "--model.init_args.optim.lr=-1.0",
            "mmoe: error: mmoe.train.optim: argument optim.lr=-1.0 must be a finite",
            "optim.lr=-1.0",
        ),
        ("--model.init_args.backbone=nope", "mmoe: error: create_model: unknown model 'nope'", "nope"),
        # jsonargparse's wording differs between releases ("Option ... is not accepted", "Key ... is not expected")
        ("--model.init_args.no_such_key=1", "mmoe: error: model: ", "'no_such_key'"),
    ],
)
def test_refused_config_ends_in_one_line(tmp_path: Path, override: str, cause: str, names: str) -> None:
    proc = _mmoe(tmp_path, override)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(cause) and names in last, proc.stderr[-2000:]
    assert len(lines) < 10, "\n".join(lines)
    assert "Traceback" not in proc.stderr and "--traceback" in proc.stderr  # says how to get the traceback
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_traceback_on_request(tmp_path: Path, how: str) -> None:
    extra = ("--traceback",) if how == "flag" else ()
    env = {"MMOE_TRACEBACK": "1"} if how == "env" else None
    proc = _mmoe(tmp_path, "--model.init_args.optim.lr=-1.0", *extra, env=env)
    assert proc.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in proc.stderr
    assert "mmoe.train.optim: argument optim.lr=-1.0 must be" in proc.stderr  # the original error's message
    assert "ConfigError" in proc.stderr.strip().splitlines()[-1]


def test_cause_names_the_key_path_of_a_nested_parse_error() -> None:
    """jsonargparse's nested report: the keys along the way, then the innermost message."""
    inner = TypeError("Expected a <class 'float'>. Got value: fast")
    mid = ValueError('Parser key "optim":\n  Does not validate against any of the Union subtypes\n  Parser key "lr":')
    mid.__cause__ = inner
    outer = ValueError('Parser key "model":\n  Does not validate against any of the Union subtypes')
    outer.__cause__ = mid
    assert config_error_cause(outer) == "model.optim.lr: Expected a <class 'float'>. Got value: fast"
    assert config_error_cause(KeyError("create_model: unknown model 'x'")) == "create_model: unknown model 'x'"
    assert str(ConfigError("a: b")) == "a: b"
    # the reason inside the report's frame, whichever exception of the chain carries it (releases differ)
    report = ValueError(
        "Does not validate against any of the Union subtypes\nSubtypes: [<class 'NoneType'>, <class 'X'>]\n"
        "Errors:\n  - Expected a <class 'NoneType'>\n  - \"create_model: unknown model 'nope'\"\n"
        "Given value type: <class 'Namespace'>\nGiven value: Namespace(backbone='nope')"
    )
    report.__cause__ = ValueError("Expected a <class 'NoneType'>. Got value: Namespace(backbone='nope')")
    assert config_error_cause(report) == "create_model: unknown model 'nope'"
