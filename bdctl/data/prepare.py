"""The data stage: shared tokenizer, prompt template, seeded train / valid / test split.

Runs once per run directory, in the launching process before any rank starts, so every rank and
every later stage reads the same files:

    data/train.jsonl valid.jsonl test.jsonl   {"id", "instruction", "input", "output", "prompt"}
                                               (conversations also "messages" and "turns": conversations.py)
    data/split.json                            counts, including the dropped over-long examples
    data/MANIFEST.json                         written last, with the fingerprint of what made it

Over-long examples (prompt over `max_prompt_length`, or prompt + response + EOS (with data.template:
chat, the end-of-turn token) over `max_length` tokens) are dropped before splitting, as MiniLLM does, and counted.
Three more kinds are dropped and counted (beyond the paper, which does not say): examples whose response
is empty (they teach only "stop at once"; a source where no example has a response is refused), examples
whose reference answer is too short to score (one character: `sources.reference_too_short`), and
examples far longer in characters than `max_length` tokens could hold, before any tokenizer sees
them: training a BPE on one pathological record (a long text without a space) takes time quadratic in
its length. Also beyond the paper: an example whose prompt and response repeat an earlier one's is
dropped and counted (`duplicate` in split.json), so that no test or validation example can be a
training example too.
Conversations (data.format: messages, sharegpt) with an unknown role, without a final
assistant turn, or that the chat template cannot render turn by turn are dropped and counted too.
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
from bdctl.data.template import CHAT, jinja_chat_template, render_prompt
from bdctl.errors import UserError, space_for
from bdctl.models import check_model_dir, load_tokenizer, tokenizer_hash, tokenizer_source, train_tokenizer
from bdctl.provenance import file_digest
from bdctl.recipe.schema import Recipe, Template, fingerprint_view
from bdctl.rundir import MANIFEST, RunDir, manifest, mark_complete, write_json_atomic, write_text_atomic

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
    view = fingerprint_view(recipe.model_dump(mode="json"))
    relevant = {"data": view["data"], "tokenizer": view["models"]["tokenizer"]}
    if recipe.models.tokenizer.train is None and recipe.models.tokenizer.path is None:
        relevant["teacher"] = view["models"]["teacher"]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def source_digests(recipe: Recipe) -> dict[str, str]:
    """sha256 of each local data file the split is made from (instruction source, pretraining
    corpus), by the path the recipe gives: the settings fingerprint cannot see a file edited in place.
    Hub sources are named by their settings only (id, config, split)."""
    paths = [recipe.data.source.path, recipe.data.pretrain.path if recipe.data.pretrain else None]
    found = {str(path): file_digest(path) for path in paths if path}
    return {path: sha for path, sha in found.items() if sha is not None}


def stale_data(recipe: Recipe, run: RunDir) -> str | None:
    """Why the run's finished data split no longer matches the recipe and its files (None: it does,
    or there is none yet)."""
    done = manifest(run.data)
    if done is None:
        return None
    if done.get("fingerprint") != data_fingerprint(recipe):
        return "it was prepared from different data or tokenizer settings"
    recorded = done.get("sources") or {}
    changed = [path for path, sha in source_digests(recipe).items() if path in recorded and recorded[path] != sha]
    return f"data source {changed[0]} changed since it was prepared" if changed else None


def prepare_data(recipe: Recipe, run: RunDir, log=print, remake: bool = False) -> PreparedData:
    """Make (or reuse) the run's tokenizer and split; idempotent and safe to interrupt.

    A split made from other settings or from a data file that has changed since is refused, or with
    `remake` (a command's --force) made again: the stages made from the old split then count as stale
    (`bdctl.provenance`)."""
    fingerprint = data_fingerprint(recipe)
    unreadable: dict[str, int] = {}  # conversations dropped before rendering (data.format: messages, sharegpt)
    done = manifest(run.data)
    if done is not None:
        why = stale_data(recipe, run)
        if why is None:
            return PreparedData(run.data, done["counts"], done["tokenizer_hash"])
        if not remake:
            raise UserError(
                f"{run.data}: {why}; pass --force to prepare it again (the stages made from the old split then "
                "count as stale), or use another name / run_dir to keep both"
            )
        log(f"data: {why}; preparing {run.data} again")
        (run.data / MANIFEST).unlink()  # from here on the old split is not finished work

    if recipe.data.format != "instruction":  # conversations, rendered with the tokenizer's chat template
        tokenizer, cut = _make_tokenizer(recipe, run, [])
        examples, unreadable = load_conversations(recipe, tokenizer)
        if not examples:
            raise UserError(
                f"data: no conversation of {recipe.data.source.path or recipe.data.source.hub} is usable "
                f"(dropped {_dropped_text(unreadable, recipe.data.max_length)}); each needs known roles and must end "
                "with an assistant turn"
            )
        usable, dropped = _drop_unusable(recipe, examples)
        dropped = {**unreadable, **dropped}
    elif recipe.data.template == CHAT:  # prompts are rendered with the tokenizer's own chat template
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
        why = _dropped_text(dropped, recipe.data.max_length)
        raise UserError(
            f"data: {len(kept)} usable examples (of {len(examples)}; dropped {why}) "
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
    source_examples = len(examples) + sum(unreadable.values())
    report = {"source_examples": source_examples, "dropped": dropped, "tokenizer_texts_cut": cut, **counts}
    write_json_atomic(run.data / "split.json", report)
    digest = tokenizer_hash(tokenizer)
    mark_complete(
        run.data, fingerprint=fingerprint, counts=counts, tokenizer_hash=digest, sources=source_digests(recipe)
    )
    log(
        f"data: {len(examples)} examples, dropped {_dropped_text(dropped, recipe.data.max_length)}; "
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
                "prompt": render_prompt(
                    example["instruction"], example["input"], recipe.data.template, tokenizer, recipe.data.system_prompt
                ),
            }
        )
    if not examples:
        raise UserError(f"data: the source {source.path or source.hub or 'synthetic'} has no examples")
    return examples


def load_conversations(recipe: Recipe, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """The recipe's conversations (data.format: messages or sharegpt) as data rows whose prompt /
    output are the conversation before its last assistant turn / that turn (data/conversations.py),
    and the counts of those dropped: unknown roles, no final assistant turn, a template that cannot
    render them turn by turn."""
    from bdctl.data.conversations import (
        NO_FINAL_ASSISTANT,
        TEMPLATE_ERROR,
        TEMPLATE_REWRITES,
        UNKNOWN_ROLE,
        conversation_row,
        read_conversation,
        with_system_prompt,
    )
    from bdctl.models import stop_id

    source, data = recipe.data.source, recipe.data
    if source.path:
        records = read_records(source.path)
    else:
        assert source.hub is not None  # Data._check: conversations come from a path or the hub
        records = read_hub(source.hub, source.hub_config, source.hub_split)
    stop = stop_id(tokenizer)
    assert stop is not None  # data.template: chat (required by conversations) always finds an end-of-turn token
    stop_text = tokenizer.decode([stop])
    dropped = dict.fromkeys((UNKNOWN_ROLE, NO_FINAL_ASSISTANT, TEMPLATE_ERROR, TEMPLATE_REWRITES), 0)
    examples: list[dict] = []
    for index, (where, record) in enumerate(records):
        turns = read_conversation(where, record, data.format)
        if isinstance(turns, str):
            dropped[turns] += 1
            continue
        row = conversation_row(with_system_prompt(turns, data.system_prompt, tokenizer), tokenizer, stop_text)
        if isinstance(row, str):
            dropped[row] += 1
            continue
        examples.append({"id": index, **row})
    if not examples and not any(dropped.values()):
        raise UserError(f"data: the source {source.path or source.hub} has no examples")
    return examples, dropped


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
    """Examples no tokenizer needs to see: an empty response, a reference too short to score, text
    far beyond max_length, or a repeat of an earlier example (the same prompt and response: it could
    land in two splits)."""
    limit = recipe.data.max_length * MAX_CHARS_PER_TOKEN
    kept, dropped = [], {"empty_output": 0, "output_too_short": 0, "text_too_long": 0, "duplicate": 0}
    seen: set[tuple[str, str]] = set()
    for example in examples:
        key = (example["prompt"], example["output"])
        if not example["output"].strip():
            dropped["empty_output"] += 1
        elif reference_too_short(example["output"]):
            dropped["output_too_short"] += 1
        elif len(example["prompt"]) + len(example["output"]) > limit:
            dropped["text_too_long"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(example)
    if dropped["empty_output"] + dropped["output_too_short"] == len(examples):
        source = recipe.data.source
        raise UserError(
            f"data: every one of the {len(examples)} examples of {source.path or source.hub} has an empty or "
            f"one-character response "
            f"(field {source.fields.output!r}): nothing to train on; check data.source.fields.output"
        )
    return kept, dropped


def _dropped_text(dropped: dict[str, int], max_length: int) -> str:
    """ "3 with empty responses, 2 repeating an earlier example": the counts of split.json in words."""
    words = {
        "prompt_too_long": "with prompts over max_prompt_length tokens",
        "too_long": f"over max_length ({max_length}) tokens",
        "empty_output": "with empty responses",
        "output_too_short": "with one-character responses (too short to score)",
        "text_too_long": (
            f"with more than {max_length * MAX_CHARS_PER_TOKEN} characters, which cannot fit in max_length "
            f"({max_length}) tokens"
        ),
        "duplicate": "repeating an earlier example's prompt and response",
        "unknown_role": "with unknown roles",
        "no_final_assistant": "not ending with an assistant turn",
        "template_error": "that the chat template refused",
        "template_rewrites_turns": "whose turns the chat template rewrites",
    }
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
        tokenizer = train_tokenizer(texts, recipe.models.tokenizer.train, run.tokenizer)
        cut_texts = cut
    else:
        if recipe.models.tokenizer.location is None:  # the teacher's own: say so when its directory is at fault
            check_model_dir(source[0], "teacher model ")
        tokenizer = load_tokenizer(*source, template=recipe.data.template)  # chat: one line if it has no template
        cut_texts = 0
    if recipe.data.template != CHAT:
        # Every export carries the prompt format it was trained on, as a chat template that renders
        # exactly render_prompt's text (the tokenizer's own template, if any, is not what bdctl trained with).
        template = recipe.data.template if isinstance(recipe.data.template, Template) else None
        tokenizer.chat_template = jinja_chat_template(template)
    with space_for(run.tokenizer, "the tokenizer"):
        tokenizer.save_pretrained(run.tokenizer)  # ranks and later stages read this copy
    return tokenizer, cut_texts


def _drop_overlong(recipe: Recipe, tokenizer, examples: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Prompts over max_prompt_length, and sequences over max_length: the last turn after its prompt,
    or for a conversation SFT's whole sequence of every turn (whichever is longer)."""
    from bdctl.data.batching import tokenize_examples

    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    answers = tokenizer([e["output"] for e in examples], add_special_tokens=False)["input_ids"]
    conversations = [e for e in examples if "turns" in e]
    every_turn = iter(tokenize_examples(conversations, tokenizer, all_turns=True) if conversations else [])
    kept, dropped = [], {"prompt_too_long": 0, "too_long": 0}
    for example, prompt, answer in zip(examples, prompts, answers, strict=True):
        length = len(prompt) + len(answer) + 1
        if "turns" in example:
            length = max(length, len(next(every_turn).ids))
        if len(prompt) > recipe.data.max_prompt_length:
            dropped["prompt_too_long"] += 1
        elif length > recipe.data.max_length:
            dropped["too_long"] += 1
        else:
            kept.append(example)
    return kept, dropped


def read_split(directory: Path, name: str) -> list[dict]:
    """One split of a prepared data directory."""
    path = directory / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
