"""The paper's pipeline as an ordered list of stages, each with the command that runs it.

data split -> teacher SFT -> generate D* (+ cache) -> student SFT (phase 1)
           -> distill: BD, its ablations and the baselines (KD, SeqKD, MiniLLM) -> eval -> judge
"""

from __future__ import annotations

from dataclasses import dataclass

from bdctl.recipe.schema import Recipe
from bdctl.rundir import stage_command


@dataclass(frozen=True)
class Stage:
    directory: str  # under the run directory
    needs: tuple[str, ...]  # stage directories that must be finished first
    extra: str = ""  # options beyond the ones that name the stage

    @property
    def command(self) -> str:
        """The command that runs it, with RECIPE where the recipe goes."""
        return " ".join(filter(None, [stage_command(self.directory, "RECIPE"), self.extra]))


def stages(recipe: Recipe) -> list[Stage]:
    """The pipeline for `recipe`, in the order it runs."""
    distill = recipe.stages.distill

    def dstar_of(changes: dict) -> str:  # the D* stage a BD run trains on
        return changes.get("dstar", distill.dstar)

    return [
        Stage("teacher_sft", ()),
        Stage("generate", ("teacher_sft",)),
        *(Stage(f"generate-{name}", ("teacher_sft",)) for name in recipe.stages.generate.variants),
        # the teacher's distribution on the golden responses, for KD from the cache
        Stage("score_train", ("teacher_sft",)),
        Stage("student_sft", ()),
        Stage("distill/bd", (dstar_of({}), "student_sft")),
        *(
            Stage(f"distill/{name}", (dstar_of(changes), "student_sft"))
            for name, changes in distill.ablations.runs().items()
        ),
        Stage("distill/kd", ("score_train",)),
        Stage("distill/seqkd", (dstar_of({}),)),
        # online: the student's own rollouts with the live teacher (stages.generate.model) mixed in
        Stage("distill/minillm", ("teacher_sft", "student_sft")),
        Stage("eval", tuple(recipe.stages.eval.models)),
        Stage("judge", ("eval",), extra=f"--backend {recipe.stages.judge.backend}"),
    ]


def inputs_of(recipe: Recipe, directory: str) -> tuple[str, ...]:
    """The stage directories whose output `directory` is made from (its fingerprint covers theirs,
    `bdctl.provenance`): the plan's dependencies, with the teacher and the start weights (`init`) as
    the settings name them. A name that is not a stage of the run (a path, a hub id, "base") is not
    an input here: its settings are."""
    known = {stage.directory for stage in stages(recipe)} | {"teacher_sft", "student_sft"}
    needs = {stage.directory: stage.needs for stage in stages(recipe)}
    distill, teacher = recipe.stages.distill, recipe.stages.generate.model
    if directory.startswith(("generate", "score_")):
        found = [teacher]  # the teacher that samples or scores
    elif directory == "distill/minillm":  # online: the live teacher mixed in, from the phase-1 student by default
        found = [teacher, "student_sft" if distill.init == "auto" else distill.init]
    elif directory.startswith("distill/"):
        found = list(needs.get(directory, (distill.dstar, "student_sft")))  # not planned: an ablation's own job
        if distill.teacher_source == "live":  # the teacher's distribution comes from it, not from score_train
            found = [name for name in found if name != "score_train"] + [teacher]
        if distill.init != "auto":  # named start weights replace the phase-1 student BD starts from
            found = [name for name in found if name != "student_sft"] + [distill.init]
    else:
        found = list(needs.get(directory, ()))
        init = getattr(getattr(recipe.stages, directory, None), "init", "base")
        found.append(init)
    return tuple(dict.fromkeys(name for name in found if name in known and name != directory))
