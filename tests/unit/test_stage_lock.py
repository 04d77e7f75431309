"""One writer per stage directory: the LOCK file, its refusal, stale locks and their take-over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdctl.errors import UserError
from bdctl.rundir import LOCK, clear_dir, stage_lock

ROOT = Path(__file__).resolve().parents[2]


def holder(directory: Path, seconds: float = 60) -> subprocess.Popen:
    """Another process that takes the lock of `directory`, says so, then sleeps."""
    code = (
        "import sys, time; from pathlib import Path; from bdctl.rundir import stage_lock\n"
        f"with stage_lock(Path({str(directory)!r})): print('held', flush=True); time.sleep({seconds})"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", code, "sft", "x.yaml"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_until_the_holder_is_gone(tmp_path: Path) -> None:
    stage = tmp_path / "runs/x/teacher_sft"
    other = holder(stage)
    try:
        recorded = json.loads((stage / LOCK).read_text())
        assert recorded["pid"] == other.pid and recorded["host"] == socket.gethostname()
        assert recorded["command"] == "bdctl sft x.yaml"
        with pytest.raises(UserError) as refused, stage_lock(stage):
            pass
        message = str(refused.value)
        assert (
            f"{stage} is in use by another command: `bdctl sft x.yaml` (pid {other.pid} on {socket.gethostname()}"
            in message
        )
        assert "one command per stage directory at a time" in message and "\n" not in message
    finally:
        other.send_signal(signal.SIGKILL)  # no chance to remove its lock
        other.wait()
    assert (stage / LOCK).exists()  # left behind by the killed holder: stale
    with stage_lock(stage):
        assert json.loads((stage / LOCK).read_text())["pid"] == os.getpid()
        with stage_lock(stage):  # the holder may take it again
            pass
        assert (stage / LOCK).exists()  # still held: the outer block has not ended
    assert not (stage / LOCK).exists()


def test_leaving_the_block_removes_the_lock_and_what_it_created(tmp_path: Path) -> None:
    other = holder(tmp_path / "runs/x/distill/bd", seconds=0)
    assert other.wait(timeout=30) == 0
    assert list(tmp_path.iterdir()) == []  # a command that wrote nothing leaves nothing
    with pytest.raises(RuntimeError), stage_lock(tmp_path / "runs/x/distill/kd"):
        (tmp_path / "runs/x/distill/kd/metrics.jsonl").write_text("{}\n")
        raise RuntimeError("the command failed")
    assert [p.name for p in (tmp_path / "runs/x/distill/kd").iterdir()] == ["metrics.jsonl"]


def test_a_reused_pid_does_not_hold_a_dead_holders_lock(tmp_path: Path) -> None:
    # A live process (this one's parent) with a start time that is not the recorded one.
    stale = {"host": socket.gethostname(), "pid": os.getppid(), "started": time.time() - 10**6, "command": "bdctl x"}
    (tmp_path / LOCK).write_text(json.dumps(stale))
    with stage_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_a_holder_on_another_host_cannot_be_checked_and_is_respected(tmp_path: Path) -> None:
    remote = {"host": "elsewhere.invalid", "pid": 1, "started": 0.0, "command": "bdctl eval x"}
    (tmp_path / LOCK).write_text(json.dumps(remote))
    with pytest.raises(
        UserError, match=rf"pid 1 on elsewhere.invalid.*delete {tmp_path / LOCK} if that process is gone"
    ):
        with stage_lock(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK).read_text()) == remote  # not ours to remove


def test_an_empty_lock_file_holds_nothing(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text("")  # a holder killed between creating the file and writing it
    with stage_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_clearing_a_stage_keeps_its_lock(tmp_path: Path) -> None:
    (tmp_path / "checkpoints/step4").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / LOCK).write_text("{}")
    clear_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [LOCK]
