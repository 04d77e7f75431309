"""Win / tie / loss counts and the win rate with a bootstrap interval over prompts.

Counts are per judgment (two per pair, one per order), which is what the stacked bars of the
chart show. The win rate is the mean pair score (win 1, tie 0.5, loss 0, averaged over both
orders) over the pairs that have one; its 95% interval is a percentile bootstrap that resamples
prompts, not judgments, because the two orders of one prompt are not independent.

Position bias. Both orders cancel a judge's preference for a position in the win rate, but they
cannot make a position-driven judge informative: one that always answers "A" scores every pair
one win and one loss, a win rate of exactly 50 % with an interval of zero width, which reads as a
precise tie. So every record also says how far the verdicts follow the answers:

    consistency      the share of pairs (both orders parsed) whose two verdicts agree about the
                     answers: the same answer wins in both orders, or both are ties
    first position   the share of decisive verdicts (A or B) that pick the answer shown first

A judge with a consistency below ``POSITION_DRIVEN_BELOW`` picks by position more often than by
content; its win rates are flagged as such wherever they are shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bdctl.judges import PairResult

#: Below this consistency a judge's verdicts follow the answer's position more often than the
#: answer (a judge guessing among A, B and Tie at random is consistent on a third of the pairs).
POSITION_DRIVEN_BELOW = 0.5


@dataclass(frozen=True)
class WinRate:
    """The model's record against one baseline. Rates are fractions in [0, 1]."""

    wins: int
    ties: int
    losses: int
    #: Judgments whose reply could not be read as A, B or Tie (left out of the rates).
    unparseable: int
    #: Pairs with at least one parseable judgment, i.e. those the win rate averages.
    pairs: int
    win_rate: float
    ci_low: float
    ci_high: float
    #: Pairs with both orders parsed, and those among them whose verdicts agree about the answers.
    both_parsed: int = 0
    consistent: int = 0
    #: Decisive verdicts (A or B), and those among them that picked the answer shown first.
    decisive: int = 0
    first_picks: int = 0

    @property
    def consistency(self) -> float:
        """Share of pairs whose verdict follows the answer, not its position (NaN without pairs)."""
        return self.consistent / self.both_parsed if self.both_parsed else math.nan

    @property
    def first_position(self) -> float:
        """Share of decisive verdicts that picked the first answer shown (0.5: no preference)."""
        return self.first_picks / self.decisive if self.decisive else math.nan

    @property
    def position_driven(self) -> bool:
        """Whether the judge followed the answers' positions more often than the answers."""
        return self.consistency < POSITION_DRIVEN_BELOW  # False when NaN: nothing to judge by

    @property
    def judgments(self) -> int:
        """Parseable judgments: wins + ties + losses."""
        return self.wins + self.ties + self.losses

    def share(self, outcome: str) -> float:
        """The fraction of parseable judgments that are ``win``, ``tie`` or ``loss``."""
        count = {"win": self.wins, "tie": self.ties, "loss": self.losses}[outcome]
        return count / self.judgments if self.judgments else math.nan


def bootstrap_interval(
    scores: Sequence[float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (NaNs when there are none)."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    # Drawn in chunks so that memory stays small however many prompts there are.
    means = np.empty(resamples)
    chunk = max(1, 1_000_000 // values.size)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        picks = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def win_rate(
    results: Sequence[PairResult],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRate:
    """Summarise judged pairs; the win rate and interval are NaN when no pair has a score."""
    wins = ties = losses = unparseable = both_parsed = consistent = decisive = first_picks = 0
    for result in results:
        for judgment in result.judgments:
            if judgment.outcome is None:
                unparseable += 1
            elif judgment.outcome == 1.0:
                wins += 1
            elif judgment.outcome == 0.5:
                ties += 1
            else:
                losses += 1
            if judgment.verdict in ("A", "B"):
                decisive += 1
                first_picks += judgment.verdict == "A"
        outcomes = [judgment.outcome for judgment in result.judgments]
        if None not in outcomes:
            both_parsed += 1
            # The same outcome for the model in both orders: the verdict moved with the answers.
            consistent += outcomes[0] == outcomes[1]
    scores = [score for score in (result.score for result in results) if score is not None]
    low, high = bootstrap_interval(scores, resamples=resamples, confidence=confidence, seed=seed)
    return WinRate(
        wins=wins,
        ties=ties,
        losses=losses,
        unparseable=unparseable,
        pairs=len(scores),
        win_rate=float(np.mean(scores)) if scores else math.nan,
        ci_low=low,
        ci_high=high,
        both_parsed=both_parsed,
        consistent=consistent,
        decisive=decisive,
        first_picks=first_picks,
    )
