"""lm-evaluation-harness in `bdctl eval` (bdctl/harness.py): task lists, lm-eval's results read into
bdctl's tables, the one-line errors. The harness run itself: tests/integration/test_eval_judge.py."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from bdctl.cli import app
from bdctl.errors import UserError
from bdctl.harness import harness_table, parse_tasks, scores_of

# What lm-eval 0.4's simple_evaluate returns under "results" (trimmed): "<metric>,<filter>" keys.
LM_EVAL_RESULTS = {
    "results": {
        "toy": {"alias": "toy", "acc,none": 0.75, "acc_stderr,none": 0.25, "acc_norm,none": 0.5,
                "acc_norm_stderr,none": "N/A", "sample_len": 4},
        "gen": {"alias": "gen", "exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.05},
    }
}  # fmt: skip


def test_tasks_are_comma_separated_and_kept_once():
    assert parse_tasks("hellaswag, arc_easy,hellaswag") == ["hellaswag", "arc_easy"]
    with pytest.raises(UserError, match="name at least one lm-eval task"):
        parse_tasks(" , ")


def test_lm_eval_results_become_metric_columns():
    scores = scores_of(LM_EVAL_RESULTS)
    assert scores == {
        "toy": {"acc": 0.75, "acc_stderr": 0.25, "acc_norm": 0.5},
        "gen": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.05},
    }
    harness = {"scores": {"student_sft": scores, "teacher_sft": {"toy": {"acc": 1.0}}}}
    headers, rows = harness_table(harness, ["teacher_sft", "student_sft"])
    assert headers == ["model", "toy acc", "toy acc_norm", "gen exact_match,strict-match"]
    assert rows == [
        ["teacher_sft", "1.0000", "", ""],
        ["student_sft", "0.7500 ± 0.2500", "0.5000", "0.1250 ± 0.0500"],
    ]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250", "NO_COLOR": "1"}, prog_name="bdctl")


def test_harness_settings_without_harness_are_one_line():
    result = invoke("eval", "recipes/smoke.yaml", "--harness-limit", "5")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: --harness-include and --harness-limit go with --harness TASKS"
    )


def test_harness_without_lm_eval_names_the_extra(monkeypatch):
    from bdctl.harness import task_manager

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match=r"lm-evaluation-harness is not installed \(pip install 'bdctl\[harness\]'\)"):
        task_manager(["toy"], None)


def test_a_missing_task_directory_is_one_line(tmp_path):
    pytest.importorskip("lm_eval")
    from bdctl.harness import task_manager

    with pytest.raises(UserError, match=f"--harness-include {tmp_path / 'nope'}: no such directory"):
        task_manager(["toy"], str(tmp_path / "nope"))
