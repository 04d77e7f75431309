"""The divergence menu of other distillation toolkits (docs/method.md §5.1; BEYOND THE PAPER).

Per scored position, with the teacher's next-token distribution ``p`` and the student's ``q``
(temperature ``tau`` divides both logits before the softmax; the result is scaled by ``tau^2``)::

    forward_kl   KL(p || q)  = sum_v p log(p / q)
    reverse_kl   KL(q || p)  = sum_v q log(q / p)
    jsd          beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                 (TRL's generalized JSD of GKD; beta = 0 is taken as forward KL and beta = 1 as
                 reverse KL, TRL's convention - the formula itself is 0 at both ends)
    tvd          (1/2) sum_v |p - q|
    skew_kl      KL(p || a p + (1 - a) q)     (DistiLLM's skew KL, a = alpha)
    skew_rkl     KL(q || a q + (1 - a) p)     (DistiLLM's skew reverse KL)

Three forms of the same numbers:

* :func:`per_token` - dense, from ``[N, V]`` student and teacher logits (a live teacher).
* :func:`coarse_per_token` - from the sparse teacher cache: the teacher is known on ``A_t`` only
  (its candidate probabilities, covering ``c_t``), so both distributions are coarse-grained to the
  ``|A_t| + 1`` outcomes ``A_t ∪ {tail}`` (``p``: the cached probabilities and ``1 - c_t``; ``q``:
  its probabilities on ``A_t`` and the rest). Equal to the dense value when ``A_t = V``; never
  larger otherwise, since every divergence here is an f-divergence ``sum_v q f(p / q)`` with ``f``
  convex (TVD: ``|t - 1| / 2``; the KLs, the mixture and skew forms are perspectives of convex
  functions) and merging outcomes cannot increase an f-divergence (data-processing inequality).
* :func:`lean_coarse_per_token` - the coarse form from the student's hidden states: a chunked
  logsumexp over the vocabulary and the candidates' logits, never a ``[N, V]`` tensor.

All reduce over the last axis; the token mean over the response is :func:`masked_mean` (or the
caller's). Outcomes where the weighting distribution is 0 contribute 0 (``0 log 0 = 0``) with a
finite gradient, so padded candidate slots and an empty tail are harmless.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdctl.objectives.lm import DEFAULT_CHUNK_SIZE, candidate_logits, chunked_logsumexp, compute_dtype

NAMES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl")


def check_settings(name: str, *, beta: float, alpha: float, temperature: float) -> None:
    """`ValueError` naming what is wrong with a divergence's settings."""
    if name not in NAMES:
        raise ValueError(f"unknown divergence {name!r}: expected one of {', '.join(NAMES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta!r}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must lie in [0, 1), got {alpha!r}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _kl_sum(weight: Tensor, log_weight: Tensor, log_other: Tensor) -> Tensor:
    """``sum_v w (log w - log o)`` over the last axis, 0 where ``w == 0`` (finite gradients there)."""
    present = weight > 0
    own = torch.where(present, log_weight, 0.0)
    other = torch.where(present, log_other, 0.0)
    return torch.where(present, weight * (own - other), 0.0).sum(dim=-1)


def _log_mixture(a: float, p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor) -> Tensor:
    """``log(a p + (1 - a) q)``; exactly ``log_q`` / ``log_p`` at ``a = 0`` / ``1``. Where the
    mixture is 0 the value is 0, which `_kl_sum` never reads (its weight is 0 there too)."""
    if a == 0.0:
        return log_q
    if a == 1.0:
        return log_p
    mixture = a * p + (1.0 - a) * q
    return torch.log(torch.where(mixture > 0, mixture, 1.0))


def from_log_probs(name: str, log_p: Tensor, log_q: Tensor, *, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """The divergence between teacher ``p`` and student ``q`` given as log-probabilities ``[..., M]``
    over the same ``M`` outcomes (``-inf``: probability 0). Returns ``[...]``."""
    check_settings(name, beta=beta, alpha=alpha, temperature=1.0)
    p, q = log_p.exp(), log_q.exp()
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return _kl_sum(p, log_p, log_q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return _kl_sum(q, log_q, log_p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(dim=-1)
    if name == "jsd":
        log_m = _log_mixture(beta, p, log_p, q, log_q)
        return beta * _kl_sum(p, log_p, log_m) + (1.0 - beta) * _kl_sum(q, log_q, log_m)
    if name == "skew_kl":
        return _kl_sum(p, log_p, _log_mixture(alpha, p, log_p, q, log_q))
    # skew_rkl: KL(q || alpha q + (1 - alpha) p)
    return _kl_sum(q, log_q, _log_mixture(alpha, q, log_q, p, log_p))


def per_token(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Dense divergence per position: logits ``[N, V]`` -> ``[N]`` (module docstring for the menu).

    ``p = softmax(teacher / tau)``, ``q = softmax(student / tau)``; the value is scaled by ``tau^2``.
    Computed in float32 at least (float64 inputs stay float64). Pass teacher logits computed without
    gradients; only the student's receive one.
    """
    check_settings(name, beta=beta, alpha=alpha, temperature=temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    dtype = compute_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return from_log_probs(name, log_p, log_q, beta=beta, alpha=alpha) * temperature**2


def _coarse_teacher(cand_probs: Tensor, cand_mask: Tensor, whole: Tensor, dtype: torch.dtype) -> Tensor:
    """Teacher log-probabilities over ``A_t ∪ {tail}``: ``[N, K + 1]``, the tail last.

    ``whole [N, 1]``: the set is the whole vocabulary, so there is no tail outcome (its mass is 0
    and the set is scaled to sum to 1). Otherwise the cache's rounded probabilities (bdctl/cache.py,
    relative error <= 4.9e-4) may sum a hair over 1: the set is scaled back to 1 and the tail gets
    the dtype's epsilon, a probability below the cache's own precision, so that no divergence is
    infinite only because of rounding."""
    probs = torch.where(cand_mask, cand_probs.to(dtype), 0.0)
    if bool((probs < 0).any()):
        raise ValueError("teacher cache holds a negative candidate probability")
    covered = probs.sum(dim=-1, keepdim=True)
    if bool((covered <= 0).any()):
        raise ValueError("teacher cache has a scored position with no candidate (or zero total probability)")
    probs = probs / torch.where(whole, covered, covered.clamp(min=1.0))
    eps = torch.finfo(dtype).eps
    tail = torch.where(whole, 0.0, (1.0 - probs.sum(dim=-1, keepdim=True)).clamp(min=eps))
    both = torch.cat([probs, tail], dim=-1)
    return torch.where(both > 0, both.log(), float("-inf"))


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` (Maechler's stable split between expm1 and log1p)."""
    near = x > -0.6931471805599453
    safe_near = torch.where(near, x, -1.0)
    safe_far = torch.where(near, -1.0, x)
    return torch.where(near, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def _coarse_student(log_q_cand: Tensor, cand_mask: Tensor, whole: Tensor) -> Tensor:
    """Student log-probabilities over ``A_t ∪ {tail}`` from its log-probabilities of the candidates.

    The tail is ``log(1 - q(A_t))``; ``log q(A_t)`` is capped at ``-eps`` (a tail of at least about
    ``eps``): computed from rounded logits it can reach 0 while the true tail is merely tiny."""
    masked = log_q_cand.masked_fill(~cand_mask, float("-inf"))
    inside = torch.logsumexp(masked, dim=-1, keepdim=True)  # log q(A_t)
    eps = torch.finfo(log_q_cand.dtype).eps
    tail = torch.where(whole, float("-inf"), _log1mexp(inside.clamp(max=-eps)))
    return torch.cat([masked, tail], dim=-1)


def _coarse(
    name: str, log_q_cand: Tensor, cand_probs: Tensor, cand_mask: Tensor, vocab: int, beta: float, alpha: float
) -> Tensor:
    """The divergence between the coarse-grained pair (ids in a set must be distinct, as the cache's are)."""
    whole = cand_mask.sum(dim=-1, keepdim=True) >= vocab
    log_p = _coarse_teacher(cand_probs, cand_mask, whole, log_q_cand.dtype)
    return from_log_probs(name, log_p, _coarse_student(log_q_cand, cand_mask, whole), beta=beta, alpha=alpha)


def coarse_per_token(
    name: str,
    student_logits: Tensor,
    cand_ids: Tensor,
    cand_probs: Tensor,
    cand_mask: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Coarse-grained divergence per position from full student logits ``[N, V]`` and the cache's
    sets ``[N, K]`` (ids, probabilities at temperature 1, mask of real slots) -> ``[N]``.

    The cache holds the teacher's probabilities at temperature 1 only, and the tail's mass at
    another temperature is unknown: ``temperature`` must be 1 (``ValueError`` otherwise).
    """
    check_settings(name, beta=beta, alpha=alpha, temperature=temperature)
    if temperature != 1.0:
        raise ValueError("the teacher cache holds probabilities at temperature 1 only; use a live teacher")
    dtype = compute_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_q_cand = log_q.gather(1, torch.where(cand_mask, cand_ids, 0))
    return _coarse(name, log_q_cand, cand_probs, cand_mask, log_q.shape[-1], beta, alpha)


def lean_coarse_per_token(
    name: str,
    hidden: Tensor,
    weight: Tensor,
    cand_ids: Tensor,
    cand_probs: Tensor,
    cand_mask: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """:func:`coarse_per_token` from hidden states ``[N, H]`` and the output embedding ``[V, H]``:
    ``log q(v) = z(v) - logsumexp(z)`` on the candidates only (chunked logsumexp, candidate logits),
    the tail as ``log(1 - q(A_t))``; no ``[N, V]`` tensor is built."""
    check_settings(name, beta=beta, alpha=alpha, temperature=temperature)
    if temperature != 1.0:
        raise ValueError("the teacher cache holds probabilities at temperature 1 only; use a live teacher")
    log_partition = chunked_logsumexp(hidden, weight, chunk_size=chunk_size)
    logits = candidate_logits(hidden, weight, cand_ids, cand_mask, chunk_size=chunk_size)
    return _coarse(name, logits - log_partition[:, None], cand_probs, cand_mask, weight.shape[0], beta, alpha)


def masked_mean(per_position: Tensor, valid: Tensor) -> Tensor:
    """Token mean of ``[B, T]`` values over the valid positions (`ValueError` if there are none)."""
    if per_position.shape != valid.shape:
        raise ValueError(f"values {tuple(per_position.shape)} and valid {tuple(valid.shape)} differ")
    if not bool(valid.any()):
        raise ValueError("batch has no valid response position; check that responses survive truncation")
    return per_position[valid].mean()
