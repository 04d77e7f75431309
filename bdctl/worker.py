"""The per-rank entry point: `python -m bdctl.worker JOB.json` (or in-process for one rank).

Joins the process group, sets up per-rank logging, runs the stage. A user-facing failure on any
rank (a UserError, or what `bdctl.errors.user_error_from` maps to one: an unreadable or unwritable
path, damaged weights, a failed rendezvous) is written as one line to logs/error-rank<R>.txt (the
launching process shows the first failing rank's line) and ends the rank with the error's own exit
code: 2 for bad input, 3 for a non-finite loss, 75 for a preempted run. Its traceback goes to the
rank's log file (logs/rank<R>.log), never to the terminal. Any other error is a bug: its traceback
goes to the log file and to stderr, and the rank exits 1.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from bdctl.errors import UserError, user_error_from


def run_job(job_file: str | Path) -> None:
    from bdctl.engine import init_distributed, quiet_libraries, startup_output
    from bdctl.job import Job
    from bdctl.stages import stage_module

    quiet_libraries()
    job = Job.load(Path(job_file))
    rank, world = init_distributed()
    logs = job.stage_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"rank{rank}.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    for line in startup_output():
        logging.getLogger("deepspeed").info(line)
    try:
        stage_module(job.stage).run(job, rank, world)
    except UserError as exc:
        (logs / f"error-rank{rank}.txt").write_text(f"{exc}\n")
        raise
    except Exception as exc:
        handler.flush()
        with log_file.open("a") as log:  # the whole story stays in the rank's log
            log.write(traceback.format_exc())
        error = user_error_from(exc)
        if error is not None:
            (logs / f"error-rank{rank}.txt").write_text(f"{error}\n")
            raise error from exc
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
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        error = user_error_from(exc)
        if error is None:
            traceback.print_exc()
            return 1
        if not isinstance(exc, UserError) and error.__cause__ is None:
            # Failed before its logs existed (an unwritable stage directory): the launching
            # process finds no error file, so the line goes to the terminal here.
            print(f"rank failed: {error}", file=sys.stderr)
        return error.exit_code  # otherwise the launching process prints the message once
    return 0


if __name__ == "__main__":
    sys.exit(main())
