"""`bdctl runs` on a run directory built by hand (every state a stage can be in), and shell completion
of recipe and stage names. In-process (typer's CliRunner): no DeepSpeed, no subprocess."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdctl.cli import app
from bdctl.rundir import _start_time


def write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, list):
        path.write_text("".join(json.dumps(r) + "\n" for r in payload))
    else:
        path.write_text(json.dumps(payload))


def stage(run: Path, name: str) -> Path:
    directory = run / name
    write(directory / "job.json", {"recipe_path": "recipes/smoke.yaml", "stage_name": name})
    return directory


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "runs/smoke"
    done = stage(run, "teacher_sft")
    write(done / "metrics.jsonl", [
        {"time": 0.5, "event": "start", "total_steps": 4},
        {"time": 1.0, "event": "eval", "step": 0, "val_loss": 2.5},
        {"time": 30.0, "event": "train", "step": 4, "loss": 1.0},
        {"time": 31.0, "event": "eval", "step": 4, "val_loss": 1.25},
        {"time": 31.5, "event": "end", "best_step": 4, "select": "val_loss", "best_score": 1.25},
    ])  # fmt: skip
    write(done / "MANIFEST.json", {"complete": True, "select": "val_loss", "best_score": 1.25, "best_step": 4})

    killed = stage(run, "student_sft")  # two attempts: 20 s, then killed 12 s into the second
    write(killed / "metrics.jsonl", [
        {"time": 0.1, "event": "start", "total_steps": 10},
        *({"time": 2.0 * s, "event": "train", "step": s, "loss": 1.0} for s in range(1, 5)),
        {"time": 8.5, "event": "checkpoint", "step": 4},
        {"time": 8.6, "event": "eval", "step": 4, "val_loss": 1.5},
        {"time": 20.0, "event": "train", "step": 5, "loss": 1.0},
        {"time": 0.2, "event": "start", "total_steps": 10},
        {"time": 12.0, "event": "train", "step": 6, "loss": 1.0},
    ])  # fmt: skip
    write(killed / "checkpoints/step4/MANIFEST.json", {"complete": True})
    write(killed / "checkpoints/step8/zero.pt", {})  # no manifest: an incomplete checkpoint does not count

    failed = stage(run, "distill/bd")
    write(failed / "metrics.jsonl", [{"time": 1.0, "event": "train", "step": 1, "loss": 3.0}])
    (failed / "logs").mkdir()
    (failed / "logs/error-rank0.txt").write_text("rank 0: RuntimeError: CUDA out of memory\n")

    running = stage(run, "distill/kd")
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
              "command": "bdctl distill smoke --method kd"}  # fmt: skip
    write(running / "LOCK", holder)

    stage(run, "distill/seqkd")  # planned, nothing written yet

    generate = stage(run, "generate")
    write(generate / "MANIFEST.json", {"complete": True, "sequences": 800, "tokens": 9000, "finished_at": 0})

    evaluation = stage(run, "eval")
    write(evaluation / "MANIFEST.json", {"complete": True, "finished_at": 0})
    write(evaluation / "results.json", {"sets": ["dolly", "valid"], "scores": {"minillm": {
        "student_sft": {"dolly": {"mean": 20.5}}, "distill/bd": {"dolly": {"mean": 23.25}}}}})  # fmt: skip

    judge = stage(run, "judge")
    write(judge / "MANIFEST.json", {"complete": True, "finished_at": 0})
    write(judge / "results.json", {"candidate": "distill/bd", "baselines": {"student_sft": {"win_rate": 0.625}}})
    return run


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(
        app, list(args), env={"COLUMNS": "250", "NO_COLOR": "1", **(env or {})}, prog_name="bdctl"
    )


def test_runs_json_says_each_stage_state_and_why(run_dir):
    result = invoke("runs", str(run_dir.parent), "--json")
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.output)
    assert run["run"] == str(run_dir) and run["recipe"] == "recipes/smoke.yaml"
    stages = {s["stage"]: s for s in run["stages"]}
    order = ["teacher_sft", "generate", "student_sft", "distill/bd", "distill/kd", "distill/seqkd", "eval", "judge"]
    assert [s["stage"] for s in run["stages"]] == order  # pipeline order

    assert stages["teacher_sft"]["state"] == "finished" and stages["teacher_sft"]["wall_s"] == 31.5
    assert stages["teacher_sft"]["score"] == {"name": "val_loss", "value": 1.25, "step": 4}

    killed = stages["student_sft"]
    assert killed["state"] == "interrupted" and killed["step"] == 6 and killed["resume_step"] == 4
    assert killed["detail"] == "stopped at step 6/10; rerun resumes from step 4"
    assert killed["wall_s"] == 32.0  # 20 s + 12 s
    assert killed["score"] == {"name": "val_loss", "value": 1.5, "step": 4}

    assert stages["distill/bd"]["state"] == "failed"
    assert (
        stages["distill/bd"]["detail"] == "rank 0: RuntimeError: CUDA out of memory; rerun starts over (no checkpoint)"
    )
    assert stages["distill/kd"]["state"] == "running"
    assert f"pid {os.getpid()} on {socket.gethostname()}" in stages["distill/kd"]["detail"]
    assert "bdctl distill smoke --method kd" in stages["distill/kd"]["detail"]
    assert stages["distill/seqkd"]["state"] == "not started"
    assert stages["generate"]["headline"] == "800 sequences, 9000 tokens"
    assert stages["eval"]["headline"] == "dolly (minillm): distill/bd 23.25, best of 2"
    assert stages["judge"]["headline"] == "distill/bd win rate vs student_sft 0.62"


def test_runs_table(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parent.parent)  # default: ./runs
    result = invoke("runs")
    assert result.exit_code == 0, result.output
    for text in ["teacher_sft", "finished", "best val_loss 1.25 (step 4)", "interrupted", "stopped at step 6/10",
                 "failed", "CUDA out of memory", "running", "not started", "32s", "distill/bd 23.25"]:  # fmt: skip
        assert text in result.output, (text, result.output)


def test_a_stale_lock_is_not_running(run_dir):
    lock = run_dir / "distill/kd/LOCK"
    write(lock, {**json.loads(lock.read_text()), "started": 1.0})  # the pid now belongs to another process
    result = invoke("runs", str(run_dir), "--json")
    assert json.loads(result.output)[0]["stages"][4]["state"] == "not started"


def test_runs_without_runs_is_one_line(tmp_path):
    result = invoke("runs", str(tmp_path / "nothing"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}: no run directories here (a run holds stage directories with a job.json)"
    ]


def complete(words: str) -> list[str]:
    """What bash completion offers for the last word of `words` (typer's completion machinery)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_BDCTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = invoke(env=env)
    assert result.exit_code == 0, result.output
    return result.output.split()


def test_completion_of_recipe_and_stage_names(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parent.parent)  # the run directory of smoke is ./runs/smoke
    assert complete("bdctl sft smok") == ["smoke"]
    assert complete("bdctl sft sm") == ["smoke", "smollm2-cpu"]
    assert {"smoke", "tiny"} <= set(complete("bdctl distill "))
    assert complete("bdctl sft smoke --model ") == ["teacher", "student"]
    assert complete("bdctl distill smoke --ablation ") == ["bd-p0.5"]
    assert "distill/minillm" in complete("bdctl eval smoke --model dist")
    assert complete("bdctl reproduce smoke --from ev") == ["eval"]
    assert "runs" in complete("bdctl r")
    # --show-completion is a flag: the shell comes from shellingham's look at the process tree, which
    # under a CI runner or an xdist worker may find no shell (or sh, which typer does not support)
    import typer.completion

    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    installed = invoke("--show-completion")
    assert installed.exit_code == 0 and "_BDCTL_COMPLETE=complete_bash" in installed.output
