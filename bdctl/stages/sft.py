"""`bdctl sft`: supervised fine-tuning of the teacher or the student (docs/method.md §5).

Cross-entropy of the response given the prompt (prompt tokens are not scored), averaged over the
response tokens of the whole global batch. Validation each epoch (and every `eval_every` steps);
the best weights by `select` (validation loss by default, or Rouge-L: `bdctl.selection`) are
exported as a Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

from bdctl.errors import UserError
from bdctl.job import Job, resolve_weights
from bdctl.recipe.schema import ModelSpec, SFTStage

ROLES = ("teacher", "student")


def stage_dir(options: dict) -> str:
    return f"{options['model']}_sft"


def stage_config(job: Job) -> SFTStage:
    return getattr(job.recipe.stages, stage_dir(job.options))


def lora_spec(job: Job):
    """The trained model's LoRA settings (`models.<role>.lora`), None to train every weight."""
    role = job.options["model"]
    return (job.recipe.models.teacher if role == "teacher" else job.recipe.models.student).lora


def prepare(job: Job, log=print) -> None:
    """Launching process: data split, shared tokenizer, vocabulary check, batch arithmetic."""
    from bdctl.data.batching import training_steps
    from bdctl.data.prepare import prepare_data
    from bdctl.engine import check_batch_split, lr_schedule
    from bdctl.models import check_attention, check_lora, check_vocabularies, load_tokenizer, max_positions
    from bdctl.selection import check_rouge_selection

    role = job.options["model"]
    config = stage_config(job)
    check_batch_split(config, job.stage_name, job.world_size)
    data = prepare_data(job.recipe, job.run, log)
    if data.counts["train"] < config.batch_size:
        raise UserError(
            f"stages.{job.stage_name}.batch_size ({config.batch_size}) exceeds the {data.counts['train']} "
            "training examples"
        )
    lr_schedule(config, job.stage_name, training_steps(data.counts["train"], config)[1])  # refused here, not on ranks
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)
    sources: dict[str, ModelSpec | Path] = {
        r: job.recipe.models.teacher if r == "teacher" else job.recipe.models.student for r in ROLES
    }
    sources[role] = resolve_weights(job, config.init, role)
    check_vocabularies(job.recipe, tokenizer, sources)
    check_attention(getattr(job.recipe.models, role), role)
    check_lora(sources[role], tokenizer, lora_spec(job), f"models.{role}.lora")
    if config.select == "rouge_l":
        check_rouge_selection(job, config, job.stage_name, max_positions(sources[role]))


def deepspeed_preview(job: Job) -> dict:
    """The resolved DeepSpeed config that --dry-run prints (step count from the data split if it
    already exists; the learning-rate schedule needs it, nothing else does)."""
    from bdctl.data.batching import training_steps
    from bdctl.engine import deepspeed_config, on_gpu, resolve_precision
    from bdctl.models import hidden_size
    from bdctl.rundir import manifest

    config = stage_config(job)
    counts = (manifest(job.run.data) or {}).get("counts")
    total = training_steps(counts["train"], config)[1] if counts else 0
    source = resolve_weights(job, config.init, job.options["model"])
    return deepspeed_config(
        job.recipe,
        config,
        job.stage_name,
        job.world_size,
        total,
        hidden_size(source),
        resolve_precision(job.recipe),
        on_gpu(),
    )


def run(job: Job, rank: int, world: int) -> None:
    """Every rank: load data and model, train (resuming if a checkpoint exists), export the best."""
    from bdctl.data.batching import IGNORE, collate, tokenize_examples, training_steps
    from bdctl.data.prepare import read_split
    from bdctl.engine import (
        deepspeed_config,
        export_hf,
        hf_deepspeed_context,
        lr_schedule,
        make_engine,
        on_gpu,
        policy_module,
        resolve_precision,
    )  # fmt: skip
    from bdctl.models import hidden_size, load_model, load_tokenizer, memory_switches
    from bdctl.objectives.lm import lean_cross_entropy
    from bdctl.selection import Validator, selection_facts
    from bdctl.tracking import MetricsLog, StepProgress
    from bdctl.training import MicroBatch, finish, loop_config, train_loop

    recipe, config, out = job.recipe, stage_config(job), job.stage_dir

    # --- data: every rank tokenises the same splits; the loop hands each rank its share
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)
    train = tokenize_examples(read_split(job.run.data, "train"), tokenizer, all_turns=True)
    per_epoch, total_steps = training_steps(len(train), config)

    # --- model and engine
    source = resolve_weights(job, config.init, job.options["model"])
    ds_config = deepspeed_config(
        recipe, config, job.stage_name, world, total_steps, hidden_size(source), resolve_precision(recipe), on_gpu()
    )
    with_ds = hf_deepspeed_context(ds_config)  # noqa: F841  (alive while loading: ZeRO-3 partitioned load)
    role = job.options["model"]
    model = load_model(
        source, tokenizer, recipe.seed, **memory_switches(getattr(recipe.models, role)),
        lora=lora_spec(job), where=f"models.{role}.lora",
    )  # fmt: skip
    engine = make_engine(policy_module(model), ds_config, lr_schedule(config, job.stage_name, total_steps))

    def micro_batches(indices: list[int]) -> list[MicroBatch]:
        batch = collate([train[i] for i in indices], tokenizer.pad_token_id)
        return [MicroBatch(batch, int((batch["labels"] != IGNORE).sum()))]

    def loss(batch: MicroBatch):
        inputs = {k: v.to(engine.device) for k, v in batch.inputs.items()}
        value = engine(
            inputs["input_ids"], inputs["attention_mask"],
            loss_fn=lambda hidden, weight: lean_cross_entropy(hidden, weight, inputs["labels"]),
        )  # fmt: skip
        return value, {}

    metrics = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    validate = Validator(job, config, engine, tokenizer, rank, world)
    metrics.write(
        event="start", total_steps=total_steps, world_size=world, train=len(train), valid=len(validate.examples),
        select=config.select,
    )  # fmt: skip
    with StepProgress(f"sft {job.options['model']}", total_steps, enabled=rank == 0) as progress:
        state = train_loop(
            engine=engine, config=loop_config(job, config, total_steps, per_epoch), out=out, rank=rank, world=world,
            n_train=len(train), micro_batches=micro_batches, loss=loss, validate=validate,
            export_best=lambda info, name: export_hf(engine, tokenizer, out / name, rank, info),
            metrics=metrics, progress=progress,
        )  # fmt: skip
    finish(out, state, rank, job.stage_name, metrics, config.select, **selection_facts(job, config))
