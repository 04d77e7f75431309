"""`bdctl judge`: win rates of a candidate model against baselines (docs/method.md §8, Figure 2).

For every prompt of one eval set, a judge sees the instruction, the optional input and the two
models' answers (from the eval stage's generations at one seed) and answers A, B or Tie; each
pair is judged in both orders (`bdctl.judges.judge_pairs`), a win counts 1, a tie 0.5, a loss 0.

    judge/
      verdicts.jsonl                          every verdict, keyed by all that decides it (append-only)
      judgments/<candidate>_vs_<baseline>.jsonl   per prompt: both orders' verdicts and the score
      results.json table.md table.csv         wins / ties / losses / unparseable, win rate, 95% CI,
                                              the judge's position consistency and first-position share
      win_rates.png                            the chart (after the paper's Figure 2)
      MANIFEST.json                           written last

Generations. The answers are the eval stage's units (eval/generations/<model>/<set>/seed<S>.jsonl)
for stages.judge.eval_set and stages.judge.seed, with the eval stage's sampling settings. Units
that are missing or stale are generated here first, by the eval stage's own code (so `bdctl eval`
reuses them later); `--no-generate` makes that an error naming the `bdctl eval` command instead.

One process. The judge is one process on rank 0, without DeepSpeed: the hf backend is one model
scoring short prompts, the openai backend waits on the network. Generating missing units also
runs in this process (one model copy, the same batches as any world size: the same texts).

Reruns. Verdicts are never recomputed: the cache makes a rerun free, and an interrupted or failed
run (an unreachable endpoint) keeps every verdict it finished. `--force` discards the cache. The
results (judgments/, results.json, tables, chart, manifest) are removed when a command starts and
written only when it succeeds, so a failed command never leaves an earlier run's win rates looking
current.

Trust. A reply that is not A, B or Tie is asked again and never cached (`bdctl.judges`); more
than stages.judge.max_unparsed of a baseline's judgments left unparsed fails the stage. A judge
whose verdicts follow the answers' positions rather than the answers is flagged beside its win
rates (`bdctl.judges.stats`): its 50 % is position noise, not a tie.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdctl.errors import UserError
from bdctl.evalunits import (
    EVAL_STAGE,
    describe_model,
    generate_units,
    plan_units,
    read_generations,
    read_set,
    unit_done,
    unit_paths,
)
from bdctl.job import Job
from bdctl.recipe.schema import JudgeStage
from bdctl.rundir import MANIFEST, mark_complete, write_json_atomic, write_text_atomic
from bdctl.training import PREEMPTED_EXIT_CODE

if TYPE_CHECKING:
    from bdctl.judges.hf_backend import HFJudge  # loaded lazily: it brings torch

STAGE = "judge"
VERDICTS_FILE = "verdicts.jsonl"
# What a finished command leaves besides the cache: all of it describes one command's verdicts.
RESULTS = ("judgments", "results.json", "table.md", "table.csv", "win_rates.png", MANIFEST)


def stage_dir(options: dict) -> str:
    return STAGE


def stage_config(job: Job) -> JudgeStage:
    return job.recipe.stages.judge


# --------------------------------------------------------------------------- the launching process


# `bdctl.submit` runs the judge like any stage, with these hooks: one process on node 0 (one client
# of the endpoint, one writer of the verdict cache), a finished judge/ runs again (cached verdicts
# make that cheap), and what an interrupted run judged is kept.

REUSES_FINISHED = True


def run_in_process(job: Job, log: Callable[[str], None]) -> None:
    with _stop_on_signal(job.stage_dir / VERDICTS_FILE):
        run(job, 0, 1, log)


def also_locks(job: Job) -> list[Path]:
    """Missing answers are generated into eval/: hold its lock too."""
    return [job.run.stage(EVAL_STAGE)] if job.info["missing"] else []


def begin(job: Job, force: bool, log: Callable[[str], None]) -> bool:
    discard_results(job.stage_dir)
    if force:
        (job.stage_dir / VERDICTS_FILE).unlink(missing_ok=True)
    return True


class JudgeStopped(UserError):
    """SIGTERM / SIGUSR1 stopped the judge; the verdicts it finished are in the cache."""

    exit_code = PREEMPTED_EXIT_CODE


@contextlib.contextmanager
def _stop_on_signal(verdicts: Path):
    """SIGTERM or SIGUSR1 (a scheduler's preemption) stops the judge at once with exit 75 and one
    line, like a preempted eval: every verdict it finished is already in the append-only cache, so
    the same command continues where it stopped. Without this the process died of the signal
    with -15 and no word."""

    def handle(signum: int, frame: object) -> None:
        raise JudgeStopped(
            f"judge: stopped by {signal.Signals(signum).name}; the verdicts it finished are kept in {verdicts}: "
            "run the same command again to judge the rest"
        )

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread (a test runner's)
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def discard_results(out: Path) -> None:
    """From here until write_results the directory holds no results: a command that fails leaves
    none, rather than an earlier command's (another endpoint's, another judge's) looking current."""
    for name in RESULTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def prepare(job: Job, log: Callable[[str], None] = print) -> None:
    """Every check a user can fail, before any model is loaded or request sent."""
    config = stage_config(job)
    backend = job.options.get("backend") or config.backend
    candidate = job.options.get("candidate") or config.candidate
    baselines = list(dict.fromkeys(job.options.get("baselines") or config.baselines))
    if not baselines:
        raise UserError("stages.judge.baselines is empty; name at least one baseline")
    if candidate in baselines:
        raise UserError(f"stages.judge: the candidate {candidate!r} is also a baseline")
    eval_config = job.recipe.stages.eval
    spec = next((s for s in eval_config.sets if s.name == config.eval_set), None)
    if spec is None:
        names = ", ".join(s.name for s in eval_config.sets)
        raise UserError(f"stages.judge.eval_set {config.eval_set!r} is not one of stages.eval.sets ({names})")

    _quiet_transformers()
    judge: dict[str, Any] = {"backend": backend}
    if backend == "openai":
        key_env = _key_env(config)
        if key_env is not None and not os.environ.get(key_env, "").strip():
            raise UserError(
                f"environment variable {key_env} is empty or unset; judge endpoint {config.base_url} needs an "
                f"API key there (or --set stages.judge.api_key_env=none)"
            )
        _openai_judge(config)  # checks base_url and the numbers now, not after generating

    refs = [candidate, *baselines]
    protocol = eval_config.protocol(config.protocol).name  # judge the answers of one sampling protocol
    units = plan_units(job, refs, [spec], [config.seed], log, protocols=[protocol])
    eval_dir = job.run.stage(EVAL_STAGE)
    if backend == "hf":
        judge.update(_describe_hf_judge(job, config, read_set(eval_dir, spec.name)))
    missing = [u for u in units["units"] if unit_done(eval_dir, u) is None]
    if missing and not job.options.get("generate", True):
        first = unit_paths(eval_dir, missing[0])[0]
        # The eval command that makes exactly these units: same recipe, same overrides.
        words = ["bdctl", "eval", job.recipe_path, *(w for u in missing for w in ("--model", u["ref"]))]
        overrides = [item for item in job.overrides if not item.startswith("stages.judge.")]
        words += [w for item in overrides for w in ("--set", item)]
        if config.seed not in eval_config.seeds:
            words += ["--set", f"stages.eval.seeds=[{config.seed}]"]
        command = shlex.join(words)
        raise UserError(
            f"{first}: no current generations of {missing[0]['ref']} on eval set {spec.name!r} (seed {config.seed}, "
            f"protocol {protocol}); "
            f"run `{command}` first, or judge without --no-generate"
        )
    job.info.update(
        units,
        missing=missing,
        candidate=candidate,
        baselines=baselines,
        judge=judge,
        eval_set=spec.name,
        protocol=protocol,
    )


def _quiet_transformers() -> None:
    """What bdctl.worker does on ranks: no weight-loading bars or warnings in this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _key_env(config: JudgeStage) -> str | None:
    return None if config.api_key_env.strip().lower() in ("", "none") else config.api_key_env


def _openai_judge(config: JudgeStage):
    from bdctl.judges.openai_backend import OpenAIJudge

    return OpenAIJudge(
        config.api_model, base_url=config.base_url, api_key_env=_key_env(config), concurrency=config.concurrency,
        max_tries=config.retries + 1, timeout_s=config.timeout,
    )  # fmt: skip


def _describe_hf_judge(job: Job, config: JudgeStage, examples: list[dict]) -> dict[str, Any]:
    """The hf judge's directory and weights identity; checks that its prompt fits its context."""
    described = describe_model(job, config.hf_model)
    if described["kind"] == "hub":
        raise UserError(
            f"stages.judge.hf_model {config.hf_model!r}: the hf judge reads a finished stage or a local model "
            "directory, not a hub id (download it first)"
        )
    from types import SimpleNamespace

    from transformers import AutoConfig

    from bdctl.judges import JudgeRequest
    from bdctl.judges.hf_backend import HFJudge
    from bdctl.models import load_tokenizer

    if described["tokenizer"]["path"] != described["path"]:
        raise UserError(f"judge model directory {described['path']} has no tokenizer files; save its tokenizer there")
    tokenizer = load_tokenizer(described["path"])
    # The prompt without answers, for the set's longest instruction + input: if that alone does
    # not fit, no setting of max_answer_tokens helps. Weights are not loaded for this.
    stub = SimpleNamespace(config=AutoConfig.from_pretrained(described["path"]))
    checker = HFJudge(stub, tokenizer, name=described["path"], max_answer_tokens=config.max_answer_tokens)
    context, checker.context_length = checker.context_length, None
    longest = max(examples, key=lambda e: len(e["instruction"]) + len(e["input"]))
    fixed = len(checker.prompt_ids(JudgeRequest(longest["instruction"], longest["input"], "", "")))
    if context is not None and fixed >= context:
        raise UserError(
            f"judge model {config.hf_model} reads at most {context} tokens, but the judge prompt needs {fixed} "
            f"before any answer (eval set {config.eval_set!r}); use a judge with a longer context "
            "(stages.judge.hf_model)"
        )
    return {"model": config.hf_model, "path": described["path"], "weights": described["identity"]}


# --------------------------------------------------------------------------- the judging (one process)


class _LazyHFJudge:
    """The hf judge, loaded only when a verdict is missing (a rerun from the cache loads nothing).

    Its identity (part of every cache key) adds the weights' identity to the path, so a retrained
    judge under the same directory does not reuse the old verdicts.
    """

    def __init__(self, info: Mapping[str, Any], config: JudgeStage):
        from bdctl.judges.prompt import PROMPT_VERSION

        self.info, self.config = info, config
        self._judge: HFJudge | None = None
        weights = json.dumps(info["weights"], sort_keys=True)
        self.identity = {
            "backend": "hf", "model": info["path"], "weights": weights, "base_url": "",
            "prompt_version": PROMPT_VERSION, "max_answer_tokens": str(config.max_answer_tokens),
        }  # fmt: skip

    def judge_many(self, requests):
        if self._judge is None:
            import torch

            from bdctl.judges.hf_backend import HFJudge

            self._judge = HFJudge.from_pretrained(
                self.info["path"], device="cuda" if torch.cuda.is_available() else "cpu",
                batch_size=self.config.hf_batch_size, max_answer_tokens=self.config.max_answer_tokens,
            )  # fmt: skip
        return self._judge.judge_many(requests)


class _VerdictProgress:
    """A rich bar per baseline over the verdicts still to ask (their number is known only when
    judge_pairs has looked in the cache: the first callback sets the total)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True),
        )  # fmt: skip

    def __enter__(self) -> _VerdictProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def callback(self, description: str) -> Callable[[int, int], None]:
        task = self.progress.add_task(description, total=None)

        def on_verdict(done: int, total: int) -> None:
            self.progress.update(task, total=total, completed=done)

        return on_verdict


def run(job: Job, rank: int, world: int, log: Callable[[str], None] = print) -> None:
    """The launching process (`run_in_process`): generate what is missing, judge every pair in
    both orders, write results."""
    _quiet_transformers()
    from bdctl.judges import Pair, VerdictCache, judge_pairs
    from bdctl.judges.stats import win_rate
    from bdctl.tracking import StepProgress

    info, config, out = job.info, stage_config(job), job.stage_dir
    eval_dir = job.run.stage(EVAL_STAGE)
    missing = [u for u in info["units"] if unit_done(eval_dir, u) is None]
    if missing:
        log(f"judge: generating {len(missing)} missing answer set(s): {', '.join(u['ref'] for u in missing)}")
        total = sum(s["examples"] for s in info["sets"]) * len(missing)
        with StepProgress("generate", total, enabled=True) as progress:
            generate_units(eval_dir, info, missing, 0, 1, job.recipe.seed, progress)

    examples = read_set(eval_dir, info["eval_set"])
    answers = {u["ref"]: {r["prompt_id"]: r["text"] for r in read_generations(eval_dir, u)} for u in info["units"]}
    names = {u["ref"]: u["model"] for u in info["units"]}
    candidate = info["candidate"]
    backend = _openai_judge(config) if info["judge"]["backend"] == "openai" else _LazyHFJudge(info["judge"], config)
    records, judged, started = {}, {}, time.time()
    with VerdictCache(out / VERDICTS_FILE) as cache, _VerdictProgress() as progress:
        cached = len(cache)
        for baseline in info["baselines"]:
            mine, theirs = answers[candidate], answers[baseline]
            pairs = [Pair(str(e["id"]), e["instruction"], e["input"], mine[e["id"]], theirs[e["id"]]) for e in examples]
            judged[baseline] = judge_pairs(backend, pairs, cache, on_verdict=progress.callback(f"judge vs {baseline}"))
            records[baseline] = win_rate(judged[baseline], seed=job.recipe.seed)
        new_verdicts = len(cache) - cached
    check_unparsed(config, judged, records)
    for baseline, results in judged.items():
        _write_judgments(out / "judgments" / f"{names[candidate]}_vs_{names[baseline]}.jsonl", results)
    write_results(job, records, dict(backend.identity), new_verdicts=new_verdicts, seconds=time.time() - started)


def check_unparsed(config: JudgeStage, judged: Mapping[str, Sequence], records: Mapping) -> None:
    """Fail when too many of a baseline's judgments stayed unreadable: a win rate over the few
    that parsed would stand for a judge that mostly did not answer."""
    from bdctl.judges import PARSE_TRIES

    for baseline, record in records.items():
        total = 2 * len(judged[baseline])
        if total and record.unparseable > config.max_unparsed * total:
            example = next(j.raw for r in judged[baseline] for j in r.judgments if j.verdict is None)
            example = " ".join(example.split())
            example = example[:60] + ("..." if len(example) > 60 else "")
            raise UserError(
                f"judge: {record.unparseable} of {total} judgments against {baseline} "
                f"({100 * record.unparseable / total:.1f}%) were not A, B or Tie after {PARSE_TRIES} tries "
                f"(e.g. {example!r}); stages.judge.max_unparsed allows {100 * config.max_unparsed:g}%: fix the judge "
                "(endpoint, model) and run the command again (the verdicts that parsed are kept)"
            )


def _write_judgments(path: Path, results: Sequence) -> None:
    lines = []
    for result in results:
        orders = {j.order: {"verdict": j.verdict, "raw": j.raw, "outcome": j.outcome} for j in result.judgments}
        lines.append(json.dumps({"prompt_id": result.prompt_id, **orders, "score": result.score}, ensure_ascii=False))
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def results_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per baseline: counts per judgment (two per prompt), win rate and 95% CI in %, and
    beside them how far the judge followed the answers rather than their positions."""
    headers = ["baseline", "wins", "ties", "losses", "unparsed", "pairs", "win %", "95% CI", "consistent %",
               "first pos. %", "position-driven"]  # fmt: skip
    rows = []
    for baseline, r in results["baselines"].items():
        ci = "n/a" if r["ci_low"] is None else f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        driven = "n/a" if r["consistency"] is None else ("YES" if r["position_driven"] else "no")
        rows.append([baseline, r["wins"], r["ties"], r["losses"], r["unparseable"], r["pairs"], _percent(r["win_rate"]),
                     ci, _percent(r["consistency"]), _percent(r["first_position"]), driven])  # fmt: skip
    return headers, rows


def position_warning(results: dict[str, Any]) -> str | None:
    """One line naming the baselines against which the judge was position-driven, or None."""
    driven = {name: r for name, r in results["baselines"].items() if r["position_driven"]}
    if not driven:
        return None
    which = ", ".join(
        f"{name} ({_percent(r['consistency'])}% consistent, first answer picked in {_percent(r['first_position'])}% "
        "of decisive verdicts)"
        for name, r in driven.items()
    )
    return (
        f"position-driven judge: against {which}, the verdicts followed the answers' positions more often than the "
        f"answers (consistency below {100 * results['position_driven_below']:.0f}%): those win rates measure answer "
        "order, not quality; use a stronger judge"
    )


def write_results(job: Job, records: dict, identity: dict, new_verdicts: int, seconds: float) -> dict[str, Any]:
    from bdctl.judges.figure import win_rate_chart
    from bdctl.judges.stats import POSITION_DRIVEN_BELOW
    from bdctl.tables import csv_table, markdown_table

    info, out, config = job.info, job.stage_dir, stage_config(job)
    results = {
        "candidate": info["candidate"],
        "eval_set": info["eval_set"],
        "protocol": info.get("protocol"),
        "seed": config.seed,
        "judge": identity,
        "position_driven_below": POSITION_DRIVEN_BELOW,
        "baselines": {
            name: {
                "wins": r.wins,
                "ties": r.ties,
                "losses": r.losses,
                "unparseable": r.unparseable,
                "pairs": r.pairs,
                "judgments": r.judgments,
                "win_rate": _number(r.win_rate),
                "ci_low": _number(r.ci_low),
                "ci_high": _number(r.ci_high),
                "consistency": _number(r.consistency),
                "consistent_pairs": r.consistent,
                "both_orders_parsed": r.both_parsed,
                "first_position": _number(r.first_position),
                "position_driven": r.position_driven,
            }
            for name, r in records.items()
        },  # fmt: skip
        "verdicts": {"new": new_verdicts, "seconds": round(seconds, 3)},
    }
    write_json_atomic(out / "results.json", results)
    headers, rows = results_table(results)
    warning = position_warning(results)  # under the table, so that the report shows it too
    note = f"\n**Warning:** {warning}\n" if warning else ""
    write_text_atomic(out / "table.md", markdown_table(headers, rows) + note)
    csv_headers = ["baseline", "wins", "ties", "losses", "unparseable", "pairs", "win_rate", "ci_low", "ci_high",
                   "consistency", "first_position", "position_driven"]  # fmt: skip
    csv_rows = [[name] + [r[key] for key in csv_headers[1:]] for name, r in results["baselines"].items()]
    write_text_atomic(out / "table.csv", csv_table(csv_headers, csv_rows))
    # The chart is drawn to a temporary name and renamed, like every other output.
    tmp = out / ".win_rates.png.tmp"
    judge_name = config.api_model if identity["backend"] == "openai" else config.hf_model
    win_rate_chart(
        records, tmp, model_name=info["candidate"],
        title=f"{info['candidate']} vs baselines: {info['eval_set']}, seed {config.seed}, judge {judge_name}",
    )  # fmt: skip
    os.replace(tmp, out / "win_rates.png")
    mark_complete(out, stage=STAGE, candidate=info["candidate"], baselines=list(records), results="results.json")
    return results
