"""A job: one stage of one recipe, as the launching process planned it (`bdctl.submit`) and every
rank reads it back from `job.json` (`bdctl.worker`): the stage, its options, the validated recipe,
the run directory and the facts the pre-launch checks found (`info`). Also which weights a name
refers to (`resolve_weights`). The stages themselves are registered in `bdctl.stages`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdctl.errors import UserError
from bdctl.provenance import drop_neutral, flatten
from bdctl.recipe.schema import ModelSpec, Recipe, fingerprint_view
from bdctl.rundir import RunDir, manifest, stage_command, write_json_atomic

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
    overrides: list[str] = field(default_factory=list)  # the command's --set items (for commands a message suggests)

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_root)

    @property
    def stage_dir(self) -> Path:
        return self.run.stage(self.stage_name)

    def settings(self) -> dict[str, Any]:
        """The recipe as it affects this stage, as dotted keys: other stages' settings, the
        result-neutral ones (`bdctl.provenance.RESULT_NEUTRAL`: trackers, report sizes, ...) and the
        memory switches (`schema.fingerprint_view`) left out."""
        recipe = drop_neutral(fingerprint_view(self.recipe.model_dump(mode="json")))
        # the recipe section of the stage: distill/bd -> distill, score_train -> generate
        section = "generate" if self.stage_name.startswith(("score_", "generate-")) else self.stage_name.split("/")[0]
        inputs = {section, *STAGE_INPUTS.get(section, ())}
        if recipe["stages"][section].get("select") == "rouge_l":
            inputs.add("eval")  # Rouge-L selection samples with the eval stage's settings (and protocols)
        recipe["stages"] = {name: value for name, value in recipe["stages"].items() if name in inputs}
        return flatten(recipe)

    def fingerprint(self) -> str:
        """What a checkpoint of this stage must agree with to be resumed: `settings()` and the options."""
        payload = json.dumps(
            {"recipe": self.settings(), "stage": self.stage_name, "options": self.options}, sort_keys=True
        )
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
        raise UserError(
            f"{ref}: that stage of {job.run.root} has not finished; run it first: {stage_command(ref, job.recipe_path)}"
        )
    _refuse_stage_typo(job, ref)
    return ModelSpec(path=ref)


def _refuse_stage_typo(job: Job, ref: str) -> None:
    """A reference close to a stage name ("teacher_sf") is a typo, not a hub id to look up."""
    import difflib

    known = list(KNOWN_STAGE_DIRS)
    distill = job.run.stage("distill")
    if distill.is_dir():
        known += [f"distill/{p.name}" for p in sorted(distill.iterdir()) if p.is_dir()]
    close = difflib.get_close_matches(ref, known, n=1, cutoff=0.75)
    if close:
        raise UserError(f"no stage {ref} in {job.run.root} (did you mean {close[0]}?)")
