"""The data stage: shared tokenizer, prompt template, seeded train / valid / test split.

Runs once per run directory, in the launching process before any rank starts, so every rank and
every later stage reads the same files:

    data/train.jsonl valid.jsonl test.jsonl   {"id", "instruction", "input", "output", "prompt"}
    data/split.json                            counts, including the dropped over-long examples
    data/MANIFEST.json                         written last, with the fingerprint of what made it

Over-long examples (prompt over `max_prompt_length`, or prompt + response + EOS (with data.template:
chat, the end-of-turn token) over `max_length` tokens) are dropped before splitting, as MiniLLM does, and counted.
Three more kinds are dropped and counted (beyond the paper, which does not say): examples whose response
is empty (they teach only "stop at once"; a source where no example has a response is refused), examples
whose reference answer is too short to score (one character: `sources.reference_too_short`), and
examples far longer in characters than `max_length` tokens could hold, before any tokenizer sees
them: training a BPE on one pathological record (a long text without a space) takes time quadratic in
its length.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdctl.data.sources import read_hub, read_records, read_texts, reference_too_short, to_instruction
from bdctl.data.template import CHAT, render_prompt
from bdctl.errors import UserError
from bdctl.models import check_model_dir, load_tokenizer, tokenizer_hash, tokenizer_source, train_tokenizer
from bdctl.recipe.schema import Recipe
from bdctl.rundir import RunDir, manifest, mark_complete, write_json_atomic, write_text_atomic

SPLITS = ("train", "valid", "test")

# An example with more characters than max_length x this cannot fit max_length tokens: byte-level
# tokens of text average about 4 characters, and the longest in common vocabularies are a few dozen.
MAX_CHARS_PER_TOKEN = 32
# Pretraining documents are cut to this many characters for tokenizer training only (a prefix says
# enough about a document's words; BPE training is quadratic in the length of a word).
TOKENIZER_TEXT_CHARS = 8192


@dataclass
class PreparedData:
    directory: Path
    counts: dict[str, int]
    tokenizer_hash: str


def data_fingerprint(recipe: Recipe) -> str:
    """Everything that decides the data stage's output; a change means a different run directory."""
    relevant = {
        "data": recipe.data.model_dump(mode="json"),
        "tokenizer": recipe.models.tokenizer.model_dump(mode="json"),
    }
    if recipe.models.tokenizer.train is None and recipe.models.tokenizer.path is None:
        relevant["teacher"] = recipe.models.teacher.model_dump(mode="json")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(recipe: Recipe, run: RunDir, log=print) -> PreparedData:
    """Make (or reuse) the run's tokenizer and split; idempotent and safe to interrupt."""
    fingerprint = data_fingerprint(recipe)
    done = manifest(run.data)
    if done is not None:
        if done.get("fingerprint") != fingerprint:
            raise UserError(
                f"{run.data}: prepared from different data or tokenizer settings; "
                f"use another run_dir or delete {run.root}"
            )
        return PreparedData(run.data, done["counts"], done["tokenizer_hash"])

    if recipe.data.template == CHAT:  # prompts are rendered with the tokenizer's own chat template
        tokenizer, cut = _make_tokenizer(recipe, run, [])
        examples = load_instructions(recipe, tokenizer)
        usable, dropped = _drop_unusable(recipe, examples)
    else:
        examples = load_instructions(recipe)
        usable, dropped = _drop_unusable(recipe, examples)
        tokenizer, cut = _make_tokenizer(recipe, run, usable)
    kept, overlong = _drop_overlong(recipe, tokenizer, usable)
    dropped = {**overlong, **dropped}
    split = recipe.data.split
    if len(kept) <= split.valid + split.test:
        raise UserError(
            f"data: {len(kept)} usable examples (of {len(examples)}; dropped {_dropped_text(dropped)}) "
            f"leave nothing to train on after {split.valid} validation and {split.test} test examples"
        )
    random.Random(split.seed).shuffle(kept)
    parts = {
        "valid": kept[: split.valid],
        "test": kept[split.valid : split.valid + split.test],
        "train": kept[split.valid + split.test :],
    }
    if run.data.exists():  # an earlier, interrupted attempt: start it over
        shutil.rmtree(run.data)
    for name, rows in parts.items():
        write_text_atomic(run.data / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts = {name: len(rows) for name, rows in parts.items()}
    report = {"source_examples": len(examples), "dropped": dropped, "tokenizer_texts_cut": cut, **counts}
    write_json_atomic(run.data / "split.json", report)
    digest = tokenizer_hash(tokenizer)
    mark_complete(run.data, fingerprint=fingerprint, counts=counts, tokenizer_hash=digest)
    log(
        f"data: {len(examples)} examples, dropped {_dropped_text(dropped)}; "
        f"train {counts['train']} / valid {counts['valid']} / test {counts['test']}"
    )
    return PreparedData(run.data, counts, digest)


def load_instructions(recipe: Recipe, tokenizer=None) -> list[dict]:
    """The recipe's instruction examples, each with a stable id and its rendered prompt
    (`tokenizer`: the run's, for data.template: chat)."""
    source = recipe.data.source
    records: Iterable[tuple[str, dict[str, Any]]]
    if source.synthetic is not None:
        from bdctl.data.synthetic import synthetic_instructions

        rows = synthetic_instructions(source.synthetic.n, seed=recipe.seed, families=source.synthetic.families)
        records = [(f"synthetic {i}", row) for i, row in enumerate(rows)]
        fields = None
    elif source.path:
        records, fields = read_records(source.path), source.fields
    else:
        assert source.hub is not None  # InstructionSource: exactly one of synthetic, path, hub
        records, fields = read_hub(source.hub, source.hub_config, source.hub_split), source.fields
    examples = []
    for index, (where, record) in enumerate(records):
        example = record if fields is None else to_instruction(where, record, fields)
        examples.append(
            {
                "id": index,
                "instruction": example["instruction"],
                "input": example["input"],
                "output": example["output"],
                "prompt": render_prompt(example["instruction"], example["input"], recipe.data.template, tokenizer),
            }
        )
    if not examples:
        raise UserError(f"data: the source {source.path or source.hub or 'synthetic'} has no examples")
    return examples


def corpus_texts(recipe: Recipe, limit: int | None = None):
    """Documents of the pretraining corpus (the synthetic one is generated from the recipe seed)."""
    corpus = recipe.data.pretrain
    if corpus is None:
        return iter(())
    if corpus.synthetic is not None:
        from bdctl.data.synthetic import synthetic_corpus

        return iter(synthetic_corpus(corpus.synthetic.n_docs, seed=recipe.seed))
    if corpus.path is not None:
        return read_texts(corpus.path, corpus.text_field)
    assert corpus.hub is not None  # PretrainCorpus: exactly one of synthetic, path, hub
    rows = read_hub(corpus.hub, corpus.hub_config, corpus.hub_split, streaming=True)
    return (row[corpus.text_field] for _, row in rows)


def _drop_unusable(recipe: Recipe, examples: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Examples no tokenizer needs to see: an empty response, a reference too short to score, or text
    far beyond max_length."""
    limit = recipe.data.max_length * MAX_CHARS_PER_TOKEN
    kept, dropped = [], {"empty_output": 0, "output_too_short": 0, "text_too_long": 0}
    for example in examples:
        if not example["output"].strip():
            dropped["empty_output"] += 1
        elif reference_too_short(example["output"]):
            dropped["output_too_short"] += 1
        elif len(example["prompt"]) + len(example["output"]) > limit:
            dropped["text_too_long"] += 1
        else:
            kept.append(example)
    if dropped["empty_output"] + dropped["output_too_short"] == len(examples):
        source = recipe.data.source
        raise UserError(
            f"data: every one of the {len(examples)} examples of {source.path or source.hub} has an empty or "
            f"one-character response "
            f"(field {source.fields.output!r}): nothing to train on; check data.source.fields.output"
        )
    return kept, dropped


def _dropped_text(dropped: dict[str, int]) -> str:
    words = {"prompt_too_long": "with long prompts", "too_long": "too long", "empty_output": "with empty responses",
             "output_too_short": "with one-character responses",
             "text_too_long": f"over {MAX_CHARS_PER_TOKEN} characters per max_length token"}  # fmt: skip
    return ", ".join(f"{count} {words[name]}" for name, count in dropped.items() if count) or "none"


def _make_tokenizer(recipe: Recipe, run: RunDir, examples: list[dict]):
    """The shared tokenizer, and how many texts were cut to TOKENIZER_TEXT_CHARS to train it."""
    if run.tokenizer.exists():
        shutil.rmtree(run.tokenizer)  # written by an interrupted attempt, or for other settings
    source = tokenizer_source(recipe)
    if source is None and recipe.data.template == CHAT:
        raise UserError(
            "data.template: chat uses the tokenizer's own chat template, and models.tokenizer.train makes a tokenizer "
            "without one: set models.tokenizer.path to a tokenizer that has a chat template"
        )
    if source is None:
        texts = [e["prompt"] + e["output"] for e in examples] + list(corpus_texts(recipe))
        assert recipe.models.tokenizer.train is not None  # tokenizer_source is None only when training one
        cut = sum(len(text) > TOKENIZER_TEXT_CHARS for text in texts)
        texts = [text[:TOKENIZER_TEXT_CHARS] for text in texts]
        return train_tokenizer(texts, recipe.models.tokenizer.train, run.tokenizer), cut
    if recipe.models.tokenizer.path is None:  # the teacher's own: say so when its directory is at fault
        check_model_dir(source[0], "teacher model ")
    tokenizer = load_tokenizer(*source, template=recipe.data.template)  # chat: one line if it has no template
    tokenizer.save_pretrained(run.tokenizer)  # ranks and later stages read this copy
    return tokenizer, 0


def _drop_overlong(recipe: Recipe, tokenizer, examples: list[dict]) -> tuple[list[dict], dict[str, int]]:
    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    answers = tokenizer([e["output"] for e in examples], add_special_tokens=False)["input_ids"]
    kept, dropped = [], {"prompt_too_long": 0, "too_long": 0}
    for example, prompt, answer in zip(examples, prompts, answers, strict=True):
        if len(prompt) > recipe.data.max_prompt_length:
            dropped["prompt_too_long"] += 1
        elif len(prompt) + len(answer) + 1 > recipe.data.max_length:
            dropped["too_long"] += 1
        else:
            kept.append(example)
    return kept, dropped


def read_split(directory: Path, name: str) -> list[dict]:
    """One split of a prepared data directory."""
    path = directory / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
