"""Damaged state left by a kill is repaired on the next run, never trusted and never fatal:
a metrics.jsonl whose last line was cut, cache shards and an index.json cut short."""

from __future__ import annotations

import json
from pathlib import Path

from bdctl.tracking import MetricsLog, read_metrics


def cut_metrics(path: Path) -> None:
    """metrics.jsonl as a kill leaves it: three records, the third cut mid-line."""
    lines = [json.dumps({"event": "train", "step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:17])


def test_a_cut_last_metrics_line_is_dropped_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    cut_metrics(path)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    log = MetricsLog(path, enabled=True)
    log.truncate_after(2)  # what a resume from step 2 does: it used to raise JSONDecodeError
    log.write(event="train", step=3, loss=0.5)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_record_appended_after_a_cut_line_is_not_lost(tmp_path: Path) -> None:
    """A stage that appends without truncating first (generate, eval) must not glue its first
    record onto the cut line, which would make both unreadable."""
    path = tmp_path / "metrics.jsonl"
    cut_metrics(path)
    MetricsLog(path, enabled=True).write(event="start")
    records = read_metrics(path)
    assert [r.get("step", r.get("event")) for r in records] == [1, 2, "start"]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3
