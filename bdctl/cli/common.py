"""What every command shares: the recipe argument, `--set`, launcher options, and error handling.

Nothing here imports torch, deepspeed or transformers: `bdctl --help` stays instant.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

RecipeArg = Annotated[str, typer.Argument(help="Recipe file, or a recipe name from recipes/ (e.g. smoke).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe value: key.path=value (repeatable).", show_default=False),
]
NprocOpt = Annotated[int, typer.Option("--nproc", min=1, help="Ranks to start on this node.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the launcher command and exit.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Start the stage over: discard its finished output or its checkpoints.")
]


def _console():
    from rich.console import Console

    # soft_wrap: a long message stays one line (errors must be one line, whatever the terminal)
    return Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    _console().print(message)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError into one red line on stderr and its exit code (2 for bad input, 3 for a
    non-finite loss, 75 for a preempted run); Ctrl-C into exit 130."""
    from bdctl.errors import UserError

    try:
        yield
    except UserError as exc:
        from rich.markup import escape

        message = str(exc).splitlines()[0] if str(exc) else "error"
        _console().print(f"[bold red]error:[/] {escape(message)}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
