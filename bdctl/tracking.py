"""What a person watches: a rich progress bar on rank 0 and metrics as JSON lines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl (rank 0 only; others write nothing)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.start = time.time()

    def truncate_after(self, step: int) -> None:
        """Forget records of steps after `step` (they are about to be replayed by a resume)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.start, 3), **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


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
