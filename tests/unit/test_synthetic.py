"""Tests for bdctl.data.synthetic.

Answers are checked INDEPENDENTLY of the generator: numbers are parsed back from words with
a parser written here, lists are re-sorted / re-reversed / recounted from the prompt text,
and knowledge-base facts are cross-checked between instruction answers and corpus prose
without looking at the module's own tables.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import string

import pytest

from bdctl.data.synthetic import FAMILIES, synthetic_corpus, synthetic_instructions
from bdctl.errors import UserError

N = 2000


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return synthetic_instructions(N, seed=0)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return synthetic_corpus(1500, seed=0)


def by_family(records: list[dict[str, str]], family: str) -> list[dict[str, str]]:
    return [r for r in records if r["family"] == family]


def prompt(r: dict[str, str]) -> str:
    return f"{r['instruction']} {r['input']}".strip()


def data_of(r: dict[str, str]) -> str:
    """Where the list/phrase lives: the input field, or after the colon of an inline prompt."""
    if r["input"]:
        return r["input"]
    assert ":" in r["instruction"], r
    return r["instruction"].split(":", 1)[1].strip().rstrip(".?")


# --- an independent number-word parser ------------------------------------------------------

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}


def words_to_int(text: str) -> int | None:
    text = text.lower()
    if text == "one hundred":
        return 100
    if text in _UNITS:
        return _UNITS.index(text)
    if text in _TENS:
        return _TENS[text]
    if "-" in text:
        tens, unit = text.split("-", 1)
        if tens in _TENS and unit in _UNITS[1:10]:
            return _TENS[tens] + _UNITS.index(unit)
    return None


def test_number_parser_sanity() -> None:
    assert words_to_int("forty-two") == 42 and words_to_int("Nineteen") == 19
    assert words_to_int("zero") == 0 and words_to_int("apple") is None


# --- API, determinism -----------------------------------------------------------------------


def test_record_shape(records: list[dict[str, str]]) -> None:
    assert len(records) == N
    for r in records:
        assert set(r) == {"instruction", "input", "output", "family"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["instruction"].strip() and r["output"].strip()
        assert r["family"] in FAMILIES


def test_deterministic(records: list[dict[str, str]]) -> None:
    assert synthetic_instructions(N, seed=0) == records
    assert synthetic_instructions(N, seed=1) != records
    assert synthetic_instructions(0, seed=0) == []
    assert synthetic_corpus(50, seed=3) == synthetic_corpus(50, seed=3)
    assert synthetic_corpus(50, seed=3) != synthetic_corpus(50, seed=4)


def test_golden_checksum() -> None:
    # Pins the exact output, so a Python upgrade or an accidental edit that silently changes
    # the data (and so invalidates cached tokenizers/checkpoints) fails loudly. If the change
    # is intended, update the digests.
    blob = json.dumps([synthetic_instructions(300, seed=7), synthetic_corpus(100, seed=7)], sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest() == GOLDEN_SHA256


GOLDEN_SHA256 = "78c8bcffb2ab23e65c1f10a2e42dadc52d6a33f2e9d957d17c2bc215535a0487"


def test_all_families_balanced(records: list[dict[str, str]]) -> None:
    assert len(FAMILIES) >= 6
    counts = collections.Counter(r["family"] for r in records)
    assert set(counts) == set(FAMILIES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_family_subset_and_unknown_family() -> None:
    recs = synthetic_instructions(40, seed=0, families=["facts", "letters"])
    assert {r["family"] for r in recs} == {"facts", "letters"}
    assert {r["family"] for r in synthetic_instructions(10, 0, families="sorting")} == {"sorting"}
    with pytest.raises(UserError) as info:
        synthetic_instructions(10, seed=0, families=["facts", "poetry"])
    message = str(info.value)
    assert "\n" not in message and "poetry" in message
    assert all(name in message for name in FAMILIES)
    with pytest.raises(UserError):
        synthetic_instructions(10, seed=0, families=[])
    with pytest.raises(UserError):
        synthetic_instructions(-1, seed=0)


# --- variety, uniqueness, length --------------------------------------------------------------


def skeleton(r: dict[str, str]) -> str:
    """The instruction template: text before any inline data, with the prompt's variable
    parts (numbers, single letters, words that reappear in the answer) masked out."""
    head = r["instruction"].split(":", 1)[0]
    answer_words = {w.lower() for w in re.findall(r"[A-Za-z]+", r["output"])}
    out = []
    for w in re.findall(r"[A-Za-z-]+|\d+|[?.,]", head):
        variable = (
            w.isdigit() or len(w) == 1 and w.islower() or words_to_int(w) is not None or w.lower() in answer_words
        )
        out.append("_" if variable else w)
    return " ".join(out) + (" +input" if r["input"] else "")


@pytest.mark.parametrize("family", FAMILIES)
def test_phrasing_variety(records: list[dict[str, str]], family: str) -> None:
    recs = by_family(records, family)
    skeletons = collections.Counter(skeleton(r) for r in recs)
    assert len(skeletons) >= 6, skeletons
    # Both layouts occur: data inline in the instruction, and data in the input field.
    assert any(r["input"] for r in recs) and any(not r["input"] for r in recs)
    # No template dominates the family.
    assert skeletons.most_common(1)[0][1] / len(recs) < 0.3, skeletons.most_common(3)


def test_prompts_mostly_unique(records: list[dict[str, str]]) -> None:
    prompts = collections.Counter((r["instruction"], r["input"]) for r in records)
    fraction = len(prompts) / len(records)
    print(f"\nunique (instruction, input) pairs for n={N}: {fraction:.3f}")
    assert fraction >= 0.85, fraction
    assert prompts.most_common(1)[0][1] <= 8, prompts.most_common(3)


def test_length_bounds(records: list[dict[str, str]]) -> None:
    for r in records:
        assert len(prompt(r).split()) < 40, r
        assert 2 <= len(r["output"].split()) < 25, r  # multi-token answers


def test_vocabulary_is_small(records: list[dict[str, str]], corpus: list[str]) -> None:
    texts = [t for r in records for t in (r["instruction"], r["input"], r["output"])] + corpus
    vocab = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+|\d+", t)}
    assert len(vocab) < 700, len(vocab)


# --- answers are correct (checked independently) ----------------------------------------------

_OPS = {
    "plus": (lambda a, b: a + b, ("plus", "add", "sum", "more")),
    "minus": (lambda a, b: a - b, ("minus", "subtract", "away", "lose")),
    "times": (lambda a, b: a * b, ("times", "multiply", "product")),
}


def test_arithmetic_answers(records: list[dict[str, str]]) -> None:
    for r in by_family(records, "arithmetic"):
        m = re.fullmatch(r"(\S+) (plus|minus|times) (\S+) is (.+)\.", r["output"])
        assert m, r
        a, b, c = (words_to_int(m.group(i)) for i in (1, 3, 4))
        assert None not in (a, b, c), r
        fn, keywords = _OPS[m.group(2)]
        assert c == fn(a, b), r
        # The answer's operands and operation are the ones the prompt asked about.
        tokens = re.findall(r"[a-z]+(?:-[a-z]+)?", prompt(r).lower())
        numbers = [v for v in map(words_to_int, tokens) if v is not None]
        assert sorted(numbers) == sorted([a, b]), r
        assert any(k in tokens for k in keywords), r
        assert 0 <= a <= 20 and 0 <= b <= 20 and c >= 0


def test_sorting_answers(records: list[dict[str, str]]) -> None:
    for r in by_family(records, "sorting"):
        items = re.findall(r"[a-z]+|\d+", data_of(r))
        m = re.fullmatch(
            r"(In alphabetical order|From smallest to largest|From largest to smallest): (.+)\.",
            r["output"],
        )
        assert m, r
        got = m.group(2).split(", ")
        head = r["instruction"].lower()
        if m.group(1) == "In alphabetical order":
            assert "alphabetical" in head or "a to z" in head, r
            assert got == sorted(items), r
        else:
            assert m.group(1).lower()[5:] in head, r  # same direction as asked
            expected = sorted(items, key=int, reverse=m.group(1).endswith("smallest"))
            assert got == expected, r
        assert 3 <= len(items) <= 5


def test_reversing_answers(records: list[dict[str, str]]) -> None:
    for r in by_family(records, "reversing"):
        items = re.findall(r"[a-z]+", data_of(r))
        assert r["output"] == "In reverse order: " + ", ".join(items[::-1]) + ".", r
        assert 3 <= len(items) <= 5


def test_counting_answers(records: list[dict[str, str]]) -> None:
    seen_kinds = set()
    for r in by_family(records, "counting"):
        if m := re.fullmatch(r"There are (\S+) words in the list\.", r["output"]):
            seen_kinds.add("items")
            assert words_to_int(m.group(1)) == len(data_of(r).split(", ")), r
            continue
        m = re.fullmatch(
            r"The letter ([a-z]) (?:appears (once|\S+ times)|(does not appear)) in ([a-z]+)\.",
            r["output"],
        )
        assert m, r
        letter, times, absent, word = m.groups()
        p = prompt(r)
        assert re.search(rf"\bletter {letter}\b", p) and re.search(rf"\b{word}\b", p), r
        if absent:
            seen_kinds.add("zero")
            assert word.count(letter) == 0, r
        else:
            seen_kinds.add("letter")
            expected = 1 if times == "once" else words_to_int(times.split()[0])
            assert word.count(letter) == expected, r
    assert seen_kinds == {"items", "letter", "zero"}


def test_formatting_answers(records: list[dict[str, str]]) -> None:
    seen = collections.Counter()
    for r in by_family(records, "formatting"):
        data, head = data_of(r), r["instruction"].lower()
        words = re.findall(r"[a-z]+", data)
        if "title case" in head or "every word" in head:
            seen["title"] += 1
            assert r["output"] == " ".join(w[0].upper() + w[1:] for w in words), r
        elif "capital" in head or "uppercase" in head:
            seen["upper"] += 1
            assert r["output"] == " ".join(words).upper(), r
        elif "comma" in head:
            seen["commas"] += 1
            assert r["output"] == ", ".join(words), r
        elif "bullet" in head:
            seen["bullets"] += 1
            assert r["output"].split("\n") == [f"- {w}" for w in words], r
        else:
            pytest.fail(f"unrecognised formatting prompt: {r}")
    assert len(seen) == 4 and min(seen.values()) > 20, seen


def test_letters_answers(records: list[dict[str, str]]) -> None:
    abc = string.ascii_lowercase
    for r in by_family(records, "letters"):
        p, out = prompt(r), r["output"]
        if m := re.fullmatch(r"The letter (after|before) ([a-z]) is ([a-z])\.", out):
            where, asked, got = m.groups()
            assert re.search(rf"(after|before|follows) {asked}\b", p), r
            assert abc.index(got) == abc.index(asked) + (1 if where == "after" else -1), r
        elif m := re.fullmatch(r"The three letters after ([a-z]) are ([a-z]), ([a-z]) and ([a-z])\.", out):
            i = abc.index(m.group(1))
            assert re.search(rf"\b{m.group(1)}\b", p), r
            assert "".join(m.groups()[1:]) == abc[i + 1 : i + 4], r
        elif m := re.fullmatch(r"The word ([a-z]+) is spelled (.+)\.", out):
            assert m.group(1) in p and m.group(2).split(", ") == list(m.group(1)), r
        elif m := re.fullmatch(r"The first letter of ([a-z]+) is ([a-z])\.", out):
            assert m.group(1) in p and m.group(2) == m.group(1)[0], r
        else:
            pytest.fail(f"unrecognised letters answer: {r}")


# --- the knowledge base: consistent across questions and with the corpus -----------------------

_FACT_PATTERNS = {  # relation -> answer pattern (subject, value)
    "colour": r"A ([a-z]+) is ([a-z]+)\.",
    "food": r"A ([a-z]+) eats ([a-z]+)\.",
    "home": r"A ([a-z]+) lives in ([a-z ]+)\.",
    "country": r"([A-Z][a-z]+) is in ([A-Z][a-z]+)\.",
    "famous": r"([A-Z][a-z]+) is famous for its ([a-z]+)\.",
    "job": r"([A-Z][a-z]+) is a ([a-z]+)\.",
    "lives": r"([A-Z][a-z]+) lives in ([A-Z][a-z]+)\.",
}
_CORPUS_PATTERNS = {  # relation -> corpus sentence patterns, including paraphrases
    "colour": [r"A ([a-z]+) is ([a-z]+)\.", r"The ([a-z]+) is a ([a-z]+) creature\."],
    "food": [r"A ([a-z]+) eats ([a-z]+)\.", r"The favourite food of a ([a-z]+) is ([a-z]+)\."],
    "home": [r"A ([a-z]+) lives in ([a-z ]+?)\.", r"You can find a ([a-z]+) in ([a-z ]+?)\."],
    "country": [r"([A-Z][a-z]+) is (?:a city )?in ([A-Z][a-z]+)\."],
    "famous": [r"([A-Z][a-z]+) is famous for its ([a-z]+)\.", r"People know ([A-Z][a-z]+) for its ([a-z]+)\."],
    "job": [r"([A-Z][a-z]+) is a ([a-z]+)\.", r"([A-Z][a-z]+) lives in [A-Z][a-z]+ and is a ([a-z]+)\."],
    "lives": [r"([A-Z][a-z]+) lives in ([A-Z][a-z]+)[.,]", r"([A-Z][a-z]+) lives in ([A-Z][a-z]+) and"],
}


def add_fact(table: dict[str, dict[str, str]], relation: str, subject: str, value: str) -> None:
    known = table[relation].setdefault(subject, value)
    assert known == value, f"{relation}({subject}) is both {known!r} and {value!r}"


def facts_from_answers(records: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = collections.defaultdict(dict)
    two_hop = []
    for r in by_family(records, "facts"):
        if m := re.fullmatch(r"([A-Z][a-z]+) lives in ([A-Z][a-z]+), which is in ([A-Z][a-z]+)\.", r["output"]):
            two_hop.append(m.groups())
            add_fact(table, "lives", m.group(1), m.group(2))
            add_fact(table, "country", m.group(2), m.group(3))
            continue
        matches = [(rel, m) for rel, pat in _FACT_PATTERNS.items() if (m := re.fullmatch(pat, r["output"]))]
        assert len(matches) == 1, r
        rel, m = matches[0]
        assert m.group(1) in prompt(r), r  # the answer is about the entity asked about
        add_fact(table, rel, m.group(1), m.group(2))
    assert two_hop
    return table


def facts_from_corpus(corpus: list[str]) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for doc in corpus:
        for relation, patterns in _CORPUS_PATTERNS.items():
            for pat in patterns:
                for subject, value in re.findall(pat, doc):
                    add_fact(table, relation, subject, value)
    return table


def test_knowledge_base_is_consistent(corpus: list[str]) -> None:
    answers = facts_from_answers(synthetic_instructions(4000, seed=5, families=["facts"]))
    prose = facts_from_corpus(corpus)
    subjects = {s for relation in answers.values() for s in relation}
    n_entities = len(subjects | set(answers["country"].values()))
    assert 40 <= n_entities <= 70, n_entities
    for relation, table in answers.items():
        # Every fact asked about is stated in the corpus, with the same value.
        assert table, relation
        for subject, value in table.items():
            assert prose[relation].get(subject) == value, (relation, subject, value)
    # Values are spread out, so no single guess answers a relation well.
    for relation in ("colour", "food", "home", "job", "famous"):
        top = collections.Counter(answers[relation].values()).most_common(1)[0][1]
        assert top / len(answers[relation]) <= 0.25, relation


# --- corpus ------------------------------------------------------------------------------------


def test_corpus_documents(corpus: list[str]) -> None:
    assert len(corpus) == 1500
    for doc in corpus:
        assert doc.strip() and doc == doc.strip()
        sentences = re.findall(r"[^.]+\.", doc)
        assert 2 <= len(sentences) <= 8, doc
        # Prose only: no questions, no instruction formatting.
        assert "?" not in doc and "\n" not in doc
    assert synthetic_corpus(0, seed=0) == []
    with pytest.raises(UserError):
        synthetic_corpus(-3, seed=0)


def test_corpus_arithmetic_is_correct(corpus: list[str]) -> None:
    checked = 0
    for doc in corpus:
        statements = re.findall(r"(?:^|\. )([A-Za-z-]+) (plus|minus|times) ([a-z-]+) is ([a-z -]+?)\.", doc)
        for a, op, b, c in statements:
            assert _OPS[op][0](words_to_int(a), words_to_int(b)) == words_to_int(c), doc
            checked += 1
    assert checked > 100
