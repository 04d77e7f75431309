r"""Bellman Distill loss (docs/method.md §3 and §4).

Tensors, for a padded batch of ``B`` responses of length ``T`` over a vocabulary of ``V``:
``z_t`` the student logits at the state ``s_t`` that predicts response token ``y_t``;
``A_t`` the teacher's top-p set at ``s_t``; ``a_t = y_t``; ``valid_t`` (position holds a
response token); ``terminal_t`` (``y_t`` is end-of-sequence).

Paper variant (``variant="paper"``, Eq. 17 with the release's Q)::

    Q_t(a)  = max(z_t(a) - max_b z_t(b), q_min)                  a in A_t
    Qhat_t  = Q_t(a_t) if a_t in A_t else q_min
    V_t     = logsumexp_{a in A_t} Q_t(a)
    V_{t+1} = 0 if terminal_t else V at s_{t+1}
    r_t     = Qhat_t - gamma V_{t+1}
    phi(x)  = x - x^2 / (4 alpha)   (chi^2 on),   x   (chi^2 off)
    L       = - mean_t phi(r_t) + mean_t (V_t - gamma V_{t+1})

Kept transitions: valid ``t`` with ``terminal_t`` or ``valid_{t+1}``; the last transition of a
truncated response has no known next value and is dropped. With ``outside="drop"`` (docs/method.md
§3.4, not the paper's default) a transition whose action lies outside ``A_t`` is dropped
the same way: Eq. (15) sets ``F Q = -inf`` there, where Eq. (17) is undefined; its state's ``V``
still serves as the previous transition's ``V_{t+1}``. Means are token-level over the
``N`` kept transitions of the whole batch. No stop-gradient anywhere: gradients flow through
the max-logit shift (into the arg-max logit) and through ``V_{t+1}``.

Released variant (``variant="released"``) reproduces the authors' public code, quirks
included (see :func:`_released_terms`): a full-vocabulary computation in which the data action
and the terminal flags play no part.

The chunked forms that compute the same values without ``[B, T, V]`` logits are in
:mod:`bdctl.objectives.bellman_lean`; the dense forms here are their readable specification and
the reference their tests compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bdctl.objectives.lm import (
    check_token_range,
    compute_dtype,
)

VARIANTS = ("paper", "released")
OUTSIDE = ("q_min", "drop")  # what a data action outside A_t gets (docs/method.md §3.4)


@dataclass(frozen=True)
class BellmanTerms:
    """The loss and its diagnostics; every field but ``loss`` is detached (no host sync).

    For the paper variant, means are over the kept transitions:

    * ``mean_r``: mean reward ``r_t = Qhat_t - gamma V_{t+1}``.
    * ``mean_v``: mean ``V_t``.
    * ``mean_q_candidates``: mean over transitions of the average ``Q_t(a)`` over ``a in A_t``.
    * ``chi2``: ``mean_t r_t^2 / (4 alpha)``, the regulariser's size (reported with chi^2 off too).
    * ``outside_share``: share of transitions whose action ``a_t`` is not in ``A_t``.
    * ``mean_set_size``: mean ``|A_t|``.
    * ``set_mass``: mean probability the student puts on ``A_t``, ``sum_{a in A_t} softmax(z_t)(a)``
      (1 with ``p = 1``): what docs/method.md §3.3 says nothing in Eq. 17 holds in place.
    * ``num_transitions``: ``N``.

    For the released variant, "transitions" are the valid positions ``t < T`` (its ``N``),
    ``mean_r`` is ``(1/N) sum_t mean_{a in V} d_t(a)`` and ``chi2`` is
    ``(1/(4 alpha)) (1/N) sum_t mean_{a in V} d_t(a)^2``; ``outside_share`` uses the actions
    although the released loss does not.
    """

    loss: Tensor
    mean_r: Tensor
    mean_v: Tensor
    mean_q_candidates: Tensor
    chi2: Tensor
    outside_share: Tensor
    mean_set_size: Tensor
    num_transitions: int
    set_mass: Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        """All terms as Python floats, for logging (syncs with the device)."""
        return {
            "loss": float(self.loss.detach()),
            "mean_r": float(self.mean_r),
            "mean_v": float(self.mean_v),
            "mean_q_candidates": float(self.mean_q_candidates),
            "chi2": float(self.chi2),
            "outside_share": float(self.outside_share),
            "mean_set_size": float(self.mean_set_size),
            "num_transitions": float(self.num_transitions),
            **({"set_mass": float(self.set_mass)} if self.set_mass is not None else {}),
        }


def _validate(
    variant: str, gamma: float, alpha: float, q_min: float, top_p: float, eps: float, outside: str = "q_min"
) -> None:
    """Argument checks of the loss functions (`ValueError`); the recipe schema checks a user's values."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Bellman Distill variant {variant!r}; expected one of {VARIANTS}")
    if outside not in OUTSIDE:
        raise ValueError(f"outside must be one of {OUTSIDE}, got {outside!r}")
    if variant == "released" and outside != "q_min":
        # The released arithmetic never reads the data action, so there is nothing to drop.
        raise ValueError("outside: drop applies to the paper variant only (the released loss ignores the actions)")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not alpha > 0.0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not math.isfinite(q_min):
        raise ValueError(f"q_min must be a finite number, got {q_min!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if variant == "released" and not eps > 0.0:
        # eps keeps log(pit) finite outside the top-p set; eps = 0 would give 0 * log 0 = NaN.
        raise ValueError(f"eps must be > 0 for the released variant, got {eps!r}")


def _check_batch(actions: Tensor, valid: Tensor, terminal: Tensor, lead: torch.Size) -> None:
    for name, tensor in (("actions", actions), ("valid", valid), ("terminal", terminal)):
        if tensor.shape != lead:
            raise ValueError(f"{name} {tuple(tensor.shape)} does not match [B, T] = {tuple(lead)}")
    if valid.dtype != torch.bool or terminal.dtype != torch.bool:
        raise ValueError("valid and terminal must be bool tensors")


def _transitions(valid: Tensor, terminal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Which positions start a kept transition, which are terminal, and which need a value.

    Returns ``kept [B, T]`` (valid t with terminal_t or valid_{t+1}), ``term [B, T]``
    (terminal and valid) and ``needs_value [B, T]`` (kept t, plus t+1 for kept non-terminal t:
    every position whose ``V`` enters the loss).
    """
    valid_next = torch.zeros_like(valid)
    valid_next[:, :-1] = valid[:, 1:]
    term = terminal & valid
    kept = valid & (term | valid_next)
    needs_value = kept.clone()
    needs_value[:, 1:] |= (kept & ~term)[:, :-1]
    return kept, term, needs_value


def _no_transition_error() -> ValueError:
    return ValueError(
        "Bellman Distill batch has no kept transition (all padding, or only truncated "
        "one-token responses): nothing to train on"
    )


def _empty_set_error() -> ValueError:
    return ValueError(
        "teacher top-p candidate set is empty at a response position; the set must keep at least one token"
    )


def _next_values(values: Tensor, term: Tensor) -> Tensor:
    """``V_{t+1}`` per position: the next position's value, 0 at terminal transitions.

    The last column gets 0; it is never used by a kept non-terminal transition.
    """
    shifted = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)
    return shifted.masked_fill(term, 0.0)


def _assemble(
    q_hat: Tensor,
    values: Tensor,
    q_cand_mean: Tensor,
    set_size: Tensor,
    in_set: Tensor,
    kept: Tensor,
    term: Tensor,
    gamma: float,
    alpha: float,
    chi2: bool,
    outside: str = "q_min",
    set_mass: Tensor | None = None,
) -> BellmanTerms:
    """Paper-variant loss and diagnostics from per-position ``[B, T]`` quantities.

    Entries at positions that are not kept (and, for ``values``, not successors of kept
    non-terminal transitions) may hold anything finite; they are masked out here.
    ``outside_share`` is measured over the kept transitions before ``outside="drop"`` removes
    the out-of-set ones (so a run shows what it dropped); every other mean is over the ``N``
    transitions that enter the loss.
    """
    scored = kept & in_set if outside == "drop" else kept
    count = int(scored.sum())
    next_values = _next_values(values, term)
    reward = q_hat - gamma * next_values
    phi = reward - reward.square() / (4.0 * alpha) if chi2 else reward

    def scored_mean(x: Tensor) -> Tensor:
        return torch.where(scored, x, 0.0).sum() / max(count, 1)

    # A batch whose every transition was dropped contributes zero (its count is 0), with a graph.
    loss = -scored_mean(phi) + scored_mean(values - gamma * next_values)
    with torch.no_grad():
        return BellmanTerms(
            loss=loss,
            mean_r=scored_mean(reward.detach()),
            mean_v=scored_mean(values.detach()),
            mean_q_candidates=scored_mean(q_cand_mean.detach()),
            chi2=scored_mean(reward.detach().square()) / (4.0 * alpha),
            outside_share=torch.where(kept, (~in_set).to(reward.dtype), 0.0).sum() / int(kept.sum()),
            mean_set_size=scored_mean(set_size.to(reward.dtype)),
            num_transitions=count,
            set_mass=scored_mean(set_mass.to(reward.dtype)) if set_mass is not None else None,
        )


def _masked_logsumexp(q: Tensor, member: Tensor) -> Tensor:
    """``logsumexp`` of ``q`` over the members along the last dim; 0 for rows with none.

    Empty rows get a finite dummy (their value is never used) so that no -inf or NaN can leak
    into the backward pass.
    """
    empty = ~member.any(dim=-1, keepdim=True)
    filled = q.masked_fill(~member, float("-inf")).masked_fill(empty, 0.0)
    return torch.logsumexp(filled, dim=-1).masked_fill(empty.squeeze(-1), 0.0)


def _paper_dense_terms(
    logits: Tensor,
    teacher_mask: Tensor,
    actions: Tensor,
    valid: Tensor,
    terminal: Tensor,
    gamma: float,
    alpha: float,
    q_min: float,
    chi2: bool,
    outside: str,
) -> BellmanTerms:
    kept, term, needs_value = _transitions(valid, terminal)
    if not bool(kept.any()):
        raise _no_transition_error()
    if bool((needs_value & ~teacher_mask.any(dim=-1)).any()):
        raise _empty_set_error()
    vocab = logits.shape[-1]
    check_token_range(actions[kept], vocab, "action")

    z = logits.to(compute_dtype(logits.dtype))
    shift = z.max(dim=-1, keepdim=True).values  # gradient flows into the arg-max logit
    q = torch.clamp(z - shift, min=q_min)
    values = _masked_logsumexp(q, teacher_mask)

    safe_actions = torch.where(kept, actions, 0)[..., None]
    in_set = teacher_mask.gather(-1, safe_actions).squeeze(-1)
    q_hat = torch.where(in_set, q.gather(-1, safe_actions).squeeze(-1), q_min)

    with torch.no_grad():
        set_size = teacher_mask.sum(dim=-1)
        q_cand_mean = torch.where(teacher_mask, q, 0.0).sum(dim=-1) / set_size.clamp_min(1)
        set_mass = torch.exp(_masked_logsumexp(z, teacher_mask) - torch.logsumexp(z, dim=-1))
    return _assemble(q_hat, values, q_cand_mean, set_size, in_set, kept, term, gamma, alpha, chi2, outside, set_mass)


def _released_terms(
    logits: Tensor,
    teacher_mask: Tensor,
    actions: Tensor,
    valid: Tensor,
    gamma: float,
    alpha: float,
    q_min: float,
    chi2: bool,
    top_p: float,
    eps: float,
) -> BellmanTerms:
    """docs/method.md §4, term by term, quirks included.

    The loss ignores the actions and the terminal flags; the mean over ``a`` divides by the
    vocabulary size; the last padded position never starts a transition, and the last token
    of a shorter response gets ``Vn = 0`` whatever it is.
    """
    count = int(valid[:, :-1].sum())
    if count == 0:
        raise _no_transition_error()
    z = logits.to(compute_dtype(logits.dtype))
    m = teacher_mask.to(z.dtype)
    valid_f = valid.to(z.dtype)

    shift = z.max(dim=-1, keepdim=True).values
    q = torch.clamp(z - shift, min=q_min)  # over the whole vocabulary
    pi = torch.softmax(q, dim=-1)
    pit = pi * m / top_p + eps
    pit = pit / pit.sum(dim=-1, keepdim=True)
    values = valid_f * (pit * (q - torch.log(pit))).sum(dim=-1)  # [B, T]
    next_values = values[:, 1:] * valid_f[:, 1:]  # Vn_t for t = 1 .. T-1
    d = m[:, :-1] * q[:, :-1] * valid_f[:, :-1, None] - gamma * next_values[..., None]
    d_mean = d.mean(dim=-1)  # divides by |V|
    value_term = (values[:, :-1] * valid_f[:, :-1] - gamma * next_values).sum() / count
    reward_term = d_mean.sum() / count
    chi2_term = d.square().mean(dim=-1).sum() / count / (4.0 * alpha)
    loss = -reward_term + value_term + (chi2_term if chi2 else 0.0)

    with torch.no_grad():
        start = valid[:, :-1]
        safe_actions = torch.where(valid, actions, 0).clamp(0, logits.shape[-1] - 1)
        in_set = teacher_mask.gather(-1, safe_actions[..., None]).squeeze(-1)[:, :-1]
        set_size = teacher_mask[:, :-1].sum(dim=-1).to(z.dtype)
        q_cand = torch.where(teacher_mask, q, 0.0).sum(dim=-1)[:, :-1] / set_size.clamp_min(1)
        mass = torch.exp(_masked_logsumexp(z, teacher_mask) - torch.logsumexp(z, dim=-1))[:, :-1]

        def start_mean(x: Tensor) -> Tensor:
            return torch.where(start, x, 0.0).sum() / count

        return BellmanTerms(
            loss=loss,
            mean_r=reward_term.detach(),
            mean_v=start_mean(values[:, :-1].detach()),
            mean_q_candidates=start_mean(q_cand),
            chi2=chi2_term.detach(),
            outside_share=start_mean((~in_set).to(z.dtype)),
            mean_set_size=start_mean(set_size),
            num_transitions=count,
            set_mass=start_mean(mass),
        )


def dense_terms(
    logits: Tensor,
    teacher_mask: Tensor,
    actions: Tensor,
    valid: Tensor,
    terminal: Tensor,
    *,
    variant: str = "paper",
    gamma: float = 0.99,
    alpha: float = 0.1,
    q_min: float = -10.0,
    chi2: bool = True,
    top_p: float = 0.8,
    eps: float = 1e-6,
    outside: str = "q_min",
) -> BellmanTerms:
    """:func:`dense_loss` with its diagnostics (see :class:`BellmanTerms`)."""
    _validate(variant, gamma, alpha, q_min, top_p, eps, outside)
    if logits.dim() != 3 or teacher_mask.shape != logits.shape:
        raise ValueError(
            f"expected logits and teacher_mask [B, T, V], got {tuple(logits.shape)} and {tuple(teacher_mask.shape)}"
        )
    if teacher_mask.dtype != torch.bool:
        raise ValueError("teacher_mask must be a bool tensor")
    _check_batch(actions, valid, terminal, logits.shape[:-1])
    if variant == "released":
        return _released_terms(logits, teacher_mask, actions, valid, gamma, alpha, q_min, chi2, top_p, eps)
    return _paper_dense_terms(logits, teacher_mask, actions, valid, terminal, gamma, alpha, q_min, chi2, outside)


def dense_loss(
    logits: Tensor,
    teacher_mask: Tensor,
    actions: Tensor,
    valid: Tensor,
    terminal: Tensor,
    *,
    variant: str = "paper",
    gamma: float = 0.99,
    alpha: float = 0.1,
    q_min: float = -10.0,
    chi2: bool = True,
    top_p: float = 0.8,
    eps: float = 1e-6,
    outside: str = "q_min",
) -> Tensor:
    """Bellman Distill loss from full logits (scalar, differentiable w.r.t. ``logits``).

    Args:
        logits: float ``[B, T, V]``, student logits at the state of each response position.
        teacher_mask: bool ``[B, T, V]``, the teacher's top-p set ``A_t`` at that state.
        actions: long ``[B, T]``, the response token ``y_t`` taken at that state.
        valid: bool ``[B, T]``, True where position t holds a response token.
        terminal: bool ``[B, T]``, True where ``y_t`` is the end-of-sequence token.
        variant: ``"paper"`` (docs/method.md §3) or ``"released"`` (section 3).
        gamma, alpha, q_min, chi2: discount, chi^2 strength, Q clip, chi^2 on/off.
        top_p, eps: used only by the released variant (``pi * m / p + eps``).
        outside: what a transition whose action lies outside ``A_t`` gets: ``"q_min"`` (the
            paper's clipped ``Qhat = q_min``) or ``"drop"`` (left out of every term, like a
            truncated last transition; docs/method.md §3.4). Paper variant only.

    Raises:
        ValueError: bad hyperparameters, a batch without kept transitions, an empty candidate
            set where a value is needed, or an action id outside the vocabulary.
    """
    return dense_terms(
        logits,
        teacher_mask,
        actions,
        valid,
        terminal,
        variant=variant,
        gamma=gamma,
        alpha=alpha,
        q_min=q_min,
        chi2=chi2,
        top_p=top_p,
        eps=eps,
        outside=outside,
    ).loss


def candidate_mask(cand_ids: Tensor | None, cand_mask: Tensor | None, shape, vocab: int) -> Tensor:
    """Dense bool [B, T, V] mask of the candidate sets (all True when there are none: p = 1)."""
    if cand_ids is None:
        return torch.ones((*shape, vocab), dtype=torch.bool, device="cpu")
    if cand_mask is None:
        raise ValueError("give cand_mask with cand_ids")
    dense = torch.zeros((*shape, vocab + 1), dtype=torch.bool, device=cand_ids.device)
    dense.scatter_(-1, torch.where(cand_mask, cand_ids, vocab), True)  # padding slots land in a spare column
    return dense[..., :vocab]
