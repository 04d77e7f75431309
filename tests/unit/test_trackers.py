"""Experiment trackers (bdctl.trackers) with the real libraries, offline: what each one holds, read back
with its own reader, against metrics.jsonl, across a kill and a resume.

- TensorBoard: event files read with tensorboard's EventAccumulator.
- W&B: WANDB_MODE offline; the run files (run-<id>.wandb: wandb's record protocol buffers in a
  LevelDB-style log) read with `wandb_records` below, which decodes wandb's own `Record` messages.
- MLflow: the default local store (sqlite in the run directory) read with MlflowClient.

The in-process tests feed MetricsLog by hand (the kill: the first MetricsLog's trackers are left
without a final record; the resume: truncate_after and a second MetricsLog on the same stage
directory). The slow test runs `bdctl sft` with all three trackers, SIGKILLs it after a checkpoint
and runs it again.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bdctl.errors import UserError
from bdctl.recipe import load_recipe
from bdctl.tracking import MetricsLog
from tests.conftest import RECIPES, run_cli

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ALL = "tracking.report_to=[tensorboard,wandb,mlflow]"
TIMING = {"train/tokens_per_s"}  # the only value of these records that a replayed step changes


@pytest.fixture(scope="module", autouse=True)
def offline_wandb(tmp_path_factory) -> Iterator[None]:
    """W&B offline, its config and caches kept out of the home directory."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(home / name.lower()))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


# --------------------------------------------------------------------------- readers


def expected_scalars(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says each tracker must hold: tag -> step -> value (independent of bdctl.trackers)."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        if record["event"] not in ("train", "eval", "rollout") or "step" not in record:
            continue
        for key, value in record.items():
            if key not in ("event", "step", "time") and type(value) in (int, float):
                out.setdefault(f"{record['event']}/{key}".replace("@", ":"), {})[record["step"]] = float(value)
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)  # one value per step
        out[tag] = {e.step: e.value for e in events}
    return out


def wandb_records(path: Path) -> Iterator[Any]:
    """wandb's `Record` messages from an offline run file: a 7-byte header (':W&B', magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: full, first,
    middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # the rest of a block is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            position += block - position % block
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_file(run_dir: Path) -> dict[str, Any]:
    """One offline run file: its run id and name, history (step -> row), config and summary."""
    (path,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"history": {}, "config": {}, "summary": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["name"] = record.run.run_id, record.run.display_name
            out["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = row.pop("_step")
            assert step not in out["history"], step  # one row per step within a file
            out["history"][step] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "config":
            out["config"].update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.config.update}
            )
        elif kind == "summary":
            out["summary"].update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
            )
    return out


def wandb_scalars(history: dict[int, dict[str, float]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for step, row in history.items():
        for key, value in row.items():
            out.setdefault(key, {})[step] = float(value)
    return out


def wandb_synced(files: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """The run W&B makes of the offline files synced in order: a step below the run's current step
    is ignored (wandb: "Steps must be monotonically increasing, so this data will be ignored")."""
    history: dict[int, dict[str, float]] = {}
    for file in files:
        for step in sorted(file["history"]):
            if not history or step > max(history):
                history[step] = file["history"][step]
    return history


def mlflow_scalars(run_root: Path, run_id: str) -> tuple[dict[str, dict[int, float]], Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_root / 'mlflow.db').resolve()}")
    run = client.get_run(run_id)
    out: dict[str, dict[int, float]] = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), (key, steps)  # one value per step
        out[key] = {m.step: m.value for m in history}
    return out, run


def assert_close(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], rel: float = 1e-6) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for tag, steps in want.items():
        assert sorted(got[tag]) == sorted(steps), tag
        for step, value in steps.items():
            assert math.isclose(got[tag][step], value, rel_tol=rel, abs_tol=1e-12), (tag, step, got[tag][step], value)


def without_final(scalars: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {k: v for k, v in scalars.items() if not k.startswith("final/")}


# --------------------------------------------------------------------------- in-process


def make_stage(run_root: Path, stage: str, *overrides: str) -> Path:
    """A stage directory with the job.json a submitted stage has (what MetricsLog reads)."""
    recipe, path = load_recipe(str(RECIPES / "smoke.yaml"), [f"run_dir={run_root}", *overrides])
    stage_dir = run_root / stage
    stage_dir.mkdir(parents=True)
    job = {"stage": "sft", "options": {}, "recipe": recipe.model_dump(mode="json"), "recipe_path": str(path),
           "run_root": str(run_root), "stage_name": stage, "world_size": 1, "info": {}}  # fmt: skip
    (stage_dir / "job.json").write_text(json.dumps(job))
    return stage_dir


def train(step: int, tokens_per_s: float) -> dict[str, Any]:
    return {"event": "train", "step": step, "epoch": (step - 1) // 4, "lr": 1e-3 * step, "tokens": 100 + step,
            "tokens_per_s": tokens_per_s, "skipped_steps": 0, "loss": 2.0 / step, "td_loss": 0.5 / step}  # fmt: skip


def evaluation(step: int) -> dict[str, Any]:
    return {"event": "eval", "step": step, "val_loss": 3.0 - 0.1 * step, "rouge_l": 10.0 + step,
            "rouge_l@release": 11.0 + step, "best": True, "best_per_protocol": {"release": True}}  # fmt: skip


def first_attempt(stage_dir: Path) -> MetricsLog:
    """Steps 1..6, a checkpoint at 4, validation at 0, 4 and 6; then killed (no final record)."""
    log = MetricsLog(stage_dir / "metrics.jsonl", enabled=True)
    log.write(event="start", total_steps=8, world_size=1)
    log.write(**evaluation(0))
    for step in range(1, 7):
        log.write(**train(step, tokens_per_s=1000.0 + step))
        if step in (4, 6):
            log.write(**evaluation(step))
        if step == 4:
            log.write(event="checkpoint", step=4, tag="step4", reason="schedule")
    return log


def resumed(stage_dir: Path) -> MetricsLog:
    """What a resume from the step-4 checkpoint writes: steps 5..8 again (same losses, other timings)."""
    log = MetricsLog(stage_dir / "metrics.jsonl", enabled=True)
    log.write(event="start", total_steps=8, world_size=1)
    log.truncate_after(4)
    for step in range(5, 9):
        log.write(**train(step, tokens_per_s=2000.0 + step))
        if step in (6, 8):
            log.write(**evaluation(step))
    log.write(event="checkpoint", step=8, tag="step8", reason="schedule")
    log.write(
        event="end",
        best_step=8,
        select="rouge_l",
        best_score=18.0,
        best_per_protocol={"release": {"best_score": 19.0, "best_step": 8}},
    )
    return log


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> Path:
    """One run directory for the module, so its MLflow store (sqlite, made on first use) is made once."""
    return tmp_path_factory.mktemp("shared") / "runs/smoke"


def test_three_trackers_hold_metrics_jsonl_across_a_kill_and_resume(shared_run):
    run_root = shared_run  # MLflow: the default store, sqlite in the run directory
    stage_dir = make_stage(run_root, "student_sft", ALL, "tracking.wandb.mode=offline")
    killed = first_attempt(stage_dir)
    before = expected_scalars(killed.records())
    killed.close()  # the process ends (in-process: the W&B run must end before the same id is resumed)
    resumed(stage_dir)
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    want = expected_scalars(records)
    assert sorted(want["train/loss"]) == list(range(1, 9)) and sorted(want["eval/rouge_l"]) == [0, 4, 6, 8]
    # what a tracker that keeps the first value of a step shows: the first attempt's timings for 5 and 6
    first_kept = {
        tag: {**steps, **{s: v for s, v in before.get(tag, {}).items() if s > 4}} for tag, steps in want.items()
    }
    final = {"final/best_step": 8.0, "final/best_score": 18.0, "final/best_per_protocol/release/best_score": 19.0,
             "final/best_per_protocol/release/best_step": 8.0}  # fmt: skip

    # TensorBoard: exactly metrics.jsonl (the reopened writer purges and rewrites)
    tensorboard = tensorboard_scalars(stage_dir / "tensorboard")
    assert_close(without_final(tensorboard), want)
    assert {k: v[8] for k, v in tensorboard.items() if k.startswith("final/")} == final
    assert tensorboard["train/tokens_per_s"][5] == pytest.approx(2005.0)  # the replayed value

    # MLflow: one value per step; steps it held keep their first value
    state = json.loads((stage_dir / "trackers.json").read_text())
    mlflow, run = mlflow_scalars(run_root, state["mlflow"]["run_id"])
    assert_close(without_final(mlflow), first_kept)
    assert {k: v[8] for k, v in mlflow.items() if k.startswith("final/")} == final
    assert run.info.run_name == "smoke/student_sft" and run.info.status == "FINISHED"
    assert run.data.params["name"] == "smoke" and run.data.params["stages.student_sft.lr"] == "0.003"
    assert run.data.tags["bdctl.stage"] == "student_sft"

    # W&B: two offline run files of one run id; the resumed one holds the whole of metrics.jsonl
    files = [wandb_file(d) for d in sorted((stage_dir / "wandb").glob("offline-run-*"))]
    assert len(files) == 2 and {f["id"] for f in files} == {state["wandb"]["run_id"]}
    assert {f["name"] for f in files} == {"smoke/student_sft"}
    assert_close(wandb_scalars(files[0]["history"]), before)
    assert_close(wandb_scalars(files[1]["history"]), want)
    assert_close(wandb_scalars(wandb_synced(files)), first_kept)
    assert files[1]["config"]["name"] == "smoke" and files[1]["config"]["stages"]["student_sft"]["lr"] == 0.003
    assert {k: v for k, v in files[1]["summary"].items() if k.startswith("final/")} == final


def test_a_tracker_added_on_resume_gets_the_whole_history(tmp_path):
    run_root = tmp_path / "runs/smoke"
    stage_dir = make_stage(run_root, "student_sft")  # no trackers at first
    first_attempt(stage_dir).close()
    assert not (stage_dir / "tensorboard").exists()
    job = json.loads((stage_dir / "job.json").read_text())
    job["recipe"]["tracking"]["report_to"] = ["tensorboard"]  # `--report-to tensorboard` on the rerun
    (stage_dir / "job.json").write_text(json.dumps(job))
    resumed(stage_dir)
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert_close(without_final(tensorboard_scalars(stage_dir / "tensorboard")), expected_scalars(records))


def test_a_tracker_that_is_not_installed_is_one_line_with_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from bdctl.trackers import check_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"tracking.report_to: wandb is not installed; .*pip install 'bdctl\[wandb\]'"):
        check_installed(["tensorboard", "wandb"])
    stage_dir = make_stage(tmp_path / "runs/smoke", "student_sft", "tracking.report_to=[wandb]")
    log = MetricsLog(stage_dir / "metrics.jsonl", enabled=True)
    with pytest.raises(UserError, match="pip install 'bdctl\\[wandb\\]'"):
        log.write(**train(1, 1.0))


def test_off_rank_zero_and_without_a_job_nothing_is_tracked(tmp_path):
    stage_dir = make_stage(tmp_path / "runs/smoke", "student_sft", "tracking.report_to=[tensorboard]")
    MetricsLog(stage_dir / "metrics.jsonl", enabled=False).write(**train(1, 1.0))  # rank 1
    assert not (stage_dir / "tensorboard").exists() and not (stage_dir / "metrics.jsonl").exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    MetricsLog(bare / "metrics.jsonl", enabled=True).write(**train(1, 1.0))  # no job.json: metrics only
    assert [p.name for p in bare.iterdir()] == ["metrics.jsonl"]


def test_report_to_becomes_a_set_override():
    from bdctl.cli.common import report_to_override

    assert (
        report_to_override(["tensorboard,wandb", "mlflow", "wandb"]) == "tracking.report_to=[tensorboard,wandb,mlflow]"
    )
    assert report_to_override(["none"]) == "tracking.report_to=[]"
    with pytest.raises(UserError, match="--report-to: unknown tracker 'neptune'"):
        report_to_override(["neptune"])


# --------------------------------------------------------------------------- end to end


def wait_for_checkpoint_and(process: subprocess.Popen, metrics: Path, step: int, timeout: float = 600) -> None:
    """Until metrics.jsonl records a checkpoint and training step `step`."""
    deadline = time.time() + timeout
    while True:
        assert process.poll() is None, "the first run ended before it was killed"
        assert time.time() < deadline, "the first run did not get far enough in time"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        records = [json.loads(line) for line in lines if line.endswith("}")]
        if any(r["event"] == "checkpoint" for r in records) and any(r.get("step", 0) >= step for r in records):
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_sft_with_three_trackers_killed_and_resumed(tmp_path, shared_run, monkeypatch):
    """`bdctl sft` reporting to all three, SIGKILLed after a checkpoint, run again: the trackers hold
    metrics.jsonl (TensorBoard exactly; W&B's resumed run file exactly; MLflow one value per step)."""
    settings = ["--model", "student", "--report-to", "tensorboard,wandb,mlflow", "--set", "tracking.wandb.mode=offline",
                "--set", f"tracking.mlflow.tracking_uri=sqlite:///{shared_run / 'mlflow.db'}",
                "--set", "stages.student_sft.max_steps=8", "--set", "stages.student_sft.checkpoint_every=4",
                "--set", "stages.student_sft.eval_every=4"]  # fmt: skip
    stage_dir = tmp_path / "runs/smoke/student_sft"
    metrics = stage_dir / "metrics.jsonl"
    # the in-process tests' W&B service (its address in WANDB_SERVICE) would outlive the killed
    # command and still hold its run id; a user's killed command takes its own service with it
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bdctl", "sft", str(RECIPES / "smoke.yaml"), *settings], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_checkpoint_and(process, metrics, step=5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its rank, no chance to clean up
        process.communicate()
    result = run_cli("sft", str(RECIPES / "smoke.yaml"), *settings, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr + result.stdout

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    want = expected_scalars(records)
    assert sorted(want["train/loss"]) == list(range(1, 9))
    assert_close(without_final(tensorboard_scalars(stage_dir / "tensorboard")), want)

    state = json.loads((stage_dir / "trackers.json").read_text())
    mlflow, run = mlflow_scalars(shared_run, state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    # steps 5.. were trained twice: the same losses, lr and scores (exact resume); MLflow kept the first timings
    assert_close({k: v for k, v in without_final(mlflow).items() if k not in TIMING},
                 {k: v for k, v in want.items() if k not in TIMING}, rel=1e-5)  # fmt: skip
    assert sorted(mlflow["train/tokens_per_s"]) == list(range(1, 9))

    files = [wandb_file(d) for d in sorted((stage_dir / "wandb").glob("offline-run-*"))]
    # One run, two offline files. The killed command's file may not hold even its run record: W&B
    # writes offline files in the background, and SIGKILL can come before the first write.
    assert len(files) == 2 and files[-1]["id"] == state["wandb"]["run_id"]
    assert files[0].get("id", files[-1]["id"]) == files[-1]["id"]
    assert_close(wandb_scalars(files[-1]["history"]), want)
    assert files[-1]["summary"]["final/best_step"] == records[-1]["best_step"]

    # `bdctl runs` on this real run (in-process)
    from typer.testing import CliRunner

    from bdctl.cli import app

    listed = CliRunner().invoke(app, ["runs", str(tmp_path / "runs"), "--json"])
    (stage,) = json.loads(listed.output)[0]["stages"]
    assert stage["stage"] == "student_sft" and stage["state"] == "finished" and stage["step"] == 8
    assert stage["score"] == {"name": "val_loss", "value": records[-1]["best_score"], "step": records[-1]["best_step"]}


def test_report_to_names_an_uninstalled_tracker_before_anything_runs(tmp_path, monkeypatch):
    """`plan` (every job command, --dry-run included) checks the trackers before any rank starts."""
    import importlib.util

    from bdctl.launch import LaunchOptions
    from bdctl.submit import plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"mlflow is not installed; install it with: pip install 'bdctl\[mlflow\]'"):
        plan("sft", str(RECIPES / "smoke.yaml"), ["tracking.report_to=[mlflow]"], {"model": "student"}, LaunchOptions())


def test_generate_batches_are_numbered_as_steps(tmp_path):
    """generate's records have no step: its batches are numbered 1, 2, ... and `done` gives the final numbers."""
    stage_dir = make_stage(tmp_path / "runs/smoke", "generate", "tracking.report_to=[tensorboard]")
    log = MetricsLog(stage_dir / "metrics.jsonl", enabled=True)
    log.write(event="start", mode="generate", world_size=1, sequences=6)
    for rows in (2, 2, 2):
        log.write(event="batch", rows=rows, tokens=10 * rows, seconds=0.5, tokens_per_s=40.0 * rows)
    log.write(event="done", seconds=1.5, sequences=6, tokens=60, bytes_per_token=12.5)
    scalars = tensorboard_scalars(stage_dir / "tensorboard")
    assert scalars["batch/tokens_per_s"] == {1: 80.0, 2: 80.0, 3: 80.0}
    assert scalars["final/tokens"] == {3: 60.0} and scalars["final/bytes_per_token"] == {3: 12.5}
