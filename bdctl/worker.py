"""The per-rank entry point: `python -m bdctl.worker JOB.json` (or in-process for one rank).

Joins the process group, sets up per-rank logging, runs the stage. A user error on any rank is
written to logs/error-rank<R>.txt (the launching process shows it as one line) and ends the rank
with the error's own exit code: 2 for bad input, 3 for a non-finite loss, 75 for a preempted run
(`bdctl.errors.UserError.exit_code`). Any other error also keeps its traceback on stderr and exits 1.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from bdctl.errors import UserError


def run_job(job_file: str | Path) -> None:
    from bdctl.engine import init_distributed, quiet_libraries
    from bdctl.job import Job
    from bdctl.stages import stage_module

    quiet_libraries()
    job = Job.load(Path(job_file))
    rank, world = init_distributed()
    logs = job.stage_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        stage_module(job.stage).run(job, rank, world)
    except UserError as exc:
        (logs / f"error-rank{rank}.txt").write_text(f"{exc}\n")
        raise
    except BaseException as exc:
        (logs / f"error-rank{rank}.txt").write_text(f"rank {rank}: {type(exc).__name__}: {exc}\n")
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _leave_process_group() -> None:
    """After a finished stage: wait for every rank, then tear the group down explicitly.

    Left to interpreter shutdown, the group's communication threads are destroyed in no
    particular order with the rest of the process, and a rank can abort there ("terminate called
    without an active exception", exit 134) after its work is done, failing a finished job. On an
    error this is skipped: the other ranks may never reach the barrier.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    try:
        run_job(sys.argv[1])
        _leave_process_group()  # a launched rank only: in-process callers may run further stages
    except UserError as exc:
        return exc.exit_code  # the launching process prints the message once
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
