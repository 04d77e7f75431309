"""Conversations (`data.format: messages` or `sharegpt`), rendered with the tokenizer's chat template.

A conversation becomes one data row whose `prompt` is everything before its last assistant turn
(with the template's generation prompt) and whose `output` is that last turn: generate, distill,
MiniLLM and eval read only these two, so they work on the last assistant turn unchanged. SFT also
reads `turns`: the conversation cut into (text before an assistant turn, that turn) pairs, so that
it trains on every assistant turn (`data.batching.tokenize_examples(..., all_turns=True)`).

Rendering relies on the template writing a conversation's turns in order, each assistant turn
followed by the end-of-turn token: the text up to assistant turn k with a generation prompt is a
prefix of the conversation's text up to turn k. A template that rewrites earlier turns (e.g. one that
strips reasoning from past answers) breaks this; such a conversation is dropped and counted.
"""

from __future__ import annotations

from typing import Any

from bdctl.errors import UserError

#: The record key of each format, its role and text keys, and the roles it knows (-> OpenAI roles).
FORMATS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value", {"system": "system", "human": "user", "user": "user",
                                                    "gpt": "assistant", "assistant": "assistant"}),
}  # fmt: skip

# Reasons a conversation is dropped (keys of data/split.json's "dropped").
UNKNOWN_ROLE = "unknown_role"
NO_FINAL_ASSISTANT = "no_final_assistant"
TEMPLATE_ERROR = "template_error"
TEMPLATE_REWRITES = "template_rewrites_turns"

#: data.system_prompt's value that leaves the template's default system text out.
NO_SYSTEM = "none"


def read_conversation(where: str, record: Any, format: str) -> list[dict[str, str]] | str:
    """The record's turns as [{"role": system|user|assistant, "content"}] with contents stripped,
    or the reason it is dropped. A record that is not a conversation at all is one line naming `where`."""
    key, role_key, text_key, roles = FORMATS[format]
    if not isinstance(record, dict) or not isinstance(record.get(key), list):
        raise UserError(f"{where}: expected an object with a list {key!r} (data.format: {format})")
    turns = []
    for index, turn in enumerate(record[key]):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str) or role_key not in turn:
            raise UserError(f"{where}: {key}[{index}] should be an object with {role_key!r} and a string {text_key!r}")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            return UNKNOWN_ROLE
        turns.append({"role": role, "content": turn[text_key].strip()})
    if not turns or turns[-1]["role"] != "assistant" or not turns[-1]["content"]:
        return NO_FINAL_ASSISTANT
    return turns


def with_system_prompt(turns: list[dict[str, str]], system_prompt: str | None, tokenizer) -> list[dict[str, str]]:
    """`turns` with data.system_prompt applied: a string becomes the system turn of a conversation
    that has none; `none` renders with an empty system turn when that is shorter than the template's
    default (a template that writes a default system text only when no system turn is given)."""
    if system_prompt is None or (turns and turns[0]["role"] == "system"):
        return turns
    if system_prompt != NO_SYSTEM:
        return [{"role": "system", "content": system_prompt}, *turns]
    empty = [{"role": "system", "content": ""}, *turns]
    try:
        shorter = len(render(empty, tokenizer, generation_prompt=False)) < len(render(turns, tokenizer, False))
    except Exception:  # a template without a system role (Gemma's raises): its default is already none
        return turns
    return empty if shorter else turns


def render(turns: list[dict[str, str]], tokenizer, generation_prompt: bool) -> str:
    """The chat template's text of `turns`, without a BOS the tokenizer adds by itself anyway (prompts
    are tokenised with the tokenizer's special tokens: no double BOS)."""
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def conversation_row(turns: list[dict[str, str]], tokenizer, stop_text: str) -> dict[str, Any] | str:
    """The data row of a conversation ({"instruction", "input", "output", "prompt", "messages", "turns"}),
    or the reason it is dropped. `stop_text`: the end-of-turn token's text (models.stop_id)."""
    pieces: list[list[str]] = []
    consumed = ""
    try:
        for index, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = render(turns[:index], tokenizer, generation_prompt=True)
            full = render(turns[: index + 1], tokenizer, generation_prompt=False)
            answer = turn["content"]
            if not before.startswith(consumed) or not full.startswith(before + answer):
                return TEMPLATE_REWRITES
            after = full[len(before) + len(answer) :]
            if not after.lstrip().startswith(stop_text):
                return TEMPLATE_REWRITES
            pieces.append([before[len(consumed) :], answer])
            consumed = before + answer + after[: after.index(stop_text) + len(stop_text)]
    except Exception:  # a Jinja template may raise anything (a role order it refuses, its own raise_exception)
        return TEMPLATE_ERROR
    users = [t["content"] for t in turns if t["role"] == "user"]
    return {
        "instruction": users[-1] if users else "",
        "input": "",
        "output": turns[-1]["content"],
        "prompt": before,  # the text before the last assistant turn (the loop ended on it)
        "messages": turns,
        "turns": pieces,
    }
