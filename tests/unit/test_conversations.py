"""Conversations (data.format: messages / sharegpt) under three families' chat templates, written here on the
tests' own chat tokenizer (tests/chat_tokenizer.py): Qwen2's ChatML with a default system text, Llama 3's header
tokens with a BOS, and Gemma's turns without a system role. Checked: the SFT label mask of a multi-turn
conversation token by token, the last assistant turn as prompt / output, data.system_prompt, and what is dropped,
counted or refused by the data stage."""

from __future__ import annotations

import json

import pytest

from bdctl.errors import UserError
from tests.chat_tokenizer import CHATML, build_chat_tokenizer
from tests.conftest import write_recipe

QWEN2 = (  # ChatML, with a default system text when the conversation has none (as Qwen2.5's and SmolLM2's)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)
TEMPLATES = {"qwen2": (QWEN2, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>"), "gemma": (GEMMA, "<end_of_turn>")}
EXTRA_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]

CONVERSATION = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20 in all"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """family -> the run's tokenizer (load_tokenizer(..., template="chat")), one directory per template."""
    from bdctl.models import load_tokenizer

    made = {}
    for family, (template, _) in TEMPLATES.items():
        directory = tmp_path_factory.mktemp(f"chat-{family}")
        tokenizer = build_chat_tokenizer(directory, vocab_size=300, template=template)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *EXTRA_TOKENS]})
        tokenizer.save_pretrained(directory)
        made[family] = (directory, load_tokenizer(directory, template="chat"))
    return made


def row_of(turns, tokenizer, system_prompt=None):
    from bdctl.data.conversations import conversation_row, with_system_prompt
    from bdctl.models import stop_id

    stop_text = tokenizer.decode([stop_id(tokenizer)])
    return conversation_row(with_system_prompt(turns, system_prompt, tokenizer), tokenizer, stop_text)


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_every_assistant_turn_is_labelled_token_by_token(tokenizers, family):
    from bdctl.data.batching import IGNORE, collate, tokenize_examples

    _, tokenizer = tokenizers[family]
    end = tokenizer.convert_tokens_to_ids(TEMPLATES[family][1])
    row = row_of(CONVERSATION, tokenizer)
    (example,) = tokenize_examples([row], tokenizer, all_turns=True)
    labels = collate([example], tokenizer.pad_token_id)["labels"][0].tolist()

    def words(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # The sequence is the template's text of the whole conversation (decoded back, as written)...
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(example.ids) == full.rstrip("\n")
    # ...and exactly the two answers and their end-of-turn tokens are predicted, each at the position before it.
    expected = [IGNORE] * len(example.ids)
    for answer in ("5", "20 in all"):
        target = words(answer) + [end]
        starts = [i for i in range(len(example.ids)) if example.ids[i : i + len(target)] == target]
        assert len(starts) == 1, (answer, starts)
        for offset, token in enumerate(target):
            expected[starts[0] + offset - 1] = token
    assert labels == expected
    # Without all_turns (generate's golden items, validation, selection) only the last turn.
    (last,) = tokenize_examples([row], tokenizer)
    assert last.ids[last.prompt_len :] == words("20 in all") + [end]
    assert tokenizer.decode(last.ids[: last.prompt_len]) == row["prompt"]


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_the_last_assistant_turn_is_prompt_and_output(tokenizers, family):
    _, tokenizer = tokenizers[family]
    row = row_of(CONVERSATION, tokenizer)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    assert row["prompt"] == prompt  # with the template's BOS: the tokenizer here adds none itself
    assert (row["output"], row["instruction"]) == ("20 in all", "And times 4?")


def test_system_prompt_string_none_and_the_templates_default(tokenizers):
    from bdctl.data.template import render_prompt

    _, qwen = tokenizers["qwen2"]
    default = render_prompt("Hi.", "", "chat", qwen)
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert render_prompt("Hi.", "", "chat", qwen, "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # none: the empty system turn is shorter than the default text, so it is used
    assert render_prompt("Hi.", "", "chat", qwen, "none") == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
    )
    # a conversation's own system turn stays
    own = [{"role": "system", "content": "Own."}, *CONVERSATION[:2]]
    assert row_of(own, qwen, "Be brief.")["prompt"].startswith("<|im_start|>system\nOwn.<|im_end|>")
    # a template with no default (plain ChatML) or no system role (Gemma): none leaves it as it is
    _, gemma = tokenizers["gemma"]
    assert render_prompt("Hi.", "", "chat", gemma, "none") == render_prompt("Hi.", "", "chat", gemma)
    assert "system" not in render_prompt("Hi.", "", "chat", tokenizers["llama3"][1], "none")


def test_unknown_roles_and_no_final_assistant_are_reasons_and_malformed_records_one_line():
    from bdctl.data.conversations import NO_FINAL_ASSISTANT, UNKNOWN_ROLE, read_conversation

    share = {"conversations": [{"from": "human", "value": " Hi "}, {"from": "gpt", "value": "Hello"}]}
    assert read_conversation("f:1", share, "sharegpt") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    ]  # fmt: skip
    assert read_conversation("f:1", {"messages": [{"role": "tool", "content": "x"}]}, "messages") == UNKNOWN_ROLE
    assert read_conversation("f:1", {"messages": CONVERSATION[:3]}, "messages") == NO_FINAL_ASSISTANT
    assert read_conversation("f:1", {"messages": []}, "messages") == NO_FINAL_ASSISTANT
    with pytest.raises(UserError, match=r"^f:2: expected an object with a list 'conversations'"):
        read_conversation("f:2", {"messages": CONVERSATION}, "sharegpt")
    with pytest.raises(UserError, match=r"^f:3: messages\[1\] should be an object with 'role' and a string 'content'"):
        read_conversation("f:3", {"messages": [CONVERSATION[0], {"role": "assistant", "content": 5}]}, "messages")


def conversations_recipe(tmp_path, tokenizer_dir, records, **changes):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return write_recipe(
        tmp_path / "r.yaml",
        models__tokenizer={"path": str(tokenizer_dir)},
        data__template="chat",
        data__source={"path": str(data)},
        data__split={"valid": 2, "test": 2, "seed": 1},
        data__pretrain=None,
        **{"data__format": "messages", **changes},
    )


def test_data_stage_drops_counts_and_refuses(tokenizers, tmp_path):
    from bdctl.data.prepare import prepare_data, read_split
    from bdctl.recipe import load_recipe
    from bdctl.rundir import RunDir

    directory, _ = tokenizers["qwen2"]
    good = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"It is {i}."}]}
            for i in range(8)]  # fmt: skip
    long = {"messages": CONVERSATION * 6}  # over max_prompt_length (96) tokens, under its characters limit
    records = [*good, {"messages": CONVERSATION[:3]}, {"messages": [{"role": "tool", "content": "x"}]}, long]
    recipe, _ = load_recipe(str(conversations_recipe(tmp_path, directory, records)))
    prepared = prepare_data(recipe, RunDir(tmp_path / "run"), log=lambda _: None)
    split = json.loads((prepared.directory / "split.json").read_text())
    assert split["dropped"]["no_final_assistant"] == 1 and split["dropped"]["unknown_role"] == 1
    assert split["dropped"]["prompt_too_long"] == 1
    assert split["source_examples"] == 11 and prepared.counts == {"train": 4, "valid": 2, "test": 2}
    row = read_split(prepared.directory, "train")[0]
    assert row["messages"][-1]["role"] == "assistant" and row["turns"][-1][1] == row["output"]

    (tmp_path / "bad").mkdir()
    bad, _ = load_recipe(str(conversations_recipe(tmp_path / "bad", directory, [{"messages": CONVERSATION[:1]}] * 3)))
    with pytest.raises(UserError, match=r"no conversation of .* is usable \(dropped 3 not ending with an assistant"):
        prepare_data(bad, RunDir(tmp_path / "bad-run"), log=lambda _: None)


def test_recipe_checks_for_conversations(tmp_path):
    from bdctl.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", data__format="messages")
    with pytest.raises(UserError, match="data.format: messages .* set data.template: chat"):
        load_recipe(str(recipe))
    with pytest.raises(UserError, match="data.system_prompt .* set data.template: chat"):
        load_recipe(str(write_recipe(tmp_path / "s.yaml", data__system_prompt="Be brief.")))


def test_plain_chatml_conversation_matches_the_single_turn_path(tmp_path):
    """A one-turn conversation is the same row (prompt, output, tokens) as data.template: chat's instruction."""
    from bdctl.data.batching import collate, tokenize_examples
    from bdctl.data.template import render_prompt
    from bdctl.models import load_tokenizer

    build_chat_tokenizer(tmp_path, vocab_size=300, template=CHATML)
    tokenizer = load_tokenizer(tmp_path, template="chat")
    row = row_of([{"role": "user", "content": "Sort b a."}, {"role": "assistant", "content": "a b"}], tokenizer)
    assert row["prompt"] == render_prompt("Sort b a.", "", "chat", tokenizer)
    single = {"prompt": row["prompt"], "output": "a b"}
    (turns,), (plain,) = tokenize_examples([row], tokenizer, all_turns=True), tokenize_examples([single], tokenizer)
    assert (turns.ids, turns.prompt_len) == (plain.ids, plain.prompt_len)
    labels = collate([turns, plain], tokenizer.pad_token_id)["labels"]
    assert labels[0].tolist() == labels[1].tolist()


def test_sharegpt_records_make_the_same_rows_as_messages(tokenizers, tmp_path):
    from bdctl.data.prepare import prepare_data, read_split
    from bdctl.recipe import load_recipe
    from bdctl.rundir import RunDir

    directory, _ = tokenizers["llama3"]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    chats = [[{"role": "system", "content": "Be brief."}, *CONVERSATION]] + [
        [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"It is {i}."}] for i in range(7)
    ]
    rows = {}
    for format in ("messages", "sharegpt"):
        records = [
            {"messages": chat} if format == "messages"
            else {"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in chat]}
            for chat in chats
        ]  # fmt: skip
        (tmp_path / format).mkdir()
        path = conversations_recipe(tmp_path / format, directory, records, data__format=format)
        recipe, _ = load_recipe(str(path))
        prepared = prepare_data(recipe, RunDir(tmp_path / format / "run"), log=lambda _: None)
        rows[format] = [read_split(prepared.directory, split) for split in ("train", "valid", "test")]
    assert rows["messages"] == rows["sharegpt"]
    everything = [row for split in rows["sharegpt"] for row in split]
    assert any(len(row["turns"]) == 2 and row["messages"][0]["role"] == "system" for row in everything)
