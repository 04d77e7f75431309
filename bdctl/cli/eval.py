"""`bdctl eval`: Rouge-L of models on the recipe's evaluation sets, mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdctl.cli.common import RecipeArg, SetOpt, job_command, say, user_errors
from bdctl.cli.completion import complete_model_stage
from bdctl.errors import UserError
from bdctl.launch import LaunchOptions

EXAMPLE = """[bold]Examples[/]

  bdctl eval recipes/smoke.yaml --set stages.eval.max_new_tokens=24 --set "stages.eval.seeds=[10,20]"
  bdctl eval tiny --model teacher_sft --model distill/bd --nproc 2
  bdctl eval paper --model ./my-export --model gpt2
  bdctl eval tiny --model distill/bd --harness my_task --harness-include ./lm_eval_tasks
"""

ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model", "-m", show_default=False,
        help="A model to evaluate (repeatable): a stage (teacher_sft, student_sft, distill/bd: its export), "
        "a local Hugging Face directory or a hub id. Default: stages.eval.models.",
        autocompletion=complete_model_stage,
    ),
]  # fmt: skip
HarnessOpt = Annotated[
    str | None,
    typer.Option(
        "--harness", show_default=False,
        help="Also run lm-evaluation-harness on every evaluated model: lm-eval task names, groups or tags, "
        "comma-separated (pip install 'bdctl[harness]'). Scores go into results.json beside Rouge-L.",
    ),
]  # fmt: skip
HarnessIncludeOpt = Annotated[
    str | None,
    typer.Option(
        "--harness-include", show_default=False,
        help="A directory of lm-eval task YAML files (lm-eval's include_path), e.g. a task over a local JSONL.",
    ),
]  # fmt: skip
HarnessLimitOpt = Annotated[
    int | None,
    typer.Option("--harness-limit", min=1, show_default=False, help="Score only the first N documents of each task."),
]
EvalForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Generate the requested (model, set, seed) results again instead of reusing them."),
]


@job_command
def eval_(
    recipe: RecipeArg,
    model: ModelOpt = None,
    set_: SetOpt = None,
    force: EvalForceOpt = False,
    harness: HarnessOpt = None,
    harness_include: HarnessIncludeOpt = None,
    harness_limit: HarnessLimitOpt = None,
    *,
    launch: LaunchOptions,
) -> None:
    """Sample answers under every sampling protocol of stages.eval.protocols (default: one,
    temperature 1, top_p 1, top_k 0), one pass per seed, and score Rouge-L.

    Writes every generation under runs/<name>/eval/generations/, results.json
    and one table per protocol (models x sets, mean ± std over seeds) as
    table.md, table.csv. Numbers are only comparable within one protocol.

    Finished (model, protocol, set, seed) results are reused by later runs, e.g. when
    models are added; one is generated again when its model's weights, its set
    or the sampling settings changed (--force: always).

    Each rank holds a whole model and answers a share of the prompts; the
    generations do not depend on the number of ranks.
    """
    with user_errors():
        from bdctl.answers import protocol_label
        from bdctl.stages.evaluate import results_table
        from bdctl.submit import submit
        from bdctl.tables import print_table

        options: dict = {"models": list(model) if model else None}
        if harness is not None:
            from bdctl.harness import parse_tasks

            options["harness"] = {
                "tasks": parse_tasks(harness),
                "include": harness_include and str(Path(harness_include).expanduser().resolve()),
                "limit": harness_limit,
            }
        elif harness_include is not None or harness_limit is not None:
            raise UserError("--harness-include and --harness-limit go with --harness TASKS")
        job = submit("eval", recipe, set_ or [], options, launch, force, log=say)
        if job is not None and not launch.dry_run and launch.is_primary:
            import json

            results = json.loads((job.stage_dir / "results.json").read_text())
            seeds = ", ".join(str(s) for s in results["seeds"])
            for protocol in results["protocols"]:
                print_table(
                    *results_table(results, protocol["name"]),
                    title=f"Rouge-L, mean ± std over seeds {seeds}; protocol {protocol_label(protocol)}",
                )
            if "harness" in results:
                from bdctl.harness import harness_table

                print_table(*harness_table(results["harness"], results["models"]), title="lm-evaluation-harness")
            say(f"[green]done:[/] {job.stage_dir / 'results.json'}")
