"""The one registry of distill methods (bdctl/methods.py) and what reads it: the schema, the CLI, the
run directory's commands, the stage plan, the report and the model card; the divergence menu's
settings refused with one line (in-process, no DeepSpeed)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bdctl.cli import app
from bdctl.errors import UserError
from bdctl.methods import DIVERGENCES, METHODS, beyond_paper
from bdctl.modelcard import METHOD_NAMES
from bdctl.objectives.divergences import NAMES
from bdctl.pipeline import stages
from bdctl.recipe import load_recipe
from bdctl.report import label
from bdctl.rundir import stage_command
from bdctl.stages import STAGES
from bdctl.stages.distill import METHODS as DISTILL_STAGE_METHODS


def error_of(*overrides: str) -> str:
    with pytest.raises(UserError) as info:
        load_recipe("smoke", list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_registry_is_the_menu_and_every_method_has_a_stage():
    assert DIVERGENCES == NAMES
    assert all(METHODS[name].divergence == name and not METHODS[name].in_paper for name in DIVERGENCES)
    assert [m for m in METHODS if METHODS[m].in_paper] == ["bd", "kd", "seqkd", "minillm"]
    assert all(method.stage in STAGES for method in METHODS.values())
    assert set(DISTILL_STAGE_METHODS) == set(METHODS) - {"minillm"}
    assert set(METHOD_NAMES) == {"sft", *METHODS}
    assert "beyond the paper" in METHOD_NAMES["jsd"] and "beyond the paper" not in METHOD_NAMES["kd"]


def test_commands_labels_and_the_plan_come_from_the_registry():
    assert stage_command("distill/jsd", "R") == "bdctl distill R --method jsd"
    assert stage_command("distill/bd-paper", "R") == "bdctl distill R --ablation bd-paper"
    assert beyond_paper("distill/tvd") and not beyond_paper("distill/kd") and not beyond_paper("distill/bd-paper")
    assert label("distill/skew_kl") == "distill/skew_kl (beyond the paper)" and label("distill/bd") == "distill/bd"

    recipe, _ = load_recipe("smoke")
    plain = [s.directory for s in stages(recipe)]
    assert not any(beyond_paper(d) for d in plain)  # a recipe that evaluates none runs none
    recipe, _ = load_recipe("smoke", ["stages.eval.models=[student_sft, distill/jsd]"])
    (jsd,) = [s for s in stages(recipe) if s.directory == "distill/jsd"]
    assert jsd.needs == ("score_train",) and jsd.command == "bdctl distill RECIPE --method jsd"
    recipe, _ = load_recipe(
        "smoke",
        [
            "stages.judge.baselines=[distill/tvd]",
            "stages.distill.divergence.data=dstar",
            "stages.distill.teacher_source=live",
            "stages.distill.init=student_sft",
        ],
    )
    (tvd,) = [s for s in stages(recipe) if s.directory == "distill/tvd"]
    assert tvd.needs == ("teacher_sft", "generate", "student_sft")


def test_tiny_recipe_runs_a_few_of_the_menu():
    recipe, _ = load_recipe("tiny")
    extra = [s.directory for s in stages(recipe) if beyond_paper(s.directory)]
    assert len(extra) >= 2 and all(d in recipe.stages.eval.models for d in extra)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stages.distill.method=kl"], "stages.distill.method: unknown method 'kl': expected one of bd,"),
        (
            ["stages.distill.method=jsd", "stages.distill.divergence.on_policy=0.5"],
            "on-policy mixing (GKD's lambda) is not implemented yet; set 0",
        ),
        (
            ["stages.distill.method=tvd", "stages.distill.divergence.temperature=2"],
            "the teacher cache holds probabilities at temperature 1 only; set teacher_source: live",
        ),
        (["stages.distill.divergence.jsd_beta=1.5"], "stages.distill.divergence.jsd_beta"),
        (["stages.distill.divergence.skew_alpha=1"], "stages.distill.divergence.skew_alpha"),
        (["stages.distill.divergence.data=teacher"], "stages.distill.divergence.data"),
    ],
)
def test_bad_divergence_settings_are_one_line(overrides, expected):
    assert expected in error_of(*overrides)


def test_valid_divergence_settings_load():
    recipe, _ = load_recipe(
        "smoke",
        [
            "stages.distill.method=skew_rkl",
            "stages.distill.teacher_source=live",
            "stages.distill.divergence.temperature=2",
        ],
    )
    assert recipe.stages.distill.divergence.temperature == 2
    # on_policy > 0 matters only to a divergence method; another method's recipe may keep it
    load_recipe("smoke", ["stages.distill.divergence.on_policy=0.5"])


def test_the_cli_refuses_an_unknown_method_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["distill", "smoke", "--method", "kl"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 2
    assert "--method kl: no such method; expected one of bd, kd, seqkd, minillm, forward_kl" in result.output
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- ablations of any method (issue 21 item 5)

ABLATED = (
    "stages.distill.ablations={combined: {jsd-beta0.9: {method: jsd, divergence: {jsd_beta: 0.9}}, "
    "kd-lr1e-4: {method: kd, lr: 1.0e-4, init: student_sft}}}"
)


def test_a_combined_run_may_ablate_another_method():
    recipe, _ = load_recipe("smoke", [ABLATED, "stages.eval.models=[distill/jsd, distill/jsd-beta0.9, distill/kd]"])
    plan = {s.directory: s for s in stages(recipe)}
    assert plan["distill/jsd-beta0.9"].needs == ("score_train",)
    assert plan["distill/kd-lr1e-4"].needs == ("score_train", "student_sft")
    assert plan["distill/kd-lr1e-4"].command == "bdctl distill RECIPE --ablation kd-lr1e-4"
    assert plan["distill/jsd"].needs == ("score_train",)

    from bdctl.report import rouge_tables

    def score(mean):
        return {"dolly": {"mean": mean, "std": 0.5, "per_seed": {}, "prompts": 32}}

    models = ["distill/kd", "distill/jsd", "distill/jsd-beta0.9"]
    results = {
        "sets": ["dolly"], "seeds": [10], "models": models,
        "protocols": [{"name": "minillm", "temperature": 1.0, "top_p": 1.0, "top_k": 0}],
        "scores": {"minillm": {m: score(20.0 + i) for i, m in enumerate(models)}},
    }  # fmt: skip
    text = "\n".join(rouge_tables(results, recipe))
    assert "| distill/jsd (beyond the paper) | 21.00 ± 0.50 |" in text
    assert "(beyond the paper): a divergence of other toolkits' menu" in text
    table = text[text.index("### Ablations of jsd, protocol minillm") :]
    assert "| distill/jsd (beyond the paper) | the recipe's stages.distill | 21.00 ± 0.50 |" in table
    assert "| distill/jsd-beta0.9 | divergence = {'jsd_beta': 0.9} | 22.00 ± 0.50 |" in table
    assert "### Ablations, protocol" not in text  # no BD ablation here


@pytest.mark.parametrize(
    ("combined", "expected"),
    [
        ("{jsd: {method: jsd}}", "stages.distill.ablations (jsd): the run name is a method's"),
        ("{mini-x: {method: minillm}}", "method minillm: ablations run the distill stage's methods only"),
        ("{x: {method: nope}}", "stages.distill.ablations (x): method: Value error, unknown method 'nope'"),
    ],
)
def test_bad_ablation_runs_are_one_line(combined, expected):
    assert expected in error_of(f"stages.distill.ablations={{combined: {combined}}}")


def test_the_cli_runs_an_ablation_of_its_own_method_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["distill", "smoke", "--ablation", "kd-lr1e-4", "--method", "bd", "--set", ABLATED]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 2
    assert "--ablation kd-lr1e-4 is a run of --method kd; drop --method bd" in result.output
