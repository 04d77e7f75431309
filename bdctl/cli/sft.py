"""`bdctl sft`: fine-tune the teacher or the student on the recipe's instruction data."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from bdctl.cli.common import ForceOpt, RecipeArg, SetOpt, job_command, say, user_errors
from bdctl.launch import LaunchOptions

EXAMPLE = """[bold]Examples[/]

  bdctl sft recipes/smoke.yaml --model teacher
  bdctl sft tiny --model student --nproc 2 --set stages.student_sft.lr=1e-3
"""


class Role(str, Enum):
    teacher = "teacher"
    student = "student"


@job_command
def sft(
    recipe: RecipeArg,
    model: Annotated[Role, typer.Option("--model", "-m", help="Which model to fine-tune.")] = Role.teacher,
    set_: SetOpt = None,
    force: ForceOpt = False,
    *,
    launch: LaunchOptions,
) -> None:
    """Supervised fine-tuning (response tokens only) on a DeepSpeed ZeRO engine.

    Keeps the weights with the lowest validation loss and exports them as a Hugging Face
    directory: runs/<name>/<model>_sft/export.
    """
    with user_errors():
        from bdctl.submit import submit

        job = submit("sft", recipe, set_ or [], {"model": model.value}, launch, force, log=say)
        if job is not None and not launch.dry_run:  # None: a task with nothing to do
            say(f"[green]done:[/] {job.stage_dir / 'export'}")
