"""Two "nodes" on 127.0.0.1: hand-started launchers (--nnodes 2) and SLURM-style tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bdctl.engine import free_port
from tests.conftest import RECIPES

pytestmark = pytest.mark.slow  # every test starts two launchers (torchrun / SLURM-style ranks) in subprocesses

SMOKE = str(RECIPES / "smoke.yaml")
# the 2-rank checkpoint is inspected after the run: kept (a finished stage drops its checkpoints by default)
SHORT = ["--set", "stages.student_sft.max_steps=3", "--set", "stages.student_sft.keep_checkpoints_after_finish=true"]


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONWARNINGS="ignore", NO_COLOR="1", COLUMNS="200", **extra)
    return env


def run_both(commands_and_envs, cwd) -> list[subprocess.CompletedProcess]:
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "bdctl", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in commands_and_envs
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def assert_two_rank_run(cwd, results) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    stage = cwd / "runs/smoke/student_sft"
    start = json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert (stage / "MANIFEST.json").is_file() and (stage / "export/model.safetensors").is_file()
    checkpoint = next(p for p in (stage / "checkpoints").iterdir() if p.is_dir())
    assert len(list(checkpoint.glob("zero_pp_rank_*_model_states.pt"))) == 2


def test_two_hand_started_nodes(tmp_path):
    port = str(free_port())
    node = ["sft", SMOKE, "--model", "student", "--nnodes", "2", "--master-port", port, *SHORT]
    results = run_both(
        [([*node, "--node-rank", "1"], clean_env()), ([*node, "--node-rank", "0"], clean_env())], tmp_path
    )
    assert "waiting for node 0 to prepare" in results[0].stderr
    assert_two_rank_run(tmp_path, results)


def test_slurm_tasks(tmp_path):
    """What `srun --ntasks 2 bdctl sft ...` gives each task: its rank comes from SLURM's environment."""
    slurm = dict(
        SLURM_STEP_ID="0",
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_JOB_ID="1",
        MASTER_PORT=str(free_port()),
    )
    task = ["sft", SMOKE, "--model", "student", *SHORT]
    envs = [clean_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in (1, 0)]
    results = run_both([(task, envs[0]), (task, envs[1])], tmp_path)
    assert_two_rank_run(tmp_path, results)


def test_distill_on_two_hand_started_nodes(tmp_path):
    quick = ["--set", "stages.teacher_sft.max_steps=2", "--set", "stages.student_sft.max_steps=2",
             "--set", "stages.generate.n_samples=1", "--set", "stages.generate.max_new_tokens=8"]  # fmt: skip
    for command in (["sft", SMOKE, "--model", "teacher"], ["generate", SMOKE], ["sft", SMOKE, "--model", "student"]):
        result = subprocess.run(
            [sys.executable, "-m", "bdctl", *command, *quick],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    port = str(free_port())
    node = [
        "distill",
        SMOKE,
        "--method",
        "bd",
        "--nnodes",
        "2",
        "--master-port",
        port,
        *quick,
        "--set",
        "stages.distill.max_steps=2",
    ]
    results = run_both(
        [([*node, "--node-rank", "1"], clean_env()), ([*node, "--node-rank", "0"], clean_env())], tmp_path
    )
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    stage = tmp_path / "runs/smoke/distill/bd"
    assert json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])["world_size"] == 2
    assert (stage / "MANIFEST.json").is_file() and (stage / "export/model.safetensors").is_file()
