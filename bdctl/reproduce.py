"""`bdctl reproduce`: the whole pipeline of a recipe, stage after stage, skipping finished ones.

Each stage runs as its own `bdctl ...` command in a fresh process (the same command a user would
type, with the same launcher options and overrides), so a stage's DeepSpeed state never leaks
into the next, and an interrupted reproduction continues where it stopped: a stage whose
directory has a MANIFEST.json is skipped, an unfinished one resumes from its checkpoints.

A finished stage is skipped only if it is current: made from the settings, data files and upstream
stages this recipe names now (`bdctl.provenance`). A stale one, and every stage downstream of it, is
planned again; the plan names why. Redoing a finished stage replaces its result, so reproduce does it
only with --force; without, it stops before running anything, with one line naming the stale stages
(eval and judge are the exception: they keep their finished units and redo only what changed, with
or without --force). The report is written only when every finished stage is current.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
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


@dataclass
class Planned:
    stage: Stage
    state: str  # "skip" (finished and current), "run" (unfinished) or "stale" (finished, made from something else)
    reasons: list[str] = field(default_factory=list)  # why stale


# Stages that keep their finished units and redo only what changed (no --force needed).
GROWING = ("eval", "judge")


def stage_job(stage: Stage, recipe_arg: str, overrides: list[str]):
    """The Job the stage's command would plan (as `bdctl sft / generate / distill / eval / judge` do)."""
    from bdctl.launch import LaunchOptions
    from bdctl.submit import distill_request
    from bdctl.submit import plan as plan_job

    words = shlex.split(stage.command)
    command, flags = words[1], dict(zip(words[3::2], words[4::2], strict=False))
    if command == "sft":
        return plan_job("sft", recipe_arg, overrides, {"model": flags["--model"]}, LaunchOptions())
    if command == "generate":
        options = {"score": flags.get("--score"), **({"variant": flags["--variant"]} if "--variant" in flags else {})}
        return plan_job("generate", recipe_arg, overrides, options, LaunchOptions())
    if command == "distill":
        name, sets, options = distill_request(recipe_arg, overrides, flags.get("--method"), flags.get("--ablation"))
        return plan_job(name, recipe_arg, sets, options, LaunchOptions())
    return plan_job(command, recipe_arg, overrides, {}, LaunchOptions())  # eval, judge: options do not count


def plan_states(
    recipe_arg: str, overrides: list[str], pipeline: list[Stage], run: RunDir, recipe: Recipe
) -> list[Planned]:
    """Each stage of the whole pipeline: skip, run or stale (and why), upstream changes carried downstream."""
    from bdctl import provenance
    from bdctl.pipeline import inputs_of
    from bdctl.submit import made_from

    planned: dict[str, Planned] = {}
    for stage in pipeline:
        if not finished(run, stage.directory, recipe):
            planned[stage.directory] = Planned(stage, "run")
            continue
        job = stage_job(stage, recipe_arg, overrides)
        old = provenance.made_from(run.stage(stage.directory))
        upstream = inputs_of(job.recipe, stage.directory)
        reasons = [f"{name} is redone first" for name in upstream if name in planned and planned[name].state != "skip"]
        if old is not None:
            new = made_from(job)
            if stage.directory in GROWING:
                old, new = {**old, "options": {}}, {**new, "options": {}}
            reasons += provenance.differences(stage.directory, old, new)
        planned[stage.directory] = Planned(stage, "stale" if reasons else "skip", list(dict.fromkeys(reasons)))
    return [planned[stage.directory] for stage in pipeline]


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


def command_of(
    stage: Stage, recipe_path: Path, overrides: list[str], launcher_args: list[str], force: bool = False
) -> list[str]:
    words = shlex.split(stage.command.replace("RECIPE", shlex.quote(str(recipe_path))))
    sets = [word for item in overrides for word in ("--set", item)]
    single_process = stage.directory == "judge"  # the judge runs on one process by design
    redo = ["--force"] if force else []
    return [sys.executable, "-m", "bdctl", *words[1:], *sets, *redo, *([] if single_process else launcher_args)]


def _stale_line(planned: list[Planned]) -> str:
    return ", ".join(f"{p.stage.directory} ({p.reasons[0]})" for p in planned)


def reproduce(
    recipe_arg: str,
    overrides: list[str],
    launcher_args: list[str],
    start: str | None,
    only: str | None,
    dry_run: bool,
    log,
    force: bool = False,
) -> None:
    pipeline, run, recipe_path, recipe = plan(recipe_arg, overrides, start, only)
    states = plan_states(recipe_arg, overrides, stages(recipe), run, recipe)
    chosen = {stage.directory for stage in pipeline}
    selected = [p for p in states if p.stage.directory in chosen]
    # A chosen stage redone because of a stage --from / --only leaves out would be made from stale input.
    for item in selected:
        outside = [r for r in item.reasons if r.endswith(" is redone first") and r.split()[0] not in chosen]
        if outside and not dry_run:
            name = outside[0].split()[0]
            why = _stale_line([p for p in states if p.stage.directory == name and p.reasons]) or f"{name}: unfinished"
            raise UserError(
                f"{name} must be redone before {item.stage.directory} ({why}); run reproduce without --from / --only"
            )
    must_force = [p for p in selected if p.state == "stale" and p.stage.directory not in GROWING]
    if must_force and not force and not dry_run:
        raise UserError(
            f"finished stages of {run.root} are stale for this recipe: {_stale_line(must_force)}; pass --force to "
            "redo them (their old results are replaced), or use another name / run_dir to keep both"
        )
    timings_file = run.root / "reproduce.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for item in selected:
        stage = item.stage
        redo = item.state == "stale" and stage.directory not in GROWING
        command = command_of(stage, recipe_path, overrides, launcher_args, force=redo)
        # escaped: a --set value such as "{chi2: [false]}" is text, not rich markup
        shown = escape(shlex.join(["bdctl", *command[3:]]))
        if item.state == "skip":
            log(f"[dim]skip[/] {stage.directory}: finished ({shown})")
            continue
        if item.state == "stale":
            why = escape(
                "; ".join(item.reasons[:4]) + (f"; and {len(item.reasons) - 4} more" if len(item.reasons) > 4 else "")
            )
            log(f"[bold yellow]stale[/] {stage.directory}: {why}")
        log(f"[bold]run[/]  {stage.directory}: {shown}")
        if dry_run:
            continue
        started = time.time()
        returncode = subprocess.run(command).returncode
        if returncode != 0:
            raise UserError(
                f"stage {stage.directory} failed (exit code {returncode}); rerun `bdctl reproduce` to continue",
                exit_code=returncode,
            )
        timings[stage.directory] = round(time.time() - started, 1)
        write_json_atomic(timings_file, timings)
    if dry_run and must_force and not force:
        log(f"[yellow]{len(must_force)} finished stage(s) are stale: reproduce redoes them only with --force[/]")
    if not dry_run and only is None:
        from bdctl.report import write_report

        stale = [p for p in plan_states(recipe_arg, overrides, stages(recipe), run, recipe) if p.state == "stale"]
        if stale:  # never old numbers under this recipe's header
            raise UserError(f"no report: finished stages of {run.root} are stale for this recipe: {_stale_line(stale)}")
        report = write_report(run, recipe, recipe_arg, overrides, timings)
        log(f"[green]report:[/] {report}")
