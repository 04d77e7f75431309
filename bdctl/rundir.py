"""The run directory: one predictable layout per recipe, and the "write, then mark complete" rule.

    runs/<name>/
      recipe.yaml              the resolved recipe of the latest command
      tokenizer/               the shared tokenizer (trained here for tiny recipes)
      data/                    train/valid/test.jsonl, split.json, MANIFEST.json
      <stage>/                 teacher_sft, student_sft, generate, distill/<method>, eval, judge
        recipe.yaml job.json   what this stage ran with
        metrics.jsonl logs/    per-step metrics; one log file per rank
        checkpoints/           DeepSpeed checkpoints
        export/                the chosen weights as a Hugging Face directory
        MANIFEST.json          written last: the stage is complete only when it exists

Files are written to a temporary name and renamed, so a reader never sees half a file, and a
directory without MANIFEST.json is never taken for finished work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place, replacing an older one.

    Two renames, so a kill between them leaves only `.<name>.old`; `recover_dir` puts it back.
    """
    recover_dir(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a replace_dir that was killed between its two renames."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        old.rename(final)


def mark_complete(directory: Path, **payload: Any) -> None:
    """Write the manifest that marks `directory` finished; call it after every other file."""
    write_json_atomic(directory / MANIFEST, {"complete": True, "finished_at": time.time(), **payload})


def manifest(directory: Path) -> dict | None:
    """The manifest of a finished directory, or None while it is not finished."""
    path = directory / MANIFEST
    return read_json(path) if path.is_file() else None


class RunDir:
    """Paths of one recipe's run directory."""

    @classmethod
    def of(cls, recipe) -> RunDir:
        """The recipe's run directory: its run_dir, else runs/<name>."""
        return cls(recipe.run_dir or f"runs/{recipe.name}")

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def stage(self, name: str) -> Path:
        """A stage directory: `teacher_sft`, `generate`, `distill/bd`, ..."""
        return self.root / name

    def export(self, stage: str) -> Path:
        return self.stage(stage) / "export"
