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
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdctl.environment import first_host as first_host  # re-exported: launch parses node lists too
from bdctl.environment import slurm_layout, stray_rank_variables
from bdctl.errors import UserError, decode_utf8
from bdctl.rundir import PREEMPT  # the flag file in a stage directory that asks its ranks to stop


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
    # Seconds each node of a multi-node job waits for the others at the master before it stops
    # with a message (torchrun's own rendezvous waits 600 s in silence).
    rendezvous_timeout: int = 600

    def __post_init__(self) -> None:
        """Options that cannot work together stop here, in one line: a node rank beyond the nodes
        would wait forever for a rendezvous that never completes; a port outside 1..65535 would
        surface as a launcher traceback."""
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise UserError(f"--master-port {self.master_port}: expected a port number from 1 to 65535")
        if self.rendezvous_timeout < 1:
            raise UserError(f"--rendezvous-timeout {self.rendezvous_timeout}: expected a number of seconds >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            last = self.nnodes - 1
            raise UserError(
                f"--node-rank {self.node_rank}: expected a node rank from 0 to {last} (--nnodes {self.nnodes})"
            )

    def as_args(self) -> list[str]:
        """These options as command-line arguments again (for commands started on the user's behalf)."""
        args = []
        for name, default in (("nproc", 1), ("nnodes", 1), ("node_rank", 0), ("master_addr", "127.0.0.1"),
                              ("master_port", None), ("hostfile", None), ("include", None),
                              ("exclude", None), ("rendezvous_timeout", 600)):  # fmt: skip
            value = getattr(self, name)
            if value != default:
                args += [f"--{name.replace('_', '-')}", str(value)]
        return args

    @property
    def mode(self) -> str:
        """slurm (this process is one srun task), hostfile (DeepSpeed's launcher over ssh),
        torchrun (local ranks, or this node of a hand-started multi-node job), or in-process."""
        if slurm_environment() is not None:
            return "slurm"
        if self.hostfile:
            return "hostfile"
        if self.nproc * self.nnodes > 1:
            return "torchrun"
        return "in-process"

    @property
    def world_size(self) -> int:
        if self.mode == "slurm":
            return _slurm_task()["WORLD_SIZE"]
        if self.mode == "hostfile":
            return sum(len(slots) for slots in hostfile_resources(self).values())
        return self.nproc * self.nnodes

    @property
    def is_primary(self) -> bool:
        """Whether this process prepares the data and writes the job (node 0 / SLURM task 0)."""
        if self.mode == "slurm":
            return _slurm_task()["RANK"] == 0
        return self.node_rank == 0


# --------------------------------------------------------------------------- SLURM


def slurm_environment() -> dict[str, Any] | None:
    """Rank layout of an srun task with several tasks, or None outside one (read and checked by
    `bdctl.environment.slurm_layout`, the one place that reads the environment)."""
    return slurm_layout()


def _slurm_task() -> dict[str, Any]:
    """`slurm_environment()` where the launch mode is "slurm", so srun started this process."""
    env = slurm_environment()
    if env is None:
        raise RuntimeError("launch mode slurm outside a multi-task srun step")
    return env


# --------------------------------------------------------------------------- hostfile


def read_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed's hostfile: one 'hostname slots=N' per line, '#' comments; errors name the line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: hostfile not found")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(decode_utf8(file.read_bytes(), path).splitlines(), start=1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise UserError(f"{path}:{number}: expected 'hostname slots=N' with N >= 1, got {raw.strip()!r}")
        if parts[0] in hosts:
            raise UserError(f"{path}:{number}: host {parts[0]!r} is listed twice")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise UserError(f"{path}: the hostfile lists no hosts")
    return hosts


def hostfile_resources(options: LaunchOptions) -> dict[str, list[int]]:
    """Hosts and slots that will run ranks, after --include / --exclude (DeepSpeed's own rules)."""
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    if options.hostfile is None:
        raise ValueError("hostfile_resources needs --hostfile")
    hosts = read_hostfile(options.hostfile)
    try:
        return parse_inclusion_exclusion(hosts, options.include or "", options.exclude or "")
    except ValueError as exc:
        raise UserError(f"--include/--exclude: {exc}") from None


def check_hosts_resolve(options: LaunchOptions) -> None:
    """Every host that will run ranks has an address: otherwise DeepSpeed's launcher would end in a
    traceback (or ssh would hang on it) after the data was prepared."""
    import socket

    for host in hostfile_resources(options):
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UserError(f"{options.hostfile}: host {host!r} does not resolve ({reason}); fix its name") from None


# --------------------------------------------------------------------------- commands


def launcher_command(job_file: Path, options: LaunchOptions) -> list[str]:
    """The command that starts every rank of this node (torchrun) or of all hosts (DeepSpeed)."""
    from bdctl.engine import free_port

    if options.mode == "hostfile" and options.hostfile is not None:  # mode "hostfile" means a hostfile
        hostfile_resources(options)  # validate before printing or running anything
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", options.hostfile]
        command += ["--include", options.include] if options.include else []
        command += ["--exclude", options.exclude] if options.exclude else []
        command += ["--master_port", str(options.master_port or 29500)]
        if options.master_addr != "127.0.0.1":
            command += ["--master_addr", options.master_addr]
        return [*command, "--module", "bdctl.worker", str(job_file)]
    port = options.master_port or (29500 if options.nnodes > 1 else free_port())
    # Across nodes, the rendezvous gives up after --rendezvous-timeout (`_torchrun` says why).
    rendezvous = ["--rdzv_conf", f"timeout={options.rendezvous_timeout}"] if options.nnodes > 1 else []
    return [
        sys.executable, "-m", "bdctl.launch",
        "--nnodes", str(options.nnodes), "--node_rank", str(options.node_rank),
        "--nproc_per_node", str(options.nproc),
        "--master_addr", options.master_addr, "--master_port", str(port), *rendezvous,
        "-m", "bdctl.worker", str(job_file),
    ]  # fmt: skip


def launch(job_file: Path, options: LaunchOptions) -> None:
    """Run the job on `options.nproc` ranks; a failure raises UserError with the rank's message."""
    flag_file = job_file.parent / PREEMPT
    (job_file.parent / "logs" / LAUNCH_FAILURE).unlink(missing_ok=True)  # an earlier command's
    if options.is_primary:
        flag_file.unlink(missing_ok=True)  # a request an earlier command got was served by it
    with forward_preemption(flag_file):
        if options.mode in ("in-process", "slurm"):
            from bdctl.worker import run_job

            if options.mode == "slurm":  # this process is one of the ranks srun started
                os.environ.update({k: str(v) for k, v in _slurm_task().items()})
            else:
                _ignore_stray_rank_variables()
            run_job(job_file)
            return
        if options.mode == "hostfile":
            check_hosts_resolve(options)
        command = launcher_command(job_file, options)
        if options.mode == "torchrun" and options.nnodes > 1:
            port = command[command.index("--master_port") + 1]
            print(
                f"node {options.node_rank} of {options.nnodes}: waiting up to {options.rendezvous_timeout} s for all "
                f"{options.nnodes} nodes at {options.master_addr}:{port} (--rendezvous-timeout)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        env = dict(os.environ)
        # torchrun would set 1 thread per rank and print a banner about it; share the cores instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nproc)))
        env.setdefault("PYTHONUNBUFFERED", "1")  # rank output reaches the terminal (and logs) as it happens
        returncode = subprocess.run(command, env=env).returncode
    if returncode != 0:
        raise UserError(_failure_message(job_file.parent, returncode), exit_code=returncode)


def _ignore_stray_rank_variables() -> None:
    """A one-rank command runs its rank here: a RANK / WORLD_SIZE left in the shell would make it
    wait for ranks that never come. Said in one line, then set to rank 0 of 1."""
    stray = stray_rank_variables()
    if not stray:
        return
    shown = " ".join(f"{name}={value}" for name, value in stray.items())
    print(
        f"note: ignoring {shown} from the environment (set in the shell, not by a launcher): this command runs "
        "one rank in this process; use --nproc / --nnodes or srun for several",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


@contextlib.contextmanager
def forward_preemption(flag_file: Path):
    """While the ranks run, SIGTERM / SIGUSR1 to this process become a PREEMPT file that every
    stage looks for at its resume points (training steps, generate's batches, eval's batches): it
    then saves what it can and exits 75. Ranks in child processes cannot see this process's
    signal any other way; a rank running in this process (one rank, a SLURM task) would otherwise
    die of the signal at once, with -15 and no word. Training installs its own handler on top
    (`bdctl.training.PreemptionWatch`), which checks the same file."""

    def handle(signum, frame):
        flag_file.touch()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread (a test runner's): the flag file still works by hand
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def dry_run_text(job_file: Path, options: LaunchOptions) -> str:
    """What --dry-run prints first: how the ranks would be started."""
    if options.mode == "in-process":
        return f"in-process (1 rank): {shlex.join([sys.executable, '-m', 'bdctl.worker', str(job_file)])}"
    if options.mode == "slurm":
        env = _slurm_task()
        worker = shlex.join([sys.executable, "-m", "bdctl.worker", str(job_file)])
        return (
            f"slurm: this task is rank {env['RANK']} of {env['WORLD_SIZE']} (local rank {env['LOCAL_RANK']}), "
            f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']}: {worker}"
        )
    return shlex.join(launcher_command(job_file, options))


def _failure_message(stage_dir: Path, code: int) -> str:
    """One line on why the job failed: the launcher's own reason (a rendezvous that failed), or
    the first failing rank's own error when it left one. It names logs/ only if it exists: a
    launcher that failed before any rank started wrote none."""
    logs = stage_dir / "logs"
    launcher = logs / LAUNCH_FAILURE
    if launcher.is_file():
        return launcher.read_text().strip().splitlines()[0]
    if not logs.is_dir():
        return f"the job failed (exit code {code}) before any rank wrote a log; the launcher's output is above"
    first = logs / "first-failure.json"
    if first.is_file():
        failure = json.loads(first.read_text())
        own = logs / f"error-rank{failure['rank']}.txt"
        if own.is_file():
            return own.read_text().strip().splitlines()[0]
        signal_note = f", killed by signal {code - 128}" if code > 128 else ""
        return (
            f"the job failed (exit code {code}{signal_note}): rank {failure['rank']} died first and the others "
            f"were stopped; output above, logs in {logs}"
        )
    errors = sorted(logs.glob("error-rank*.txt"))
    if errors:
        return errors[0].read_text().strip().splitlines()[0]
    return f"the job failed (exit code {code}); the ranks' output is above, logs in {logs}"


# Written by `_torchrun` when the launcher itself failed (no rank ran): one line for the CLI.
LAUNCH_FAILURE = "launch-failure.txt"


def rendezvous_message(exc: BaseException, args) -> str:
    """A failed rendezvous in one line: which master address and port this node waited for, and
    what to do. `args` are torchrun's parsed arguments."""
    address = f"{args.master_addr}:{args.master_port}"
    timeout = dict(item.split("=", 1) for item in args.rdzv_conf.split(",") if "=" in item).get("timeout", "600")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    nnodes = args.nnodes.split(":")[-1]
    if int(args.node_rank) == 0:
        return (
            f"rendezvous: node 0 waited {timeout} s at {address} for {nnodes} nodes and not all came ({first}); "
            f"start the same command on every other node with its --node-rank and --master-addr {args.master_addr} "
            f"--master-port {args.master_port}, or wait longer with --rendezvous-timeout"
        )
    return (
        f"rendezvous: node {args.node_rank} could not reach the master at {address} within {timeout} s ({first}); "
        f"start node 0 (--node-rank 0) with the same command and check that {address} is reachable from here, "
        "or wait longer with --rendezvous-timeout"
    )


def _torchrun(argv: list[str]) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        run(args)
    except (DistError, RendezvousError) as exc:
        # No rank started: the nodes never met. Say where this node waited, not torchrun's traceback.
        logs = Path(argv[-1]).parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / LAUNCH_FAILURE).write_text(rendezvous_message(exc, args) + "\n")
        return 2
    except ChildFailedError as exc:
        # The first rank to fail says why; torchrun then stops the others with SIGTERM.
        rank, failure = exc.get_first_failure()
        code = failure.exitcode or 1
        code = code if code > 0 else 128 - code  # killed by a signal: exit as a shell would
        logs = Path(argv[-1]).parent / "logs"  # argv ends with the job file
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "first-failure.json").write_text(json.dumps({"rank": rank, "exit_code": code}))
        return code
    return 0


def _quiet_rendezvous() -> None:
    """c10d logs every failed connection attempt to the master with a C++ stack trace; the
    launcher says what went wrong in one line instead. The level is read when torch loads, so it
    is set for this process only: the ranks it starts get the environment as it was."""
    previous = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch.distributed  # noqa: F401

    if previous is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = previous


if __name__ == "__main__":
    _quiet_rendezvous()
    sys.exit(_torchrun(sys.argv[1:]))
