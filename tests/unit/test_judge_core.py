"""Judge prompt parsing, scoring, the verdict cache, statistics, the local HF judge and the chart."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from bdctl.errors import UserError
from bdctl.judges import (
    PARSE_TRIES,
    JudgeOutput,
    JudgeRequest,
    Pair,
    VerdictCache,
    judge_pairs,
    outcome_for_model,
    parse_verdict,
    verdict_key,
)
from bdctl.judges.prompt import INPUT_HEADER, PROMPT_VERSION, build_messages, render_plain
from bdctl.judges.stats import WinRate, bootstrap_interval, win_rate

# -- prompt -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("A", "A"),
        ("a", "A"),
        (" B\n", "B"),
        ('"B"', "B"),
        ("'a'.", "A"),
        (" Tie.", "Tie"),
        ("TIE", "Tie"),
        ("**Tie**", "Tie"),
        ("(B)", "B"),
        ("A or B", None),
        ("Answer: A", None),
        ("AB", None),
        ("Tied", None),
        ("", None),
        ("   ", None),
        ("I cannot decide.", None),
    ],
)
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_messages_show_everything_and_skip_an_empty_input() -> None:
    with_input = build_messages("Translate.", "Bonjour", "Hello", "Hi there")
    user = with_input[-1]["content"]
    assert [m["role"] for m in with_input] == ["system", "user"]
    assert all(text in user for text in ("Translate.", "Bonjour", "Hello", "Hi there"))
    assert user.index("Hello") < user.index("Hi there")
    assert INPUT_HEADER not in build_messages("Translate.", "  ", "Hello", "Hi")[-1]["content"]
    assert render_plain(with_input).endswith("Verdict:")


# -- scoring ----------------------------------------------------------------------------------


class ScriptedJudge:
    """A backend that answers from a table keyed by the answer shown first; counts requests."""

    def __init__(self, replies: Mapping[str, str], fail_after: int | None = None) -> None:
        self.replies = replies
        self.fail_after = fail_after
        self.asked: list[JudgeRequest] = []

    @property
    def identity(self) -> Mapping[str, str]:
        return {"backend": "scripted", "model": "table", "base_url": "", "prompt_version": PROMPT_VERSION}

    def judge_many(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[int, JudgeOutput]]:
        for index, request in enumerate(requests):
            if self.fail_after is not None and len(self.asked) == self.fail_after:
                raise UserError("scripted judge gave up")
            self.asked.append(request)
            raw = self.replies[request.answer_a]
            yield index, JudgeOutput(raw=raw, verdict=parse_verdict(raw))


# Keys are "model answer shown first" (m:) and "baseline answer shown first" (b:).
SCRIPT = {
    "m1": "A", "b1": "B",  # model wins both orders            -> 1
    "m2": "A", "b2": "A",  # judge always says A               -> (1 + 0) / 2
    "m3": "Tie", "b3": "B",  # tie, then win                   -> 0.75
    "m4": "B", "b4": "Tie",  # loss, then tie                  -> 0.25
    "m5": "B", "b5": "A",  # model loses both orders           -> 0
    "m6": "??", "b6": "A",  # unparseable, then loss           -> 0 (only the parsed order)
    "m7": "??", "b7": "nope",  # both unparseable              -> no score
}  # fmt: skip


def scripted_pairs() -> list[Pair]:
    return [Pair(f"p{i}", f"Question {i}?", "", f"m{i}", f"b{i}") for i in range(1, 8)]


def test_outcome_for_model() -> None:
    assert [outcome_for_model(v, "model_first") for v in ("A", "B", "Tie", None)] == [1.0, 0.0, 0.5, None]
    assert [outcome_for_model(v, "model_second") for v in ("A", "B", "Tie", None)] == [0.0, 1.0, 0.5, None]


# The three requests whose reply is never a verdict (m6, m7, b7): asked PARSE_TRIES times each.
UNPARSED = {"m6", "m7", "b7"}


def test_scores_average_both_orders(tmp_path: Path) -> None:
    judge = ScriptedJudge(SCRIPT)
    results = judge_pairs(judge, scripted_pairs(), VerdictCache(tmp_path / "v.jsonl"))
    assert [r.score for r in results] == [1.0, 0.5, 0.75, 0.25, 0.0, 0.0, None]
    assert len(judge.asked) == 14 + len(UNPARSED) * (PARSE_TRIES - 1)
    assert [r.answer_a for r in judge.asked[14:]] == ["m6", "m7", "b7"] * (PARSE_TRIES - 1)  # only those again
    # Both orders asked: the model's answer shown first, then the baseline's.
    assert {(r.answer_a, r.answer_b) for r in judge.asked[:2]} == {("m1", "b1"), ("b1", "m1")}

    record = win_rate(results, resamples=500, seed=1)
    assert (record.wins, record.ties, record.losses, record.unparseable) == (4, 2, 5, 3)
    assert record.pairs == 6
    assert record.win_rate == pytest.approx((1.0 + 0.5 + 0.75 + 0.25 + 0.0 + 0.0) / 6)
    # Both orders parsed on p1..p5; the verdicts follow the answers on p1 (win, win) and p5 (loss, loss).
    assert (record.both_parsed, record.consistent) == (5, 2) and record.consistency == pytest.approx(0.4)
    # Decisive verdicts: m1 b1 m2 b2 b3 m4 m5 b5 b6, of which m1 m2 b2 b5 b6 say A.
    assert (record.decisive, record.first_picks) == (9, 5) and record.first_position == pytest.approx(5 / 9)
    assert record.position_driven


def test_unparsed_replies_are_asked_again_until_they_parse(tmp_path: Path) -> None:
    class Stammering(ScriptedJudge):
        """Answers "Maybe" to the first `fails[answer shown first]` requests for it, then from the table."""

        def __init__(self, replies: Mapping[str, str], fails: dict[str, int]) -> None:
            super().__init__(replies)
            self.fails = fails

        def judge_many(self, requests):
            for index, request in enumerate(requests):
                self.asked.append(request)
                failing = sum(r.answer_a == request.answer_a for r in self.asked) <= self.fails[request.answer_a]
                raw = "Maybe" if failing else self.replies[request.answer_a]
                yield index, JudgeOutput(raw=raw, verdict=parse_verdict(raw))

    pairs, path = scripted_pairs()[:1], tmp_path / "v.jsonl"
    judge = Stammering(SCRIPT, fails={"m1": 1, "b1": PARSE_TRIES})  # m1 parses on its second try, b1 never
    results = judge_pairs(judge, pairs, VerdictCache(path))
    assert [r.answer_a for r in judge.asked] == ["m1", "b1"] * 2 + ["b1"] * (PARSE_TRIES - 2)
    [first, second] = results[0].judgments
    assert first.verdict == "A" and second.verdict is None and second.raw == "Maybe" and results[0].score == 1.0
    # Only the verdict is stored: a rerun against a repaired judge asks the other order again.
    assert len(VerdictCache(path)) == 1
    repaired = ScriptedJudge(SCRIPT)
    results = judge_pairs(repaired, pairs, VerdictCache(path))
    assert [r.answer_a for r in repaired.asked] == ["b1"] and results[0].score == 1.0
    with pytest.raises(ValueError):
        judge_pairs(repaired, pairs, VerdictCache(path), parse_tries=0)


def test_a_consistent_judge_is_not_position_driven(tmp_path: Path) -> None:
    pairs = [Pair("p1", "Q?", "", "m1", "b1"), Pair("p5", "Q?", "", "m5", "b5")]
    record = win_rate(judge_pairs(ScriptedJudge(SCRIPT), pairs, VerdictCache(tmp_path / "v.jsonl")))
    assert record.consistency == 1.0 and record.first_position == 0.5 and not record.position_driven
    empty = win_rate([])
    assert math.isnan(empty.consistency) and math.isnan(empty.first_position) and not empty.position_driven


def test_cached_pairs_make_no_backend_call(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    first = judge_pairs(ScriptedJudge(SCRIPT), scripted_pairs(), VerdictCache(path))
    judge = ScriptedJudge(SCRIPT)
    assert judge_pairs(judge, scripted_pairs(), VerdictCache(path)) == first
    # Only what never parsed is asked again: unreadable replies are not cached.
    assert {r.answer_a for r in judge.asked} == UNPARSED and len(judge.asked) == len(UNPARSED) * PARSE_TRIES


def test_identical_requests_are_asked_once(tmp_path: Path) -> None:
    judge = ScriptedJudge({"same": "Tie"})
    pairs = [Pair("x", "Q?", "", "same", "same"), Pair("y", "Q?", "", "same", "same")]
    results = judge_pairs(judge, pairs, VerdictCache(tmp_path / "v.jsonl"))
    assert len(judge.asked) == 1 and [r.score for r in results] == [0.5, 0.5]


def test_backend_failure_keeps_what_was_finished(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    with pytest.raises(UserError, match="gave up"):
        judge_pairs(ScriptedJudge(SCRIPT, fail_after=5), scripted_pairs(), VerdictCache(path))
    assert len(VerdictCache(path)) == 5
    resumed = ScriptedJudge(SCRIPT)
    judge_pairs(resumed, scripted_pairs(), VerdictCache(path))
    assert len(resumed.asked) == 14 - 5 + len(UNPARSED) * (PARSE_TRIES - 1)


# -- statistics -------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    scores = [1.0, 0.5, 0.0, 1.0, 1.0, 0.75, 0.25, 1.0, 0.5, 0.0, 1.0, 1.0] * 5
    low, high = bootstrap_interval(scores, resamples=2000, seed=7)
    mean = sum(scores) / len(scores)
    assert low < mean < high
    assert 0.0 <= low and high <= 1.0
    assert bootstrap_interval(scores, resamples=2000, seed=7) == (low, high)
    assert bootstrap_interval(scores, resamples=2000, seed=8) != (low, high)
    # A wider confidence gives a wider interval.
    wide_low, wide_high = bootstrap_interval(scores, resamples=2000, seed=7, confidence=0.99)
    assert wide_low <= low and high <= wide_high


def test_bootstrap_edge_cases() -> None:
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    low, high = bootstrap_interval([])
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        bootstrap_interval([1.0], confidence=1.0)


def test_win_rate_with_no_scored_pair_is_nan(tmp_path: Path) -> None:
    pairs = [Pair("p7", "Question 7?", "", "m7", "b7")]
    record = win_rate(judge_pairs(ScriptedJudge(SCRIPT), pairs, VerdictCache(tmp_path / "v.jsonl")))
    assert record.pairs == 0 and record.unparseable == 2
    assert math.isnan(record.win_rate) and math.isnan(record.share("win"))


# -- cache ------------------------------------------------------------------------------------

IDENTITY = {"backend": "scripted", "model": "table", "base_url": "", "prompt_version": PROMPT_VERSION}


def request(n: int) -> JudgeRequest:
    return JudgeRequest(f"instruction {n}", "", f"answer a {n}", f"answer b {n} ✓")


def fill(cache: VerdictCache, count: int) -> list[str]:
    keys = []
    for n in range(count):
        key = verdict_key(IDENTITY, request(n))
        cache.put(key, IDENTITY, request(n), JudgeOutput(raw="A", verdict="A", scores={"A": -0.1}))
        keys.append(key)
    return keys


def test_keys_cover_judge_texts_and_order() -> None:
    base = verdict_key(IDENTITY, request(0))
    swapped = JudgeRequest("instruction 0", "", "answer b 0 ✓", "answer a 0")
    assert verdict_key(IDENTITY, swapped) != base
    assert verdict_key({**IDENTITY, "model": "other"}, request(0)) != base
    assert verdict_key({**IDENTITY, "prompt_version": "v0"}, request(0)) != base
    assert verdict_key(IDENTITY, JudgeRequest("instruction 0", "ctx", "answer a 0", "answer b 0 ✓")) != base
    assert verdict_key(dict(reversed(list(IDENTITY.items()))), request(0)) == base


def test_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "v.jsonl"
    with VerdictCache(path) as cache:
        keys = fill(cache, 3)
        with pytest.raises(ValueError, match="not a verdict"):
            cache.put("k-none", IDENTITY, request(9), JudgeOutput(raw="hmm", verdict=None))
    reopened = VerdictCache(path)
    assert len(reopened) == 3 and reopened.get("k-none") is None
    entry = reopened.get(keys[1])
    assert entry is not None and entry.verdict == "A" and entry.scores == {"A": -0.1}
    record = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert record["answer_b"] == "answer b 0 ✓" and record["judge"] == IDENTITY


def test_cache_skips_unparsed_replies_older_versions_stored(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"key": "k", "verdict": None, "raw": "Maybe", "scores": {}}) + "\n", encoding="utf-8")
    assert VerdictCache(path).get("k") is None  # asked again, not taken for an answer


def test_cache_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    with VerdictCache(path) as cache:
        keys = fill(cache, 3)
    whole = path.read_bytes()
    last_line_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(whole[: last_line_start + 25])  # a crash halfway through the third record

    cache = VerdictCache(path)
    assert len(cache) == 2 and cache.get(keys[2]) is None and cache.torn_bytes == 25
    fill(cache, 4)  # rejudges the lost one and adds another; the torn bytes are cut first
    cache.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert len(VerdictCache(path)) == 4


def test_cache_keeps_a_complete_last_record_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    with VerdictCache(path) as cache:
        keys = fill(cache, 2)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # crash between the record and its newline
    cache = VerdictCache(path)
    assert len(cache) == 2 and cache.torn_bytes == 0
    cache.put("k-new", IDENTITY, request(5), JudgeOutput(raw="B", verdict="B"))
    cache.close()
    reopened = VerdictCache(path)
    assert len(reopened) == 3 and reopened.get(keys[1]) is not None


def test_cache_rejects_a_damaged_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    with VerdictCache(path) as cache:
        fill(cache, 3)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = "{garbage\n"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(UserError, match=r"v\.jsonl line 2 is not valid JSON"):
        VerdictCache(path)


def test_cache_rejects_a_bad_verdict(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"key": "k", "verdict": "C", "raw": "C", "scores": {}}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1 has verdict 'C'"):
        VerdictCache(path)


# -- the local HF judge -----------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_judge_dir(directory: Path, *, chat_template: bool) -> Path:
    """A randomly initialised one-layer GPT-2 with a byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from bdctl.judges.prompt import SYSTEM_PROMPT

    corpus = [SYSTEM_PROMPT, "### Instruction ### Input ### Answer A ### Answer B Verdict: A B Tie"] * 3
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    special = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=2048,
        bos_token_id=special,
        eos_token_id=special,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("chat_template", [False, True], ids=["plain", "chat-template"])
def test_hf_judge_on_a_tiny_model(tmp_path: Path, chat_template: bool) -> None:
    from bdctl.judges.hf_backend import HFJudge

    directory = tiny_judge_dir(tmp_path / "judge", chat_template=chat_template)
    judge = HFJudge.from_pretrained(directory, batch_size=3)
    assert judge.uses_chat_template is chat_template
    # Each label scores on tokens no other label has.
    label_sets = [set(tokens) for tokens in judge.label_tokens.values()]
    assert all(label_sets) and sum(map(len, label_sets)) == len(set().union(*label_sets))

    requests = [
        JudgeRequest(f"Question {n}?", "some input" if n % 2 else "", f"answer {n} " * (n + 1), "other")
        for n in range(5)
    ]
    outputs = dict(judge.judge_many(requests))
    assert sorted(outputs) == list(range(5))
    for output in outputs.values():
        assert output.verdict in ("A", "B", "Tie") and output.raw == output.verdict
        assert set(output.scores) == {"A", "B", "Tie"}
        assert all(math.isfinite(s) and s <= 0.0 for s in output.scores.values())
        assert output.verdict == max(output.scores, key=output.scores.__getitem__)

    # Right padding does not change a prompt's scores: batched equals one at a time.
    one_by_one = HFJudge(judge.model, judge.tokenizer, name=judge.name, batch_size=1)
    for index, output in one_by_one.judge_many(requests):
        for label, score in output.scores.items():
            assert score == pytest.approx(outputs[index].scores[label], abs=1e-4)

    # Through the orchestration and the cache, like any backend.
    pairs = [Pair("p", "Question?", "", "mine", "theirs")]
    results = judge_pairs(judge, pairs, VerdictCache(tmp_path / "v.jsonl"))
    assert results[0].score in (0.0, 0.25, 0.5, 0.75, 1.0)


class SpaceSplittingTokenizer:
    """Spells " A" as a shared space token followed by "A", as some byte-level tokenizers do."""

    ids = {"A": [1], "B": [2], "Tie": [3, 4], " A": [9, 1], " B": [9, 2], " Tie": [9, 3, 4]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.ids[text]


def test_hf_judge_leaves_out_shared_first_tokens() -> None:
    from bdctl.judges.hf_backend import HFJudge

    judge = HFJudge(None, SpaceSplittingTokenizer(), name="stub")
    assert judge.label_tokens == {"A": (1,), "B": (2,), "Tie": (3,)}


def test_hf_judge_needs_distinct_label_tokens() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bdctl.judges.hf_backend import HFJudge

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(UserError, match="cannot tell A, B and Tie apart"):
        HFJudge(None, tokenizer, name="word-level")


def test_hf_judge_needs_a_model_directory(tmp_path: Path) -> None:
    from bdctl.judges.hf_backend import HFJudge

    with pytest.raises(UserError, match="has no config.json"):
        HFJudge.from_pretrained(tmp_path)


# -- chart ------------------------------------------------------------------------------------


def test_chart_writes_a_png(tmp_path: Path) -> None:
    from bdctl.judges.figure import win_rate_chart

    records = {
        "KD": WinRate(wins=600, ties=150, losses=250, unparseable=0, pairs=500,
                      win_rate=0.675, ci_low=0.64, ci_high=0.71),
        "SeqKD": WinRate(wins=550, ties=200, losses=250, unparseable=3, pairs=500,
                         win_rate=0.65, ci_low=0.61, ci_high=0.69),
        "MiniLLM": WinRate(wins=0, ties=0, losses=0, unparseable=4, pairs=0,
                           win_rate=math.nan, ci_low=math.nan, ci_high=math.nan),
    }  # fmt: skip
    path = win_rate_chart(records, tmp_path / "fig" / "win_rate.png", model_name="BD")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 100
    with pytest.raises(ValueError):
        win_rate_chart({}, tmp_path / "empty.png")


# -- imports ----------------------------------------------------------------------------------


def test_importing_judges_and_metrics_is_light() -> None:
    modules = "bdctl.metrics, bdctl.judges, bdctl.judges.stats, bdctl.judges.figure, " + (
        "bdctl.judges.openai_backend, bdctl.judges.hf_backend, bdctl.judges.cache"
    )
    heavy = ("torch", "transformers", "httpx", "matplotlib")
    code = f"import sys, {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "[]"
