"""The one registry of distillation methods: what `bdctl distill --method` accepts, which stage runs
each, its model-card line and settings, and whether it is the paper's (docs/method.md §3, 4, 6) or
beyond it (the divergence menu of other toolkits, docs/method.md §5.1).

The recipe schema (`stages.distill.method`), the CLI (`--method`, completion), the run directory
(`rundir.stage_command`), the stage plan (`pipeline.stages`), the model card and the report all read
this table; adding a method is one entry here (plus its loss head and tests: docs/architecture.md,
"Adding a method"). Plain data, no imports: every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # --method NAME; it trains into runs/<name>/distill/<name>
    stage: str  # the stage module that runs it (bdctl/stages/<stage>.py)
    summary: str  # what it is, in words (model card, docs)
    in_paper: bool  # the paper's method or one of its baselines; False: labelled "beyond the paper"
    card_keys: tuple[str, ...] = ()  # stages.distill keys the model card lists
    divergence: str | None = None  # the menu's divergence (bdctl.objectives.divergences.NAMES)


_DIVERGENCE_KEYS = ("teacher_source",)  # and every key of stages.distill.divergence
_MENU = {
    "forward_kl": "forward KL(p || q) to the teacher at temperature tau (the KD of DistillKit and TRL's GKD at beta 0)",
    "reverse_kl": "reverse KL(q || p) to the teacher (TRL's GKD at beta 1, DistiLLM, DistillKit)",
    "jsd": "generalized Jensen-Shannon divergence JSD(beta) to the teacher (TRL's GKD)",
    "tvd": "total variation distance to the teacher (DistiLLM, DistillKit)",
    "skew_kl": "skew KL(p || a p + (1 - a) q) to the teacher (DistiLLM)",
    "skew_rkl": "skew reverse KL(q || a q + (1 - a) p) to the teacher (DistiLLM)",
}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "bd", "distill",
            "Bellman Distill (temporal-difference imitation learning on the teacher's top-p candidate sets)", True,
            ("variant", "p", "chi2", "alpha", "gamma", "q_min", "outside", "anchor_coef", "dstar", "teacher_source",
             "lm_coef", "pt_kd_ratio", "pretrain_term", "eps"),
        ),
        Method("kd", "distill", "word-level knowledge distillation (KD) on the golden responses", True,
               ("kd_ratio", "teacher_source", "pretrain_term")),
        Method("seqkd", "distill",
               "sequence-level knowledge distillation (SeqKD): fine-tuning on the teacher's data D*", True,
               ("seqkd_kd_ratio", "dstar", "teacher_source", "pretrain_term")),
        Method("minillm", "minillm",
               "MiniLLM (policy gradient on the student's own rollouts, reverse KL to the teacher)", True),
        *(Method(name, "distill", summary, False, _DIVERGENCE_KEYS, divergence=name)
          for name, summary in _MENU.items()),
    )
}  # fmt: skip

DIVERGENCES = tuple(_MENU)  # the menu's divergences; each is also a method of the same name


def method_names() -> str:
    return ", ".join(METHODS)


def beyond_paper(stage_dir: str) -> bool:
    """Whether a stage directory (e.g. distill/jsd) holds a method that is not the paper's."""
    method = METHODS.get(stage_dir.removeprefix("distill/")) if stage_dir.startswith("distill/") else None
    return method is not None and not method.in_paper
