"""Exact resume after SIGKILL, preemption by SIGTERM, and non-finite losses (one and two ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import RECIPES, assert_user_error, run_cli

pytestmark = pytest.mark.slow  # every test runs `bdctl sft` (DeepSpeed, one or two ranks) in a subprocess

SMOKE = str(RECIPES / "smoke.yaml")
# 2 epochs of the smoke student = 42 steps; stop at 36 to keep it short
STEPS = 36
SETTINGS = ["--set", "stages.student_sft.epochs=2", "--set", f"stages.student_sft.max_steps={STEPS}",
            "--set", "stages.student_sft.checkpoint_every=4", "--set", "stages.student_sft.eval_every=8"]  # fmt: skip


def train_losses(cwd) -> dict[int, float]:
    path = cwd / "runs/smoke/student_sft/metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def start(cwd, nproc: str) -> subprocess.Popen:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bdctl", "sft", SMOKE, "--model", "student", "--nproc", nproc, *SETTINGS],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def wait_for_step(process: subprocess.Popen, cwd, step: int, timeout: float = 300) -> None:
    """Until the run has logged `step` training steps and a checkpoint after step 4."""
    deadline = time.time() + timeout
    path = cwd / "runs/smoke/student_sft/metrics.jsonl"
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
            if any(r["event"] == "checkpoint" for r in records) and any(
                r.get("step", 0) >= step and r["event"] == "train" for r in records
            ):
                return
        time.sleep(0.05)
    raise AssertionError("the run did not get far enough in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per-step losses of an uninterrupted run, for one and two ranks."""
    losses = {}
    for nproc in ("1", "2"):
        cwd = tmp_path_factory.mktemp(f"reference{nproc}")
        result = run_cli("sft", SMOKE, "--model", "student", "--nproc", nproc, *SETTINGS, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[nproc] = train_losses(cwd)
        assert sorted(losses[nproc]) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_sigkill_then_resume_gives_the_same_losses(nproc, reference, tmp_path):
    process = start(tmp_path, nproc)
    wait_for_step(process, tmp_path, step=6)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and every rank, no chance to clean up
    process.wait()
    checkpoints = tmp_path / "runs/smoke/student_sft/checkpoints"
    done = sorted(int(p.name[4:]) for p in checkpoints.iterdir() if (p / "MANIFEST.json").is_file())
    assert done and max(done) < STEPS
    result = run_cli("sft", SMOKE, "--model", "student", "--nproc", nproc, *SETTINGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"resuming {tmp_path / 'runs/smoke/student_sft'}" in result.stderr
        or "resuming runs/smoke/student_sft" in result.stderr
    )
    resumed = train_losses(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(max(done) + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[nproc][step], rel=1e-6, abs=1e-7), step
    assert (tmp_path / "runs/smoke/student_sft/MANIFEST.json").is_file()


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_sigterm_checkpoints_exits_75_and_resumes(nproc, reference, tmp_path):
    process = start(tmp_path, nproc)
    wait_for_step(process, tmp_path, step=5)
    process.send_signal(signal.SIGTERM)  # to the launching process only, as a scheduler would
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    assert "preempted at step" in stderr and "Traceback" not in stderr
    stage = tmp_path / "runs/smoke/student_sft"
    assert not (stage / "MANIFEST.json").exists()
    # The best weights so far are kept, but as a candidate: nothing in best/ claims to be complete.
    assert (stage / "best/config.json").is_file() and (stage / "best/selected.json").is_file()
    assert not (stage / "best/MANIFEST.json").exists()
    reasons = [
        json.loads((p / "MANIFEST.json").read_text())["reason"]
        for p in (stage / "checkpoints").iterdir()
        if (p / "MANIFEST.json").is_file()
    ]
    assert "preempted" in reasons or len(reasons) >= 1
    result = run_cli("sft", SMOKE, "--model", "student", "--nproc", nproc, *SETTINGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(tmp_path) == pytest.approx(reference[nproc], rel=1e-6, abs=1e-7)
    export = json.loads((stage / "export/MANIFEST.json").read_text())
    assert export["complete"] and export["step"] == json.loads((stage / "MANIFEST.json").read_text())["best_step"]
    assert not (stage / "best").exists() and not (stage / "export/selected.json").exists()


def test_resume_refuses_another_recipe_or_world_size(reference, tmp_path):
    process = start(tmp_path, "1")
    wait_for_step(process, tmp_path, step=6)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    changed = run_cli(
        "sft", SMOKE, "--model", "student", *SETTINGS, "--set", "stages.student_sft.lr=1e-2", cwd=tmp_path
    )
    assert_user_error(changed, "the unfinished run there was made from something else: stages.student_sft.lr: ")
    two = run_cli("sft", SMOKE, "--model", "student", "--nproc", "2", *SETTINGS, cwd=tmp_path)
    assert_user_error(two, "written by 1 ranks; resume with the same number of ranks (now 2)")


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    blowup = [
        "--set",
        "stages.student_sft.lr=1e6",
        "--set",
        "stages.student_sft.checkpoint_every=1",
        "--set",
        "stages.student_sft.grad_clip=0",
    ]
    result = run_cli("sft", SMOKE, "--model", "student", *blowup, cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite loss at step" in result.stderr and "Traceback" not in result.stderr
    stage = tmp_path / "runs/smoke/student_sft"
    bad_step = int(result.stderr.split("non-finite loss at step ")[1].split(";")[0])
    kept = [
        json.loads((p / "MANIFEST.json").read_text())["step"]
        for p in (stage / "checkpoints").iterdir()
        if (p / "MANIFEST.json").is_file()
    ]
    assert kept and max(kept) == bad_step - 1  # the checkpoint before the bad step, untouched
    assert not (tmp_path / "runs/smoke/recipe.yaml").exists()  # the run's recipe is that of a finished command
    skipping = run_cli(
        "sft",
        SMOKE,
        "--model",
        "student",
        "--force",
        *blowup,
        "--set",
        "stages.student_sft.on_nonfinite=skip",
        cwd=tmp_path,
    )
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert json.loads((stage / "MANIFEST.json").read_text())["skipped_steps"] > 0
    assert "on_nonfinite: skip" in (tmp_path / "runs/smoke/recipe.yaml").read_text()


def test_a_dead_rank_brings_the_job_down(tmp_path):
    """SIGKILL one rank mid-run: the job ends promptly with an error, it does not hang."""
    import psutil

    process = start(tmp_path, "2")
    wait_for_step(process, tmp_path, step=5)

    def is_rank_1(child: psutil.Process) -> bool:
        try:  # short-lived helpers (e.g. a compiler DeepSpeed runs) may be zombies or gone by now
            return "bdctl.worker" in " ".join(child.cmdline()) and child.environ().get("RANK") == "1"
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            return False

    victim = next(p for p in psutil.Process(process.pid).children(recursive=True) if is_rank_1(p))
    victim.kill()
    # Ends on its own (the timeout is only a guard against a hang; how fast depends on the machine).
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: the job failed (exit code 137, killed by signal 9): rank 1 died first and the others were stopped"
        )
    ), stderr[-2000:]
