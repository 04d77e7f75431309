"""Eval units: the answers a model gives to an eval set under one sampling protocol and seed.

`bdctl eval` (stages/evaluate.py) scores them and `bdctl judge` (stages/judge.py) compares them;
both plan, find, read and (when missing) generate units through this module, so the two stages
share one definition of a unit and neither is a library for the other. The layout, the
fingerprint and the reuse rule are described in stages/evaluate.py's docstring.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bdctl.answers import prompt_seed, sample_answers
from bdctl.errors import UserError
from bdctl.job import Job, resolve_weights
from bdctl.recipe.schema import EvalSet, EvalStage, ModelSpec
from bdctl.rundir import manifest, read_json, write_json_atomic, write_text_atomic

EVAL_STAGE = "eval"  # the stage directory units live in
# Bump when the way a unit's text is produced changes (decoding, seeding): old units turn stale.
UNIT_VERSION = 2
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    config = job.recipe.stages.eval
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
        # README.md aside: eval rewrites the model cards of the exports it scores (update_model_cards)
        files = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in source.iterdir()
            if p.is_file() and p.name != "README.md"
        )
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
    if job.recipe.data.template == "chat":  # answers end at the template's end-of-turn token (models.stop_id)
        tokenizer["template"] = "chat"
    from bdctl.models import max_positions, role_of

    positions = max_positions(source)
    return {
        "ref": ref, "name": model_dir_name(ref, kind), "kind": kind, "path": path, "revision": revision,
        "tokenizer": tokenizer, "identity": identity, "positions": positions, "weights": weights,
        # the attention kernel of the role these weights belong to (models.<role>.attn_implementation)
        "attn_implementation": getattr(job.recipe.models, role_of(ref)).attn_implementation,
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

    spec = model["tokenizer"]
    return load_tokenizer(spec["path"], spec["revision"], template=spec.get("template"))


def check_lengths(job: Job, model: dict[str, Any], sets_info: list[dict], config: EvalStage) -> None:
    """Longest prompt + max_new_tokens must fit the model's positions (else sampling would fail
    half-way through a run, on one rank)."""
    if model["positions"] is None:
        return
    tokenizer = _tokenizer(model)
    for set_info in sets_info:
        examples = read_set(job.run.stage(EVAL_STAGE), set_info["name"])
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
            assert spec.hub is not None  # the schema asks for one of split, path and hub
            records = read_hub(spec.hub, spec.hub_config, spec.hub_split)
        template, tokenizer = job.recipe.data.template, None
        if template == "chat":  # prompts in the run's tokenizer's own chat template, as its training data
            from bdctl.data.prepare import prepare_data
            from bdctl.models import load_tokenizer

            prepare_data(job.recipe, job.run, log)
            tokenizer = load_tokenizer(job.run.tokenizer, template=template)
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
                 "prompt": render_prompt(example["instruction"], example["input"], template, tokenizer,
                                         job.recipe.data.system_prompt),
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
    path = set_file(job.run.stage(EVAL_STAGE), spec.name)
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
            source: ModelSpec | Path = (
                ModelSpec(path=model["path"], revision=model["revision"]) if model["kind"] == "hub" else Path(weights)
            )
            attention = model.get("attn_implementation")
            network = load_model(source, tokenizer, seed, attention).to(device=device, dtype=dtype).eval()
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
                    record = {
                        "model": model["ref"], "protocol": unit["protocol"], "set": unit["set"], "seed": unit["seed"],
                        "prompt_id": examples[i]["id"], "text": answer.text,
                        "rouge_l": rouge_l(answer.text, examples[i]["references"]),
                        "finish_reason": answer.finish_reason, "tokens": answer.tokens,
                    }  # fmt: skip
                    records.append((i, record))
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
