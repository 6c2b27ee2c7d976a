"""What a plain install needs: package list, runtime dependencies, console scripts and the shipped recipes.

The wheel itself is built and installed in tests/test_wheel_install.py (slow); these checks read pyproject and
run the commands in-process, so a drift (a new subpackage, an undeclared import, a renamed command) fails fast.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from helpers import CONSOLE_SCRIPTS, REPO

from mmoe.cli import recipes
from mmoe.model import list_models
from mmoe.resources import config_root, list_recipes, recipe_path

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the checks are the same on every version

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _shipped_yaml() -> set[str]:
    return {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").glob("*/*.yaml")}


def test_package_list_names_every_package_and_the_config_folder() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    code = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mmoe").rglob("__init__.py")}
    kinds = {f"mmoe.configs.{p.name}" for p in (REPO / "configs").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert code <= listed, f"pyproject [tool.setuptools] packages misses {sorted(code - listed)}"
    assert listed == code | {"mmoe.configs"} | kinds
    assert setuptools["package-dir"] == {"mmoe.configs": "configs"}
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert {k: v for k, v in data.items() if k.startswith("mmoe.configs")} == {k: ["*.yaml"] for k in kinds}
    assert not (REPO / "mmoe" / "configs").exists(), "one copy of the YAMLs: configs/ only"


def test_every_third_party_import_of_the_package_is_a_runtime_dependency() -> None:
    declared = {_norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in PYPROJECT["project"]["dependencies"]}
    dists = metadata.packages_distributions()
    missing: dict[str, set[str]] = {}
    for path in sorted((REPO / "mmoe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("mmoe", "__future__"):
                    continue
                providers = {_norm(d) for d in dists.get(top, [])}
                if not providers & declared:
                    missing.setdefault(f"{top} (from {sorted(providers) or 'no installed distribution'})", set()).add(
                        str(path.relative_to(REPO))
                    )
    assert not missing, f"imported on a shipped code path but not in [project.dependencies]: {missing}"
    dev = {
        _norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
    assert not dev & declared, f"declared both as runtime and dev-only: {sorted(dev & declared)}"


def test_console_scripts_and_tool_wrappers() -> None:
    assert PYPROJECT["project"]["scripts"] == CONSOLE_SCRIPTS
    for command, target in CONSOLE_SCRIPTS.items():
        module_name, func = target.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, func)), target
        if module_name.startswith("mmoe.cli.") and command != "mmoe-recipes":
            wrapper = REPO / "tools" / f"{module_name.rsplit('.', 1)[1]}.py"
            assert f"from {module_name} import main" in wrapper.read_text(), f"{wrapper} is not a wrapper of {target}"


@pytest.mark.parametrize("command", [c for c in CONSOLE_SCRIPTS if c != "mmoe"])
def test_every_tool_answers_help_under_its_command_name(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module(CONSOLE_SCRIPTS[command].split(":")[0]).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command} ")


def test_configs_are_found_through_the_package() -> None:
    root = config_root()
    assert root.resolve() == (REPO / "configs").resolve()  # the editable install reads the repository's folder
    assert {f"{n}.yaml" for n in list_recipes()} == _shipped_yaml()
    assert list_models() == [n.split("/")[1] for n in list_recipes("model")]
    with pytest.raises(ValueError, match="'recipes' is not one of"):
        list_recipes("recipes")


def test_source_checkout_without_install_falls_back_to_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmoe.resources

    def not_installed(package: str) -> None:
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(mmoe.resources.resources, "files", not_installed)
    assert config_root() == REPO / "configs"


def test_recipe_names() -> None:
    want = REPO / "configs" / "pretrain" / "tiny_mhmoe.yaml"
    for spelling in ("pretrain/tiny_mhmoe", "pretrain/tiny_mhmoe.yaml", "configs/pretrain/tiny_mhmoe.yaml"):
        assert recipe_path(spelling).resolve() == want.resolve()
    assert recipe_path("imagenet_synthetic").name == "imagenet_synthetic.yaml"  # one kind has it
    with pytest.raises(KeyError, match="ambiguous: model/tiny_mhmoe, pretrain/tiny_mhmoe"):
        recipe_path("tiny_mhmoe")
    with pytest.raises(KeyError, match=r"unknown recipe 'pretrain/tiny_mhmo' \(closest: pretrain/tiny_mhmoe"):
        recipe_path("pretrain/tiny_mhmo")


def test_recipes_name_their_backbone_by_registered_size() -> None:
    """A path would break after a wheel install; a name resolves through the package from any directory."""
    for name in list_recipes("pretrain") + list_recipes("finetune"):
        recipe = yaml.safe_load(recipe_path(name).read_text())
        backbone = recipe["model"]["init_args"]["backbone"]
        assert backbone in list_models(), f"{name}: model.init_args.backbone {backbone!r} is not a registered size"


def test_recipes_list_show_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert recipes.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_recipes()
    assert any(re.fullmatch(r"pretrain/tiny_mhmoe +Tiny MH-MoE masked multimodal pretraining .*", x) for x in lines)
    assert recipes.main(["list", "finetune", "--paths"]) == 0
    paths = [Path(p) for p in capsys.readouterr().out.splitlines()]
    assert paths and all(p.is_file() and p.parent == config_root() / "finetune" for p in paths)
    assert recipes.main(["path", "configs/finetune/vqav2.yaml"]) == 0
    assert Path(capsys.readouterr().out.strip()) == config_root() / "finetune" / "vqav2.yaml"
    assert recipes.main(["show", "model/tiny"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "model" / "tiny.yaml").read_text()
    with pytest.raises(SystemExit) as done:
        recipes.main(["show", "model/tiny_mhmoee"])
    assert done.value.code == 2
    assert "unknown recipe 'model/tiny_mhmoee' (closest: model/tiny_mhmoe" in capsys.readouterr().err


def test_recipes_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = REPO / "configs" / "pretrain" / "tiny_mhmoe.yaml"
    assert recipes.main(["copy", "pretrain/tiny_mhmoe", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == src.read_bytes()
    assert capsys.readouterr().out.strip() == str(tmp_path / "mine.yaml")
    # into a folder (existing, or named with a trailing slash); several names at once
    assert recipes.main(["copy", "pretrain/tiny_mhmoe", "finetune/vqav2_synthetic", str(tmp_path / "new") + "/"]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["tiny_mhmoe.yaml", "vqav2_synthetic.yaml"]
    # a different file in the way is kept unless --force; an identical one is fine
    (tmp_path / "mine.yaml").write_text("# my edits\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        recipes.main(["copy", "pretrain/tiny_mhmoe", str(tmp_path / "mine.yaml")])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'mine.yaml'} already exists with other content; pass --force" in err
    assert (tmp_path / "mine.yaml").read_text() == "# my edits\n"
    assert recipes.main(["copy", "--force", "pretrain/tiny_mhmoe", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == src.read_bytes()
    assert recipes.main(["copy", "pretrain/tiny_mhmoe", str(tmp_path / "mine.yaml")]) == 0
    # two names landing on one file
    with pytest.raises(SystemExit) as done:
        recipes.main(["copy", "model/tiny_mhmoe", "pretrain/tiny_mhmoe", str(tmp_path / "both")])
    assert done.value.code == 1 and "several recipes would be written to" in capsys.readouterr().err
    # --all: the repository layout, so the README's `--config configs/...` paths work as written
    assert recipes.main(["copy", "--all", str(tmp_path / "configs")]) == 0
    copied = {p.relative_to(tmp_path / "configs").as_posix() for p in (tmp_path / "configs").rglob("*.yaml")}
    assert copied == _shipped_yaml()
    assert all((tmp_path / "configs" / r).read_bytes() == (REPO / "configs" / r).read_bytes() for r in copied)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        recipes.main(["copy", "--all", "model/tiny", str(tmp_path / "x")])
    assert done.value.code == 1 and "copy --all takes no recipe names" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # DEST is a file: an error line naming it, not a traceback
        recipes.main(["copy", "--all", str(tmp_path / "mine.yaml")])
    assert done.value.code == 1 and str(tmp_path / "mine.yaml") in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        recipes.main(["copy", "pretrain/tiny_mhmoe"])  # the one positional is DEST
    assert done.value.code == 1 and "give recipe NAME(s) and then DEST" in capsys.readouterr().err
