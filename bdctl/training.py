"""The training loop every training stage shares (sft, distill): steps, validation, the kept
best export, checkpoints, exact resume, preemption and non-finite losses.

A stage supplies three functions and gets the rest:

    micro_batches(indices) -> [MicroBatch]   what the rank trains on for those examples
    loss(micro_batch)      -> (loss, logs)   a token mean over that micro-batch, plus diagnostics
    validate()             -> {name: score}  validation scores, the same on every rank; the
                                             one named by `LoopConfig.select` picks the kept
                                             export (`bdctl.selection`)

A stage whose training examples are made during training (MiniLLM's rollouts) also gives
`before_step(step, batch)`, called at the start of every step with the global batch's example
indices, and `extra_state = (save, load)`: `save()` returns what a checkpoint must hold besides the
engine (e.g. the rollout buffer), `load(state)` restores it on resume.

A stage with a second batch per step (distill's pretraining term) also gives
`aux_inputs(step, g) -> (inputs, count)`, the extra inputs of global micro-batch `g` of a step
(numbered over the whole global batch, so they do not depend on the number of ranks), and its
loss returns `(loss, logs, aux)`: `aux` is a mean over those `count` units, and the objective is
global mean(loss) + `aux_coef` x global mean(aux), each over its own units.

Exactness. The data order is a function of (seed, epoch) and the position is the step count, so a
checkpoint at step k (DeepSpeed model + optimizer + scheduler, plus RNG states and the best score
so far) restarts at exactly step k+1: the per-step losses after a resume equal those of an
uninterrupted run. A checkpoint counts only once its manifest exists.

Preemption. SIGTERM or SIGUSR1 on any rank, or a PREEMPT file in the stage directory (how the
launching process forwards a signal to ranks it did not start itself), makes every rank agree at
the next step boundary, save a checkpoint and exit with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bdctl.errors import UserError
from bdctl.rundir import PREEMPT, manifest, mark_complete, read_json, recover_dir, replace_dir
from bdctl.selection import better, per_protocol_key, selection_protocols

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; rerun the same command to resume
NONFINITE_EXIT_CODE = 3


class Preempted(UserError):
    """The run saved a checkpoint and stopped on request; rerunning the command resumes it."""

    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteLoss(UserError):
    """A NaN or inf loss with `on_nonfinite: stop`; the last good checkpoint is left as it was."""

    exit_code = NONFINITE_EXIT_CODE


@dataclass
class MicroBatch:
    """One rank's share of a step: model inputs and the number of scored units (tokens or
    transitions) the loss averages over, which sets its weight in the global mean."""

    inputs: dict[str, Any]
    count: int
    aux_count: int = 0  # units of the second term's mean (e.g. the pretraining tokens), if any


@dataclass
class TrainState:
    """The client state of a checkpoint: where the run is and what it has kept."""

    step: int = 0
    best_score: float | None = None  # of the selection metric; None until the first validation
    best_step: int = -1
    # protocol -> [best score, its step], for the extra exports of select_each_protocol
    best_by_protocol: dict[str, list] = field(default_factory=dict)
    skipped_steps: int = 0
    rng: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopConfig:
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    micro_batch_size: int
    seed: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    on_nonfinite: str  # "stop" | "skip"
    fingerprint: str  # of everything that must match for a resume
    select: str = "val_loss"  # the validation score that picks the kept export (bdctl.selection)
    aux_coef: float = 1.0  # weight of the second term (see aux_inputs), e.g. lm_coef
    aux_name: str = "aux_loss"  # its name in metrics.jsonl
    # protocols with a best export of their own (best-<protocol>/, scored as rouge_l@<protocol>)
    keep_each_protocol: list[str] = field(default_factory=list)


class PreemptionWatch:
    """Remembers SIGTERM / SIGUSR1; `requested()` is collective and true on every rank or none."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, flag_file: Path):
        self.flag_file = flag_file
        self.signalled = False
        self._previous: dict[signal.Signals, Any] = {}  # the handlers to put back on exit

    def __enter__(self) -> PreemptionWatch:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): rely on the flag file
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def requested(self, any_rank: Callable[[bool], bool]) -> bool:
        return any_rank(self.signalled or self.flag_file.exists())

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def capture_rng() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    if state:
        random.setstate(_as_tuple(state["python"]))
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["torch"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def train_loop(
    *,
    engine,
    config: LoopConfig,
    out: Path,
    rank: int,
    world: int,
    n_train: int,
    micro_batches: Callable[[list[int]], list[MicroBatch]],
    # (loss, logs) or (loss, logs, aux loss): the aux term when aux_inputs is given (distill's LM term)
    loss: Callable[[MicroBatch], tuple[Any, dict[str, float]] | tuple[Any, dict[str, float], Any]],
    validate: Callable[[], dict[str, float]],
    export_best: Callable[[dict, str], None],
    metrics,
    progress,
    aux_inputs: Callable[[int, int], tuple[dict[str, Any], int]] | None = None,
    before_step: Callable[[int, list[int]], None] | None = None,
    extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
) -> TrainState:
    """Train to `config.total_steps` (resuming from the newest checkpoint), keeping the best
    validation score's export in out/best (and, per protocol of `keep_each_protocol`, in
    out/best-<protocol>): `export_best(info, directory name)`. Returns the final state."""
    import torch
    import torch.distributed as dist

    from bdctl.data.batching import epoch_order
    from bdctl.data.batching import micro_batches as rank_share
    from bdctl.engine import check_resumable, latest_checkpoint, save_checkpoint

    device = engine.device
    checkpoints = out / "checkpoints"

    def all_sum(values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any_rank(flag: bool) -> bool:
        return all_sum([float(flag)])[0] > 0

    state = TrainState()
    resume_from = latest_checkpoint(checkpoints)
    if resume_from is not None:
        check_resumable(resume_from, config.fingerprint, world)
        _, client = engine.load_checkpoint(str(checkpoints), tag=resume_from.name)
        state = TrainState(**client["train_state"])
        restore_rng(state.rng)
        if extra_state is not None:
            extra_state[1](client["extra_state"])
        progress.print(f"resumed from {resume_from} (step {state.step})")
        if rank == 0:
            metrics.truncate_after(state.step)
        progress.update(advance=state.step)

    def checkpoint(reason: str) -> None:
        state.rng = capture_rng()
        tag = f"step{state.step}"
        client = {"train_state": asdict(state), **({"extra_state": extra_state[0]()} if extra_state else {})}
        save_checkpoint(
            engine, checkpoints, tag, client, config.keep_checkpoints, rank,
            info={"fingerprint": config.fingerprint, "world_size": world, "reason": reason},
        )  # fmt: skip
        metrics.write(event="checkpoint", step=state.step, tag=tag, reason=reason)

    def validate_and_keep_best() -> None:
        scores = validate()
        improved = better(config.select, scores[config.select], state.best_score)
        if improved:
            state.best_score, state.best_step = scores[config.select], state.step
            export_best({"step": state.step, "select": config.select, **scores}, "best")
        kept = {}
        for name in config.keep_each_protocol:
            key = per_protocol_key(name)
            previous = state.best_by_protocol.get(name)
            if better(config.select, scores[key], previous[0] if previous else None):
                state.best_by_protocol[name] = [scores[key], state.step]
                export_best({"step": state.step, "select": key, **scores}, f"best-{name}")
                kept[name] = True
        metrics.write(
            event="eval", step=state.step, **scores, best=improved, **({"best_per_protocol": kept} if kept else {})
        )
        shown = "  ".join(f"{name} {value:.4f}" for name, value in scores.items())
        progress.print(f"step {state.step}: {shown}{'  (best)' if improved else ''}")

    with PreemptionWatch(out / PREEMPT) as preemption:
        if state.step == 0:
            validate_and_keep_best()  # the starting point counts: a run that only gets worse keeps it
        while state.step < config.total_steps:
            epoch, index = divmod(state.step, config.steps_per_epoch)
            order = epoch_order(n_train, config.seed, epoch)
            if before_step is not None:
                before_step(state.step, order[index * config.batch_size : (index + 1) * config.batch_size])
            chunks = rank_share(order, index, config.batch_size, config.micro_batch_size, rank, world)
            batches = []
            for j, chunk in enumerate(chunks):
                for batch in micro_batches(chunk):
                    if aux_inputs is not None:  # chunk j of this rank is micro-batch rank + j * world
                        batch.inputs["aux"], batch.aux_count = aux_inputs(state.step, rank + j * world)
                    batches.append(batch)
            global_count, global_aux = all_sum([sum(b.count for b in batches), sum(b.aux_count for b in batches)])
            loss_sum, aux_sum, started = 0.0, 0.0, time.perf_counter()
            logs_sum: dict[str, float] = {}
            for batch in batches:
                value, logs, *rest = loss(batch)
                aux = rest[0] if rest else None
                # DeepSpeed averages over micro-batches and ranks; rescale so the gradient is that
                # of the mean over the scored units of the whole global batch.
                objective = value * batch.count * len(batches) * world / global_count
                if aux is not None:
                    objective = objective + config.aux_coef * aux * batch.aux_count * len(batches) * world / global_aux
                if config.on_nonfinite == "stop" and any_rank(not torch.isfinite(objective.detach()).item()):
                    raise NonFiniteLoss(
                        f"non-finite loss at step {state.step + 1}; stopped without touching the last "
                        f"checkpoint ({latest_checkpoint(checkpoints) or 'none yet'}); "
                        "set on_nonfinite: skip to skip such steps"
                    )
                engine.backward(objective)
                engine.step()
                loss_sum += value.item() * batch.count
                if aux is not None:
                    aux_sum += aux.item() * batch.aux_count
                for key, number in logs.items():
                    logs_sum[key] = logs_sum.get(key, 0.0) + number * batch.count
            # a non-finite gradient norm makes DeepSpeed skip the update (on_nonfinite: skip)
            if not engine.was_step_applied():
                state.skipped_steps += 1
            state.step += 1
            keys = sorted(logs_sum)
            totals = all_sum([loss_sum, aux_sum, *[logs_sum[k] for k in keys]])
            record = {
                "loss": totals[0] / global_count,
                **{k: v / global_count for k, v in zip(keys, totals[2:], strict=True)},
            }
            if global_aux:
                record["method_loss"] = record["loss"]
                record[config.aux_name] = totals[1] / global_aux
                record["loss"] = record["method_loss"] + config.aux_coef * record[config.aux_name]
            rate = global_count / (time.perf_counter() - started)
            metrics.write(
                event="train", step=state.step, epoch=epoch, lr=engine.optimizer.param_groups[0]["lr"],
                tokens=global_count, tokens_per_s=rate, skipped_steps=state.skipped_steps, **record,
            )  # fmt: skip
            progress.update(loss=record["loss"], **{"tok/s": f"{rate:.0f}"})
            end_of_epoch = (state.step % config.steps_per_epoch == 0) or state.step == config.total_steps
            # every eval_every steps (else each epoch), and always the final weights
            periodic = state.step % config.eval_every == 0 if config.eval_every else end_of_epoch
            if periodic or state.step == config.total_steps:
                validate_and_keep_best()
            due = state.step % config.checkpoint_every == 0 if config.checkpoint_every else end_of_epoch
            if due or state.step == config.total_steps:
                checkpoint("schedule")
            if state.step < config.total_steps and preemption.requested(any_rank):
                if not due:
                    checkpoint("preempted")
                raise Preempted(f"preempted at step {state.step}; checkpoint saved; run the same command to resume")
    return state


def finish(out: Path, state: TrainState, rank: int, stage: str, metrics, select: str, **facts) -> None:
    """The kept export becomes the stage's export (and each best-<protocol> its export-<protocol>);
    the manifest, with `facts` (e.g. the selection protocol, notes), marks the stage complete."""
    import torch.distributed as dist

    from bdctl.engine import EXPORT_INFO, write_model_card

    if rank == 0:
        for name in ["", *(f"-{protocol}" for protocol in state.best_by_protocol)]:
            best, export = out / f"best{name}", out / f"export{name}"
            recover_dir(best)
            if best.exists():  # else an interrupted finish() already moved it
                replace_dir(best, export)
            # Only now is the export complete: best*/ never carries a manifest, so that an
            # interrupted run's candidate cannot pass for a finished model (bdctl.engine.export_hf).
            if manifest(export) is None:
                # The model card first, with the stage's facts: in place before the export counts as complete.
                write_model_card(out, export, read_json(export / EXPORT_INFO), facts)
                mark_complete(export, **read_json(export / EXPORT_INFO))
                (export / EXPORT_INFO).unlink()
        (out / PREEMPT).unlink(missing_ok=True)
        per_protocol = {
            name: {"best_score": score, "best_step": step, "export": f"export-{name}"}
            for name, (score, step) in state.best_by_protocol.items()
        }
        if per_protocol:
            facts["best_per_protocol"] = per_protocol
        metrics.write(event="end", best_step=state.best_step, select=select, best_score=state.best_score, **facts)
        mark_complete(
            out, stage=stage, best_step=state.best_step, select=select, best_score=state.best_score,
            steps=state.step, skipped_steps=state.skipped_steps, export="export", **facts,
        )  # fmt: skip
    dist.barrier()


def loop_config(job, config, total_steps: int, per_epoch: int) -> LoopConfig:
    """The loop settings of a training stage (sft, distill, minillm) from its recipe section."""
    return LoopConfig(
        total_steps=total_steps, steps_per_epoch=per_epoch, batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size, seed=job.recipe.seed, eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
        on_nonfinite=config.on_nonfinite, fingerprint=job.fingerprint(),
        select=config.select, keep_each_protocol=selection_protocols(job, config)[1:],
    )  # fmt: skip
