"""`bdctl generate`: the teacher's data D* and its sparse top-p cache (or a cache over a split)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from bdctl.cli.common import ForceOpt, RecipeArg, SetOpt, job_command, say, user_errors
from bdctl.launch import LaunchOptions

EXAMPLE = """[bold]Examples[/]

  bdctl generate recipes/smoke.yaml
  bdctl generate tiny --nproc 2 --set stages.generate.n_samples=4
  bdctl generate recipes/smoke.yaml --score train
  bdctl generate tiny --variant nucleus      # a second D* of stages.generate.variants
"""


class Split(str, Enum):
    train = "train"
    valid = "valid"
    test = "test"


@job_command
def generate(
    recipe: RecipeArg,
    score: Annotated[
        Split | None,
        typer.Option(
            "--score",
            help="Instead of sampling, run the teacher over this split's golden responses and cache its "
            "top-p sets (runs/<name>/score_<split>/).",
            show_default=False,
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant",
            help="Make the D* variant NAME of stages.generate.variants (e.g. sampled inside the teacher's top-p "
            "set) into runs/<name>/generate-NAME/.",
            show_default=False,
        ),
    ] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    *,
    launch: LaunchOptions,
) -> None:
    """Sample the teacher's responses D* and cache its top-p distribution at every generated token.

    stages.generate.n_samples responses per training prompt, temperature 1, no top-k, top_p 1 by default,
    from stages.generate.model (default: the teacher SFT export). Writes
    runs/<name>/generate/: dstar.jsonl, cache/ (the sparse teacher cache distillation reads) and
    the sparsity report (sparsity.md, .json, .png). Stopped runs continue where they stopped:
    run the same command again.
    """
    with user_errors():
        from bdctl.rundir import manifest
        from bdctl.submit import submit

        job = submit(
            "generate",
            recipe,
            set_ or [],
            {"score": score.value if score else None, **({"variant": variant} if variant else {})},
            launch,
            force,
            log=say,
        )
        done = None if launch.dry_run or job is None else manifest(job.stage_dir)
        if job is not None and done is not None:
            sizes = ", ".join(f"{p}: {n:.1f}" for p, n in done["top_p_mean_set_size"].items())
            what = job.stage_dir / ("cache" if score else "dstar.jsonl")
            say(
                f"[green]done:[/] {what}  {done['sequences']} sequences, {done['tokens']} tokens; "
                f"cache {done['bytes_per_token']:.1f} bytes/token, mean set {done['mean_set_size']:.2f} at "
                f"p={done['cache_top_p']:g}; top-1 prob {done['top1_probability']:.3f}; top-p set sizes {sizes}; "
                f"report {job.stage_dir / 'sparsity.md'}"
            )
