"""The `bdctl` command line: one module per command, registered only once it works.

Importing this package must not import torch, deepspeed or transformers (`bdctl --help` is instant);
commands import what they need when they run.
"""

from __future__ import annotations

import typer

from bdctl import __version__
from bdctl.cli import distill as distill_command
from bdctl.cli import eval as eval_command
from bdctl.cli import export as export_command
from bdctl.cli import generate as generate_command
from bdctl.cli import judge as judge_command
from bdctl.cli import recipes as recipes_command
from bdctl.cli import reproduce as reproduce_command
from bdctl.cli import runs as runs_command
from bdctl.cli import sft as sft_command

app = typer.Typer(
    name="bdctl",
    help="Bellman Distill: distil a teacher LM into a student with DeepSpeed ZeRO-3, from one recipe file.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=True,  # --install-completion / --show-completion (bdctl/cli/completion.py)
    pretty_exceptions_enable=False,
)

app.command("sft", epilog=sft_command.EXAMPLE)(sft_command.sft)
app.command("generate", epilog=generate_command.EXAMPLE)(generate_command.generate)
app.command("distill", epilog=distill_command.EXAMPLE)(distill_command.distill)
app.command("eval", epilog=eval_command.EXAMPLE)(eval_command.eval_)
app.command("judge", epilog=judge_command.EXAMPLE)(judge_command.judge)
app.command("reproduce", epilog=reproduce_command.EXAMPLE)(reproduce_command.reproduce)
app.add_typer(recipes_command.app, name="recipes")
app.command("runs", epilog=runs_command.EXAMPLE)(runs_command.runs)
app.command("export", epilog=export_command.EXAMPLE)(export_command.export)


def _version(value: bool) -> None:
    if value:
        print(f"bdctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Bellman Distill: distil a teacher LM into a student with DeepSpeed ZeRO-3, from one recipe file."""


def main() -> None:
    app()
