"""`bdctl distill`: Bellman Distill (phase 2) and the KD, SeqKD and MiniLLM baselines."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from bdctl.cli.common import ForceOpt, RecipeArg, SetOpt, job_command, say, user_errors
from bdctl.cli.completion import complete_ablation
from bdctl.launch import LaunchOptions

EXAMPLE = """[bold]Examples[/]

  bdctl distill recipes/smoke.yaml --method bd
  bdctl distill recipes/smoke.yaml --method kd --set stages.distill.teacher_source=live
  bdctl distill recipes/smoke.yaml --method minillm
  bdctl distill tiny --method bd --nproc 2 --set stages.distill.p=0.5
  bdctl distill tiny --ablation bd-p1.0       (a run of stages.distill.ablations)
"""


class Method(str, Enum):
    bd = "bd"
    kd = "kd"
    seqkd = "seqkd"
    minillm = "minillm"


@job_command
def distill(
    recipe: RecipeArg,
    method: Annotated[
        Method | None,
        typer.Option(
            "--method", "-m", help="Objective (default: the recipe's stages.distill.method, bd).", show_default=False
        ),
    ] = None,
    ablation: Annotated[
        str | None,
        typer.Option(
            "--ablation",
            "-a",
            help="Run one BD ablation of stages.distill.ablations (e.g. bd-p1.0, bd-chi2-off, bd-released) "
            "into runs/<name>/distill/<ablation>.",
            show_default=False,
            autocompletion=complete_ablation,
        ),
    ] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    *,
    launch: LaunchOptions,
) -> None:
    """Distil the teacher into the student: Bellman Distill on the teacher data D*, or a baseline.

    bd starts from the phase-1 student (runs/<name>/student_sft) and trains on the generate stage's D*
    and top-p cache; kd trains on the golden responses with the teacher's distribution (cache or live
    teacher); seqkd is SFT on D*; minillm (online) trains on the student's own teacher-mixed rollouts
    by policy gradient.

    Keeps the weights with the best validation score (stages.distill.select: rouge_l or val_loss) and
    exports them as a Hugging Face directory: runs/<name>/distill/<method>/export.
    """
    with user_errors():
        from bdctl.submit import distill_request, submit

        stage, overrides, options = distill_request(
            recipe, list(set_ or []), method.value if method else None, ablation
        )
        job = submit(stage, recipe, overrides, options, launch, force, log=say)
        if job is not None and not launch.dry_run:  # None: a task with nothing to do
            say(f"[green]done:[/] {job.stage_dir / 'export'}")
