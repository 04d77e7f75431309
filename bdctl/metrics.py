"""Text metrics: Rouge-L as the paper reports it, and the mean / spread over seeds.

Rouge-L follows docs/method.md §8 (MiniLLM's evaluation): the F-measure of ``rouge_score``'s
``rougeL`` with ``use_stemmer=True``, the best over the references, times 100, the prediction
stripped of surrounding whitespace. ``rouge_score``'s default tokenizer lowercases and keeps only
``[a-z0-9]`` runs, so text in other scripts scores 0, exactly as in the paper's tooling.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from bdctl.errors import UserError

_scorer: Any = None
_scorer_lock = threading.Lock()


def _rouge_scorer() -> Any:
    """The one RougeScorer, built on first use (building it loads the Porter stemmer)."""
    global _scorer
    with _scorer_lock:
        if _scorer is None:
            from rouge_score import rouge_scorer

            _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return _scorer


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure of ``prediction`` against its best reference, in [0, 100]."""
    if isinstance(references, str) or not references:
        raise UserError(f"rouge_l needs at least one reference (a list of strings) for prediction {prediction[:40]!r}")
    scorer = _rouge_scorer()
    candidate = prediction.strip()
    # rouge_score's score(target, prediction): the reference comes first.
    best = max(scorer.score(reference, candidate)["rougeL"].fmeasure for reference in references)
    return 100.0 * best


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of ``values``; the spread of one value is 0.

    The sample deviation is used because the values are a few seeds drawn from the run-to-run
    spread, which is what a report's "mean ± std over 5 seeds" estimates.
    """
    numbers = [float(value) for value in values]
    if not numbers:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(numbers) / len(numbers)
    if len(numbers) == 1:
        return mean, 0.0
    variance = math.fsum((value - mean) ** 2 for value in numbers) / (len(numbers) - 1)
    return mean, math.sqrt(variance)
