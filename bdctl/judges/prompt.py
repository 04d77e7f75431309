"""The pairwise judge prompt: what the judge sees and how its answer is read back.

bdctl's own wording of the protocol in docs/method.md §8 (after the paper's Figure 4): the
judge sees the instruction, the optional input and two answers, and must reply with exactly one
of ``A``, ``B`` or ``Tie``. Every backend (HTTP or local model) renders the same messages, and
``PROMPT_VERSION`` is part of every cache key: change the wording, bump the version, and old
verdicts are no longer reused.
"""

from __future__ import annotations

from typing import Literal

Verdict = Literal["A", "B", "Tie"]

#: The three answers a judge may give, in the order used for scores and reports.
VERDICTS: tuple[Verdict, ...] = ("A", "B", "Tie")

#: Bump whenever SYSTEM_PROMPT, the section headers or the rendering below change.
PROMPT_VERSION = "bdctl-judge-v1"

SYSTEM_PROMPT = (
    "You are a fair and careful judge of answers to instructions. You will be shown an "
    "instruction, sometimes with extra input, and two candidate answers labelled A and B. "
    "Decide which answer follows the instruction better: consider correctness, helpfulness, "
    "relevance and clarity, and ignore the order in which the answers appear and their length "
    "as such. Reply with exactly one word: A, B or Tie."
)

INSTRUCTION_HEADER = "### Instruction"
INPUT_HEADER = "### Input"
ANSWER_A_HEADER = "### Answer A"
ANSWER_B_HEADER = "### Answer B"
QUESTION = "Which answer is better? Reply with exactly one of: A, B, Tie."

#: The cue that ends the plain-text rendering; the judge's verdict is the next word.
PLAIN_VERDICT_CUE = "Verdict:"

# Characters that judges like to wrap a one-word answer in ("**A**", '"B".', "(Tie)").
_WRAPPING = " \t\r\n\"'`*.!()[]"


def build_user_message(instruction: str, input: str, answer_a: str, answer_b: str) -> str:
    """The user turn of the judge conversation; the input block is left out when it is empty."""
    sections = [f"{INSTRUCTION_HEADER}\n{instruction.strip()}"]
    if input.strip():
        sections.append(f"{INPUT_HEADER}\n{input.strip()}")
    sections.append(f"{ANSWER_A_HEADER}\n{answer_a.strip()}")
    sections.append(f"{ANSWER_B_HEADER}\n{answer_b.strip()}")
    sections.append(QUESTION)
    return "\n\n".join(sections)


def build_messages(instruction: str, input: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """Chat messages (system + user) asking the judge to compare ``answer_a`` with ``answer_b``."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": build_user_message(instruction, input, answer_a, answer_b)},
    ]


def render_plain(messages: list[dict[str, str]]) -> str:
    """The messages as one plain-text prompt, for judge models without a chat template.

    The text ends with ``PLAIN_VERDICT_CUE`` so that the verdict is the very next word.
    """
    body = "\n\n".join(message["content"] for message in messages)
    return f"{body}\n\n{PLAIN_VERDICT_CUE}"


def parse_verdict(text: str) -> Verdict | None:
    """Read a judge's reply as ``"A"``, ``"B"`` or ``"Tie"``; anything else is ``None``.

    Tolerant of case and of wrapping whitespace, quotes, markdown emphasis, brackets and a final
    period (``" a"``, ``'"B".'``, ``"**Tie**"``), and strict about content: a reply that is not
    exactly one of the three words once unwrapped (``"A or B"``, ``"Answer: A"``) is unparseable
    rather than guessed at, so that it is counted as such.
    """
    word = text.strip(_WRAPPING).casefold()
    for verdict in VERDICTS:
        if word == verdict.casefold():
            return verdict
    return None
