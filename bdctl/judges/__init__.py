"""Pairwise judging of a model against a baseline (the win rates of the paper's Figure 2).

Every pair is judged twice, once with the model's answer shown as A and once with the answers
swapped, which cancels a judge's preference for a position (docs/method.md §8). For the model a
win counts 1, a tie 0.5 and a loss 0, and a pair's score is the mean over its two orders.

A reply that is not A, B or Tie is no verdict: it is asked again (``PARSE_TRIES`` in all), never
stored in the cache (a rerun against a repaired endpoint asks it again), and if it stays
unreadable the judgment is reported as unparsed and left out of the win rate.

Backends live in submodules that are imported only when used, so that importing this package
stays cheap (no torch, transformers or httpx): ``bdctl.judges.openai_backend.OpenAIJudge`` (any
OpenAI-compatible endpoint) and ``bdctl.judges.hf_backend.HFJudge`` (a local causal LM).
Statistics are in ``bdctl.judges.stats`` and the chart in ``bdctl.judges.figure``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from bdctl.judges.base import JudgeBackend, JudgeOutput, JudgeRequest
from bdctl.judges.cache import CachedVerdict, VerdictCache, verdict_key
from bdctl.judges.prompt import PROMPT_VERSION, Verdict, build_messages, parse_verdict
from bdctl.recipe.schema import PARSE_TRIES

__all__ = [
    "PARSE_TRIES",
    "PROMPT_VERSION",
    "CachedVerdict",
    "JudgeBackend",
    "JudgeOutput",
    "JudgeRequest",
    "Judgment",
    "Order",
    "Pair",
    "PairResult",
    "Verdict",
    "VerdictCache",
    "build_messages",
    "judge_pairs",
    "outcome_for_model",
    "parse_verdict",
    "verdict_key",
]

Order = Literal["model_first", "model_second"]
ORDERS: tuple[Order, Order] = ("model_first", "model_second")


@dataclass(frozen=True)
class Pair:
    """One prompt with the answer of the model under test and that of a baseline."""

    prompt_id: str
    instruction: str
    input: str
    answer_model: str
    answer_baseline: str

    def request(self, order: Order) -> JudgeRequest:
        """The judge request for one order (``model_first``: the model's answer is A)."""
        if order == "model_first":
            return JudgeRequest(self.instruction, self.input, self.answer_model, self.answer_baseline)
        return JudgeRequest(self.instruction, self.input, self.answer_baseline, self.answer_model)


@dataclass(frozen=True)
class Judgment:
    """The judge's verdict on one order of a pair, and what it means for the model."""

    order: Order
    verdict: Verdict | None
    raw: str
    #: 1 win, 0.5 tie, 0 loss for the model; ``None`` when the reply was unparseable.
    outcome: float | None


@dataclass(frozen=True)
class PairResult:
    """Both judgments of a pair."""

    prompt_id: str
    judgments: tuple[Judgment, Judgment]

    @property
    def score(self) -> float | None:
        """The model's score on this pair: the mean outcome over the orders that parsed.

        An unparseable order is left out rather than guessed (it is counted in the statistics);
        a pair with no parseable order has no score.
        """
        outcomes = [j.outcome for j in self.judgments if j.outcome is not None]
        return sum(outcomes) / len(outcomes) if outcomes else None


def outcome_for_model(verdict: Verdict | None, order: Order) -> float | None:
    """Translate the judge's A/B/Tie into 1 / 0.5 / 0 for the model under test."""
    if verdict is None:
        return None
    if verdict == "Tie":
        return 0.5
    model_label = "A" if order == "model_first" else "B"
    return 1.0 if verdict == model_label else 0.0


def judge_pairs(
    backend: JudgeBackend,
    pairs: Sequence[Pair],
    cache: VerdictCache,
    *,
    on_verdict: Callable[[int, int], None] | None = None,
    parse_tries: int = PARSE_TRIES,
) -> list[PairResult]:
    """Judge every pair in both orders, asking the backend only for verdicts not yet cached.

    Each new verdict is stored in ``cache`` as soon as the backend finishes it, so a failure
    (the backend's ``UserError``, an interrupt) loses no finished work and a rerun resumes.
    Identical requests (the same texts in the same order) are asked once. A reply that is not a
    verdict is asked again, up to ``parse_tries`` times in all, and never stored; the last such
    reply is returned as an unparsed judgment. ``on_verdict(done, total)`` is called after each
    reply, for progress display (``total`` grows when replies are asked again).
    """
    if parse_tries < 1:
        raise ValueError(f"parse_tries must be at least 1, got {parse_tries}")
    identity = dict(backend.identity)
    keys = [[verdict_key(identity, pair.request(order)) for order in ORDERS] for pair in pairs]

    # The requests still to ask, one per distinct key.
    missing: dict[str, JudgeRequest] = {}
    for pair, pair_keys in zip(pairs, keys, strict=True):
        for order, key in zip(ORDERS, pair_keys, strict=True):
            if key not in missing and cache.get(key) is None:
                missing[key] = pair.request(order)

    unparsed: dict[str, JudgeOutput] = {}  # the latest unreadable reply per key
    asked = 0
    for _ in range(parse_tries):
        if not missing:
            break
        missing_keys = list(missing)
        requests = [missing[key] for key in missing_keys]
        total, again = asked + len(requests), {}
        outputs = backend.judge_many(requests)
        try:
            for index, output in outputs:
                key = missing_keys[index]
                if output.verdict is None:
                    unparsed[key], again[key] = output, requests[index]
                else:
                    unparsed.pop(key, None)
                    cache.put(key, identity, requests[index], output)
                asked += 1
                if on_verdict is not None:
                    on_verdict(asked, total)
        finally:
            # If storing failed, stop the backend's work now rather than when the traceback
            # holding the generator is freed.
            close = getattr(outputs, "close", None)
            if close is not None:
                close()
        missing = again

    results = []
    for pair, pair_keys in zip(pairs, keys, strict=True):
        judgments = []
        for order, key in zip(ORDERS, pair_keys, strict=True):
            entry = cache.get(key)
            if entry is not None:
                judgments.append(Judgment(order, entry.verdict, entry.raw, outcome_for_model(entry.verdict, order)))
            elif key in unparsed:
                judgments.append(Judgment(order, None, unparsed[key].raw, None))
            else:
                # A backend that returned without an error must have answered every request.
                raise RuntimeError(f"judge backend {identity} gave no verdict for pair {pair.prompt_id!r} ({order})")
        results.append(PairResult(pair.prompt_id, (judgments[0], judgments[1])))
    return results
