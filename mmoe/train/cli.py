"""The ``mmoe`` console script: Lightning's ``LightningCLI`` in subclass mode (issue 5, docs/interfaces.md section 5).

``mmoe fit --config configs/pretrain/tiny_mhmoe.yaml`` (also ``validate``, ``test``, ``predict``). Any of our
LightningModules / LightningDataModules is picked by ``class_path`` in YAML and its constructor signature is
the schema, so a misspelt or mistyped key is refused by jsonargparse before anything is built, naming the key;
value checks in the constructors (``__post_init__`` of config dataclasses) run before the Trainer starts.

Run folder (``trainer.default_root_dir``, default ``runs/mmoe``)::

    <root>/checkpoints/     step0000100.ckpt ..., last.ckpt   (written atomically, see AtomicCheckpointIO)
    <root>/version_N/       config.yaml (the resolved config), metrics.csv, TensorBoard events, hparams.yaml

``--ckpt_path last`` resumes from ``<root>/checkpoints/last.ckpt``; the resumed run logs into a new
``version_N``. Defaults added here: TensorBoard + CSV loggers (when ``trainer.logger`` is left unset),
a ModelCheckpoint configurable as ``checkpoint.*`` (every ``checkpoint.every_n_train_steps`` steps, plus
``last.ckpt``), LearningRateMonitor, StepTimer (step time, samples/s), RNGState (exact resume), and a rich
progress bar on a TTY or a plain one-line-per-N-steps log otherwise.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mmoe.train.callbacks import AtomicCheckpointIO, PlainProgress, RNGState, StepTimer

__all__ = ["MMoECLI", "build_cli", "main", "next_version"]

DEFAULT_ROOT = "runs/mmoe"


def next_version(root: str | os.PathLike[str]) -> int:
    """First unused ``version_N`` under ``root`` (TensorBoard and CSV must agree on it, so it is chosen once)."""
    root = Path(root)
    taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(taken, default=-1) + 1


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class MMoECLI(LightningCLI):
    """LightningCLI with mmoe's run-folder layout and default callbacks (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--progress_every",
            type=int,
            default=10,
            help="Steps between lines of the plain progress log (used when stdout is not a TTY).",
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        root = config.get("default_root_dir") or DEFAULT_ROOT
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            version = f"version_{next_version(root)}"
            config["logger"] = [
                TensorBoardLogger(save_dir=root, name="", version=version, default_hp_metric=False),
                CSVLogger(save_dir=root, name="", version=version),
            ]
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.realpath(os.path.join(root, "checkpoints"))
        extra: list[Callback] = [StepTimer(), RNGState()]
        if config.get("logger") not in (False, None, []):
            extra.append(LearningRateMonitor(logging_interval="step"))
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, RichProgressBar | PlainProgress) for c in (config.get("callbacks") or [])
        ):
            every = int(self._get(self.config, "progress_every") or 10)
            extra.append(RichProgressBar() if _stdout_is_tty() else PlainProgress(every_n_steps=every))
        callbacks = list(callbacks) + extra
        plugins = config.get("plugins")
        plugin_list = [] if plugins is None else (list(plugins) if isinstance(plugins, list | tuple) else [plugins])
        if not any(isinstance(p, AtomicCheckpointIO) or type(p).__name__.endswith("CheckpointIO") for p in plugin_list):
            plugin_list.append(AtomicCheckpointIO())
        config["plugins"] = plugin_list
        return super()._instantiate_trainer(config, callbacks)


class _DropAdvert(logging.Filter):
    """Drops Lightning's "try litlogger" tip, which every run would otherwise print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_known_noise() -> None:
    # SaveConfigCallback writes config.yaml into version_N before the CSV logger creates it: harmless.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvert())


def build_cli(args: list[str] | None = None, *, run: bool = True) -> MMoECLI:
    """Parse ``args`` (``sys.argv[1:]`` when None) and, when ``run``, execute the subcommand; returns the CLI."""
    _quiet_known_noise()
    return MMoECLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": DEFAULT_ROOT},
        seed_everything_default=0,
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mmoe`` console script (pyproject ``[project.scripts]``); exit status 0 on success."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
