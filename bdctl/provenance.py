"""What a stage was made from, and whether that still holds (issue 23: never a stale result).

Every finished stage records in its MANIFEST.json (and its job.json, written before the ranks start)
`made_from`:

    fingerprint   sha256 of everything below but `made` times: what the stage's result depends on
    settings      the resolved recipe as it affects the stage, flattened to dotted keys, without the
                  result-neutral settings (RESULT_NEUTRAL)
    options       the command's stage options (--model, --method, --ablation, --score, ...)
    sources       sha256 of the data files the run's split was made from (data.source.path,
                  data.pretrain.path), so that a file edited in place is noticed
    data          when the run's data split was made (data/MANIFEST.json's finished_at)
    inputs        per upstream stage directory (teacher_sft for generate, D* and student_sft for BD,
                  ...): its fingerprint and when it finished

A stage is stale when a rerun would be made from something else: its settings, options, data files or
an upstream stage's fingerprint differ (`differences`), or an upstream stage (or the data split) was
made again after it, even with the same settings (`remade_inputs`: "teacher_sft was retrained after
generate"). Which stages a stage reads is `bdctl.pipeline.inputs_of`; the record of a Job is built in
`bdctl.submit.made_from`. This module is a leaf: `bdctl runs` reads records with it without a recipe.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bdctl.rundir import manifest, read_json

# Settings that cannot change a stage's result, whatever their value: a finished stage is not stale
# and an unfinished one resumes when only these changed. Dotted recipe keys, `*` one level of any name.
# (The README's "Stage reuse" section lists them too.)
RESULT_NEUTRAL = (
    "description",  # one line of prose
    "run_dir",  # where the run lives, not what it holds
    "tracking",  # experiment trackers (TensorBoard, W&B, MLflow) only watch
    "tracking.*",
    "paper_rouge_l",  # the paper's numbers printed beside bdctl's in the report
    "paper_protocols",
    "stages.generate.report_examples",  # size of the post-generation sparsity report, not of D* or the cache
    "stages.*.keep_checkpoints",  # how many DeepSpeed checkpoints stay on disk
    "stages.*.keep_checkpoints_after_finish",
    "stages.distill.ablations.*.keep_checkpoints",
    "stages.distill.ablations.*.keep_checkpoints_after_finish",
)

TRAINING_PREFIXES = ("teacher_sft", "student_sft", "distill/")


def is_neutral(key: str) -> bool:
    """Whether a dotted recipe key (or a section above such keys) is result-neutral."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESULT_NEUTRAL)


def drop_neutral(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of a (recipe) dict without its result-neutral keys, at any depth."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if is_neutral(dotted):
            continue
        out[key] = drop_neutral(value, f"{dotted}.") if isinstance(value, dict) else value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty dicts stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(record: dict[str, Any]) -> str:
    """The fingerprint of a record: everything but when things were made."""
    inputs = {name: (value or {}).get("fingerprint") for name, value in record.get("inputs", {}).items()}
    payload = {key: record.get(key) for key in ("stage", "settings", "options", "sources")}
    return digest({**payload, "inputs": inputs})


# A file's digest, by (path, size, mtime): one command hashes a data file once however many stages ask.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str | None:
    """sha256 of a file's contents (None if it is not a readable file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    sha.update(block)
        except OSError:
            return None
        _DIGESTS[key] = sha.hexdigest()
    return _DIGESTS[key]


def identity(stage_dir: Path) -> dict[str, Any] | None:
    """What a downstream stage records of a finished stage (or the data split): its fingerprint
    (None for one made before bdctl recorded them) and when it finished; None if unfinished."""
    done = manifest(stage_dir)
    if done is None:
        return None
    record = done.get("made_from") or {}
    return {"fingerprint": record.get("fingerprint") or done.get("fingerprint"), "finished_at": done.get("finished_at")}


def made_from(stage_dir: Path) -> dict[str, Any] | None:
    """The record of a finished stage: its manifest's, else the job.json of the command that finished
    it (a kill between the manifest and its stamp); None for a stage made before records existed."""
    done = manifest(stage_dir)
    if done is None:
        return None
    if isinstance(done.get("made_from"), dict):
        return done["made_from"]
    try:
        record = read_json(stage_dir / "job.json").get("info", {}).get("made_from")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(record, dict) or (record.get("started_at") or 0) > (done.get("finished_at") or 0):
        return None  # a later command's job.json: it does not describe this manifest
    return record


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _verb(stage: str) -> str:
    return "retrained" if stage.startswith(TRAINING_PREFIXES) else "made again"


def differences(stage: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the record a stage was made from (`old`) and what a rerun would be made
    from now (`new`), one short phrase each: `stages.distill.lr: 0.0001 -> 0.0005`, `data source
    x.jsonl changed`, `teacher_sft was retrained after generate`."""
    found = []
    settings_old, settings_new = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(settings_old) | set(settings_new)):
        if settings_old.get(key, "(unset)") != settings_new.get(key, "(unset)"):
            found.append(
                f"{key}: {_shown(settings_old.get(key, '(unset)'))} -> {_shown(settings_new.get(key, '(unset)'))}"
            )
    options_old, options_new = old.get("options", {}), new.get("options", {})
    for key in sorted(set(options_old) | set(options_new)):
        if options_old.get(key) != options_new.get(key):
            found.append(f"option {key}: {_shown(options_old.get(key))} -> {_shown(options_new.get(key))}")
    sources_old, sources_new = old.get("sources", {}), new.get("sources", {})
    for path in sorted(set(sources_old) | set(sources_new)):
        if path in sources_old and path in sources_new and sources_old[path] != sources_new[path]:
            found.append(f"data source {path} changed")
    inputs_old, inputs_new = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(inputs_old) | set(inputs_new)):
        before, now = inputs_old.get(name) or {}, inputs_new.get(name) or {}
        if before.get("fingerprint") != now.get("fingerprint") or before.get("finished_at") != now.get("finished_at"):
            found.append(f"{name} was {_verb(name)} after {stage}")
    if old.get("data") is not None and new.get("data") is not None and old["data"] != new["data"]:
        if not any(item.startswith(("data.", "data source", "models.tokenizer")) for item in found):
            found.append(f"the data split was made again after {stage}")
    return found


def remade_inputs(
    run_root: Path, stage: str, record: dict[str, Any], memo: dict[str, list[str]] | None = None
) -> list[str]:
    """Without a recipe (`bdctl runs`, a stage's upstream check): why a finished stage no longer
    matches what its inputs hold now: an input made again since, or an input that is itself stale.
    Settings are not compared here (that needs the recipe a command names)."""
    memo = {} if memo is None else memo
    reasons = []
    data = identity(Path(run_root) / "data")
    if record.get("data") is not None and data is not None and data.get("finished_at") != record["data"]:
        reasons.append(f"the data split was made again after {stage}")
    for path, sha in (record.get("sources") or {}).items():
        contents = file_digest(path)
        if contents is not None and contents != sha:
            reasons.append(f"data source {path} changed")
    for name, recorded in (record.get("inputs") or {}).items():
        now = identity(Path(run_root) / name)
        before = recorded or {}
        if now is None:
            if before:
                reasons.append(f"{name} is no longer finished")
            continue
        if before.get("fingerprint") != now.get("fingerprint") or before.get("finished_at") != now.get("finished_at"):
            reasons.append(f"{name} was {_verb(name)} after {stage}")
            continue
        if name not in memo:
            memo[name] = []
            upstream = made_from(Path(run_root) / name)
            memo[name] = remade_inputs(run_root, name, upstream, memo) if upstream else []
        if memo[name]:
            reasons.append(f"{name} is stale ({memo[name][0]})")
    return reasons


def disk_bytes(directory: Path) -> int:
    """Bytes the files under `directory` hold (symlinks not followed)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
