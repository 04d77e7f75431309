"""What the training loop's validation measures, and so which checkpoint a stage keeps.

    val_loss   response-only cross-entropy on the golden validation responses (lower is better):
               the teacher SFT and phase 1 (docs/method.md §5).
    rouge_l    Rouge-L of sampled answers to the validation prompts (higher is better): phase 2,
               "checkpoint chosen by best validation Rouge-L" (docs/method.md §3).

Rouge-L validation samples as `bdctl eval` does, under a named protocol of stages.eval
(`select_protocol`, default the first: temperature, top_p, top_k; and the eval stage's
max_new_tokens, batch size and no_repeat_ngram_size), one answer per prompt, each prompt with the
seed `prompt_seed(recipe seed, prompt id)`. With `select_each_protocol` every protocol is scored
(`rouge_l@<protocol>`) and the loop keeps one best export per protocol. Every validation therefore draws the same
random numbers, and the scores of two checkpoints are a paired comparison, not two noisy draws.
The sampling runs on the training engine itself: through the root module (ZeRO-3 gathers the
weights per layer), with the ranks kept in step by `sampling.Lockstep`.
"""

from __future__ import annotations

from bdctl.errors import UserError

HIGHER_IS_BETTER = {"val_loss": False, "rouge_l": True}


def better(select: str, score: float, best: float | None) -> bool:
    if best is None:
        return True
    return score > best if HIGHER_IS_BETTER[select] else score < best


def validation_loss(engine, examples, micro_batch_size: int, pad_id: int, rank: int, world: int) -> float:
    """Token-mean cross-entropy of the golden responses of `examples` (`data.batching.Tokenized`)."""
    import torch

    from bdctl.data.batching import IGNORE, collate, eval_batches
    from bdctl.engine import global_mean
    from bdctl.objectives.lm import lean_cross_entropy

    total = count = 0.0
    with torch.no_grad():
        for indices in eval_batches(len(examples), micro_batch_size, rank, world):
            # every rank runs the same number of forward passes (ZeRO-3 gathers collectively)
            batch = {k: v.to(engine.device) for k, v in collate([examples[i] for i in indices or [0]], pad_id).items()}
            labels = batch["labels"]
            value = engine(
                batch["input_ids"], batch["attention_mask"],
                loss_fn=lambda hidden, weight, labels=labels: lean_cross_entropy(hidden, weight, labels),
            )  # fmt: skip
            tokens = int((labels != IGNORE).sum()) if indices else 0
            total += value.item() * tokens
            count += tokens
    return global_mean(total, count, engine.device)


def validation_rouge(
    engine, tokenizer, rows: list[dict], settings, seed: int, rank: int, world: int, protocol=None
) -> float:
    """Mean Rouge-L (0-100) of one sampled answer per validation row against its golden output.

    `settings`: the eval stage (max_new_tokens, batch_size, no_repeat_ngram_size); `protocol`: the
    stages.eval protocol to sample with (None: its first).
    """
    from bdctl.answers import prompt_seed, sample_answers
    from bdctl.engine import global_mean
    from bdctl.metrics import rouge_l
    from bdctl.sampling import Lockstep, length_grouped_batches

    sampling = settings.protocol(protocol.name if protocol is not None else None).sampling()

    model = engine.module  # the policy module: loss_fn=None makes it a plain causal LM
    prompts = tokenizer([row["prompt"] for row in rows])["input_ids"]
    batches = length_grouped_batches([len(p) for p in prompts], settings.batch_size)
    lockstep = Lockstep(model, tokenizer.pad_token_id, engine.device) if world > 1 else None
    total = 0.0
    for first in range(0, len(batches), world):  # one round: a batch per rank (or none)
        batch = batches[first + rank] if first + rank < len(batches) else None

        def run(all_done=None, batch=batch):
            return sample_answers(
                model, tokenizer, [prompts[i] for i in batch], [prompt_seed(seed, rows[i]["id"]) for i in batch],
                sampling=sampling, max_new_tokens=settings.max_new_tokens,
                no_repeat_ngram_size=settings.no_repeat_ngram_size, all_done=all_done,
            )  # fmt: skip

        answers = run() if lockstep is None else lockstep.round(settings.max_new_tokens, run if batch else None)
        for i, answer in zip(batch or [], answers, strict=True):
            total += rouge_l(answer.text, [rows[i]["output"]])
    return global_mean(total, float(len(rows) if rank == 0 else 0), engine.device)


def per_protocol_key(name: str) -> str:
    """The validation score of one protocol when a stage keeps a best export per protocol."""
    return f"rouge_l@{name}"


def selection_protocols(job, config) -> list[str]:
    """Rouge-L selection: [the protocol that picks the export, then every other one it keeps a
    best export for (select_each_protocol)]; [] when the stage selects by loss."""
    if config.select != "rouge_l":
        return []
    protocols = job.recipe.stages.eval.protocols
    chosen = job.recipe.stages.eval.protocol(config.select_protocol).name
    others = [p.name for p in protocols if p.name != chosen] if config.select_each_protocol else []
    return [chosen, *others]


class Validator:
    """`validate()` for `training.train_loop`: the validation loss, plus Rouge-L when the stage
    selects by it, plus the distill methods' diagnostics (`bdctl.diagnostics`) when given.
    Returns {"val_loss": ..., ["rouge_l": ..., "rouge_l@<protocol>": ...]}, the
    same on every rank (`rouge_l` under the selection protocol; the per-protocol keys only with
    select_each_protocol, for every protocol)."""

    def __init__(self, job, config, engine, tokenizer, rank: int, world: int, diagnostics=None):
        from bdctl.data.batching import tokenize_examples
        from bdctl.data.prepare import read_split

        self.engine, self.tokenizer, self.rank, self.world = engine, tokenizer, rank, world
        self.select, self.micro_batch_size = config.select, config.micro_batch_size
        self.rows = read_split(job.run.data, "valid")
        self.examples = tokenize_examples(self.rows, tokenizer)
        if config.select_prompts is not None:
            self.rows = self.rows[: config.select_prompts]
        self.settings, self.seed = job.recipe.stages.eval, job.recipe.seed
        self.protocols = selection_protocols(job, config)
        self.each = config.select_each_protocol and config.select == "rouge_l"
        self.diagnostics = diagnostics  # bdctl.diagnostics.DiagnosticSet (distill methods), logged beside the scores

    def __call__(self) -> dict[str, float]:
        self.engine.eval()
        scores = {
            "val_loss": validation_loss(
                self.engine, self.examples, self.micro_batch_size, self.tokenizer.pad_token_id, self.rank, self.world
            )
        }
        for index, name in enumerate(self.protocols):
            score = validation_rouge(
                self.engine, self.tokenizer, self.rows, self.settings, self.seed, self.rank, self.world,
                self.settings.protocol(name),
            )  # fmt: skip
            if index == 0:
                scores["rouge_l"] = score
            if self.each:
                scores[per_protocol_key(name)] = score
        if self.diagnostics is not None:
            scores.update(self.diagnostics(self.engine))
        self.engine.train()
        return scores


def check_rouge_selection(job, config, stage: str, student_positions: int | None) -> None:
    """Launching process: Rouge-L selection samples up to stages.eval.max_new_tokens after the
    longest validation prompt, which must fit the model's positions."""
    if config.select != "rouge_l" or student_positions is None:
        return
    longest = job.recipe.data.max_prompt_length
    room = student_positions - longest
    if job.recipe.stages.eval.max_new_tokens > room:
        raise UserError(
            f"stages.{stage}.select: rouge_l samples stages.eval.max_new_tokens "
            f"({job.recipe.stages.eval.max_new_tokens}) tokens after prompts of up to data.max_prompt_length "
            f"({longest}); the model has {student_positions} "
            f"positions: set stages.eval.max_new_tokens to at most {room}"
        )


def selection_facts(job, config) -> dict:
    """What the manifest records about checkpoint selection: the protocol Rouge-L sampled with."""
    protocols = selection_protocols(job, config)
    if not protocols:
        return {}
    chosen = job.recipe.stages.eval.protocol(protocols[0])
    return {"select_protocol": chosen.model_dump(), "select_prompts": config.select_prompts}
