"""The ``mmoe`` console script: Lightning's ``LightningCLI`` in subclass mode (docs/interfaces.md section 5).

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
``last.ckpt``), LearningRateMonitor, StepTimer (step time), Throughput (Lightning's ThroughputMonitor: samples/s,
FLOP/s, MFU where the device's peak is known), RNGState (exact resume), and a rich progress bar on a TTY or a plain
one-line-per-N-steps log otherwise.

A configuration that is refused before training (an unknown or mistyped key, a value that a constructor rejects,
such as ``create_model: unknown model ...`` or ``optim.lr=-1.0 must be ...``) ends with one line,
``mmoe: error: <key>: <cause>``, and exit status 2, instead of jsonargparse's nested report and Python's chained
tracebacks (80-110 lines, the cause in the middle). ``--traceback`` (anywhere on the command line) or
``MMOE_TRACEBACK=1`` shows the full traceback instead. Errors raised once training runs are not touched.

Configs and checkpoints written before ``mmoe.train`` moved to one file per task and dataset still load: the
class paths and data-module argument names of ``--config`` files (a run's saved ``config.yaml`` too), of
``--model``/``--data`` values and of the hyper-parameters read from ``--ckpt_path`` are mapped to the current
ones (:mod:`mmoe.train.compat`; ``mmoe-migrate`` rewrites the files for good).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mmoe.train.callbacks import AtomicCheckpointIO, PlainProgress, RNGState, StepTimer, Throughput
from mmoe.train.compat import migrate_class_path, migrate_config, migrate_hparams

__all__ = ["ConfigError", "MMoECLI", "build_cli", "main", "migrate_args", "next_version"]

DEFAULT_ROOT = "runs/mmoe"
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "MMOE_TRACEBACK"


class ConfigError(Exception):
    """A configuration refused before training; ``str()`` is the one-line cause (the original is ``__cause__``)."""


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return out


_REPORT_LINES = re.compile(
    r"""^(Parser key ".*":|Does not validate against any of the Union subtypes.*|Subtypes: .*|Errors:|"""
    r"""Expected a <class 'NoneType'>.*|Given value( type)?: .*|Problem with given class_path .*:)$"""
)


def config_error_cause(err: BaseException) -> str:
    """One line naming what was refused: the key path jsonargparse reports, then the reason.

    jsonargparse nests the reason inside "Does not validate against any of the Union subtypes" reports (one level
    per class_path, each with the ``None`` alternative that also failed) and chains the exceptions; how deep the
    reason's own exception sits in the chain differs between releases, so the reason is read from the text: the
    first line of the chain, outermost first, that is not part of that report's frame.
    """
    chain = _chain(err)
    cause = ""
    for e in chain:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        for line in str(text).splitlines():
            line = line.strip().removeprefix("- ").strip()
            if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'":
                line = line[1:-1]  # a KeyError's message, quoted by str()
            line = line.removeprefix("Validation failed: ")
            if line and not _REPORT_LINES.match(line):
                cause = line
                break
        if cause:
            break
    cause = cause or type(chain[-1]).__name__
    keys: list[str] = []
    for e in chain:
        for key in re.findall(r'Parser key "([^"]+)"', str(e)):
            if key not in keys:
                keys.append(key)
    path = ".".join(keys)
    return f"{path}: {cause}" if path and path not in cause else cause


def next_version(root: str | os.PathLike[str]) -> int:
    """First unused ``version_N`` under ``root`` (TensorBoard and CSV must agree on it, so it is chosen once)."""
    root = Path(root)
    taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(taken, default=-1) + 1


def cpu_bf16_warning(precision: object, accelerator: object, *, cuda: bool | None = None) -> str | None:
    """A warning when ``trainer.precision`` asks for bf16 on a CPU that has no bf16 matrix instructions.

    Why: oneDNN's bf16 GEMM and convolution need avx512_bf16 or AMX; without them torch falls back to a scalar
    path. Measured on a 2-core AVX2 machine: a 2048^3 bf16 matmul 360x slower than fp32, a tiny-model step 1.7-11x
    slower (docs/results/learning.md). The recipes that say ``bf16-mixed`` are written for GPUs and such CPUs.
    """
    if "bf16" not in str(precision):
        return None
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    runs_on_cpu = str(accelerator) == "cpu" or (str(accelerator) in ("auto", "None") and not on_gpu)
    if not runs_on_cpu:
        return None
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (
        f"trainer.precision={precision!s} on a CPU without bf16 matrix instructions (no avx512_bf16/AMX): torch's "
        "fallback is many times slower than fp32 here; pass --trainer.precision 32-true"
    )


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


_CLASS_KEYS = ("--model", "--data", "--model.class_path", "--data.class_path")


def _migrated_config_arg(value: str) -> str:
    """A ``--config`` value: a file naming old class paths becomes the migrated YAML text (jsonargparse reads both)."""
    path = Path(value)
    if not path.is_file():
        return value
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    new = migrate_config(data)
    return value if new == data else yaml.safe_dump(new, sort_keys=False)


def migrate_args(argv: list[str]) -> list[str]:
    """Command-line arguments with old class paths mapped (``--config`` files, ``--model``/``--data`` values)."""
    out: list[str] = []
    pending: str | None = None  # the option whose value is the next argument
    for arg in argv:
        if pending is not None:
            out.append(_migrated_config_arg(arg) if pending == "--config" else migrate_class_path(arg))
            pending = None
            continue
        key, eq, value = arg.partition("=")
        key = "--config" if key == "-c" else key
        if key == "--config" or key in _CLASS_KEYS:
            if not eq:
                out.append(arg)
                pending = key
                continue
            value = _migrated_config_arg(value) if key == "--config" else migrate_class_path(value)
            arg = f"{arg.partition('=')[0]}={value}"
        out.append(arg)
    return out


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

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as Lightning does; a refused key or value becomes a :class:`ConfigError` (see ``main``)."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(config_error_cause(err)) from err

    def _parse_ckpt_path(self) -> None:
        """Lightning's re-parse of the checkpoint's module hyper-parameters, with old class paths mapped first."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = migrate_hparams(ckpt.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except ArgumentError as err:
            raise ConfigError(f"--ckpt_path {ckpt_path}: {config_error_cause(err)}") from err

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a constructor's refusal becomes a :class:`ConfigError` (see ``main``)."""
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - any refusal here happens before training; main() reports it
            raise ConfigError(config_error_cause(err)) from err

    def _subcommand_config(self, config: Any) -> Any:
        """The part of a (parsed or instantiated) config that belongs to the running subcommand."""
        return config.get(str(self.subcommand), config) if self.subcommand else config

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with our run folder, loggers, callbacks and checkpoint I/O (public LightningCLI hook)."""
        init = self._subcommand_config(self.config_init)
        trainer_cfg = {**(init.get("trainer") or {}), **kwargs}
        root = trainer_cfg.get("default_root_dir") or DEFAULT_ROOT
        out: dict[str, Any] = {"default_root_dir": root}
        if trainer_cfg.get("logger") in (None, True):
            version = f"version_{next_version(root)}"
            out["logger"] = [
                TensorBoardLogger(save_dir=root, name="", version=version, default_hp_metric=False),
                CSVLogger(save_dir=root, name="", version=version),
            ]
        checkpoint = init.get("checkpoint")
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is None:
            checkpoint.dirpath = os.path.realpath(os.path.join(root, "checkpoints"))
        given = trainer_cfg.get("callbacks")
        callbacks: list[Callback] = [] if given is None else (list(given) if isinstance(given, list) else [given])
        callbacks += [StepTimer(), RNGState()]
        if not any(isinstance(c, ThroughputMonitor) for c in callbacks):
            callbacks.append(Throughput())
        if out.get("logger", trainer_cfg.get("logger")) not in (False, None, []):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if trainer_cfg.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, RichProgressBar | PlainProgress) for c in callbacks
        ):
            every = int(self._subcommand_config(self.config).get("progress_every") or 10)
            callbacks.append(RichProgressBar() if _stdout_is_tty() else PlainProgress(every_n_steps=every))
        out["callbacks"] = callbacks
        plugins = trainer_cfg.get("plugins")
        plugin_list = [] if plugins is None else (list(plugins) if isinstance(plugins, list | tuple) else [plugins])
        if not any(isinstance(p, AtomicCheckpointIO) or type(p).__name__.endswith("CheckpointIO") for p in plugin_list):
            plugin_list.append(AtomicCheckpointIO())
        out["plugins"] = plugin_list
        slow_bf16 = cpu_bf16_warning(trainer_cfg.get("precision"), trainer_cfg.get("accelerator", "auto"))
        if slow_bf16 is not None:
            warnings.warn(slow_bf16, stacklevel=2)
        return super().instantiate_trainer(**{**kwargs, **out})


class _DropAdvert(logging.Filter):
    """Drops Lightning's "try litlogger" tip, which every run would otherwise print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_known_noise() -> None:
    # SaveConfigCallback writes config.yaml into version_N before the CSV logger creates it: harmless.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvert())


def build_cli(args: list[str] | None = None, *, run: bool = True) -> MMoECLI:
    """Parse ``args`` (``sys.argv[1:]`` when None) and, when ``run``, execute the subcommand; returns the CLI.

    A configuration refused before training raises :class:`ConfigError` (``main`` prints it in one line).
    """
    _quiet_known_noise()
    if args is None:  # Lightning reads sys.argv itself (and warns when both are given)
        sys.argv[1:] = migrate_args(sys.argv[1:])
    else:
        args = migrate_args(list(args))
    return MMoECLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": DEFAULT_ROOT},
        seed_everything_default=0,
        # parse errors raise (and become ConfigError) instead of printing the whole usage and exiting
        parser_kwargs={"parser_mode": "yaml", "exit_on_error": False},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mmoe`` console script (pyproject ``[project.scripts]``); exit status 0 on success.

    A refused configuration prints ``mmoe: error: <cause>`` as the last line of stderr and exits with status 2;
    with ``--traceback`` or ``MMOE_TRACEBACK=1`` the exception propagates with its full traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    show_traceback = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").lower() not in ("", "0", "false")
    if TRACEBACK_FLAG in argv:
        argv = [a for a in argv if a != TRACEBACK_FLAG]
        if args is None:  # Lightning reads sys.argv itself when args is None (and warns when both are given)
            sys.argv[1:] = argv
    try:
        build_cli(None if args is None else argv)
    except ConfigError as err:
        if show_traceback:
            raise
        sys.stdout.flush()
        print(
            f"mmoe: the configuration was refused before training (full traceback: {TRACEBACK_FLAG} or "
            f"{TRACEBACK_ENV}=1; options: mmoe SUBCOMMAND --help)",
            file=sys.stderr,
        )
        print(f"mmoe: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
