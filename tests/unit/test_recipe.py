"""Recipe loading: validation errors name the file and key path; overrides; lookup by name."""

from __future__ import annotations

import pytest
import yaml

from bdctl.errors import UserError
from bdctl.recipe import dump_recipe, find_recipe, load_recipe
from tests.conftest import RECIPES, write_recipe


def error_of(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe, found = load_recipe(str(path))
    assert found == path and recipe.name == path.stem
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "each recipe opens with a comment giving its command"


def test_wrong_type_names_file_key_and_value(tmp_path):
    path = write_recipe(tmp_path / "x.yaml", stages__teacher_sft__lr="fast")
    assert error_of(str(path)) == f"{path}: stages.teacher_sft.lr: expected a number, got 'fast'"


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    path = write_recipe(tmp_path / "x.yaml", stages__teacher_sft__lrate=0.1)
    message = error_of(str(path))
    assert message.startswith(f"{path}: stages.teacher_sft.lrate: unknown key (did you mean 'lr'?")
    assert "warmup_ratio" in message  # lists what is allowed


def test_unknown_top_level_key(tmp_path):
    path = write_recipe(tmp_path / "x.yaml", stagez={})
    assert error_of(str(path)).startswith(f"{path}: stagez: unknown key (did you mean 'stages'?")


def test_missing_key_and_literal_choices(tmp_path):
    raw = yaml.safe_load((RECIPES / "smoke.yaml").read_text())
    del raw["models"]["student"]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    assert error_of(str(tmp_path / "m.yaml")) == f"{tmp_path / 'm.yaml'}: models.student: missing required key"
    path = write_recipe(tmp_path / "a.yaml", models__teacher__tiny__arch="bert")
    assert "models.teacher.tiny.arch: expected one of 'gpt2', 'opt' or 'qwen2', got 'bert'" in error_of(str(path))


def test_cross_field_rules(tmp_path):
    path = write_recipe(tmp_path / "b.yaml", stages__teacher_sft__batch_size=10)
    assert "stages.teacher_sft: batch_size (10) must be a multiple of micro_batch_size (8)" in error_of(str(path))
    path = write_recipe(
        tmp_path / "c.yaml",
        models__teacher={"path": "gpt2", "tiny": {"arch": "gpt2", "layers": 1, "hidden": 8, "heads": 2}},
    )
    assert "models.teacher: a model needs exactly one of path, tiny" in error_of(str(path))
    path = write_recipe(tmp_path / "d.yaml", stages__distill__p=1.5)
    assert "stages.distill.p: input should be less than or equal to 1, got 1.5" in error_of(str(path))


def test_set_overrides_are_typed_and_validated():
    recipe, _ = load_recipe("smoke", ["stages.teacher_sft.lr=1e-2", "stages.distill.chi2=false", "data.split.seed=9"])
    assert recipe.stages.teacher_sft.lr == 0.01 and recipe.stages.distill.chi2 is False and recipe.data.split.seed == 9
    message = error_of("smoke", ["stages.teacher_sft.lr=fast"])
    assert message.endswith("(--set stages.teacher_sft.lr=fast): stages.teacher_sft.lr: expected a number, got 'fast'")
    assert "--set stages.nope.x=1" in error_of("smoke", ["stages.nope.x=1"])
    assert error_of("smoke", ["novalue"]) == "--set novalue: expected key.path=value"
    assert error_of("smoke", ["seed.x=1"]) == "--set seed.x=1: seed is not a section"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.student_sft.epochs=true", "stages.student_sft.epochs: expected a number, got true"),
        ("stages.teacher_sft.lr=false", "stages.teacher_sft.lr: expected a number, got false"),
        ("stages.eval.seeds=[10, true]", "stages.eval.seeds: expected a number, got [10, true]"),
        ("models.teacher.tiny.seed=true", "models.teacher.tiny.seed: expected a number, got true"),
        ("seed=18446744073709551616", "seed: input should be less than 18446744073709551616"),
        ("seed=-1", "seed: input should be greater than or equal to 0"),
        ("data.split.seed=-5", "data.split.seed: input should be greater than or equal to 0"),
    ],
)
def test_booleans_are_not_numbers_and_seeds_fit_the_generators(override, expected):
    """pydantic's lax mode would read `epochs: true` as 1; a seed over 64 bits (or negative) would
    pass validation and crash in torch.manual_seed / numpy's default_rng a minute later."""
    assert expected in error_of("smoke", [override])


def test_numbers_written_as_strings_and_real_booleans_still_load(tmp_path):
    recipe, _ = load_recipe("smoke", ["stages.student_sft.epochs=2", "seed=18446744073709551615"])
    assert recipe.stages.student_sft.epochs == 2 and recipe.seed == 2**64 - 1
    path = write_recipe(tmp_path / "x.yaml", stages__teacher_sft__lr="1e-4", stages__distill__chi2=False)
    recipe, _ = load_recipe(str(path))
    assert recipe.stages.teacher_sft.lr == 1e-4 and recipe.stages.distill.chi2 is False
    import torch

    torch.manual_seed(2**64 - 1)  # the largest accepted seed fits the generator it reaches


def test_lookup_by_name_and_missing_files(tmp_path):
    assert find_recipe("smoke") == RECIPES / "smoke.yaml"
    assert error_of(str(tmp_path / "none.yaml")) == f"{tmp_path / 'none.yaml'}: recipe file not found"
    assert error_of("no-such-recipe").startswith("no-such-recipe: no such recipe file or name (known names: ")


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodels: [unclosed\n")
    assert error_of(str(path)).startswith(f"{path}: line ")


def test_dump_round_trips(tmp_path):
    recipe, _ = load_recipe("smoke")
    (tmp_path / "resolved.yaml").write_text(dump_recipe(recipe))
    again, _ = load_recipe(str(tmp_path / "resolved.yaml"))
    assert again == recipe


def _fingerprint(stage_name: str, overrides: list[str]) -> str:
    from bdctl.job import Job

    recipe, path = load_recipe(str(RECIPES / "smoke.yaml"), overrides)
    return Job(
        stage="x",
        options={},
        recipe=recipe,
        recipe_path=str(path),
        run_root="runs/x",
        stage_name=stage_name,
        world_size=1,
    ).fingerprint()


def test_resume_fingerprint_covers_the_stage_and_its_inputs_only():
    by_loss = ["stages.distill.select=val_loss"]
    base = _fingerprint("distill/bd", by_loss)
    # the stage's own section (distill/bd reads stages.distill) and what made its training data
    assert _fingerprint("distill/bd", [*by_loss, "stages.distill.lr=0.1"]) != base
    assert _fingerprint("distill/bd", [*by_loss, "stages.generate.cache_max_k=7"]) != base
    # other stages, and eval unless the stage selects by Rouge-L (which samples with eval's settings)
    assert _fingerprint("distill/bd", [*by_loss, "stages.teacher_sft.lr=0.1"]) == base
    assert _fingerprint("distill/bd", [*by_loss, "stages.eval.max_new_tokens=7"]) == base
    rouge = _fingerprint("distill/bd", ["stages.distill.select=rouge_l"])
    assert _fingerprint("distill/bd", ["stages.distill.select=rouge_l", "stages.eval.max_new_tokens=7"]) != rouge
    # the scoring stage is configured by stages.generate
    assert _fingerprint("score_train", ["stages.generate.cache_max_k=7"]) != _fingerprint("score_train", [])
    assert _fingerprint("student_sft", ["stages.student_sft.lr=0.1"]) != _fingerprint("student_sft", [])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "stages.distill.select_protocol=release",
            "stages.distill.select_protocol: 'release' is not a stages.eval protocol (minillm)",
        ),
        (
            "stages.eval.protocols=[{name: a}, {name: a, top_p: 0.8}]",
            "stages.eval: protocols: two protocols share a name (a, a)",
        ),
        ("stages.eval.protocols=[{name: a, top_p: 1.5}]", "stages.eval.protocols.0.top_p"),
        ("stages.eval.protocols=[{name: a, top_p: 0}]", "stages.eval.protocols.0.top_p"),
        ("stages.eval.protocols=[]", "protocols is empty"),
        ("stages.eval.protocols=[{name: 'a b'}]", "stages.eval.protocols.0.name"),
        ("stages.generate.top_p=0", "stages.generate.top_p"),
        ("stages.generate.top_p=1.2", "stages.generate.top_p"),
        ("stages.distill.outside=ignore", "stages.distill.outside"),
        ("stages.distill.anchor_coef=-1", "stages.distill.anchor_coef"),
        # the loss functions raise ValueError (a traceback); the schema gives the user's one line
        ("stages.distill.q_min=-.inf", "stages.distill.q_min: input should be a finite number"),
        ("stages.distill.dstar=generate-nucleus", "dstar 'generate-nucleus' is not a D* of this recipe (generate)"),
        ("stages.judge.protocol=release", "stages.judge.protocol: 'release' is not a stages.eval protocol"),
        ("stages.distill.ablations={combined: {bd-x: {outside: nope}}}", "stages.distill.ablations (bd-x): outside"),
        ("stages.distill.ablations={outside: [drop], variant: [released]}", None),
    ],
)
def test_sampling_protocol_and_eq17_settings_are_validated(override, expected):
    """Issue 11 item 9: one line naming the key for each bad protocol / D* / Eq. 17 setting."""
    if expected is None:  # a valid combination: drop with the paper variant, released as its own run
        load_recipe("smoke", [override])
        return
    message = error_of("smoke", [override])
    assert expected in message, message
    assert "\n" not in message


def test_outside_drop_with_released_or_live_sets_is_refused():
    assert "paper variant" in error_of("smoke", ["stages.distill.variant=released", "stages.distill.outside=drop"])
    assert "teacher_source: cache" in error_of(
        "smoke", ["stages.distill.teacher_source=live", "stages.distill.outside=drop"]
    )


def test_released_eps_ablation_runs_the_released_variant_at_each_epsilon():
    from bdctl.recipe.schema import Ablations

    runs = Ablations(released_eps=[1e-6, 1e-4]).runs()
    assert runs == {
        "bd-released-eps1e-06": {"variant": "released", "eps": 1e-6},
        "bd-released-eps0.0001": {"variant": "released", "eps": 1e-4},
    }
