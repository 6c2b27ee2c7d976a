"""``mmoe-recipes``: the model sizes and training recipes shipped inside the package.

After ``pip install mmoe`` there is no ``configs/`` folder to point ``--config`` at; the YAML files are package
data (``mmoe.resources``). This command lists them and gets them out::

    mmoe-recipes list                                # every shipped file, with its header line
    mmoe-recipes list pretrain                       # one kind: model, pretrain or finetune
    mmoe-recipes show finetune/imagenet_synthetic    # print a recipe
    mmoe-recipes path pretrain/tiny_mhmoe            # where the installed file is
    mmoe-recipes copy pretrain/tiny_mhmoe my.yaml    # a copy to edit (DEST: a file, or a folder)
    mmoe-recipes copy --all configs                  # configs/{model,pretrain,finetune}/ as in the repository

    mmoe fit --config "$(mmoe-recipes path pretrain/tiny_mhmoe)"

Names are ``KIND/STEM``; ``configs/pretrain/tiny_mhmoe.yaml`` (as the README writes it) means the same, and a bare
stem is enough when only one kind has it. Recipes name their backbone by model size (``backbone: tiny_mhmoe``),
which resolves through the package too, so a copied recipe runs from any directory. ``copy`` never replaces a
different existing file unless given ``--force``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from mmoe.resources import RECIPE_KINDS, config_root, list_recipes, recipe_path

__all__ = ["copy_recipes", "describe", "main"]


def describe(path: Path) -> str:
    """The first comment line of a YAML file: every shipped file opens with one saying what it is."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            break
    return ""


def copy_recipes(names: Sequence[str], dest: str | Path, *, all_files: bool = False, force: bool = False) -> list[Path]:
    """Copy shipped files to ``dest`` and return the files written (or already identical there).

    One name and a ``dest`` that is neither an existing folder nor ends with ``/`` is a file path; otherwise
    ``dest`` is a folder receiving ``STEM.yaml`` per name, or ``KIND/STEM.yaml`` for every file with
    ``all_files``. Raises ``KeyError`` for an unknown name, ``FileExistsError`` when a different file is in the
    way (unless ``force``) or two names would land on the same file.
    """
    dest_text = str(dest)
    dest = Path(dest)
    if all_files:
        if names:
            raise ValueError("copy --all takes no recipe names, only DEST")
        pairs = [(config_root() / f"{name}.yaml", dest / f"{name}.yaml") for name in list_recipes()]
    else:
        if not names:
            raise ValueError("copy: give recipe NAME(s) and then DEST (or --all DEST)")
        sources = [recipe_path(name) for name in names]
        as_folder = len(sources) > 1 or dest.is_dir() or dest_text.endswith(("/", "\\"))
        pairs = [(src, dest / src.name if as_folder else dest) for src in sources]
        targets = [t for _, t in pairs]
        clash = sorted({str(t) for t in targets if targets.count(t) > 1})
        if clash:
            raise FileExistsError(f"copy: several recipes would be written to {', '.join(clash)}; copy them one by one")
    blocked = [t for s, t in pairs if t.exists() and (t.is_dir() or t.read_bytes() != s.read_bytes())]
    if blocked and not force:
        shown = ", ".join(str(t) for t in blocked[:5]) + (" ..." if len(blocked) > 5 else "")
        verb = "exists" if len(blocked) == 1 else "exist"
        raise FileExistsError(f"copy: {shown} already {verb} with other content; pass --force to replace")
    for src, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return [t for _, t in pairs]


def build_parser() -> argparse.ArgumentParser:
    """The ``mmoe-recipes`` argument parser (one subcommand per action)."""
    p = argparse.ArgumentParser(
        prog="mmoe-recipes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,show,path,copy}")
    ls = sub.add_parser("list", help="shipped files, with their header line")
    ls.add_argument("kind", nargs="?", choices=RECIPE_KINDS, help="only this kind")
    ls.add_argument("--paths", action="store_true", help="print installed file paths instead of names")
    show = sub.add_parser("show", help="print a recipe's YAML")
    show.add_argument("name", help="KIND/STEM, e.g. pretrain/tiny_mhmoe")
    path = sub.add_parser("path", help="print the installed path of a recipe (for --config)")
    path.add_argument("name", help="KIND/STEM, e.g. pretrain/tiny_mhmoe")
    cp = sub.add_parser("copy", help="copy recipes to a file or folder")
    cp.add_argument("names", nargs="*", metavar="NAME", help="KIND/STEM (one or more; none with --all)")
    cp.add_argument("dest", metavar="DEST", help="target file (one NAME) or folder")
    cp.add_argument("--all", dest="all_files", action="store_true", help="every file, as DEST/KIND/STEM.yaml")
    cp.add_argument("--force", action="store_true", help="replace existing files with other content")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmoe-recipes`` console script; 0 on success, 1 for a refused copy, 2 for bad names."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            names = list_recipes(args.kind)
            width = max((len(n) for n in names), default=0)
            for name in names:
                file = config_root() / f"{name}.yaml"
                print(file if args.paths else f"{name:<{width}}  {describe(file)}")
        elif args.action == "show":
            sys.stdout.write(recipe_path(args.name).read_text(encoding="utf-8"))
        elif args.action == "path":
            print(recipe_path(args.name))
        else:
            for target in copy_recipes(args.names, args.dest, all_files=args.all_files, force=args.force):
                print(target)
    except KeyError as err:
        parser.exit(2, f"mmoe-recipes: {err.args[0]}\n")
    except (OSError, ValueError) as err:  # a file in the way, an unwritable DEST, names with --all
        parser.exit(1, f"mmoe-recipes: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
