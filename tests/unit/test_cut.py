"""Students cut from their teacher (bdctl/cut.py, docs/method.md §12): the layer-choice rules as a
table, the cut model's logits against running the chosen layers of the teacher by hand (embed ->
chosen blocks -> final norm -> head) on gpt2, opt, qwen2 and llama, the student built once into the
run directory with the shared tokenizer and a manifest, and the bad choices in one line each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bdctl.cut import choose_layers, cut
from bdctl.errors import UserError
from bdctl.models import build_models
from bdctl.recipe import load_recipe
from bdctl.recipe.schema import FromTeacher

sys.path.insert(0, str(Path(__file__).parents[1]))
from gguf_files import tiny_hf_model, write_gguf  # noqa: E402


@pytest.mark.parametrize(
    ("spec", "total", "expected"),
    [
        ({"keep": 8, "how": "even"}, 30, [0, 4, 8, 12, 17, 21, 25, 29]),  # round(i * 29 / 7), halves up
        ({"keep": 8, "how": "ends"}, 30, [0, 1, 2, 3, 4, 27, 28, 29]),  # the "first five plus last three"
        ({"keep": 3, "how": "even"}, 5, [0, 2, 4]),
        ({"keep": 4, "how": "even"}, 7, [0, 2, 4, 6]),
        ({"keep": 3, "how": "even"}, 4, [0, 2, 3]),  # 1.5 rounds up to 2
        ({"keep": 1, "how": "even"}, 6, [0]),
        ({"keep": 2, "how": "ends"}, 6, [4, 5]),  # k <= 3: the last k
        ({"keep": 4, "how": "ends"}, 6, [0, 3, 4, 5]),
        ({"keep": 6, "how": "ends"}, 6, [0, 1, 2, 3, 4, 5]),  # all of them
        ({"keep": 6}, 6, [0, 1, 2, 3, 4, 5]),  # how defaults to even
        ({"layers": [0, 1, 2, 3, 4, 27, 28, 29]}, 30, [0, 1, 2, 3, 4, 27, 28, 29]),
    ],
)
def test_layer_choice(spec, total, expected):
    assert choose_layers(FromTeacher(**spec), total) == expected


def test_even_choices_are_distinct_and_span_the_teacher():
    for total in range(1, 40):
        for keep in range(1, total + 1):
            chosen = choose_layers(FromTeacher(keep=keep), total)
            assert len(chosen) == keep and chosen == sorted(set(chosen)) and chosen[0] == 0
            assert keep == 1 or chosen[-1] == total - 1
            chosen = choose_layers(FromTeacher(keep=keep, how="ends"), total)
            assert len(chosen) == keep and chosen == sorted(set(chosen)) and chosen[-1] == total - 1


@pytest.mark.parametrize(
    ("spec", "total", "expected"),
    [
        ({"layers": [0, 5, 6]}, 6, "layer 6 is out of range; the teacher has 6 layers (0 to 5)"),
        ({"keep": 7}, 6, "keep: 7 layers asked of a teacher that has 6"),
    ],
)
def test_choices_that_do_not_fit_the_teacher(spec, total, expected):
    with pytest.raises(UserError) as raised:
        choose_layers(FromTeacher(**spec), total)
    assert str(raised.value).startswith("models.student.from_teacher.") and expected in str(raised.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{layers: [0, 2, 2]}", "expected increasing layer numbers without repeats"),
        ("{layers: [3, 1]}", "expected increasing layer numbers without repeats"),
        ("{layers: [-1, 1]}", "layer numbers start at 0"),
        ("{layers: [0], how: ends}", "how goes with keep"),
        ("{keep: 0}", "greater than 0"),
        ("{}", "needs exactly one of layers, keep"),
    ],
)
def test_bad_choices_in_the_recipe_are_one_line(value, expected):
    with pytest.raises(UserError) as raised:
        load_recipe(
            "smoke", ['models.teacher={"path": "x"}', "models.tokenizer={}", f"models.student.from_teacher={value}"]
        )
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert "models.student" in str(raised.value)


@pytest.mark.parametrize("choice", ["{layers: [0, 3]}", "{keep: 2}", "{keep: 2, how: ends}"])
def test_the_choice_survives_job_json(choice, tmp_path):
    """Every rank re-validates the recipe from job.json (Job.load): the dumped choice must load."""
    from bdctl.recipe.schema import Recipe

    recipe = _recipe(tmp_path, 'models.teacher={"gguf": "t.gguf"}', choice)
    again = Recipe.model_validate(json.loads(json.dumps(recipe.model_dump(mode="json"))))
    assert again.models.student.from_teacher == recipe.models.student.from_teacher
    assert again.models.student.location == recipe.models.student.location == str(tmp_path / "run/models/student")


def _teacher(arch: str, vocab: int, layers: int = 5):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=32, n_head=4, n_positions=64)
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab, num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=64, word_embed_proj_dim=32,
        )  # fmt: skip
    else:
        kind = LlamaConfig if arch == "llama" else Qwen2Config
        config = kind(
            vocab_size=vocab, num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=arch == "qwen2",
        )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def _by_hand(teacher, layers: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The teacher's own modules, run by hand: embeddings, the chosen blocks in order (causal
    attention from sdpa with no mask), final norm, head."""
    positions = torch.arange(ids.shape[1])[None]
    kind = teacher.config.model_type
    if kind == "gpt2":
        body = teacher.transformer
        hidden = body.wte(ids) + body.wpe(positions)
        blocks, norm = body.h, body.ln_f
        extra: dict = {}
    elif kind == "opt":
        body = teacher.model.decoder
        hidden = body.embed_tokens(ids) + body.embed_positions(torch.ones_like(ids), 0, position_ids=positions)
        blocks, norm = body.layers, body.final_layer_norm
        extra = {"position_ids": positions}
    else:
        body = teacher.model
        hidden = body.embed_tokens(ids)
        blocks, norm = body.layers, body.norm
        extra = {"position_embeddings": body.rotary_emb(hidden, positions), "position_ids": positions}
    for index in layers:
        out = blocks[index](hidden, attention_mask=None, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return teacher.lm_head(norm(hidden))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2", "llama"])
def test_cut_logits_equal_the_chosen_layers_run_by_hand(arch):
    teacher = _teacher(arch, vocab=97)
    layers = [0, 2, 4]
    student = cut(teacher, layers)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = _by_hand(teacher, layers, ids)
        full = _by_hand(teacher, list(range(5)), ids)
        torch.testing.assert_close(full, teacher(ids).logits, rtol=0, atol=1e-5)  # the hand-run is the model
        torch.testing.assert_close(student(ids).logits, expected, rtol=0, atol=1e-5)
    assert student.config.model_type == arch and student.config.vocab_size == 97
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_cut_of_an_unsupported_architecture_is_one_line():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    teacher = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError, match=r"from_teacher: cannot cut a 'gpt_neox' teacher \(supported: gpt2, opt"):
        cut(teacher, [0])


def _recipe(tmp_path, teacher: str, choice: str):
    overrides = [f"run_dir={tmp_path / 'run'}", "models.tokenizer={}", f"models.student={{from_teacher: {choice}}}"]
    return load_recipe("smoke", overrides + [teacher])[0]


def test_student_built_into_the_run_beside_a_converted_teacher(tiny_tokenizer, tmp_path):
    """A gguf teacher and a student cut from it: both built once, the student with the shared
    tokenizer and a manifest naming the choice, the teacher's sha256 and its parameter count; a
    changed choice is refused rather than silently mixed with stages trained on the old cut."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_hf_model("llama", tiny_tokenizer, layers=6)
    file = write_gguf(source, tiny_tokenizer, tmp_path / "teacher.gguf")
    recipe = _recipe(tmp_path, f'models.teacher={{"gguf": "{file}"}}', "{keep: 4, how: ends}")
    lines: list[str] = []
    build_models(recipe, lines.append)
    built = Path(recipe.models.student.location)
    assert built == tmp_path / "run" / "models" / "student"
    facts = json.loads((built / "MANIFEST.json").read_text())
    teacher_facts = json.loads((tmp_path / "run" / "models" / "teacher" / "MANIFEST.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32)
    assert facts["layers"] == [0, 3, 4, 5] and facts["teacher_layers"] == 6
    assert facts["parameters"] == sum(p.numel() for p in student.parameters())
    assert facts["source"]["sha256"] == teacher_facts["source"]["sha256"]
    assert facts["source"]["choice"] == {"layers": None, "keep": 4, "how": "ends"}
    assert AutoTokenizer.from_pretrained(built).get_vocab() == tiny_tokenizer.get_vocab()
    ids = torch.tensor([tiny_tokenizer("reverse the words")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, cut(source, [0, 3, 4, 5])(ids).logits, rtol=0, atol=1e-5)

    build_models(recipe, lines.append)
    assert sum("building" in line for line in lines) == 2  # teacher, student: once each

    changed = _recipe(tmp_path, f'models.teacher={{"gguf": "{file}"}}', "{keep: 3}")
    with pytest.raises(UserError, match=r"cut with the teacher's layers \[0, 3, 4, 5\].*delete .*models/student"):
        build_models(changed, lines.append)


def test_student_cut_from_a_teacher_directory(tiny_tokenizer, tmp_path):
    teacher = _teacher("opt", vocab=len(tiny_tokenizer), layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    recipe = _recipe(tmp_path, f'models.teacher={{"path": "{tmp_path / "teacher"}"}}', "{layers: [0, 3]}")
    build_models(recipe, lambda line: None)
    facts = json.loads((tmp_path / "run" / "models" / "student" / "MANIFEST.json").read_text())
    assert facts["layers"] == [0, 3] and facts["architecture"] == "opt" and len(facts["source"]["sha256"]) == 64

    out_of_range = _recipe(tmp_path / "other", f'models.teacher={{"path": "{tmp_path / "teacher"}"}}', "{layers: [4]}")
    with pytest.raises(UserError, match="layer 4 is out of range; the teacher has 4 layers"):
        build_models(out_of_range, lambda line: None)
    assert not (tmp_path / "other" / "run" / "models" / "student").exists()


def test_model_card_names_the_layers_the_size_and_the_source():
    """An export that starts from a cut student says so in its card (base model), with the layer
    choice, parameter count and source from the built directory's manifest; a gguf teacher too."""
    from bdctl.modelcard import card_facts, render_card
    from tests.unit.test_chat_and_cards import INFO, variant

    job = variant(
        recipe__models__student={"path": None, "from_teacher": {"layers": None, "keep": 4, "how": "ends"}},
        recipe__models__teacher={"path": None, "gguf": "models/t.gguf"},
    )
    built = {
        "student": {"kind": "from_teacher", "layers": [0, 3, 4, 5], "teacher_layers": 6, "parameters": 12345,
                    "source": {"label": "the teacher models/t.gguf (gguf)", "sha256": "ab" * 32}},
        "teacher": {"kind": "gguf", "architecture": "llama", "source": {"sha256": "cd" * 32}},
    }  # fmt: skip
    text = render_card(card_facts(job, "export", INFO, None, None, version="9.9", command="bdctl x", built=built))
    assert (
        "the teacher's layers [0, 3, 4, 5] of 6 with its embeddings, final norm and head, 12,345 parameters "
        "(cut from the teacher models/t.gguf (gguf), sha256 abababababab; beyond the paper" in text
    )
    assert "the GGUF file models/t.gguf (llama, sha256 cdcdcdcdcdcd, dequantised to float32)" in text
