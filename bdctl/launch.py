"""Start a job's ranks: in this process for one rank, through torchrun for several.

    one rank      run the stage here (no extra interpreter start-up)
    N ranks       python -m bdctl.launch --nproc_per_node N ... -m bdctl.worker JOB.json

`python -m bdctl.launch` is torchrun itself (torch.distributed.run) with one change: when a rank
fails it exits with that rank's code instead of printing torchrun's own traceback, so the CLI can
show the failing rank's one-line error. torchrun's elastic agent stops the surviving ranks when
one dies, so a failure never leaves the job hanging.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bdctl.errors import UserError


@dataclass
class LaunchOptions:
    """How many ranks to start and where (the CLI's launcher options)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    dry_run: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def launcher_command(job_file: Path, options: LaunchOptions) -> list[str]:
    from bdctl.engine import free_port

    port = options.master_port or free_port()
    return [
        sys.executable, "-m", "bdctl.launch",
        "--nproc_per_node", str(options.nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "bdctl.worker", str(job_file),
    ]  # fmt: skip


def launch(job_file: Path, options: LaunchOptions) -> None:
    """Run the job on `options.nproc` ranks; a failure raises UserError with the rank's message."""
    if options.nproc == 1:
        from bdctl.worker import run_job

        run_job(job_file)
        return
    command = launcher_command(job_file, options)
    env = dict(os.environ)
    # torchrun would set 1 thread per rank and print a banner about it; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nproc)))
    with forward_preemption(job_file.parent / "PREEMPT"):
        returncode = subprocess.run(command, env=env).returncode
    if returncode != 0:
        raise UserError(_failure_message(job_file.parent, returncode), exit_code=returncode)


@contextlib.contextmanager
def forward_preemption(flag_file: Path):
    """While ranks run in child processes, SIGTERM / SIGUSR1 to this process become a PREEMPT
    file the ranks look for at every step boundary (they then checkpoint and exit 75)."""

    def handle(signum, frame):
        flag_file.touch()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def dry_run_text(job_file: Path, options: LaunchOptions) -> str:
    if options.nproc == 1:
        return f"in-process: {shlex.join([sys.executable, '-m', 'bdctl.worker', str(job_file)])}"
    return shlex.join(launcher_command(job_file, options))


def _failure_message(stage_dir: Path, code: int) -> str:
    errors = sorted(stage_dir.glob("logs/error-rank*.txt"))
    if errors:
        return errors[0].read_text().strip().splitlines()[0]
    return f"the job failed (exit code {code}); the ranks' output is above, logs in {stage_dir / 'logs'}"


def _torchrun(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        # The first rank to fail says why; torchrun then stops the others with SIGTERM.
        _, failure = exc.get_first_failure()
        code = failure.exitcode or 1
        return code if code > 0 else 128 - code  # killed by a signal: exit as a shell would
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(sys.argv[1:]))
