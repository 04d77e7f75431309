"""What every command shares: the recipe argument, `--set`, launcher options, and error handling.

Nothing here imports torch, deepspeed or transformers: `bdctl --help` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from bdctl.cli.completion import complete_recipe
from bdctl.launch import LaunchOptions

RecipeArg = Annotated[
    str,
    typer.Argument(
        help="Recipe file, or a recipe name from recipes/ (e.g. smoke).", show_default=False,
        autocompletion=complete_recipe,
    ),
]  # fmt: skip
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe value: key.path=value (repeatable).", show_default=False),
]
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
    """Turn a user-facing failure into one red line on stderr and its exit code (2 for bad input,
    3 for a non-finite loss, 75 for a preempted run); Ctrl-C into exit 130.

    Which exceptions count (a UserError, an unreadable or unwritable path, damaged weights, a
    failed rendezvous) is decided in one place, `bdctl.errors.user_error_from`, which the ranks
    use too; anything else is a bug and keeps its traceback."""
    from bdctl.errors import user_error_from

    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as exc:
        error = user_error_from(exc)
        if error is None:
            raise
        from rich.markup import escape

        message = str(error).splitlines()[0] if str(error) else "error"
        _console().print(f"[bold red]error:[/] {escape(message)}")
        raise typer.Exit(error.exit_code) from None


def _flags_without_type() -> None:
    """typer 0.29's rich help prints a flag's type (`--force <bool>`) although a flag takes no
    value (`--force true` is refused): show flags as plain flags, as click's own help does."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "plain_flags", False):  # patched already
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag and not self.count else shown(self, ctx)

    display_type_rich.plain_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type()


_LAUNCH = "Launcher"
LAUNCH_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, default, annotation in [
        ("nproc", 1, Annotated[int, typer.Option("--nproc", min=1, help="Ranks per node.", rich_help_panel=_LAUNCH)]),
        ("nnodes", 1, Annotated[int, typer.Option(
            "--nnodes", min=1, help="Nodes, each started by hand with its --node-rank.", rich_help_panel=_LAUNCH)]),
        ("node_rank", 0, Annotated[int, typer.Option(
            "--node-rank", min=0, help="This node's rank (with --nnodes).", rich_help_panel=_LAUNCH)]),
        ("master_addr", "127.0.0.1", Annotated[str, typer.Option(
            "--master-addr", help="Address of node 0.", rich_help_panel=_LAUNCH)]),
        ("master_port", None, Annotated[int | None, typer.Option(
            "--master-port", help="Port on node 0 (default: a free one, 29500 across nodes).", show_default=False,
            rich_help_panel=_LAUNCH)]),
        ("rendezvous_timeout", 600, Annotated[int, typer.Option(
            "--rendezvous-timeout", min=1, help="Seconds each node of a multi-node job waits for the others at "
            "--master-addr:--master-port before it stops with a message.", rich_help_panel=_LAUNCH)]),
        ("hostfile", None, Annotated[str | None, typer.Option(
            "--hostfile", help="DeepSpeed hostfile ('host slots=N' lines): launch over ssh with DeepSpeed's launcher.",
            show_default=False, rich_help_panel=_LAUNCH)]),
        ("include", None, Annotated[str | None, typer.Option(
            "--include", help="DeepSpeed's --include (e.g. 'host1:0,1@host2').", show_default=False,
            rich_help_panel=_LAUNCH)]),
        ("exclude", None, Annotated[str | None, typer.Option(
            "--exclude", help="DeepSpeed's --exclude.", show_default=False, rich_help_panel=_LAUNCH)]),
        ("dry_run", False, Annotated[bool, typer.Option(
            "--dry-run", help="Print the launcher command and the resolved DeepSpeed config, then exit.",
            rich_help_panel=_LAUNCH)]),
    ]
]  # fmt: skip


REPORT_TO = inspect.Parameter(
    "report_to", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[list[str] | None, typer.Option(
        "--report-to", show_default=False, metavar="TRACKER",
        help="Experiment trackers for this command, instead of the recipe's tracking.report_to: tensorboard, wandb, "
        "mlflow (repeatable or comma-separated), or none.",
    )],
)  # fmt: skip


def report_to_override(values: list[str]) -> str:
    """`--report-to` as the `--set` override it stands for (so the saved recipe says what was used)."""
    from bdctl.errors import UserError
    from bdctl.trackers import NAMES

    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if names == ["none"]:
        names = []
    for name in names:
        if name not in NAMES:
            raise UserError(f"--report-to: unknown tracker {name!r} (expected any of {', '.join(NAMES)}, or none)")
    return f"tracking.report_to=[{','.join(dict.fromkeys(names))}]"


def job_command(func: Callable) -> Callable:
    """Give a command the launcher options; they reach it as one `launch: LaunchOptions` argument.
    `--report-to` reaches it as one more `--set` override.

    Inside SLURM (srun/sbatch) the ranks come from SLURM's environment instead.
    """
    signature = inspect.signature(func)
    names = [p.name for p in LAUNCH_PARAMETERS]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        options = {name: kwargs.pop(name) for name in names}
        report_to = kwargs.pop(REPORT_TO.name)
        with user_errors():  # options that do not fit together (LaunchOptions checks them)
            launch = LaunchOptions(**options)
            if report_to:
                kwargs["set_"] = [*(kwargs.get("set_") or []), report_to_override(report_to)]
        return func(*args, launch=launch, **kwargs)

    # Resolve the command's (string) annotations in its own module, so typer sees real types.
    hints = typing.get_type_hints(func, include_extras=True)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
        if p.name != "launch"
    ]
    added = [REPORT_TO, *LAUNCH_PARAMETERS]
    # inspect.signature honours __signature__; typeshed does not declare it on functions
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=own + added, return_annotation=None
    )
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    del wrapper.__wrapped__  # typer must read __signature__, not the wrapped function's
    return wrapper
