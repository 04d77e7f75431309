"""The report's wall times of distillation runs (the paper's Table 3) from metrics.jsonl, resumes included."""

from __future__ import annotations

import json

from bdctl.report import wall_time_table, wall_times
from bdctl.rundir import RunDir


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_time_to_best_and_total_across_a_resume(tmp_path):
    # first process: best at step 2 (t = 30 s), checkpoint at step 2, killed later (its records after step 2
    # were cut by the resume); the second process resumes and finds no better validation
    write(tmp_path / "metrics.jsonl", [
        {"time": 0.1, "event": "start"},
        {"time": 5.0, "event": "eval", "step": 0, "rouge_l": 10.0, "best": True},
        {"time": 30.0, "event": "eval", "step": 2, "rouge_l": 12.0, "best": True},
        {"time": 31.0, "event": "checkpoint", "step": 2},
        {"time": 0.2, "event": "start"},
        {"time": 20.0, "event": "eval", "step": 4, "rouge_l": 11.0, "best": False},
        {"time": 21.0, "event": "end", "best_step": 2},
    ])  # fmt: skip
    assert wall_times(tmp_path / "metrics.jsonl") == {"best_step": 2, "to_best": 30.0, "total": 52.0}


def test_the_table_gives_minillm_over_bd(tmp_path):
    run = RunDir(tmp_path)
    for name, best_time, end in (("bd", 10.0, 40.0), ("minillm", 90.0, 200.0)):
        write(tmp_path / "distill" / name / "metrics.jsonl", [
            {"time": 0.0, "event": "start"}, {"time": best_time, "event": "eval", "step": 3, "best": True},
            {"time": end, "event": "end"},
        ])  # fmt: skip
    text = "\n".join(wall_time_table(run))
    assert "| distill/minillm | 3 | 90.0 | 200.0 |" in text.replace("  ", " ")
    assert "MiniLLM / BD: 9.0x to the best validation, 5.0x in total." in text
