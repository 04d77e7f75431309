"""data.template: chat (prompt format, the end-of-turn token as the stop id, one-line errors) and the
model cards' rendering (bdctl.modelcard: facts -> text) over a small table of inputs."""

from __future__ import annotations

import copy

import pytest

from bdctl.errors import UserError
from tests.chat_tokenizer import END_OF_TURN, build_chat_tokenizer


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    build_chat_tokenizer(directory, vocab_size=300)
    return directory


@pytest.fixture(scope="module")
def chat(chat_dir):
    from bdctl.models import load_tokenizer

    return load_tokenizer(chat_dir, template="chat")


# --------------------------------------------------------------------------- chat template


def test_chat_prompt_is_the_templates_user_turn_and_generation_prompt(chat):
    from bdctl.data.template import render_prompt

    with_input = render_prompt(" Sort these. ", " b a ", "chat", chat)
    assert with_input == "<|im_start|>user\nSort these.\n\nb a<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt("Say hi.", "", "chat", chat) == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    # without chat, the recipe's template as before
    assert render_prompt("Say hi.", "").startswith("Here is a task.")


def test_stop_id_is_the_end_of_turn_with_chat_and_eos_without(chat, chat_dir):
    from bdctl.models import load_tokenizer, stop_id

    end = chat.convert_tokens_to_ids(END_OF_TURN)
    assert stop_id(chat) == end != chat.eos_token_id
    assert stop_id(load_tokenizer(chat_dir)) == chat.eos_token_id


def test_sft_labels_end_with_the_end_of_turn_token(chat):
    from bdctl.data.batching import IGNORE, collate, tokenize_examples
    from bdctl.data.template import render_prompt

    rows = [{"prompt": render_prompt("Add 2 and 3.", "", "chat", chat), "output": "5"}]
    (example,) = tokenize_examples(rows, chat)
    end = chat.convert_tokens_to_ids(END_OF_TURN)
    response = example.ids[example.prompt_len :]
    assert response == chat("5", add_special_tokens=False)["input_ids"] + [end]
    labels = collate([example], chat.pad_token_id)["labels"][0].tolist()
    assert [t for t in labels if t != IGNORE] == response


def test_answers_stop_at_the_end_of_turn_and_leave_it_out(chat):
    """sample_answers with a model that writes two tokens, then <|im_end|>, then would go on."""
    import torch

    from bdctl.answers import sample_answers

    end = chat.convert_tokens_to_ids(END_OF_TURN)
    script = chat("ok yes", add_special_tokens=False)["input_ids"][:2] + [end] + [chat.eos_token_id] * 8

    class Cache:
        def batch_select_indices(self, index):
            pass

    class Scripted(torch.nn.Module):
        config = type("Config", (), {"n_positions": 64})()

        def __init__(self):
            super().__init__()
            self.weight, self.calls = torch.nn.Parameter(torch.zeros(1)), 0

        def forward(self, input_ids, **kwargs):
            logits = torch.full((input_ids.shape[0], 1, len(chat)), -30.0)
            logits[:, -1, script[self.calls]] = 30.0
            self.calls += 1
            return type("Out", (), {"logits": logits, "past_key_values": Cache()})()

    prompt = chat("hello")["input_ids"]
    (answer,) = sample_answers(
        Scripted().eval(), chat, [prompt], [1], sampling={"temperature": 1.0, "top_p": 1.0, "top_k": 0},
        max_new_tokens=8, no_repeat_ngram_size=None,
    )  # fmt: skip
    assert answer.finish_reason == "eos" and answer.tokens == 2
    assert answer.text == chat.decode(script[:2])


def test_collated_terminal_transitions_are_the_stop_token():
    import numpy as np

    from bdctl.distill_data import collate_examples

    end, eos = 7, 0
    examples = [([3, 4], np.array([5, 6, end]), None), ([3], np.array([5, eos, 6]), None)]
    batch = collate_examples(examples, pad_id=1, eos_id=end, with_sets=False)
    assert batch["terminal"].tolist() == [[False, False, True], [False, False, False]]


def test_chat_errors_name_the_tokenizer_directory(tmp_path):
    from bdctl.models import load_tokenizer

    plain = tmp_path / "plain"
    build_chat_tokenizer(plain, vocab_size=300, template=None)
    with pytest.raises(UserError, match=f"^{plain}: the tokenizer has no chat template") as caught:
        load_tokenizer(plain, template="chat")
    assert "\n" not in str(caught.value)
    endless = tmp_path / "endless"  # an assistant turn followed by ordinary text only
    build_chat_tokenizer(endless, vocab_size=300, template="{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}")
    with pytest.raises(UserError, match=f"^{endless}: .*no special end-of-turn token") as caught:
        load_tokenizer(endless, template="chat")
    assert "\n" not in str(caught.value)


def test_recipe_accepts_chat_and_trained_tokenizers_refuse_it(tmp_path):
    from bdctl.data.prepare import prepare_data
    from bdctl.recipe import load_recipe
    from bdctl.rundir import RunDir
    from tests.conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", data__template="chat")
    recipe, _ = load_recipe(str(path))
    assert recipe.data.template == "chat"
    with pytest.raises(UserError, match="data.template: chat .* models.tokenizer.train"):
        prepare_data(recipe, RunDir(tmp_path / "run"), log=lambda line: None)


# --------------------------------------------------------------------------- model cards

JOB = {
    "stage": "distill",
    "stage_name": "distill/bd",
    "options": {"method": "bd"},
    "recipe_path": "recipes/x.yaml",
    "recipe": {
        "name": "x",
        "models": {
            "teacher": {"path": "gpt2-xl", "revision": None, "tiny": None},
            "student": {"path": "gpt2", "revision": None, "tiny": None},
        },
        "data": {
            "source": {"synthetic": None, "path": None, "hub": "databricks/databricks-dolly-15k", "hub_config": None},
            "template": None,
            "split": {"valid": 500, "test": 500, "seed": 42},
            "max_length": 512,
            "max_prompt_length": 256,
            "pretrain": None,
        },
        "stages": {
            "generate": {"model": "teacher_sft", "n_samples": 8, "temperature": 1.0, "top_p": 1.0, "variants": {}},
            "distill": {
                "method": "bd", "lr": 5e-6, "epochs": 3, "max_steps": None, "batch_size": 64, "warmup_ratio": 0.0,
                "weight_decay": 0.0, "select": "rouge_l", "select_protocol": None, "select_prompts": None,
                "variant": "paper", "p": 0.8, "chi2": True, "alpha": 0.1, "gamma": 0.99, "q_min": -10.0,
                "outside": "q_min", "anchor_coef": 0.0, "dstar": "generate", "teacher_source": "cache",
                "lm_coef": 1.0, "pretrain_term": None, "init": "auto",
            },
            "eval": {"protocols": [
                {"name": "minillm", "temperature": 1.0, "top_p": 1.0, "top_k": 0},
                {"name": "release", "temperature": 1.0, "top_p": 0.8, "top_k": 0},
            ]},
        },
    },
}  # fmt: skip
INFO = {"step": 40, "select": "rouge_l", "val_loss": 2.5, "rouge_l": 24.25, "rouge_l@release": 26.5}


def variant(**changes):
    """JOB with dotted-path changes ("recipe.stages.distill.anchor_coef": 0.5)."""
    job = copy.deepcopy(JOB)
    for dotted, value in changes.items():
        node = job
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return job


CASES = {
    "paper bd": (JOB, "export", INFO, None, ["base_model: gpt2", "- bellman-distill", "| variant | paper |",
                  "| anchor_coef | 0 |", "| outside | q_min |", "D* | generate: 8 teacher samples",
                  "kept for the best rouge_l, protocol minillm", "not evaluated yet"], ["beyond the paper"]),
    "anchor and drop": (variant(recipe__stages__distill__anchor_coef=0.5, recipe__stages__distill__outside="drop"),
                        "export", INFO, None, ["| anchor_coef | 0.5 (beyond the paper) |",
                                               "| outside | drop (beyond the paper"], []),
    "export per protocol": (JOB, "export-release", {**INFO, "select": "rouge_l@release"}, None,
                            ["kept for the best rouge_l, protocol release", "(export-release)"], []),
    "tested": (JOB, "export", INFO,
               {"minillm": {"dolly": {"mean": 25.0, "std": 0.5, "per_seed": {"10": 24.5, "20": 25.5}}}},
               ["dolly: Rouge-L, protocol minillm", "mean ± std over seeds 10, 20: 25.00 ± 0.50"],
               ["not evaluated yet"]),
    "sft teacher": (variant(stage="sft", stage_name="teacher_sft", options={"model": "teacher"},
                            recipe__stages__teacher_sft={"lr": 1e-5, "epochs": 3, "batch_size": 32,
                                                         "select": "val_loss"}),
                    "export", {"step": 9, "select": "val_loss", "val_loss": 1.5}, None,
                    ["base_model: gpt2-xl", "- sft", "kept for the best val_loss", "| base model | gpt2-xl |"],
                    ["teacher |", "bellman"]),
    "chat tiny": (variant(recipe__data__template="chat",
                          recipe__models__student={"path": None, "revision": None,
                                                   "tiny": {"arch": "gpt2", "layers": 1, "hidden": 32}}),
                  "best", INFO, None, ["tokenizer's own chat template", "tiny gpt2 (1 layer, hidden 32)", "(best)"],
                  ["base_model"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_card_text(case):
    from bdctl.modelcard import card_facts, parse_front_matter, render_card

    job, directory, info, test, present, absent = CASES[case]
    facts = card_facts(job, directory, info, None, test, version="9.9", command=f"bdctl x {job['recipe_path']}")
    text = render_card(facts)
    meta = parse_front_matter(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    for fragment in present:
        assert fragment in text, (fragment, text)
    for fragment in absent:
        assert fragment not in text, (fragment, text)
    values = [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    expected = [info["val_loss"]] + [v for k, v in info.items() if k.startswith("rouge_l") and k != "rouge_l@minillm"]
    if test:
        expected += [s["mean"] for sets in test.values() for s in sets.values()]
    assert values == expected
    assert "bdctl 9.9" in text and "```bash\nbdctl x recipes/x.yaml\n```" in text


def test_set_flags_are_what_the_file_lacks():
    from bdctl.modelcard import set_flags

    resolved = {"stages": {"distill": {"lr": 0.1, "method": "kd", "ablations": {}}, "eval": {"seeds": [1, 2]}}}
    from_file = {"stages": {"distill": {"lr": 0.2, "method": "bd", "ablations": {"p": [1.0]}}, "eval": {"seeds": [1]}}}
    assert set_flags(resolved, from_file) == ["--set stages.distill.lr=0.1", "--set 'stages.eval.seeds=[1, 2]'"]
    assert set_flags(resolved, None) == []


def test_commands_in_a_card_are_shell_quoted():
    """A recipe path or a --set value holding `$(...)` must not run when the card's command is
    pasted into a shell: each word is quoted (shlex) and reads back as what it was."""
    import shlex

    from bdctl.modelcard import override_flags, set_flags
    from bdctl.rundir import stage_command

    path = "my recipes/$(touch pwned).yaml"
    flags = override_flags(["stages.distill.lr=1e-4", "description=$(rm -rf ~)"])
    flags += set_flags({"name": "a `b`"}, {"name": "x"})
    words = shlex.split(" ".join([stage_command("distill/bd", path), *flags]))
    assert words == [
        "bdctl", "distill", path, "--method", "bd", "--set", "stages.distill.lr=1e-4",
        "--set", "description=$(rm -rf ~)", "--set", 'name="a `b`"',
    ]  # fmt: skip
