"""The ``lightning-ext`` command: a LightningCLI in subclass mode, plus ``list``, ``search`` and ``federate``.

``lightning-ext fit|validate|test|predict --config configs/<x>.yaml`` trains or evaluates any
LightningModule and LightningDataModule, ours or the user's, named by class path; ours, Lightning's
callbacks and any other imported subclass also resolve by their short class name. Unknown names fail before
anything is built, with the closest known names suggested. ``test_after_fit: true`` in a fit config runs
the test split once training ends. ``lightning-ext list [--kind K] [--family F]`` and ``lightning-ext search
WORDS`` read the static catalogue and import no component; a config imports only the classes it names.
``lightning-ext federate --config configs/federated/<x>.yaml`` runs a whole federation (many Trainers, so not a
LightningCLI run; see :mod:`lightning_ext.federated.run`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional

from lightning_ext import catalogue

if TYPE_CHECKING:
    from lightning_ext.lightning_cli import LightningExtCLI

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class UnknownClassError(ValueError):
    """A class named in a config or on the command line does not exist."""


def print_entries(items: list[catalogue.Entry], title: str = "") -> None:
    """Print catalogue entries as Rich tables grouped by kind: name, family, summary, arXiv id."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not items:
        console.print(f"no component matches{': ' + title if title else ''}")
        return
    for kind in catalogue.KINDS:
        rows = [e for e in items if e.kind == kind]
        if not rows:
            continue
        table = Table(title=catalogue.KIND_TITLES[kind], title_justify="left", show_lines=False)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("family", no_wrap=True)
        table.add_column("summary")
        table.add_column("arXiv", no_wrap=True)
        for e in rows:
            table.add_row(e.name, e.family, e.summary, e.arxiv or "")
        console.print(table)


class UsageError(ValueError):
    """A malformed ``list``/``search`` command line."""


class ConfigError(UsageError):
    """A user error in a config file or a ``fit``/``validate``/``test``/``predict`` command line (a YAML syntax
    error, an unknown key, a wrong type or value, a constructor refusing a value, a missing file): its message is
    one line naming the key or file and what to change. ``main`` prints it and exits with status 2."""


#: Exit status after SIGTERM stopped a run (128 + 15, as a shell reports a process killed by SIGTERM).
EXIT_SIGTERM = 143


def _list_command(argv: list[str]) -> None:
    kind = family = None
    it = iter(argv)
    for arg in it:
        key, eq, value = arg.partition("=")
        if key in ("--kind", "--family"):
            value = value if eq else next(it, "")
            if key == "--kind":
                kind = value
            else:
                family = value
        elif not arg.startswith("-") and kind is None:  # `lightning-ext list callbacks`, the short form
            kind = arg
        else:
            raise UsageError(f"lightning-ext list [--kind {{{','.join(catalogue.KINDS)}}}] "
                             f"[--family {{{','.join(catalogue.FAMILIES)}}}]: unexpected argument {arg!r}")
    try:
        items = catalogue.entries(kind, family)
    except ValueError as err:
        raise UsageError(f"lightning-ext list: {err}") from None
    print_entries(items)


def run_cli(args: Optional[list[str]] = None) -> Optional[LightningExtCLI]:
    """Run the command line ``args`` (default ``sys.argv[1:]``) and return the CLI object (``None`` for
    ``list``/``search``/``federate``/``--version``). Tests and notebooks call this; unknown class names raise
    :class:`UnknownClassError`, malformed ``list``/``search`` lines :class:`UsageError`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["list"]:
        _list_command(argv[1:])
        return None
    if argv[:1] == ["search"]:
        if not argv[1:]:
            raise UsageError("lightning-ext search WORDS: give one or more words, e.g. `lightning-ext search ties`")
        print_entries(catalogue.search(argv[1:]), " ".join(argv[1:]))
        return None
    if argv[:1] == ["federate"]:  # a federation is many Trainers, not one LightningCLI run
        from lightning_ext.federated.run import main as federate

        federate(argv[1:], prog="lightning-ext federate")
        return None
    if argv[:1] == ["--version"]:
        import lightning_ext

        print(f"lightning-ext {lightning_ext.__version__}")
        return None
    from lightning_ext.lightning_cli import LightningExtCLI

    if args is None:
        return LightningExtCLI()
    saved, sys.argv = sys.argv, sys.argv[:1]  # programmatic call: don't mix with the host's own argv
    try:
        return LightningExtCLI(args=argv)
    finally:
        sys.argv = saved


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-ext`` and ``python -m lightning_ext``.

    A user error (unknown class, bad config or value, missing file) prints one ``error:`` line and exits with
    status 2, without a traceback (set ``LIGHTNING_EXT_DEBUG=1`` for one). A run stopped by SIGTERM exits with
    :data:`EXIT_SIGTERM` (143), so a scheduler does not see success; errors raised while training keep their
    traceback."""
    try:
        cli = run_cli(args)
    except (UnknownClassError, UsageError) as err:
        print(f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
              file=sys.stderr)
        raise SystemExit(2) from None
    trainer = getattr(cli, "trainer", None)
    if trainer is not None and trainer.interrupted:
        how = "SIGTERM" if trainer.received_sigterm else "an interruption"
        print(f"error: the run was stopped by {how} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
              "resume it with --ckpt_path=last (or the path of its last checkpoint)", file=sys.stderr)
        raise SystemExit(EXIT_SIGTERM if trainer.received_sigterm else 1)


def __getattr__(name: str) -> Any:  # LightningExtCLI and the name checks live with Lightning's imports
    if name in ("LightningExtCLI", "check_class_names", "known_short_names"):
        from lightning_ext import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'lightning_ext.cli' has no attribute {name!r}")
