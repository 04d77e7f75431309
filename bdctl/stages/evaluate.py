"""`bdctl eval`: Rouge-L of one or more models on the recipe's evaluation sets, over seeds.

METHOD.md section 5: every prompt of a set is answered once per seed and sampling protocol
(stages.eval.protocols: a name, temperature, top_p and top_k each; optionally MiniLLM's
no_repeat_ngram_size); each answer is scored with Rouge-L against its references
(`bdctl.metrics.rouge_l`); a model's score on a set for one seed is the mean over prompts, and
the tables report the mean ± std over the seeds, one table per protocol. Every model is sampled
under every protocol, so two numbers are only ever compared under the same one. A training stage
that kept a best export per protocol (select_each_protocol) is scored under each protocol with the
export chosen under it (its manifest's best_per_protocol); otherwise with its one export.

The work is cut into units, one per (model, protocol, eval set, seed), each stored on its own:

    eval/
      sets/<set>.jsonl                               the set as evaluated: id, instruction, input,
                                                     prompt, references
      generations/<model>/<protocol>/<set>/seed<S>.jsonl      one line per prompt: model, protocol,
                                                     set, seed, prompt_id, text, rouge_l, finish_reason, tokens
      generations/<model>/<protocol>/<set>/seed<S>.done.json  the unit's manifest: fingerprint,
                                                     count, mean Rouge-L, sha256 of the JSONL; written second
      results.json table.md table.csv               the models, protocols, sets and seeds of the latest command
      MANIFEST.json                                  written last

Reuse. A unit counts as finished only when its `.done.json` exists, names the unit's current
fingerprint (everything that decides its text: the weights' identity, the tokenizer, the set's
content, the seed, the sampling settings, precision and batch size) and the hash of its JSONL.
Both files are written atomically, the JSONL first, so an interrupted run leaves only finished
units. `bdctl eval` never deletes a unit: a rerun, with the same or more models, generates only
the units that are missing or stale (their model was retrained, the set or a setting changed),
and `--force` regenerates the requested ones. Because the stage directory keeps growing, its
MANIFEST.json means "results.json and the tables are finished for the models, sets and seeds the
manifest lists": it is removed when a command starts and written when that command's results are.
`bdctl judge` reads (and, if asked, adds) units directly, through the same functions.

Ranks. Each rank holds a whole copy of the model (generation needs no ZeRO partitioning, hence no
collectives but the final gather). A set's prompts are cut into length-grouped batches once, the
same for every world size, and rank r takes batches r, r + W, r + 2W, ...; each prompt's random
numbers come from a seed derived from (seed, prompt id). A prompt is therefore sampled in the same
batch with the same random numbers whatever the number of ranks, and the generations do not
depend on it. Rank 0 gathers the answers (`torch.distributed.gather_object`) and writes each unit,
then the results.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bdctl.answers import prompt_seed, protocol_label, sample_answers
from bdctl.errors import UserError
from bdctl.job import Job, resolve_weights
from bdctl.launch import LaunchOptions, dry_run_text, launch
from bdctl.recipe.schema import EvalSet, EvalStage, ModelSpec
from bdctl.rundir import (
    MANIFEST,
    PREEMPT,
    manifest,
    mark_complete,
    read_json,
    stage_lock,
    write_json_atomic,
    write_text_atomic,
)
from bdctl.submit import plan, require_finished, save_job, wait_for_job

STAGE = "eval"
# Bump when the way a unit's text is produced changes (decoding, seeding): old units turn stale.
UNIT_VERSION = 2
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def stage_dir(options: dict) -> str:
    return STAGE


def stage_config(job: Job) -> EvalStage:
    return job.recipe.stages.eval


# --------------------------------------------------------------------------- the launching process


def submit(
    recipe_arg: str,
    overrides: list[str],
    options: dict[str, Any],
    launch_options: LaunchOptions,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Job:
    """Plan, check, generate what is missing, write results: `bdctl eval`.

    Not `bdctl.submit.submit`, which treats a stage directory as all-or-nothing (a finished one is
    skipped, an unfinished one wiped): eval keeps its finished units across commands.
    """
    from bdctl.engine import quiet_libraries

    quiet_libraries()
    job = plan(STAGE, recipe_arg, overrides, options, launch_options)
    job_file = job.stage_dir / "job.json"
    if launch_options.dry_run:
        log(dry_run_text(job_file, launch_options))
        return job
    if not launch_options.is_primary:  # node 0 / SLURM task 0 plans; the others run its job
        wait_for_job(job, job_file, log)
        launch(job_file, launch_options)
        return job
    with stage_lock(job.stage_dir):  # one command at a time writes eval/
        _run_primary(job, job_file, launch_options, force, log)
    return job


def _run_primary(job: Job, job_file: Path, launch_options: LaunchOptions, force: bool, log) -> None:
    """Node 0's part of `submit`, under the stage's lock."""
    job.info["force"] = force
    prepare(job, log)
    # From here until write_results the directory's results are being replaced.
    (job.stage_dir / MANIFEST).unlink(missing_ok=True)
    units, todo = job.info["units"], job.info["todo"]
    log(f"eval: {len(units)} (model, set, seed) results: {len(units) - len(todo)} reused, {len(todo)} to generate")
    save_job(job, job_file)
    # Ranks started by other launchers (SLURM tasks, other nodes) wait for this job: start ours too.
    alone = launch_options.mode != "slurm" and launch_options.nnodes == 1
    if todo or not alone:
        shutil.rmtree(job.stage_dir / "logs", ignore_errors=True)
        launch(job_file, launch_options)
    else:
        write_results(job)  # nothing to generate: no rank needs to start
    require_finished(job)


def prepare(job: Job, log: Callable[[str], None] = print) -> None:
    """Launching process: resolve models, load and check the sets, decide which units to run.

    Fills job.info with everything the ranks need (models, sets, units, todo), so that no rank
    resolves a name or reads a hub data set on its own.
    """
    config = stage_config(job)
    refs = list(dict.fromkeys(job.options.get("models") or config.models))
    if not refs:
        raise UserError("stages.eval.models is empty; name a model with --model")
    plan_ = plan_units(job, refs, config.sets, config.seeds, log)
    force = bool(job.info.get("force"))
    todo = [unit for unit in plan_["units"] if force or not unit_done(job.stage_dir, unit)]
    job.info.update(plan_, todo=todo)


def plan_units(
    job: Job,
    refs: Sequence[str],
    sets: Sequence[EvalSet],
    seeds: Sequence[int],
    log,
    protocols: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Models x protocols x sets x seeds as units with their fingerprints (shared with `bdctl
    judge`, which asks for one protocol; None: every protocol of stages.eval)."""
    config = stage_config(job)
    chosen = [config.protocol(name) for name in protocols] if protocols is not None else list(config.protocols)
    if not seeds:
        raise UserError("stages.eval.seeds is empty; give at least one sampling seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"stages.eval.seeds {list(seeds)} repeats a seed")
    names = [s.name for s in sets]
    if not sets:
        raise UserError("stages.eval.sets is empty; add an evaluation set")
    for name in names:
        if not _SET_NAME.match(name):
            raise UserError(f"eval set name {name!r}: use letters, digits, '.', '_' or '-' (it names a directory)")
    if len(set(names)) != len(names):
        raise UserError(f"stages.eval.sets: two sets share a name ({', '.join(names)})")
    sets_info = [materialize_set(job, spec, log) for spec in sets]
    models = [describe_model(job, ref) for ref in refs]
    seen: dict[str, str] = {}
    for model in models:
        if model["name"] in seen:
            raise UserError(
                f"models {seen[model['name']]!r} and {model['ref']!r} would share the directory name {model['name']!r}"
            )
        seen[model["name"]] = model["ref"]
        check_lengths(job, model, sets_info, config)
    precision = _precision(job.recipe)
    settings = {
        "max_new_tokens": config.max_new_tokens,
        "no_repeat_ngram_size": config.no_repeat_ngram_size,
        "batch_size": config.batch_size,  # batch composition changes float rounding, hence samples
        "precision": precision,
        "version": UNIT_VERSION,
    }
    units = []
    for model in models:
        for protocol in chosen:
            weights = model["weights"].get(protocol.name, model["path"])
            for set_info in sets_info:
                for seed in seeds:
                    payload = {
                        "model": model["identity"], "weights": weights, "tokenizer": model["tokenizer"],
                        "set": set_info["sha256"], "seed": seed, "sampling": protocol.sampling(), "settings": settings,
                    }  # fmt: skip
                    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
                    units.append(
                        {"model": model["name"], "ref": model["ref"], "protocol": protocol.name, "weights": weights,
                         "set": set_info["name"], "seed": seed, "fingerprint": fingerprint}
                    )  # fmt: skip
    return {
        "models": models, "protocols": [p.model_dump() for p in chosen], "sets": sets_info, "seeds": list(seeds),
        "settings": settings, "units": units,
    }  # fmt: skip


# --------------------------------------------------------------------------- models


def model_dir_name(ref: str, kind: str) -> str:
    """A stable, filesystem-safe directory name for a model reference.

    Stages keep their name ("distill/bd" -> "distill-bd"); hub ids swap "/" for "--"; local
    directories get their last component plus a hash of the full path (two "export" dirs differ).
    """
    if kind == "stage":
        name = ref.replace("/", "-")
    elif kind == "dir":
        path = Path(ref).expanduser().resolve()
        name = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    else:
        name = ref.replace("/", "--")
    return _SAFE.sub("_", name).strip("._") or "model"


def describe_model(job: Job, ref: str) -> dict[str, Any]:
    """Where a model reference's weights and tokenizer are, and what identifies the weights.

    Reads configs and tokenizer files only (no weights), so a typo fails here in one line.
    """
    if ref == "base":
        raise UserError(
            "eval model 'base' is ambiguous: name a stage (teacher_sft, distill/bd), a directory or a hub id"
        )
    if ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().is_dir():
        raise UserError(f"model {ref}: no such directory")
    source = resolve_weights(job, str(Path(ref).expanduser()) if ref.startswith("~") else ref)
    stage = job.run.stage(ref)
    finished = manifest(stage)
    if isinstance(source, Path) and finished is not None and source == job.run.export(ref):
        kind = "stage"
        # A rerun of the stage rewrites its export under the same path: its finish time tells.
        identity = {"stage": ref, "finished_at": finished.get("finished_at")}
    elif isinstance(source, Path):
        kind = "dir"
        source = source.resolve()
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.iterdir() if p.is_file())
        identity = {"dir": str(source), "files": files}
    else:
        assert isinstance(source, ModelSpec) and source.path is not None
        kind = "hub"
        identity = {"hub": source.path, "revision": source.revision}
    path = str(source) if isinstance(source, Path) else source.path
    revision = None if isinstance(source, Path) else source.revision
    # A stage that kept a best export per protocol (select_each_protocol): protocol -> its export.
    weights = {}
    if kind == "stage" and finished is not None:
        for name, kept in (finished.get("best_per_protocol") or {}).items():
            if (stage / kept["export"]).is_dir():
                weights[name] = str(stage / kept["export"])
    tokenizer = {"path": path, "revision": revision}
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    has_tokenizer = isinstance(source, Path) and any((source / f).is_file() for f in tokenizer_files)
    if isinstance(source, Path) and not has_tokenizer:
        if not job.run.tokenizer.is_dir():
            raise UserError(f"model {ref}: {source} holds no tokenizer and the run has no shared one")
        tokenizer = {"path": str(job.run.tokenizer.resolve()), "revision": None}
    from bdctl.models import max_positions

    positions = max_positions(source)
    return {
        "ref": ref, "name": model_dir_name(ref, kind), "kind": kind, "path": path, "revision": revision,
        "tokenizer": tokenizer, "identity": identity, "positions": positions, "weights": weights,
    }  # fmt: skip


def _precision(recipe) -> str:
    """engine.resolve_precision's rule, without importing DeepSpeed in the launching process."""
    if recipe.deepspeed.precision != "auto":
        return recipe.deepspeed.precision
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _tokenizer(model: dict[str, Any]):
    from bdctl.models import load_tokenizer

    return load_tokenizer(model["tokenizer"]["path"], model["tokenizer"]["revision"])


def check_lengths(job: Job, model: dict[str, Any], sets_info: list[dict], config: EvalStage) -> None:
    """Longest prompt + max_new_tokens must fit the model's positions (else sampling would fail
    half-way through a run, on one rank)."""
    if model["positions"] is None:
        return
    tokenizer = _tokenizer(model)
    for set_info in sets_info:
        examples = read_set(job.run.stage(STAGE), set_info["name"])
        longest = max(len(ids) for ids in tokenizer([e["prompt"] for e in examples])["input_ids"])
        if longest + config.max_new_tokens > model["positions"]:
            room = model["positions"] - longest
            raise UserError(
                f"model {model['ref']} has {model['positions']} positions: eval set {set_info['name']!r}'s longest "
                f"prompt ({longest} tokens) + stages.eval.max_new_tokens ({config.max_new_tokens}) do not fit; "
                + (f"set stages.eval.max_new_tokens to at most {room}" if room > 0 else "shorten the prompts")
            )


# --------------------------------------------------------------------------- eval sets


def set_file(eval_dir: Path, name: str) -> Path:
    return eval_dir / "sets" / f"{name}.jsonl"


def read_set(eval_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in set_file(eval_dir, name).read_text(encoding="utf-8").splitlines() if line]


def load_set(job: Job, spec: EvalSet, log) -> list[dict]:
    """The examples of one eval set: id, instruction, input, prompt (rendered), references."""
    where_set = f"eval set {spec.name!r}"
    if spec.split is not None:
        from bdctl.data.prepare import prepare_data, read_split

        prepare_data(job.recipe, job.run, log)
        rows = read_split(job.run.data, spec.split)[: spec.limit]
        examples = [
            {"id": row["id"], "instruction": row["instruction"], "input": row["input"], "prompt": row["prompt"],
             "references": [row["output"]] if isinstance(row["output"], str) else list(row["output"])}
            for row in rows
        ]  # fmt: skip
        for example in examples:
            _check_references(example, f"{job.run.data / spec.split}.jsonl id {example['id']}", where_set)
    else:
        from bdctl.data.sources import read_hub, read_records, to_instruction
        from bdctl.data.template import render_prompt

        if spec.path:
            records = read_records(spec.path)
        else:
            assert spec.hub is not None  # EvalSet: exactly one of split, path, hub
            records = read_hub(spec.hub, spec.hub_config, spec.hub_split)
        examples = []
        for index, (where, record) in enumerate(records):
            if spec.limit is not None and index >= spec.limit:
                break
            if isinstance(record, dict) and spec.fields.output not in record:
                raise UserError(
                    f"{where}: {where_set} has no reference answers (no field {spec.fields.output!r}); "
                    f"Rouge-L needs them: set its fields.output to the column that holds them"
                )
            example = to_instruction(where, record, spec.fields, references=True)
            examples.append(
                {"id": index, "instruction": example["instruction"], "input": example["input"],
                 "prompt": render_prompt(example["instruction"], example["input"], job.recipe.data.template),
                 "references": example["output"]}
            )  # fmt: skip
            _check_references(examples[-1], where, where_set)
    if not examples:
        raise UserError(f"{where_set} has no examples")
    return examples


def _check_references(example: dict, where: str, where_set: str) -> None:
    if not any(isinstance(r, str) and r.strip() for r in example["references"]):
        raise UserError(f"{where}: {where_set} has an example without a reference answer; Rouge-L needs at least one")


def materialize_set(job: Job, spec: EvalSet, log) -> dict[str, Any]:
    """Write the set to eval/sets/<name>.jsonl (only if its content changed) and describe it."""
    examples = load_set(job, spec, log)
    ids = [e["id"] for e in examples]
    if len(set(ids)) != len(ids):
        raise UserError(f"eval set {spec.name!r}: example ids repeat")
    text = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in examples)
    path = set_file(job.run.stage(STAGE), spec.name)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
    return {"name": spec.name, "examples": len(examples), "sha256": hashlib.sha256(text.encode()).hexdigest()}


# --------------------------------------------------------------------------- units


def unit_paths(eval_dir: Path, unit: dict[str, Any]) -> tuple[Path, Path]:
    """(generations JSONL, unit manifest) of a unit."""
    base = eval_dir / "generations" / unit["model"] / unit["protocol"] / unit["set"]
    return base / f"seed{unit['seed']}.jsonl", base / f"seed{unit['seed']}.done.json"


def unit_done(eval_dir: Path, unit: dict[str, Any]) -> dict | None:
    """The unit's manifest if the unit is finished and current, else None."""
    data, done = unit_paths(eval_dir, unit)
    if not done.is_file() or not data.is_file():
        return None
    try:
        info = read_json(done)
    except (OSError, ValueError):
        return None
    if info.get("fingerprint") != unit["fingerprint"]:
        return None
    if info.get("sha256") != hashlib.sha256(data.read_bytes()).hexdigest():
        return None  # the generations were edited or replaced by hand: regenerate rather than trust
    return info


def read_generations(eval_dir: Path, unit: dict[str, Any]) -> list[dict]:
    data, _ = unit_paths(eval_dir, unit)
    return [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line]


def _device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def generate_units(
    eval_dir: Path,
    info: dict[str, Any],
    units: list[dict[str, Any]],
    rank: int,
    world: int,
    seed: int,
    progress=None,
    stop_file: Path | None = None,
) -> None:
    """Generate and score `units` (rank r: its share of every set's batches); rank 0 writes them.

    Every rank must call this with the same units (the gather is collective). Once `stop_file`
    exists (the launching process got SIGTERM / SIGUSR1), the rank stops after its current batch
    with exit code 75: finished units are kept, the unit in progress is generated again by the
    next command. A rank that stops leaves the others waiting in the gather, where the launcher
    (torchrun, srun) ends them when it sees the first rank exit.
    """
    import torch

    from bdctl.models import load_model

    settings = info["settings"]
    sampling = {p["name"]: {k: p[k] for k in ("temperature", "top_p", "top_k")} for p in info["protocols"]}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings["precision"], torch.float32)
    device = _device()
    for model in info["models"]:
        mine = [u for u in units if u["model"] == model["name"]]
        tokenizer = _tokenizer(model) if mine else None
        # One load per distinct weights (a stage may have one export per protocol).
        for weights in dict.fromkeys(u["weights"] for u in mine):
            if model["kind"] == "hub":
                source: ModelSpec | Path = ModelSpec(path=model["path"], revision=model["revision"])
            else:
                source = Path(weights)
            network = load_model(source, tokenizer, seed).to(device=device, dtype=dtype).eval()
            _generate_model_units(eval_dir, info, [u for u in mine if u["weights"] == weights], network, tokenizer,
                                  sampling, rank, world, progress, stop_file)  # fmt: skip
            del network


def _generate_model_units(eval_dir, info, mine, network, tokenizer, sampling, rank, world, progress, stop_file) -> None:
    """The units of one loaded model (its protocols, sets and seeds); rank 0 writes each."""
    from bdctl.metrics import rouge_l
    from bdctl.sampling import length_grouped_batches
    from bdctl.training import Preempted

    settings = info["settings"]
    model = next(m for m in info["models"] if m["name"] == mine[0]["model"])
    for set_info in info["sets"]:
        set_units = [u for u in mine if u["set"] == set_info["name"]]
        if not set_units:
            continue
        examples = read_set(eval_dir, set_info["name"])
        prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
        # The same batches for every world size; this rank's are every world-th of them.
        batches = length_grouped_batches([len(p) for p in prompts], settings["batch_size"])[rank::world]
        for unit in set_units:
            started = time.time()
            records = []
            for batch in batches:
                answers = sample_answers(
                    network, tokenizer, [prompts[i] for i in batch],
                    [prompt_seed(unit["seed"], examples[i]["id"]) for i in batch], sampling=sampling[unit["protocol"]],
                    max_new_tokens=settings["max_new_tokens"], no_repeat_ngram_size=settings["no_repeat_ngram_size"],
                )  # fmt: skip
                for i, answer in zip(batch, answers, strict=True):
                    records.append(
                        (i, {"model": model["ref"], "protocol": unit["protocol"], "set": unit["set"],
                             "seed": unit["seed"], "prompt_id": examples[i]["id"], "text": answer.text,
                             "rouge_l": rouge_l(answer.text, examples[i]["references"]),
                             "finish_reason": answer.finish_reason, "tokens": answer.tokens})
                    )  # fmt: skip
                if progress is not None:
                    progress.update(
                        len(batch), unit=f"{model['ref']} {unit['protocol']} {unit['set']} seed {unit['seed']}"
                    )
                if stop_file is not None and stop_file.exists():
                    raise Preempted(
                        f"preempted during {model['ref']} on {unit['set']} ({unit['protocol']}, seed {unit['seed']}); "
                        "finished results are kept: run the same command again to continue"
                    )
            records = _gather(records, rank, world)
            if rank == 0:
                ordered = [record for _, record in sorted(records, key=lambda pair: pair[0])]  # set order
                _write_unit(eval_dir, unit, ordered, world, time.time() - started)


def _gather(records: list, rank: int, world: int) -> list:
    if world == 1:
        return records
    import torch.distributed as dist

    parts: list | None = [None] * world if rank == 0 else None
    dist.gather_object(records, parts, dst=0)
    return [record for part in parts for record in part] if parts is not None else []


def _write_unit(eval_dir: Path, unit: dict, records: list[dict], world: int, seconds: float) -> None:
    """The JSONL first, then its manifest: a unit without the manifest does not count."""
    from bdctl.metrics import mean_std

    data, done = unit_paths(eval_dir, unit)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(data, text)
    write_json_atomic(
        done,
        {"fingerprint": unit["fingerprint"], "model": unit["ref"], "protocol": unit["protocol"],
         "weights": unit["weights"], "set": unit["set"], "seed": unit["seed"],
         "prompts": len(records), "rouge_l": mean_std([r["rouge_l"] for r in records])[0],
         "sha256": hashlib.sha256(text.encode()).hexdigest(), "world_size": world,
         "seconds": round(seconds, 3), "finished_at": time.time()},
    )  # fmt: skip


# --------------------------------------------------------------------------- every rank


def run(job: Job, rank: int, world: int) -> None:
    """Every rank: generate its share of the missing units; rank 0 writes them and the results."""
    import torch.distributed as dist

    from bdctl.tracking import StepProgress

    info = job.info
    todo = info["todo"]
    # Rank 0's own share of prompts (the bar's total): every world-th length-grouped batch.
    batch_size = info["settings"]["batch_size"]
    sizes = {s["name"]: s["examples"] for s in info["sets"]}
    mine = sum(_share(sizes[u["set"]], batch_size, 0, world) for u in todo)
    with StepProgress("eval", mine, enabled=rank == 0) as progress:
        generate_units(job.stage_dir, info, todo, rank, world, job.recipe.seed, progress, job.stage_dir / PREEMPT)
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_results(job)


def _share(n: int, batch_size: int, rank: int, world: int) -> int:
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return sum(sizes[rank::world])


# --------------------------------------------------------------------------- results


def results_table(results: dict[str, Any], protocol: str) -> tuple[list[str], list[list[Any]]]:
    """One protocol's table: models as rows, sets as columns, "mean ± std" over seeds (Table 1)."""
    from bdctl.tables import mean_std_cell

    headers = ["model"] + list(results["sets"])
    scores = results["scores"][protocol]
    rows = [
        [model] + [mean_std_cell(scores[model][s]["mean"], scores[model][s]["std"]) for s in results["sets"]]
        for model in results["models"]
    ]
    return headers, rows


def write_results(job: Job) -> dict[str, Any]:
    """results.json, table.md, table.csv from the finished units, then the MANIFEST."""
    from bdctl.metrics import mean_std
    from bdctl.tables import csv_table, markdown_table

    info, out = job.info, job.stage_dir
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol in info["protocols"]:
        by_model = scores[protocol["name"]] = {}
        for model in info["models"]:
            by_model[model["ref"]] = {}
            for set_info in info["sets"]:
                per_seed, weights = {}, None
                for unit in info["units"]:
                    if (unit["model"], unit["protocol"], unit["set"]) == (
                        model["name"],
                        protocol["name"],
                        set_info["name"],
                    ):
                        done = unit_done(out, unit)
                        if done is None:
                            raise UserError(
                                f"{unit_paths(out, unit)[0]}: missing after generation; run the command again"
                            )
                        per_seed[str(unit["seed"])] = done["rouge_l"]
                        weights = unit["weights"]
                mean, std = mean_std(list(per_seed.values()))
                by_model[model["ref"]][set_info["name"]] = {
                    "mean": mean, "std": std, "per_seed": per_seed, "prompts": set_info["examples"], "weights": weights,
                }  # fmt: skip
    results = {
        "metric": "rouge_l",
        "models": [m["ref"] for m in info["models"]],
        "model_dirs": {m["ref"]: m["name"] for m in info["models"]},
        "protocols": info["protocols"],
        "sets": [s["name"] for s in info["sets"]],
        "seeds": info["seeds"],
        "settings": info["settings"],
        "scores": scores,
        "units": {
            "total": len(info["units"]),
            "generated": len(info["todo"]),
            "reused": len(info["units"]) - len(info["todo"]),
        },
    }
    write_json_atomic(out / "results.json", results)
    blocks = []
    for protocol in info["protocols"]:
        headers, rows = results_table(results, protocol["name"])
        blocks.append(f"### Protocol {protocol_label(protocol)}\n\n{markdown_table(headers, rows).strip()}\n")
    write_text_atomic(out / "table.md", "\n".join(blocks))
    csv_headers = ["protocol", "model"] + [f"{s}_{stat}" for s in results["sets"] for stat in ("mean", "std")]
    csv_rows = [
        [p["name"], m] + [scores[p["name"]][m][s][stat] for s in results["sets"] for stat in ("mean", "std")]
        for p in info["protocols"]
        for m in results["models"]
    ]
    write_text_atomic(out / "table.csv", csv_table(csv_headers, csv_rows))
    mark_complete(
        out, stage=STAGE, models=results["models"], protocols=[p["name"] for p in info["protocols"]],
        sets=results["sets"], seeds=results["seeds"], results="results.json",
    )  # fmt: skip
    return results
