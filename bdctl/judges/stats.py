"""Win / tie / loss counts and the win rate with a bootstrap interval over prompts.

Counts are per judgment (two per pair, one per order), which is what the stacked bars of the
chart show. The win rate is the mean pair score (win 1, tie 0.5, loss 0, averaged over both
orders) over the pairs that have one; its 95% interval is a percentile bootstrap that resamples
prompts, not judgments, because the two orders of one prompt are not independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bdctl.judges import PairResult


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
    wins = ties = losses = unparseable = 0
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
    )
