"""The teacher's top-p set of a probability row, and ``Capture``: the sets of one response as the
cache stores them (docs/method.md §2, §7.3). Pure functions of tensors and arrays; the sampler
(bdctl/sampling.py) computes them while it samples, the cache (bdctl/cache.py) stores and reads
them, distill uses them for live-teacher sets.

The top-p set, precisely. Sort the tokens by probability, higher first, and among tokens of
equal probability the *lower token id first* (so the set is a deterministic function of the
probabilities). Keep the shortest prefix whose cumulative probability reaches ``p``: the token
that crosses ``p`` is kept, and at least one token always is. ``p >= 1`` means the whole
vocabulary. The set is capped at ``max_k`` tokens; where the cap cuts it short, the mass it
covers (``covered``) is below ``p``. Ordering uses the probabilities rounded to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bdctl.errors import UserError
from bdctl.objectives.lm import DEFAULT_CHUNK_SIZE, compute_dtype

DEFAULT_MAX_K = 64
"""Default cap on the size of a captured top-p set."""


# --------------------------------------------------------------------------- the top-p set


class TopPSet(NamedTuple):
    """Top-p sets of ``N`` probability rows, padded to ``w`` slots (``max(kept) <= w <= max_k``).

    Attributes:
        ids: long ``[N, w]``, token ids by decreasing probability (ties: lower id first);
            only the first ``kept[n]`` slots of row ``n`` are members; the other slots are not
            (they hold next-ranked tokens or zero padding).
        probs: ``[N, w]`` their probabilities, in the dtype of the input.
        kept: long ``[N]``, the set size (``1 <= kept <= min(max_k, V)``).
        covered: ``[N]`` total probability of the members; below ``p`` only where the cap
            ``max_k`` cut the set short (or where ``p >= 1``).
    """

    ids: Tensor
    probs: Tensor
    kept: Tensor
    covered: Tensor


def check_p(p: float, what: str) -> None:
    if not 0.0 < p <= 1.0:
        raise UserError(f"{what} must lie in (0, 1], got {p!r}")


def _sort_keys(probs: Tensor) -> Tensor:
    """int64 ``[N, V]`` keys ordering tokens by probability, then by lower id.

    Non-negative float32 values order like their bit patterns read as integers, so
    ``bits * V + (V - 1 - id)`` is a total order with exactly the tie rule we want, and
    ``torch.topk`` on it is deterministic whatever the device's top-k kernel does with ties.
    """
    vocab = probs.shape[-1]
    # abs() turns a possible -0.0 into +0.0, whose bit pattern is the smallest key.
    bits = probs.float().abs().contiguous().view(torch.int32).to(torch.int64)
    reverse_ids = torch.arange(vocab - 1, -1, -1, device=probs.device, dtype=torch.int64)
    return bits * vocab + reverse_ids


def _ranked_ids(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable tokens of each row, in canonical order (decreasing float32
    probability, ties by lower id): long ids ``[N, k]`` and their float32 values ``[N, k]``.

    Fast path: ``topk(k + 1)`` on the probabilities. Without equal values among the ``k + 1``
    winners its order is already canonical. Otherwise the winners are re-sorted by (probability,
    id), which is exact unless the ``k``-th and ``(k + 1)``-th values tie, since then a tied
    token left outside may have a lower id than one inside; those rows (rare with real
    distributions) are redone with exact integer keys (:func:`_sort_keys`), which cost several
    passes over the vocabulary.
    """
    values32 = probs.float()
    vocab = values32.shape[-1]
    if k >= vocab:
        # Every token is in: a stable sort keeps lower ids first among ties.
        values, ids = torch.sort(values32, dim=-1, descending=True, stable=True)
        return ids, values
    values, ids = torch.topk(values32, k + 1, dim=-1)
    if not bool((values[:, 1:] == values[:, :-1]).any()):
        return ids[:, :k], values[:, :k]
    ids, by_id = torch.sort(ids, dim=-1)
    values, by_value = torch.sort(values.gather(-1, by_id), dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, by_value)[:, :k]
    boundary_tie = values[:, k - 1] == values[:, k]
    if bool(boundary_tie.any()):
        rows = boundary_tie.nonzero().squeeze(1)
        ids[rows] = torch.topk(_sort_keys(values32[rows]), k, dim=-1).indices
    return ids, values32.gather(-1, ids)


_FIRST_PASS_K = 16
"""Width of the first, cheap top-k pass of :func:`top_p_set`. At p < 1 most sets of a peaked
teacher are much smaller than the cap; only the rows whose set is still open after this many
tokens pay for a top-k of the full cap width (on CPU, top-k time grows steeply with k)."""


def _prefix(probs: Tensor, p: float, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``k`` best tokens of each row, their probabilities, the cumulative sums and the set
    size counted within those ``k`` (exact whenever the set closes within them)."""
    ids, top = _ranked_ids(probs, k)
    if probs.dtype != torch.float32:
        top = probs.gather(-1, ids)  # the input's own precision (the ranking used float32)
    cum = top.cumsum(dim=-1)
    if p >= 1.0:
        kept = torch.full((probs.shape[0],), k, dtype=torch.long, device=probs.device)
    else:
        # Token j is kept when the tokens before it have not reached p yet: the token that
        # crosses p is kept, and token 0 always is. The cumulative sum is non-decreasing, so
        # the kept tokens are a prefix and counting them gives its length.
        kept = 1 + (cum[:, :-1] < p).sum(dim=-1)
    return ids, top, cum, kept


def top_p_set(probs: Tensor, p: float, max_k: int = DEFAULT_MAX_K) -> TopPSet:
    """The top-p set of each row of ``probs [N, V]`` (see the module docstring for the rule).

    Never sorts the vocabulary: a ``topk`` of width 17 and a cumulative sum over 16 columns
    settle every row whose set closes within 16 tokens; the other rows get a ``topk`` of width
    ``min(max_k, V) + 1`` (vectorised over rows either way). Rows need not sum to exactly 1
    (float noise); ``p`` is compared with the raw cumulative sums.

    Returns:
        A :class:`TopPSet` of width ``w`` with ``max(kept) <= w <= min(max_k, V)``.
    """
    check_p(p, "top_p")
    if max_k < 1:
        raise UserError(f"the top-p cap max_k must be at least 1, got {max_k!r}")
    if probs.dim() != 2:
        raise ValueError(f"expected probs [N, V], got {tuple(probs.shape)}")
    k = min(max_k, probs.shape[-1])
    if p >= 1.0 or k <= _FIRST_PASS_K:
        ids, top, cum, kept = _prefix(probs, p, k)
        return TopPSet(ids, top, kept, cum.gather(-1, (kept - 1)[:, None]).squeeze(-1))

    ids, top, cum, kept = _prefix(probs, p, _FIRST_PASS_K)
    covered = cum.gather(-1, (kept - 1)[:, None]).squeeze(-1)
    still_open = cum[:, -1] < p
    if bool(still_open.any()):
        rows = still_open.nonzero().squeeze(1)
        wide_ids, wide_top, wide_cum, wide_kept = _prefix(probs[rows], p, k)
        pad = k - _FIRST_PASS_K
        ids = torch.nn.functional.pad(ids, (0, pad))
        top = torch.nn.functional.pad(top, (0, pad))
        ids[rows], top[rows], kept[rows] = wide_ids, wide_top, wide_kept
        covered[rows] = wide_cum.gather(-1, (wide_kept - 1)[:, None]).squeeze(-1)
    return TopPSet(ids, top, kept, covered)


@torch.no_grad()
def teacher_sets(rows: Tensor, weight: Tensor, p: float, max_k: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The teacher's top-p sets of rows (``top_p_set``, the cache's rule): ids [N, w], kept [N].

    Rows go in blocks of at most ``N * chunk_size`` logits, the budget of the chunked losses.
    """
    dtype = compute_dtype(rows.dtype)
    block = max(1, (max(1, rows.shape[0]) * chunk_size) // weight.shape[0])
    ids, kept = [], []
    for start in range(0, rows.shape[0], block):
        logits = (rows[start : start + block] @ weight.T).to(dtype)
        found = top_p_set(torch.softmax(logits, dim=-1), p, max_k)
        ids.append(found.ids)
        kept.append(found.kept)
    widest = max(x.shape[1] for x in ids)
    return torch.cat([torch.nn.functional.pad(x, (0, widest - x.shape[1])) for x in ids]), torch.cat(kept)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Capture:
    """The teacher's top-p sets at the ``T`` positions of one response, stored flat.

    Position ``t`` is the state ``s_t = prompt + response[:t]``; its set holds the candidates
    for ``response[t]``. The ragged sets are concatenated in position order (``E`` entries).

    Attributes:
        ids: int32 ``[E]`` candidate token ids; within a set by decreasing probability, ties by
            lower id.
        probs: ``[E]`` their teacher probabilities: float32 from the sampler (the softmax's own
            precision, so they can be compared exactly with a fresh forward); read back from the
            cache, float16 (cache format 1) or float32 decoded from a log-probability code (format
            2), both within about 4.9e-4 relative, plenty for a distillation target.
        kept: ``[T]`` set size at each position (int32 here, uint8 or uint16 in the cache);
            ``E = kept.sum()``.
        covered: ``[T]`` probability mass of each set (float32 here; float16 or float32 from the cache);
            below ``p`` only where the cap cut the set short.
    """

    ids: np.ndarray
    probs: np.ndarray
    kept: np.ndarray
    covered: np.ndarray

    def __len__(self) -> int:
        return int(self.kept.shape[0])

    def offsets(self) -> np.ndarray:
        """int64 ``[T + 1]``: the set of position ``t`` is ``ids[offsets[t]:offsets[t + 1]]``."""
        out = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.kept, out=out[1:])
        return out

    def head(self, length: int) -> Capture:
        """The sets of the first ``length`` positions."""
        if length == len(self):
            return self
        end = int(self.offsets()[length])
        return Capture(self.ids[:end], self.probs[:end], self.kept[:length], self.covered[:length])

    def narrowed(self, p: float) -> Capture:
        """The top-``p`` sets for a ``p`` below the one this capture was made with.

        A top-p set is a prefix of any top-p' set with p' >= p (both follow the same ranking), so
        the smaller set is the shortest prefix whose probabilities reach ``p`` (at least one
        token), computed from the stored probabilities (float16 in the cache: a token whose
        cumulative sum lies within ~1e-3 of ``p`` may fall on the other side than a fresh
        forward would put it).
        """
        offsets = self.offsets()
        kept = np.empty_like(self.kept)
        covered = np.empty(len(self), dtype=np.float32)
        take = np.zeros(len(self.ids), dtype=bool)
        for t in range(len(self)):
            cum = np.cumsum(self.probs[offsets[t] : offsets[t + 1]], dtype=np.float64)
            n = 1 + int((cum[:-1] < p).sum())
            kept[t], covered[t] = n, cum[n - 1]
            take[offsets[t] : offsets[t] + n] = True
        return Capture(
            ids=self.ids[take], probs=self.probs[take], kept=kept, covered=covered.astype(self.covered.dtype)
        )

    def position(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, probs)`` of the set at position ``t``."""
        offsets = self.offsets()
        return self.ids[offsets[t] : offsets[t + 1]], self.probs[offsets[t] : offsets[t + 1]]
