"""`bdctl distill --method minillm`: MiniLLM (docs/method.md §6), the paper's fourth baseline.

    bdctl distill RECIPE --method minillm       -> runs/<name>/distill/minillm

MiniLLM is online: the student samples its own responses during training. The run repeats

1. collect: every `num_rollouts` training prompts get one response, sampled by the student (the ZeRO-3
   training engine's own module, ranks in lockstep) with the live teacher mixed in at every token
   (`bdctl.rollouts`); the log-probabilities of each drawn token under the student, the teacher and the
   mixture are kept from the logits the sampler computed, so rewards r_t and importance weights w_t need
   no second pass;
2. update: `ppo_epochs` passes over the collection in shuffled minibatches of `batch_size` rollouts,
   one optimizer step each: L = L_pg + L_single + lm_coef L_PT (`objectives.minillm`), with advantages
   (length-normalised discounted returns, whitened) taken over the whole minibatch, and each minibatch
   paired with a fresh pretraining batch, L_PT = (1 - k) CE + k KD against the live teacher.

The shared training loop (`bdctl.training`) runs it: a PPO epoch is the loop's "epoch" over the
collection (n_train = num_rollouts), `before_step` collects when a step starts a collection and
computes the minibatch's advantages, and the collection travels in every checkpoint (`extra_state`),
so a resume in the middle of a collection continues on the same rollouts and its per-step losses equal
an uninterrupted run's. Checkpoints, preemption (exit 75), the non-finite policy and Rouge-L selection
are the loop's.

Determinism across ranks. Collection c takes positions [c R, (c + 1) R) of the training prompts'
seeded order (R = num_rollouts), cuts them into length-grouped batches of `rollout_batch_size` once
(the same batches for any number of ranks; rank r samples batches r, r + W, ...), and seeds each prompt
with `rollout_seed(recipe seed, step, prompt id)`; every rank then holds the whole collection
(all-gathered), so the minibatches, their advantages and the pretraining blocks of a step are the same
on 1 and 2 ranks.

Teacher: stages.generate.model (the fine-tuned teacher, as distill's live teacher). With
`minillm.zero_inference: false` every rank holds a whole copy (in the run's precision); with true it is a
ZeRO-3 inference engine, partitioned and gathered per forward. The loss terms that compare the two
models (`lean_reverse_kl`, `lean_teacher_kd`) take both models' hidden states and output embeddings and
run over vocabulary chunks: no [B, T, V] logits and no [N, V] teacher distribution exist.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bdctl.errors import UserError
from bdctl.job import Job, resolve_weights
from bdctl.recipe.schema import DistillStage, MiniLLM
from bdctl.rundir import stage_command

STAGE_DIR = "distill/minillm"
LOGS = ("pg_loss", "single_kl", "mean_ratio", "clip_fraction")


def stage_dir(options: dict) -> str:
    return STAGE_DIR


def stage_config(job: Job) -> DistillStage:
    """stages.distill, with MiniLLM's own optimisation settings where stages.distill.minillm sets them
    (its warmup_steps replaces stages.distill's warm-up, ratio or steps)."""
    config = job.recipe.stages.distill
    own = config.minillm
    shadowed = ("lr", "weight_decay", "adam_betas", "warmup_steps", "eval_every", "max_steps")
    update: dict[str, Any] = {k: getattr(own, k) for k in shadowed if getattr(own, k) is not None}
    if own.warmup_steps is not None:
        update["warmup_ratio"] = 0.0
    return config.model_copy(update=update)


def settings(job: Job) -> MiniLLM:
    return job.recipe.stages.distill.minillm


def init_ref(config: DistillStage) -> str:
    """MiniLLM starts from the phase-1 student (docs/method.md §6) unless stages.distill.init names other weights."""
    return "student_sft" if config.init == "auto" else config.init


@dataclass(frozen=True)
class Plan:
    minibatches: int  # per PPO epoch: num_rollouts / batch_size
    per_collection: int  # optimizer steps per collection: ppo_epochs x minibatches
    total_steps: int


def plan(n_prompts: int, config: DistillStage) -> Plan:
    """`epochs` passes over the training prompts in collections of num_rollouts, capped by max_steps."""
    own = config.minillm
    minibatches = own.num_rollouts // config.batch_size
    per_collection = minibatches * own.ppo_epochs
    collections = math.ceil(config.epochs * n_prompts / own.num_rollouts)
    total = collections * per_collection
    return Plan(minibatches, per_collection, min(total, config.max_steps or total))


def uses_pretrain(job: Job, config: DistillStage) -> bool:
    """The pretraining term: on by default when the recipe has data.pretrain (MiniLLM trains with it).
    MiniLLM's own switch (stages.distill.minillm.pretrain_term), so that turning BD's off leaves it."""
    corpus = job.recipe.data.pretrain
    switch = config.minillm.pretrain_term
    if switch is None:
        return corpus is not None and config.lm_coef > 0
    if switch and corpus is None:
        raise UserError("stages.distill.minillm.pretrain_term is true but the recipe has no data.pretrain corpus")
    return switch and config.lm_coef > 0


def describe(job: Job, config: DistillStage, pretrain: bool) -> list[str]:
    own = config.minillm
    lines = [
        "minillm: reverse KL by policy gradient on the student's own rollouts, teacher mixed in at "
        f"a = {own.teacher_mix:g}; "
        f"{own.num_rollouts} rollouts per collection, {own.ppo_epochs} passes of minibatches of {config.batch_size}",
        f"rewards (log p - log q) / {own.reward_scale:g} clipped at {own.reward_clip:g}; returns with discount "
        f"{own.discount:g}{', length-normalised' if own.length_norm else ''}{', whitened' if own.whiten else ''}; "
        f"PPO clip {own.ppo_clip:g}; single-step reverse KL {'on' if own.single_step else 'off'}",
    ]
    if pretrain:
        kd = (
            f" = (1 - {own.pt_kd_ratio:g}) CE + {own.pt_kd_ratio:g} KD with the live teacher"
            if own.pt_kd_ratio
            else " (plain LM loss)"
        )
        lines.append(f"pretraining term on: + {config.lm_coef:g} x L_PT on data.pretrain blocks{kd}")
    else:
        lines.append("pretraining term off")
    lines.append(
        {
            "val_loss": "checkpoint selection: lowest cross-entropy on the golden validation responses",
            "rouge_l": "checkpoint selection: highest Rouge-L of sampled answers to the validation prompts",
        }[config.select]
    )
    return lines


# --------------------------------------------------------------------------- does the teacher fit


def teacher_fit_error(
    student_params: int,
    teacher_params: int,
    world: int,
    zero_stage: int,
    precision: str,
    zero_inference: bool,
    gpu_gib: float,
) -> str | None:
    """One line when the model states alone (student training states per GPU, plus the teacher: a whole
    copy, or its 1/world share with zero_inference) exceed a GPU's memory; None when they fit."""
    from bdctl.sizes import inference_gib, training_gib_per_gpu

    student = training_gib_per_gpu(student_params, world, zero_stage, precision)
    whole = inference_gib(teacher_params, precision)
    teacher = whole / world if zero_inference else whole
    if student + teacher <= gpu_gib:
        return None
    where = (
        f"partitioned over {world} ranks ({teacher:.1f} GiB each)"
        if zero_inference
        else f"a whole copy per GPU ({whole:.1f} GiB)"
    )
    hint = (
        "use more GPUs or a ZeRO config that offloads"
        if zero_inference
        else "set stages.distill.minillm.zero_inference: true to partition it "
        f"({whole / world:.1f} GiB each on {world} ranks)"
    )
    return (
        f"distill --method minillm: the teacher ({teacher_params / 1e6:,.0f} M parameters, {where}) does not fit "
        f"beside the student ({student_params / 1e6:,.0f} M parameters, {student:.1f} GiB of ZeRO-{zero_stage} "
        "training states per GPU) "
        f"on a {gpu_gib:.1f} GiB GPU; {hint}"
    )


def _parameters(source, recipe) -> int:
    from bdctl.models import _read_config
    from bdctl.recipe.schema import ModelSpec
    from bdctl.sizes import count_parameters, model_config

    if isinstance(source, ModelSpec) and source.tiny is not None:
        return count_parameters(model_config(source, recipe))
    return count_parameters(_read_config(source))


def check_teacher_fits(job: Job, student, teacher) -> None:
    """On GPUs: refuse, before any rank starts, a teacher whose weights cannot sit beside the student."""
    from bdctl.engine import config_path, on_gpu, resolve_precision

    if not on_gpu():
        return  # CPU runs share the host's memory; there is no per-device budget to compare with
    import json

    from deepspeed.accelerator import get_accelerator

    gpu_gib = get_accelerator().total_memory(0) / 2**30
    zero_stage = int(
        json.loads(config_path(job.recipe.deepspeed.config).read_text()).get("zero_optimization", {}).get("stage", 0)
    )
    error = teacher_fit_error(
        _parameters(student, job.recipe), _parameters(teacher, job.recipe), job.world_size, zero_stage,
        resolve_precision(job.recipe), settings(job).zero_inference, gpu_gib,
    )  # fmt: skip
    if error:
        raise UserError(error)


# --------------------------------------------------------------------------- the launching process


def prepare(job: Job, log=print) -> None:
    """Launching process: data split, the phase-1 student and the teacher exist, vocabularies, lengths,
    memory, pretraining blocks."""
    from bdctl.data.prepare import prepare_data
    from bdctl.engine import check_batch_split, lr_schedule
    from bdctl.models import check_attention, check_lora, check_vocabularies, load_tokenizer, max_positions
    from bdctl.rundir import manifest
    from bdctl.selection import check_rouge_selection

    config, own = stage_config(job), settings(job)
    check_batch_split(config, "distill", job.world_size)
    data = prepare_data(job.recipe, job.run, log)
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)
    if init_ref(config) == "student_sft" and manifest(job.run.stage("student_sft")) is None:
        raise UserError(
            f"distill --method minillm starts from the phase-1 student (init: auto) and {job.run.stage('student_sft')} "
            f"has not finished; run it first: {stage_command('student_sft', job.recipe_path)}"
        )
    student = resolve_weights(job, init_ref(config), "student")
    teacher = resolve_weights(job, job.recipe.stages.generate.model, "teacher")
    check_vocabularies(job.recipe, tokenizer, {"teacher": teacher, "student": student})
    check_attention(job.recipe.models.student, "student")
    check_attention(job.recipe.models.teacher, "teacher")
    check_lora(student, tokenizer, job.recipe.models.student.lora, "models.student.lora")
    longest = job.recipe.data.max_prompt_length
    for role, source in (("student", student), ("teacher", teacher)):
        limit = max_positions(source)
        if limit is not None and longest + own.max_new_tokens > limit:
            raise UserError(
                f"stages.distill.minillm.max_new_tokens ({own.max_new_tokens}) after prompts of up to "
                "data.max_prompt_length "
                f"({longest}) exceeds the {role}'s {limit} positions: set it to at most {limit - longest}"
            )
    check_rouge_selection(job, config, "distill", max_positions(student))
    check_teacher_fits(job, student, teacher)
    n_prompts = data.counts["train"]
    if n_prompts < own.num_rollouts:
        raise UserError(
            f"stages.distill.minillm.num_rollouts ({own.num_rollouts}) exceeds the {n_prompts} training prompts"
        )
    steps = plan(n_prompts, config)
    lr_schedule(config, "distill", steps.total_steps)  # a schedule shorter than the run is refused here
    pretrain = uses_pretrain(job, config)
    if pretrain:
        from bdctl.data.pretrain import prepare_blocks

        assert job.recipe.data.pretrain is not None  # uses_pretrain: the pretraining term needs the corpus
        block_size = job.recipe.data.pretrain.block_size
        for role, source in (("student", student), ("teacher", teacher)):
            limit = max_positions(source)
            if limit is not None and block_size > limit:
                raise UserError(f"data.pretrain.block_size ({block_size}) exceeds the {role}'s {limit} positions")
        prepare_blocks(job.recipe, job.run, tokenizer, steps.total_steps * config.batch_size, log)
    job.info.update(total_steps=steps.total_steps, prompts=n_prompts)
    for line in describe(job, config, pretrain):
        log(f"distill: {line}")


def deepspeed_config_for(job: Job, config: DistillStage, world: int, total_steps: int, source) -> dict:
    """The student's DeepSpeed config: the recipe's, with MiniLLM's settings (`stage_config`)."""
    from bdctl.engine import deepspeed_config, on_gpu, resolve_precision
    from bdctl.models import hidden_size

    return deepspeed_config(
        job.recipe,
        config,
        job.stage_name,
        world,
        total_steps,
        hidden_size(source),
        resolve_precision(job.recipe),
        on_gpu(),
    )


def deepspeed_preview(job: Job) -> dict:
    """The resolved DeepSpeed config that --dry-run prints (the step count is only a guess there)."""
    config = stage_config(job)
    ref = init_ref(config)  # the phase-1 student has the base student's shape (and may not exist yet)
    source = job.recipe.models.student if ref in ("base", "student_sft") else resolve_weights(job, ref)
    return deepspeed_config_for(job, config, job.world_size, 0, source)


# --------------------------------------------------------------------------- rollouts and batches


@dataclass(frozen=True)
class Rollout:
    """One collected response: its prompt (row of data/train.jsonl), tokens and per-token scores."""

    row: int
    tokens: np.ndarray  # int64 [T]
    log_q: np.ndarray  # [T] log q_old(y_t)
    log_p: np.ndarray  # [T] log p(y_t)
    log_mix: np.ndarray  # [T] log mix_t(y_t)
    eos: bool


def collection_rows(collection: int, n_prompts: int, num_rollouts: int, seed: int) -> list[int]:
    """Rows of the training prompts for collection c: positions [c R, (c + 1) R) of the passes of the
    seeded prompt order, passes concatenated."""
    from bdctl.data.batching import epoch_order

    rows, orders = [], {}
    for position in range(collection * num_rollouts, (collection + 1) * num_rollouts):
        epoch, offset = divmod(position, n_prompts)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_prompts, seed, epoch)
        rows.append(orders[epoch][offset])
    return rows


def rollout_frame(rollouts: list[Rollout], fields: tuple[str, ...]):
    """[B, T] float64 frames of per-token fields, and the valid mask (right-padded)."""
    import torch

    width = max(len(r.tokens) for r in rollouts)
    valid = torch.zeros((len(rollouts), width), dtype=torch.bool)
    frames = {name: torch.zeros((len(rollouts), width), dtype=torch.float64) for name in fields}
    for i, rollout in enumerate(rollouts):
        n = len(rollout.tokens)
        valid[i, :n] = True
        for name in fields:
            frames[name][i, :n] = torch.from_numpy(np.asarray(getattr(rollout, name), dtype=np.float64))
    return frames, valid


def collate_rollouts(rollouts: list[Rollout], advantages: list[np.ndarray], own: MiniLLM, prompts, pad_id: int) -> dict:
    """Right-padded prompt + response; response frame [b, T]: positions (len(prompt) + t - 1), actions,
    valid, and the frozen rollout terms old_log_q, weights, advantages."""
    import torch

    from bdctl.objectives.minillm import importance_weights

    frames, valid = rollout_frame(rollouts, ("log_q", "log_mix"))
    width = max(len(prompts[r.row]) + len(r.tokens) for r in rollouts)
    batch = len(rollouts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.zeros(valid.shape, dtype=torch.long)
    actions = torch.zeros(valid.shape, dtype=torch.long)
    adv = torch.zeros(valid.shape, dtype=torch.float64)
    for i, (rollout, a) in enumerate(zip(rollouts, advantages, strict=True)):
        prompt, n = prompts[rollout.row], len(rollout.tokens)
        sequence = torch.tensor(list(prompt) + rollout.tokens.tolist(), dtype=torch.long)
        input_ids[i, : len(sequence)] = sequence
        attention_mask[i, : len(sequence)] = 1
        positions[i, :n] = torch.arange(n) + len(prompt) - 1
        actions[i, :n] = torch.from_numpy(rollout.tokens)
        adv[i, :n] = torch.from_numpy(a)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "positions": positions, "actions": actions,
        "valid": valid, "old_log_q": frames["log_q"],
        "weights": importance_weights(frames["log_q"], frames["log_mix"], valid),
        "advantages": adv,
    }  # fmt: skip


def minibatch_advantages(rollouts: list[Rollout], own: MiniLLM) -> list[np.ndarray]:
    """A_t of every rollout of a (global) minibatch: whitening sees the whole minibatch, which every
    rank holds, so no collective is needed and the statistics do not depend on the number of ranks."""
    from bdctl.objectives.minillm import advantages, rewards

    frames, valid = rollout_frame(rollouts, ("log_q", "log_p"))
    r = rewards(frames["log_p"], frames["log_q"], valid, scale=own.reward_scale, clip=own.reward_clip)
    adv = advantages(r, valid, discount=own.discount, length_norm=own.length_norm, whitened=own.whiten)
    return [adv[i, : len(rollout.tokens)].numpy() for i, rollout in enumerate(rollouts)]


def digest(rollouts: list[Rollout]) -> str:
    """A short hash of a collection's responses (equal collections, equal digests: 1 vs 2 ranks, resume)."""
    h = hashlib.sha256()
    for rollout in rollouts:
        h.update(np.int64(rollout.row).tobytes() + rollout.tokens.astype(np.int64).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- every rank


def run(job: Job, rank: int, world: int) -> None:
    """Every rank: student engine, live teacher, collect / update with the shared loop, export the best."""
    import torch
    import torch.distributed as dist

    from bdctl.data.prepare import read_split
    from bdctl.diagnostics import DiagnosticSet
    from bdctl.engine import (
        deepspeed_config,
        export_hf,
        hf_deepspeed_context,
        lr_schedule,
        make_engine,
        make_inference_engine,
        on_gpu,
        policy_module,
        resolve_precision,
    )  # fmt: skip
    from bdctl.models import hidden_size, load_model, load_tokenizer, memory_switches, required_stop_id
    from bdctl.objectives.kd import mixed_kd_loss
    from bdctl.objectives.lm import lean_cross_entropy
    from bdctl.objectives.minillm import lean_log_probs, lean_reverse_kl, lean_teacher_kd, policy_loss
    from bdctl.rollouts import Both, mixed_sample, rollout_seed
    from bdctl.sampling import Lockstep, length_grouped_batches
    from bdctl.selection import Validator, selection_facts
    from bdctl.tracking import MetricsLog, StepProgress
    from bdctl.training import MicroBatch, finish, loop_config, train_loop

    recipe, config, own, out = job.recipe, stage_config(job), settings(job), job.stage_dir

    # --- prompts: every rank reads the same training prompts
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)
    rows = read_split(job.run.data, "train")
    prompts = tokenizer([row["prompt"] for row in rows])["input_ids"]
    steps = plan(len(rows), config)
    pretrain = uses_pretrain(job, config)
    blocks = None
    if pretrain:
        from bdctl.data.pretrain import PretrainBlocks, pretrain_dir

        blocks = PretrainBlocks(pretrain_dir(job.run), limit=steps.total_steps * config.batch_size)

    # --- the live teacher first (a whole copy must load before the student's ZeRO-3 context exists, which
    # would partition it), then the student engine, ZeRO as the recipe says
    from deepspeed.accelerator import get_accelerator

    precision = resolve_precision(recipe)
    device = torch.device(get_accelerator().current_device_name())
    teacher_source = resolve_weights(job, recipe.stages.generate.model, "teacher")
    if own.zero_inference:
        teacher_config = deepspeed_config(
            recipe, config, job.stage_name, world, 1, hidden_size(teacher_source), precision, on_gpu()
        )
        zero = teacher_config.setdefault("zero_optimization", {})
        zero["stage"] = 3
        zero.pop("offload_optimizer", None)  # no optimizer; offload_param (weights on CPU / NVMe) is kept
        keep = hf_deepspeed_context(teacher_config)  # noqa: F841  (partitioned load)
        teacher_engine = make_inference_engine(
            policy_module(load_model(teacher_source, tokenizer, recipe.seed, **memory_switches(recipe.models.teacher))),
            teacher_config,
        )
        del keep
        teacher_module, teacher_call = teacher_engine.module, teacher_engine
        # The chunked two-model terms read the teacher's output embedding in the student's backward, when a
        # ZeRO-3 partition would be released: keep one gathered, frozen copy (V x H', the size of one layer).
        import deepspeed

        head = teacher_module.lm.get_output_embeddings().weight
        with deepspeed.zero.GatheredParameters([head]):
            teacher_weight = head.detach().clone()
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        teacher_module = (
            policy_module(load_model(teacher_source, tokenizer, recipe.seed, **memory_switches(recipe.models.teacher)))
            .to(device=device, dtype=dtype)
            .eval()
        )
        for param in teacher_module.parameters():
            param.requires_grad_(False)
        teacher_call = teacher_module
        teacher_weight = teacher_module.lm.get_output_embeddings().weight.detach()
    source = resolve_weights(job, init_ref(config), "student")
    ds_config = deepspeed_config_for(job, config, world, steps.total_steps, source)
    with_ds = hf_deepspeed_context(ds_config)  # noqa: F841  (alive while loading: ZeRO-3 partitioned load)
    engine = make_engine(
        policy_module(
            load_model(
                source, tokenizer, recipe.seed, **memory_switches(recipe.models.student),
                lora=recipe.models.student.lora, where="models.student.lora",
            )
        ),  # fmt: skip
        ds_config,
        lr_schedule(config, "distill", steps.total_steps),
    )  # fmt: skip
    # EOS, or the chat template's end-of-turn
    pad_id, eos_id = tokenizer.pad_token_id, required_stop_id(tokenizer, "MiniLLM's rollouts")
    metrics = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)

    # --- the collection (the rollout buffer) and the current minibatch's advantages
    buffer: list[Rollout] = []
    step_advantages: dict[int, np.ndarray] = {}

    def collect(step: int) -> None:
        started = time.perf_counter()
        chosen = collection_rows(step // steps.per_collection, len(rows), own.num_rollouts, recipe.seed)
        batches = length_grouped_batches([len(prompts[r]) for r in chosen], own.rollout_batch_size)
        student = engine.module
        engine.eval()
        lockstep = Lockstep(Both(student, teacher_module), pad_id, device) if world > 1 else None
        mine: list[tuple[int, Rollout]] = []
        for first in range(0, len(batches), world):  # a round: one batch per rank (or none)
            batch = batches[first + rank] if first + rank < len(batches) else None

            def sample_batch(all_done=None, batch=batch):
                return mixed_sample(
                    student, teacher_module, [prompts[chosen[i]] for i in batch],
                    [rollout_seed(recipe.seed, step, rows[chosen[i]]["id"]) for i in batch],
                    mix=own.teacher_mix, eos_id=eos_id, pad_id=pad_id, max_new_tokens=own.max_new_tokens,
                    all_done=all_done,
                )  # fmt: skip

            found = (
                sample_batch()
                if lockstep is None
                else lockstep.round(own.max_new_tokens, sample_batch if batch else None)
            )
            for i, result in zip(batch or [], found, strict=True):
                mine.append((i, Rollout(
                    row=chosen[i], tokens=np.asarray(result.tokens, dtype=np.int64), log_q=result.log_q,
                    log_p=result.log_p, log_mix=result.log_mix, eos=result.finish_reason == "eos",
                )))  # fmt: skip
        engine.train()
        gathered: list[Any] = [None] * world  # all_gather_object fills in every rank's `mine`
        dist.all_gather_object(gathered, mine)
        collected = dict(pair for part in gathered for pair in part)
        buffer[:] = [collected[i] for i in range(len(chosen))]
        seconds = time.perf_counter() - started
        lengths = [len(r.tokens) for r in buffer]
        r_all = np.concatenate([(r.log_p - r.log_q) / own.reward_scale for r in buffer]).clip(
            -own.reward_clip, own.reward_clip
        )
        w_all = np.exp(np.concatenate([r.log_q - r.log_mix for r in buffer]))
        metrics.write(  # step: the first step trained on it (a resume replays the record with that step)
            event="rollout", step=step + 1, collection=step // steps.per_collection, rollouts=len(buffer),
            mean_length=float(np.mean(lengths)), eos_share=float(np.mean([r.eos for r in buffer])),
            mean_reward=float(r_all.mean()), mean_weight=float(w_all.mean()), seconds=seconds, digest=digest(buffer),
        )  # fmt: skip
        progress.print(
            f"step {step}: collected {len(buffer)} rollouts in {seconds:.1f} s (mean length {np.mean(lengths):.1f}, "
            f"mean reward {r_all.mean():.3f})"
        )

    def before_step(step: int, batch: list[int]) -> None:
        if step % steps.per_collection == 0:
            collect(step)
        step_advantages.clear()
        step_advantages.update(zip(batch, minibatch_advantages([buffer[i] for i in batch], own), strict=True))

    def save_buffer() -> dict:
        return {"rollouts": [r.__dict__ for r in buffer]}

    def load_buffer(state: dict) -> None:
        buffer[:] = [Rollout(**r) for r in state["rollouts"]]

    def micro_batches(indices: list[int]) -> list[MicroBatch]:
        chosen = [buffer[i] for i in indices]
        batch = collate_rollouts(chosen, [step_advantages[i] for i in indices], own, prompts, pad_id)
        return [MicroBatch(batch, int(batch["valid"].sum()))]

    def pretrain_inputs(step: int, index: int):
        assert blocks is not None  # the loop gets this function only when there are blocks
        ids = blocks.micro_batch(step, index, config.micro_batch_size, config.batch_size, recipe.seed)
        return {"input_ids": ids}, ids.shape[0] * (ids.shape[1] - 1)

    def teacher_rows(input_ids, attention_mask, pick):
        with torch.no_grad():
            return teacher_call(input_ids, attention_mask, loss_fn=lambda hidden, weight: pick(hidden))

    def loss(micro: MicroBatch):
        batch = {k: v.to(device) for k, v in micro.inputs.items() if k != "aux"}
        valid, positions = batch["valid"], batch["positions"]

        def at_response(hidden):  # [N, H]: the hidden states that predict each response token
            return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))[valid]

        t_rows = teacher_rows(batch["input_ids"], batch["attention_mask"], at_response) if own.single_step else None
        flat = torch.ones((1, int(valid.sum())), dtype=torch.bool, device=device)  # the valid positions as one row

        def head(hidden, weight):
            h_rows = at_response(hidden)
            log_q = lean_log_probs(h_rows, weight, batch["actions"][valid])
            terms = policy_loss(
                log_q[None], batch["old_log_q"][valid][None], batch["weights"][valid][None],
                batch["advantages"][valid][None],
                flat, clip=own.ppo_clip,
            )  # fmt: skip
            logs = {
                "pg_loss": terms.loss.item(),
                "mean_ratio": terms.mean_ratio.item(),
                "clip_fraction": terms.clip_fraction.item(),
            }
            total = terms.loss
            if t_rows is not None:
                single = lean_reverse_kl(h_rows, weight, t_rows, teacher_weight.to(device))
                logs["single_kl"] = single.item()
                total = total + single
            return total, logs

        value, logs = engine(batch["input_ids"], batch["attention_mask"], loss_fn=head)
        if blocks is None:
            return value, logs
        ids = micro.inputs["aux"]["input_ids"].to(device)
        mask = torch.ones_like(ids)
        k = own.pt_kd_ratio
        pt_rows = teacher_rows(ids, mask, lambda h: h[:, :-1].reshape(-1, h.shape[-1])) if k > 0 else None

        def pt_head(hidden, weight):
            ce = lean_cross_entropy(hidden[:, :-1], weight, ids[:, 1:])
            if pt_rows is None:
                return ce
            kd = lean_teacher_kd(
                hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, pt_rows, teacher_weight.to(device)
            )
            return mixed_kd_loss(ce, kd, k)

        return value, logs, engine(ids, mask, loss_fn=pt_head)

    # a PPO epoch is the loop's "epoch": one shuffled pass of minibatches over the collection
    loop = loop_config(job, config, steps.total_steps, steps.minibatches)
    loop.aux_coef, loop.aux_name = config.lm_coef, "pt_loss"
    diagnostics = DiagnosticSet(job, config, tokenizer, rank, world)
    validate = Validator(job, config, engine, tokenizer, rank, world, diagnostics)
    notes = [*describe(job, config, pretrain), diagnostics.note]
    metrics.write(
        event="start", total_steps=steps.total_steps, world_size=world, prompts=len(rows), valid=len(validate.examples),
        select=config.select, method="minillm", per_collection=steps.per_collection, notes=notes,
    )  # fmt: skip
    with StepProgress("distill minillm", steps.total_steps, enabled=rank == 0) as progress:
        for line in notes:
            progress.print(line)
        state = train_loop(
            engine=engine, config=loop, out=out, rank=rank, world=world, n_train=own.num_rollouts,
            micro_batches=micro_batches, loss=loss, validate=validate,
            export_best=lambda info, name: export_hf(engine, tokenizer, out / name, rank, info),
            metrics=metrics, progress=progress, aux_inputs=pretrain_inputs if blocks is not None else None,
            before_step=before_step, extra_state=(save_buffer, load_buffer),
        )  # fmt: skip
    finish(out, state, rank, job.stage_name, metrics, config.select, notes=notes, **selection_facts(job, config))
