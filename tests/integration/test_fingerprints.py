"""Never a stale result (issue 23), through the real CLI: a finished stage is reused only if it was made
from what the command names now. One short teacher SFT on a data file, then: the same command and a
result-neutral change reuse it; a changed setting and a data file edited in place are refused in one
line, with nothing deleted; `bdctl runs` shows the stage stale; `bdctl reproduce` plans it stale and
writes no report. (A teacher retrained under a finished generate: tests/integration/test_generate.py.)"""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import assert_user_error, run_cli, write_recipe

pytestmark = pytest.mark.slow  # every test runs the CLI in a subprocess

SHORT = ["--set", "stages.teacher_sft.max_steps=2", "--set", "stages.teacher_sft.eval_every=2"]


def test_changed_settings_and_data_are_never_reused(tmp_path):
    from bdctl.data.synthetic import synthetic_instructions

    data = tmp_path / "mydata.jsonl"
    rows = synthetic_instructions(96, seed=5)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = str(
        write_recipe(
            tmp_path / "mine.yaml",
            data__source={"path": "mydata.jsonl"},
            data__split={"valid": 8, "test": 8, "seed": 1},
        )
    )
    first = run_cli("sft", recipe, "--model", "teacher", *SHORT, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    stage = tmp_path / "runs/smoke/teacher_sft"
    made = json.loads((stage / "MANIFEST.json").read_text())["made_from"]
    assert made["sources"] == {"mydata.jsonl": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert made["settings"]["stages.teacher_sft.lr"] == 0.003 and "stages.generate.n_samples" not in made["settings"]
    assert not (stage / "checkpoints").exists()  # dropped once the export was written

    neutral = ["--set", "stages.teacher_sft.keep_checkpoints=4", "--set", "tracking.report_to=[]"]
    again = run_cli("sft", recipe, "--model", "teacher", *SHORT, *neutral, cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr[-2000:]

    changed = run_cli("sft", recipe, "--model", "teacher", *SHORT, "--set", "stages.teacher_sft.lr=5e-4", cwd=tmp_path)
    assert_user_error(
        changed,
        "runs/smoke/teacher_sft is finished but was made from something else: stages.teacher_sft.lr: 0.003 -> "
        "0.0005; pass --force to redo it (its old result is replaced), or use another name / run_dir to keep both",
    )

    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:90]))  # edited in place: same path, same settings
    edited = run_cli("sft", recipe, "--model", "teacher", *SHORT, cwd=tmp_path)
    assert_user_error(
        edited, "teacher_sft is finished but was made from something else: data source mydata.jsonl changed"
    )
    assert (stage / "export/model.safetensors").is_file()  # refused, nothing destroyed

    listed = run_cli("runs", "runs/smoke", "--json", cwd=tmp_path)
    teacher = json.loads(listed.stdout)[0]["stages"][0]
    assert teacher["state"] == "stale" and teacher["detail"].startswith("data source mydata.jsonl changed")
    assert teacher["disk_bytes"] > (stage / "export/model.safetensors").stat().st_size

    plan = run_cli("reproduce", recipe, *SHORT, "--dry-run", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "stale teacher_sft: data source mydata.jsonl changed" in plan.stderr
    assert "reproduce redoes them only with --force" in plan.stderr
    refused = run_cli("reproduce", recipe, *SHORT, cwd=tmp_path)
    assert_user_error(refused, "are stale for this recipe: teacher_sft (data source mydata.jsonl changed)", "--force")
    assert not (tmp_path / "runs/smoke/report.md").exists()  # no old numbers under the new header
