"""The prompt template (docs/method.md §7.2): instruction, optional input, response header.

Alpaca-style sections in bdctl's own wording; a recipe may replace both forms with `data.template`,
or use the tokenizer's own chat template with `data.template: chat` (`render_chat_prompt`).
"""

from __future__ import annotations

import json
import re

from bdctl.recipe.schema import Template

DEFAULT_TEMPLATE = Template(
    without_input=(
        "Here is a task. Write an answer that carries it out.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    with_input=(
        "Here is a task, with some input to work on. Write an answer that carries it out.\n\n"
        "### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n"
        "### Response:\n"
    ),
)

_FIELD = re.compile(r"\{(instruction|input)\}")


CHAT = "chat"  # data.template: chat

#: Opens every chat template `jinja_chat_template` writes, so that bdctl's own prompt format is told
#: apart from a model's native chat template (the hf judge keeps its plain-text prompt for it).
PROMPT_FORMAT_MARK = "{#- bdctl prompt format (data.template): not a conversational chat template -#}"


def render_prompt(
    instruction: str,
    input: str,
    template: Template | str | None = None,
    tokenizer=None,
    system_prompt: str | None = None,
) -> str:
    """The prompt x for one example; the model's answer follows it directly. `tokenizer`: the
    run's tokenizer, needed (only) by data.template: chat, as is `system_prompt` (data.system_prompt)."""
    if template == CHAT:
        if tokenizer is None:
            raise ValueError("data.template: chat renders prompts with the tokenizer; pass it")
        return render_chat_prompt(instruction, input, tokenizer, system_prompt)
    template = template if isinstance(template, Template) else DEFAULT_TEMPLATE
    values = {"instruction": instruction.strip(), "input": input.strip()}
    form = template.with_input if values["input"] else template.without_input
    # One pass of substitution, so braces inside the user's text are never re-expanded.
    return _FIELD.sub(lambda m: values[m.group(1)], form)


def user_turn(instruction: str, input: str) -> str:
    """The user message of data.template: chat: the instruction, then a blank line and the input
    when there is one."""
    instruction, input = instruction.strip(), input.strip()
    return f"{instruction}\n\n{input}" if input else instruction


def render_chat_prompt(instruction: str, input: str, tokenizer, system_prompt: str | None = None) -> str:
    """The tokenizer's chat template over one user turn (after data.system_prompt's system turn, if
    any), with its generation prompt (the opening of the assistant turn): the answer, then the
    template's end-of-turn token, follows directly.

    Prompts are tokenised later with the tokenizer's own special tokens added, so a BOS the
    template writes itself is left out here when the tokenizer adds one anyway (no double BOS).
    """
    from bdctl.data.conversations import render, with_system_prompt

    messages = [{"role": "user", "content": user_turn(instruction, input)}]
    return render(with_system_prompt(messages, system_prompt, tokenizer), tokenizer, generation_prompt=True)


def jinja_chat_template(template: Template | None = None) -> str:
    """A Jinja chat template that renders exactly `render_prompt`'s prompt (bdctl's Alpaca-style
    wording, or the recipe's own `template`), for exports: the model is then prompted through
    `tokenizer.apply_chat_template` the way it was trained. A user turn's content is the
    instruction, its optional `input` key the input (both stripped, as render_prompt does); an
    assistant turn is its content and the EOS, the stop token of training; system turns are not
    part of this format and are left out. The generation prompt is empty: the prompt already ends
    with the response header."""
    template = template or DEFAULT_TEMPLATE

    def pieces(form: str) -> str:
        out = []
        for index, part in enumerate(_FIELD.split(form)):
            if index % 2:  # a field name: the stripped value
                out.append("{{ instruction }}" if part == "instruction" else "{{ input }}")
            elif part:  # literal text as a Jinja string literal (json's escapes are also Jinja's)
                out.append("{{ " + json.dumps(part) + " }}")
        return "".join(out)

    return (
        PROMPT_FORMAT_MARK + "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set instruction = message['content'] | trim -%}"
        "{%- set input = (message['input'] or '') | trim if message['input'] is defined else '' -%}"
        "{%- if input -%}" + pieces(template.with_input) + "{%- else -%}" + pieces(template.without_input) + ""
        "{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ message['content'] }}{{ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
