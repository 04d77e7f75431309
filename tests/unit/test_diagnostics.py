"""bdctl.diagnostics: the per-position quantities every distill method logs, against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from bdctl.diagnostics import DIAGNOSTICS, position_diagnostics


def one_hot_head(probabilities: list[list[float]]):
    """Hidden states whose logits are log(probabilities) under an identity output embedding."""
    logits = torch.tensor(probabilities, dtype=torch.float64).log()
    return logits, torch.eye(logits.shape[1], dtype=torch.float64)


def test_position_diagnostics_against_hand_values():
    # row 0: student (0.5, 0.3, 0.1, 0.1), A_t = {1, 2}, action 2 (inside), arg-max 0 outside A_t
    # row 1: student (0.1, 0.6, 0.2, 0.1), A_t = {1}, action 3 (outside), arg-max 1 inside A_t
    hidden, weight = one_hot_head([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])
    ids = torch.tensor([[1, 2], [1, 0]])
    mask = torch.tensor([[True, True], [True, False]])  # row 1's second slot is padding
    actions = torch.tensor([2, 3])
    got = position_diagnostics(hidden, weight, ids, mask, actions, q_min=-10.0)
    assert set(got) == set(DIAGNOSTICS)
    torch.testing.assert_close(got["diag_mass_on_set"], torch.tensor([0.4, 0.6], dtype=torch.float64))
    torch.testing.assert_close(got["diag_argmax_in_set"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    nll = torch.tensor([-math.log(0.1), -math.log(0.1)], dtype=torch.float64)
    torch.testing.assert_close(got["diag_dstar_nll"], nll)
    torch.testing.assert_close(got["diag_outside_share"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    # V = log sum_{A_t} pi(a) / max_b pi(b): log(0.4 / 0.5) and log(0.6 / 0.6)
    torch.testing.assert_close(got["diag_mean_v"], torch.tensor([math.log(0.8), 0.0], dtype=torch.float64))


def test_mean_v_uses_the_clip_at_q_min():
    # a set member far below the arg-max counts as exp(q_min) of the arg-max, as in the paper's Q
    hidden, weight = one_hot_head([[0.98, 0.02 * 1e-8, 0.02 * (1 - 1e-8)]])
    ids, mask, action = torch.tensor([[1]]), torch.tensor([[True]]), torch.tensor([1])
    got = position_diagnostics(hidden, weight, ids, mask, action, q_min=-2.0)
    assert float(got["diag_mean_v"][0]) == pytest.approx(-2.0)
    assert float(got["diag_mass_on_set"][0]) == pytest.approx(0.02 * 1e-8)


def test_chunked_pass_equals_the_dense_computation_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    rows, width, vocab, slots = 9, 6, 300, 5
    hidden = torch.randn(rows, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:slots] for _ in range(rows)])
    mask = torch.arange(slots)[None, :] < torch.randint(1, slots + 1, (rows, 1), generator=g)
    actions = torch.randint(0, vocab, (rows,), generator=g)
    actions[:4] = ids[:4, 0]
    got = position_diagnostics(hidden, weight, ids, mask, actions, q_min=-10.0)
    probs = torch.softmax(hidden @ weight.T, dim=-1)
    member = torch.zeros(rows, vocab, dtype=torch.bool)
    for r in range(rows):
        member[r, ids[r][mask[r]]] = True
    torch.testing.assert_close(got["diag_mass_on_set"], (probs * member).sum(-1))
    torch.testing.assert_close(got["diag_argmax_in_set"], member[torch.arange(rows), probs.argmax(-1)].double())
    torch.testing.assert_close(got["diag_dstar_nll"], -probs[torch.arange(rows), actions].log())
    torch.testing.assert_close(got["diag_outside_share"], (~member[torch.arange(rows), actions]).double())
    q = torch.clamp((probs / probs.max(-1, keepdim=True).values).log(), min=-10.0)
    torch.testing.assert_close(got["diag_mean_v"], torch.logsumexp(q.masked_fill(~member, float("-inf")), -1))
