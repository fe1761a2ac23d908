"""The ``cnnkit`` application: global options, then one sub-app per file in this package.

Nothing here imports torch: ``cnnkit --help`` and ``cnnkit list`` must feel instant. Each command
imports the library it needs inside its body.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from cnnkit import __version__
from cnnkit.cli import _common
from cnnkit.cli import cache as cache_cmd
from cnnkit.cli import data as data_cmd
from cnnkit.cli import eval as eval_cmd
from cnnkit.cli import export as export_cmd
from cnnkit.cli import list as list_cmd
from cnnkit.cli import plugins as plugins_cmd
from cnnkit.cli import predict as predict_cmd
from cnnkit.cli import summary as summary_cmd
from cnnkit.cli import train as train_cmd

app = typer.Typer(
    name="cnnkit",
    help="Train, evaluate, summarise and export the classic CNN image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click errors: cnnkit's own errors print as one line (see cnnkit.errors).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Single-command files are merged at the top level (no name); groups keep theirs.
app.add_typer(train_cmd.app)
app.add_typer(eval_cmd.app)
app.add_typer(summary_cmd.app)
app.add_typer(export_cmd.app)
app.add_typer(predict_cmd.app)
app.add_typer(list_cmd.app, name="list")
app.add_typer(data_cmd.app, name="data", help="Fetch datasets and show where their files are.")
app.add_typer(plugins_cmd.app, name="plugins")
app.add_typer(cache_cmd.app, name="cache")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cnnkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors (also CNNKIT_DEBUG=1).")
    ] = False,
) -> None:
    """cnnkit: LeNet to DenseNet on Fashion-MNIST and image folders."""
    if debug:
        os.environ["CNNKIT_DEBUG"] = "1"


def main() -> None:
    """Console-script entry point (also ``python -m cnnkit``)."""
    _common.STANDALONE = True
    try:
        app(prog_name="cnnkit")
    except KeyboardInterrupt:
        # Ctrl-C outside any command body (while parsing or importing): exit 130, not by signal.
        _common.settle_interrupt()
        _exit(130)
    except SystemExit as done:
        # `cnnkit ... | head -1`: the reader leaving early is a normal end, not an error.
        _exit(_common.finish_output(done.code))


def _exit(code: int | str | None) -> None:
    # Only a process that ran a training session can be a rank of a job; the others (--help,
    # summary) need not import torch to learn that they are not.
    strategy = sys.modules.get("cnnkit.training.strategy")
    if strategy is not None:
        strategy.end_rank(code)
    sys.exit(code)
