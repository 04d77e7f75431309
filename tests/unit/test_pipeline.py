"""The stage plan, parameter counts from configs, and the ZeRO memory arithmetic."""

from __future__ import annotations

import pytest

from bdctl.models import build_tiny_model
from bdctl.models import count_parameters as built_parameters
from bdctl.pipeline import stages
from bdctl.recipe import load_recipe
from bdctl.recipe.schema import ModelSpec
from bdctl.sizes import count_parameters, inference_gib, model_config, training_gib_per_gpu
from tests.conftest import run_cli, write_recipe


def test_stage_order_and_dependencies():
    recipe, _ = load_recipe("smoke")
    plan = {s.directory: s for s in stages(recipe)}
    order = list(plan)
    assert (
        order.index("teacher_sft")
        < order.index("generate")
        < order.index("distill/bd")
        < order.index("eval")
        < order.index("judge")
    )
    assert set(plan["distill/bd"].needs) == {"generate", "student_sft"}
    assert plan["distill/kd"].command == "bdctl distill RECIPE --method kd"
    # MiniLLM is online: the phase-1 student and the fine-tuned teacher, no D*
    assert plan["distill/minillm"].command == "bdctl distill RECIPE --method minillm"
    assert set(plan["distill/minillm"].needs) == {"teacher_sft", "student_sft"}
    assert "distill/minillm" in recipe.stages.eval.models and "distill/minillm" in recipe.stages.judge.baselines


def test_ablations_are_named_bd_runs_with_one_setting_changed():
    recipe, _ = load_recipe("smoke", ["stages.distill.ablations={p: [1.0, 0.5], chi2: [false], variant: [released]}"])
    runs = recipe.stages.distill.ablations.runs()
    assert runs == {
        "bd-p1.0": {"p": 1.0},
        "bd-p0.5": {"p": 0.5},
        "bd-chi2-off": {"chi2": False},
        "bd-released": {"variant": "released"},
    }
    plan = {s.directory: s for s in stages(recipe)}
    assert plan["distill/bd-p0.5"].command == "bdctl distill RECIPE --ablation bd-p0.5"
    assert set(plan["distill/bd-chi2-off"].needs) == {"generate", "student_sft"}


@pytest.mark.slow  # runs `bdctl distill --dry-run` in a subprocess
def test_the_cli_runs_an_ablation_into_its_own_directory(tmp_path):
    # the CLI runs an ablation as BD with that one setting changed, into its own directory
    shown = run_cli(
        "distill", "smoke", "--ablation", "bd-chi2-off", "--dry-run",
        "--set", "stages.distill.ablations.chi2=[false]", cwd=tmp_path,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "runs/smoke/distill/bd-chi2-off/job.json" in shown.stdout + shown.stderr
    unknown = run_cli("distill", "smoke", "--ablation", "bd-p0.3", cwd=tmp_path)
    assert unknown.returncode == 2 and "--ablation bd-p0.3: no such run in stages.distill.ablations" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_study_ablations_name_their_settings_and_their_dstar(tmp_path):
    """docs/method.md §3.4's settings as ablations (issue 11): one run per value, plus named combinations;
    a run on the nucleus D* needs that D*'s own generate stage."""
    recipe, _ = load_recipe(
        "smoke",
        [
            "stages.generate.variants={nucleus: {top_p: 0.8}}",
            "stages.distill.ablations={outside: [drop], anchor_coef: [0.5], alpha: [1.0], dstar: [generate-nucleus], "
            "combined: {bd-nucleus-drop: {dstar: generate-nucleus, outside: drop}}}",
        ],
    )
    runs = recipe.stages.distill.ablations.runs()
    assert runs == {
        "bd-outside-drop": {"outside": "drop"}, "bd-anchor0.5": {"anchor_coef": 0.5}, "bd-alpha1.0": {"alpha": 1.0},
        "bd-dstar-nucleus": {"dstar": "generate-nucleus"},
        "bd-nucleus-drop": {"dstar": "generate-nucleus", "outside": "drop"},
    }  # fmt: skip
    plan = {s.directory: s for s in stages(recipe)}
    assert plan["generate-nucleus"].command == "bdctl generate RECIPE --variant nucleus"
    assert set(plan["distill/bd-nucleus-drop"].needs) == {"generate-nucleus", "student_sft"}
    assert set(plan["distill/bd-outside-drop"].needs) == {"generate", "student_sft"}


@pytest.mark.slow  # runs `bdctl distill --dry-run` in a subprocess
def test_the_cli_runs_a_combined_ablation_alone(tmp_path):
    shown = run_cli(
        "distill", "smoke", "--ablation", "bd-nucleus-drop", "--dry-run",
        "--set", "stages.generate.variants={nucleus: {top_p: 0.8}}",
        "--set", "stages.distill.ablations={combined: {bd-nucleus-drop: {dstar: generate-nucleus, outside: drop}}}",
        cwd=tmp_path,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "runs/smoke/distill/bd-nucleus-drop/job.json" in shown.stdout + shown.stderr
    # an ablation runs alone: drop beside a released-variant run of the same recipe is no clash
    released = run_cli(
        "distill", "smoke", "--ablation", "bd-released", "--dry-run",
        "--set", "stages.distill.ablations={variant: [released], outside: [drop]}", cwd=tmp_path,
    )  # fmt: skip
    assert released.returncode == 0, released.stderr


def test_zero_memory_arithmetic():
    billion = 10**9
    assert training_gib_per_gpu(billion, 4, 3, "bf16") == pytest.approx(16 * billion / 4 / 2**30)
    assert training_gib_per_gpu(billion, 4, 2, "bf16") == pytest.approx((2 * billion + 14 * billion / 4) / 2**30)
    assert (
        training_gib_per_gpu(billion, 1, 2, "fp32")
        == training_gib_per_gpu(billion, 1, 3, "fp32")
        == pytest.approx(16 * billion / 2**30)
    )
    assert inference_gib(billion, "bf16") == pytest.approx(2 * billion / 2**30)


def test_parameter_counts_from_tiny_specs_and_local_directories(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config

    recipe, _ = load_recipe("smoke", ["models.tokenizer.train.vocab_size=400"])
    spec = recipe.models.teacher
    built = build_tiny_model(spec.tiny, tiny_tokenizer, seed=0)  # the fixture's tokenizer has 400 tokens
    assert count_parameters(model_config(spec, recipe)) == built_parameters(built)
    built.save_pretrained(tmp_path / "teacher")
    local, _ = load_recipe(str(write_recipe(tmp_path / "r.yaml", models__teacher={"path": str(tmp_path / "teacher")})))
    assert count_parameters(model_config(local.models.teacher, local)) == built_parameters(built)
    # A hub id is read from the local cache only, never the network: one that is not there has no config.
    hub, _ = load_recipe("gpt2-1.5b-to-120m")
    assert model_config(ModelSpec(path="bdctl-tests/not-in-any-cache"), hub) is None
    # The paper's 1.5B teacher (gpt2-xl's shape, its config alone in a local directory): 1,557,611,200 parameters.
    xl_config = GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)
    xl_config.save_pretrained(tmp_path / "gpt2-xl")
    xl, _ = load_recipe("gpt2-1.5b-to-120m", [f"models.teacher.path={tmp_path / 'gpt2-xl'}"])
    assert count_parameters(model_config(xl.models.teacher, xl)) == 1_557_611_200


@pytest.mark.slow  # runs `bdctl recipes` in a subprocess
def test_recipes_list_and_show(tmp_path):
    listed = run_cli("recipes", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "gpt2-1.5b-to-120m" in listed.stdout and "smoke" in listed.stdout
    shown = run_cli("recipes", "show", "smoke", "--gpus", "2", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "bdctl generate" in shown.stdout and "distill/bd" in shown.stdout and "ZeRO-3" in shown.stdout
    assert "model states on 2 GPUs" in shown.stdout


def test_reproduce_reruns_eval_and_judge_when_the_recipe_asks_for_more(tmp_path):
    """eval keeps its finished units, so a reproduce with another model, protocol, set or seed runs
    it again (it generates only what is new); other stages count as finished once they are."""
    from bdctl.reproduce import finished
    from bdctl.rundir import RunDir, mark_complete

    recipe, _ = load_recipe("smoke", ["stages.eval.models=[teacher_sft, student_sft]", "stages.eval.seeds=[10, 20]"])
    run = RunDir(tmp_path)
    assert not finished(run, "eval", recipe)
    mark_complete(run.stage("eval"), stage="eval", models=["teacher_sft", "student_sft"], protocols=["minillm"],
                  sets=["dolly"], seeds=[10, 20])  # fmt: skip
    assert finished(run, "eval", recipe)
    more = load_recipe(
        "smoke", ["stages.eval.models=[teacher_sft, student_sft, distill/bd]", "stages.eval.seeds=[10, 20]"]
    )[0]
    assert not finished(run, "eval", more)
    protocols = load_recipe(
        "smoke", ["stages.eval.models=[teacher_sft, student_sft]", "stages.eval.seeds=[10, 20]",
                  "stages.eval.protocols=[{name: minillm}, {name: release, top_p: 0.8}]"],
    )[0]  # fmt: skip
    assert not finished(run, "eval", protocols)
    mark_complete(run.stage("judge"), stage="judge", candidate="distill/bd", baselines=["student_sft"])
    assert not finished(run, "judge", recipe)  # smoke judges against three baselines
    mark_complete(run.stage("teacher_sft"), stage="teacher_sft")
    assert finished(run, "teacher_sft", recipe)


def test_a_teacher_given_as_a_path_waits_for_no_teacher_sft(tmp_path):
    """`stages.generate.model` names the teacher generate, score_train and MiniLLM use: a path
    (or a hub id) is there already, so `recipes show` must not plan them after teacher_sft."""
    from typer.testing import CliRunner

    from bdctl.cli import app

    recipe, _ = load_recipe("smoke", [f"stages.generate.model={tmp_path / 'teacher'}"])
    plan = {s.directory: s for s in stages(recipe)}
    assert plan["generate"].needs == () and plan["score_train"].needs == ()
    assert plan["distill/minillm"].needs == ("student_sft",)
    shown = CliRunner().invoke(
        app, ["recipes", "show", "smoke", "--set", f"stages.generate.model={tmp_path / 'teacher'}"],
        env={"COLUMNS": "300", "NO_COLOR": "1"}, prog_name="bdctl",
    )  # fmt: skip
    assert shown.exit_code == 0, shown.output
    cells = [line.split("│") for line in shown.output.splitlines()]
    needs = {row[1].strip(): row[3].strip() for row in cells if len(row) == 5}
    assert needs["generate"] == needs["score_train"] == "-" and needs["distill/minillm"] == "student_sft"
