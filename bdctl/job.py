"""A job: one stage of one recipe, planned in the launching process and run on every rank.

    submit("sft", "recipes/smoke.yaml", ["stages.teacher_sft.lr=1e-3"], {"model": "teacher"}, LaunchOptions())

The launching process loads and validates the recipe, runs the stage's pre-launch checks (data
split, vocabulary check, inputs that must exist: everything a user can get wrong fails here, in
one line, before any rank starts), writes `job.json` into the stage directory and launches the
ranks, which read it back (`bdctl.worker`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bdctl.errors import UserError
from bdctl.launch import LaunchOptions, dry_run_text, launch
from bdctl.recipe import Recipe, dump_recipe, load_recipe
from bdctl.recipe.schema import ModelSpec
from bdctl.rundir import RunDir, clear_dir, manifest, stage_lock, write_json_atomic, write_text_atomic
from bdctl.training import check_resumable, latest_checkpoint

# Stage modules: each has stage_dir(options), prepare(job, log) (launching process) and run(job, rank, world).
# Optional resumable(job) -> str | None: what an unfinished stage directory holds that a rerun continues
# from instead of starting over (partial output other than checkpoints, e.g. generate's cache shards).
STAGES = {
    "sft": "bdctl.stages.sft",
    "generate": "bdctl.stages.generate",
    "eval": "bdctl.stages.evaluate",
    "judge": "bdctl.stages.judge",
    "distill": "bdctl.stages.distill",
}
# Stage directories other stages may refer to by name (weights, caches, generations).
KNOWN_STAGE_DIRS = ("teacher_sft", "student_sft", "generate", "eval", "judge")
# ... and generate-<variant> for each D* variant of stages.generate.variants.


@dataclass
class Job:
    stage: str
    options: dict[str, Any]
    recipe: Recipe
    recipe_path: str
    run_root: str
    stage_name: str
    world_size: int
    info: dict[str, Any] = field(default_factory=dict)  # facts found by prepare(), for the ranks

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_root)

    @property
    def stage_dir(self) -> Path:
        return self.run.stage(self.stage_name)

    def fingerprint(self) -> str:
        """What a checkpoint of this stage must agree with to be resumed: the recipe as it
        affects this stage (other stages' settings and cosmetic fields excluded) and the options."""
        recipe = self.recipe.model_dump(mode="json")
        for key in ("description", "run_dir"):
            recipe.pop(key)
        # the recipe section of the stage: distill/bd -> distill, score_train -> generate
        section = "generate" if self.stage_name.startswith(("score_", "generate-")) else self.stage_name.split("/")[0]
        inputs = {section, *STAGE_INPUTS.get(section, ())}
        if recipe["stages"][section].get("select") == "rouge_l":
            inputs.add("eval")  # Rouge-L selection samples with the eval stage's settings (and protocols)
        recipe["stages"] = {name: value for name, value in recipe["stages"].items() if name in inputs}
        payload = json.dumps({"recipe": recipe, "stage": self.stage_name, "options": self.options}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        payload = {k: v for k, v in self.__dict__.items() if k != "recipe"}
        write_json_atomic(path, {**payload, "recipe": self.recipe.model_dump(mode="json")})

    @classmethod
    def load(cls, path: Path) -> Job:
        payload = json.loads(Path(path).read_text())
        payload["recipe"] = Recipe.model_validate(payload["recipe"])
        return cls(**payload)


# Other stages whose settings change what a stage trains on: a resume fingerprint covers them
# (distill reads D* and the teacher's sets, made by the generate stage's teacher and cache cap).
STAGE_INPUTS = {"distill": ("generate",)}


def resolve_weights(job: Job, ref: str, role: str = "student") -> ModelSpec | Path:
    """Which weights a reference names, in this order:

    "base"                 the recipe's model for `role` (a tiny spec, hub id or directory)
    a finished stage       its export, e.g. "teacher_sft" or "distill/bd"
    an existing directory  a Hugging Face model directory
    anything else          a hub id
    """
    if ref == "base":
        return getattr(job.recipe.models, role)
    stage = job.run.stage(ref)
    if manifest(stage) is not None:
        return job.run.export(ref)
    if Path(ref).is_dir():
        return Path(ref)
    if stage.exists() or ref in KNOWN_STAGE_DIRS or ref.startswith("distill/"):
        raise UserError(f"{ref}: that stage of {job.run.root} has not finished; run it first: {stage_command(ref, job.recipe_path)}")
    return ModelSpec(path=ref)


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


def stage_command(stage_dir: str, recipe_path: str) -> str:
    """The command that produces a stage directory."""
    if stage_dir.endswith("_sft"):
        return f"bdctl sft {recipe_path} --model {stage_dir.removesuffix('_sft')}"
    if stage_dir.startswith("distill/"):
        name = stage_dir.removeprefix("distill/")
        return f"bdctl distill {recipe_path} " + (f"--method {name}" if name in ("bd", "kd", "seqkd") else f"--ablation {name}")
    if stage_dir.startswith("score_"):
        return f"bdctl generate {recipe_path} --score {stage_dir.removeprefix('score_')}"
    if stage_dir.startswith("generate-"):  # a D* variant (stages.generate.variants)
        return f"bdctl generate {recipe_path} --variant {stage_dir.removeprefix('generate-')}"
    return f"bdctl {stage_dir} {recipe_path}"


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(STAGES[stage])


def plan(stage: str, recipe_arg: str, overrides: list[str], options: dict[str, Any], launch_options: LaunchOptions) -> Job:
    recipe, path = load_recipe(recipe_arg, overrides)
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
    )


def submit(
    stage: str,
    recipe_arg: str,
    overrides: list[str],
    options: dict[str, Any],
    launch_options: LaunchOptions,
    force: bool = False,
    log=print,
) -> Job:
    """Plan, check and run one stage; returns the job (its stage directory holds the results)."""
    from bdctl.engine import quiet_libraries

    quiet_libraries()
    job = plan(stage, recipe_arg, overrides, options, launch_options)
    job_file = job.stage_dir / "job.json"
    module = stage_module(stage)
    if launch_options.dry_run:
        log(dry_run_text(job_file, launch_options))
        if hasattr(module, "deepspeed_preview"):
            log(json.dumps(module.deepspeed_preview(job), indent=2))
        return job
    if manifest(job.stage_dir) is not None and not force:
        log(f"{job.stage_dir} is already complete; pass --force to run it again")
        return job
    if not launch_options.is_primary:  # node 0 / SLURM task 0 prepares; the others run its job
        wait_for_job(job, job_file, log)
        launch(job_file, launch_options)
        return job
    with stage_lock(job.stage_dir):  # before anything in the stage directory changes
        _run_primary(job, module, job_file, launch_options, force, log)
    return job


def _run_primary(job: Job, module: ModuleType, job_file: Path, launch_options: LaunchOptions, force: bool, log) -> None:
    """Node 0's part of `submit`, under the stage's lock: check, resume or start over, launch."""
    module.prepare(job, log)
    resume_from = None if force else latest_checkpoint(job.stage_dir / "checkpoints")
    partial = None
    if not force and resume_from is None and hasattr(module, "resumable"):
        partial = module.resumable(job)
    if resume_from is not None:
        check_resumable(resume_from, job.fingerprint(), job.world_size)
        log(f"resuming {job.stage_dir} from {resume_from.name}")
        shutil.rmtree(job.stage_dir / "logs", ignore_errors=True)
    elif partial is not None:
        log(f"resuming {job.stage_dir}: {partial}")
        shutil.rmtree(job.stage_dir / "logs", ignore_errors=True)
    else:  # unfinished without a checkpoint, or --force: start over
        clear_dir(job.stage_dir)
    save_job(job, job_file)
    launch(job_file, launch_options)
    require_finished(job)


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
