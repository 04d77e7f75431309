"""The stages a job runs, and the interface every stage module provides.

A stage is a module with three functions (`Stage`): where its output goes, the checks the
launching process runs before any rank starts, and the work every rank does. `bdctl.submit`
drives them the same way for every stage; a stage whose directory is not all-or-nothing (eval and
judge keep finished results across commands) adds the optional hooks of `Hooks`.

The registry maps a stage's name to its module. It names modules rather than importing them, so
that `bdctl --help` and `--dry-run` do not pay for torch (training stages import it at the top);
`tests/unit/test_stages.py` checks that every module named here is a `Stage`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    from bdctl.job import Job

Log = Callable[[str], None]


@runtime_checkable
class Stage(Protocol):
    """What `bdctl.submit` and `bdctl.worker` call on every stage module."""

    def stage_dir(self, options: dict[str, Any]) -> str:
        """The stage directory under the run directory, e.g. "student_sft" or "distill/bd"."""
        ...

    def prepare(self, job: Job, log: Log = print) -> None:
        """Launching process, node 0, under the stage's lock: every check a user can fail, and the
        facts the ranks need, into `job.info`."""
        ...

    def run(self, job: Job, rank: int, world: int) -> None:
        """Every rank (or the launching process for a single-process stage): the work."""
        ...


class Hooks(Protocol):
    """Optional functions a stage module may define; `bdctl.submit` has a default for each.

    - resumable(job) -> str | None: what an unfinished directory holds that a rerun continues
      from besides checkpoints (generate's cache shards); default: nothing.
    - deepspeed_preview(job) -> dict: the DeepSpeed config `--dry-run` prints.
    - begin(job, force, log) -> bool: node 0, after prepare, under the lock: bring the directory
      to the state this command starts from and say whether any rank has work to do. Default:
      resume from the latest checkpoint (or `resumable`), else start over.
    - finish_without_ranks(job): the stage's results when `begin` found nothing for the ranks.
    - also_locks(job) -> list[Path]: other stage directories this command writes (judge writes
      missing answers into eval/).
    - run_in_process(job, log): the stage runs here, in the launching process on node 0 only
      (judge: one client of an HTTP endpoint, one writer of the verdict cache), never on ranks.
    REUSES_FINISHED = True: a finished directory is run again (its command reuses what is done)
    instead of being skipped with "already complete".
    """

    def begin(self, job: Job, force: bool, log: Log) -> bool: ...
    def finish_without_ranks(self, job: Job) -> None: ...
    def also_locks(self, job: Job) -> list[Path]: ...
    def run_in_process(self, job: Job, log: Log) -> None: ...


STAGES = {
    "sft": "bdctl.stages.sft",
    "generate": "bdctl.stages.generate",
    "eval": "bdctl.stages.evaluate",
    "judge": "bdctl.stages.judge",
    "distill": "bdctl.stages.distill",
    "minillm": "bdctl.stages.minillm",  # `bdctl distill --method minillm`: runs/<name>/distill/minillm
}


def stage_module(name: str) -> Stage:
    """The module of stage `name`, checked against `Stage`."""
    module = importlib.import_module(STAGES[name])
    if not isinstance(module, Stage):
        raise TypeError(f"{STAGES[name]} lacks part of the Stage interface (stage_dir, prepare, run)")
    return cast(Stage, module)
