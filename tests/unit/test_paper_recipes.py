"""The paper recipes encode docs/method.md §9 and the paper's appendix B, setting by setting."""

from __future__ import annotations

import pytest

from bdctl.recipe import load_recipe
from tests.conftest import RECIPES

# docs/method.md §9: family, teacher, students, p, pretraining corpus
PAPER = {
    "gpt2-1.5b-to-120m": ("gpt2-xl", "gpt2", 0.8, "openwebtext"),
    "gpt2-1.5b-to-340m": ("gpt2-xl", "gpt2-medium", 0.8, "openwebtext"),
    "gpt2-1.5b-to-760m": ("gpt2-xl", "gpt2-large", 0.8, "openwebtext"),
    "opt-6.7b-to-125m": ("facebook/opt-6.7b", "facebook/opt-125m", 0.8, "roberta"),
    "opt-6.7b-to-350m": ("facebook/opt-6.7b", "facebook/opt-350m", 0.8, "roberta"),
    "opt-6.7b-to-1.3b": ("facebook/opt-6.7b", "facebook/opt-1.3b", 0.5, "roberta"),
    "qwen2.5-3b-to-0.5b": ("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-0.5B", 0.8, "openwebtext"),
}


def test_there_is_a_recipe_for_every_pair_of_the_paper():
    shipped = {p.stem for p in RECIPES.glob("*.yaml")} - {
        "tiny",
        "smoke",
        "smollm2-cpu",
    }  # smollm2-cpu: real, not the paper's
    assert shipped == set(PAPER)


# the release's training regime where the paper is silent (docs/method.md §4.1), and the values the paper states
RELEASE_REGIME = (
    "stages.distill.pt_kd_ratio",
    "stages.distill.eval_every",
    "stages.distill.adam_betas",
    "stages.distill.weight_decay",
    "stages.distill.schedule",
    "stages.distill.warmup_steps",
    "stages.distill.schedule_steps",
    "stages.distill.eps",
    "stages.distill.lr",
    "stages.distill.batch_size",
    "stages.distill.epochs",
)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name):
    teacher, student, p, corpus = PAPER[name]
    recipe, path = load_recipe(name)
    text = path.read_text()
    assert text.startswith("# Paper recipe:") and f"bdctl distill {name} --method bd" in text
    assert "Paper's Rouge-L" in text
    assert recipe.models.teacher.path == teacher and recipe.models.student.path == student
    assert recipe.models.tokenizer.path is None and recipe.models.tokenizer.train is None  # the teacher's own

    data = recipe.data
    assert data.source.hub == "databricks/databricks-dolly-15k"
    assert (data.source.fields.instruction, data.source.fields.input, data.source.fields.output) == (
        "instruction",
        "context",
        "response",
    )
    assert (data.split.valid, data.split.test) == (500, 500)
    assert (data.max_length, data.max_prompt_length) == (512, 256)
    if corpus == "openwebtext":
        assert data.pretrain.hub == "Skylion007/openwebtext"
    else:
        assert data.pretrain.path is not None and "roberta" in data.pretrain.path

    distill = recipe.stages.distill
    assert (distill.method, distill.variant, distill.teacher_source) == ("bd", "paper", "cache")
    assert (distill.p, distill.alpha, distill.gamma, distill.q_min, distill.chi2) == (p, 0.1, 0.99, -10.0, True)
    assert (distill.lr, distill.batch_size, distill.epochs) == (5e-6, 64, 3)
    assert distill.lm_coef == 1.0 and distill.select == "rouge_l"  # phase 2
    # where the paper is silent: the release's regime (docs/method.md §4.1), each value with its source
    assert (distill.pt_kd_ratio, distill.eval_every, distill.adam_betas, distill.weight_decay) == (
        0.5,
        100,
        (0.9, 0.95),
        1e-6,
    )
    assert (distill.schedule, distill.warmup_steps, distill.schedule_steps, distill.eps) == ("cosine", 100, 5000, 1e-6)
    for key in RELEASE_REGIME:
        assert key in recipe.sources, key
    # ... and the paper-faithful regime as a labelled ablation
    paper_regime = distill.ablations.runs()["bd-paper-regime"]
    assert paper_regime == {
        "pt_kd_ratio": 0.0,
        "eval_every": 0,
        "adam_betas": None,
        "weight_decay": 0.0,
        "schedule": "linear",
        "warmup_steps": None,
        "schedule_steps": None,
    }
    assert "distill/bd-paper-regime" in recipe.stages.eval.models
    assert recipe.stages.student_sft.epochs == 3 and recipe.stages.student_sft.select == "val_loss"  # phase 1

    generate = recipe.stages.generate
    assert (generate.n_samples, generate.temperature, generate.cache_top_p) == (8, 1.0, p)

    evaluation = recipe.stages.eval
    assert evaluation.seeds == [10, 20, 30, 40, 50]
    assert [s.name for s in evaluation.sets] == ["dolly", "selfinst", "vicuna"]
    assert evaluation.sets[0].split == "test"
    assert {"student_sft", "distill/kd", "distill/seqkd", "distill/bd"} <= set(evaluation.models)
    assert recipe.stages.judge.api_model == "gpt-4o-mini"

    # one node of 4 GPUs: the global batch of 64 splits into micro batch x accumulation x 4
    for stage in (recipe.stages.teacher_sft, recipe.stages.student_sft, distill):
        assert stage.batch_size % (stage.micro_batch_size * 4) == 0
    assert recipe.deepspeed.config == "zero3" and recipe.deepspeed.precision == "bf16"


# docs/method.md §9's headline figures (Dolly, SelfInst, Vicuna), and which ablations each paper table ran
HEADLINE = {
    "gpt2-1.5b-to-120m": {"distill/bd": (24.7, 13.3, 16.2), "teacher_sft": (27.6, 14.3, 16.3)},
    "opt-6.7b-to-125m": {"distill/bd": (25.1, 11.4, 14.8), "teacher_sft": (27.6, 16.4, 17.8)},
    "qwen2.5-3b-to-0.5b": {"distill/bd": (27.8, 19.5, 20.7), "teacher_sft": (28.8, 24.1, 21.0)},
}
ABLATIONS = {  # Table 2 (p) on GPT-2 340M, OPT 125M, Qwen 0.5B; Table 4 (chi^2) on GPT-2 760M, Qwen 0.5B
    "gpt2-1.5b-to-340m": {"bd-p1.0", "bd-p0.5"},
    "gpt2-1.5b-to-760m": {"bd-chi2-off"},
    "opt-6.7b-to-125m": {"bd-p1.0", "bd-p0.5"},
    "qwen2.5-3b-to-0.5b": {"bd-p1.0", "bd-p0.5", "bd-chi2-off", "bd-released"},
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_numbers_and_ablations(name):
    recipe, _ = load_recipe(name)
    paper = recipe.paper_rouge_l
    for model, scores in HEADLINE.get(name, {}).items():
        assert (paper[model]["dolly"], paper[model]["selfinst"], paper[model]["vicuna"]) == scores
    assert {"teacher_sft", "student_sft", "distill/kd", "distill/seqkd", "distill/bd"} <= set(paper)
    runs = recipe.stages.distill.ablations.runs()
    assert set(runs) == ABLATIONS.get(name, set()) | {"bd-paper-regime"}  # + the paper-faithful regime
    assert {f"distill/{run}" for run in runs} <= set(recipe.stages.eval.models)  # evaluated side by side
    # the cache holds the sets of every p < 1 the runs use (smaller p: prefixes of the cached sets;
    # p = 1 needs no sets)
    masked = [p for p in [recipe.stages.distill.p, *recipe.stages.distill.ablations.p] if p < 1]
    assert recipe.stages.generate.cache_top_p >= max(masked)


# Table 1's MiniLLM row (Dolly, SelfInst, Vicuna); the GPT-2 numbers are MiniLLM's own (Gu et al. 2023)
MINILLM = {
    "gpt2-1.5b-to-120m": (24.6, 13.2, 16.9),
    "gpt2-1.5b-to-340m": (25.4, 15.6, 17.7),
    "gpt2-1.5b-to-760m": (26.4, 15.9, 18.3),
    "opt-6.7b-to-125m": (23.8, 10.2, 15.3),
    "opt-6.7b-to-350m": (24.3, 11.5, 17.9),
    "opt-6.7b-to-1.3b": (26.2, 13.7, 16.7),
    "qwen2.5-3b-to-0.5b": (26.7, 19.1, 20.5),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_paper_recipe_runs_minillm_with_the_papers_settings(name):
    """docs/method.md §6: lr 5e-6, 100 warm-up steps, AdamW (0.9, 0.95), weight decay 1e-6, validation every 100
    steps, at most 5000 steps, 256 rollouts, 4 PPO epochs; evaluated, judged (Figure 2) and compared with Table 1."""
    from bdctl.stages.minillm import stage_config

    recipe, path = load_recipe(name, ["stages.distill.method=minillm"])  # validated as `--method minillm` loads it
    assert f"bdctl distill {name} --method minillm" in path.read_text()
    own = recipe.stages.distill.minillm
    assert (own.teacher_mix, own.reward_scale, own.reward_clip, own.discount, own.ppo_clip) == (
        0.2,
        0.5,
        100.0,
        0.95,
        0.2,
    )
    assert own.length_norm and own.whiten and own.single_step
    assert (own.num_rollouts, own.ppo_epochs, own.pt_kd_ratio, own.max_new_tokens) == (256, 4, 0.5, 256)
    assert (own.warmup_steps, own.adam_betas) == (100, (0.9, 0.95))

    class Job:  # stage_config reads the recipe only
        pass

    job = Job()
    job.recipe = recipe
    effective = stage_config(job)
    assert (effective.lr, effective.weight_decay, effective.eval_every, effective.max_steps) == (5e-6, 1e-6, 100, 5000)
    assert (effective.adam_betas, effective.warmup_steps, effective.warmup_ratio) == ((0.9, 0.95), 100, 0.0)
    assert effective.select == "rouge_l" and effective.grad_clip == 1.0 and effective.lm_coef == 1.0
    # BD's own settings are untouched by MiniLLM's
    assert recipe.stages.distill.max_steps is None
    assert "distill/minillm" in recipe.stages.eval.models and "distill/minillm" in recipe.stages.judge.baselines
    scores = recipe.paper_rouge_l["distill/minillm"]
    assert (scores["dolly"], scores["selfinst"], scores["vicuna"]) == MINILLM[name]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipes_show_prints_the_release_regime_with_its_sources(name):
    """`bdctl recipes show` (in-process) prints each sourced setting beside its value and source."""
    from typer.testing import CliRunner

    from bdctl.cli import app

    result = CliRunner().invoke(app, ["recipes", "show", name], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    recipe, _ = load_recipe(name)
    for key in RELEASE_REGIME:
        row = next(line for line in lines if f" {key} " in line and recipe.sources[key][:40] in line)
        assert ("cosine" if key.endswith(".schedule") else "") in row
    row = next(line for line in lines if " stages.distill.pt_kd_ratio " in line)
    assert " 0.5 " in row and "scripts/train_0.5B_3B.sh:53" in row
    row = next(line for line in lines if " stages.distill.eps " in line)
    assert "bdctl's choice" in row


def test_a_source_for_a_setting_that_does_not_exist_is_refused():
    from bdctl.errors import UserError

    with pytest.raises(UserError, match=r"sources: 'stages.distill.warmup' is not a recipe setting \('warmup'"):
        load_recipe("qwen2.5-3b-to-0.5b", ['sources={"stages.distill.warmup": "release"}'])
