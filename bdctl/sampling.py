"""Batched sampling with a KV cache, capturing the teacher's top-p candidate sets (docs/method.md §2).

Bellman Distill is offline: the teacher samples responses once (temperature 1, no top-k, no
top-p) and, at every generated position, bdctl records the teacher's top-p set ``A_p(s_t)``
of the *raw* temperature-1 distribution, so distillation never runs the teacher again.
Evaluation uses the same sampler without the capture.

* :func:`sample` - batched sampling (left padding, KV cache, per-row seeds), optionally
  capturing the top-p set at each generated position.
* :func:`score` - the same capture for responses that already exist (one teacher forward).
* :func:`length_grouped_batches` - prompts grouped by length so batches carry little padding.

The top-p set and ``Capture`` (what the cache stores of it) are in :mod:`bdctl.topp`.

Randomness. Each row draws its uniforms from its own ``torch.Generator`` seeded with the row's
seed (on the CPU, so a seed gives the same draws on any device), one uniform per generated
token, and picks a token by inverting the row's cumulative distribution. A row's sample
therefore depends on its prompt and seed only, not on the other rows of its batch (up to float
noise from batching), and the same batch with the same seeds is bit-identical on the same
machine, which is what an exact resume needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bdctl.errors import UserError
from bdctl.models import config_positions
from bdctl.objectives.lm import compute_dtype
from bdctl.topp import DEFAULT_MAX_K, Capture, TopPSet, check_p, top_p_set

FINISH_EOS = "eos"
"""Finish reason of a response whose last token is the end-of-sequence token."""

FINISH_LENGTH = "length"
"""Finish reason of a response cut at ``max_new_tokens`` (truncated: docs/method.md §2)."""


@dataclass(frozen=True)
class Sample:
    """One sampled response.

    Attributes:
        tokens: the response token ids (the prompt excluded); ends with the EOS token exactly
            when ``finish_reason == "eos"``, and holds nothing after it.
        finish_reason: ``"eos"`` or ``"length"`` (cut at ``max_new_tokens``).
        seed: the seed this row was sampled with.
        capture: the teacher's top-p sets at each of ``len(tokens)`` positions, when asked for.
    """

    tokens: list[int]
    finish_reason: str
    seed: int
    capture: Capture | None = None


# --------------------------------------------------------------------------- batching


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so left padding stays small.

    Deterministic: indices are sorted by decreasing length (ties by index) and cut into
    consecutive batches of ``batch_size`` (the last may be smaller). The longest batch comes
    first, so running out of memory shows up at once rather than at the end.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- sampling


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _validate_sampling(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    no_repeat_ngram_size: int | None,
    capture_top_p: float | None,
    capture_max_k: int,
) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(prompt) == 0 for prompt in prompts):
        raise UserError("cannot sample from an empty prompt (0 tokens)")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    check_p(top_p, "top_p")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
    if no_repeat_ngram_size is not None and no_repeat_ngram_size < 1:
        raise UserError(f"no_repeat_ngram_size must be at least 1, got {no_repeat_ngram_size!r}")
    if capture_top_p is not None:
        check_p(capture_top_p, "capture top_p")
        if capture_max_k < 1:
            raise UserError(f"the top-p cap max_k must be at least 1, got {capture_max_k!r}")
    if model.training:
        # Dropout would make samples depend on more than the seed and break exact reruns.
        raise ValueError("the model is in training mode; call model.eval() before sampling")
    limit = config_positions(model.config)
    longest = max((len(prompt) for prompt in prompts), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        raise UserError(
            f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the "
            f"model's {limit} positions; shorten the prompts or lower max_new_tokens"
        )


def _row_uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> Tensor:
    """float64 ``[B, steps]``: row ``b``'s uniforms in [0, 1), drawn from its own seed only."""
    rows = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows).to(device)


class _NGramBan:
    """MiniLLM/HF ``no_repeat_ngram_size``: never complete an n-gram already in the sequence.

    One table per row, mapping each (n-1)-token prefix seen in the row's real tokens (prompt
    and response, no padding) to the tokens that followed it; updated in O(1) per step.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], n: int):
        self.n = n
        self.history: list[list[int]] = [list(prompt) for prompt in prompts]
        self.seen: list[dict[tuple[int, ...], set[int]]] = []
        for tokens in self.history:
            table: dict[tuple[int, ...], set[int]] = {}
            for end in range(n, len(tokens) + 1):
                table.setdefault(tuple(tokens[end - n : end - 1]), set()).add(tokens[end - 1])
            self.seen.append(table)

    def _prefix(self, row: int) -> tuple[int, ...] | None:
        tokens = self.history[row]
        if len(tokens) < self.n - 1:
            return None
        return tuple(tokens[len(tokens) - self.n + 1 :])

    def apply(self, scores: Tensor, rows: list[int]) -> Tensor:
        """``scores [b, V]`` of live ``rows`` with banned tokens set to -inf."""
        hit_rows: list[int] = []
        hit_tokens: list[int] = []
        for i, row in enumerate(rows):
            prefix = self._prefix(row)
            banned = self.seen[row].get(prefix, ()) if prefix is not None else ()
            hit_rows.extend([i] * len(banned))
            hit_tokens.extend(banned)
        if not hit_rows:
            return scores
        scores = scores.clone()
        index = (torch.tensor(hit_rows, device=scores.device), torch.tensor(hit_tokens, device=scores.device))
        scores[index] = float("-inf")
        return scores

    def push(self, rows: list[int], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            prefix = self._prefix(row)
            if prefix is not None:
                self.seen[row].setdefault(prefix, set()).add(token)
            self.history[row].append(token)


def _top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the top-p set of each row (same rule as :func:`top_p_set`,
    without a cap: nucleus sampling for evaluation)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cum = sorted_probs.cumsum(dim=-1)
    keep_sorted = torch.ones_like(cum, dtype=torch.bool)
    keep_sorted[:, 1:] = cum[:, :-1] < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return probs * keep


def _choose(
    scores: Tensor,
    uniforms: Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    probs: Tensor | None = None,
    allowed: TopPSet | None = None,
) -> Tensor:
    """Next token ``[b]`` (long) from ``scores [b, V]`` and one uniform per row.

    ``temperature == 0`` is greedy (ties: lowest id). Otherwise the row's distribution is
    ``softmax(scores / temperature)`` restricted to the ``top_k`` best scores (ties at the k-th
    score kept) and to its top-p set, and the token is found by inverting its cumulative sum
    at ``u * total``: tokens of zero probability can never be drawn.

    ``probs``, when given, must be ``softmax(scores)``: the capture has computed it already, and
    at temperature 1 without top-k it is the sampling distribution (bit for bit the one computed
    here otherwise, so capturing never changes the tokens).

    ``allowed``, when given, restricts the draw to each row's set (its first ``kept`` ids), the
    distribution renormalised over it: D* sampled from the teacher's top-p set exactly as the
    cache stores it (:func:`top_p_set`, cap included).
    """
    if temperature == 0.0:
        return scores.argmax(dim=-1)
    vocab = scores.shape[-1]
    if probs is None or temperature != 1.0 or 0 < top_k < vocab:
        if temperature != 1.0:
            scores = scores / temperature
        if 0 < top_k < vocab:
            kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        probs = _top_p_filter(probs, top_p)
    if allowed is not None:
        members = torch.arange(allowed.ids.shape[1], device=probs.device)[None, :] < allowed.kept[:, None]
        # amax, not a plain scatter: padding slots may repeat an id that is also a member.
        inside = torch.zeros_like(probs).scatter_reduce(-1, allowed.ids, members.to(probs.dtype), reduce="amax")
        probs = probs * inside
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):
        # NaN or inf logits (e.g. a half-precision overflow) would be sampled silently.
        raise FloatingPointError("the model produced non-finite logits; sampling stopped")
    # u * total < total in exact arithmetic; nextafter keeps it so after rounding, which
    # guarantees that searchsorted finds a token with positive probability.
    target = torch.minimum(uniforms.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(vocab - 1)


def _forward_logits(model: torch.nn.Module, **inputs: Any) -> tuple[Tensor, Any]:
    """Logits ``[b, V]`` at the last position, and the updated KV cache."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], out.past_key_values


def left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A left-padded prompt batch on `device`: input ids, attention mask, position ids and each row's
    next position. Real tokens get positions 0, 1, ... whatever the padding in front of them;
    padding gets 0 (it is masked out, any valid position will do)."""
    batch, width = len(prompts), max(len(prompt) for prompt in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    next_position = torch.tensor([len(prompt) for prompt in prompts], device=device)
    return input_ids, attention_mask, position_ids, next_position


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    eos_id: int | None,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int | None = None,
    set_top_p: float | None = None,
    capture_top_p: float | None = None,
    capture_max_k: int = DEFAULT_MAX_K,
    all_done: Callable[[bool], bool] | None = None,
) -> list[Sample]:
    """Sample one response per prompt, in one batch, with a KV cache.

    Args:
        model: a causal LM (Hugging Face ``*ForCausalLM``), in eval mode.
        prompts: token ids of each prompt (any lengths; the batch is left-padded).
        seeds: one seed per prompt; row ``b`` draws only from ``seeds[b]``.
        eos_id: end-of-sequence token, or ``None`` to always run ``max_new_tokens`` steps.
        pad_id: id fed at padding positions (never attended to).
        max_new_tokens: response length limit.
        temperature, top_p, top_k: the sampling distribution (``temperature == 0`` = greedy;
            ``top_p == 1`` and ``top_k == 0`` = off). Teacher data uses 1, 1, 0. ``top_p`` is
            evaluation's nucleus (no cap); for D* see ``set_top_p``.
        set_top_p: if set, draw only inside the top-p set of the raw temperature-1 distribution
            computed exactly as the capture computes it (:func:`top_p_set`: ties by lower id,
            the crossing token kept, at most ``capture_max_k`` tokens), renormalised. With
            ``set_top_p == capture_top_p`` every drawn token lies in its captured set.
        no_repeat_ngram_size: if set, never generate a token that completes an n-gram already
            present in the row's prompt + response (MiniLLM's evaluation used 6).
        capture_top_p: if set, record the teacher's top-p set (with this ``p``) at every
            generated position, computed from the raw temperature-1 distribution, before any
            sampling filter (temperature, top-k, top-p, n-gram ban).
        capture_max_k: cap on the captured set size.
        all_done: for collective models (e.g. ZeRO-3, where every rank must run the same
            forward passes): called once per step with "this rank has finished" and returns
            whether every rank has; until then a finished rank keeps running dummy forwards.

    Returns:
        One :class:`Sample` per prompt, in the order given.
    """
    _validate_sampling(
        model, prompts, seeds, max_new_tokens, temperature, top_p, top_k, no_repeat_ngram_size,
        capture_top_p, capture_max_k,
    )  # fmt: skip
    if set_top_p is not None:
        check_p(set_top_p, "set_top_p")
    if not prompts:
        return []
    device = _model_device(model)
    batch = len(prompts)
    input_ids, attention_mask, position_ids, next_position = left_padded(prompts, pad_id, device)

    uniforms = _row_uniforms(seeds, max_new_tokens, device)
    ban = _NGramBan(prompts, no_repeat_ngram_size) if no_repeat_ngram_size else None
    live = torch.arange(batch, device=device)  # original row of each row still being sampled
    live_rows = list(range(batch))  # the same, on the host (for the n-gram tables)

    # Per step: which rows were live, what they drew, and (when capturing) their sets.
    step_rows: list[Tensor] = []
    step_tokens: list[Tensor] = []
    step_sets: list[TopPSet] = []

    logits, cache = _forward_logits(
        model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    )
    for step in range(max_new_tokens):
        if live_rows:
            scores = logits.to(compute_dtype(logits.dtype))
            probs: Tensor | None = None
            allowed: TopPSet | None = None
            if capture_top_p is not None or set_top_p is not None:
                probs = torch.softmax(scores, dim=-1)
                if capture_top_p is not None:
                    step_sets.append(top_p_set(probs, capture_top_p, capture_max_k))
                if set_top_p is not None:
                    same = capture_top_p is not None and set_top_p == capture_top_p
                    allowed = step_sets[-1] if same else top_p_set(probs, set_top_p, capture_max_k)
            if ban is not None:
                banned = ban.apply(scores, live_rows)
                if banned is not scores:
                    scores, probs = banned, None
            tokens = _choose(
                scores,
                uniforms[live, step],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                probs=probs,
                allowed=allowed,
            )
            step_rows.append(live)
            step_tokens.append(tokens)
            if ban is not None:
                ban.push(live_rows, tokens.tolist())

            keep = tokens != eos_id if eos_id is not None else None
            if keep is not None and not bool(keep.all()):
                # Drop finished rows from the batch (and the KV cache): they are not sampled
                # further, and the remaining steps get cheaper.
                index = keep.nonzero().squeeze(1)
                live, tokens, next_position = live[index], tokens[index], next_position[index]
                attention_mask = attention_mask[index]
                live_rows = live.tolist()
                if live_rows:
                    cache.batch_select_indices(index)

        local_done = not live_rows
        if step == max_new_tokens - 1:
            break  # the same step on every rank: no collective needed to agree on it
        if all_done is not None:
            if all_done(local_done):
                break
        elif local_done:
            break

        if live_rows:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live_rows), 1))], dim=1)
            logits, cache = _forward_logits(
                model,
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position[:, None],
                past_key_values=cache,
            )
            next_position = next_position + 1
        else:
            # This rank is done but others are not: take part in their collective forward.
            dummy = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
            model(input_ids=dummy, use_cache=False, logits_to_keep=1)

    return _assemble(seeds, step_rows, step_tokens, step_sets, eos_id)


def _assemble(
    seeds: Sequence[int],
    step_rows: list[Tensor],
    step_tokens: list[Tensor],
    step_sets: list[TopPSet],
    eos_id: int | None,
) -> list[Sample]:
    """Turn the per-step records into per-row results, with one device-to-host transfer."""
    batch = len(seeds)
    rows = torch.cat(step_rows).cpu().numpy()
    tokens = torch.cat(step_tokens).cpu().numpy()
    # Records are in (step, row) order; a stable sort by row gives (row, step) order.
    order = np.argsort(rows, kind="stable")
    rows, tokens = rows[order], tokens[order]
    counts = np.bincount(rows, minlength=batch)
    ends = np.cumsum(counts)

    captures: list[Capture | None] = [None] * batch
    if step_sets:
        # Steps may differ in width (see top_p_set); pad to the widest, beyond every set's end.
        k = max(s.ids.shape[1] for s in step_sets)

        def widened(tensors: list[Tensor], dtype: torch.dtype) -> np.ndarray:
            padded = [torch.nn.functional.pad(t, (0, k - t.shape[1])) for t in tensors]
            return torch.cat(padded).to(dtype).cpu().numpy()[order]

        ids = widened([s.ids for s in step_sets], torch.int32)
        probs = widened([s.probs for s in step_sets], torch.float32)
        kept = torch.cat([s.kept for s in step_sets]).to(torch.int32).cpu().numpy()[order]
        covered = torch.cat([s.covered for s in step_sets]).to(torch.float32).cpu().numpy()[order]
        member = np.arange(k)[None, :] < kept[:, None]
        flat_ids, flat_probs = ids[member], probs[member]  # row-major: (row, step, rank) order
        entry_ends = np.cumsum(kept)
        for row in range(batch):
            start, end = ends[row] - counts[row], ends[row]
            e_start = entry_ends[start - 1] if start > 0 else 0
            e_end = entry_ends[end - 1] if end > 0 else 0
            captures[row] = Capture(
                ids=flat_ids[e_start:e_end].copy(),
                probs=flat_probs[e_start:e_end].copy(),
                kept=kept[start:end].copy(),
                covered=covered[start:end].copy(),
            )

    samples = []
    for row in range(batch):
        response = tokens[ends[row] - counts[row] : ends[row]].tolist()
        finished = eos_id is not None and bool(response) and response[-1] == eos_id
        samples.append(
            Sample(
                tokens=response,
                finish_reason=FINISH_EOS if finished else FINISH_LENGTH,
                seed=int(seeds[row]),
                capture=captures[row],
            )
        )
    return samples


# --------------------------------------------------------------------------- scoring


@torch.inference_mode()
def score(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    top_p: float,
    max_k: int = DEFAULT_MAX_K,
    batch_size: int = 8,
) -> list[Capture]:
    """The teacher's top-p sets over existing responses: one forward per batch, no sampling.

    Produces exactly what :func:`sample` captures, for responses that come from elsewhere
    (golden data, another sampler). Position ``t`` of response ``b`` is read from the logits
    at sequence position ``len(prompt_ids[b]) + t - 1``. Batches are consecutive slices of the
    input order, right-padded; only the response positions are projected onto the vocabulary.

    Returns:
        One :class:`Capture` per response, in the order given.
    """
    check_p(top_p, "top_p")
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size!r}")
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        if not prompt or not response:
            raise UserError("score needs a non-empty prompt and a non-empty response for every example")
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before scoring")
    device = _model_device(model)
    limit = config_positions(model.config)

    captures: list[Capture] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        responses = response_ids[start : start + batch_size]
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        width = max(lengths)
        if limit is not None and width > limit:
            raise UserError(f"a prompt + response of {width} tokens exceeds the model's {limit} positions")
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        # Positions whose logits predict a response token: len(prompt) - 1 ... len(seq) - 2.
        predicts = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            sequence = list(prompt) + list(response)
            input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
            attention_mask[row, : len(sequence)] = 1
            predicts[row, len(prompt) - 1 : len(sequence) - 1] = True
        position_ids = torch.arange(width).expand(len(prompts), width)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
            logits_to_keep=predicts.to(device),  # a bool mask: logits come back flat [N, V]
        )
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        sets = top_p_set(torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1), top_p, max_k)
        ids = sets.ids.to(torch.int32).cpu().numpy()
        probs = sets.probs.to(torch.float32).cpu().numpy()
        kept = sets.kept.to(torch.int32).cpu().numpy()
        covered = sets.covered.to(torch.float32).cpu().numpy()
        member = np.arange(ids.shape[1])[None, :] < kept[:, None]
        row_start = 0
        for response in responses:
            row_end = row_start + len(response)
            sub = member[row_start:row_end]
            captures.append(
                Capture(
                    ids=ids[row_start:row_end][sub],
                    probs=probs[row_start:row_end][sub],
                    kept=kept[row_start:row_end].copy(),
                    covered=covered[row_start:row_end].copy(),
                )
            )
            row_start = row_end
    return captures


# --------------------------------------------------------------------------- collective models


class Lockstep:
    """Keeps ZeRO-3 ranks in step: each runs the same forward passes and collectives.

    A round (one batch per rank, or none) follows the sampler's own sequence: a prefill
    forward, then per step "has every rank finished?" (`all_done`) and, if not, one forward.
    Ranks agree on the round's step count (the largest `max_new_tokens` of the round) first; a
    rank whose own batch ends sooner, or that has no batch, answers "done" and runs dummy
    forwards until every rank is done or the round's last step is reached.
    """

    def __init__(self, model, pad_id: int, device):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.round_steps = 0  # the round's step count: the largest max_new_tokens of any rank
        self.steps = 0  # steps of the current round whose all_done was answered
        self.finished = False

    def _reduce(self, value: int, op) -> int:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return int(tensor.item())

    def max(self, value: int) -> int:
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.MAX)

    def all_done(self, local_done: bool) -> bool:
        import torch.distributed as dist

        self.steps += 1
        self.finished = self._reduce(0 if local_done else 1, dist.ReduceOp.SUM) == 0
        return self.finished

    def forward_dummy(self) -> None:
        import torch

        with torch.inference_mode():
            self.model(input_ids=torch.full((1, 1), self.pad_id, device=self.device), use_cache=False, logits_to_keep=1)

    def round(self, max_new: int, run: Callable[[Callable[[bool], bool]], list] | None) -> list:
        """One round: `run(all_done)` samples this rank's batch (None: this rank has no batch);
        `max_new` is this rank's step limit (0 without a batch)."""
        self.begin(max_new)
        if run is None:
            self.idle()
            return []
        result = run(self.all_done)
        self.end()
        return result

    def begin(self, max_new: int) -> None:
        self.round_steps = self.max(max_new)
        self.steps, self.finished = 0, False

    def idle(self) -> None:
        """A rank without a batch this round: the prefill forward, then follow the others."""
        self.forward_dummy()
        self.end()

    def end(self) -> None:
        """After this rank's sampler returned: keep answering "done" until the round is over.
        The sampler asks at steps 0 .. max_new - 2; the round asks up to round_steps - 2."""
        if self.finished:
            return  # every rank was done: the round is over everywhere
        while self.steps < self.round_steps - 1:
            if self.all_done(True):
                return
            self.forward_dummy()
