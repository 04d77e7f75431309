"""Word-level knowledge distillation (MiniLLM's KD baseline), docs/method.md §5.

    KD = - mean_t sum_v pi*(v | s_t) log pi_theta(v | s_t)        over valid (response) positions
    L  = (1 - r) * CE + r * KD                                    r = kd_ratio

``valid [B, T]`` marks the positions whose next token is a response token; the mean is
token-level over all of them in the batch. Student and teacher distributions are softmaxes of
the logits at temperature 1.

Two teacher forms:

* **Live teacher** (:func:`dense_kd_loss`): the teacher's full logits, so KD is exact.
* **Sparse teacher cache** (:func:`sparse_kd_loss_dense`, :func:`lean_sparse_kd_loss`): the
  teacher is known only through ``K`` candidates per position (``cand_ids``, ``cand_probs``,
  ``cand_mask``). The teacher distribution is taken to be the candidate probabilities
  *renormalised to sum to 1* over the real candidates - the top-k approximation; the mass
  outside the cache is dropped. With that ``q``,
  ``KD_t = - sum_k q_k log pi_theta(id_k) = logsumexp_v z_t(v) - sum_k q_k z_t(id_k)``,
  which the lean form computes from hidden states with a chunked logsumexp and the candidate
  logits only, never ``[B, T, V]``.

Nothing here detaches the teacher: pass teacher logits computed under ``torch.no_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdctl.objectives.lm import (
    DEFAULT_CHUNK_SIZE,
    candidate_logits,
    check_token_range,
    chunked_logsumexp,
    compute_dtype,
)

_NO_VALID = (
    "batch has no valid response position: word-level KD needs at least one; check that responses survive truncation"
)


def _valid_index(valid: Tensor, lead_shape: torch.Size) -> Tensor:
    """Flat indices of the valid positions; `ValueError` if there are none."""
    if valid.shape != lead_shape:
        raise ValueError(f"valid {tuple(valid.shape)} does not match {tuple(lead_shape)}")
    index = valid.reshape(-1).nonzero().squeeze(1)
    if index.numel() == 0:
        raise ValueError(_NO_VALID)
    return index


def dense_kd_loss(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor) -> Tensor:
    """Exact word-level KD from full logits.

    Args:
        student_logits: ``[B, T, V]`` student logits.
        teacher_logits: ``[B, T, V]`` teacher logits at the same positions (same vocabulary).
        valid: bool ``[B, T]``, True where the position is scored.

    Returns:
        Scalar ``- mean_{valid t} sum_v softmax(teacher)_v * log_softmax(student)_v``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    index = _valid_index(valid, student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    dtype = compute_dtype(student_logits.dtype)
    student = student_logits.reshape(-1, vocab).index_select(0, index).to(dtype)
    teacher = teacher_logits.reshape(-1, vocab).index_select(0, index).to(dtype)
    teacher_probs = torch.softmax(teacher, dim=-1)
    student_logp = torch.log_softmax(student, dim=-1)
    # Tokens the teacher gives probability 0 contribute 0, even where the student's
    # log-probability is -inf (e.g. masked padding rows of the vocabulary): avoid 0 * -inf.
    cross = torch.where(teacher_probs > 0, teacher_probs * student_logp, 0.0)
    return -cross.sum(dim=-1).mean()


def _sparse_teacher(
    cand_ids: Tensor, cand_probs: Tensor, cand_mask: Tensor, index: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Valid rows of the cache and the renormalised teacher distribution ``q [N, K]``."""
    if not (cand_ids.shape == cand_probs.shape == cand_mask.shape):
        raise ValueError(
            f"cand_ids {tuple(cand_ids.shape)}, cand_probs {tuple(cand_probs.shape)} and "
            f"cand_mask {tuple(cand_mask.shape)} must have the same shape"
        )
    slots = cand_ids.shape[-1]
    ids = cand_ids.reshape(-1, slots).index_select(0, index)
    mask = cand_mask.reshape(-1, slots).index_select(0, index)
    probs = cand_probs.reshape(-1, slots).index_select(0, index).to(dtype)
    probs = torch.where(mask, probs, 0.0)
    if bool((probs < 0).any()):
        raise ValueError("teacher cache holds a negative candidate probability")
    total = probs.sum(dim=-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("teacher cache has a valid position with no candidate (or zero total probability)")
    return ids, mask, probs / total


def sparse_kd_loss_dense(
    student_logits: Tensor,
    cand_ids: Tensor,
    cand_probs: Tensor,
    cand_mask: Tensor,
    valid: Tensor,
) -> Tensor:
    """Reference top-k KD from full student logits and a sparse teacher.

    Args:
        student_logits: ``[B, T, V]``.
        cand_ids: long ``[B, T, K]`` teacher candidate token ids.
        cand_probs: float ``[B, T, K]`` their teacher probabilities (any scale; renormalised).
        cand_mask: bool ``[B, T, K]``, True for real candidates (sets differ in size).
        valid: bool ``[B, T]``.

    Returns:
        Scalar ``- mean_{valid t} sum_k q_tk log_softmax(student_t)[id_tk]``, with ``q`` the
        candidate probabilities renormalised over the real candidates.
    """
    index = _valid_index(valid, student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    dtype = compute_dtype(student_logits.dtype)
    ids, mask, q = _sparse_teacher(cand_ids, cand_probs, cand_mask, index, dtype)
    check_token_range(ids[mask], vocab, "candidate")
    student_logp = torch.log_softmax(student_logits.reshape(-1, vocab).index_select(0, index).to(dtype), dim=-1)
    picked = student_logp.gather(1, torch.where(mask, ids, 0))
    return -torch.where(mask, q * picked, 0.0).sum(dim=-1).mean()


def lean_sparse_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    cand_ids: Tensor,
    cand_probs: Tensor,
    cand_mask: Tensor,
    valid: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Top-k KD from the student's hidden states, equal to :func:`sparse_kd_loss_dense`.

    Args:
        hidden: ``[B, T, H]`` student final hidden states (logits would be ``hidden @ weight.T``).
        weight: ``[V, H]`` output embedding; bias: optional ``[V]``.
        cand_ids, cand_probs, cand_mask, valid: as in :func:`sparse_kd_loss_dense`.
        chunk_size: vocabulary chunk for the logsumexp and the candidate-logit blocks.

    Returns:
        Scalar ``mean_{valid t} ( logsumexp_v z_t(v) - sum_k q_tk z_t(id_tk) )``.
    """
    index = _valid_index(valid, hidden.shape[:-1])
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    ids, mask, q = _sparse_teacher(cand_ids, cand_probs, cand_mask, index, compute_dtype(hidden.dtype))
    log_partition = chunked_logsumexp(rows, weight, bias, chunk_size=chunk_size)
    logits = candidate_logits(rows, weight, ids, mask, bias, chunk_size=chunk_size)
    # q sums to 1 per row, so sum_k q_k (z_k - lse) = sum_k q_k z_k - lse.
    return (log_partition - (q * logits).sum(dim=-1)).mean()


def lean_sparse_kd_and_ce(
    hidden: Tensor,
    weight: Tensor,
    cand_ids: Tensor,
    cand_probs: Tensor,
    cand_mask: Tensor,
    valid: Tensor,
    actions: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """``(KD, CE)`` over the same valid positions with one pass over the vocabulary.

    Equal to ``(lean_sparse_kd_loss(...), lean_cross_entropy(...))`` on the valid positions: both
    are ``logsumexp_v z_t(v)`` minus a few logits (KD: the teacher-weighted candidates; CE: the
    action), so the logsumexp, the expensive part, is computed once and the action joins the
    candidates' projection. kd / seqkd from the cache log CE beside KD, which this halves.

    Args:
        actions: ``[B, T]`` the response tokens (CE's targets); only valid positions are read.
        the rest: as in :func:`lean_sparse_kd_loss`.
    """
    index = _valid_index(valid, hidden.shape[:-1])
    if actions.shape != valid.shape:
        raise ValueError(f"actions {tuple(actions.shape)} does not match valid {tuple(valid.shape)}")
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    ids, mask, q = _sparse_teacher(cand_ids, cand_probs, cand_mask, index, compute_dtype(hidden.dtype))
    targets = actions.reshape(-1).index_select(0, index).to(ids.dtype)
    check_token_range(targets, weight.shape[0], "actions")
    log_partition = chunked_logsumexp(rows, weight, bias, chunk_size=chunk_size)
    logits = candidate_logits(
        rows,
        weight,
        torch.cat([ids, targets[:, None]], dim=1),
        torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
        bias,
        chunk_size=chunk_size,
    )
    kd = (log_partition - (q * logits[:, :-1]).sum(dim=-1)).mean()
    ce = (log_partition - logits[:, -1]).mean()
    return kd, ce


def mixed_kd_loss(ce_loss: Tensor, kd_loss: Tensor, kd_ratio: float) -> Tensor:
    """MiniLLM's word-level KD objective ``(1 - kd_ratio) * CE + kd_ratio * KD``.

    ``kd_ratio`` in [0, 1]: 0 is plain SFT, 1 is pure KD (the paper's description), MiniLLM
    uses 0.5. A term whose weight is 0 is skipped entirely (its value may then be anything).
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio!r}")
    if kd_ratio == 0.0:
        return ce_loss
    if kd_ratio == 1.0:
        return kd_loss
    return (1.0 - kd_ratio) * ce_loss + kd_ratio * kd_loss


def exact_kd_loss(rows: Tensor, weight: Tensor, teacher_probs: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Exact word-level KD, ``mean_n - sum_v q_nv log softmax(rows_n W^T)_v``, equal to ``kd.dense_kd_loss``.

    Since ``sum_v q_nv = 1`` it is ``logsumexp_v z_nv - rows_n . (q_n W)``: a chunked logsumexp plus one
    ``[N, V] x [V, H]`` product with the teacher's probabilities, so no student ``[N, V]`` tensor exists.
    """
    dtype = compute_dtype(rows.dtype)
    log_partition = chunked_logsumexp(rows, weight, chunk_size=chunk_size)
    expected = teacher_probs.to(dtype) @ weight.to(dtype)  # E_teacher[W_v], [N, H]
    return (log_partition - (rows.to(dtype) * expected).sum(dim=-1)).mean()


@torch.no_grad()
def teacher_probabilities(rows: Tensor, weight: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """softmax(rows W^T) as float [N, V], filled chunk by chunk (one [N, chunk] block of logits at a time)."""
    dtype = compute_dtype(rows.dtype)
    log_partition = chunked_logsumexp(rows, weight, chunk_size=chunk_size)
    probs = torch.empty((rows.shape[0], weight.shape[0]), dtype=dtype, device=rows.device)
    for start in range(0, weight.shape[0], chunk_size):
        logits = (rows @ weight[start : start + chunk_size].T).to(dtype)
        probs[:, start : start + chunk_size] = torch.exp(logits - log_partition[:, None])
    return probs
