"""What every distill method logs at each validation beside its scores (docs/method.md §8.4, §3.3):
how the student's distribution sits against the teacher's top-p sets A_t, on one fixed sample of
D*'s transitions, the same for KD, SeqKD, BD and MiniLLM so that their runs can be compared.

    diag_mass_on_set     mean over positions of the student's probability mass on A_t
    diag_argmax_in_set   share of positions whose student arg-max lies in A_t
    diag_dstar_nll       mean negative log-likelihood of D*'s actions (comparable across methods,
                         unlike BD's own loss)
    diag_outside_share   share of D*'s actions outside A_t (a property of the sample, not of the student)
    diag_mean_v          mean V_t = logsumexp_{a in A_t} max(z_t(a) - max_b z_t(b), q_min), the paper
                         variant's value (docs/method.md §2), whatever the method trains

The sample: the first `stages.distill.diagnostic_responses` responses of the D* cache the recipe
trains on (stages.distill.dstar), in cache order, each cut at data.max_length like training cuts
it, A_t the cached sets at stages.distill.p (the cache's own sets when p is not below the cache's
top-p). Every valid response position counts. D* exists for training prompts only: BD and SeqKD
train on these transitions, KD and MiniLLM do not; bdctl has no teacher data for validation
prompts. Without a finished D* cache the diagnostics are off and the run says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIAGNOSTICS = ("diag_mass_on_set", "diag_argmax_in_set", "diag_dstar_nll", "diag_outside_share", "diag_mean_v")


def _masked_logsumexp(x: Tensor, member: Tensor) -> Tensor:
    """logsumexp of x over the members of each row (every row has at least one)."""
    return torch.logsumexp(x.masked_fill(~member, float("-inf")), dim=-1)


def position_diagnostics(
    hidden: Tensor, weight: Tensor, cand_ids: Tensor, cand_mask: Tensor, actions: Tensor, q_min: float
) -> dict[str, Tensor]:
    """Per position (row), the quantities of DIAGNOSTICS, from final hidden states `[N, H]`, the output
    embedding `[V, H]`, the teacher's sets `[N, K]` (ids and mask, at least one member per row) and the
    data actions `[N]`. Never builds `[N, V]` logits (chunked logsumexp and arg-max)."""
    from bdctl.objectives.lm import candidate_logits, chunked_argmax, chunked_logsumexp, token_logits

    with torch.no_grad():
        log_norm = chunked_logsumexp(hidden, weight)
        best = chunked_argmax(hidden, weight)
        z_best = token_logits(hidden, weight, best)
        z_set = candidate_logits(hidden, weight, cand_ids, cand_mask)
        q_set = torch.clamp(z_set - z_best[:, None], min=q_min)
        return {
            "diag_mass_on_set": torch.exp(_masked_logsumexp(z_set, cand_mask) - log_norm),
            "diag_argmax_in_set": (cand_mask & (cand_ids == best[:, None])).any(dim=-1).to(log_norm.dtype),
            "diag_dstar_nll": log_norm - token_logits(hidden, weight, actions),
            "diag_outside_share": (~(cand_mask & (cand_ids == actions[:, None])).any(dim=-1)).to(log_norm.dtype),
            "diag_mean_v": _masked_logsumexp(q_set, cand_mask),
        }


class DiagnosticSet:
    """The fixed D* sample and the pass that measures DIAGNOSTICS on it with the training engine
    (every rank runs the same number of forward passes, as ZeRO-3 needs). `note` says what it is, or
    why the diagnostics are off."""

    def __init__(self, job, config, tokenizer, rank: int, world: int):
        from bdctl.cache import check, open_cache
        from bdctl.data.prepare import read_split
        from bdctl.distill_data import Item, TrainData, dstar_name
        from bdctl.models import required_stop_id, tokenizer_hash
        from bdctl.rundir import manifest

        self.rank, self.world, self.q_min = rank, world, config.q_min
        self.micro_batch_size = config.micro_batch_size
        self.data: TrainData | None = None
        directory = job.run.stage(config.dstar)
        if config.diagnostic_responses == 0:
            self.note = "diagnostics on A_t: off (stages.distill.diagnostic_responses: 0)"
            return
        if manifest(directory) is None:
            self.note = f"diagnostics on A_t: off ({dstar_name(config.dstar)} has not been generated: {directory})"
            return
        cache = open_cache(directory / "cache")
        check(cache, tokenizer_hash(tokenizer))
        rows = read_split(job.run.data, "train")
        by_id = {row["id"]: i for i, row in enumerate(rows)}
        prompts: dict[int, list[int]] = {}
        items: list[Item] = []
        for index in range(len(cache)):
            if len(items) == config.diagnostic_responses:
                break
            example = cache[index]
            row = by_id.get(example.prompt_id)
            if row is None:
                continue  # load_train_data refuses such a cache for bd and seqkd; here it is only skipped
            if row not in prompts:
                prompts[row] = tokenizer(rows[row]["prompt"])["input_ids"]
            length = min(len(example), job.recipe.data.max_length - len(prompts[row]))
            if length > 0:
                items.append(Item(row=row, source=index, length=length))
        narrow_to = config.p if config.p < cache.top_p - 1e-9 else None
        self.data = TrainData(prompts, items, cache=cache, with_sets=True, narrow_to=narrow_to)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, required_stop_id(tokenizer, "diagnostics")
        p = config.p if narrow_to is not None else cache.top_p
        self.note = (
            f"diagnostics on A_t (top-p {p:g}): the first {len(items)} responses of {dstar_name(config.dstar)}, "
            "every method alike"
        )

    def __call__(self, engine) -> dict[str, float]:
        """DIAGNOSTICS over the sample (the same on every rank); {} when off. Call in eval mode."""
        from bdctl.data.batching import eval_batches
        from bdctl.distill_data import collate_examples
        from bdctl.engine import global_mean

        if self.data is None:
            return {}
        data = self.data
        totals = dict.fromkeys(DIAGNOSTICS, 0.0)
        count = 0.0
        with torch.no_grad():
            for indices in eval_batches(len(data), self.micro_batch_size, self.rank, self.world):
                # every rank runs the same number of forward passes (ZeRO-3 gathers collectively)
                batch = collate_examples([data.example(i) for i in indices or [0]], self.pad_id, self.eos_id, True)
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                valid = batch["valid"]

                def head(hidden, weight, batch=batch, valid=valid):
                    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], batch["positions"]]
                    return position_diagnostics(
                        rows[valid], weight, batch["cand_ids"][valid], batch["cand_mask"][valid],
                        batch["actions"][valid], self.q_min,
                    )  # fmt: skip

                values = engine(batch["input_ids"], batch["attention_mask"], loss_fn=head)
                if indices:
                    for key in DIAGNOSTICS:
                        totals[key] += float(values[key].double().sum())
                    count += int(valid.sum())
        return {key: global_mean(totals[key], count, engine.device) for key in DIAGNOSTICS}
