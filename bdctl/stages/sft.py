"""`bdctl sft`: supervised fine-tuning of the teacher or the student (METHOD.md section 4).

Cross-entropy of the response given the prompt (prompt tokens are not scored), averaged over the
response tokens of the whole global batch. Validation loss each epoch (and every `eval_every`
steps); the best weights by validation loss are exported as a Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

from bdctl.errors import UserError
from bdctl.job import Job
from bdctl.recipe.schema import ModelSpec, SFTStage

ROLES = ("teacher", "student")


def stage_dir(options: dict) -> str:
    return f"{options['model']}_sft"


def stage_config(job: Job) -> SFTStage:
    return getattr(job.recipe.stages, stage_dir(job.options))


def weights_source(job: Job, role: str, init: str) -> ModelSpec | Path:
    """Where training starts: the recipe's base model, another stage's export, or a path."""
    if init == "base":
        return getattr(job.recipe.models, role)
    stage_export = job.run.export(init)
    if (job.run.stage(init) / "MANIFEST.json").is_file():
        return stage_export
    if Path(init).is_dir():
        return Path(init)
    raise UserError(f"init {init!r}: neither a finished stage of {job.run.root} nor a model directory")


def prepare(job: Job, log=print) -> None:
    """Launching process: data split, shared tokenizer, vocabulary check, batch arithmetic."""
    from bdctl.data.prepare import prepare_data
    from bdctl.models import check_vocabularies, load_tokenizer

    role = job.options["model"]
    config = stage_config(job)
    if config.select != "val_loss":
        raise UserError(f"stages.{job.stage_name}.select: {config.select!r} needs the eval stage; use val_loss")
    per_step = config.micro_batch_size * job.world_size
    if config.batch_size % per_step:
        raise UserError(
            f"stages.{job.stage_name}.batch_size ({config.batch_size}) is not a multiple of "
            f"micro_batch_size ({config.micro_batch_size}) x ranks ({job.world_size})"
        )
    data = prepare_data(job.recipe, job.run, log)
    if data.counts["train"] < config.batch_size:
        raise UserError(
            f"stages.{job.stage_name}.batch_size ({config.batch_size}) exceeds the {data.counts['train']} training examples"
        )
    tokenizer = load_tokenizer(job.run.tokenizer)
    sources = {r: job.recipe.models.teacher if r == "teacher" else job.recipe.models.student for r in ROLES}
    sources[role] = weights_source(job, role, config.init)
    check_vocabularies(job.recipe, tokenizer, sources)


def run(job: Job, rank: int, world: int) -> None:
    """Every rank: train, validate, keep the best, export. Reads top to bottom."""
    import torch
    import torch.distributed as dist

    from bdctl.data.batching import IGNORE, collate, epoch_order, micro_batches, steps_per_epoch, tokenize_examples
    from bdctl.data.prepare import read_split
    from bdctl.engine import (
        deepspeed_config, export_hf, hf_deepspeed_context, make_engine, on_gpu, policy_module,
        resolve_precision, save_checkpoint,
    )  # fmt: skip
    from bdctl.models import load_model, load_tokenizer
    from bdctl.objectives.lm import lean_cross_entropy
    from bdctl.rundir import mark_complete
    from bdctl.tracking import MetricsLog, StepProgress

    recipe, config, out = job.recipe, stage_config(job), job.stage_dir
    role = job.options["model"]

    # --- data: the same global order on every rank; each takes its micro-batches of a step
    tokenizer = load_tokenizer(job.run.tokenizer)
    train = tokenize_examples(read_split(job.run.data, "train"), tokenizer)
    valid = tokenize_examples(read_split(job.run.data, "valid"), tokenizer)
    per_epoch = steps_per_epoch(len(train), config.batch_size)
    total_steps = per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    # --- model and engine
    source = weights_source(job, role, config.init)
    hidden = _hidden_size(source, tokenizer)
    ds_config = deepspeed_config(
        recipe, config, job.stage_name, world, total_steps, hidden, resolve_precision(recipe), on_gpu()
    )
    with_ds = hf_deepspeed_context(ds_config)  # noqa: F841  (alive while loading: ZeRO-3 partitioned load)
    model = load_model(source, tokenizer, recipe.seed)
    engine = make_engine(policy_module(model), ds_config, total_steps, config.warmup_ratio)
    device = engine.device

    def run_batch(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_fn = lambda h, w: lean_cross_entropy(h, w, batch["labels"])  # noqa: E731
        return engine(batch["input_ids"], batch["attention_mask"], loss_fn=loss_fn)

    def global_sum(value: float) -> float:
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item()

    def validation_loss() -> float:
        from bdctl.data.batching import eval_batches

        engine.eval()
        total = count = 0.0
        with torch.no_grad():
            for indices in eval_batches(len(valid), config.micro_batch_size, rank, world):
                # every rank runs the same number of forward passes (ZeRO-3 gathers collectively)
                batch = collate([valid[i] for i in indices] or [valid[0]], tokenizer.pad_token_id)
                tokens = (batch["labels"] != IGNORE).sum().item() if indices else 0
                loss = run_batch(batch)
                total += loss.item() * tokens
                count += tokens
        engine.train()
        return global_sum(total) / global_sum(count)

    # --- train
    metrics = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    best_loss, best_step, step = float("inf"), -1, 0

    def validate_and_keep_best(epoch: int) -> None:
        nonlocal best_loss, best_step
        val_loss = validation_loss()
        improved = val_loss < best_loss
        if improved:
            best_loss, best_step = val_loss, step
            export_hf(engine, tokenizer, out / "best", rank, {"step": step, "val_loss": val_loss})
        metrics.write(event="eval", step=step, epoch=epoch, val_loss=val_loss, best=improved)
        progress.print(f"step {step}: val_loss {val_loss:.4f}{'  (best)' if improved else ''}")

    with StepProgress(f"sft {role}", total_steps, enabled=rank == 0) as progress:
        metrics.write(event="start", total_steps=total_steps, world_size=world, train=len(train), valid=len(valid))
        validate_and_keep_best(epoch=0)  # the starting point counts: a run that only gets worse keeps it
        clock = _Clock()
        for epoch in range(config.epochs):
            order = epoch_order(len(train), recipe.seed, epoch)
            for index in range(per_epoch):
                if step >= total_steps:
                    break
                batches = [
                    collate([train[i] for i in chunk], tokenizer.pad_token_id)
                    for chunk in micro_batches(order, index, config.batch_size, config.micro_batch_size, rank, world)
                ]
                counts = [int((b["labels"] != IGNORE).sum()) for b in batches]
                global_tokens = global_sum(sum(counts))
                loss_sum = 0.0
                for batch, tokens in zip(batches, counts, strict=True):
                    loss = run_batch(batch)
                    # DeepSpeed averages over micro-batches and ranks; rescale so the gradient is
                    # that of the token mean over the whole global batch.
                    engine.backward(loss * tokens * len(batches) * world / global_tokens)
                    engine.step()
                    loss_sum += loss.item() * tokens
                step += 1
                train_loss = global_sum(loss_sum) / global_tokens
                rate = clock.rate(global_tokens)
                lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step used
                metrics.write(event="train", step=step, epoch=epoch, loss=train_loss, lr=lr, tokens=global_tokens, tokens_per_s=rate)
                progress.update(loss=train_loss, **{"tok/s": f"{rate:.0f}"})
                if config.eval_every and step % config.eval_every == 0:
                    validate_and_keep_best(epoch)
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save_checkpoint(engine, out / "checkpoints", f"step{step}", {"step": step, "epoch": epoch, "best_loss": best_loss}, config.keep_checkpoints, rank)
            if not (config.eval_every and step % config.eval_every == 0):
                validate_and_keep_best(epoch)
            if not config.checkpoint_every:
                save_checkpoint(engine, out / "checkpoints", f"step{step}", {"step": step, "epoch": epoch + 1, "best_loss": best_loss}, config.keep_checkpoints, rank)

    # --- the chosen weights become the stage's export; the manifest marks the stage complete
    if rank == 0:
        (out / "best").rename(out / "export")
        metrics.write(event="end", best_step=best_step, best_val_loss=best_loss)
        mark_complete(out, stage=job.stage_name, best_step=best_step, best_val_loss=best_loss, steps=step, export="export")
    dist.barrier()


def _hidden_size(source, tokenizer) -> int:
    if isinstance(source, ModelSpec) and source.tiny is not None:
        return source.tiny.hidden
    from transformers import AutoConfig

    path = source.path if isinstance(source, ModelSpec) else str(source)
    config = AutoConfig.from_pretrained(path, revision=getattr(source, "revision", None))
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd")


class _Clock:
    """Tokens per second over the last step."""

    def __init__(self):
        import time

        self._time = time.perf_counter
        self._last = self._time()

    def rate(self, tokens: float) -> float:
        now = self._time()
        rate = tokens / max(now - self._last, 1e-9)
        self._last = now
        return rate
