"""`bdctl distill`: Bellman Distill (docs/method.md §3 and §4) and the KD / SeqKD baselines (section 4).

    bdctl distill RECIPE --method bd      phase 2: BD on the teacher data D* (runs/<name>/generate/cache)
    bdctl distill RECIPE --method kd      word-level KD on the golden training responses
    bdctl distill RECIPE --method seqkd   SFT on D* (optionally mixed with KD)
    bdctl distill RECIPE --method jsd     a divergence of the menu (docs/method.md §5.1; beyond the paper):
                                          forward_kl | reverse_kl | jsd | tvd | skew_kl | skew_rkl

Data.
* bd, seqkd: D*, every response of the generate stage's cache after its prompt (data/train.jsonl, the row
  whose "id" is the cache's prompt_id). A response that does not fit `data.max_length` after its prompt is cut
  there and counts as truncated. Actions are the response tokens; a transition is terminal where its action is
  EOS (with data.template: chat, the template's end-of-turn token: `models.stop_id`); the last transition of a
  truncated response is left out (docs/method.md §2), and a response with no transition left (a truncated
  one-token response) is skipped.
* kd: the golden training responses; the teacher's distribution from the scoring cache
  (runs/<name>/score_train/cache: the sparse top-p approximation, renormalised over each cached set) or from
  the live teacher (exact).

Everything is computed on the response frame: row b, column t is the state before response token t, whose
student hidden state sits at sequence position len(prompt_b) + t - 1 and is gathered from the forward pass.
Every loss is computed from the final hidden states and the output embedding inside the engine's forward
(`policy_module`), so ZeRO-3 has the output embedding gathered.

Loss heads, and what `MicroBatch.count` (the unit of the global mean) is:
* bd, paper variant: `bellman_lean.lean_terms` with the candidate sets of the cache, or of the live teacher
  (p = 1: the whole vocabulary). Count: kept transitions. Never builds [B, T, V] logits.
* bd, released variant: `bellman_lean.released_lean_terms`, the released code's arithmetic computed in vocabulary
  chunks (never [B, T, V]) for p < 1; `dense_loss(variant="released")` on full logits for p = 1 (there the
  projected policy is pi + eps over the whole vocabulary and its entropy needs every logit). Count: valid
  positions t < T of the micro-batch (the released code's N).
* kd: (1 - r) CE + r KD, r = kd_ratio; KD from the cache is `kd.lean_sparse_kd_loss`, KD from the live teacher
  is `kd.exact_kd_loss` (chunked on the student side; the teacher's probabilities of the scored rows,
  [N, V], are held once). seqkd: the same on D* with r = seqkd_kd_ratio (0: plain SFT). Count: tokens.
* the divergence menu (`divergence_loss`, stages.distill.divergence): from the cache
  `divergences.lean_coarse_per_token` (A_t plus a tail bucket; chunked, no [N, V]); from the live teacher
  `divergences.per_token` on the scored rows' logits, [N, V] for the student and the teacher. Token mean;
  count: tokens. On the golden responses (data: golden, the score_train cache) or D* (data: dstar).
* The pretraining term (pretrain_term, on for bd by default): + lm_coef * L_PT, a second forward per
  micro-batch on packed blocks of data.pretrain (`bdctl.data.pretrain`), L_PT = (1 - pt_kd_ratio) CE +
  pt_kd_ratio KD (exact, live teacher), averaged over its own tokens (the loop's aux term).

Teacher. `teacher_source: cache` never loads the teacher. `live` runs stages.generate.model (the teacher that
made D*) as a DeepSpeed inference engine beside the student (ZeRO-3: partitioned, gathered per forward; eval,
no grad); BD's sets are recomputed with the cache's rule and cap (p, generate.cache_max_k), so BD live equals
BD from the cache. pt_kd_ratio > 0 loads the live teacher whatever teacher_source says.

Selection (`select`, `bdctl.selection`): Rouge-L of answers sampled to the validation prompts as `bdctl eval`
samples (the paper's phase-2 rule; the paper recipes use it), or the student's cross-entropy on the golden
validation responses (there is no D* for validation). The best is kept and exported like `sft`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bdctl.distill_data import (
    Setup,
    batch_count,
    bd_scored,
    collate_examples,
    dstar_name,
    load_train_data,
    make_setup,
    released_valid,
)
from bdctl.errors import UserError
from bdctl.job import Job, resolve_weights
from bdctl.methods import METHODS as ALL_METHODS
from bdctl.objectives.bellman import BellmanTerms, candidate_mask, dense_terms
from bdctl.objectives.bellman_lean import lean_terms, released_lean_terms
from bdctl.objectives.divergences import lean_coarse_per_token, per_token
from bdctl.objectives.kd import exact_kd_loss, lean_sparse_kd_and_ce, mixed_kd_loss, teacher_probabilities
from bdctl.objectives.lm import IGNORE_INDEX, lean_cross_entropy
from bdctl.recipe.schema import DistillStage
from bdctl.rundir import manifest, stage_command
from bdctl.topp import teacher_sets

METHODS = tuple(name for name, method in ALL_METHODS.items() if method.stage == "distill")
BD_LOGS = ("mean_r", "mean_v", "mean_q_candidates", "chi2", "outside_share", "mean_set_size", "set_mass")
BEYOND_PAPER = "BEYOND THE PAPER"  # how every setting the paper does not have is labelled in output


def stage_dir(options: dict) -> str:
    """distill/<method>, or distill/<ablation run> (e.g. distill/bd-p1.0: stages.distill.ablations)."""
    return f"distill/{options.get('ablation') or options['method']}"


def stage_config(job: Job) -> DistillStage:
    return job.recipe.stages.distill


def describe(setup: Setup, job: Job) -> list[str]:
    """What the run does, in words (printed by the launching process and kept in metrics.jsonl)."""
    config = stage_config(job)
    lines = []
    if setup.method == "bd":
        sets = {
            "cache": f"the teacher's top-p sets (p = {config.p:g}) from the generate cache",
            "live": (
                f"the live teacher's top-p sets (p = {config.p:g}, capped at "
                f"{job.recipe.stages.generate.cache_max_k} tokens like the cache)"
            ),
            None: "A_t = the whole vocabulary (p = 1)",
        }[setup.sets]
        form = "chunked lean form" if setup.variant == "paper" or setup.sets else "dense form (full logits)"
        lines.append(f"bd ({setup.variant} variant, {form}) on {dstar_name(setup.dstar)}, {sets}")
        if setup.outside == "drop":
            lines.append(
                "outside: drop: D* actions outside A_t leave every term "
                "(docs/method.md §3.4; the paper's Eq. 17 gives them q_min)"
            )
        if setup.anchor_coef > 0:
            lines.append(
                f"{BEYOND_PAPER}: anchor + {setup.anchor_coef:g} x cross-entropy of D*'s actions over BD's "
                "transitions; this is not the paper's loss"
            )
    elif setup.divergence is not None:
        settings = config.divergence
        knobs = {"jsd": f"beta = {settings.jsd_beta:g}", "skew_kl": f"a = {settings.skew_alpha:g}",
                 "skew_rkl": f"a = {settings.skew_alpha:g}"}.get(setup.divergence)  # fmt: skip
        data = "the golden training responses" if not setup.uses_dstar else dstar_name(setup.dstar)
        teacher = {
            "cache": "teacher from the sparse top-p cache, both distributions coarse-grained to A_t plus one tail "
            "bucket (never above the exact value)",
            "live": "live teacher: exact",
        }[setup.kd_teacher or "live"]
        lines.append(
            f"{BEYOND_PAPER}: {setup.divergence}"
            + (f" ({knobs})" if knobs else "")
            + f" at temperature {settings.temperature:g} on {data}; {teacher} (docs/method.md §5.1)"
        )
    else:
        data = "the golden training responses" if setup.method == "kd" else dstar_name(setup.dstar)
        teacher = {
            "cache": "teacher distribution from the sparse top-p cache, renormalised over each cached set: "
            "an approximation of exact KD",
            "live": "teacher distribution from the live teacher: exact KD",
            None: "no KD term (plain cross-entropy)",
        }[setup.kd_teacher]
        lines.append(f"{setup.method} on {data}: (1 - {setup.kd_ratio:g}) CE + {setup.kd_ratio:g} KD; {teacher}")
    if setup.pretrain:
        kd = f", mixed with {config.pt_kd_ratio:g} exact KD from the live teacher" if setup.pt_kd else ""
        lines.append(f"pretraining term on: + {config.lm_coef:g} x LM loss on data.pretrain blocks{kd}")
    from bdctl.engine import describe_optimisation

    lines.append(describe_optimisation(config))
    lines.append(
        {
            "val_loss": "checkpoint selection: lowest cross-entropy on the golden validation responses",
            "rouge_l": "checkpoint selection: highest Rouge-L of sampled answers to the validation prompts",
        }[config.select]
    )
    return lines


def response_hidden(hidden: Tensor, positions: Tensor) -> Tensor:
    """[B, W, H] hidden states -> [B, T, H] at the response frame's positions."""
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def scored_rows(x: Tensor, valid: Tensor) -> Tensor:
    """Rows of [B, T, ...] at the valid positions, flattened: [N, ...]."""
    return x.reshape(-1, *x.shape[2:])[valid.reshape(-1)]


# --------------------------------------------------------------------------- loss heads


def bd_terms(
    hidden: Tensor, weight: Tensor, batch: dict[str, Tensor], config: DistillStage, dense: bool = False
) -> BellmanTerms:
    """The BD loss of a micro-batch from the student's [B, W, H] hidden states (see the module docstring)."""
    h = response_hidden(hidden, batch["positions"])
    ids, mask = batch.get("cand_ids"), batch.get("cand_mask")
    common: dict[str, Any] = dict(gamma=config.gamma, alpha=config.alpha, q_min=config.q_min, chi2=config.chi2)
    if config.variant == "released":
        valid = released_valid(batch)
        if ids is not None and mask is not None and not dense:
            return released_lean_terms(
                h, weight, ids, mask, batch["actions"], valid, top_p=config.p, eps=config.eps, **common
            )
        logits = h @ weight.T
        teacher_mask = candidate_mask(ids, mask, h.shape[:2], weight.shape[0]).to(logits.device)
        return dense_terms(
            logits, teacher_mask, batch["actions"], valid, batch["terminal"] & valid, variant="released",
            top_p=config.p, eps=config.eps, **common,
        )  # fmt: skip
    common["outside"] = config.outside
    if not dense:
        return lean_terms(h, weight, ids, mask, batch["actions"], batch["valid"], batch["terminal"], **common)
    logits = h @ weight.T
    teacher_mask = candidate_mask(ids, mask, h.shape[:2], weight.shape[0]).to(logits.device)
    return dense_terms(
        logits, teacher_mask, batch["actions"], batch["valid"], batch["terminal"], top_p=config.p, eps=config.eps,
        **common,
    )  # fmt: skip


def anchor_loss(hidden: Tensor, weight: Tensor, batch: dict[str, Tensor], scored: Tensor) -> Tensor:
    """BEYOND THE PAPER (docs/method.md §3.4): token-mean cross-entropy of D*'s actions at BD's scored
    positions (the SeqKD term), from hidden states (no [B, T, V] logits)."""
    h = response_hidden(hidden, batch["positions"])
    return lean_cross_entropy(h, weight, torch.where(scored, batch["actions"], IGNORE_INDEX))


def frame_sets(valid: Tensor, ids: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """[N, w] sets of the valid positions -> cand_ids, cand_mask [B, T, w]."""
    width = ids.shape[1]
    flat = valid.reshape(-1)
    cand_ids = ids.new_zeros((flat.numel(), width))
    cand_mask = torch.zeros((flat.numel(), width), dtype=torch.bool, device=ids.device)
    cand_ids[flat] = ids
    cand_mask[flat] = torch.arange(width, device=ids.device)[None, :] < kept[:, None]
    return cand_ids.view(*valid.shape, width), cand_mask.view(*valid.shape, width)


def ce_and_kd(hidden: Tensor, weight: Tensor, batch: dict[str, Tensor], ratio: float, teacher_probs: Tensor | None):
    """kd / seqkd: ((1 - r) CE + r KD, logs) on the response frame."""
    h = response_hidden(hidden, batch["positions"])
    valid = batch["valid"]
    if ratio > 0 and teacher_probs is None:  # from the cache: KD and the logged CE share one vocabulary pass
        kd, ce = lean_sparse_kd_and_ce(
            h, weight, batch["cand_ids"], batch["cand_probs"], batch["cand_mask"], valid, batch["actions"]
        )
        return mixed_kd_loss(ce, kd, ratio), {"ce": ce.item(), "kd": kd.item()}
    ce = lean_cross_entropy(h, weight, torch.where(valid, batch["actions"], IGNORE_INDEX))
    if ratio == 0:
        return ce, {"ce": ce.item()}
    assert teacher_probs is not None  # ratio > 0 without the cache's sets: the live teacher's
    kd = exact_kd_loss(scored_rows(h, valid), weight, teacher_probs)
    return mixed_kd_loss(ce, kd, ratio), {"ce": ce.item(), "kd": kd.item()}


def divergence_loss(
    hidden: Tensor,
    weight: Tensor,
    batch: dict[str, Tensor],
    name: str,
    config: DistillStage,
    teacher_logits: Tensor | None,
) -> tuple[Tensor, dict[str, float]]:
    """The divergence menu (docs/method.md §5.1): token mean over the valid positions, from the cache's
    sets (coarse-grained, lean) or the live teacher's logits of the scored rows ([N, V], dense)."""
    settings = config.divergence
    valid = batch["valid"]
    rows = scored_rows(response_hidden(hidden, batch["positions"]), valid)
    if teacher_logits is None:
        ids, probs, mask = (scored_rows(batch[k], valid) for k in ("cand_ids", "cand_probs", "cand_mask"))
        per_position = lean_coarse_per_token(
            name, rows, weight, ids, probs, mask,
            beta=settings.jsd_beta, alpha=settings.skew_alpha, temperature=settings.temperature,
        )  # fmt: skip
    else:
        per_position = per_token(
            name, rows @ weight.T, teacher_logits,
            beta=settings.jsd_beta, alpha=settings.skew_alpha, temperature=settings.temperature,
        )  # fmt: skip
    loss = per_position.mean()
    return loss, {name: loss.item()}


def pretrain_loss(
    hidden: Tensor, weight: Tensor, blocks: Tensor, ratio: float = 0.0, teacher_probs: Tensor | None = None
) -> Tensor:
    """L_PT on packed blocks [B, L]: next-token cross-entropy over L - 1 positions per block,
    mixed with exact KD when the live teacher's probabilities of those positions are given."""
    h = hidden[:, :-1]
    ce = lean_cross_entropy(h, weight, blocks[:, 1:])
    if teacher_probs is None or ratio == 0:
        return ce
    kd = exact_kd_loss(h.reshape(-1, h.shape[-1]), weight, teacher_probs)
    return mixed_kd_loss(ce, kd, ratio)


# --------------------------------------------------------------------------- the stage


def prepare(job: Job, log=print) -> None:
    """Launching process: data split, inputs that must exist, vocabulary check, pretraining blocks."""
    from bdctl.data.batching import training_steps
    from bdctl.data.prepare import prepare_data
    from bdctl.engine import check_batch_split, lr_schedule
    from bdctl.models import check_attention, check_lora, check_vocabularies, load_tokenizer, max_positions
    from bdctl.selection import check_rouge_selection

    config = stage_config(job)
    method = job.options["method"]
    if method not in METHODS:
        raise UserError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    check_batch_split(config, "distill", job.world_size)
    setup = make_setup(job)
    prepare_data(job.recipe, job.run, log)
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)

    if setup.init == "student_sft" and manifest(job.run.stage("student_sft")) is None:
        raise UserError(
            f"distill --method {method} starts from the phase-1 student (init: {config.init}) and "
            f"{job.run.stage('student_sft')} has not finished; run it first: "
            f"{stage_command('student_sft', job.recipe_path)}"
        )
    student = resolve_weights(job, setup.init, "student")
    teacher = (
        resolve_weights(job, job.recipe.stages.generate.model, "teacher")
        if setup.live_teacher
        else job.recipe.models.teacher
    )
    check_vocabularies(job.recipe, tokenizer, {"teacher": teacher, "student": student})
    check_attention(job.recipe.models.student, "student")
    check_attention(job.recipe.models.teacher, "teacher")
    check_lora(student, tokenizer, job.recipe.models.student.lora, "models.student.lora")
    limit = max_positions(student)
    check_rouge_selection(job, config, "distill", limit)

    data, stats = load_train_data(job, tokenizer, setup)
    if len(data) < config.batch_size:
        raise UserError(
            f"stages.distill.batch_size ({config.batch_size}) exceeds the {len(data)} training examples "
            f"of --method {method}"
        )
    per_epoch, total_steps = training_steps(len(data), config)
    lr_schedule(config, "distill", total_steps)  # a schedule shorter than the run is refused here, not on the ranks
    if setup.pretrain:
        from bdctl.data.pretrain import prepare_blocks

        assert job.recipe.data.pretrain is not None  # make_setup: the pretraining term needs the corpus
        block_size = job.recipe.data.pretrain.block_size
        if limit is not None and block_size > limit:
            raise UserError(f"data.pretrain.block_size ({block_size}) exceeds the student's {limit} positions")
        prepare_blocks(job.recipe, job.run, tokenizer, total_steps * config.batch_size, log)
    job.info.update(train=stats, total_steps=total_steps, setup=setup.__dict__)
    for line in describe(setup, job):
        log(f"distill: {line}")
    if stats.get("cut_at_max_length") or stats.get("skipped_without_transition"):
        log(
            f"distill: D* {stats['cache_examples']} responses: {stats['cut_at_max_length']} cut at data.max_length "
            f"({job.recipe.data.max_length} tokens with the prompt), "
            f"{stats['skipped_without_transition']} skipped (no transition)"
        )


def deepspeed_preview(job: Job) -> dict:
    """The resolved DeepSpeed config that --dry-run prints (the step count is only a guess there)."""
    from bdctl.engine import deepspeed_config, on_gpu, resolve_precision
    from bdctl.models import hidden_size

    setup = make_setup(job)
    source = job.recipe.models.student if setup.init in ("base", "student_sft") else resolve_weights(job, setup.init)
    return deepspeed_config(
        job.recipe,
        stage_config(job),
        job.stage_name,
        job.world_size,
        0,
        hidden_size(source),
        resolve_precision(job.recipe),
        on_gpu(),
    )


def run(job: Job, rank: int, world: int) -> None:
    """Every rank: data, student (and live teacher) engines, train with the shared loop, export the best."""
    from bdctl.data.batching import training_steps
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
    from bdctl.selection import Validator, selection_facts
    from bdctl.tracking import MetricsLog, StepProgress
    from bdctl.training import MicroBatch, finish, loop_config, train_loop

    recipe, config, out = job.recipe, stage_config(job), job.stage_dir
    setup = make_setup(job)

    # --- data: every rank reads the same examples; the loop hands each rank its share
    tokenizer = load_tokenizer(job.run.tokenizer, template=job.recipe.data.template)
    data, stats = load_train_data(job, tokenizer, setup)
    per_epoch, total_steps = training_steps(len(data), config)
    blocks = None
    if setup.pretrain:
        from bdctl.data.pretrain import PretrainBlocks, pretrain_dir

        blocks = PretrainBlocks(pretrain_dir(job.run), limit=total_steps * config.batch_size)

    # --- student engine, and the live teacher as an inference engine beside it
    precision = resolve_precision(recipe)
    source = resolve_weights(job, setup.init, "student")
    ds_config = deepspeed_config(
        recipe, config, job.stage_name, world, total_steps, hidden_size(source), precision, on_gpu()
    )
    with_ds = hf_deepspeed_context(ds_config)  # noqa: F841  (alive while loading: ZeRO-3 partitioned load)
    engine = make_engine(
        policy_module(
            load_model(
                source,
                tokenizer,
                recipe.seed,
                **memory_switches(recipe.models.student),
                lora=recipe.models.student.lora,
                where="models.student.lora",
            )
        ),  # fmt: skip
        ds_config,
        lr_schedule(config, "distill", total_steps),
    )
    teacher = None
    if setup.live_teacher:
        teacher_source = resolve_weights(job, recipe.stages.generate.model, "teacher")
        teacher_config = deepspeed_config(
            recipe, config, job.stage_name, world, total_steps, hidden_size(teacher_source), precision, on_gpu()
        )
        teacher = make_inference_engine(
            policy_module(load_model(teacher_source, tokenizer, recipe.seed, **memory_switches(recipe.models.teacher))),
            teacher_config,
        )
    device = engine.device
    # terminal transitions end at the stop token
    pad_id, eos_id = tokenizer.pad_token_id, required_stop_id(tokenizer, "distill (terminal transitions)")
    cap = recipe.stages.generate.cache_max_k

    def micro_batches(indices: list[int]) -> list[MicroBatch]:
        batch = collate_examples([data.example(i) for i in indices], pad_id, eos_id, data.with_sets)
        return [MicroBatch(batch, batch_count(batch, setup))]

    def pretrain_inputs(step: int, index: int):
        assert blocks is not None  # the loop gets this function only when there are blocks
        ids = blocks.micro_batch(step, index, config.micro_batch_size, config.batch_size, recipe.seed)
        return {"input_ids": ids}, ids.shape[0] * (ids.shape[1] - 1)

    def teacher_forward(input_ids, attention_mask, fn):
        assert teacher is not None  # called only with a live teacher (setup.live_teacher)
        with torch.no_grad():
            return teacher(input_ids, attention_mask, loss_fn=fn)

    def loss(micro: MicroBatch):
        batch = {k: v.to(device) for k, v in micro.inputs.items() if k != "aux"}
        valid = batch["valid"]
        teacher_probs = None
        if setup.sets == "live":  # BD: the teacher's top-p sets at the states of the batch
            found = teacher_forward(
                batch["input_ids"], batch["attention_mask"],
                lambda h, w: teacher_sets(scored_rows(response_hidden(h, batch["positions"]), valid), w, config.p, cap),
            )  # fmt: skip
            batch["cand_ids"], batch["cand_mask"] = frame_sets(valid, *found)
        teacher_logits = None
        if setup.kd_teacher == "live" and setup.divergence is not None:  # the divergence menu: dense logits
            teacher_logits = teacher_forward(
                batch["input_ids"], batch["attention_mask"],
                lambda h, w: scored_rows(response_hidden(h, batch["positions"]), valid) @ w.T,
            )  # fmt: skip
        elif setup.kd_teacher == "live":
            teacher_probs = teacher_forward(
                batch["input_ids"], batch["attention_mask"],
                lambda h, w: teacher_probabilities(scored_rows(response_hidden(h, batch["positions"]), valid), w),
            )  # fmt: skip
        if setup.method == "bd":
            scored = bd_scored(batch, setup) if setup.anchor_coef > 0 else None

            def head(hidden, weight):
                terms = bd_terms(hidden, weight, batch, config)
                logs = {k: float(getattr(terms, k)) for k in BD_LOGS}
                if scored is None or micro.count == 0:
                    return terms.loss, logs
                anchor = anchor_loss(hidden, weight, batch, scored)
                logs.update(bd_loss=float(terms.loss.detach()), anchor_ce=float(anchor.detach()))
                return terms.loss + setup.anchor_coef * anchor, logs

        elif setup.divergence is not None:
            name = setup.divergence

            def head(hidden, weight):
                return divergence_loss(hidden, weight, batch, name, config, teacher_logits)

        else:

            def head(hidden, weight):
                return ce_and_kd(hidden, weight, batch, setup.kd_ratio, teacher_probs)

        value, logs = engine(batch["input_ids"], batch["attention_mask"], loss_fn=head)
        if blocks is None:
            return value, logs
        ids = micro.inputs["aux"]["input_ids"].to(device)
        mask = torch.ones_like(ids)
        pt_probs = None
        if setup.pt_kd:
            pt_probs = teacher_forward(
                ids, mask, lambda h, w: teacher_probabilities(h[:, :-1].reshape(-1, h.shape[-1]), w)
            )
        aux = engine(ids, mask, loss_fn=lambda h, w: pretrain_loss(h, w, ids, config.pt_kd_ratio, pt_probs))
        return value, logs, aux

    loop = loop_config(job, config, total_steps, per_epoch)
    loop.aux_coef, loop.aux_name = config.lm_coef, "pt_loss"
    diagnostics = DiagnosticSet(job, config, tokenizer, rank, world)
    validate = Validator(job, config, engine, tokenizer, rank, world, diagnostics)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    metrics.write(
        event="start", total_steps=total_steps, world_size=world, train=len(data), valid=len(validate.examples),
        select=config.select, data=stats, method=setup.method, setup=setup.__dict__,
        notes=[*describe(setup, job), diagnostics.note],
    )  # fmt: skip
    with StepProgress(f"distill {setup.method}", total_steps, enabled=rank == 0) as progress:
        for line in describe(setup, job):
            progress.print(line)
        state = train_loop(
            engine=engine, config=loop, out=out, rank=rank, world=world, n_train=len(data),
            micro_batches=micro_batches, loss=loss, validate=validate,
            export_best=lambda info, name: export_hf(engine, tokenizer, out / name, rank, info),
            metrics=metrics, progress=progress, aux_inputs=pretrain_inputs if blocks is not None else None,
        )  # fmt: skip
    finish(
        out,
        state,
        rank,
        job.stage_name,
        metrics,
        config.select,
        notes=describe(setup, job),
        **selection_facts(job, config),
    )
