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
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bdctl.engine import check_resumable, latest_checkpoint
from bdctl.errors import UserError
from bdctl.job import Job
from bdctl.launch import LaunchOptions, dry_run_text, launch
from bdctl.models import build_models
from bdctl.recipe import dump_recipe, load_recipe
from bdctl.rundir import RunDir, clear_dir, manifest, stage_lock, write_text_atomic
from bdctl.stages import Log, Stage, stage_module
from bdctl.trackers import check_installed


def wait_for_job(job: Job, job_file: Path, log, timeout: float | None = None) -> None:
    """On a secondary node: wait until node 0 has written this very job (same recipe, stage and
    world size), freshly, before starting this node's ranks."""
    timeout = timeout or float(os.environ.get("BDCTL_JOB_WAIT", 1800))
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
    module.prepare(job, log)
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
    if manifest(job.stage_dir) is None:
        raise UserError(f"{job.stage_dir}: the stage ended without finishing its output")
    write_text_atomic(job.run.root / "recipe.yaml", dump_recipe(job.recipe))
