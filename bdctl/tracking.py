"""What a person watches: a rich progress bar on rank 0, metrics as JSON lines, and the experiment
trackers the recipe names (`tracking:`, bdctl.trackers), which receive the same records."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdctl.errors import space_for

if TYPE_CHECKING:
    from rich.progress import Progress

    from bdctl.trackers import Trackers


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none if it is missing). A line cut short by a kill, the
    last one, is left out: the one reader every consumer (resume, `bdctl runs`, the report) uses."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _drop_cut_last_line(path: Path) -> None:
    """Cut a file back to its last newline: a record appended after a line a kill cut short would
    otherwise join it into one line that is neither record."""
    try:
        with path.open("rb+") as handle:
            size = handle.seek(0, 2)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            handle.seek(max(0, size - 1_000_000))
            tail = handle.read()
            handle.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
    except FileNotFoundError:
        return


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl (rank 0 only; others write nothing), and
    hands each to the stage's experiment trackers.

    The trackers come from the stage's job.json beside metrics.jsonl (its recipe's `tracking:`), so
    a stage only builds a MetricsLog. They are opened at the first record with a step (after a
    resume's `truncate_after`), and first receive what metrics.jsonl already holds.
    """

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.start = time.time()
        self._trackers: Trackers | None = None
        self._repaired = False  # a line cut by a kill is dropped before the first append
        self._tracking = enabled and (path.parent / "job.json").is_file()

    def records(self) -> list[dict[str, Any]]:
        """What metrics.jsonl holds (a line cut short by a kill is left out)."""
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Forget records of steps after `step` (they are about to be replayed by a resume), and
        a line cut short by a kill (it would otherwise stop every rerun)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self._repaired = True
        if self._trackers is not None:  # reopened at the next record, from the truncated file
            self._trackers.close(finished=False)
            self._trackers = None

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.start, 3), **record}
        if not self._repaired:
            _drop_cut_last_line(self.path)
            self._repaired = True
        line = json.dumps(record) + "\n"
        with space_for(self.path.parent, self.path.name, len(line)), self.path.open("a") as handle:
            handle.write(line)
        if self._tracking:
            self._track(record)

    def close(self) -> None:
        """Close the trackers' runs (a stage's final record does it; atexit does it otherwise)."""
        if self._trackers is not None:
            self._trackers.close(finished=False)
            self._trackers = None

    def _track(self, record: dict[str, Any]) -> None:
        from bdctl.trackers import FINAL_EVENTS, Trackers

        if self._trackers is None:
            if record.get("step") is None and record.get("event") not in (*FINAL_EVENTS, "batch"):
                return  # e.g. "start", written before a resume truncates: the trackers read it from the file
            # the history includes this record
            self._trackers = Trackers.open(self.path.parent, self.records())
            self._tracking = self._trackers is not None
            return
        self._trackers.send(record)
        if record.get("event") in ("eval", "checkpoint"):
            self._trackers.flush()


class StepProgress:
    """A progress bar over optimizer steps showing loss, tokens/s and ETA; silent off rank 0."""

    def __init__(self, description: str, total: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.description = description
        self._progress: Progress | None = None

    def __enter__(self) -> StepProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, status="")
        return self

    def update(self, advance: int = 1, **status: float | str) -> None:
        if self._progress is not None:
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in status.items())
            self._progress.update(self._task, advance=advance, status=text)

    def print(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
