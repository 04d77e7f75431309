"""Data layer: readers and their errors, template, the seeded split, batching across ranks."""

from __future__ import annotations

import json

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
        "prompt_too_long": 1,
        "too_long": 1,
        "empty_output": 0,
        "output_too_short": 0,
        "text_too_long": 0,
    }
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
