"""MiniLLM's rollouts (docs/method.md §6): the student samples, the live teacher mixed in at every token.

    found = mixed_sample(student, teacher, prompts, seeds, mix=0.2, eos_id=..., pad_id=..., max_new_tokens=256)

At each step both models run one forward over the batch (each with its own KV cache), the next token is
drawn from ``mix = (1 - a) softmax(z_student) + a softmax(z_teacher)`` (temperature 1, no top-k, no
top-p), and the drawn token's log-probability under the student, the teacher and the mixture is kept
(`objectives.minillm.token_scores`): the rewards and importance weights of the update come from these
very logits, so there is no second pass over the responses.

Randomness is the sampler's (`bdctl.sampling`): each row draws one uniform per token from its own
generator, seeded by `rollout_seed(recipe seed, step, prompt id)`, and inverts the mixture's cumulative
distribution. A row's response therefore depends on its prompt, its seed and the weights only, and the
same batch gives the same responses on any number of ranks.

Ranks. On ZeRO-3 the student (the training engine's module) and a teacher with `zero_inference` gather
their weights collectively in every forward, so every rank must run the same forward passes: a rank
whose batch has finished runs dummy forwards of both models until every rank is done (`Lockstep`, with
`Both` as its model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bdctl.errors import UserError
from bdctl.models import config_positions
from bdctl.objectives.lm import compute_dtype
from bdctl.objectives.minillm import mixture_probs, token_scores
from bdctl.sampling import FINISH_EOS, FINISH_LENGTH, _choose, _forward_logits, _row_uniforms, left_padded


def rollout_seed(recipe_seed: int, step: int, prompt_id: int) -> int:
    """A rollout's seed from (recipe seed, the step that collects, prompt id) alone: 63 bits of a hash."""
    digest = hashlib.sha256(f"bdctl-minillm/{recipe_seed}/{step}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class MixedSample:
    """One rollout response and what the update needs of its sampling, per response token.

    Attributes:
        tokens: response token ids; ends with EOS exactly when ``finish_reason == "eos"``.
        finish_reason: ``"eos"`` or ``"length"``.
        seed: the row's seed.
        log_q: float ``[T]``, log q_old(y_t | s_t) (the sampling student, temperature 1).
        log_p: float ``[T]``, log p(y_t | s_t) (the teacher).
        log_mix: float ``[T]``, log mix_t(y_t).
    """

    tokens: list[int]
    finish_reason: str
    seed: int
    log_q: np.ndarray
    log_p: np.ndarray
    log_mix: np.ndarray


class Both:
    """Calls the student and the teacher with the same arguments: `Lockstep`'s dummy forward for two models.

    Runs under no_grad, never inference mode (which `Lockstep` uses): see `mixed_sample`.
    """

    def __init__(self, student, teacher):
        self.student, self.teacher = student, teacher

    def __call__(self, **inputs):
        with torch.inference_mode(False), torch.no_grad():
            self.student(**inputs)
            return self.teacher(**inputs)


def _check(student, teacher, prompts, seeds, mix: float, max_new_tokens: int) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not 0.0 <= mix < 1.0:
        raise ValueError(f"teacher mix weight must lie in [0, 1), got {mix!r}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
    if any(len(prompt) == 0 for prompt in prompts):
        raise UserError("cannot sample from an empty prompt (0 tokens)")
    for name, model in (("student", student), ("teacher", teacher)):
        if model.training:
            raise ValueError(f"the {name} is in training mode; call eval() before sampling")
        limit = config_positions(model.config)
        longest = max((len(prompt) for prompt in prompts), default=0)
        if limit is not None and longest + max_new_tokens > limit:
            raise UserError(
                f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the {name}'s "
                f"{limit} positions"
            )


@torch.no_grad()
def mixed_sample(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    mix: float,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    all_done: Callable[[bool], bool] | None = None,
) -> list[MixedSample]:
    """One response per prompt, sampled from the teacher-mixed student, in one batch with KV caches.

    Args:
        student, teacher: causal LMs (Hugging Face ``*ForCausalLM`` or bdctl's policy module) over one
            vocabulary, in eval mode, on the same device.
        prompts: token ids per prompt (left-padded here; position ids follow the attention mask).
        seeds: one seed per prompt.
        mix: the teacher's weight ``a`` in the mixture, in [0, 1).
        eos_id, pad_id: end-of-sequence and padding ids.
        max_new_tokens: response length limit.
        all_done: for collective models (ZeRO-3): called once per step with "this rank has finished",
            returns whether every rank has; until then a finished rank runs dummy forwards.

    Returns:
        One :class:`MixedSample` per prompt, in the order given.

    No gradients, but not inference mode: the student is the training engine's module, and on ZeRO-3 the
    first forward after an optimizer step re-gathers the persistent (small) parameters; gathered in
    inference mode they would become inference tensors that the next training forward cannot save.
    """
    _check(student, teacher, prompts, seeds, mix, max_new_tokens)
    if not prompts:
        return []
    device = next(student.parameters()).device
    batch = len(prompts)
    input_ids, attention_mask, position_ids, next_position = left_padded(prompts, pad_id, device)
    uniforms = _row_uniforms(seeds, max_new_tokens, device)
    live = torch.arange(batch, device=device)

    records: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []  # rows, tokens, log_q, log_p, log_mix
    first = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    logits_s, cache_s = _forward_logits(student, **first)
    logits_t, cache_t = _forward_logits(teacher, **first)
    for step in range(max_new_tokens):
        if live.numel():
            zs = logits_s.to(compute_dtype(logits_s.dtype))
            zt = logits_t.to(zs.dtype)
            probs = mixture_probs(zs, zt, mix)
            tokens = _choose(zs, uniforms[live, step], temperature=1.0, top_k=0, top_p=1.0, probs=probs)
            scores = token_scores(zs, zt, tokens, mix)
            records.append((live, tokens, scores.log_q, scores.log_p, scores.log_mix))
            keep = tokens != eos_id
            if not bool(keep.all()):  # finished rows leave the batch and both KV caches
                index = keep.nonzero().squeeze(1)
                live, tokens, next_position = live[index], tokens[index], next_position[index]
                attention_mask = attention_mask[index]
                if live.numel():
                    cache_s.batch_select_indices(index)
                    cache_t.batch_select_indices(index)

        local_done = live.numel() == 0
        if step == max_new_tokens - 1:
            break  # the same step on every rank: no collective needed to agree on it
        if all_done is not None:
            if all_done(local_done):
                break
        elif local_done:
            break

        if live.numel():
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((live.numel(), 1))], dim=1)
            step_inputs = dict(
                input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_position[:, None]
            )
            logits_s, cache_s = _forward_logits(student, **step_inputs, past_key_values=cache_s)
            logits_t, cache_t = _forward_logits(teacher, **step_inputs, past_key_values=cache_t)
            next_position = next_position + 1
        else:  # this rank is done, others are not: take part in their collective forwards
            Both(student, teacher)(
                input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device), use_cache=False, logits_to_keep=1
            )
    return _assemble(seeds, records, eos_id)


def _assemble(seeds: Sequence[int], records, eos_id: int) -> list[MixedSample]:
    """Per-step records -> per-row samples, with one device-to-host transfer per field."""
    rows = torch.cat([r[0] for r in records]).cpu().numpy()
    order = np.argsort(rows, kind="stable")  # (step, row) order -> (row, step) order
    fields = [torch.cat([r[k] for r in records]).cpu().numpy()[order] for k in range(1, 5)]
    counts = np.bincount(rows, minlength=len(seeds))
    ends = np.cumsum(counts)
    samples = []
    for row, seed in enumerate(seeds):
        part = slice(ends[row] - counts[row], ends[row])
        tokens = fields[0][part].tolist()
        finished = bool(tokens) and tokens[-1] == eos_id
        samples.append(
            MixedSample(
                tokens=tokens, finish_reason=FINISH_EOS if finished else FINISH_LENGTH, seed=int(seed),
                log_q=fields[1][part].copy(), log_p=fields[2][part].copy(), log_mix=fields[3][part].copy(),
            )
        )  # fmt: skip
    return samples
