"""`bdctl reproduce`: the whole pipeline of a recipe, stage after stage, skipping finished ones.

Each stage runs as its own `bdctl ...` command in a fresh process (the same command a user would
type, with the same launcher options and overrides), so a stage's DeepSpeed state never leaks
into the next, and an interrupted reproduction continues where it stopped: a stage whose
directory has a MANIFEST.json is skipped, an unfinished one resumes from its checkpoints.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.markup import escape

from bdctl.errors import UserError
from bdctl.pipeline import Stage, stages
from bdctl.recipe import load_recipe
from bdctl.recipe.schema import Recipe
from bdctl.rundir import RunDir, manifest, write_json_atomic


def finished(run: RunDir, directory: str, recipe: Recipe) -> bool:
    """A stage is finished when its manifest exists; eval and judge grow with the recipe (their
    finished units are reused), so they count as finished only for what the recipe asks now."""
    done = manifest(run.stage(directory))
    if done is None:
        return False
    if directory == "eval":
        config = recipe.stages.eval
        asked = {
            "models": list(config.models), "protocols": [p.name for p in config.protocols],
            "sets": [s.name for s in config.sets], "seeds": list(config.seeds),
        }  # fmt: skip
        return all(done.get(key) == value for key, value in asked.items())
    if directory == "judge":
        judge = recipe.stages.judge
        return done.get("candidate") == judge.candidate and done.get("baselines") == list(judge.baselines)
    return True


def plan(
    recipe_arg: str, overrides: list[str], start: str | None, only: str | None
) -> tuple[list[Stage], RunDir, Path, Recipe]:
    recipe, path = load_recipe(recipe_arg, overrides)
    run = RunDir.of(recipe)
    pipeline = stages(recipe)
    names = [s.directory for s in pipeline]
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise UserError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    if only is not None:
        pipeline = [s for s in pipeline if s.directory == only]
    elif start is not None:
        pipeline = pipeline[names.index(start) :]
    return pipeline, run, path, recipe


def command_of(stage: Stage, recipe_path: Path, overrides: list[str], launcher_args: list[str]) -> list[str]:
    words = shlex.split(stage.command.replace("RECIPE", shlex.quote(str(recipe_path))))
    sets = [word for item in overrides for word in ("--set", item)]
    single_process = stage.directory == "judge"  # the judge runs on one process by design
    return [sys.executable, "-m", "bdctl", *words[1:], *sets, *([] if single_process else launcher_args)]


def reproduce(
    recipe_arg: str,
    overrides: list[str],
    launcher_args: list[str],
    start: str | None,
    only: str | None,
    dry_run: bool,
    log,
) -> None:
    pipeline, run, recipe_path, recipe = plan(recipe_arg, overrides, start, only)
    timings_file = run.root / "reproduce.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for stage in pipeline:
        command = command_of(stage, recipe_path, overrides, launcher_args)
        # escaped: a --set value such as "{chi2: [false]}" is text, not rich markup
        shown = escape(shlex.join(["bdctl", *command[3:]]))
        if finished(run, stage.directory, recipe):
            log(f"[dim]skip[/] {stage.directory}: finished ({shown})")
            continue
        if dry_run:
            log(f"[bold]run[/]  {stage.directory}: {shown}")
            continue
        log(f"[bold]run[/]  {stage.directory}: {shown}")
        started = time.time()
        returncode = subprocess.run(command).returncode
        if returncode != 0:
            raise UserError(
                f"stage {stage.directory} failed (exit code {returncode}); rerun `bdctl reproduce` to continue",
                exit_code=returncode,
            )
        timings[stage.directory] = round(time.time() - started, 1)
        write_json_atomic(timings_file, timings)
    if not dry_run and only is None:
        from bdctl.report import write_report

        report = write_report(run, recipe, recipe_arg, overrides, timings)
        log(f"[green]report:[/] {report}")
