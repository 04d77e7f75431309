"""`bdctl reproduce`: every stage of a recipe in order, finished stages skipped, then a report."""

from __future__ import annotations

from typing import Annotated

import typer

from bdctl.cli.common import RecipeArg, SetOpt, job_command, say, user_errors
from bdctl.cli.completion import complete_pipeline_stage
from bdctl.launch import LaunchOptions

EXAMPLE = """[bold]Examples[/]

  bdctl reproduce recipes/tiny.yaml
  bdctl reproduce gpt2-1.5b-to-120m --nproc 4 --dry-run
  bdctl reproduce tiny --from distill/bd
"""


@job_command
def reproduce(
    recipe: RecipeArg,
    set_: SetOpt = None,
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Start at this stage (e.g. generate, distill/bd).",
            show_default=False,
            autocompletion=complete_pipeline_stage,
        ),
    ] = None,
    only: Annotated[
        str | None,
        typer.Option("--only", help="Run just this stage.", show_default=False, autocompletion=complete_pipeline_stage),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Redo finished stages that are stale for this recipe (made from other settings, data or upstream "
            "stages); their old results are replaced. Without it a stale stage stops the run with one line.",
        ),
    ] = False,
    *,
    launch: LaunchOptions,
) -> None:
    """Run the whole pipeline: teacher SFT, generate, student SFT, distill (BD and baselines), eval,
    judge. Finished stages are skipped, so an interrupted reproduction continues where it stopped;
    a finished stage made from other settings, data or upstream stages than the recipe names now is
    stale: planned again with --force, else the run stops with one line naming it. --dry-run prints
    the plan with each stage's command. Ends with runs/<name>/report.md.
    """
    with user_errors():
        from bdctl.reproduce import reproduce as run_pipeline

        run_pipeline(recipe, set_ or [], launch.as_args(), start, only, launch.dry_run, log=say, force=force)
