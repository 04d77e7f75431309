"""Tokenised examples, the global data order, and how a step's batch is cut across ranks.

The data order depends only on (seed, epoch, global batch size), never on the number of ranks:
step s of epoch e trains on the same examples whether they are spread over 1 or 8 ranks, which is
what makes runs comparable across world sizes and resumable at an exact position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

IGNORE = -100  # label of positions that are not scored (prompt tokens, padding)


@dataclass(frozen=True)
class Tokenized:
    """One training sequence: prompt tokens, then response tokens and the stop token (EOS, or the chat
    template's end-of-turn token: `bdctl.models.stop_id`). `scored`: the (start, end) token spans that
    are trained on, when there are several (every assistant turn of a conversation); None: the
    response after `prompt_len`."""

    ids: list[int]
    prompt_len: int
    scored: tuple[tuple[int, int], ...] | None = None


def tokenize_examples(rows: list[dict], tokenizer, all_turns: bool = False) -> list[Tokenized]:
    """Prompt and response tokenised separately (generation starts from the prompt's tokens).

    `all_turns` (SFT): a conversation row (data/conversations.py) becomes its whole sequence, each
    text between assistant turns and each assistant turn tokenised separately in order, with every
    assistant turn and its stop token scored; other rows (and every row without `all_turns`) are
    their last turn only.
    """
    from bdctl.models import stop_id

    stop = stop_id(tokenizer)
    if all_turns and any("turns" in r for r in rows):
        return [_all_turns(r, tokenizer, stop) if "turns" in r else tokenize_examples([r], tokenizer)[0] for r in rows]
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    answers = tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]
    return [Tokenized(p + a + [stop], len(p)) for p, a in zip(prompts, answers, strict=True)]


def _all_turns(row: dict, tokenizer, stop: int | None) -> Tokenized:
    assert stop is not None  # conversations need data.template: chat, whose end-of-turn token is always found
    ids: list[int] = []
    spans = []
    for index, (before, answer) in enumerate(row["turns"]):
        # the first piece opens the sequence: with the tokenizer's special tokens, as a prompt is
        ids += tokenizer(before, add_special_tokens=index == 0)["input_ids"]
        start = len(ids)
        ids += tokenizer(answer, add_special_tokens=False)["input_ids"] + [stop]
        spans.append((start, len(ids)))
    return Tokenized(ids, spans[-1][0], tuple(spans))


def collate(examples: list[Tokenized], pad_id: int):
    """Right-padded `input_ids`, `attention_mask` and `labels` (response tokens only are scored).

    `labels[b, t]` is the token the model should predict at position t (already shifted), so the
    logits at position t are compared with labels[b, t] directly.
    """
    import torch

    width = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.ids)
        ids = torch.tensor(example.ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        # Position t predicts token t+1; only predictions of response tokens (and EOS) count.
        for start, end in example.scored or ((example.prompt_len, n),):
            labels[row, start - 1 : end - 1] = ids[start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder is dropped, a fresh shuffle each epoch)."""
    return n_examples // global_batch


def training_steps(n_examples: int, config) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) of a training stage: `epochs` passes of full
    global batches, stopped early at `max_steps`. The one formula sft and distill use."""
    per_epoch = steps_per_epoch(n_examples, config.batch_size)
    planned = per_epoch * config.epochs
    return per_epoch, min(planned, config.max_steps or planned)


def micro_batches(order: list[int], step: int, global_batch: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of global step `step`: micro-batch m goes to rank m % world."""
    batch = order[step * global_batch : (step + 1) * global_batch]
    chunks = [batch[i : i + micro] for i in range(0, global_batch, micro)]
    return chunks[rank::world]


def eval_batches(n_examples: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """Every example once across ranks, and the same number of batches on every rank.

    ZeRO-3 gathers parameters collectively, so a rank that ran fewer forward passes than the
    others would hang them; ranks with fewer batches get empty ones, which run no forward pass
    worth counting (the caller pads them with a dummy example of weight zero).
    """
    mine = list(range(n_examples))[rank::world]
    per_rank = -(-n_examples // world)
    n_batches = -(-per_rank // micro)
    return [mine[i * micro : (i + 1) * micro] for i in range(n_batches)]
