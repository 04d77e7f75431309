"""What the run directories hold: each stage, finished or not (and why not), its wall time and headline
score, read from the files stages leave (`bdctl runs`). Reads only; imports no torch.

A stage directory is one with a job.json (written before its ranks start) or a LOCK. Its state:

    finished      MANIFEST.json exists
    running       LOCK names a live process (host, pid, command)
    failed        logs/error-rank<R>.txt (the first line says why); and the step a rerun resumes from
    interrupted   stopped at step N (metrics.jsonl) without an error: killed or preempted; a rerun
                  resumes from the newest complete checkpoint, or starts over if there is none
    not started   a job.json and nothing else yet
    stale         finished, but an input was made again since (an upstream stage retrained, the data
                  split remade, a data file edited): a rerun refuses it until --force redoes it
                  (`bdctl.provenance`; settings are compared by the commands, which know the recipe)

Each stage also shows the disk its directory holds (checkpoints, export, cache, ...).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bdctl.provenance import disk_bytes, made_from, remade_inputs
from bdctl.rundir import LOCK, MANIFEST

# Pipeline order for display (a name sorts by the first prefix it starts with, then by name).
_ORDER = ("teacher_sft", "generate", "score_", "student_sft", "distill", "eval", "judge")


@dataclass
class StageStatus:
    stage: str
    state: str  # finished, stale, running, failed, interrupted, not started
    detail: str = ""  # why not finished, or who runs it
    step: int | None = None  # the last step metrics.jsonl records
    total_steps: int | None = None
    resume_step: int | None = None  # the newest complete checkpoint
    wall_s: float | None = None
    headline: str = ""
    score: dict[str, Any] = field(default_factory=dict)  # {"name", "value", "step"} when there is one
    disk_bytes: int = 0  # what the stage directory holds on disk


@dataclass
class RunStatus:
    run: str
    recipe: str | None
    stages: list[StageStatus]


def find_runs(root: Path) -> list[Path]:
    """`root` itself if it is a run directory (it holds a stage), else the run directories in it."""
    root = Path(root)
    if not root.is_dir():
        return []
    if stage_dirs(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and stage_dirs(p))


def stage_dirs(run: Path) -> list[Path]:
    """The run's stage directories (distill/<name> one level down), in pipeline order."""
    found = []
    for child in run.iterdir():
        if not child.is_dir():
            continue
        if _is_stage(child):
            found.append(child)
        elif child.name == "distill":
            found.extend(p for p in child.iterdir() if p.is_dir() and _is_stage(p))

    def key(path: Path) -> tuple[int, str]:
        name = path.relative_to(run).as_posix()
        return next((i for i, prefix in enumerate(_ORDER) if name.startswith(prefix)), len(_ORDER)), name

    return sorted(found, key=key)


def _is_stage(path: Path) -> bool:
    return (path / "job.json").is_file() or (path / LOCK).is_file()


def run_status(run: Path) -> RunStatus:
    recipe = None
    job_files = [d / "job.json" for d in stage_dirs(run) if (d / "job.json").is_file()]
    if job_files:
        recipe = _read_json(job_files[0]).get("recipe_path")
    return RunStatus(run=str(run), recipe=recipe, stages=[stage_status(run, d) for d in stage_dirs(run)])


def stage_status(run: Path, directory: Path) -> StageStatus:
    status = StageStatus(stage=directory.relative_to(run).as_posix(), state="not started")
    records = _records(directory / "metrics.jsonl")
    steps = [r["step"] for r in records if isinstance(r.get("step"), int) and r.get("event") == "train"]
    status.step = max(steps) if steps else None
    starts = [r for r in records if r.get("event") == "start" and isinstance(r.get("total_steps"), int)]
    status.total_steps = starts[-1]["total_steps"] if starts else None
    status.resume_step = _newest_checkpoint(directory)
    status.wall_s = _wall(records)
    manifest = _read_json(directory / MANIFEST) if (directory / MANIFEST).is_file() else None
    holder = _live_holder(directory)
    errors = sorted((directory / "logs").glob("error-rank*.txt"))
    status.disk_bytes = disk_bytes(directory)
    if manifest is not None:
        status.state = "finished"
        record = made_from(directory)
        stale = remade_inputs(run, status.stage, record) if record else []
        if stale:
            status.state = "stale"
            status.detail = "; ".join(stale) + "; rerun with --force to redo it"
        if status.wall_s is None and (directory / "job.json").is_file():  # eval, judge: no metrics.jsonl
            status.wall_s = max(0.0, manifest.get("finished_at", 0) - (directory / "job.json").stat().st_mtime)
    elif holder is not None:
        status.state = "running"
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("started") or 0))
        status.detail = f"pid {holder.get('pid')} on {holder.get('host')} since {since}: {holder.get('command')}"
    elif errors:
        status.state = "failed"
        text = errors[0].read_text().strip().splitlines()
        status.detail = (text[0] if text else "(empty error file)") + _resume_note(status)
    elif status.step is not None or records:
        status.state = "interrupted"
        at = f"at step {status.step}" + (f"/{status.total_steps}" if status.total_steps else "") if status.step else ""
        status.detail = f"stopped {at}".strip() + _resume_note(status)
    _headline(status, directory, manifest, records)
    return status


def _resume_note(status: StageStatus) -> str:
    if status.resume_step is not None:
        return f"; rerun resumes from step {status.resume_step}"
    return "; rerun starts over (no checkpoint)" if status.step else ""


def _headline(status: StageStatus, directory: Path, manifest: dict | None, records: list[dict]) -> None:
    """The one number worth showing: the selected validation score, eval's best model, judge's win rates."""
    if manifest is not None and manifest.get("select") and manifest.get("best_score") is not None:
        name, value, step = manifest["select"], manifest["best_score"], manifest.get("best_step")
        status.score = {"name": name, "value": value, "step": step}
        status.headline = f"best {name} {value:.4g} (step {step})"
        return
    evals = [r for r in records if r.get("event") == "eval"]
    if evals:  # unfinished training: the latest validation
        last = evals[-1]
        name = "rouge_l" if "rouge_l" in last else "val_loss" if "val_loss" in last else None
        if name is not None:
            status.score = {"name": name, "value": last[name], "step": last.get("step")}
            status.headline = f"last {name} {last[name]:.4g} (step {last.get('step')})"
        return
    if manifest is None:
        return
    if "sequences" in manifest:  # generate, score_*
        status.headline = f"{manifest['sequences']} sequences, {manifest.get('tokens', 0)} tokens"
        status.score = {"name": "sequences", "value": manifest["sequences"], "step": None}
    elif (directory / "results.json").is_file():
        results = _read_json(directory / "results.json")
        if "scores" in results:
            _eval_headline(status, results)
        elif "baselines" in results:
            rates = {name: b.get("win_rate") for name, b in results["baselines"].items()}
            shown = ", ".join(f"{name} {rate:.2f}" for name, rate in rates.items() if rate is not None)
            status.headline = f"{results.get('candidate')} win rate vs {shown}"
            status.score = {"name": "win_rate", "value": rates, "step": None}


def _eval_headline(status: StageStatus, results: dict) -> None:
    """The best model on the first eval set under the first protocol (mean Rouge-L over seeds)."""
    protocols = results.get("scores") or {}
    if not protocols:
        return
    protocol = next(iter(protocols))
    sets = results.get("sets") or []
    models = protocols[protocol]
    first_set = sets[0] if sets else next(iter(next(iter(models.values()), {})), None)
    means = {m: s[first_set]["mean"] for m, s in models.items() if first_set in s and "mean" in s[first_set]}
    if not means:
        return
    best = max(means, key=lambda m: means[m])
    status.score = {"name": f"rouge_l/{first_set}/{protocol}", "value": means[best], "step": None, "model": best}
    status.headline = f"{first_set} ({protocol}): {best} {means[best]:.2f}, best of {len(means)}"


def _newest_checkpoint(directory: Path) -> int | None:
    root = directory / "checkpoints"
    if not root.is_dir():
        return None
    steps = [int(p.name[4:]) for p in root.glob("step*") if p.name[4:].isdigit() and (p / MANIFEST).is_file()]
    return max(steps) if steps else None


def _wall(records: list[dict]) -> float | None:
    """Seconds metrics.jsonl covers, summed over attempts (each attempt's clock starts at 0)."""
    total, attempt, seen = 0.0, 0.0, False
    for record in records:
        elapsed = record.get("time")
        if not isinstance(elapsed, (int, float)):
            continue
        seen = True
        if record.get("event") == "start" or elapsed < attempt:
            total += attempt
            attempt = 0.0
        attempt = max(attempt, float(elapsed))
    return total + attempt if seen else None


def _live_holder(directory: Path) -> dict | None:
    """Who holds the stage's lock, if that process is alive (a killed holder's lock is stale)."""
    from bdctl import rundir

    path = directory / LOCK
    if not path.is_file():
        return None
    holder = rundir._read_lock(path)
    if holder is None or rundir._is_stale(holder):
        return None
    return holder


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def as_json(runs: list[RunStatus]) -> list[dict[str, Any]]:
    return [asdict(run) for run in runs]


def format_bytes(count: int) -> str:
    """Decimal units, as `du --si` and file managers show them."""
    if count < 1000:
        return f"{count} B"
    size = float(count)
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} TB"


def format_wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
