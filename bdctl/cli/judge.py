"""`bdctl judge`: pairwise win rates of a candidate model against baselines, both answer orders."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from bdctl.cli.common import RecipeArg, SetOpt, say, user_errors

EXAMPLE = """[bold]Examples[/]

  bdctl judge recipes/smoke.yaml --backend hf --candidate teacher_sft --baseline student_sft
  OPENAI_API_KEY=... bdctl judge paper --backend openai
  bdctl judge paper --backend openai --set stages.judge.base_url=http://127.0.0.1:8000/v1 \\
      --set stages.judge.api_model=Qwen/Qwen2.5-7B-Instruct --set stages.judge.api_key_env=none
"""


class Backend(str, Enum):
    hf = "hf"
    openai = "openai"


def judge(
    recipe: RecipeArg,
    backend: Annotated[
        Backend | None,
        typer.Option(
            "--backend",
            "-b",
            show_default=False,
            help="hf: a local causal LM compares the probabilities of A, B and Tie (stages.judge.hf_model); "
            "openai: any OpenAI-compatible chat-completions endpoint. Default: stages.judge.backend.",
        ),
    ] = None,
    candidate: Annotated[
        str | None, typer.Option("--candidate", show_default=False, help="Model A (default: stages.judge.candidate).")
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline", show_default=False, help="A baseline (repeatable; default: stages.judge.baselines)."
        ),
    ] = None,
    generate: Annotated[
        bool,
        typer.Option(
            "--generate/--no-generate",
            help="Generate answers that the eval stage has not saved yet (with its settings), or stop and name "
            "the `bdctl eval` command to run.",
        ),
    ] = True,
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Discard the cached verdicts and judge every pair again.")
    ] = False,
) -> None:
    """Judge the candidate's answers against each baseline's, every pair in both orders.

    The answers are the eval stage's generations for stages.judge.eval_set at
    stages.judge.seed (missing ones are generated first, unless --no-generate).
    A win counts 1, a tie 0.5, a loss 0; the win rate has a bootstrap 95%
    interval over prompts. Beside it: the judge's position consistency (share of
    pairs whose verdict follows the answer, not its position) and how often it
    picks the first answer; a judge below 50 % consistency is flagged as
    position-driven. Writes runs/<name>/judge/: results.json, table.md,
    table.csv and win_rates.png (only when the command succeeds).

    Every verdict is cached in judge/verdicts.jsonl: a rerun asks nothing twice,
    and a failed run keeps the verdicts it finished. A reply that is not A, B or
    Tie is asked again and never cached; more than stages.judge.max_unparsed of
    them fails the command.

    Runs as a single process (no DeepSpeed launch, hence no --nproc): the judge
    is one local model or an HTTP endpoint.
    """
    with user_errors():
        import json

        from rich.markup import escape

        from bdctl.launch import LaunchOptions
        from bdctl.stages.judge import position_warning, results_table
        from bdctl.submit import submit
        from bdctl.tables import print_table

        options = {
            "backend": backend.value if backend else None,
            "candidate": candidate,
            "baselines": list(baseline) if baseline else None,
            "generate": generate,
        }
        job = submit("judge", recipe, set_ or [], options, LaunchOptions(), force, log=say)
        if job is None:  # a secondary SLURM task: task 0 judges
            return
        results = json.loads((job.stage_dir / "results.json").read_text())
        title = f"{results['candidate']} vs baselines on {results['eval_set']} (seed {results['seed']})"
        print_table(*results_table(results), title=title)
        warning = position_warning(results)
        if warning:
            say(f"[bold yellow]warning:[/] {escape(warning)}")
        say(f"[green]done:[/] {job.stage_dir / 'results.json'}  chart: {job.stage_dir / 'win_rates.png'}")
