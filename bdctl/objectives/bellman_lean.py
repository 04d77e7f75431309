r"""Bellman Distill in chunked ("lean") form: the same values and gradients as the dense forms of
:mod:`bdctl.objectives.bellman`, from the final hidden states and the output embedding, without
ever building ``[B, T, V]`` logits (docs/method.md §3.2, §4).

Lean path (:func:`lean_loss`, paper variant only). The paper loss reads the logits in only
three places: ``z_t(a)`` for ``a in A_t`` (which covers ``a_t`` when ``a_t in A_t``; otherwise
``Qhat_t`` is the constant ``q_min``), and the shift ``max_b z_t(b)``. So it is computed from
the final hidden states ``h_t`` and the output embedding ``W`` (``z_t = W h_t + b``):

* the arg-max ``b*`` is found over vocabulary chunks without autograd. ``max`` is piecewise
  the identity on its arg-max entry, so the differentiable shift ``W[b*] . h_t + b[b*]`` has
  exactly the value and the gradient of ``max_b z_t(b)`` (ties aside, which have measure zero);
* candidate logits come from one projection against the batch's unique candidate ids
  (``[N, |U|]``, in row blocks), then per-row reads; ``b*`` joins the same projection, so
  ``Q_t(b*) = 0`` exactly as in the dense form;
* with ``p = 1`` (``cand_ids=None``) ``A_t`` is the whole vocabulary, and since
  ``max(z - m, q_min) = max(z, m + q_min) - m``, ``V_t`` is a chunked logsumexp with the
  per-row floor ``m + q_min``, minus ``m`` (see :func:`bdctl.objectives.lm.chunked_logsumexp`).

Every operation is the same function of the same logits as the dense form, merely evaluated
on the entries it needs, so values and gradients agree up to float rounding; ``[B, T, V]``
logits never exist.

The released variant's lean form (:func:`released_lean_terms`) reduces over vocabulary chunks with
a custom autograd function, for the same reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The pieces both forms share (validation, kept transitions, the final assembly) live with the
# dense forms, which are the specification.
from bdctl.objectives.bellman import (
    BellmanTerms,
    _assemble,
    _check_batch,
    _empty_set_error,
    _masked_logsumexp,
    _no_transition_error,
    _transitions,
    _validate,
)
from bdctl.objectives.lm import (
    DEFAULT_CHUNK_SIZE,
    candidate_logits,
    check_token_range,
    chunked_argmax,
    chunked_logsumexp,
    compute_dtype,
    token_logits,
)


def _check_no_duplicates(ids: Tensor, mask: Tensor) -> None:
    """A candidate set is a set: a repeated member would count twice in the logsumexp."""
    if ids.shape[-1] < 2:
        return
    # Padding slots get distinct negative ids so only real members can collide.
    slot = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    marked = torch.where(mask, ids, -1 - slot)
    ordered = marked.sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("teacher candidate set lists the same token id twice")


def lean_terms(
    hidden: Tensor,
    weight: Tensor,
    cand_ids: Tensor | None,
    cand_mask: Tensor | None,
    actions: Tensor,
    valid: Tensor,
    terminal: Tensor,
    *,
    bias: Tensor | None = None,
    variant: str = "paper",
    gamma: float = 0.99,
    alpha: float = 0.1,
    q_min: float = -10.0,
    chi2: bool = True,
    outside: str = "q_min",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> BellmanTerms:
    """:func:`lean_loss` with its diagnostics (see :class:`BellmanTerms`).

    With ``cand_ids=None`` the diagnostic ``mean_q_candidates`` (the mean clipped Q over the
    whole vocabulary) costs one extra gradient-free pass over the vocabulary chunks.
    """
    _validate(variant, gamma, alpha, q_min, 1.0, 1.0, outside)
    if variant != "paper":
        raise ValueError(
            "the lean Bellman Distill path implements the paper variant only; the released "
            "variant needs full-vocabulary logits (use dense_loss)"
        )
    if hidden.dim() != 3:
        raise ValueError(f"expected hidden [B, T, H], got {tuple(hidden.shape)}")
    lead = hidden.shape[:-1]
    _check_batch(actions, valid, terminal, lead)
    if (cand_ids is None) != (cand_mask is None):
        raise ValueError("give both cand_ids and cand_mask, or neither (full vocabulary)")
    if (
        cand_ids is not None
        and cand_mask is not None
        and (cand_ids.shape[:-1] != lead or cand_mask.shape != cand_ids.shape)
    ):
        raise ValueError(
            f"expected cand_ids and cand_mask [B, T, K] matching {tuple(lead)}, got "
            f"{tuple(cand_ids.shape)} and {tuple(cand_mask.shape)}"
        )

    kept, term, needs_value = _transitions(valid, terminal)
    if not bool(kept.any()):
        raise _no_transition_error()
    vocab = weight.shape[0]

    # Work only on the rows whose V or Qhat enter the loss: kept states and their successors.
    index = needs_value.reshape(-1).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    row_actions = actions.reshape(-1).index_select(0, index)
    row_kept = kept.reshape(-1).index_select(0, index)
    check_token_range(row_actions[row_kept], vocab, "action")
    row_actions = torch.where(row_kept, row_actions, 0)
    best = chunked_argmax(rows, weight, bias, chunk_size=chunk_size)

    if cand_ids is None or cand_mask is None:
        # A_t = whole vocabulary: V_t = logsumexp_a max(z_a, m + q_min) - m, chunked.
        shift = token_logits(rows, weight, best, bias)
        values = chunked_logsumexp(rows, weight, bias, chunk_size=chunk_size, floor=shift + q_min)
        values = values - shift
        q_hat = torch.clamp(token_logits(rows, weight, row_actions, bias) - shift, min=q_min)
        in_set = torch.ones_like(row_kept)
        set_size = torch.full_like(row_actions, vocab)
        q_cand_mean = _mean_clipped_q(rows, weight, bias, shift.detach(), q_min, chunk_size)
        set_mass = torch.ones_like(shift)
    else:
        slots = cand_ids.shape[-1]
        ids = cand_ids.reshape(-1, slots).index_select(0, index)
        mask = cand_mask.reshape(-1, slots).index_select(0, index)
        if bool((~mask.any(dim=-1)).any()):
            raise _empty_set_error()
        _check_no_duplicates(ids, mask)
        # The arg-max joins the candidates so both come from one projection (Q(b*) = 0 exactly).
        logits = candidate_logits(
            rows,
            weight,
            torch.cat([ids, best[:, None]], dim=1),
            torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
            bias,
            chunk_size=chunk_size,
        )
        shift = logits[:, slots]
        q = torch.clamp(logits[:, :slots] - shift[:, None], min=q_min)
        values = _masked_logsumexp(q, mask)
        match = mask & (ids == row_actions[:, None])
        in_set = match.any(dim=-1)
        q_hat = torch.where(in_set, torch.where(match, q, 0.0).sum(dim=-1), q_min)
        set_size = mask.sum(dim=-1)
        with torch.no_grad():
            q_cand_mean = torch.where(mask, q, 0.0).sum(dim=-1) / set_size
            # one more gradient-free pass over the vocabulary chunks: the student's mass on A_t
            members = _masked_logsumexp(logits[:, :slots], mask)
            set_mass = torch.exp(
                members
                - chunked_logsumexp(
                    rows.detach(), weight.detach(), None if bias is None else bias.detach(), chunk_size=chunk_size
                )
            )

    def scatter(x: Tensor) -> Tensor:
        """Rows back to ``[B, T]`` (zeros elsewhere), keeping the autograd graph."""
        full = x.new_zeros(kept.numel())
        return full.index_copy(0, index, x).view(kept.shape)

    return _assemble(
        scatter(q_hat),
        scatter(values),
        scatter(q_cand_mean),
        scatter(set_size),
        scatter(in_set),
        kept,
        term,
        gamma,
        alpha,
        chi2,
        outside,
        scatter(set_mass.to(q_hat.dtype)),
    )


@torch.no_grad()
def _mean_clipped_q(
    rows: Tensor, weight: Tensor, bias: Tensor | None, shift: Tensor, q_min: float, chunk_size: int
) -> Tensor:
    """Diagnostic: ``mean_v max(z_v - shift, q_min)`` per row, over the whole vocabulary."""
    vocab = weight.shape[0]
    dtype = compute_dtype(rows.dtype)
    total = torch.zeros_like(shift)
    for start in range(0, vocab, chunk_size):
        logits = rows @ weight[start : start + chunk_size].T
        if bias is not None:
            logits = logits + bias[start : start + chunk_size]
        total += torch.clamp(logits.to(dtype) - shift[:, None], min=q_min).sum(dim=-1)
    return total / vocab


def lean_loss(
    hidden: Tensor,
    weight: Tensor,
    cand_ids: Tensor | None,
    cand_mask: Tensor | None,
    actions: Tensor,
    valid: Tensor,
    terminal: Tensor,
    *,
    bias: Tensor | None = None,
    variant: str = "paper",
    gamma: float = 0.99,
    alpha: float = 0.1,
    q_min: float = -10.0,
    chi2: bool = True,
    outside: str = "q_min",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Paper-variant Bellman Distill loss from hidden states, equal to ``dense_loss``.

    Args:
        hidden: ``[B, T, H]`` student final hidden states at the response positions' states
            (the logits would be ``hidden @ weight.T + bias``).
        weight: ``[V, H]`` output embedding (lm_head weight).
        cand_ids: long ``[B, T, K]`` teacher top-p set members, or ``None`` for ``p = 1``
            (``A_t`` = the whole vocabulary, handled in chunks).
        cand_mask: bool ``[B, T, K]``, which slots are real members (sets differ in size);
            ``None`` together with ``cand_ids``.
        actions, valid, terminal: as in :func:`dense_loss`.
        bias: optional ``[V]`` output bias.
        variant: only ``"paper"`` (accepted so callers can forward the recipe's setting).
        gamma, alpha, q_min, chi2, outside: as in :func:`dense_loss`.
        chunk_size: vocabulary chunk; bounds the live logits to ``[N, chunk_size]``.

    Returns:
        Scalar loss, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    return lean_terms(
        hidden,
        weight,
        cand_ids,
        cand_mask,
        actions,
        valid,
        terminal,
        bias=bias,
        variant=variant,
        gamma=gamma,
        alpha=alpha,
        q_min=q_min,
        chi2=chi2,
        outside=outside,
        chunk_size=chunk_size,
    ).loss


# --------------------------------------------------------------------------- released variant, lean


class _ChunkedFloorReductions(torch.autograd.Function):
    """Per row, over the vocabulary, with ``y_v = max(hidden . weight[v], floor)``: ``(logsumexp_v y_v, sum_v y_v)``.

    One pass over vocabulary chunks forward, one in backward (recomputing each chunk's logits, so only O(N)
    state is saved): the two full-vocabulary reductions of the released variant. Gradient convention as
    torch.clamp's: where a logit ties with the floor, the gradient goes to the logit.
    """

    @staticmethod
    def forward(ctx, hidden, weight, floor, chunk_size):
        dtype = compute_dtype(hidden.dtype)
        lse = torch.full((hidden.shape[0],), float("-inf"), dtype=dtype, device=hidden.device)
        total = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        floor_col = floor.to(dtype)[:, None]
        for start in range(0, weight.shape[0], chunk_size):
            clamped = torch.maximum((hidden @ weight[start : start + chunk_size].T).to(dtype), floor_col)
            lse = torch.logaddexp(lse, torch.logsumexp(clamped, dim=-1))
            total += clamped.sum(dim=-1)
        ctx.save_for_backward(hidden, weight, floor, lse)
        ctx.chunk_size = chunk_size
        return lse, total

    @staticmethod
    def backward(ctx, grad_lse, grad_total):
        hidden, weight, floor, lse = ctx.saved_tensors
        dtype = lse.dtype
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(dtype)
        grad_total = torch.zeros_like(lse) if grad_total is None else grad_total.to(dtype)
        hidden_c = hidden.to(dtype)
        grad_h = torch.zeros_like(hidden_c)
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        grad_f = torch.zeros_like(lse)
        floor_col = floor.to(dtype)[:, None]
        for start in range(0, weight.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, weight.shape[0])
            logits = (hidden @ weight[start:end].T).to(dtype)
            above = logits >= floor_col
            # d/dy of the two reductions: softmax(y) * grad_lse + grad_total, routed to z or to the floor
            dy = (
                torch.exp(torch.where(above, logits, floor_col) - lse[:, None]) * grad_lse[:, None]
                + grad_total[:, None]
            )
            grad_f += dy.masked_fill(above, 0.0).sum(dim=-1)
            dz = dy.masked_fill(~above, 0.0)
            grad_h += dz @ weight[start:end].to(dtype)
            grad_w[start:end] = dz.T @ hidden_c
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), grad_f.to(floor.dtype), None


def released_lean_terms(
    hidden: Tensor,
    weight: Tensor,
    cand_ids: Tensor,
    cand_mask: Tensor,
    actions: Tensor,
    valid: Tensor,
    *,
    gamma: float,
    alpha: float,
    q_min: float,
    chi2: bool,
    top_p: float,
    eps: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> BellmanTerms:
    """The released variant (docs/method.md §4) from hidden states, equal to ``dense_terms(variant="released")``.

    With ``m`` the candidate mask, ``Q = max(z - max z, q_min)``, ``L = logsumexp_V Q`` and ``S = sum_A exp(Q - L)``:
    ``pit = (pi m / p + eps) / Z`` with ``Z = S / p + eps |V|``, which is ``eps / Z`` outside A_t, so every
    full-vocabulary sum reduces to members plus two vocabulary reductions, ``L`` and ``sum_V Q``, both taken in
    one chunked pass forward and one backward (`_ChunkedFloorReductions`, with the per-row floor ``max z + q_min``):

        V_t          = sum_A pit (Q - log pit) + (eps/Z) (sum_V Q - sum_A Q) - (|V| - |A|) (eps/Z) log(eps/Z)
        mean_V d_t   = valid_t sum_A Q / |V| - gamma Vn_t
        mean_V d_t^2 = ( sum_A (valid_t Q - gamma Vn_t)^2 + (|V| - |A|) (gamma Vn_t)^2 ) / |V|
    """
    batch, frame, width = hidden.shape
    vocab = weight.shape[0]
    count = int(valid[:, :-1].sum())
    if count == 0:
        raise ValueError("Bellman Distill batch has no transition (the released variant needs responses of 2+ tokens)")
    dtype = compute_dtype(hidden.dtype)
    index = valid.reshape(-1).nonzero().squeeze(1)
    rows = hidden.reshape(-1, width).index_select(0, index)
    slots = cand_ids.shape[-1]
    ids = cand_ids.reshape(-1, slots).index_select(0, index)
    mask = cand_mask.reshape(-1, slots).index_select(0, index)
    best = chunked_argmax(rows, weight, chunk_size=chunk_size)
    logits = candidate_logits(
        rows, weight, torch.cat([ids, best[:, None]], dim=1), torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
        chunk_size=chunk_size,
    )  # fmt: skip
    shift = logits[:, slots]
    floor = shift + q_min
    q = torch.clamp(logits[:, :slots] - shift[:, None], min=q_min)
    lse_floor, sum_floor = _ChunkedFloorReductions.apply(rows, weight, floor, chunk_size)
    log_z = lse_floor - shift  # logsumexp_V Q, since Q = max(z, max z + q_min) - max z
    sum_q_all = sum_floor - vocab * shift  # sum_V Q
    members = mask.sum(dim=-1).to(dtype)
    pi = torch.where(mask, torch.exp(q - log_z[:, None]), 0.0)
    norm = pi.sum(dim=-1) / top_p + eps * vocab
    pit = (pi / top_p + eps) / norm[:, None]
    pit_out = eps / norm
    sum_q = torch.where(mask, q, 0.0).sum(dim=-1)
    inside = torch.where(mask, pit * (q - torch.log(pit)), 0.0).sum(dim=-1)
    row_values = inside + pit_out * (sum_q_all - sum_q) - (vocab - members) * pit_out * torch.log(pit_out)

    def frame_of(x: Tensor) -> Tensor:
        return x.new_zeros(batch * frame).index_copy(0, index, x).view(batch, frame)

    values = frame_of(row_values)
    next_values = torch.cat([values[:, 1:], values.new_zeros(batch, 1)], dim=1)  # V_{t+1} valid_{t+1} (padding holds 0)
    start = valid.clone()
    start[:, -1] = False  # the last position of the padded batch never starts a transition
    # The released sums run over every position t < T, valid or not: an invalid position followed by a
    # valid one (a mid-response EOS in scored data: the release masks EOS as padding) has d_t(a) = -gamma Vn_t
    # for every a. Its reward and value parts cancel in the loss, its chi^2 part (gamma Vn_t)^2 does not.
    # frame_of holds 0 (V, sum_A Q, |A|) at invalid positions, so the formulas below give exactly that there.
    before_last = torch.ones_like(valid)
    before_last[:, -1] = False
    summed = before_last.to(dtype)
    d_mean = frame_of(sum_q) / vocab - gamma * next_values
    reward_term = (d_mean * summed).sum() / count
    value_term = ((values - gamma * next_values) * summed).sum() / count
    row_next = next_values.reshape(-1).index_select(0, index)
    member_sq = torch.where(mask, (q - gamma * row_next[:, None]).square(), 0.0).sum(dim=-1)
    d_sq = (frame_of(member_sq) + (vocab - frame_of(members)) * (gamma * next_values).square()) / vocab
    chi2_term = (d_sq * summed).sum() / count / (4.0 * alpha)
    loss = -reward_term + value_term + (chi2_term if chi2 else 0.0)

    with torch.no_grad():
        row_start = start.reshape(-1).index_select(0, index)
        in_set = (mask & (ids == actions.reshape(-1).index_select(0, index)[:, None])).any(dim=-1)

        def start_mean(x: Tensor) -> Tensor:
            return torch.where(row_start, x.to(dtype), 0.0).sum() / count

        return BellmanTerms(
            loss=loss,
            mean_r=reward_term.detach(),
            mean_v=start_mean(row_values.detach()),
            mean_q_candidates=start_mean(sum_q.detach() / members.clamp_min(1)),
            chi2=chi2_term.detach(),
            outside_share=start_mean(~in_set),
            mean_set_size=start_mean(members),
            num_transitions=count,
            # pi = softmax(Q) is not the student's softmax(z) where the clip bites: recompute from z
            set_mass=start_mean(
                torch.exp(
                    _masked_logsumexp(logits[:, :slots], mask)
                    - chunked_logsumexp(rows.detach(), weight.detach(), chunk_size=chunk_size)
                )
            ),
        )
