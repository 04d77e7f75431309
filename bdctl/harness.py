"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`bdctl eval RECIPE --harness TASKS`;
beyond the paper, which scores Rouge-L only). The optional extra `bdctl[harness]`, imported only here
and only when asked for.

The harness scores the same models eval samples (their exports, directories or hub ids, each with
the tokenizer eval uses), with lm-eval's own Hugging Face backend; its metrics go into eval's
results.json under "harness" and into the tables and the reproduction report beside Rouge-L. Tasks
are lm-eval's (names, groups or tags; they read their data sets from the hub) or local ones: a
directory of task YAML files (`--harness-include DIR`, lm-eval's include_path), e.g. a task over a
local JSONL file, which needs no network.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

from bdctl.errors import UserError
from bdctl.rundir import write_json_atomic

HARNESS_DIR = "harness"  # eval/harness/<model>.json: lm-eval's own results per model


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError("--harness: lm-evaluation-harness is not installed (pip install 'bdctl[harness]')") from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """`--harness a,b` (or repeated) -> the task names, in order, once each."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--harness {text!r}: name at least one lm-eval task (comma-separated)")
    return list(dict.fromkeys(tasks))


def task_manager(tasks: list[str], include: str | None):
    """lm-eval's TaskManager that knows `tasks`: the local directory alone when it holds them all
    (indexing lm-eval's ~15,000 bundled task files takes most of a minute), else with them. One
    line naming the first unknown task (and close names) otherwise."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include is not None:
        folder = Path(include).expanduser()
        if not folder.is_dir():
            raise UserError(f"--harness-include {include}: no such directory (expected lm-eval task YAML files)")
        local = TaskManager(verbosity="ERROR", include_path=str(folder), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
        manager = TaskManager(verbosity="ERROR", include_path=str(folder))
    else:
        manager = TaskManager(verbosity="ERROR")
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            where = f" nor in {include}" if include else " (local tasks: --harness-include DIR)"
            raise UserError(f"--harness: unknown lm-eval task {task!r}: not among lm-eval's tasks{where}{hint}")
    return manager


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def scores_of(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's results -> task -> {metric: value}: every finite number, lm-eval's "acc,none" keys
    shortened to "acc" when the filter is "none" (stderr kept, "N/A" dropped)."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            number = _number(value)
            if number is None or key in ("sample_len",) or "," not in key:
                continue
            metric, _, filter_name = key.partition(",")
            row[metric if filter_name == "none" else key] = number
        table[task] = row
    return table


def run_harness(info: dict[str, Any], options: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    """Every model of this eval command through lm-eval on `options["tasks"]`; lm-eval's results per
    model in eval/harness/<model>.json; returns what results.json keeps under "harness"."""
    require_lm_eval()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks: list[str] = options["tasks"]
    manager = task_manager(tasks, options.get("include"))
    settings = info["settings"]
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(settings["precision"], "float32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, int]] = {}
    for model in info["models"]:
        tokenizer = model["tokenizer"]
        lm = HFLM(
            pretrained=model["path"], revision=model["revision"] or "main", tokenizer=tokenizer["path"],
            batch_size=settings["batch_size"], device=device, dtype=dtype,
        )  # fmt: skip
        results = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=options.get("limit"),
            num_fewshot=options.get("num_fewshot"), log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=options.get("bootstrap_iters", 1000),
        )  # fmt: skip
        if results is None:  # lm-eval returns None on ranks other than its own rank 0; bdctl calls it once
            raise RuntimeError("lm-eval returned no results")
        del lm
        kept = {k: results[k] for k in ("results", "versions", "n-shot", "n-samples", "config") if k in results}
        write_json_atomic(out / HARNESS_DIR / f"{model['name']}.json", json.loads(json.dumps(kept, default=str)))
        scores[model["ref"]] = scores_of(results)
        samples[model["ref"]] = {t: int(n.get("effective", 0)) for t, n in (results.get("n-samples") or {}).items()}
    return {
        "tasks": tasks, "include": options.get("include"), "limit": options.get("limit"),
        "num_fewshot": options.get("num_fewshot"), "scores": scores, "samples": samples,
    }  # fmt: skip


def harness_table(harness: dict[str, Any], models: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Models as rows, one column per (task, metric), stderr beside its metric as "value ± stderr"."""
    columns: list[tuple[str, str]] = []
    for model in models:
        for task, metrics in harness["scores"].get(model, {}).items():
            for metric in metrics:
                if not metric.partition(",")[0].endswith("_stderr") and (task, metric) not in columns:
                    columns.append((task, metric))
    rows = []
    for model in models:
        row: list[Any] = [model]
        for task, metric in columns:
            metrics = harness["scores"].get(model, {}).get(task, {})
            name, comma, filter_name = metric.partition(",")
            value, stderr = metrics.get(metric), metrics.get(f"{name}_stderr{comma}{filter_name}")
            if value is None:
                row.append("")
            else:
                row.append(f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        rows.append(row)
    return ["model", *(f"{task} {metric}" for task, metric in columns)], rows
