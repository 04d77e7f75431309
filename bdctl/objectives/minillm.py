r"""MiniLLM (Gu et al. 2024), the paper's fourth baseline: docs/method.md §6.

MiniLLM minimises the reverse KL ``KL(q_theta || p)`` (student ``q_theta``, teacher ``p``) by a
clipped policy gradient on responses the student samples itself, with the teacher mixed into
the sampling distribution. Tensors, for a padded batch of ``B`` rollouts of length ``T`` over a
vocabulary of ``V``: position ``t`` of a row is the state ``s_t`` that predicts response token
``y_t``; ``valid [B, T]`` marks the positions that hold a response token (a prefix of each row).

Rollout (no gradient; ``q_old`` is the student that sampled)::

    mix_t(v) = (1 - a) q_old(v | s_t) + a p(v | s_t)                    a = teacher_mix
    r_t      = clip((log p(y_t|s_t) - log q_old(y_t|s_t)) / scale, -c, c)
    w_t      = q_old(y_t|s_t) / mix_t(y_t)                              importance weight

Loss on a minibatch of rollouts (token means over the valid positions)::

    G_t    = sum_{t' >= t} g^(t' - t) r_t'
    A_t    = G_t / (number of valid positions from t to the end)       (length_norm)
    A      = (A - mean A) / sqrt(var A + 1e-8)                          (whiten: over the minibatch)
    rho_t  = exp(log q_theta(y_t) - log q_old(y_t)) * w_t
    L_pg   = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    L_single = mean_t KL(q_theta(.|s_t) || p(.|s_t))                    exact over the vocabulary

The importance weight multiplies the ratio before the clip, and whitening uses the population
variance with 1e-8 under the square root, as the MiniLLM code does (the code is what produced
the published numbers; docs/method.md §6).

Lean path. ``L_single`` (:func:`lean_reverse_kl`) and the pretraining term's teacher KD
(:func:`lean_teacher_kd`) take the final hidden states of both models at the scored positions
and both output embeddings, and run over vocabulary chunks: at most ``[N, chunk_size]`` logits
of each model exist at a time, in forward and in backward (which recomputes them), so neither
``[B, T, V]`` logits nor an ``[N, V]`` teacher distribution is ever held. The teacher gets no
gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from bdctl.objectives.lm import DEFAULT_CHUNK_SIZE, chunked_logsumexp, compute_dtype, token_logits

WHITEN_EPS = 1e-8
"""Added to the variance before the square root when whitening (the MiniLLM code's value)."""


def _check_mix(mix: float) -> None:
    if not 0.0 <= mix < 1.0:
        raise ValueError(f"teacher mix weight must lie in [0, 1), got {mix!r}")


def _check_frame(valid: Tensor, *tensors: Tensor) -> None:
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"expected valid as a bool [B, T] mask, got {valid.dtype} {tuple(valid.shape)}")
    for tensor in tensors:
        if tensor.shape != valid.shape:
            raise ValueError(f"expected [B, T] = {tuple(valid.shape)} like valid, got {tuple(tensor.shape)}")


# --------------------------------------------------------------------------- rollout


def mixture_probs(student_logits: Tensor, teacher_logits: Tensor, mix: float) -> Tensor:
    """The sampling distribution ``(1 - mix) softmax(student) + mix softmax(teacher)``, ``[..., V]``."""
    _check_mix(mix)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    dtype = compute_dtype(student_logits.dtype)
    q = torch.softmax(student_logits.to(dtype), dim=-1)
    if mix == 0.0:
        return q
    return (1.0 - mix) * q + mix * torch.softmax(teacher_logits.to(dtype), dim=-1)


@dataclass(frozen=True)
class TokenScores:
    """Log-probabilities of the drawn tokens under the student, the teacher and the mixture, ``[b]`` each."""

    log_q: Tensor
    log_p: Tensor
    log_mix: Tensor


def token_scores(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, mix: float) -> TokenScores:
    """What a rollout keeps of one sampling step: ``log q_old(y)``, ``log p(y)`` and ``log mix(y)``
    for the drawn tokens ``[b]``, from the ``[b, V]`` logits the sampler already computed.

    ``log mix`` is ``logaddexp(log(1 - a) + log q, log a + log p)``, which stays finite where one
    of the two probabilities underflows.
    """
    _check_mix(mix)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"expected student and teacher logits [b, V] of one shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if tokens.shape != student_logits.shape[:1]:
        raise ValueError(f"expected tokens [{student_logits.shape[0]}], got {tuple(tokens.shape)}")
    dtype = compute_dtype(student_logits.dtype)
    index = tokens.long()[:, None]
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1).gather(1, index).squeeze(1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1).gather(1, index).squeeze(1)
    if mix == 0.0:
        log_mix = log_q
    else:
        log_mix = torch.logaddexp(log_q + math.log1p(-mix), log_p + math.log(mix))
    return TokenScores(log_q, log_p, log_mix)


def rewards(log_p: Tensor, log_q: Tensor, valid: Tensor, *, scale: float, clip: float) -> Tensor:
    """``r_t = clip((log p - log q_old) / scale, -clip, clip)`` at valid positions, 0 elsewhere."""
    _check_frame(valid, log_p, log_q)
    if scale <= 0 or clip <= 0:
        raise ValueError(f"reward scale and clip must be positive, got {scale!r} and {clip!r}")
    r = ((log_p - log_q) / scale).clamp(-clip, clip)
    return torch.where(valid, r, 0.0)


def importance_weights(log_q: Tensor, log_mix: Tensor, valid: Tensor) -> Tensor:
    """``w_t = q_old(y_t) / mix_t(y_t)`` at valid positions, 0 elsewhere (frozen: no gradient)."""
    _check_frame(valid, log_q, log_mix)
    return torch.where(valid, torch.exp(log_q - log_mix), 0.0)


# --------------------------------------------------------------------------- advantages


def remaining_counts(valid: Tensor) -> Tensor:
    """``[B, T]``: number of valid positions from ``t`` to the end of the row (at least 1)."""
    counts = valid.flip(-1).cumsum(-1).flip(-1)
    return counts.clamp_min(1)


def discounted_returns(r: Tensor, valid: Tensor, *, discount: float, length_norm: bool) -> Tensor:
    """``G_t = sum_{t' >= t} discount^(t' - t) r_t'``, divided by the remaining valid count with
    ``length_norm``; 0 at invalid positions. ``r`` must be 0 at invalid positions."""
    _check_frame(valid, r)
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must lie in [0, 1], got {discount!r}")
    r = torch.where(valid, r, 0.0)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):  # T steps of [B] work: T is a response length
        running = r[:, t] + discount * running
        out[:, t] = running
    if length_norm:
        out = out / remaining_counts(valid).to(out.dtype)
    return torch.where(valid, out, 0.0)


def whiten(values: Tensor, valid: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` with the mean and population variance over the valid
    positions; 0 at invalid positions.

    ``reduce``, when given, sums a small tensor over every rank (e.g. an all-reduce): the
    statistics are then those of the valid positions of all ranks' batches together.
    """
    _check_frame(valid, values)
    reduce = reduce or (lambda x: x)
    mask = valid.to(values.dtype)
    total = reduce(torch.stack([(values * mask).sum(), mask.sum()]))
    if total[1] <= 0:
        raise ValueError("whiten: no valid position to take statistics over")
    mean = total[0] / total[1]
    variance = reduce(((values - mean) ** 2 * mask).sum()[None])[0] / total[1]
    return torch.where(valid, (values - mean) * torch.rsqrt(variance + WHITEN_EPS), 0.0)


def advantages(
    r: Tensor,
    valid: Tensor,
    *,
    discount: float,
    length_norm: bool,
    whitened: bool,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``A_t`` of a minibatch: discounted returns, length-normalised, whitened (each optional)."""
    returns = discounted_returns(r, valid, discount=discount, length_norm=length_norm)
    return whiten(returns, valid, reduce) if whitened else returns


# --------------------------------------------------------------------------- the policy term


@dataclass(frozen=True)
class PolicyTerms:
    """``L_pg`` and its diagnostics (token means over the valid positions; all but ``loss`` detached)."""

    loss: Tensor
    mean_ratio: Tensor  # mean rho_t (importance weight included)
    clip_fraction: Tensor  # share of positions where the clipped term is the larger one and differs


def policy_loss(
    log_q: Tensor, old_log_q: Tensor, weights: Tensor, adv: Tensor, valid: Tensor, *, clip: float
) -> PolicyTerms:
    """``mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - clip, 1 + clip))`` with
    ``rho_t = exp(log_q - old_log_q) * w_t``; gradients flow through ``log_q`` only."""
    _check_frame(valid, log_q, old_log_q, weights, adv)
    if not 0.0 < clip < 1.0:
        raise ValueError(f"PPO clip must lie in (0, 1), got {clip!r}")
    count = valid.sum()
    if count == 0:
        raise ValueError("policy_loss: no valid position")
    dtype = compute_dtype(log_q.dtype)
    log_ratio = torch.where(valid, log_q.to(dtype) - old_log_q.to(dtype).detach(), 0.0)
    ratio = torch.exp(log_ratio) * weights.to(dtype).detach()
    adv = adv.to(dtype).detach()
    plain = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(plain, clipped)
    loss = torch.where(valid, per_token, 0.0).sum() / count
    with torch.no_grad():
        mean_ratio = torch.where(valid, ratio, 0.0).sum() / count
        bites = valid & (clipped > plain)
        clip_fraction = bites.sum().to(dtype) / count
    return PolicyTerms(loss, mean_ratio, clip_fraction)


def lean_log_probs(rows: Tensor, weight: Tensor, tokens: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``log softmax(rows @ weight.T)[n, tokens[n]]`` ``[N]``, without ``[N, V]`` logits."""
    if rows.dim() != 2 or tokens.shape != rows.shape[:1]:
        raise ValueError(f"expected rows [N, H] and tokens [N], got {tuple(rows.shape)} and {tuple(tokens.shape)}")
    return token_logits(rows, weight, tokens) - chunked_logsumexp(rows, weight, chunk_size=chunk_size)


# --------------------------------------------------------------------------- two-model chunked terms


def _logsumexp_rows(rows: Tensor, weight: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    lse = rows.new_full((rows.shape[0],), float("-inf"), dtype=dtype)
    for start in range(0, weight.shape[0], chunk_size):
        lse = torch.logaddexp(lse, torch.logsumexp((rows @ weight[start : start + chunk_size].T).to(dtype), dim=-1))
    return lse


class _TwoModelChunked(torch.autograd.Function):
    """Per-row reverse KL ``KL(q || p)`` (``kind="reverse_kl"``) or teacher cross-entropy
    ``-sum_v p_v log q_v`` (``kind="teacher_kd"``), student ``q = softmax(hs Ws^T)``, teacher
    ``p = softmax(ht Wt^T)``, computed over vocabulary chunks; gradients for the student only.

    d KL / d z_s(v) = q_v (log q_v - log p_v - KL);   d KD / d z_s(v) = q_v - p_v.
    Saves the inputs and three ``[N]`` vectors; backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, kind: str, chunk_size: int) -> Tensor:
        dtype = compute_dtype(hs.dtype)
        lse_s = _logsumexp_rows(hs, ws, chunk_size, dtype)
        lse_t = _logsumexp_rows(ht, wt, chunk_size, dtype)
        value = torch.zeros_like(lse_s)
        for start in range(0, ws.shape[0], chunk_size):
            end = start + chunk_size
            log_q = (hs @ ws[start:end].T).to(dtype) - lse_s[:, None]
            log_p = (ht @ wt[start:end].T).to(dtype) - lse_t[:, None]
            if kind == "reverse_kl":
                value += (torch.exp(log_q) * (log_q - log_p)).sum(dim=-1)
            else:
                value -= (torch.exp(log_p) * log_q).sum(dim=-1)
        ctx.save_for_backward(hs, ws, ht, wt, lse_s, lse_t, value)
        ctx.kind, ctx.chunk_size = kind, chunk_size  # type: ignore[attr-defined]
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor):
        hs, ws, ht, wt, lse_s, lse_t, value = ctx.saved_tensors  # type: ignore[attr-defined]
        kind, chunk_size = ctx.kind, ctx.chunk_size  # type: ignore[attr-defined]
        need_h, need_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        dtype = lse_s.dtype
        grad = grad.to(dtype)[:, None]
        hs_c = hs.to(dtype)
        grad_h = torch.zeros_like(hs_c) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=dtype, device=ws.device) if need_w else None
        for start in range(0, ws.shape[0], chunk_size):
            end = start + chunk_size
            log_q = (hs @ ws[start:end].T).to(dtype) - lse_s[:, None]
            log_p = (ht @ wt[start:end].T).to(dtype) - lse_t[:, None]
            q = torch.exp(log_q)
            if kind == "reverse_kl":
                dz = q * (log_q - log_p - value[:, None]) * grad
            else:
                dz = (q - torch.exp(log_p)) * grad
            if grad_h is not None:
                grad_h += dz @ ws[start:end].to(dtype)
            if grad_w is not None:
                grad_w[start:end] = dz.T @ hs_c
        return (
            None if grad_h is None else grad_h.to(hs.dtype),
            None if grad_w is None else grad_w.to(ws.dtype),
            None, None, None, None,
        )  # fmt: skip


def _check_two_models(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, chunk_size: int) -> None:
    if hs.dim() != 2 or ws.dim() != 2 or hs.shape[1] != ws.shape[1]:
        raise ValueError(f"expected student rows [N, H] and weight [V, H], got {tuple(hs.shape)} and {tuple(ws.shape)}")
    if ht.dim() != 2 or wt.dim() != 2 or ht.shape[1] != wt.shape[1]:
        raise ValueError(
            f"expected teacher rows [N, H'] and weight [V, H'], got {tuple(ht.shape)} and {tuple(wt.shape)}"
        )
    if ht.shape[0] != hs.shape[0] or wt.shape[0] != ws.shape[0]:
        raise ValueError(
            f"student ({hs.shape[0]} rows, vocabulary {ws.shape[0]}) and teacher ({ht.shape[0]} rows, "
            f"vocabulary {wt.shape[0]}) must score the same rows over the same vocabulary"
        )
    if hs.shape[0] == 0:
        raise ValueError("no rows to score")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def lean_reverse_kl(
    student_rows: Tensor, student_weight: Tensor, teacher_rows: Tensor, teacher_weight: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:  # fmt: skip
    """MiniLLM's single-step term: ``mean_n KL(q_n || p_n)``, exact over the vocabulary.

    Args:
        student_rows: ``[N, H]`` student final hidden states at the scored positions.
        student_weight: ``[V, H]`` student output embedding.
        teacher_rows: ``[N, H']`` teacher final hidden states at the same positions (no gradient).
        teacher_weight: ``[V, H']`` teacher output embedding (no gradient).
        chunk_size: vocabulary columns per chunk.

    Returns:
        A scalar in the compute dtype, differentiable in the student's rows and weight.
    """
    _check_two_models(student_rows, student_weight, teacher_rows, teacher_weight, chunk_size)
    per_row = _TwoModelChunked.apply(
        student_rows, student_weight, teacher_rows.detach(), teacher_weight.detach(), "reverse_kl", chunk_size
    )
    return per_row.mean()


def lean_teacher_kd(
    student_rows: Tensor, student_weight: Tensor, teacher_rows: Tensor, teacher_weight: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:  # fmt: skip
    """Word-level KD against the live teacher, ``mean_n -sum_v p_n(v) log q_n(v)`` (the KD of the
    pretraining term ``L_PT = (1 - k) CE + k KD``), exact over the vocabulary, chunked like
    :func:`lean_reverse_kl`."""
    _check_two_models(student_rows, student_weight, teacher_rows, teacher_weight, chunk_size)
    per_row = _TwoModelChunked.apply(
        student_rows, student_weight, teacher_rows.detach(), teacher_weight.detach(), "teacher_kd", chunk_size
    )
    return per_row.mean()
