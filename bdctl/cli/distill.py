"""`bdctl distill`: Bellman Distill (phase 2) and the KD, SeqKD and MiniLLM baselines."""

from __future__ import annotations

from typing import Annotated

import typer

from bdctl.cli.common import ForceOpt, RecipeArg, SetOpt, job_command, say, user_errors
from bdctl.cli.completion import complete_ablation, complete_method
from bdctl.launch import LaunchOptions
from bdctl.methods import METHODS, method_names

EXAMPLE = """[bold]Examples[/]

  bdctl distill recipes/smoke.yaml --method bd
  bdctl distill recipes/smoke.yaml --method kd --set stages.distill.teacher_source=live
  bdctl distill recipes/smoke.yaml --method minillm
  bdctl distill recipes/smoke.yaml --method jsd --set stages.distill.divergence.jsd_beta=0.9   (beyond the paper)
  bdctl distill tiny --method bd --nproc 2 --set stages.distill.p=0.5
  bdctl distill tiny --ablation bd-p1.0       (a run of stages.distill.ablations)
"""


@job_command
def distill(
    recipe: RecipeArg,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help=f"Objective: {method_names()} (after minillm: the divergence menu, beyond the paper; "
            "default: the recipe's stages.distill.method, bd).",
            show_default=False,
            autocompletion=complete_method,
        ),
    ] = None,
    ablation: Annotated[
        str | None,
        typer.Option(
            "--ablation",
            "-a",
            help="Run one ablation of stages.distill.ablations (e.g. bd-p1.0, bd-chi2-off, bd-released; a combined "
            "run may name another method) into runs/<name>/distill/<ablation>.",
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
    by policy gradient. forward_kl, reverse_kl, jsd, tvd, skew_kl and skew_rkl (beyond the paper) train
    on the golden responses or D* with that divergence to the teacher (stages.distill.divergence).

    Keeps the weights with the best validation score (stages.distill.select: rouge_l or val_loss) and
    exports them as a Hugging Face directory: runs/<name>/distill/<method>/export.
    """
    with user_errors():
        from bdctl.errors import UserError
        from bdctl.submit import distill_request, submit

        if method is not None and method not in METHODS:
            raise UserError(f"--method {method}: no such method; expected one of {method_names()}")
        stage, overrides, options = distill_request(recipe, list(set_ or []), method, ablation)
        job = submit(stage, recipe, overrides, options, launch, force, log=say)
        if job is not None and not launch.dry_run:  # None: a task with nothing to do
            say(f"[green]done:[/] {job.stage_dir / 'export'}")
