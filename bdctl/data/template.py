"""The prompt template (METHOD.md section 5): instruction, optional input, response header.

Alpaca-style sections in bdctl's own wording; a recipe may replace both forms with `data.template`.
"""

from __future__ import annotations

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


def render_prompt(instruction: str, input: str, template: Template | None = None) -> str:
    """The prompt x for one example; the model's answer follows it directly."""
    template = template or DEFAULT_TEMPLATE
    values = {"instruction": instruction.strip(), "input": input.strip()}
    form = template.with_input if values["input"] else template.without_input
    # One pass of substitution, so braces inside the user's text are never re-expanded.
    return _FIELD.sub(lambda m: values[m.group(1)], form)
