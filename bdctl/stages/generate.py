"""`bdctl generate`: the teacher's data D* and its sparse top-p cache, in one pass (docs/method.md §2, 5).

Bellman Distill is offline. The teacher samples `n_samples` responses per training prompt
(temperature 1, no top-k, no top-p by default; `top_p < 1` samples inside the teacher's capped
top-p set, the very set the cache stores, docs/method.md §3.4) and, at every position it generates, bdctl records its
top-p set of the raw temperature-1 distribution (ids and probabilities, at most `cache_max_k`),
so distillation never needs the teacher again. With `--score SPLIT` the teacher reads the golden
responses of a split instead of sampling, and writes the same cache (KD from the cache, BD on
external data).

    generate/                         score_<split>/ with --score, generate-<variant>/ with --variant
      cache/        the sparse cache (bdctl.cache): one shard per batch, MANIFEST.json last
      dstar.jsonl   one line per sample: prompt_id, sample_index, seed, prompt, response, ...
      sparsity.md sparsity.json sparsity.png   the paper's Figure 1 on this teacher
      metrics.jsonl logs/ job.json recipe.yaml
      MANIFEST.json written last

Work and its order. A work item is one (prompt, sample index) pair with its own seed, derived
from (recipe seed, prompt id, sample index) only. Items are grouped into batches of similar
prompt length; the list of batches depends on the data and the recipe only, never on the number
of ranks, and rank r takes batches r, r + world, ... The sampler draws each row from its own
seed, so a sample is the same whichever rank runs its batch: one rank and eight give the same
D*, bit for bit.

Resume. Each batch is flushed as one cache shard, visible only once complete. A rerun of the
same command (the launching process sees shards and calls `resumable`) skips every batch already
in the cache and computes the others exactly as an uninterrupted run would, so the final cache
and D* are identical. A rerun may even use another number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bdctl.errors import UserError
from bdctl.job import Job, resolve_weights
from bdctl.recipe.schema import GenerateStage, ModelSpec
from bdctl.rundir import PREEMPT, manifest, read_json

SPLITS = ("train", "valid", "test")
log = logging.getLogger("bdctl.generate")


def stage_dir(options: dict) -> str:
    if options.get("score"):
        return f"score_{options['score']}"
    return f"generate-{options['variant']}" if options.get("variant") else "generate"


def stage_config(job: Job) -> GenerateStage:
    """stages.generate, with the changes of the D* variant this job makes (--variant)."""
    return job.recipe.stages.generate.variant(job.options.get("variant"))


# --------------------------------------------------------------------------- launching process


def prepare(job: Job, log=print) -> None:
    """Launching process: data split, teacher export, vocabulary, prompt file, lengths."""
    from bdctl.data.prepare import prepare_data
    from bdctl.models import check_vocabularies, load_tokenizer

    variants = job.recipe.stages.generate.variants
    if job.options.get("variant") is not None:
        if job.options["variant"] not in variants:
            known = ", ".join(variants) or "none: the recipe sets no stages.generate.variants"
            raise UserError(f"--variant {job.options['variant']}: no such D* in stages.generate.variants ({known})")
        if job.options.get("score"):
            raise UserError("--variant and --score do not go together: scoring samples nothing")
    config = stage_config(job)
    split = job.options.get("score") or "train"
    if split not in SPLITS:
        raise UserError(f"--score: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    prepare_data(job.recipe, job.run, log)
    source = resolve_weights(job, config.model, "teacher")  # an unfinished teacher_sft stops here
    if isinstance(source, Path) and not (source / "config.json").is_file():
        raise UserError(
            f"{source}: the teacher export is missing or incomplete (no config.json); run its stage again with --force"
        )
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)
    check_vocabularies(job.recipe, tokenizer, {"teacher": source, "student": job.recipe.models.student})
    rows = read_rows(job.run.data / f"{split}.jsonl", scoring=bool(job.options.get("score")))

    from bdctl.models import max_positions

    positions = max_positions(source)
    if positions is not None and positions < job.recipe.data.max_length:
        raise UserError(
            f"the teacher accepts {positions} positions but data.max_length is {job.recipe.data.max_length}; "
            "lower data.max_length (prompt + response must fit the teacher)"
        )
    teacher = _describe(config.model, source)
    identity = {"teacher": teacher, "export": manifest(source) if isinstance(source, Path) else None}
    job.info.update(
        split=split,
        rows=len(rows),
        positions=positions,
        teacher=teacher,
        # What a partial cache must agree with to be continued (see `resumable`): the recipe as
        # it affects this stage, this stage's settings and the very teacher weights.
        resume_key=_digest([job.fingerprint(), config.model_dump(mode="json"), job.options, identity]),
    )


def resumable(job: Job) -> str | None:
    """Launching process, on a rerun: say what an unfinished run left to continue from, or None
    to start over. Called by `bdctl.submit.submit` (not with --force) after `prepare`."""
    from bdctl.cache import visible_shards, written_keys

    cache_dir = job.stage_dir / "cache"
    if not visible_shards(cache_dir):
        return None
    try:
        # Read raw, not through Job.load: only the key matters, whatever else the schema became.
        previous = read_json(job.stage_dir / "job.json")["info"].get("resume_key")
    except (OSError, ValueError, TypeError, KeyError):
        return None  # shards without a readable job description: nothing to vouch for them
    if previous != job.info["resume_key"]:
        raise UserError(
            f"{job.stage_dir}: an unfinished run made with other settings or another teacher is there; "
            "pass --force to start over (or restore the recipe it was made with)"
        )
    return f"{len(written_keys(cache_dir))} sequences already in the cache"


def read_rows(path: Path, scoring: bool) -> list[dict]:
    """The split's examples, each checked: a damaged file stops here with its line number."""
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found; run the data stage again (delete {path.parent})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable prompt file ({exc}); delete {path.parent} and run again") from None
    needed = ("id", "prompt", "output") if scoring else ("id", "prompt")
    rows, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}:{number}: unreadable prompt file ({exc.msg}); delete {path.parent} and run again"
            ) from None
        if not isinstance(row, dict) or any(key not in row for key in needed):
            raise UserError(
                f"{path}:{number}: expected an object with {', '.join(needed)}; delete {path.parent} and run again"
            )
        if not isinstance(row["id"], int) or not isinstance(row["prompt"], str) or not row["prompt"]:
            raise UserError(f"{path}:{number}: 'id' must be an integer and 'prompt' a non-empty string")
        if row["id"] in seen:
            raise UserError(f"{path}:{number}: prompt id {row['id']} appears twice")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


# --------------------------------------------------------------------------- work and batches


@dataclass(frozen=True)
class Item:
    """One sequence to produce: a sample of a prompt, or (scoring) a golden response."""

    prompt_id: int
    sample_index: int
    seed: int
    prompt: list[int]
    response: list[int] | None  # scoring: the response to read; generation: None
    limit: int  # generation: longest response allowed for this prompt


def sample_seed(recipe_seed: int, prompt_id: int, sample_index: int) -> int:
    """A sample's seed from (recipe seed, prompt id, sample index) alone: 63 bits of a hash, so
    neighbouring prompts and samples get unrelated random streams (fits int64 in the cache)."""
    digest = hashlib.sha256(f"bdctl-generate/{recipe_seed}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def work_items(job: Job, rows: list[dict], tokenizer) -> list[Item]:
    """Every sequence of the stage, in data order (prompt by prompt, sample by sample)."""
    config = stage_config(job)
    if job.options.get("score"):
        from bdctl.data.batching import tokenize_examples

        # As training tokenises them: prompt, then answer + EOS (the data stage kept them within max_length).
        examples = tokenize_examples(rows, tokenizer)
        return [
            Item(row["id"], 0, 0, e.ids[: e.prompt_len], e.ids[e.prompt_len :], 0)
            for row, e in zip(rows, examples, strict=True)
        ]
    prompts = tokenizer([row["prompt"] for row in rows])["input_ids"]
    items = []
    for row, prompt in zip(rows, prompts, strict=True):
        # prompt + response must fit the training length (MiniLLM generates up to max_length).
        limit = min(config.max_new_tokens, job.recipe.data.max_length - len(prompt))
        if limit < 1:
            raise UserError(f"prompt {row['id']} has {len(prompt)} tokens, no room left within data.max_length")
        for index in range(config.n_samples):
            items.append(Item(row["id"], index, sample_seed(job.recipe.seed, row["id"], index), prompt, None, limit))
    return items


def plan_batches(items: list[Item], batch_size: int, positions: int | None) -> list[list[int]]:
    """The global list of batches (item indices): by decreasing length, `batch_size` at most.

    A batch runs as long as its longest-allowed response, so it is cut further where its longest
    prompt plus the largest response limit would not fit the teacher's position table (only
    when max_new_tokens reaches past data.max_length - prompt length): each row is then exactly
    the sample it would be on its own, truncated at its own limit.
    """
    from bdctl.sampling import length_grouped_batches

    lengths = [len(item.prompt) + len(item.response or ()) for item in items]
    batches = []
    for group in length_grouped_batches(lengths, batch_size):
        start = 0
        for end in range(1, len(group) + 1):
            # The group runs longest first, so its first item is the longest prompt and the
            # current item has the largest limit so far.
            if end == len(group) or (positions and lengths[group[start]] + items[group[end]].limit > positions):
                batches.append(group[start:end])
                start = end
    return batches


# --------------------------------------------------------------------------- every rank


def run(job: Job, rank: int, world: int) -> None:
    """Every rank: its share of the batches into the cache; rank 0 then finalises everything."""
    import torch.distributed as dist

    from bdctl.cache import CacheWriter, written_keys
    from bdctl.data.prepare import read_split
    from bdctl.models import load_tokenizer
    from bdctl.tracking import MetricsLog, StepProgress
    from bdctl.training import Preempted

    config, out = stage_config(job), job.stage_dir
    cache_dir = out / "cache"
    scoring = bool(job.options.get("score"))
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)
    rows = read_split(job.run.data, job.info["split"])
    items = work_items(job, rows, tokenizer)
    batches = plan_batches(items, config.batch_size, job.info["positions"])
    teacher, lockstep = load_teacher(job, tokenizer, world)

    # --- what an earlier attempt left: every rank reads it before any rank writes again
    if rank == 0:
        (cache_dir / "MANIFEST.json").unlink(missing_ok=True)  # the cache changes: not final any more
    done = written_keys(cache_dir)
    dist.barrier()
    mine, pending = batches[rank::world], []
    for indices in mine:
        present = sum((items[i].prompt_id, items[i].sample_index) in done for i in indices)
        if 0 < present < len(indices):
            raise UserError(
                f"cache {cache_dir}: a batch is only partly there (damaged cache); pass --force to start over"
            )
        if not present:
            pending.append(indices)
    rounds = lockstep.max(len(pending)) if lockstep else len(pending)

    metrics = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    metrics.write(
        event="start", mode="score" if scoring else "generate", world_size=world, sequences=len(items),
        batches=len(batches), already_done=len(done), rank0_pending_batches=len(pending),
    )  # fmt: skip
    own_total = sum(len(b) for b in mine)
    label = f"score {job.info['split']}" if scoring else "generate"
    writer = CacheWriter(cache_dir, rank, top_p=config.cache_top_p, max_k=config.cache_max_k)
    generated = 0
    started = time.perf_counter()
    with StepProgress(f"{label} (rank 0 of {world})" if world > 1 else label, own_total, enabled=rank == 0) as progress:
        progress.update(own_total - sum(len(b) for b in pending))
        for number in range(rounds):
            batch = [items[i] for i in pending[number]] if number < len(pending) else None
            tick = time.perf_counter()
            if scoring:
                results = score_batch(teacher, batch, tokenizer, config, lockstep)
            else:
                results = generate_batch(teacher, batch, tokenizer, config, lockstep)
            if batch is None:
                continue
            for item, (tokens, reason, capture) in zip(batch, results, strict=True):
                writer.add(
                    prompt_id=item.prompt_id, sample_index=item.sample_index, seed=item.seed, tokens=tokens,
                    finish_reason=reason, capture=capture,
                )  # fmt: skip
            writer.flush()  # one batch = one shard: the unit of resume
            tokens_out = sum(len(r[0]) for r in results)
            generated += tokens_out
            seconds = time.perf_counter() - tick
            rate = generated / max(time.perf_counter() - started, 1e-9)
            progress.update(len(batch), **{"tok/s": rate})
            metrics.write(
                event="batch", rows=len(batch), tokens=tokens_out, seconds=round(seconds, 4),
                tokens_per_s=round(rate, 1),
            )  # fmt: skip
            if (out / PREEMPT).exists():  # the launching process got SIGTERM / SIGUSR1
                raise Preempted(f"preempted after {number + 1} batches; run the same command again to continue")
    log.info("rank %d: %d batches, %d tokens in %.1f s", rank, len(pending), generated, time.perf_counter() - started)
    dist.barrier()  # every shard is written

    # --- rank 0 seals the cache; the report needs the teacher (every rank under ZeRO-3)
    if rank == 0:
        finalize_cache(job, cache_dir, tokenizer, len(items))
    dist.barrier()
    if rank == 0 or lockstep:
        stats = sparsity(job, teacher, tokenizer, cache_dir, items)
        if rank == 0:
            finish_stage(job, stats, rows, tokenizer, metrics, time.perf_counter() - started)
    dist.barrier()


def generate_batch(teacher, batch: list[Item] | None, tokenizer, config: GenerateStage, lockstep) -> list[tuple]:
    """(tokens, finish reason, capture) per item; under ZeRO-3 a rank without a batch idles in step."""
    from bdctl.models import stop_id
    from bdctl.sampling import sample

    max_new = max(item.limit for item in batch) if batch else 0
    todo = batch or []  # a rank without a batch only steps along (run is not called for it)

    def run(all_done=None):
        return sample(
            teacher, [item.prompt for item in todo], [item.seed for item in todo], eos_id=stop_id(tokenizer),
            pad_id=tokenizer.pad_token_id, max_new_tokens=max_new, temperature=config.temperature,
            set_top_p=config.top_p if config.top_p < 1.0 else None,
            capture_top_p=config.cache_top_p, capture_max_k=config.cache_max_k, all_done=all_done,
        )  # fmt: skip

    samples = run() if lockstep is None else lockstep.round(max_new, run if batch else None)
    if not batch:
        return []
    return [_truncate(result, item.limit) for item, result in zip(batch, samples, strict=True)]


def _truncate(result, limit: int) -> tuple:
    """A row of a batch that ran past this prompt's own limit, cut back to it: the same tokens
    and sets as sampling it alone with that limit (a row's draws depend on its seed only)."""
    from bdctl.sampling import FINISH_LENGTH

    if len(result.tokens) <= limit:
        return result.tokens, result.finish_reason, result.capture
    return result.tokens[:limit], FINISH_LENGTH, result.capture.head(limit)


def score_batch(teacher, batch: list[Item] | None, tokenizer, config: GenerateStage, lockstep) -> list[tuple]:
    """(tokens, "eos", capture) per golden response: one teacher forward for the batch."""
    from bdctl.sampling import FINISH_EOS, score

    if batch is None:
        if lockstep:
            lockstep.forward_dummy()
        return []
    responses = [item.response for item in batch if item.response is not None]
    if len(responses) != len(batch):
        raise ValueError("score_batch needs the golden response of every item")
    captures = score(
        teacher, [item.prompt for item in batch], responses, pad_id=tokenizer.pad_token_id,
        top_p=config.cache_top_p, max_k=config.cache_max_k, batch_size=len(batch),
    )  # fmt: skip
    return [(item.response, FINISH_EOS, capture) for item, capture in zip(batch, captures, strict=True)]


# --------------------------------------------------------------------------- the teacher


def load_teacher(job: Job, tokenizer, world: int):
    """The teacher in eval mode, and a `Lockstep` when it runs as a ZeRO-3 inference engine.

    Data-parallel (the default): every rank holds a full copy on its device. ZeRO-3: the weights
    are partitioned across ranks (transformers loads them partitioned under HfDeepSpeedConfig)
    and gathered layer by layer during each forward, which is collective: every rank must run
    the same forward passes, which `Lockstep` arranges.
    """
    import torch

    from bdctl.engine import hf_deepspeed_context, on_gpu, resolve_precision
    from bdctl.models import load_model

    config, recipe = stage_config(job), job.recipe
    source = resolve_weights(job, config.model, "teacher")
    precision = resolve_precision(recipe)
    device = _device()
    if not config.zero_inference:
        model = load_model(source, tokenizer, recipe.seed)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        return model.to(device=device, dtype=dtype).eval(), None

    import deepspeed

    from bdctl.models import hidden_size

    ds_config = inference_config(job, world, hidden_size(source), precision, on_gpu())
    keep = hf_deepspeed_context(ds_config)  # noqa: F841  (alive while loading: partitioned load)
    model = load_model(source, tokenizer, recipe.seed)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    teacher = engine.module.eval()
    from bdctl.sampling import Lockstep

    return teacher, Lockstep(teacher, tokenizer.pad_token_id, device)


def inference_config(job: Job, world: int, hidden: int, precision: str, gpu: bool) -> dict:
    """The recipe's DeepSpeed config made an inference one: ZeRO stage 3, no optimizer."""
    from bdctl.engine import deepspeed_config
    from bdctl.recipe.schema import Train

    train = Train(batch_size=world, micro_batch_size=1)  # DeepSpeed insists on batch sizes
    config = deepspeed_config(job.recipe, train, job.stage_name, world, 1, hidden, precision, gpu)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)  # offload_param (weights on CPU / NVMe) is kept
    return config


def deepspeed_preview(job: Job) -> dict:
    """The DeepSpeed config that --dry-run prints (only a ZeRO-3 teacher uses one)."""
    from bdctl.engine import on_gpu, resolve_precision
    from bdctl.models import hidden_size

    if not stage_config(job).zero_inference:
        return {"note": "stages.generate.zero_inference is off: each rank holds a whole teacher, no DeepSpeed engine"}
    source = resolve_weights(job, stage_config(job).model, "teacher")
    return inference_config(job, job.world_size, hidden_size(source), resolve_precision(job.recipe), on_gpu())


def _device():
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _describe(ref: str, source: ModelSpec | Path) -> str:
    if isinstance(source, Path):
        return f"{ref} ({source})" if str(source) != ref else ref
    if source.tiny is not None:
        return f"{ref} (tiny {source.tiny.arch})"
    return source.label


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- finishing (rank 0)


def finalize_cache(job: Job, cache_dir: Path, tokenizer, expected: int) -> dict:
    """The cache's manifest, after checking that every sequence is there exactly once."""
    from bdctl.cache import finalize
    from bdctl.models import tokenizer_hash

    config = stage_config(job)
    payload = finalize(
        cache_dir, teacher=job.info["teacher"], tokenizer_hash=tokenizer_hash(tokenizer), top_p=config.cache_top_p,
        max_k=config.cache_max_k, vocab_size=len(tokenizer),
        extra={"mode": "score" if job.options.get("score") else "generate", "split": job.info["split"],
               "n_samples": 1 if job.options.get("score") else config.n_samples, "seed": job.recipe.seed,
               # how D* was sampled: inside the teacher's capped top-p set (sample_top_p < 1) or not
               "sample_temperature": None if job.options.get("score") else config.temperature,
               "sample_top_p": None if job.options.get("score") else config.top_p},
    )  # fmt: skip
    if payload["counts"]["examples"] != expected:
        raise UserError(f"cache {cache_dir}: {payload['counts']['examples']} sequences, expected {expected}")
    return payload


def sparsity(job: Job, teacher, tokenizer, cache_dir: Path, items: list[Item]) -> dict:
    """The report's numbers, from a fresh scoring of an even spread of the cached sequences."""
    import numpy as np

    from bdctl.cache import TeacherCache
    from bdctl.report_sparsity import P_VALUES, TOP_K, sparsity_stats
    from bdctl.sampling import score

    config = stage_config(job)
    cache = TeacherCache(cache_dir)
    count = min(config.report_examples, len(cache))
    # Evenly spaced over the cache's (prompt id, sample index) order: the same choice on every
    # rank and on every rerun, whatever the batches or ranks were.
    picks = np.unique(np.linspace(0, len(cache) - 1, count).round().astype(np.int64))
    prompts = {item.prompt_id: item.prompt for item in items}
    examples = [cache[int(i)] for i in picks]
    prompt_ids = [prompts[e.prompt_id] for e in examples]
    responses = [e.tokens.tolist() for e in examples]
    common = dict(pad_id=tokenizer.pad_token_id, batch_size=config.batch_size)
    top = score(teacher, prompt_ids, responses, top_p=1.0, max_k=TOP_K, **common)
    # Uncapped top-p sets at the largest p: the sets of smaller p are their prefixes.
    wide = score(teacher, prompt_ids, responses, top_p=max(P_VALUES), max_k=teacher.config.vocab_size, **common)
    return sparsity_stats(top, wide, cache.manifest, sequences=len(examples))


def finish_stage(job: Job, stats: dict, rows: list[dict], tokenizer, metrics, seconds: float) -> None:
    """Rank 0: D* (generation), the report, then the stage manifest."""
    from bdctl.cache import TeacherCache
    from bdctl.report_sparsity import write_report
    from bdctl.rundir import mark_complete

    out = job.stage_dir
    cache = TeacherCache(out / "cache")
    if not job.options.get("score"):
        write_dstar(cache, rows, tokenizer, out / "dstar.jsonl")
    paths = write_report(stats, out)
    counts = cache.manifest["counts"]
    summary = {
        "mode": "score" if job.options.get("score") else "generate",
        "split": job.info["split"],
        "teacher": job.info["teacher"],
        "sequences": counts["examples"],
        "prompts": counts["prompts"],
        "tokens": counts["tokens"],
        "finish": counts["finish"],
        "sample_top_p": None if job.options.get("score") else stage_config(job).top_p,
        "cache_top_p": cache.top_p,
        "cache_max_k": cache.max_k,
        "mean_set_size": cache.manifest["mean_set_size"],
        "bytes_per_token": cache.manifest["bytes_per_token"],
        "top1_probability": stats["top_k_cumulative_probability"]["1"],
        "top_p_mean_set_size": stats["top_p_mean_set_size"],
        "report": {kind: path.name for kind, path in paths.items()},
    }
    metrics.write(
        event="done", seconds=round(seconds, 2), sequences=summary["sequences"], tokens=summary["tokens"],
        bytes_per_token=round(summary["bytes_per_token"], 2),
    )  # fmt: skip
    mark_complete(out, **summary)


def write_dstar(cache, rows: list[dict], tokenizer, path: Path) -> None:
    """D* as JSON lines, in (prompt id, sample index) order, from the cache (the one source of
    truth: a resumed run writes the same file). `response` is the text without the final EOS;
    `response_ids` are the exact tokens (EOS included when finish_reason is "eos"; with data.template: chat
    the end-of-turn token, `models.stop_id`)."""
    from bdctl.models import stop_id

    prompts = {row["id"]: row["prompt"] for row in rows}
    eos = stop_id(tokenizer)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for start in range(0, len(cache), 1024):
            examples = [cache[i] for i in range(start, min(start + 1024, len(cache)))]
            bodies = [e.tokens.tolist() for e in examples]
            # The text is the answer: the final EOS is a stop signal, not part of it.
            answers = [
                b[:-1] if e.finish_reason == "eos" and b[-1:] == [eos] else b
                for e, b in zip(examples, bodies, strict=True)
            ]
            texts = tokenizer.batch_decode(answers, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for example, body, text in zip(examples, bodies, texts, strict=True):
                record = {
                    "prompt_id": example.prompt_id, "sample_index": example.sample_index, "seed": example.seed,
                    "prompt": prompts[example.prompt_id], "response": text, "response_ids": body,
                    "finish_reason": example.finish_reason,
                }  # fmt: skip
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
