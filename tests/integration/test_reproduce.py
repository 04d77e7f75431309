"""`bdctl reproduce` on the smoke recipe: the whole pipeline, interrupted after generate, resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import RECIPES, run_cli

pytestmark = pytest.mark.slow  # every test runs `bdctl reproduce` in a subprocess

SMOKE = str(RECIPES / "smoke.yaml")


def test_reproduce_smoke_interrupted_after_generate(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bdctl", "reproduce", SMOKE], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    generated = tmp_path / "runs/smoke/generate/MANIFEST.json"
    deadline = time.time() + 600
    while not generated.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    plan = run_cli("reproduce", SMOKE, "--dry-run", cwd=tmp_path)
    assert "skip teacher_sft" in plan.stderr and "skip generate" in plan.stderr
    assert "run  distill/bd: bdctl distill" in plan.stderr

    result = run_cli("reproduce", SMOKE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skip teacher_sft" in result.stderr and "skip generate" in result.stderr
    run = tmp_path / "runs/smoke"
    for stage in (
        "student_sft",
        "distill/bd",
        "distill/bd-p0.5",
        "distill/kd",
        "distill/seqkd",
        "distill/minillm",
        "eval",
        "judge",
    ):
        assert (run / stage / "MANIFEST.json").is_file(), stage
    report = (run / "report.md").read_text()
    assert "## Rouge-L" in report and "distill/bd" in report and "## Win rates" in report
    assert "## Ablations" in report and "| distill/bd-p0.5 | p = 0.5 |" in report

    # the ablation ran BD with the cached p = 0.8 sets cut to p = 0.5: smaller sets
    def set_size(stage):
        records = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        return sum(r["mean_set_size"] for r in records if r["event"] == "train")

    assert set_size("distill/bd-p0.5") < set_size("distill/bd")
    assert "## Training curves" in report and (run / "figures/training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| distill/bd |" in report  # wall time per stage
    # MiniLLM in the Rouge-L table and among the judged baselines (Figure 2), timed against BD (Table 3)
    assert report.count("| distill/minillm |") >= 3
    assert "## Wall time of the distillation runs (the paper's Table 3)" in report and "MiniLLM / BD: " in report


def test_unknown_stage_is_a_clear_error(tmp_path):
    result = run_cli("reproduce", SMOKE, "--only", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "--only nope: no such stage" in result.stderr
