"""The paper's pipeline as an ordered list of stages, each with the command that runs it.

data split -> teacher SFT -> generate D* (+ cache) -> student SFT (phase 1)
           -> distill: BD, its ablations and the baselines (KD, SeqKD, MiniLLM)
              (+ the divergence methods the recipe evaluates, beyond the paper) -> eval -> judge
"""

from __future__ import annotations

from dataclasses import dataclass

from bdctl.methods import METHODS
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

    def extra_needs() -> tuple[str, ...]:
        """What a divergence method needs: its responses' teacher (the cache of D* or of the golden
        responses, or the live teacher) and the phase-1 student when it starts from it."""
        settings = distill.divergence
        if distill.teacher_source == "live":
            needs = ["teacher_sft"] + ([distill.dstar] if settings.data == "dstar" else [])
        else:
            needs = [distill.dstar if settings.data == "dstar" else "score_train"]
        return tuple(needs + (["student_sft"] if distill.init == "student_sft" else []))

    # Beyond the paper: a divergence method runs when the recipe evaluates or judges it.
    wanted = {*recipe.stages.eval.models, *recipe.stages.judge.baselines, recipe.stages.judge.candidate}
    extras = [
        Stage(f"distill/{name}", extra_needs())
        for name, method in METHODS.items()
        if not method.in_paper and f"distill/{name}" in wanted
    ]

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
        *extras,
        Stage("eval", tuple(recipe.stages.eval.models)),
        Stage("judge", ("eval",), extra=f"--backend {recipe.stages.judge.backend}"),
    ]
