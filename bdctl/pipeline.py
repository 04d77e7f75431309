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

    # The teacher generate, score_train and MiniLLM use: a stage that comes first when it names one
    # (teacher_sft by default), nothing to wait for when it is a path, a hub id or "base".
    model = recipe.stages.generate.model
    teacher = (model,) if model in ("teacher_sft", "student_sft") else ()
    return [
        Stage("teacher_sft", ()),
        Stage("generate", teacher),
        *(Stage(f"generate-{name}", teacher) for name in recipe.stages.generate.variants),
        # the teacher's distribution on the golden responses, for KD from the cache
        Stage("score_train", teacher),
        Stage("student_sft", ()),
        Stage("distill/bd", (dstar_of({}), "student_sft")),
        *(
            Stage(f"distill/{name}", (dstar_of(changes), "student_sft"))
            for name, changes in distill.ablations.runs().items()
        ),
        Stage("distill/kd", ("score_train",)),
        Stage("distill/seqkd", (dstar_of({}),)),
        # online: the student's own rollouts with the live teacher (stages.generate.model) mixed in
        Stage("distill/minillm", tuple(dict.fromkeys((*teacher, "student_sft")))),
        Stage("eval", tuple(recipe.stages.eval.models)),
        Stage("judge", ("eval",), extra=f"--backend {recipe.stages.judge.backend}"),
    ]
