"""A local causal-LM judge: no network, no sampling, one forward pass per request.

The judge prompt (the same messages as every backend) is rendered with the tokenizer's chat
template when it has one (ending in the assistant's generation prompt), else as plain text ending
in ``Verdict:``. The verdict is the label whose first token is most probable as the next token.

Which token spells a label: after a chat template's generation prompt the answer starts a new
turn (``A``), after ``Verdict:`` a word usually comes with its leading space (``" A"``), and
tokenizers differ. So each label is scored on both spellings: its score is the log of the summed
next-token probability of the first tokens of ``"A"`` and ``" A"`` (one token if both spell the
same). A first token shared between labels (a byte-level tokenizer may spell ``" A"`` and
``" B"`` as ``" "`` + letter) says nothing about which label is meant and is left out; a label
left with no token of its own is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdctl.data.template import PROMPT_FORMAT_MARK
from bdctl.errors import UserError
from bdctl.judges.base import JudgeOutput, JudgeRequest
from bdctl.judges.prompt import PROMPT_VERSION, VERDICTS, Verdict, build_messages, render_plain

if TYPE_CHECKING:
    import torch


class HFJudge:
    """A transformers causal LM used as a pairwise judge.

    Args:
        model: a causal LM (``AutoModelForCausalLM``), in eval mode on its device.
        tokenizer: its tokenizer.
        name: how the judge is identified in cache keys (its directory, for ``from_pretrained``).
        batch_size: prompts per forward pass.
        max_answer_tokens: each answer is cut to this many tokens before rendering (both orders
            alike), so that long answers cannot push the prompt past the model's context.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        batch_size: int = 8,
        max_answer_tokens: int = 384,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"judge setting batch_size is {batch_size}, expected at least 1")
        if max_answer_tokens < 1:
            raise UserError(f"judge setting max_answer_tokens is {max_answer_tokens}, expected at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_answer_tokens = max_answer_tokens
        template = getattr(tokenizer, "chat_template", None)
        # A bdctl export's template is its Alpaca-style prompt format, not a conversation: plain text, as before.
        self.uses_chat_template = bool(template) and PROMPT_FORMAT_MARK not in str(template)
        self.label_tokens = _label_token_ids(tokenizer, name)
        self.context_length = _context_length(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 8,
        max_answer_tokens: int = 384,
    ) -> HFJudge:
        """Load a judge from a local model directory (no download is attempted)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise UserError(
                f"judge model directory {directory} has no config.json; expected a saved transformers model"
            )
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype, None)
        if torch_dtype is None:
            raise UserError(f"judge dtype {dtype!r} is not a torch dtype (expected auto, float32, bfloat16, ...)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"cannot load judge model from {directory}: {reason}") from None
        # transformers types `to` through a decorator whose signature drops the device argument
        model.to(device).eval()  # type: ignore[arg-type]
        return cls(
            model,
            tokenizer,
            name=str(directory.resolve()),
            batch_size=batch_size,
            max_answer_tokens=max_answer_tokens,
        )

    @property
    def identity(self) -> Mapping[str, str]:
        """What decides this judge's verdicts. Weights changed in place under the same path are
        not detected: use another cache file then."""
        return {
            "backend": "hf",
            "model": self.name,
            "base_url": "",
            "prompt_version": PROMPT_VERSION,
            "max_answer_tokens": str(self.max_answer_tokens),
        }

    # -- prompts --------------------------------------------------------------------------

    def _clip(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_answer_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_answer_tokens])

    def prompt_ids(self, request: JudgeRequest) -> list[int]:
        """The token ids the judge reads for ``request``; the verdict is the next token."""
        messages = build_messages(
            request.instruction, request.input, self._clip(request.answer_a), self._clip(request.answer_b)
        )
        if self.uses_chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template writes its own special tokens (BOS and turn markers).
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(render_plain(messages), add_special_tokens=True)
        if self.context_length is not None and len(ids) > self.context_length:
            raise UserError(
                f"judge prompt for instruction {request.instruction[:40]!r} is {len(ids)} tokens, more than "
                f"judge model {self.name}'s context of {self.context_length}; lower max_answer_tokens"
            )
        return ids

    # -- scoring --------------------------------------------------------------------------

    def judge_many(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[int, JudgeOutput]]:
        """Yield ``(index, output)`` for every request, one batch at a time."""
        encoded = [self.prompt_ids(request) for request in requests]
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for index, scores in zip(batch, self._score([encoded[i] for i in batch]), strict=True):
                best: Verdict = max(VERDICTS, key=lambda label: scores[label])
                yield index, JudgeOutput(raw=best, verdict=best, scores=scores)

    def _score(self, batch: list[list[int]]) -> list[dict[str, float]]:
        """Per-label log-probabilities of the next token after each prompt."""
        import torch

        device = _model_device(self.model)
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else 0  # masked out: any id will do
        # Right padding: real tokens never attend to the padding after them and keep their
        # natural positions, so no position ids are needed; the prediction is read at each
        # row's own last token.
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        last = torch.tensor([len(ids) - 1 for ids in batch])
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            next_logits = logits[torch.arange(len(batch), device=logits.device), last.to(logits.device)]
            log_probs = torch.log_softmax(next_logits.float(), dim=-1)
            label_scores = {
                label: torch.logsumexp(log_probs[:, list(token_ids)], dim=-1)
                for label, token_ids in self.label_tokens.items()
            }
        return [{label: float(label_scores[label][row]) for label in VERDICTS} for row in range(len(batch))]


def _label_token_ids(tokenizer: Any, name: str) -> dict[str, tuple[int, ...]]:
    """For each label, the distinct first tokens of its spellings that no other label shares."""
    candidates: dict[str, set[int]] = {}
    for label in VERDICTS:
        firsts = set()
        for spelling in (label, " " + label):
            ids = tokenizer.encode(spelling, add_special_tokens=False)
            if ids:
                firsts.add(ids[0])
        candidates[label] = firsts
    result: dict[str, tuple[int, ...]] = {}
    for label in VERDICTS:
        firsts = candidates[label]
        others = set().union(*(candidates[other] for other in VERDICTS if other != label))
        own = tuple(sorted(firsts - others))
        if not own:
            raise UserError(
                f"judge tokenizer of {name} spells {label!r} with no first token of its own; "
                "it cannot tell A, B and Tie apart"
            )
        result[label] = own
    return result


def _context_length(model: Any, tokenizer: Any) -> int | None:
    """The model's maximum sequence length, if it declares one."""
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return None


def _model_device(model: Any) -> torch.device:
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
