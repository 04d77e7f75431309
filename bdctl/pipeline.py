"""The paper's pipeline as an ordered list of stages, each with the command that runs it.

data split -> teacher SFT -> generate D* (+ cache) -> student SFT (phase 1)
           -> distill: BD, its ablations and the baselines (KD, SeqKD, MiniLLM)
              (+ the divergence methods the recipe evaluates, beyond the paper) -> eval -> judge
"""

from __future__ import annotations

from dataclasses import dataclass

from bdctl.methods import METHODS
from bdctl.recipe.schema import DistillStage, Recipe
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


def distill_needs(method: str, run: DistillStage) -> tuple[str, ...]:
    """The stages a distill run of `method` with settings `run` needs finished first: where its responses
    and its teacher come from (D*, the scores of the golden responses, or the live teacher) and the phase-1
    student when it starts from it. The paper's methods keep their fixed rows in `stages`."""
    if method == "bd":
        return (run.dstar, "student_sft")
    on_dstar = method == "seqkd" or (method != "kd" and run.divergence.data == "dstar")
    if run.teacher_source == "live":
        needs = ["teacher_sft"] + ([run.dstar] if on_dstar else [])
    else:
        needs = [run.dstar if on_dstar else "score_train"]
    return tuple(needs + (["student_sft"] if run.init == "student_sft" else []))


def stages(recipe: Recipe) -> list[Stage]:
    """The pipeline for `recipe`, in the order it runs."""
    distill = recipe.stages.distill

    def ablation(name: str, changes: dict) -> Stage:
        run = DistillStage.model_validate({**distill.model_dump(exclude={"ablations"}), **changes})
        return Stage(f"distill/{name}", distill_needs(run.method if "method" in changes else "bd", run))

    # Beyond the paper: a divergence method runs when the recipe evaluates or judges it.
    wanted = {*recipe.stages.eval.models, *recipe.stages.judge.baselines, recipe.stages.judge.candidate}
    extras = [
        Stage(f"distill/{name}", distill_needs(name, distill))
        for name, method in METHODS.items()
        if not method.in_paper and f"distill/{name}" in wanted
    ]

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
        Stage("distill/bd", (distill.dstar, "student_sft")),
        *(ablation(name, changes) for name, changes in distill.ablations.runs().items()),
        Stage("distill/kd", ("score_train",)),
        Stage("distill/seqkd", (distill.dstar,)),
        # online: the student's own rollouts with the live teacher (stages.generate.model) mixed in
        Stage("distill/minillm", tuple(dict.fromkeys((*teacher, "student_sft")))),
        *extras,
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
