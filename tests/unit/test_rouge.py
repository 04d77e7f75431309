"""Rouge-L against rouge_score itself, and the mean / spread helper."""

from __future__ import annotations

import math
import statistics

import pytest
from rouge_score import rouge_scorer

from bdctl.errors import UserError
from bdctl.metrics import mean_std, rouge_l

REFERENCE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def expected(prediction: str, references: list[str]) -> float:
    """The protocol of docs/method.md §8, written out with rouge_score directly."""
    return 100 * max(REFERENCE_SCORER.score(ref, prediction.strip())["rougeL"].fmeasure for ref in references)


CASES = [
    ("The Cat sat on the MAT", ["the cat sat on the mat"]),  # case is ignored
    ("Paris, France!", ["paris france"]),  # punctuation is not a token
    ("He was running to the stores", ["he runs to the store"]),  # stemming: running ~ run(s)
    ("a b c d", ["x y z", "a b x d", "a b c"]),  # several references: the best counts
    ("  the answer is 42 \n", ["The answer is 42."]),  # surrounding whitespace is stripped
    ("Ünïcödé café naïve", ["unicode cafe naive"]),  # non-ASCII letters are dropped by the tokenizer
    ("東京は日本の首都です", ["東京は日本の首都です"]),  # text in another script: no tokens at all
    ("one two three four five", ["five four three two one"]),  # order matters for the LCS
]


@pytest.mark.parametrize(("prediction", "references"), CASES)
def test_rouge_l_matches_rouge_score(prediction: str, references: list[str]) -> None:
    assert rouge_l(prediction, references) == pytest.approx(expected(prediction, references), abs=1e-9)


def test_rouge_l_takes_the_best_reference() -> None:
    scores = [rouge_l("a b c d", [ref]) for ref in ("x y z", "a b x d", "a b c")]
    assert rouge_l("a b c d", ["x y z", "a b x d", "a b c"]) == pytest.approx(max(scores))
    assert len(set(scores)) == 3  # the references really do score differently


def test_rouge_l_stemming_counts_inflections() -> None:
    assert rouge_l("running", ["run"]) == pytest.approx(100.0)


def test_rouge_l_bounds() -> None:
    assert rouge_l("The quick brown fox.", ["the quick brown fox"]) == pytest.approx(100.0)
    assert rouge_l("", ["something"]) == 0.0
    assert rouge_l(" \n\t ", ["something"]) == 0.0
    assert rouge_l("completely different", ["nothing shared here"]) == 0.0
    assert 0.0 < rouge_l("the cat", ["the cat sat"]) < 100.0


def test_rouge_l_needs_a_reference() -> None:
    with pytest.raises(UserError, match="at least one reference"):
        rouge_l("anything", [])
    with pytest.raises(UserError, match="at least one reference"):
        rouge_l("anything", "a bare string is not a list of references")  # type: ignore[arg-type]


def test_mean_std_is_the_sample_deviation() -> None:
    values = [24.1, 24.9, 25.3, 24.4, 24.8]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert std == pytest.approx(statistics.stdev(values))  # ddof = 1


def test_mean_std_edge_cases() -> None:
    assert mean_std([7.5]) == (7.5, 0.0)
    assert mean_std([3, 3, 3]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])
    mean, std = mean_std((1.0, 2.0))
    assert (mean, std) == (1.5, pytest.approx(math.sqrt(0.5)))
