"""Submitting a job: the launching process plans it, checks it and starts its ranks.

    submit("sft", "recipes/smoke.yaml", ["stages.teacher_sft.lr=1e-3"], {"model": "teacher"}, LaunchOptions())

The launching process loads and validates the recipe, runs the stage's pre-launch checks (data
split, vocabulary check, inputs that must exist: everything a user can get wrong fails here, in
one line, before any rank starts), writes `job.json` into the stage directory and launches the
ranks, which read it back (`bdctl.worker` -> `bdctl.job.Job.load`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bdctl import provenance
from bdctl.engine import check_resumable, latest_checkpoint
from bdctl.environment import job_wait_seconds
from bdctl.errors import UserError
from bdctl.job import Job
from bdctl.launch import LaunchOptions, dry_run_text, launch
from bdctl.methods import METHODS
from bdctl.models import build_models
from bdctl.recipe import dump_recipe, load_recipe
from bdctl.recipe.schema import Train
from bdctl.rundir import (
    MANIFEST,
    RunDir,
    clear_dir,
    manifest,
    stage_command,
    stage_lock,
    write_json_atomic,
    write_text_atomic,
)
from bdctl.stages import Log, Stage, stage_module
from bdctl.trackers import check_installed


def wait_for_job(job: Job, job_file: Path, log, timeout: float | None = None) -> None:
    """On a secondary node: wait until node 0 has written this very job (same recipe, stage and
    world size), freshly, before starting this node's ranks."""
    timeout = timeout or job_wait_seconds()
    started = time.time()
    log(f"waiting for node 0 to prepare {job_file} ...")
    while time.time() - started < timeout:
        if job_file.is_file() and job_file.stat().st_mtime >= started - 120:
            try:
                theirs = Job.load(job_file)
            except (ValueError, KeyError):  # being written right now
                theirs = None
            if theirs is not None:
                if theirs.fingerprint() != job.fingerprint() or theirs.world_size != job.world_size:
                    raise UserError(f"{job_file}: node 0 prepared a different job (recipe, stage or world size differ)")
                return
        time.sleep(1.0)
    raise UserError(f"{job_file}: node 0 did not prepare the job within {timeout:.0f} s")


def plan(
    stage: str, recipe_arg: str, overrides: list[str], options: dict[str, Any], launch_options: LaunchOptions
) -> Job:
    recipe, path = load_recipe(recipe_arg, overrides)
    check_installed(recipe.tracking.report_to)  # before any rank starts, not at its first step
    run_root = str(RunDir.of(recipe).root)
    module = stage_module(stage)
    return Job(
        stage=stage,
        options=options,
        recipe=recipe,
        recipe_path=str(path),
        run_root=run_root,
        stage_name=module.stage_dir(options),
        world_size=launch_options.world_size,
        overrides=list(overrides),
    )


def distill_request(
    recipe_arg: str, overrides: list[str], method: str | None, ablation: str | None
) -> tuple[str, list[str], dict[str, Any]]:
    """`bdctl distill --method M / --ablation A` as a stage, its overrides and options (the CLI and
    `bdctl reproduce`'s plan build the same job from it)."""
    overrides = list(overrides)
    if ablation is not None:
        runs = load_recipe(recipe_arg, overrides)[0].stages.distill.ablations.runs()
        if ablation not in runs:
            known = ", ".join(runs) or "none: the recipe sets no stages.distill.ablations"
            raise UserError(f"--ablation {ablation}: no such run in stages.distill.ablations (runs: {known})")
        chosen = runs[ablation].get("method", "bd")  # a combined run may ablate another method
        if method not in (None, chosen):
            raise UserError(f"--ablation {ablation} is a run of --method {chosen}; drop --method {method}")
        for key, value in runs[ablation].items():  # the saved recipe says what ran
            overrides.append(f"stages.distill.{key}={json.dumps(value)}")
        # The run is its method with these settings; the other runs are not its business (and checked
        # against its settings they could clash, e.g. outside: drop beside variant: released).
        overrides.append("stages.distill.ablations={}")
    else:
        chosen = method or load_recipe(recipe_arg, overrides)[0].stages.distill.method
    overrides.append(f"stages.distill.method={chosen}")
    options = {"method": chosen, **({"ablation": ablation} if ablation else {})}
    return METHODS[chosen].stage, overrides, options  # MiniLLM is a stage of its own (online)


def submit(
    stage: str,
    recipe_arg: str,
    overrides: list[str],
    options: dict[str, Any],
    launch_options: LaunchOptions,
    force: bool = False,
    log: Log = print,
) -> Job | None:
    """Plan, check and run one stage; returns the job (its stage directory holds the results), or
    None on a task that a single-process stage leaves idle."""
    from bdctl.engine import quiet_libraries

    quiet_libraries()
    job = plan(stage, recipe_arg, overrides, options, launch_options)
    job_file = job.stage_dir / "job.json"
    module = stage_module(stage)
    if launch_options.is_primary:  # gguf / from_teacher models, once, before any check reads them (--dry-run too)
        build_models(job.recipe, log)
    if launch_options.dry_run:
        log(dry_run_text(job_file, launch_options))
        if hasattr(module, "deepspeed_preview"):
            log(json.dumps(module.deepspeed_preview(job), indent=2))
        return job
    if not getattr(module, "REUSES_FINISHED", False) and manifest(job.stage_dir) is not None and not force:
        require_current(job)  # a finished stage made from other settings or inputs: one line, nothing reused
        log(f"{job.stage_dir} is already complete; pass --force to run it again")
        return job
    if not launch_options.is_primary:  # node 0 / SLURM task 0 prepares; the others run its job
        if hasattr(module, "run_in_process"):
            log(f"{stage}: runs on node 0 / SLURM task 0 only; nothing to do on this task")
            return None
        wait_for_job(job, job_file, log)
        launch(job_file, launch_options)
        return job
    with contextlib.ExitStack() as locks:
        locks.enter_context(stage_lock(job.stage_dir))  # before anything in the stage directory changes
        _run_primary(job, module, job_file, launch_options, force, log, locks)
    return job


def _run_primary(
    job: Job,
    module: Stage,
    job_file: Path,
    launch_options: LaunchOptions,
    force: bool,
    log: Log,
    locks: contextlib.ExitStack,
) -> None:
    """Node 0's part of `submit`, under the stage's lock: check, get the directory ready, run."""
    from bdctl.data.prepare import prepare_data, stale_data

    if force and stale_data(job.recipe, job.run) is not None:
        prepare_data(job.recipe, job.run, log, remake=True)  # --force redoes a split made from other data too
    module.prepare(job, log)
    require_fresh_inputs(job)
    job.info["made_from"] = made_from(job)  # what this command makes the stage from (stamped on its manifest)
    for other in module.also_locks(job) if hasattr(module, "also_locks") else []:
        locks.enter_context(stage_lock(other))
    begin = module.begin if hasattr(module, "begin") else functools.partial(_begin, module)
    ranks_have_work = begin(job, force, log)
    save_job(job, job_file)
    if hasattr(module, "run_in_process"):
        module.run_in_process(job, log)
    # Ranks started by other launchers (SLURM tasks, other nodes) wait for this job: start ours too.
    elif ranks_have_work or launch_options.mode == "slurm" or launch_options.nnodes > 1:
        shutil.rmtree(job.stage_dir / "logs", ignore_errors=True)
        launch(job_file, launch_options)
    else:
        module.finish_without_ranks(job)  # type: ignore[attr-defined]  # required with a begin that can say no
    require_finished(job)


def _begin(module: Stage, job: Job, force: bool, log: Log) -> bool:
    """The default for an all-or-nothing stage: resume from the latest checkpoint (or the partial
    output the stage's `resumable` names), else start over. The ranks always have work."""
    resume_from = None if force else latest_checkpoint(job.stage_dir / "checkpoints")
    partial = None
    if not force and resume_from is None and hasattr(module, "resumable"):
        partial = module.resumable(job)
    if resume_from is not None or partial is not None:
        require_same_inputs(job)
    if resume_from is not None:
        check_resumable(resume_from, job.fingerprint(), job.world_size)
        log(f"resuming {job.stage_dir} from {resume_from.name}")
    elif partial is not None:
        log(f"resuming {job.stage_dir}: {partial}")
    else:  # unfinished without a checkpoint, or --force: start over
        clear_dir(job.stage_dir)
    return True


def save_job(job: Job, job_file: Path) -> None:
    """The resolved recipe the stage runs with, and the job the ranks read."""
    job.stage_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(job.stage_dir / "recipe.yaml", dump_recipe(job.recipe))
    job.save(job_file)


def require_finished(job: Job) -> None:
    """After the ranks: a stage without its manifest did not finish (they reported no error).

    A finished stage's recipe becomes the run's recipe.yaml ("the latest command"), and only
    then: a command that failed, whether on a bad setting or in the ranks, leaves the run's record
    of what it last ran as it was."""
    done = manifest(job.stage_dir)
    if done is None:
        raise UserError(f"{job.stage_dir}: the stage ended without finishing its output")
    if "made_from" in job.info and done.get("made_from") != job.info["made_from"]:
        write_json_atomic(job.stage_dir / MANIFEST, {**done, "made_from": job.info["made_from"]})
    drop_checkpoints(job)
    write_text_atomic(job.run.root / "recipe.yaml", dump_recipe(job.recipe))


# --------------------------------------------------------------------------- what a stage is made from


def made_from(job: Job) -> dict[str, Any]:
    """The record (`bdctl.provenance`) of what this job makes its stage from, as things are now."""
    from bdctl.data.prepare import source_digests
    from bdctl.pipeline import inputs_of

    data = provenance.identity(job.run.data)
    record: dict[str, Any] = {
        "stage": job.stage_name,
        "settings": job.settings(),
        "options": job.options,
        "sources": source_digests(job.recipe),
        "data": data["finished_at"] if data else None,
        "inputs": {name: provenance.identity(job.run.stage(name)) for name in inputs_of(job.recipe, job.stage_name)},
        "started_at": time.time(),
    }
    return {**record, "fingerprint": provenance.fingerprint(record)}


def stage_changes(job: Job) -> list[str] | None:
    """What differs between what the job's finished stage was made from and what this command would
    make it from (empty: nothing); None when the stage is unfinished or made before records existed."""
    old = provenance.made_from(job.stage_dir)
    if old is None:
        return None
    return provenance.differences(job.stage_name, old, made_from(job)) + stale_inputs(job)


def stale_inputs(job: Job) -> list[str]:
    """Upstream stages that are themselves stale (their own inputs were made again since), as
    `NAME is stale (why)`."""
    return [f"{name} is stale ({why})" for name, why in _stale_upstream(job)]


def _stale_upstream(job: Job) -> list[tuple[str, str]]:
    from bdctl.pipeline import inputs_of

    found = []
    for name in inputs_of(job.recipe, job.stage_name):
        record = provenance.made_from(job.run.stage(name))
        reasons = provenance.remade_inputs(job.run.root, name, record) if record else []
        if reasons:
            found.append((name, reasons[0]))
    return found


def require_current(job: Job) -> None:
    """A finished stage is reused only if it was made from what this command would make it from."""
    changed = stage_changes(job)
    if changed:
        raise UserError(f"{job.stage_dir} is finished but {stale_text(changed)}; {CHOICES}")


def require_fresh_inputs(job: Job) -> None:
    """A stage is never made from a stale one: its upstream stage must be redone first."""
    for name, why in _stale_upstream(job)[:1]:
        raise UserError(
            f"{job.run.stage(name)} is stale ({why}); redo it first: {stage_command(name, job.recipe_path)} --force"
        )


def require_same_inputs(job: Job) -> None:
    """An unfinished stage resumes only from work made from what this command would make it from:
    the same settings (result-neutral ones aside), data and upstream stages (a student_sft retrained
    since distill/bd started is not resumed from)."""
    try:
        previous = json.loads((job.stage_dir / "job.json").read_text())["info"].get("made_from")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return
    if not isinstance(previous, dict) or "made_from" not in job.info:
        return  # a job.json from before records existed: the checkpoint's fingerprint decides alone
    changed = provenance.differences(job.stage_name, previous, job.info["made_from"])
    if changed:
        raise UserError(
            f"{job.stage_dir}: the unfinished run there {stale_text(changed)}; pass --force to start over "
            "(or restore what it was made from)"
        )


CHOICES = "pass --force to redo it (its old result is replaced), or use another name / run_dir to keep both"


def stale_text(changed: list[str]) -> str:
    """`changed` as one clause: the first few changes, and how many more."""
    shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"was made from something else: {shown}"


def drop_checkpoints(job: Job) -> None:
    """A finished training stage's DeepSpeed checkpoints are dead weight (a rerun of a finished stage
    is --force, which starts over; eval, judge and the report read the export, metrics.jsonl and the
    manifest): dropped unless the stage's keep_checkpoints_after_finish says otherwise."""
    section = getattr(job.recipe.stages, job.stage_name.split("/")[0], None)
    if isinstance(section, Train) and not section.keep_checkpoints_after_finish:
        shutil.rmtree(job.stage_dir / "checkpoints", ignore_errors=True)
