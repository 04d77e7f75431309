"""The divergence menu (bdctl/objectives/divergences.py, docs/method.md §5.1) against a plain loop
reference in float64 (values and gradients to 1e-6), against each other at the limits, and the
coarse-grained and lean forms against the dense one."""

from __future__ import annotations

import math

import pytest
import torch

from bdctl.objectives.divergences import (
    NAMES,
    coarse_per_token,
    from_log_probs,
    lean_coarse_per_token,
    masked_mean,
    per_token,
)

TOL = dict(rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the plain reference


def _softmax_row(logits: list[torch.Tensor], tau: float) -> list[torch.Tensor]:
    top = max(float(z.detach()) for z in logits)
    exps = [torch.exp((z - top) / tau) for z in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b, strict=True):
        if float(x.detach()) > 0:
            out = out + x * torch.log(x / y)
    return out


def reference(name, student, teacher, beta=0.5, alpha=0.1, tau=1.0) -> torch.Tensor:
    """One position at a time, one vocabulary entry at a time, straight from METHOD.md 4.1."""
    rows = []
    for n in range(student.shape[0]):
        q = _softmax_row(list(student[n]), tau)
        p = _softmax_row(list(teacher[n]), tau)
        if name == "forward_kl" or (name == "jsd" and beta == 0):
            value = _kl(p, q)
        elif name == "reverse_kl" or (name == "jsd" and beta == 1):
            value = _kl(q, p)
        elif name == "jsd":
            m = [beta * pv + (1 - beta) * qv for pv, qv in zip(p, q, strict=True)]
            value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        elif name == "tvd":
            value = 0.5 * sum(torch.abs(pv - qv) for pv, qv in zip(p, q, strict=True))
        elif name == "skew_kl":
            value = _kl(p, [alpha * pv + (1 - alpha) * qv for pv, qv in zip(p, q, strict=True)])
        else:
            value = _kl(q, [alpha * qv + (1 - alpha) * pv for pv, qv in zip(p, q, strict=True)])
        rows.append(value * tau**2)
    return torch.stack(rows)


# --------------------------------------------------------------------------- logits of tiny models


def _tiny_logits(arch: str, vocab: int, seed: int, scale: float) -> torch.Tensor:
    """[N, V] float64 next-token logits of a randomly initialised tiny model of `arch`."""
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = {
        "gpt2": lambda: GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, **common),
        "opt": lambda: OPTConfig(
            num_hidden_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            ffn_dim=32,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
            **common,
        ),  # fmt: skip
        "qwen2": lambda: Qwen2Config(
            num_hidden_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            max_position_embeddings=32,
            **common,
        ),  # fmt: skip
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    ids = torch.randint(3, vocab, (1, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    # a randomly initialised head is nearly uniform; scaling spreads it like a trained one
    return logits / logits.std() * scale


@pytest.fixture(scope="module", params=["gpt2", "opt", "qwen2"])
def logits_pair(request):
    vocab = {"gpt2": 37, "opt": 41, "qwen2": 29}[request.param]
    student = _tiny_logits(request.param, vocab, seed=1, scale=2.0)
    teacher = _tiny_logits(request.param, vocab, seed=2, scale=3.0)
    return student, teacher


SETTINGS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_rkl", {"alpha": 0.1}),
    ("skew_rkl", {"alpha": 0.3, "tau": 2.0}),
    ("jsd", {"beta": 0.7, "tau": 0.5}),
    ("reverse_kl", {"tau": 2.0}),
]


@pytest.mark.parametrize(("name", "settings"), SETTINGS, ids=[f"{n}-{s}" for n, s in SETTINGS])
def test_matches_the_loop_reference_in_value_and_gradient(logits_pair, name, settings):
    student, teacher = logits_pair
    tau = settings.get("tau", 1.0)
    kwargs = {k: v for k, v in settings.items() if k != "tau"}
    mine = student.clone().requires_grad_(True)
    theirs = student.clone().requires_grad_(True)
    got = per_token(name, mine, teacher, temperature=tau, **kwargs)
    want = reference(name, theirs, teacher, tau=tau, **kwargs)
    torch.testing.assert_close(got, want, **TOL)
    weights = torch.linspace(0.5, 1.5, got.shape[0], dtype=torch.float64)  # a gradient per row, not only the sum
    (g_mine,) = torch.autograd.grad((got * weights).sum(), mine)
    (g_ref,) = torch.autograd.grad((want * weights).sum(), theirs)
    torch.testing.assert_close(g_mine, g_ref, **TOL)
    assert (got >= -1e-12).all()


def test_limits_tie_the_menu_together(logits_pair):
    student, teacher = logits_pair
    forward = per_token("forward_kl", student, teacher)
    reverse = per_token("reverse_kl", student, teacher)
    # TRL's convention at the ends of beta, and DistiLLM's skews at a = 0
    torch.testing.assert_close(per_token("jsd", student, teacher, beta=0.0), forward, **TOL)
    torch.testing.assert_close(per_token("jsd", student, teacher, beta=1.0), reverse, **TOL)
    torch.testing.assert_close(per_token("skew_kl", student, teacher, alpha=0.0), forward, **TOL)
    torch.testing.assert_close(per_token("skew_rkl", student, teacher, alpha=0.0), reverse, **TOL)
    # the formula itself: JSD(beta) = beta KL(p||q) + O(beta^2) and (1 - beta) KL(q||p) + O((1 - beta)^2)
    small = 1e-9
    torch.testing.assert_close(per_token("jsd", student, teacher, beta=small) / small, forward, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        per_token("jsd", student, teacher, beta=1 - small) / small, reverse, rtol=1e-4, atol=1e-6
    )
    # equal distributions: every divergence is 0
    for name in NAMES:
        assert per_token(name, teacher, teacher).abs().max() < 1e-12
    # skew KL is bounded by log(1 / a) (the mixture keeps a p), unlike KL
    assert (per_token("skew_kl", student, teacher, alpha=0.1) <= math.log(10) + 1e-12).all()
    # Pinsker: TVD <= sqrt(KL / 2)
    assert (per_token("tvd", student, teacher) <= torch.sqrt(forward / 2) + 1e-12).all()


def test_symmetric_jsd_is_symmetric(logits_pair):
    student, teacher = logits_pair
    torch.testing.assert_close(
        per_token("jsd", student, teacher, beta=0.5), per_token("jsd", teacher, student, beta=0.5), **TOL
    )


# --------------------------------------------------------------------------- coarse-grained and lean forms


def _cache_sets(teacher: torch.Tensor, size: int, seed: int):
    """A random set of `size` distinct ids per row (sorted by teacher probability, like the cache), padded to
    the vocabulary's width, with the teacher's probabilities at temperature 1."""
    rows, vocab = teacher.shape
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(teacher, dim=-1)
    ids = torch.zeros((rows, vocab), dtype=torch.long)
    mask = torch.zeros((rows, vocab), dtype=torch.bool)
    for n in range(rows):
        k = size if size >= vocab else max(1, size - n % 3)  # sets differ in size, as in the cache
        chosen = torch.randperm(vocab, generator=gen)[:k]
        chosen = chosen[torch.argsort(probs[n, chosen], descending=True)]
        ids[n, : len(chosen)] = chosen
        mask[n, : len(chosen)] = True
    return ids, torch.where(mask, probs.gather(1, ids), 0.0), mask


@pytest.mark.parametrize("name", NAMES)
def test_coarse_form_is_exact_on_the_whole_vocabulary(logits_pair, name):
    student, teacher = logits_pair
    vocab = student.shape[1]
    ids, probs, mask = _cache_sets(teacher, vocab, seed=3)
    mine = student.clone().requires_grad_(True)
    dense_in = student.clone().requires_grad_(True)
    coarse = coarse_per_token(name, mine, ids, probs, mask)
    dense = per_token(name, dense_in, teacher)
    torch.testing.assert_close(coarse, dense, **TOL)
    (g_coarse,) = torch.autograd.grad(coarse.sum(), mine)
    (g_dense,) = torch.autograd.grad(dense.sum(), dense_in)
    torch.testing.assert_close(g_coarse, g_dense, **TOL)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [1, 4, 12])
def test_coarse_form_never_exceeds_the_dense_one(logits_pair, name, size):
    """Data-processing inequality: all six are f-divergences, and merging outcomes into the tail
    cannot increase one."""
    student, teacher = logits_pair
    ids, probs, mask = _cache_sets(teacher, size, seed=size)
    for settings in ({"beta": 0.3, "alpha": 0.1}, {"beta": 0.0, "alpha": 0.5}, {"beta": 1.0, "alpha": 0.0}):
        coarse = coarse_per_token(name, student, ids, probs, mask, **settings)
        dense = per_token(name, student, teacher, **settings)
        assert (coarse <= dense + 1e-12).all(), (coarse, dense)
        assert (coarse >= -1e-12).all()
    # and it is not the trivial bound: with a real tail the coarse value still moves with the student
    assert (
        coarse_per_token(name, student * 0.5, ids, probs, mask).sum()
        != coarse_per_token(name, student, ids, probs, mask).sum()
    )


def test_coarse_form_matches_a_plain_coarse_reference(logits_pair):
    """The coarse pair built by hand (A_t plus one tail outcome), fed to the loop reference's KLs."""
    student, teacher = logits_pair
    ids, probs, mask = _cache_sets(teacher, 5, seed=7)
    got = coarse_per_token("jsd", student, ids, probs, mask, beta=0.4)
    q_all = torch.softmax(student, dim=-1)
    for n in range(student.shape[0]):
        members = ids[n][mask[n]].tolist()
        p = [float(x) for x in probs[n][mask[n]]]
        q = [float(q_all[n, v]) for v in members]
        p.append(1 - sum(p))
        q.append(1 - sum(q))
        m = [0.4 * a + 0.6 * b for a, b in zip(p, q, strict=True)]
        want = 0.4 * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True)) + 0.6 * sum(
            b * math.log(b / c) for b, c in zip(q, m, strict=True)
        )
        assert abs(float(got[n]) - want) < 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_lean_coarse_form_equals_the_coarse_form_from_logits(name):
    gen = torch.Generator().manual_seed(11)
    rows, hidden_size, vocab = 7, 12, 53
    hidden = torch.randn(rows, hidden_size, dtype=torch.float64, generator=gen)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, generator=gen) * 0.7
    teacher = torch.randn(rows, vocab, dtype=torch.float64, generator=gen) * 2
    for size in (6, vocab):  # a real tail, and A_t = V
        ids, probs, mask = _cache_sets(teacher, size, seed=size)
        h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lean = lean_coarse_per_token(name, h1, w1, ids, probs, mask, chunk_size=16, beta=0.3, alpha=0.2)
        dense = coarse_per_token(name, h2 @ w2.T, ids, probs, mask, beta=0.3, alpha=0.2)
        torch.testing.assert_close(lean, dense, **TOL)
        grads_lean = torch.autograd.grad(lean.sum(), (h1, w1))
        grads_dense = torch.autograd.grad(dense.sum(), (h2, w2))
        for a, b in zip(grads_lean, grads_dense, strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, **TOL)


def test_float32_lean_form_stays_finite_when_the_student_covers_the_set():
    """A student that puts (numerically) all its mass on A_t: the tail is floored, not log(0)."""
    rows, vocab = 3, 40
    weight = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    weight[:4, :4] += 30.0 * torch.eye(4)  # tokens 0..3 take all but ~1e-12 of the mass
    hidden = torch.ones(rows, 8).requires_grad_(True)
    ids = torch.tensor([[0, 1, 2, 3]] * rows)
    probs = torch.tensor([[0.3, 0.2, 0.1, 0.1]] * rows)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for name in NAMES:
        value = lean_coarse_per_token(name, hidden, weight, ids, probs, mask)
        (grad,) = torch.autograd.grad(value.sum(), hidden)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), name


def test_bad_settings_are_refused():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        per_token("kl", logits, logits)
    with pytest.raises(ValueError, match="beta must lie in"):
        per_token("jsd", logits, logits, beta=1.5)
    with pytest.raises(ValueError, match="alpha must lie in"):
        per_token("skew_kl", logits, logits, alpha=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        per_token("tvd", logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match="temperature 1 only"):
        coarse_per_token("tvd", logits, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.ones(2, 1) > 0,
                         temperature=2.0)  # fmt: skip
    with pytest.raises(ValueError, match="no valid response position"):
        masked_mean(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_log_prob_form_ignores_outcomes_both_sides_give_zero():
    log_p = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    log_q = torch.log(torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64)).requires_grad_(True)
    for name in NAMES:
        value = from_log_probs(name, log_p, log_q)
        (grad,) = torch.autograd.grad(value.sum(), log_q)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), name
