"""Data layer: readers and their errors, template, the seeded split, batching across ranks."""

from __future__ import annotations

import json
import os

import pytest

from bdctl.data.batching import IGNORE, Tokenized, collate, epoch_order, eval_batches, micro_batches
from bdctl.data.prepare import prepare_data, read_split
from bdctl.data.sources import read_hub, read_records, to_instruction
from bdctl.data.template import DEFAULT_TEMPLATE, render_prompt
from bdctl.errors import UserError
from bdctl.recipe import load_recipe
from bdctl.recipe.schema import FieldMap, Template
from bdctl.rundir import RunDir

DOLLY = FieldMap(instruction="instruction", input="context", output="response")


def dolly_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Say the number {i} twice.", "context": "" if i % 2 else f"number {i}", "response": f"{i} {i}"}
        for i in range(n)
    ]


def test_template_with_and_without_input():
    plain = render_prompt("Do it.", "")
    assert plain == DEFAULT_TEMPLATE.without_input.replace("{instruction}", "Do it.")
    assert "### Input:\nctx" in render_prompt("Do it.", "  ctx ")
    assert plain.endswith("### Response:\n")
    # braces in user text are never expanded
    assert "{input}" in render_prompt("write {input} literally", "")
    custom = Template(with_input="Q: {instruction} [{input}] A:", without_input="Q: {instruction} A:")
    assert render_prompt("hi", "there", custom) == "Q: hi [there] A:"


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(dolly_rows(1)[0]) + "\n\n{not json\n")
    records = read_records(path)
    where, record = next(records)
    assert where == f"{path}:1"
    with pytest.raises(UserError, match=rf"^{path}:3: malformed JSON line"):
        next(records)
    with pytest.raises(UserError, match=r"file not found"):
        next(read_records(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match=r"unsupported file type '.csv'"):
        (tmp_path / "x.csv").write_text("a")
        next(read_records(tmp_path / "x.csv"))


def test_field_mapping_errors():
    assert to_instruction("f:1", dolly_rows(1)[0], DOLLY) == {
        "instruction": "Say the number 0 twice.",
        "input": "number 0",
        "output": "0 0",
    }
    with pytest.raises(UserError, match=r"^f:2: missing field 'response' \(data field output\)"):
        to_instruction("f:2", {"instruction": "a", "context": ""}, DOLLY)
    with pytest.raises(UserError, match=r"^f:3: field 'instruction' should be a string, got int"):
        to_instruction("f:3", {"instruction": 3, "context": "", "response": "x"}, DOLLY)
    refs = to_instruction("e:1", {"instruction": "a", "input": "", "output": ["x", "y"]}, FieldMap(), references=True)
    assert refs["output"] == ["x", "y"]


def test_json_parquet_and_datasets_readers_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = dolly_rows(5)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    hub_dir = tmp_path / "hubset"
    hub_dir.mkdir()
    (hub_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_json = [to_instruction(w, r, DOLLY) for w, r in read_records(tmp_path / "d.json")]
    from_parquet = [to_instruction(w, r, DOLLY) for w, r in read_records(tmp_path / "d.parquet")]
    from_datasets = [to_instruction(w, r, DOLLY) for w, r in read_hub(str(hub_dir), None, "train")]
    assert from_json == from_parquet == from_datasets and len(from_json) == 5
    with pytest.raises(UserError, match=r"^datasets 'no/such-set-here' \(split 'train'\): cannot load"):
        list(read_hub("no/such-set-here", None, "train"))


def test_split_is_seeded_counted_and_written(tmp_path):
    recipe, _ = load_recipe("smoke")
    run = RunDir(tmp_path / "run")
    prepared = prepare_data(recipe, run, log=lambda *_: None)
    counts = prepared.counts
    report = json.loads((run.data / "split.json").read_text())
    assert counts["valid"] == 32 and counts["test"] == 32
    assert counts["train"] + 64 + sum(report["dropped"].values()) == report["source_examples"] == 400
    ids = {s: {r["id"] for r in read_split(run.data, s)} for s in ("train", "valid", "test")}
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"]) and not (ids["valid"] & ids["test"])
    # same recipe, fresh directory: byte-identical split and tokenizer
    again = prepare_data(recipe, RunDir(tmp_path / "again"), log=lambda *_: None)
    assert again.tokenizer_hash == prepared.tokenizer_hash
    for split in ("train", "valid", "test"):
        assert (run.data / f"{split}.jsonl").read_bytes() == (tmp_path / "again/data" / f"{split}.jsonl").read_bytes()
    # a finished data stage is reused; different data settings in the same run dir are refused
    assert prepare_data(recipe, run, log=lambda *_: None).counts == counts
    other, _ = load_recipe("smoke", ["data.split.seed=1"])
    with pytest.raises(UserError, match="prepared from different data or tokenizer settings"):
        prepare_data(other, run, log=lambda *_: None)


def test_overlong_examples_are_dropped_and_counted(tmp_path):
    rows = dolly_rows(60)
    rows[0]["response"] = "word " * 400
    rows[1]["instruction"] = "long " * 400
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, _ = load_recipe(
        "smoke",
        [
            f"data.source={{path: {tmp_path / 'd.jsonl'}, "
            "fields: {instruction: instruction, input: context, output: response}}",
            "data.split={valid: 5, test: 5, seed: 1}",
        ],
    )
    prepare_data(recipe, RunDir(tmp_path / "run"), log=lambda *_: None)
    report = json.loads((tmp_path / "run/data/split.json").read_text())
    assert report["dropped"] == {
        "prompt_too_long": 1, "too_long": 1, "empty_output": 0, "output_too_short": 0, "text_too_long": 0,
        "duplicate": 0,
    }  # fmt: skip
    assert report["train"] == 48


@pytest.mark.parametrize(
    ("answer", "dropped_as"),
    [("B", "output_too_short"), (" 7\n", "output_too_short"), ("", "empty_output"), ("ok", None)],
)
def test_references_too_short_to_score_are_dropped_and_counted(tmp_path, answer, dropped_as):
    """Issue 19 item 6: a one-character reference answer (after stripping) cannot be scored; the row is
    dropped before the split and counted apart from empty ones. Two characters are kept."""
    rows = dolly_rows(40)
    for row in rows[:3]:
        row["response"] = answer
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, _ = load_recipe(
        "smoke",
        [
            f"data.source={{path: {tmp_path / 'd.jsonl'}, "
            "fields: {instruction: instruction, input: context, output: response}}",
            "data.split={valid: 5, test: 5, seed: 1}",
        ],
    )
    prepare_data(recipe, RunDir(tmp_path / "run"), log=lambda *_: None)
    report = json.loads((tmp_path / "run/data/split.json").read_text())
    for kind in ("empty_output", "output_too_short"):
        assert report["dropped"][kind] == (3 if kind == dropped_as else 0)
    assert report["train"] == 30 - (3 if dropped_as else 0)


def test_a_source_of_only_one_character_answers_is_refused(tmp_path):
    rows = dolly_rows(20)
    for row in rows:
        row["response"] = "A"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, _ = load_recipe(
        "smoke",
        [
            f"data.source={{path: {tmp_path / 'd.jsonl'}, "
            "fields: {instruction: instruction, input: context, output: response}}",
            "data.split={valid: 5, test: 5, seed: 1}",
        ],
    )
    with pytest.raises(UserError, match="has an empty or one-character response .field 'response'.: nothing to train"):
        prepare_data(recipe, RunDir(tmp_path / "run"), log=lambda *_: None)


def test_too_little_data_is_a_clear_error(tmp_path):
    recipe, _ = load_recipe("smoke", ["data.split.valid=300", "data.split.test=100"])
    with pytest.raises(UserError, match="leave nothing to train on"):
        prepare_data(recipe, RunDir(tmp_path / "run"), log=lambda *_: None)


def test_collate_scores_response_tokens_only():
    batch = collate([Tokenized([5, 6, 7, 8, 1], prompt_len=2), Tokenized([5, 9, 1], prompt_len=1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1], [5, 9, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position t predicts token t+1; the prompt's own tokens are not targets
    assert batch["labels"].tolist() == [[IGNORE, 7, 8, 1, IGNORE], [9, 1, IGNORE, IGNORE, IGNORE]]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_global_batch_is_the_same_whatever_the_world_size(world):
    order = epoch_order(100, seed=3, epoch=1)
    assert sorted(order) == list(range(100)) and order != epoch_order(100, seed=3, epoch=2)
    per_rank = [
        micro_batches(order, step=2, global_batch=16, micro=4 // world if world < 4 else 1, rank=r, world=world)
        for r in range(world)
    ]
    union = sorted(i for chunks in per_rank for chunk in chunks for i in chunk)
    assert union == sorted(order[32:48])
    assert len({len(chunks) for chunks in per_rank}) == 1  # same number of micro-batches per rank


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (5, 1), (1, 2)])
def test_eval_batches_cover_everything_with_equal_counts(n, world):
    batches = [eval_batches(n, micro=2, rank=r, world=world) for r in range(world)]
    assert len({len(b) for b in batches}) == 1
    assert sorted(i for rank in batches for batch in rank for i in batch) == list(range(n))


def test_repeated_examples_are_dropped_before_the_split(tmp_path):
    """Records whose prompt and response repeat land in one split only: the repeats are dropped
    (counted in split.json as `duplicate`) before the shuffle, so no test example is also a
    training example. The same prompt with another response is a different example and stays."""
    rows = dolly_rows(40)
    rows += [dict(rows[i]) for i in range(10)]  # ten exact repeats
    rows.append({**rows[0], "response": rows[0]["response"] + " Another answer."})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, _ = load_recipe(
        "smoke",
        [
            f"data.source={{path: {tmp_path / 'd.jsonl'}, "
            "fields: {instruction: instruction, input: context, output: response}}",
            "data.split={valid: 10, test: 10, seed: 1}",
        ],
    )
    lines = []
    prepare_data(recipe, RunDir(tmp_path / "run"), log=lines.append)
    report = json.loads((tmp_path / "run/data/split.json").read_text())
    assert report["dropped"]["duplicate"] == 10 and report["train"] == 41 - 20
    pairs = {
        s: {(r["prompt"], r["output"]) for r in read_split(tmp_path / "run/data", s)}
        for s in ("train", "valid", "test")
    }
    assert sum(len(p) for p in pairs.values()) == 41
    assert not (pairs["train"] & pairs["test"]) and not (pairs["train"] & pairs["valid"])
    assert "10 repeating an earlier example's prompt and response" in lines[-1]


def test_dropped_counts_read_as_sentences():
    from bdctl.data.prepare import _dropped_text

    text = _dropped_text({"prompt_too_long": 0, "too_long": 2, "empty_output": 0, "text_too_long": 21}, 128)
    assert text == (
        "2 over max_length (128) tokens, 21 with more than 4096 characters, which cannot fit in max_length (128) tokens"
    )
    assert _dropped_text({"duplicate": 0}, 128) == "none"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: os.symlink(p, p), "a loop of symbolic links that never reaches a file"),
        (lambda p: os.mkfifo(p), "a named pipe (FIFO), not a file"),
        (
            lambda p: os.symlink("/nonexistent/d.jsonl", p),
            "a symbolic link to /nonexistent/d.jsonl, which does not exist",
        ),
        (lambda p: os.symlink("/dev/null", p), "a device, not a file"),
    ],
    ids=["symlink-loop", "fifo", "dangling-link", "device"],
)
def test_a_data_path_that_is_not_a_file_gets_its_own_message(tmp_path, make, expected):
    """Each used to read "file not found" (or, a FIFO, to block on reading)."""
    path = tmp_path / "d.jsonl"
    make(path)
    with pytest.raises(UserError) as raised:
        list(read_records(path))
    assert str(raised.value) == f"{path}: {expected}" or str(raised.value).startswith(f"{path}: {expected}")
    with pytest.raises(UserError) as raised:  # a recipe path too: a FIFO would block the read
        load_recipe(str(path))
    assert str(raised.value).startswith(f"{path}: {expected}")
