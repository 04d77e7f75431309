"""Instruction data and text corpora from local files, `datasets` hub names, or the synthetic source.

Every record comes out as {"instruction", "input", "output"}; `output` is one string for training
data and may be a list of reference strings for evaluation sets. Malformed input stops with one
line that names the file and the line (JSONL) or row (JSON, Parquet, hub) at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bdctl.errors import UserError, decode_utf8, not_a_regular_file
from bdctl.recipe.schema import FieldMap

# A reference answer needs at least this many characters (after stripping) to be scored: a one-character
# answer ("A", "7") gives Rouge-L only all or nothing and SFT labels of a single token (issue 19, item 6).
MIN_REFERENCE_CHARS = 2


def reference_too_short(text: str) -> bool:
    """True for a non-empty reference answer too short to score (fewer than MIN_REFERENCE_CHARS characters)."""
    return 0 < len(text.strip()) < MIN_REFERENCE_CHARS


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) pairs of a local .jsonl, .json or .parquet file."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as handle:  # decoded line by line, so that bad bytes are found with their line
            for number, raw in enumerate(handle, start=1):
                line = decode_utf8(raw, path, number)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{number}: malformed JSON line ({exc.msg})") from None
                yield f"{path}:{number}", record
    elif suffix == ".json":
        try:
            records = json.loads(decode_utf8(path.read_bytes(), path))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        for index, record in enumerate(records):
            yield f"{path} record {index}", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: cannot read Parquet ({exc})") from None
        for index, record in enumerate(table.to_pylist()):
            yield f"{path} row {index}", record
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)")


def _check_file(path: Path) -> None:
    problem = not_a_regular_file(path)
    if problem == "is a directory, not a file":
        raise UserError(f"{path}: is a directory, not a data file")
    if problem is not None:
        raise UserError(f"{path}: {problem}")


def read_hub(name: str, config: str | None, split: str, streaming: bool = False) -> Iterator[tuple[str, dict]]:
    """(location, record) pairs of a `datasets` hub data set (or a local `datasets` script/dir)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # datasets raises many types for "not found" / offline
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"datasets {name!r} (split {split!r}): cannot load ({first})") from None
    for index, record in enumerate(dataset):
        yield f"{name} row {index}", record


def to_instruction(where: str, record: Any, fields: FieldMap, references: bool = False) -> dict[str, Any]:
    """Map one raw record to {"instruction", "input", "output"} through the recipe's field names."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with fields, got {type(record).__name__}")

    def text(field: str | None, what: str, allow_list: bool = False) -> Any:
        if field is None:
            return ""
        if field not in record:
            raise UserError(f"{where}: missing field {field!r} (data field {what})")
        value = record[field]
        if value is None:
            return ""
        if allow_list and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        if not isinstance(value, str):
            raise UserError(f"{where}: field {field!r} should be a string, got {type(value).__name__}")
        return value

    out = text(fields.output, "output", allow_list=references)
    return {
        "instruction": text(fields.instruction, "instruction"),
        "input": text(fields.input, "input"),
        "output": out if isinstance(out, list) or not references else [out],
    }


def read_texts(path: str | Path, text_field: str) -> Iterator[str]:
    """Documents of a local corpus: .txt (one document per line) or .jsonl (`text_field`)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        _check_file(path)
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                line = decode_utf8(raw, path, number)
                if line.strip():
                    yield line.rstrip("\r\n")
        return
    for where, record in read_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{where}: expected an object with a string field {text_field!r}")
        yield record[text_field]
