"""Cross-entropy language-modelling losses and the chunked-vocabulary helpers.

Cross-entropy serves SFT (prompt tokens carry the label -100 and are not scored), phase 1 of
Bellman Distill, teacher fine-tuning, and the pretraining LM term ``L_PT``.

Alignment convention, used by every function here: ``labels[b, t]`` is the token predicted
*from* position ``t`` (the labels are already shifted; nothing here shifts them).

The "lean" functions never build the ``[N, |V|]`` logit matrix. They take the student's final
hidden states ``hidden [N, H]`` and the output embedding ``weight [V, H]`` (plus an optional
``bias [V]``) and work on one vocabulary chunk at a time:

* :func:`chunked_logsumexp` - ``logsumexp_v (hidden @ weight.T + bias)[n, v]`` as an autograd
  function that stores only its ``[N]`` result and recomputes each chunk's logits in backward.
  An optional per-row ``floor`` computes ``logsumexp_v max(z[n, v], floor[n])``, which is
  what Bellman Distill needs for the full vocabulary (p = 1) with clipped Q values.
* :func:`chunked_argmax` - the arg-max token per row, found chunk by chunk without autograd.
* :func:`token_logits` - logits of given token ids (row gathers and dot products).
* :func:`candidate_logits` - logits of ``K`` candidate ids per row, computed once against the
  unique ids of the whole batch (``[N, |U|]``, in row blocks) rather than gathering ``[N, K, H]``
  embedding rows.

Computation runs in float32 for half-precision inputs (float64 stays float64); results are
returned in that compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

IGNORE_INDEX = -100
"""Label value that marks a position as not scored (prompt tokens, padding)."""

DEFAULT_CHUNK_SIZE = 8192
"""Vocabulary columns per chunk: at most ``[N, DEFAULT_CHUNK_SIZE]`` logits exist at a time."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _check_projection(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Shape checks for a ``hidden [N, H]`` x ``weight [V, H]`` (+ ``bias [V]``) projection."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"expected bias [{weight.shape[0]}], got {tuple(bias.shape)}")


def check_token_range(token_ids: Tensor, vocab_size: int, what: str) -> None:
    """Raise `ValueError` unless every id lies in ``[0, vocab_size)`` (one host sync)."""
    if token_ids.numel() == 0:
        return
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} token id out of range: found ids in [{low}, {high}], vocabulary size is {vocab_size}")


def _chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, start: int, end: int, dtype: torch.dtype
) -> Tensor:
    """Logits ``[N, end - start]`` of vocabulary rows ``start:end``, in ``dtype``."""
    logits = hidden @ weight[start:end].T
    if bias is not None:
        logits = logits + bias[start:end]
    return logits.to(dtype)


class _ChunkedLogSumExp(torch.autograd.Function):
    """``logsumexp_v max(hidden @ weight.T + bias, floor)`` with O(N) saved state.

    Forward keeps a running logsumexp over chunks; backward recomputes each chunk's logits
    and turns them into softmax weights ``exp(z - lse)``, so at most one ``[N, chunk]`` block
    is alive in either pass. Where a logit is below its row's floor, the gradient goes to the
    floor instead (the same convention as ``torch.clamp``: ties go to the logit).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        floor: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        dtype = compute_dtype(hidden.dtype)
        vocab = weight.shape[0]
        lse = hidden.new_full((hidden.shape[0],), float("-inf"), dtype=dtype)
        floor_col = None if floor is None else floor.to(dtype)[:, None]
        for start in range(0, vocab, chunk_size):
            logits = _chunk_logits(hidden, weight, bias, start, min(start + chunk_size, vocab), dtype)
            if floor_col is not None:
                logits = torch.maximum(logits, floor_col)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        # torch's stub says Tensor only; save_for_backward documents None as allowed
        ctx.save_for_backward(hidden, weight, bias, floor, lse)  # type: ignore[arg-type]
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_lse: Tensor):
        hidden, weight, bias, floor, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        need_h, need_w, need_b, need_f = ctx.needs_input_grad[:4]  # type: ignore[attr-defined]
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        dtype = lse.dtype
        vocab = weight.shape[0]
        grad_lse = grad_lse.to(dtype)

        hidden_c = hidden.to(dtype)
        grad_h = torch.zeros_like(hidden_c) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_b else None
        grad_f = torch.zeros_like(lse) if need_f else None
        floor_col = None if floor is None else floor.to(dtype)[:, None]

        for start in range(0, vocab, chunk_size):
            end = min(start + chunk_size, vocab)
            logits = _chunk_logits(hidden, weight, bias, start, end, dtype)
            if floor_col is not None:
                above = logits >= floor_col
                logits = torch.where(above, logits, floor_col)
            # d lse / d z = softmax(z); scaled by the incoming gradient per row.
            probs = torch.exp(logits - lse[:, None]) * grad_lse[:, None]
            if floor_col is not None:
                if grad_f is not None:
                    grad_f += probs.masked_fill(above, 0.0).sum(dim=-1)
                probs = probs.masked_fill(~above, 0.0)
            if grad_h is not None:
                grad_h += probs @ weight[start:end].to(dtype)
            if grad_w is not None:
                grad_w[start:end] = probs.T @ hidden_c
            if grad_b is not None:
                grad_b[start:end] = probs.sum(dim=0)

        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None if grad_f is None else grad_f.to(floor.dtype),
            None,
        )


def chunked_logsumexp(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    floor: Tensor | None = None,
) -> Tensor:
    """Row-wise logsumexp over the vocabulary of ``hidden @ weight.T + bias``, chunk by chunk.

    Args:
        hidden: ``[N, H]`` final hidden states (one row per scored position).
        weight: ``[V, H]`` output embedding (lm_head weight).
        bias: optional ``[V]`` output bias.
        chunk_size: vocabulary columns per chunk; bounds the live logits to ``[N, chunk_size]``.
        floor: optional ``[N]``; if given, every logit is first raised to its row's floor,
            i.e. the result is ``logsumexp_v max(z[n, v], floor[n])`` (differentiable in floor).

    Returns:
        ``[N]`` in the compute dtype (float32 for half-precision inputs). Differentiable with
        respect to hidden, weight, bias and floor; only the ``[N]`` result is stored.
    """
    _check_projection(hidden, weight, bias)
    _check_chunk_size(chunk_size)
    if floor is not None and tuple(floor.shape) != (hidden.shape[0],):
        raise ValueError(f"expected floor [{hidden.shape[0]}], got {tuple(floor.shape)}")
    return _ChunkedLogSumExp.apply(hidden, weight, bias, floor, chunk_size)


@torch.no_grad()
def chunked_argmax(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Index ``[N]`` (long) of the largest logit of each row, found chunk by chunk, no autograd.

    Ties resolve to the lowest token id. Recompute the winning logit with
    :func:`token_logits` to get a differentiable maximum: its gradient is that of ``max``.
    """
    _check_projection(hidden, weight, bias)
    _check_chunk_size(chunk_size)
    dtype = compute_dtype(hidden.dtype)
    vocab = weight.shape[0]
    best = hidden.new_full((hidden.shape[0],), float("-inf"), dtype=dtype)
    best_idx = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, vocab, chunk_size):
        logits = _chunk_logits(hidden, weight, bias, start, min(start + chunk_size, vocab), dtype)
        value, idx = logits.max(dim=-1)
        better = value > best  # strict: an earlier chunk keeps a tie
        best = torch.where(better, value, best)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


def token_logits(hidden: Tensor, weight: Tensor, token_ids: Tensor, bias: Tensor | None = None) -> Tensor:
    """Logits of chosen tokens: ``hidden[..., :] . weight[token_ids] + bias[token_ids]``.

    Args:
        hidden: ``[..., H]``.
        weight: ``[V, H]``.
        token_ids: long, either ``[...]`` (one id per position, returns ``[...]``) or
            ``[..., K]`` (K ids per position, returns ``[..., K]``). Ids must be valid.
        bias: optional ``[V]``.

    Returns:
        The logits in the compute dtype. Costs ``[..., (K,) H]`` gathered rows, so use it for
        a handful of ids per position (the data token, the arg-max); for candidate sets use
        :func:`candidate_logits`.
    """
    dtype = compute_dtype(hidden.dtype)
    lead = hidden.shape[:-1]
    if token_ids.shape == lead:
        logits = (hidden.to(dtype) * weight[token_ids].to(dtype)).sum(dim=-1)
    elif token_ids.shape[:-1] == lead:
        logits = torch.einsum("...h,...kh->...k", hidden.to(dtype), weight[token_ids].to(dtype))
    else:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} do not match hidden {tuple(hidden.shape)}")
    if bias is not None:
        logits = logits + bias[token_ids].to(dtype)
    return logits


def candidate_logits(
    hidden: Tensor,
    weight: Tensor,
    cand_ids: Tensor,
    cand_mask: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Logits ``[N, K]`` of ``K`` candidate token ids per row, without ``[N, K, H]`` gathers.

    The unique member ids ``U`` of the whole batch are projected once (``hidden @
    weight[U].T``, ``[N, |U|]``) and each row reads its candidates from that matrix. Rows are
    processed in blocks so that no block exceeds ``N * chunk_size`` logits, the same budget as
    one vocabulary chunk. Advanced indexing (not ``gather``) reads the block, so autograd keeps
    only the indices, never the ``[rows, |U|]`` block.

    Args:
        hidden: ``[N, H]``.
        weight: ``[V, H]``.
        cand_ids: long ``[N, K]``.
        cand_mask: bool ``[N, K]``, True for real candidates; slots with False may hold any id
            (padding) and get the value 0. ``None`` means every slot is real.
        bias: optional ``[V]``.
        chunk_size: the memory budget, in vocabulary columns, as for :func:`chunked_logsumexp`.

    Returns:
        ``[N, K]`` logits in the compute dtype; callers must mask the padding slots.
    """
    _check_projection(hidden, weight, bias)
    _check_chunk_size(chunk_size)
    if cand_ids.dim() != 2 or cand_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected cand_ids [{hidden.shape[0]}, K], got {tuple(cand_ids.shape)}")
    if cand_mask is None:
        cand_mask = torch.ones_like(cand_ids, dtype=torch.bool)
    elif cand_mask.shape != cand_ids.shape:
        raise ValueError(f"cand_mask {tuple(cand_mask.shape)} does not match cand_ids {tuple(cand_ids.shape)}")
    dtype = compute_dtype(hidden.dtype)
    rows, slots = cand_ids.shape
    member_ids = cand_ids[cand_mask]
    if member_ids.numel() == 0:
        return hidden.new_zeros((rows, slots), dtype=dtype)
    check_token_range(member_ids, weight.shape[0], "candidate")

    unique_ids, inverse = torch.unique(member_ids, return_inverse=True)
    columns = torch.zeros_like(cand_ids)
    columns[cand_mask] = inverse
    weight_u = weight[unique_ids]  # [|U|, H]
    bias_u = None if bias is None else bias[unique_ids]

    n_unique = unique_ids.numel()
    block = max(1, (rows * chunk_size) // n_unique)
    pieces = []
    for start in range(0, rows, block):
        end = min(start + block, rows)
        logits = hidden[start:end] @ weight_u.T
        if bias_u is not None:
            logits = logits + bias_u
        row_index = torch.arange(end - start, device=hidden.device)[:, None]
        pieces.append(logits[row_index, columns[start:end]].to(dtype))
    out = torch.cat(pieces, dim=0)
    return out.masked_fill(~cand_mask, 0.0)


def _flatten_scored(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``hidden [B, T, H]`` and ``labels [B, T]`` whose label is not ignored."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    flat_labels = labels.reshape(-1)
    scored = flat_labels != IGNORE_INDEX
    index = scored.nonzero().squeeze(1)
    if index.numel() == 0:
        raise ValueError(
            "batch has no scored token (every label is -100): nothing to train on; "
            "check that responses survive truncation"
        )
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), flat_labels[index]


def lean_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Token-level mean cross-entropy from hidden states, never building ``[B, T, V]`` logits.

    Args:
        hidden: ``[B, T, H]`` (or any ``[..., H]``) final hidden states.
        weight: ``[V, H]`` output embedding.
        labels: long ``[B, T]``, the token predicted from each position (already shifted);
            ``-100`` = not scored.
        bias: optional ``[V]``.
        chunk_size: vocabulary chunk of :func:`chunked_logsumexp`.

    Returns:
        Scalar ``mean over scored positions of (logsumexp(z) - z[label])``.
    """
    rows, targets = _flatten_scored(hidden, labels)
    check_token_range(targets, weight.shape[0], "label")
    log_partition = chunked_logsumexp(rows, weight, bias, chunk_size=chunk_size)
    return (log_partition - token_logits(rows, weight, targets, bias)).mean()


def dense_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Reference token-level mean cross-entropy from full logits ``[B, T, V]``.

    ``labels [B, T]`` as in :func:`lean_cross_entropy` (already shifted, ``-100`` ignored).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    scored = flat_labels != IGNORE_INDEX
    if not bool(scored.any()):
        raise ValueError(
            "batch has no scored token (every label is -100): nothing to train on; "
            "check that responses survive truncation"
        )
    check_token_range(flat_labels[scored], logits.shape[-1], "label")
    log_probs = torch.log_softmax(flat_logits[scored].to(compute_dtype(logits.dtype)), dim=-1)
    return -log_probs.gather(1, flat_labels[scored][:, None]).mean()
