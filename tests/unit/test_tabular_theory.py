"""The paper's top-p theory (Propositions 1-4) checked exactly on small tabular tree MDPs.

The MDP mirrors generation: a state is a token prefix, the transition is deterministic
(``s' = s . a``), a state is terminal after ``depth`` tokens or after the EOS token, and its
value is then 0. Everything is solved exactly by backward induction (children are numbered
after their parents), in float64.

Paper statements checked (paper.md, "Optimality in M_p" and the appendix):

* Proposition 1: the top-p soft Bellman operator of Definition 4,
  ``(B_p^pi Q)(s,a) = r + gamma E_{a' ~ PROJ_p pi}[Q(s',a') - log PROJ_p pi(a'|s')]``,
  is a contraction in the supported sup-norm ``max_s max_{a in A_p(s)} |.|`` (Definition 5);
  we also check the optimality form (soft max restricted to ``A_p(s')``), the operator
  whose fixed point is ``Qbar_p*``, and that the modulus is exactly ``gamma``.
* Proposition 2: ``||Q* - Qbar^{PROJ_p pi*}||_{inf, A_p} <= kappa(p) = -gamma/(1-gamma) log p``.
* Proposition 3: ``Qbar^{PROJ_p pi*} <= Qbar_p* <= Q*`` on supported pairs.
* Proposition 4: ``||Q* - Qbar_p*||_{inf, A_p} <= kappa(p)``.

Propositions 2-4 assume, as the paper does ("in IRL it is often assumed that the demonstrator
(the teacher) is optimal"), that the teacher pi* is the soft-optimal policy of M, i.e.
``pi* = softmax(Q*)``, and that ``A_p`` is its top-p set. The last test shows the bound can
fail without that assumption. Sets are per state (as bdctl uses them) and, in a second
parametrisation, the paper's state-independent simplification ``A_p = union_s A_p(s)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

TOL = 1e-10


@dataclass
class TreeMDP:
    """``next_state[s, a]``: index of ``s . a``, or -1 when that child is terminal."""

    next_state: np.ndarray  # [S, A] int
    rewards: np.ndarray  # [S, A] float
    depth_of: np.ndarray  # [S] int
    gamma: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.rewards.shape


def build_tree(n_actions: int, depth: int, gamma: float, rng: np.random.Generator, eos: int | None = 0) -> TreeMDP:
    """All non-terminal prefixes, breadth first, with random rewards of a random scale."""
    states: list[tuple[int, ...]] = [()]
    next_rows: list[list[int]] = []
    i = 0
    while i < len(states):
        prefix = states[i]
        row = []
        for a in range(n_actions):
            child = prefix + (a,)
            if len(child) == depth or a == eos:
                row.append(-1)
            else:
                row.append(len(states))
                states.append(child)
        next_rows.append(row)
        i += 1
    scale = rng.uniform(0.5, 4.0)
    rewards = rng.normal(size=(len(states), n_actions)) * scale
    depth_of = np.array([len(s) for s in states])
    return TreeMDP(np.array(next_rows), rewards, depth_of, gamma)


def logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum()))


def softmax_rows(q: np.ndarray) -> np.ndarray:
    z = np.exp(q - q.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_p_sets(policy: np.ndarray, p: float) -> np.ndarray:
    """docs/method.md §2: the shortest probability-sorted prefix reaching p, per state."""
    support = np.zeros_like(policy, dtype=bool)
    for s, probs in enumerate(policy):
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep = mass_before < p
        keep[0] = True
        support[s, order[keep]] = True
    return support


def union_sets(support: np.ndarray) -> np.ndarray:
    """The paper's state-independent simplification ``A_p = union_s A_p(s)``."""
    return np.broadcast_to(support.any(axis=0), support.shape).copy()


def successor_values(mdp: TreeMDP, per_state: np.ndarray) -> np.ndarray:
    """``[S, A]``: the value of ``s . a`` (0 where the child is terminal)."""
    return np.where(mdp.next_state >= 0, per_state[np.maximum(mdp.next_state, 0)], 0.0)


def soft_max_value(support: np.ndarray):
    """Per-state value of the Bellman optimality form in M_p: ``logsumexp_{a in A(s)} Q(s, a)``."""
    return lambda s, q_row: logsumexp(q_row[support[s]])


def projected(policy: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Definition 3: ``PROJ_p pi``, the policy renormalised on the support, 0 elsewhere."""
    masked = np.where(support, policy, 0.0)
    return masked / masked.sum(axis=1, keepdims=True)


def policy_value(policy: np.ndarray, support: np.ndarray):
    """Per-state value of Definition 4: ``E_{a ~ PROJ_p pi}[Q(s, a) - log PROJ_p pi(a | s)]``."""
    proj = projected(policy, support)
    safe_log = np.log(np.where(support, proj, 1.0))

    def value(s: int, q_row: np.ndarray) -> float:
        return float(np.where(support[s], proj[s] * (q_row - safe_log[s]), 0.0).sum())

    return value


def apply_operator(mdp: TreeMDP, value, q: np.ndarray) -> np.ndarray:
    """``(T Q)(s, a) = r(s, a) + gamma * value(s', Q(s', .))``, 0 future after a terminal child."""
    per_state = np.array([value(s, q[s]) for s in range(q.shape[0])])
    return mdp.rewards + mdp.gamma * successor_values(mdp, per_state)


def soft_max_operator(mdp: TreeMDP, support: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``r + gamma logsumexp_{a' in A(s')} Q(s', a')``."""
    return apply_operator(mdp, soft_max_value(support), q)


def policy_operator(mdp: TreeMDP, policy: np.ndarray, support: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Definition 4: ``r + gamma E_{a' ~ PROJ_p pi}[Q(s',a') - log PROJ_p pi(a'|s')]``."""
    return apply_operator(mdp, policy_value(policy, support), q)


def fixed_point(mdp: TreeMDP, value) -> np.ndarray:
    """The operator's exact fixed point by backward induction: children (higher indices) are
    final before their parent reads them."""
    q = np.zeros(mdp.shape)
    for s in reversed(range(mdp.shape[0])):
        for a, child in enumerate(mdp.next_state[s]):
            future = value(child, q[child]) if child >= 0 else 0.0
            q[s, a] = mdp.rewards[s, a] + mdp.gamma * future
    return q


def supported_sup(diff: np.ndarray, support: np.ndarray) -> float:
    """Definition 5 with q = inf: ``max_s max_{a in A_p(s)} |diff(s, a)|`` (all states here
    are non-terminal)."""
    return float(np.abs(diff[support]).max())


def kappa(p: float, gamma: float) -> float:
    return -gamma / (1.0 - gamma) * math.log(p)


def random_policy(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.dirichlet(np.full(shape[1], 0.5), size=shape[0])


# --------------------------------------------------------------------------- Proposition 1


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_top_p_operators_are_gamma_contractions(seed, p):
    rng = np.random.default_rng(seed)
    mdp = build_tree(n_actions=4, depth=4, gamma=0.9, rng=rng)
    support = top_p_sets(random_policy(rng, mdp.shape), p)  # the teacher's sets
    policy = random_policy(rng, mdp.shape)  # any policy pi for Definition 4
    assert not support.all()
    operators = {
        "definition_4": lambda q: policy_operator(mdp, policy, support, q),
        "soft_max": lambda q: soft_max_operator(mdp, support, q),
    }
    for name, op in operators.items():
        for _ in range(20):
            q1 = rng.normal(size=mdp.shape) * rng.uniform(0.1, 10.0)
            q2 = q1 + rng.normal(size=mdp.shape) * rng.uniform(0.01, 5.0)
            distance = supported_sup(q1 - q2, support)
            assert supported_sup(op(q1) - op(q2), support) <= mdp.gamma * distance + TOL, name

        # Unsupported entries are never read: garbage there changes nothing.
        q = rng.normal(size=mdp.shape)
        garbage = np.where(support, q, 1e6 * rng.normal(size=mdp.shape))
        np.testing.assert_allclose(op(garbage), op(q), rtol=0, atol=TOL)

        # The modulus is exactly gamma: a constant shift c moves TQ by gamma * c wherever
        # the successor is not terminal.
        shifted = op(q + 3.0) - op(q)
        nonterminal_next = mdp.next_state >= 0
        np.testing.assert_allclose(shifted[nonterminal_next], mdp.gamma * 3.0, atol=TOL)
        np.testing.assert_allclose(shifted[~nonterminal_next], 0.0, atol=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_iterating_the_contraction_reaches_the_fixed_point(seed):
    """Banach: repeated application from any start converges to the unique fixed point (on a
    tree of depth D, exactly after D applications)."""
    rng = np.random.default_rng(seed)
    mdp = build_tree(n_actions=3, depth=5, gamma=0.95, rng=rng)
    support = top_p_sets(random_policy(rng, mdp.shape), 0.7)
    exact = fixed_point(mdp, soft_max_value(support))
    q = rng.normal(size=mdp.shape) * 50.0
    for _ in range(5):
        q = soft_max_operator(mdp, support, q)
    np.testing.assert_allclose(q, exact, atol=1e-9, rtol=0)


# ------------------------------------------------------------------- Propositions 2, 3, 4


def solve(mdp: TreeMDP, p: float, sets: str):
    """``Q*``, the teacher ``pi* = softmax(Q*)``, ``A_p``, ``Qbar_p*`` and ``Qbar^{PROJ pi*}``."""
    everything = np.ones(mdp.shape, dtype=bool)
    q_star = fixed_point(mdp, soft_max_value(everything))
    teacher = softmax_rows(q_star)
    support = top_p_sets(teacher, p)
    if sets == "union":
        support = union_sets(support)
    q_bar = fixed_point(mdp, soft_max_value(support))
    q_hat = fixed_point(mdp, policy_value(teacher, support))
    return q_star, teacher, support, q_bar, q_hat


@pytest.mark.parametrize("sets", ["per_state", "union"])
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("seed", range(4))
def test_bounded_sub_optimality(seed, p, gamma, sets):
    rng = np.random.default_rng(100 + seed)
    mdp = build_tree(n_actions=4, depth=4, gamma=gamma, rng=rng)
    q_star, teacher, support, q_bar, q_hat = solve(mdp, p, sets)
    bound = kappa(p, gamma)

    # Proposition 3 (sandwich), on supported pairs.
    assert np.all(q_hat[support] <= q_bar[support] + TOL)
    assert np.all(q_bar[support] <= q_star[support] + TOL)
    # Proposition 2 and Proposition 4, exactly as stated.
    assert supported_sup(q_star - q_hat, support) <= bound + TOL
    gap = supported_sup(q_star - q_bar, support)
    assert gap <= bound + TOL

    # The argument behind the bound, per state: with m(s) = pi*(A_p(s) | s) >= p,
    # V*(s) - Vbar(s) = -log m(s) + (something in [0, sup gap at the children]), so the gap
    # is at least gamma * (-log m(s')) and at most the finite-horizon sum over remaining steps.
    mass = np.where(support, teacher, 0.0).sum(axis=1)
    assert np.all(mass >= p - TOL)
    child_mass = successor_values(mdp, -np.log(mass))  # -log m(s'), 0 for terminal s'
    diff = q_star - q_bar
    assert np.all(diff[support] >= mdp.gamma * child_mass[support] - TOL)
    depth = int(mdp.depth_of.max()) + 1
    horizon = sum(gamma**k for k in range(1, depth))
    assert gap <= -math.log(mass.min()) * horizon + TOL
    # One step before the last decision the children's Q values coincide, so the gap there is
    # exactly gamma * (-log m(s')): this pins the solvers down, not just the inequality.
    last = mdp.depth_of == depth - 2
    rows = support & last[:, None] & (mdp.next_state >= 0)
    assert rows.any()
    np.testing.assert_allclose(diff[rows], mdp.gamma * child_mass[rows], atol=1e-9, rtol=0)
    if p < 0.9 and sets == "per_state":
        assert gap > 0.0  # the top-p MDP really is a restriction


def test_bound_at_p_equal_one_is_zero():
    rng = np.random.default_rng(7)
    mdp = build_tree(n_actions=3, depth=4, gamma=0.9, rng=rng)
    q_star, _, support, q_bar, q_hat = solve(mdp, 1.0, "per_state")
    assert support.all()
    np.testing.assert_allclose(q_bar, q_star, atol=1e-12, rtol=0)
    np.testing.assert_allclose(q_hat, q_star, atol=1e-12, rtol=0)


def test_bound_requires_the_teacher_to_be_soft_optimal():
    """Counterexample to the bound when the top-p sets come from a teacher that is not
    ``softmax(Q*)``: the teacher prefers the action whose reward is far lower."""
    gamma, p = 0.99, 0.8
    mdp = build_tree(n_actions=2, depth=2, gamma=gamma, rng=np.random.default_rng(0), eos=None)
    mdp.rewards[:] = 0.0
    mdp.rewards[mdp.depth_of == 1, 1] = 100.0  # the last step's action 1 is worth a lot
    bad_teacher = np.tile([0.9, 0.1], (mdp.shape[0], 1))  # ... but this teacher avoids it
    support = top_p_sets(bad_teacher, p)
    assert np.array_equal(support, np.tile([True, False], (mdp.shape[0], 1)))
    q_star = fixed_point(mdp, soft_max_value(np.ones_like(support)))
    q_bar = fixed_point(mdp, soft_max_value(support))
    assert supported_sup(q_star - q_bar, support) > kappa(p, gamma)
