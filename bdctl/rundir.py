"""The run directory: one predictable layout per recipe, and the "write, then mark complete" rule.

    runs/<name>/
      recipe.yaml              the resolved recipe of the latest command that succeeded
      tokenizer/               the shared tokenizer (trained here for tiny recipes)
      data/                    train/valid/test.jsonl, split.json, MANIFEST.json
      <stage>/                 teacher_sft, student_sft, generate, distill/<method>, eval, judge
        recipe.yaml job.json   what this stage ran with
        metrics.jsonl logs/    per-step metrics; one log file per rank
        checkpoints/           DeepSpeed checkpoints
        export/                the chosen weights as a Hugging Face directory
        MANIFEST.json          written last: the stage is complete only when it exists
        LOCK                   while a command writes the stage: who (host, pid, command)

Files are written to a temporary name and renamed, so a reader never sees half a file, and a
directory without MANIFEST.json is never taken for finished work. One command writes a stage
directory at a time (`stage_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bdctl.errors import UserError

# The file in a stage directory that asks its ranks to checkpoint and stop (bdctl.launch writes
# it on SIGTERM / SIGUSR1; bdctl.training polls it).
PREEMPT = "PREEMPT"
MANIFEST = "MANIFEST.json"
LOCK = "LOCK"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place, replacing an older one.

    Two renames, so a kill between them leaves only `.<name>.old`; `recover_dir` puts it back.
    """
    recover_dir(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a replace_dir that was killed between its two renames."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        old.rename(final)


def mark_complete(directory: Path, **payload: Any) -> None:
    """Write the manifest that marks `directory` finished; call it after every other file."""
    write_json_atomic(directory / MANIFEST, {"complete": True, "finished_at": time.time(), **payload})


def manifest(directory: Path) -> dict | None:
    """The manifest of a finished directory, or None while it is not finished."""
    path = directory / MANIFEST
    return read_json(path) if path.is_file() else None


def clear_dir(directory: Path) -> None:
    """Remove everything in `directory` but its lock (held by the command that clears it)."""
    for path in directory.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# --------------------------------------------------------------------------- one writer per stage

# Directories whose lock this process holds.
_HELD: set[Path] = set()


@contextlib.contextmanager
def stage_lock(directory: Path) -> Iterator[None]:
    """Make this process the one writer of `directory` while the block runs, or stop with one line.

    Two commands on one stage directory corrupt each other (one deletes the other's logs, both
    append to one metrics file, one rotates away the checkpoint the other just reported), so a
    command takes the directory's LOCK file before it changes anything there. The file names the
    holder: host, pid, the process's start time and its command line. A lock whose holder is gone
    (on this host, no live process with that pid and start time: it was killed) is stale and taken
    over. A holder on another host cannot be checked from here; the message names the file to
    delete once that command is known to be gone. The lock is created with O_EXCL, which is
    atomic on local and network file systems alike (unlike flock, which some cluster file systems
    lack). Leaving the block removes the file, and the directories the lock created if the
    command left nothing in them; a killed holder's file is what the stale check is for. Taking it
    again in the same process (stages run in-process by tests) is a no-op.
    """
    given, directory = directory, directory.resolve()
    if directory in _HELD:
        yield
        return
    created = []  # the directories made for the lock, deepest first
    for parent in [directory, *directory.parents]:
        if parent.exists():
            break
        created.append(parent)
    make_writable_dir(given)
    _acquire(directory / LOCK)
    _HELD.add(directory)
    try:
        yield
    finally:
        _HELD.discard(directory)
        (directory / LOCK).unlink(missing_ok=True)
        for made in created:
            try:
                made.rmdir()
            except OSError:  # not empty: the command wrote there
                break


def make_writable_dir(directory: Path) -> None:
    """Create `directory` (and its parents) where this process can write, or stop with one line
    naming the path at fault: a parent that is a file, or a directory without write permission."""
    for parent in [directory, *directory.parents]:
        if parent.is_dir():
            break
        if parent.exists() or parent.is_symlink():
            raise UserError(
                f"{directory}: cannot create this directory: {parent} is a file, not a directory "
                "(choose another run_dir, or move the file)"
            )
    else:
        parent = Path(".")
    target = parent if not directory.is_dir() else directory
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"{target}: no permission to write here (needed for {directory}; choose another run_dir)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or full file system
        raise UserError(f"{directory}: cannot create this directory ({exc.strerror or exc})") from None


def _acquire(path: Path) -> None:
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
            "command": shlex.join(["bdctl", *sys.argv[1:]])}  # fmt: skip
    for _ in range(3):  # a stale lock is taken over, then created afresh
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is not None and not _is_stale(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started") or 0))
                raise UserError(
                    f"{path.parent} is in use by another command: `{holder.get('command')}` (pid {holder.get('pid')} "
                    f"on {holder.get('host')}, since {since}); one command per stage directory at a time: wait for "
                    f"it to finish (or delete {path} if that process is gone)"
                ) from None
            _take_over(path, holder)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(mine) + "\n")
        return
    raise UserError(f"{path}: could not take the lock (other commands keep taking it); try again")


def _start_time(pid: int) -> float | None:
    """When process `pid` started (None if there is none): with the pid, it tells a live holder
    from an unrelated process that reuses a dead holder's pid. psutil comes with DeepSpeed."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _read_lock(path: Path) -> dict | None:
    """The holder a lock file names; None if it is gone, unreadable, or still being written."""
    for _ in range(20):  # O_EXCL creates the file empty: its holder writes the line right after
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            time.sleep(0.05)
            continue
        return holder if isinstance(holder, dict) else {}
    return {}  # never became readable: a holder killed between creating and writing it


def _is_stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return not holder  # an empty or damaged file, whoever wrote it, holds nothing
    started = _start_time(holder["pid"])
    return started is None or (holder.get("started") is not None and abs(started - holder["started"]) > 1.0)


def _take_over(path: Path, holder: dict | None) -> None:
    """Remove a stale lock. Only processes on the holder's host can find it stale; a host-local
    file lock makes them take turns, so that two of them cannot both remove the stale file and
    one then remove the other's new one."""
    import fcntl

    if holder is None:
        return  # gone already: just try to create it
    guard = Path(tempfile.gettempdir()) / f"bdctl-lock-{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    with open(guard, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _read_lock(path) == holder:  # not taken over by another process meanwhile
            path.unlink(missing_ok=True)


class RunDir:
    """Paths of one recipe's run directory."""

    @classmethod
    def of(cls, recipe) -> RunDir:
        """The recipe's run directory: its run_dir, else runs/<name>."""
        return cls(recipe.run_dir or f"runs/{recipe.name}")

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def built_model(self, role: str) -> Path:
        """The Hugging Face directory a gguf or from_teacher model of `role` (teacher, student,
        tokenizer) is built into, once, before the first stage that needs it."""
        return self.root / "models" / role

    def stage(self, name: str) -> Path:
        """A stage directory: `teacher_sft`, `generate`, `distill/bd`, ..."""
        return self.root / name

    def export(self, stage: str) -> Path:
        return self.stage(stage) / "export"


def stage_command(stage_dir: str, recipe_path: str) -> str:
    """The command that produces a stage directory (the one place for this map; `pipeline.stages`
    writes the same commands with RECIPE)."""
    if stage_dir.endswith("_sft"):
        return f"bdctl sft {recipe_path} --model {stage_dir.removesuffix('_sft')}"
    if stage_dir.startswith("distill/"):
        name = stage_dir.removeprefix("distill/")
        method = name in ("bd", "kd", "seqkd", "minillm")
        return f"bdctl distill {recipe_path} " + (f"--method {name}" if method else f"--ablation {name}")
    if stage_dir.startswith("score_"):
        return f"bdctl generate {recipe_path} --score {stage_dir.removeprefix('score_')}"
    if stage_dir.startswith("generate-"):  # a D* variant (stages.generate.variants)
        return f"bdctl generate {recipe_path} --variant {stage_dir.removeprefix('generate-')}"
    return f"bdctl {stage_dir} {recipe_path}"
