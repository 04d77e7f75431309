"""Answers to prompts under a sampling protocol, scored with Rouge-L: the one place that eval,
judge and Rouge-L checkpoint selection share (docs/method.md §8).

    answers = sample_answers(model, tokenizer, prompts, seeds, protocol=protocol.sampling(), ...)
    score = rouge_l(answers[0].text, references)

* A protocol (`recipe.schema.Protocol`) is a name, a temperature, a top_p and a top_k; every model
  is sampled under every protocol of stages.eval, and a number is only ever compared with numbers
  of the same protocol.
* Each prompt is sampled with its own seed `prompt_seed(seed, prompt id)`, so an answer depends
  neither on its batch nor on the rank that samples it, and two models draw the same random
  numbers on the same prompt (a paired comparison).
* An answer's text is the decoded response without its final EOS (a stop signal, not a word); with
  data.template: chat the stop signal is the template's end-of-turn token (`models.stop_id`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "eos" or "length"
    tokens: int  # response tokens, the final EOS excluded


def prompt_seed(seed: int, prompt_id: Any) -> int:
    """The seed of one prompt's sample: a hash of (seed, prompt id). Fixed forever: changing it
    would silently change every saved evaluation."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def protocol_label(protocol: dict[str, Any]) -> str:
    """ "minillm (temperature 1, top_p 1, top_k 0)": how every number of a table was sampled."""
    return (
        f"{protocol['name']} (temperature {protocol['temperature']:g}, top_p {protocol['top_p']:g}, "
        f"top_k {protocol['top_k']})"
    )


def sample_answers(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    sampling: dict[str, Any],
    max_new_tokens: int,
    no_repeat_ngram_size: int | None,
    all_done: Callable[[bool], bool] | None = None,
) -> list[Answer]:
    """One answer per prompt, sampled in one batch under `sampling` (a protocol's temperature,
    top_p, top_k); `all_done` keeps ZeRO-3 ranks in step (`sampling.Lockstep`)."""
    from bdctl.models import stop_id
    from bdctl.sampling import FINISH_EOS, sample

    results = sample(
        model, prompts, seeds, eos_id=stop_id(tokenizer), pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size, all_done=all_done, **sampling,
    )  # fmt: skip
    answers = []
    for result in results:
        tokens = result.tokens[:-1] if result.finish_reason == FINISH_EOS else result.tokens
        answers.append(Answer(tokenizer.decode(tokens, skip_special_tokens=True), result.finish_reason, len(tokens)))
    return answers
