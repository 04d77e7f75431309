"""A full disk or quota (ENOSPC / EDQUOT) wherever bdctl writes ends in one line naming the
directory and the space the step needed, exit 2, and leaves nothing that looks complete.

Two ways: a real, small tmpfs (we mount one when the test may: root and `mount` allowed; skipped
with the reason otherwise), and injected errors for the forms each library reports a full disk in.
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bdctl.errors import UserError, is_disk_full, space_for, user_error_from
from bdctl.rundir import write_text_atomic
from bdctl.tracking import MetricsLog, read_metrics


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted at tmp_path/disk (unmounted afterwards)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True
        )
    except OSError as exc:
        pytest.skip(f"cannot mount a small tmpfs to fill: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def one_line(error: pytest.ExceptionInfo[UserError]) -> str:
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 2
    return message


def test_an_atomic_write_on_a_full_disk_names_the_directory_and_leaves_nothing(small_disk: Path) -> None:
    target = small_disk / "runs/x/data/train.jsonl"
    with pytest.raises(UserError) as full:
        write_text_atomic(target, "x" * 400_000)
    message = one_line(full)
    assert message.startswith(f"{target.parent}: no space left on the device (or quota) writing train.jsonl")
    assert "it needs about 390.6 KiB" in message and "free" in message
    assert list(target.parent.iterdir()) == []  # neither the file nor its temporary


def test_metrics_on_a_full_disk(small_disk: Path) -> None:
    path = small_disk / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    log.write(event="start")
    (small_disk / "filler").write_bytes(b"\0" * (256 * 1024 - 8192))  # what the disk has left
    with pytest.raises(UserError) as full:
        for step in range(10_000):
            log.write(event="train", step=step, padding="y" * 200)
    assert one_line(full).startswith(f"{small_disk}: no space left on the device (or quota) writing metrics.jsonl")
    assert read_metrics(path)[0]["event"] == "start"


def test_a_cache_shard_on_a_full_disk_leaves_no_shard(small_disk: Path) -> None:
    from bdctl.cache import CacheWriter, visible_shards
    from tests.unit.test_cache import K, P, fake_example

    rng = np.random.default_rng(0)
    cache = small_disk / "generate/cache"
    writer = CacheWriter(cache, 0, top_p=P, max_k=K)
    for prompt_id in range(200):
        tokens, capture = fake_example(rng, 64)
        writer.add(prompt_id=prompt_id, sample_index=0, seed=1, tokens=tokens, finish_reason="eos", capture=capture)
    with pytest.raises(UserError) as full:
        writer.flush()
    message = one_line(full)
    assert message.startswith(f"{cache}: no space left on the device (or quota) writing cache shard w0000-000000")
    assert "it needs about" in message
    assert visible_shards(cache) == [] and list(cache.iterdir()) == []  # the partial data files are gone


def test_torch_and_safetensors_writes_on_a_full_disk(small_disk: Path) -> None:
    """torch.save loses the errno ("unexpected pos ..."), safetensors says it in words: both are
    recognised as a full disk inside a step that writes."""
    import torch
    from safetensors.torch import save_file

    weights = {"w": torch.zeros(200_000)}
    with pytest.raises(UserError) as full:
        with space_for(small_disk / "checkpoints/step-1", "checkpoint step-1", 800_000):
            torch.save(weights, small_disk / "model.pt")
    assert "writing checkpoint step-1: it needs about 781.2 KiB" in one_line(full)
    (small_disk / "model.pt").unlink()
    with pytest.raises(UserError) as full:
        with space_for(small_disk / "export", "the export export", 800_000):
            save_file(weights, str(small_disk / "model.safetensors"))
    export = small_disk / "export"
    assert one_line(full).startswith(f"{export}: no space left on the device (or quota) writing the export")


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["ENOSPC", "EDQUOT", "words"],
)
def test_injected_disk_full_errors_become_one_line(tmp_path: Path, failure: Exception) -> None:
    with pytest.raises(UserError) as full:
        with space_for(tmp_path / "distill/bd/checkpoints", "checkpoint step-5", 3 * 2**30):
            raise failure
    message = one_line(full)
    assert message.startswith(f"{tmp_path / 'distill/bd/checkpoints'}: no space left on the device (or quota)")
    assert "writing checkpoint step-5: it needs about 3.0 GiB" in message
    # Outside a guarded step (no directory known), still one line and exit 2, never a traceback.
    fallback = user_error_from(failure)
    assert fallback is not None and fallback.exit_code == 2 and "no space left" in str(fallback)


def test_an_injected_full_disk_in_a_real_write_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The atomic-write helper every manifest, split and job file goes through, with os.replace
    failing as a full disk would: one line, and no temporary file left behind."""
    import os

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as raised:
        write_text_atomic(tmp_path / "MANIFEST.json", json.dumps({"complete": True}))
    assert one_line(raised).startswith(f"{tmp_path}: no space left on the device (or quota) writing MANIFEST.json")
    assert list(tmp_path.iterdir()) == []


def test_other_failures_are_not_mistaken_for_a_full_disk(tmp_path: Path) -> None:
    assert not is_disk_full(ValueError("bad value"))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the disk is not full: a bug, kept as is
        with space_for(tmp_path, "checkpoint", 10):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(PermissionError):
        with space_for(tmp_path, "checkpoint", 10):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))


def test_the_cli_on_a_full_disk_is_one_line_and_exit_2(small_disk: Path) -> None:
    """Through the real CLI (in-process): the smoke recipe's data stage on a 256 KiB disk,
    already nearly full."""
    from typer.testing import CliRunner

    from bdctl.cli import app
    from tests.conftest import RECIPES

    (small_disk / "filler").write_bytes(b"\0" * (200 * 1024))
    run = small_disk / "run"
    result = CliRunner().invoke(
        app, ["sft", str(RECIPES / "smoke.yaml"), "--model", "teacher", "--set", f"run_dir={run}"],
        env={"COLUMNS": "400", "NO_COLOR": "1"}, prog_name="bdctl",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "no space left on the device (or quota) writing" in lines[-1]
    assert "it needs about" in lines[-1] and "Traceback" not in result.output
    assert not list(run.rglob("MANIFEST.json"))  # nothing looks complete


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """The temporary file of an atomic write is made by mkstemp, mode 0600 whatever the umask:
    a run directory shared with a group could not read its own manifests. Now 0666 less the umask,
    like any other file."""
    import os

    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "MANIFEST.json", "{}\n")
        reference = tmp_path / "plain"
        reference.write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "MANIFEST.json").stat().st_mode & 0o777 == mode == reference.stat().st_mode & 0o777
