"""What every judge backend takes and gives back, kept free of heavy imports."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bdctl.judges.prompt import Verdict


@dataclass(frozen=True)
class JudgeRequest:
    """One question to the judge: ``answer_a`` is shown first, as "A"."""

    instruction: str
    input: str
    answer_a: str
    answer_b: str


@dataclass(frozen=True)
class JudgeOutput:
    """The judge's reply to one request.

    ``raw`` is the reply as given (the generated text, or the arg-max label for a scoring
    backend), ``verdict`` its parse (``None`` when unparseable), and ``scores`` the per-label
    log-probabilities where the backend has them.
    """

    raw: str
    verdict: Verdict | None
    scores: Mapping[str, float] = field(default_factory=dict)


class JudgeBackend(Protocol):
    """A judge: an identity for cache keys and a way to answer many requests."""

    @property
    def identity(self) -> Mapping[str, str]:
        """Everything about the judge that decides its verdicts (backend, model, endpoint,
        prompt version, decoding limits). Part of every cache key."""
        ...

    def judge_many(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[int, JudgeOutput]]:
        """Yield ``(index into requests, output)`` as each verdict is finished, in any order.

        A backend that cannot go on raises ``UserError`` after yielding every verdict it did
        finish, so that the caller can store those first.
        """
        ...
