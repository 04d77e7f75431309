"""Chunked-vocabulary helpers, cross-entropy and word-level KD against plain references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bdctl.objectives.kd import (
    dense_kd_loss,
    lean_sparse_kd_and_ce,
    lean_sparse_kd_loss,
    mixed_kd_loss,
    sparse_kd_loss_dense,
)
from bdctl.objectives.lm import (
    candidate_logits,
    chunked_argmax,
    chunked_logsumexp,
    dense_cross_entropy,
    lean_cross_entropy,
    token_logits,
)


def leaves(*shapes, dtype=torch.float64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_() for shape in shapes]


def assert_same(actual, expected, wrt, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    got = torch.autograd.grad(actual.sum(), wrt, retain_graph=True)
    want = torch.autograd.grad(expected.sum(), wrt, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------ chunked helpers


@pytest.mark.parametrize("chunk", [1, 7, 50, 64, 500])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_logsumexp_matches_torch(chunk, with_bias):
    hidden, weight, bias = leaves((13, 6), (50, 6), (50,), scale=2.0)
    b = bias if with_bias else None
    logits = hidden @ weight.T + (bias if with_bias else 0.0)
    wrt = (hidden, weight, bias) if with_bias else (hidden, weight)
    # A non-uniform upstream gradient checks the per-row scaling in backward.
    scale = torch.linspace(0.5, 2.0, 13, dtype=torch.float64)
    assert_same(
        chunked_logsumexp(hidden, weight, b, chunk_size=chunk) * scale, torch.logsumexp(logits, dim=-1) * scale, wrt
    )


def test_chunked_logsumexp_float32():
    hidden, weight = leaves((40, 16), (300, 16), dtype=torch.float32)
    assert_same(
        chunked_logsumexp(hidden, weight, chunk_size=64),
        torch.logsumexp(hidden @ weight.T, dim=-1),
        (hidden, weight),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_logsumexp_with_floor_matches_clamped_reference(chunk):
    hidden, weight, bias = leaves((9, 5), (30, 5), (30,), seed=1, scale=2.0)
    (floor,) = leaves((9,), seed=2, scale=2.0)
    logits = hidden @ weight.T + bias
    assert bool((logits.detach() < floor.detach()[:, None]).any())  # the floor really bites
    expected = torch.logsumexp(torch.maximum(logits, floor[:, None]), dim=-1)
    got = chunked_logsumexp(hidden, weight, bias, chunk_size=chunk, floor=floor)
    assert_same(got, expected, (hidden, weight, bias, floor))


def test_chunked_logsumexp_gradcheck():
    hidden, weight, bias = leaves((4, 3), (11, 3), (11,), seed=3)
    (floor,) = leaves((4,), seed=4)
    assert torch.autograd.gradcheck(lambda h, w, b: chunked_logsumexp(h, w, b, chunk_size=4), (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b, f: chunked_logsumexp(h, w, b, chunk_size=4, floor=f),
        (hidden, weight, bias, floor),
    )


def test_chunked_logsumexp_saves_only_inputs_and_result():
    hidden, weight = leaves((64, 8), (500, 8), dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        chunked_logsumexp(hidden, weight, chunk_size=32)
    assert sorted(map(tuple, saved)) == sorted([(64, 8), (500, 8), (64,)])


def test_chunked_argmax_and_token_logits():
    hidden, weight, bias = leaves((20, 4), (37, 4), (37,), seed=5)
    logits = hidden @ weight.T + bias
    for chunk in (1, 5, 100):
        got = chunked_argmax(hidden, weight, bias, chunk_size=chunk)
        assert torch.equal(got, logits.argmax(-1))
    ids = torch.randint(0, 37, (20,))
    assert_same(token_logits(hidden, weight, ids, bias), logits.gather(1, ids[:, None])[:, 0], (hidden, weight, bias))
    many = torch.randint(0, 37, (20, 6))
    assert_same(token_logits(hidden, weight, many, bias), logits.gather(1, many), (hidden, weight, bias))


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_candidate_logits_match_gather(chunk):
    hidden, weight, bias = leaves((15, 4), (60, 4), (60,), seed=6)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (15, 7), generator=gen)
    mask = torch.rand(15, 7, generator=gen) < 0.7
    ids = torch.where(mask, ids, -1)  # padding slots may hold anything, even -1
    logits = hidden @ weight.T + bias
    expected = torch.where(mask, logits.gather(1, ids.clamp_min(0)), 0.0)
    got = candidate_logits(hidden, weight, ids, mask, bias, chunk_size=chunk)
    assert_same(got, expected, (hidden, weight, bias))
    with pytest.raises(ValueError, match="out of range"):
        candidate_logits(hidden, weight, torch.full_like(ids, 60), mask, bias)


def test_candidate_logits_do_not_keep_the_projection_block():
    """Autograd must keep indices only, not the ``[N, |U|]`` block (``gather`` would)."""
    hidden, weight = leaves((64, 4), (500, 4), dtype=torch.float32, seed=8)
    ids = torch.randint(0, 500, (64, 20), generator=torch.Generator().manual_seed(1))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        candidate_logits(hidden, weight, ids, None, chunk_size=10_000)
    assert max(saved) <= 500 * 4  # at most the gathered embedding rows, never 64 x |U|


# ---------------------------------------------------------------------------- cross-entropy


def lm_batch(seed=0, B=3, T=7, H=6, V=45, dtype=torch.float64):
    hidden, weight = leaves((B, T, H), (V, H), seed=seed, dtype=dtype, scale=2.0)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100  # prompt tokens
    labels[2, 4:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_cross_entropy_matches_torch(dtype):
    hidden, weight, labels = lm_batch(dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    expected = F.cross_entropy((hidden @ weight.T).reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=-100)
    assert_same(
        lean_cross_entropy(hidden, weight, labels, chunk_size=8), expected, (hidden, weight), atol=tol, rtol=tol
    )
    assert_same(dense_cross_entropy(hidden @ weight.T, labels), expected, (hidden, weight), atol=tol, rtol=tol)


def test_lean_cross_entropy_with_bias():
    hidden, weight, labels = lm_batch(seed=1)
    (bias,) = leaves((weight.shape[0],), seed=9)
    expected = F.cross_entropy(
        (hidden @ weight.T + bias).reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=-100
    )
    assert_same(lean_cross_entropy(hidden, weight, labels, bias, chunk_size=10), expected, (hidden, weight, bias))


def test_cross_entropy_user_errors():
    hidden, weight, labels = lm_batch()
    with pytest.raises(ValueError, match="no scored token"):
        lean_cross_entropy(hidden, weight, torch.full_like(labels, -100))
    with pytest.raises(ValueError, match="no scored token"):
        dense_cross_entropy(hidden @ weight.T, torch.full_like(labels, -100))
    bad = labels.clone()
    bad[1, 1] = weight.shape[0]
    with pytest.raises(ValueError, match="out of range"):
        lean_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        lean_cross_entropy(hidden, weight, labels, chunk_size=0)


# ------------------------------------------------------------------------------------- KD


def kd_loop_reference(student_logits, teacher_logits, valid):
    """- mean_t sum_v pi*(v|s_t) log pi_theta(v|s_t), one position and one token at a time."""
    B, T, V = student_logits.shape
    terms = []
    for b in range(B):
        for t in range(T):
            if not valid[b, t]:
                continue
            s, q = student_logits[b, t], teacher_logits[b, t]
            log_zs = torch.log(sum(torch.exp(s[v]) for v in range(V)))
            zq = sum(torch.exp(q[v]) for v in range(V))
            terms.append(-sum(torch.exp(q[v]) / zq * (s[v] - log_zs) for v in range(V)))
    return sum(terms) / len(terms)


def kd_batch(seed=0, B=2, T=5, H=4, V=12):
    hidden, weight = leaves((B, T, H), (V, H), seed=seed, scale=1.5)
    (teacher,) = leaves((B, T, V), seed=seed + 100, scale=2.0)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 3:] = False
    return hidden, weight, teacher, valid


def test_dense_kd_matches_loop_reference():
    hidden, weight, teacher, valid = kd_batch()
    student = hidden @ weight.T
    assert_same(
        dense_kd_loss(student, teacher, valid), kd_loop_reference(student, teacher, valid), (hidden, weight, teacher)
    )


def test_dense_kd_ignores_invalid_positions_and_is_cross_entropy_for_one_hot():
    hidden, weight, teacher, valid = kd_batch(seed=1)
    student = hidden @ weight.T
    garbage = teacher.detach().clone()
    garbage[~valid] = 1e3
    torch.testing.assert_close(dense_kd_loss(student, garbage, valid), dense_kd_loss(student, teacher, valid))
    # A (numerically) one-hot teacher makes KD the cross-entropy of its arg-max.
    labels = teacher.argmax(-1)
    one_hot = F.one_hot(labels, teacher.shape[-1]).to(teacher.dtype) * 1e4
    ce = dense_cross_entropy(student, torch.where(valid, labels, -100))
    torch.testing.assert_close(dense_kd_loss(student, one_hot, valid), ce)


def sparse_cache(teacher_logits, k, seed=0):
    """Top-k of the teacher with ragged sizes: row (b, t) keeps between 1 and k candidates."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(teacher_logits.detach(), dim=-1)
    top_probs, top_ids = probs.topk(k, dim=-1)
    sizes = torch.randint(1, k + 1, probs.shape[:-1], generator=gen)
    mask = torch.arange(k) < sizes[..., None]
    junk = torch.randint(0, probs.shape[-1], top_ids.shape, generator=gen)
    return torch.where(mask, top_ids, junk), torch.where(mask, top_probs, 0.7), mask


def sparse_kd_loop_reference(student_logits, ids, probs, mask, valid):
    """Top-k KD: the candidate probabilities renormalised, one candidate at a time."""
    B, T, V = student_logits.shape
    terms = []
    for b in range(B):
        for t in range(T):
            if not valid[b, t]:
                continue
            s = student_logits[b, t]
            log_zs = torch.log(sum(torch.exp(s[v]) for v in range(V)))
            members = [k for k in range(ids.shape[-1]) if mask[b, t, k]]
            total = sum(float(probs[b, t, k]) for k in members)
            terms.append(-sum(float(probs[b, t, k]) / total * (s[ids[b, t, k]] - log_zs) for k in members))
    return sum(terms) / len(terms)


def test_sparse_kd_dense_reference_matches_loop():
    hidden, weight, teacher, valid = kd_batch(seed=2)
    ids, probs, mask = sparse_cache(teacher, k=4)
    student = hidden @ weight.T
    assert_same(
        sparse_kd_loss_dense(student, ids, probs, mask, valid),
        sparse_kd_loop_reference(student, ids, probs, mask, valid),
        (hidden, weight),
    )


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_lean_sparse_kd_matches_dense_reference(chunk):
    hidden, weight, teacher, valid = kd_batch(seed=3, V=30)
    (bias,) = leaves((30,), seed=7)
    ids, probs, mask = sparse_cache(teacher, k=6, seed=1)
    expected = sparse_kd_loss_dense(hidden @ weight.T + bias, ids, probs, mask, valid)
    got = lean_sparse_kd_loss(hidden, weight, ids, probs, mask, valid, bias, chunk_size=chunk)
    assert_same(got, expected, (hidden, weight, bias))


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_kd_and_ce_in_one_pass_equal_the_plain_references(chunk):
    """The fused pass (kd / seqkd from the cache) against plain references: the dense sparse KD and
    torch's cross-entropy on the valid positions, values and gradients (bias included)."""
    hidden, weight, teacher, valid = kd_batch(seed=8, V=30)
    (bias,) = leaves((30,), seed=9)
    ids, probs, mask = sparse_cache(teacher, k=5, seed=3)
    actions = torch.randint(0, 30, valid.shape, generator=torch.Generator().manual_seed(4))
    logits = hidden @ weight.T + bias
    kd_expected = sparse_kd_loss_dense(logits, ids, probs, mask, valid)
    ce_expected = F.cross_entropy(logits[valid], actions[valid])
    kd, ce = lean_sparse_kd_and_ce(hidden, weight, ids, probs, mask, valid, actions, bias, chunk_size=chunk)
    assert_same(kd, kd_expected, (hidden, weight, bias))
    assert_same(ce, ce_expected, (hidden, weight, bias))
    # a mix of the two (what the loss heads take) has the mix's gradient too
    assert_same(0.3 * ce + 0.7 * kd, 0.3 * ce_expected + 0.7 * kd_expected, (hidden, weight, bias))


def test_kd_and_ce_in_one_pass_ignore_invalid_positions_and_check_actions():
    hidden, weight, teacher, valid = kd_batch(seed=10)
    ids, probs, mask = sparse_cache(teacher, k=3)
    actions = torch.randint(0, weight.shape[0], valid.shape, generator=torch.Generator().manual_seed(1))
    kd, ce = lean_sparse_kd_and_ce(hidden, weight, ids, probs, mask, valid, actions)
    scrambled = torch.where(valid, actions, weight.shape[0] - 1 - actions)  # other tokens where not valid
    kd2, ce2 = lean_sparse_kd_and_ce(hidden, weight, ids, probs, mask, valid, scrambled)
    assert float(kd) == float(kd2) and float(ce) == float(ce2)
    with pytest.raises(ValueError, match="actions token id out of range"):
        lean_sparse_kd_and_ce(hidden, weight, ids, probs, mask, valid, torch.where(valid, weight.shape[0], 0))
    with pytest.raises(ValueError, match="does not match valid"):
        lean_sparse_kd_and_ce(hidden, weight, ids, probs, mask, valid, actions[:, :-1])


def test_lean_sparse_kd_float32():
    hidden, weight, teacher, valid = kd_batch(seed=4, V=200)
    hidden, weight = (x.detach().float().requires_grad_() for x in (hidden, weight))
    ids, probs, mask = sparse_cache(teacher, k=20, seed=2)
    expected = sparse_kd_loss_dense(hidden @ weight.T, ids, probs.half(), mask, valid)
    got = lean_sparse_kd_loss(hidden, weight, ids, probs.half(), mask, valid, chunk_size=64)
    assert_same(got, expected, (hidden, weight), atol=1e-5, rtol=1e-5)


def test_sparse_kd_with_the_whole_vocabulary_is_exact_kd():
    hidden, weight, teacher, valid = kd_batch(seed=5)
    V = weight.shape[0]
    probs = torch.softmax(teacher.detach(), dim=-1)
    ids = torch.arange(V).expand_as(probs)
    mask = torch.ones_like(ids, dtype=torch.bool)
    exact = dense_kd_loss(hidden @ weight.T, teacher.detach(), valid)
    assert_same(lean_sparse_kd_loss(hidden, weight, ids, probs, mask, valid), exact, (hidden, weight))


def test_sparse_kd_renormalises_candidate_probabilities():
    hidden, weight, teacher, valid = kd_batch(seed=6)
    ids, probs, mask = sparse_cache(teacher, k=3)
    base = lean_sparse_kd_loss(hidden, weight, ids, probs, mask, valid)
    torch.testing.assert_close(lean_sparse_kd_loss(hidden, weight, ids, probs * 3.7, mask, valid), base)


def test_kd_user_errors():
    hidden, weight, teacher, valid = kd_batch()
    none = torch.zeros_like(valid)
    with pytest.raises(ValueError, match="no valid"):
        dense_kd_loss(hidden @ weight.T, teacher, none)
    ids, probs, mask = sparse_cache(teacher, k=3)
    with pytest.raises(ValueError, match="no valid"):
        lean_sparse_kd_loss(hidden, weight, ids, probs, mask, none)
    empty = mask.clone()
    empty[0, 0] = False
    with pytest.raises(ValueError, match="no candidate"):
        lean_sparse_kd_loss(hidden, weight, ids, probs, empty, valid)
    with pytest.raises(ValueError, match="negative"):
        sparse_kd_loss_dense(hidden @ weight.T, ids, -probs, mask, valid)


def test_mixed_kd_loss():
    ce, kd = torch.tensor(2.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    assert float(mixed_kd_loss(ce, kd, 0.5).detach()) == pytest.approx(3.5)
    assert float(mixed_kd_loss(ce, kd, 0.25).detach()) == pytest.approx(0.75 * 2 + 0.25 * 5)
    assert mixed_kd_loss(ce, kd, 0.0) is ce
    assert mixed_kd_loss(ce, kd, 1.0) is kd
    # A term with weight 0 is not evaluated into the result, so a NaN there cannot leak.
    assert not math.isnan(float(mixed_kd_loss(ce, torch.tensor(float("nan")), 0.0).detach()))
    ce_grad, kd_grad = torch.autograd.grad(mixed_kd_loss(ce, kd, 0.3), (ce, kd))
    assert (float(ce_grad), float(kd_grad)) == pytest.approx((0.7, 0.3))
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="kd_ratio"):
            mixed_kd_loss(ce, kd, bad)


def test_exact_kd_and_teacher_probabilities_equal_dense_kd():
    from bdctl.objectives.kd import exact_kd_loss, teacher_probabilities

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(9, 8, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(37, 8, generator=g, dtype=torch.float64).requires_grad_()
    teacher_rows, teacher_weight = (
        torch.randn(9, 5, generator=g, dtype=torch.float64),
        torch.randn(37, 5, generator=g, dtype=torch.float64),
    )
    probs = teacher_probabilities(teacher_rows, teacher_weight, chunk_size=10)
    torch.testing.assert_close(probs, torch.softmax(teacher_rows @ teacher_weight.T, dim=-1))
    lean = exact_kd_loss(rows, weight, probs, chunk_size=10)
    dense = dense_kd_loss(
        (rows @ weight.T)[None], (teacher_rows @ teacher_weight.T)[None], torch.ones(1, 9, dtype=torch.bool)
    )
    assert lean.item() == pytest.approx(dense.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(lean, (rows, weight)), torch.autograd.grad(dense, (rows, weight)), strict=True):
        torch.testing.assert_close(a, b)
