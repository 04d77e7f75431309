"""Experiment trackers: TensorBoard, Weights & Biases and MLflow receive what metrics.jsonl receives.

`bdctl.tracking.MetricsLog` (rank 0) hands every record it writes to `Trackers.send`; which trackers a
stage reports to comes from the resolved recipe in the stage's job.json (`tracking:`, or
`--report-to`), so a stage needs no code of its own. Each tracker library is an optional extra,
imported only when named.

What a tracker gets from the records:

- a record with a step (`train`, `eval`, MiniLLM's `rollout`; generate's `batch` records are numbered
  1, 2, ... in order): its numbers as `<event>/<key>` at that step (`train/loss`, `eval/rouge_l`;
  `@` becomes `:`, which MLflow accepts: `eval/rouge_l:release`);
- the stage's last record (`end`, generate's `done`): its numbers as the run's final scores
  (W&B summary, MLflow metrics `final/...`, TensorBoard scalars `final/...` at the last step);
- the resolved recipe as the run's configuration (W&B config, MLflow params plus recipe.yaml as an
  artifact, TensorBoard text `recipe`).

Resume. A stage killed after its checkpoint at step N is run again from N: metrics.jsonl forgets
the records after N (`MetricsLog.truncate_after`) and the steps after N are trained again, with the
same losses (exact resume) but other timings. Each tracker continues the stage's run (the W&B run id
and MLflow run id are kept in <stage>/trackers.json) and, when it is opened, first receives the
records of metrics.jsonl it may lack (so a tracker added on resume gets the whole history). What a
reader then sees, one value per step everywhere:

- TensorBoard: exactly metrics.jsonl. The reopened writer starts with a purge event at the first step
  (`purge_step`), so readers drop every earlier event file's values and read the rewritten ones.
- MLflow: a step it already holds is not sent again (a metric's history cannot be rewritten), so the
  steps between N and the kill keep the values first logged: the same losses, lr and validation
  scores; tokens/s and times of the first attempt.
- W&B: the resumed run receives every record of metrics.jsonl, and W&B ignores steps below the run's
  current step ("steps must be monotonically increasing"): online, the server's steps are kept. An
  offline run directory that was killed holds what W&B flushed (up to `x_transaction_log_flush_interval`,
  15 s, can be lost on SIGKILL); the resumed offline run file holds the whole of metrics.jsonl.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import re
import sys
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from bdctl.errors import UserError
from bdctl.recipe.schema import Tracking

NAMES = ("tensorboard", "wandb", "mlflow")
# the module each needs, and what to install for it
_REQUIRES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
STATE_FILE = "trackers.json"  # in the stage directory: the run ids that a resume continues
FINAL_EVENTS = ("end", "done")  # a stage's last record: its final scores
_SKIPPED_KEYS = {"event", "step", "time"}
_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")


def check_installed(names: Iterable[str], where: str = "tracking.report_to") -> None:
    """A tracker that is named but not installed: one line with the pip command (nothing imported)."""
    for name in names:
        if name not in _REQUIRES:
            raise UserError(f"{where}: unknown tracker {name!r} (expected any of {', '.join(NAMES)}, or none)")
        if importlib.util.find_spec(_REQUIRES[name]) is None:
            raise UserError(f"{where}: {name} is not installed; install it with: pip install 'bdctl[{name}]'")


def metric_name(event: str, key: str) -> str:
    """The name a record's value has in every tracker: `<event>/<key>`, '@' written ':'."""
    return f"{event}/{key}".replace("@", ":")


def numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a record (nested mappings flattened with '/'), named under `prefix`."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _SKIPPED_KEYS:
            continue
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[metric_name(prefix, key)] = float(value)
    return out


class Tracker(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def final(self, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self, finished: bool) -> None: ...


class StageInfo:
    """What the trackers need to know about the stage: from its job.json."""

    def __init__(self, stage_dir: Path, job: dict[str, Any]):
        self.stage_dir = stage_dir
        self.recipe: dict[str, Any] = job["recipe"]
        self.stage: str = job["stage_name"]
        self.run_root = Path(job["run_root"])
        self.tracking = Tracking.model_validate(self.recipe.get("tracking") or {})
        self.run_name = f"{self.recipe['name']}/{self.stage}"

    def state(self) -> dict[str, Any]:
        path = self.stage_dir / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_state(self, name: str, value: dict[str, Any]) -> None:
        from bdctl.rundir import write_json_atomic

        write_json_atomic(self.stage_dir / STATE_FILE, {**self.state(), name: value})


def read_job(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / "job.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- the trackers


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, info: StageInfo):
        from torch.utils.tensorboard import SummaryWriter

        settings = info.tracking.tensorboard
        self.log_dir = (
            Path(settings.log_dir) / info.recipe["name"] / info.stage
            if settings.log_dir
            else info.stage_dir / "tensorboard"
        )
        reopened = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        # Reopened (a resume): a purge event at step 0 makes readers drop every earlier file's values;
        # the whole of metrics.jsonl is then written again (Trackers.open), so they read exactly it.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=0 if reopened else None, flush_secs=30)
        self.writer.add_text("recipe", _indented(_yaml(info.recipe)), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def final(self, step: int, values: dict[str, float]) -> None:
        self.log(step, values)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, info: StageInfo):
        import wandb

        settings = info.tracking.wandb
        state = info.state().get("wandb") or {}
        run_id = state.get("run_id") or _new_id()
        info.save_state("wandb", {"run_id": run_id, "project": settings.project})
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, name=info.run_name, group=info.recipe["name"],
                job_type=info.stage.split("/")[0], tags=settings.tags or None, id=run_id, resume="allow",
                dir=str(info.stage_dir), mode=settings.mode, config=info.recipe,
                settings=wandb.Settings(silent=True, console="off"),
            )  # fmt: skip
        except Exception as exc:  # no API key, no network, bad entity: one line, not a traceback
            raise UserError(
                f"tracking.wandb: could not start the W&B run {info.run_name} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); run `wandb login`, set WANDB_API_KEY or use "
                "tracking.wandb.mode: offline"
            ) from None
        self.first_step = int(self.run.step or 0)  # online resume: the server's next step; below it W&B ignores

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(values, step=step)

    def final(self, step: int, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def flush(self) -> None:
        pass  # W&B writes in its own process (wandb-core)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, info: StageInfo):
        from mlflow import MlflowClient

        settings = info.tracking.mlflow
        uri = settings.tracking_uri or _env("MLFLOW_TRACKING_URI")
        local = uri is None
        if local:  # MLflow's recommended local store (its file store is in maintenance mode)
            info.run_root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(info.run_root / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        state = info.state().get("mlflow") or {}
        self.held: dict[str, int] = {}  # metric -> the last step the run holds (a resumed run's history)
        try:
            if state.get("run_id") and state.get("tracking_uri") == uri:
                self.run_id = state["run_id"]
                run = self.client.get_run(self.run_id)
                for key in run.data.metrics:
                    self.held[key] = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment = self.client.get_experiment_by_name(settings.experiment)
                if experiment is not None:
                    experiment_id = experiment.experiment_id
                else:
                    artifacts = (info.run_root / "mlartifacts").resolve().as_uri() if local else None
                    experiment_id = self.client.create_experiment(settings.experiment, artifact_location=artifacts)
                tags = {"bdctl.recipe": info.recipe["name"], "bdctl.stage": info.stage}
                self.run_id = self.client.create_run(experiment_id, run_name=info.run_name, tags=tags).info.run_id
                info.save_state("mlflow", {"run_id": self.run_id, "tracking_uri": uri})
                self._log_config(info.recipe)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"tracking.mlflow: could not open the MLflow run {info.run_name} at {uri} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None

    def _log_config(self, recipe: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(_MLFLOW_BAD.sub("_", key), value[:6000]) for key, value in _flatten(recipe).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_text(self.run_id, _yaml(recipe), "recipe.yaml")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if step > self.held.get(k, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def final(self, step: int, values: dict[str, float]) -> None:
        self.log(step, values)

    def flush(self) -> None:
        pass  # every call is written through

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


_TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


# --------------------------------------------------------------------------- the fan-out


class Trackers:
    """The stage's trackers, fed record by record in metrics.jsonl's order."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.batches = 0  # generate's batch records, numbered as steps
        self.last_step = 0
        self.closed = False
        # a stage that stops without its final record (preempted, failed) still closes its runs
        atexit.register(_close_at_exit, weakref.ref(self))

    @classmethod
    def open(cls, stage_dir: Path, history: list[dict[str, Any]], names: list[str] | None = None) -> Trackers | None:
        """The trackers the stage's recipe names (None if none), each given `history` (the records of
        metrics.jsonl so far) first. `names` overrides the recipe's list."""
        job = read_job(stage_dir)
        if job is None:
            return None
        info = StageInfo(stage_dir, job)
        names = list(dict.fromkeys(info.tracking.report_to if names is None else names))
        if not names:
            return None
        check_installed(names)
        opened: list[Tracker] = []
        try:
            for name in names:
                opened.append(_TRACKERS[name](info))
        except BaseException:
            for tracker in opened:
                tracker.close(finished=False)
            raise
        trackers = cls(opened)
        for record in history:
            trackers.send(record)
        trackers.flush()
        return trackers

    def send(self, record: dict[str, Any]) -> None:
        if self.closed:
            return
        event = str(record.get("event", "metrics"))
        step = record.get("step")
        if step is None and event == "batch":
            self.batches += 1
            step = self.batches
        if event in FINAL_EVENTS:
            self._each("final", self.last_step, numbers(record, "final"))
            self.close(finished=True)
            return
        if step is None or event in ("start", "checkpoint"):
            return
        self.last_step = max(self.last_step, int(step))
        values = numbers(record, event)
        if values:
            self._each("log", int(step), values)

    def flush(self) -> None:
        self._each("flush")

    def close(self, finished: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for tracker in self.trackers:
            try:
                tracker.close(finished)
            except Exception as exc:  # closing must not hide what ended the stage
                print(f"warning: {tracker.name}: could not close the run: {exc}", file=sys.stderr)

    def _each(self, method: str, *args: Any) -> None:
        """Call every tracker; one that fails (a server gone) is dropped with a warning, the training goes on."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                print(
                    f"warning: {tracker.name}: {type(exc).__name__}: {exc}; no more metrics go there", file=sys.stderr
                )
                self.trackers.remove(tracker)


def _close_at_exit(ref: weakref.ref) -> None:
    trackers = ref()
    if trackers is not None:
        trackers.close(finished=False)


# --------------------------------------------------------------------------- helpers


def _new_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as wandb makes them)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _env(name: str) -> str | None:
    import os

    return os.environ.get(name) or None


def _yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def _indented(text: str) -> str:
    """Markdown code block (TensorBoard's text tab renders Markdown)."""
    return "".join(f"    {line}\n" for line in text.splitlines())


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested recipe as dotted keys -> strings (lists as JSON)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value if isinstance(value, str) else json.dumps(value)}
