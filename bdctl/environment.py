"""The environment is input too: every variable bdctl reads from it is read and checked here.

    BDCTL_JOB_WAIT                 seconds a secondary node waits for node 0's job.json (default 1800)
    SLURM_STEP_ID, SLURM_NTASKS,   the rank layout of an srun step (one task per rank): read only
    SLURM_PROCID, SLURM_LOCALID,   inside a step of several tasks; then each one that is needed must
    SLURM_STEP_NODELIST /          be there and be a number (or a node list)
    SLURM_JOB_NODELIST, SLURM_JOB_ID
    RANK, WORLD_SIZE, LOCAL_RANK,  what a launcher (torchrun, srun through bdctl) gives each rank;
    MASTER_ADDR, MASTER_PORT       a RANK / WORLD_SIZE left in the user's shell does not make a
                                   one-rank command part of a larger job (`stray_rank_variables`)

A value that cannot be used is one line naming the variable, its value, that it came from the
environment and what was expected (a `UserError`, exit 2), never a traceback. Functions take the
environment as an argument (default `os.environ`) so that tests need not change the process's own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from bdctl.errors import UserError

JOB_WAIT = "BDCTL_JOB_WAIT"
DEFAULT_JOB_WAIT_S = 1800.0
# What a launcher sets for each rank; a rank started by bdctl in this process is rank 0 of 1.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SINGLE_RANK = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def _bad(name: str, value: str, expected: str, why: str = "") -> UserError:
    return UserError(f"environment variable {name}={value!r}: expected {expected}{why}")


def _integer(env: Mapping[str, str], name: str, expected: str, low: int, high: int | None = None, why: str = "") -> int:
    value = env[name]
    try:
        number = int(value.strip())
    except ValueError:
        raise _bad(name, value, expected, why) from None
    if number < low or (high is not None and number > high):
        raise _bad(name, value, expected, why)
    return number


def job_wait_seconds(env: Mapping[str, str] | None = None) -> float:
    """BDCTL_JOB_WAIT: a finite number of seconds > 0 (default 1800)."""
    env = os.environ if env is None else env
    value = env.get(JOB_WAIT)
    if value is None or not value.strip():
        return DEFAULT_JOB_WAIT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise _bad(JOB_WAIT, value, "a number of seconds > 0 (how long a secondary node waits for node 0)")
    return seconds


def slurm_layout(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Rank layout of an srun task with several tasks, or None outside one.

    Each srun task is one rank; node 0's first host is the master. The port comes from MASTER_PORT
    if set, else from the job id, so every task computes the same one. Inside a step (SLURM_STEP_ID
    set) a variable that is missing or not a number is one line naming it."""
    env = os.environ if env is None else env
    if "SLURM_STEP_ID" not in env:
        return None
    why = " (SLURM_STEP_ID is set: bdctl reads the rank layout of this srun step)"
    tasks = _integer(env, "SLURM_NTASKS", "a number of tasks >= 1", 1, why=why) if "SLURM_NTASKS" in env else 1
    if tasks < 2:
        return None
    for name in ("SLURM_PROCID",):
        if name not in env:
            raise UserError(f"environment variable {name} is not set but SLURM_NTASKS={tasks}{why}")
    nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "").strip()
    if not nodelist:
        raise UserError(f"environment variables SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are both unset{why}")
    rank = _integer(env, "SLURM_PROCID", f"a task rank from 0 to {tasks - 1}", 0, tasks - 1, why)
    local = _integer(env, "SLURM_LOCALID", "a local task rank >= 0", 0, why=why) if "SLURM_LOCALID" in env else 0
    if env.get("MASTER_PORT"):
        port = master_port(env)
    else:
        job = _integer(env, "SLURM_JOB_ID", "a job id (a number)", 0, why=why) if env.get("SLURM_JOB_ID") else 0
        port = 29500 + job % 1000
    master = env.get("MASTER_ADDR") or first_host(nodelist)
    return {"RANK": rank, "WORLD_SIZE": tasks, "LOCAL_RANK": local, "MASTER_ADDR": master, "MASTER_PORT": port}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head[: head.index("[")], head[head.index("[") + 1 : head.index("]")]
    return prefix + ranges.split(",")[0].split("-")[0]


def master_port(env: Mapping[str, str] | None = None) -> int | None:
    """MASTER_PORT when set: a port from 1 to 65535."""
    env = os.environ if env is None else env
    if not env.get("MASTER_PORT"):
        return None
    return _integer(env, "MASTER_PORT", "a port number from 1 to 65535", 1, 65535)


def launcher_rank(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) a launcher set for this rank, checked (0 <= RANK < WORLD_SIZE, LOCAL_RANK
    and MASTER_PORT numbers), or None when RANK is not set."""
    env = os.environ if env is None else env
    if "RANK" not in env:
        return None
    if "WORLD_SIZE" not in env:
        raise UserError(f"environment variable RANK={env['RANK']!r} is set but WORLD_SIZE is not")
    world = _integer(env, "WORLD_SIZE", "a number of ranks >= 1", 1)
    rank = _integer(env, "RANK", f"a rank from 0 to {world - 1} (WORLD_SIZE={world})", 0, world - 1)
    if "LOCAL_RANK" in env:
        _integer(env, "LOCAL_RANK", "a local rank >= 0", 0)
    master_port(env)
    return rank, world


def stray_rank_variables(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK that say something other than "rank 0 of 1", where a command
    runs its one rank in this process: left in the user's shell (or by another launcher), not
    set for this command, which is one rank by itself."""
    env = os.environ if env is None else env
    return {name: env[name] for name in RANK_VARIABLES if name in env and env[name].strip() != SINGLE_RANK[name]}
