"""MiniLLM's objectives (docs/method.md §6) against plain Python-loop references, float64.

Every reference below is written from the formulas of docs/method.md §6, one position (or one
vocabulary entry) at a time, without the vectorised code's helpers.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from bdctl.objectives.minillm import (
    advantages,
    discounted_returns,
    importance_weights,
    lean_log_probs,
    lean_reverse_kl,
    lean_teacher_kd,
    mixture_probs,
    policy_loss,
    rewards,
    token_scores,
    whiten,
)

F64 = torch.float64


def frame(B=3, T=7, lengths=(7, 4, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return gen, valid


# --------------------------------------------------------------------------- rollout


def test_mixture_is_exactly_one_minus_a_q_plus_a_p_on_a_tiny_vocabulary():
    q = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0], dtype=F64)
    p = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=F64)
    # logits whose softmax is q (a zero-probability entry gets -inf) and p
    zq, zp = torch.log(q) + 3.0, torch.log(p) - 1.0
    for a in (0.0, 0.2, 0.5, 0.9):
        got = mixture_probs(zq[None], zp[None], a)[0]
        want = [(1 - a) * q[v].item() + a * p[v].item() for v in range(5)]
        assert got.tolist() == pytest.approx(want, abs=1e-15)
        assert got.sum().item() == pytest.approx(1.0, abs=1e-15)
    # a = 0.2 by hand: (0.8 * 0.5 + 0.2 * 0, 0.8 * 0.25 + 0.2 * 0.1, ...)
    assert mixture_probs(zq[None], zp[None], 0.2)[0].tolist() == pytest.approx([0.4, 0.22, 0.14, 0.16, 0.08], abs=1e-15)


def test_token_scores_rewards_and_weights_match_loops():
    gen = torch.Generator().manual_seed(3)
    b, V, a = 6, 11, 0.2
    zs, zt = torch.randn(b, V, generator=gen, dtype=F64) * 2, torch.randn(b, V, generator=gen, dtype=F64) * 2
    tokens = torch.randint(0, V, (b,), generator=gen)
    scores = token_scores(zs, zt, tokens, a)
    for i in range(b):
        qs = [math.exp(zs[i, v].item()) for v in range(V)]
        ps = [math.exp(zt[i, v].item()) for v in range(V)]
        q, p = qs[tokens[i]] / sum(qs), ps[tokens[i]] / sum(ps)
        assert scores.log_q[i].item() == pytest.approx(math.log(q), rel=1e-12)
        assert scores.log_p[i].item() == pytest.approx(math.log(p), rel=1e-12)
        assert scores.log_mix[i].item() == pytest.approx(math.log((1 - a) * q + a * p), rel=1e-12)
    assert torch.equal(token_scores(zs, zt, tokens, 0.0).log_mix, token_scores(zs, zt, tokens, 0.0).log_q)

    gen, valid = frame()
    log_q = -torch.rand(valid.shape, generator=gen, dtype=F64) * 8
    log_p = -torch.rand(valid.shape, generator=gen, dtype=F64) * 80  # some rewards reach the clip
    log_mix = -torch.rand(valid.shape, generator=gen, dtype=F64) * 8
    r = rewards(log_p, log_q, valid, scale=0.5, clip=100.0)
    w = importance_weights(log_q, log_mix, valid)
    hit_clip = False
    for i in range(valid.shape[0]):
        for t in range(valid.shape[1]):
            if not valid[i, t]:
                assert r[i, t] == 0 and w[i, t] == 0
                continue
            raw = (log_p[i, t].item() - log_q[i, t].item()) / 0.5
            hit_clip |= raw < -100
            assert r[i, t].item() == pytest.approx(min(100.0, max(-100.0, raw)), rel=1e-12)
            assert w[i, t].item() == pytest.approx(
                math.exp(log_q[i, t].item()) / math.exp(log_mix[i, t].item()), rel=1e-12
            )
    assert hit_clip


# --------------------------------------------------------------------------- advantages


def returns_loop(r, valid, g, length_norm):
    out = torch.zeros_like(r)
    for i in range(r.shape[0]):
        n = int(valid[i].sum())
        for t in range(n):
            total = sum(g ** (u - t) * r[i, u].item() for u in range(t, n))
            out[i, t] = total / (n - t) if length_norm else total
    return out


def whiten_loop(x, valid):
    values = [x[i, t].item() for i in range(x.shape[0]) for t in range(x.shape[1]) if valid[i, t]]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if valid[i, t]:
                out[i, t] = (x[i, t] - mean) / math.sqrt(var + 1e-8)
    return out


@pytest.mark.parametrize("g", [0.95, 1.0, 0.0])
@pytest.mark.parametrize("length_norm", [True, False])
def test_discounted_returns_match_loop(g, length_norm):
    gen, valid = frame(T=9, lengths=(9, 5, 1))
    r = torch.where(valid, torch.randn(valid.shape, generator=gen, dtype=F64), 0.0)
    got = discounted_returns(r, valid, discount=g, length_norm=length_norm)
    torch.testing.assert_close(got, returns_loop(r, valid, g, length_norm), rtol=1e-12, atol=1e-12)


def test_whiten_and_advantages_match_loops():
    gen, valid = frame(T=9, lengths=(9, 5, 2))
    r = torch.where(valid, torch.randn(valid.shape, generator=gen, dtype=F64) * 3 + 1, 0.0)
    torch.testing.assert_close(whiten(r, valid), whiten_loop(r, valid), rtol=1e-12, atol=1e-12)
    adv = advantages(r, valid, discount=0.95, length_norm=True, whitened=True)
    torch.testing.assert_close(adv, whiten_loop(returns_loop(r, valid, 0.95, True), valid), rtol=1e-12, atol=1e-12)
    plain = advantages(r, valid, discount=0.95, length_norm=False, whitened=False)
    torch.testing.assert_close(plain, returns_loop(r, valid, 0.95, False), rtol=1e-12, atol=1e-12)


def test_whiten_over_ranks_equals_whiten_over_the_whole_minibatch():
    """Two 'ranks' (threads) each whiten their half with a summing reduce: the statistics are the
    whole minibatch's, as one process computing them on everything."""
    gen, valid = frame(B=4, T=6, lengths=(6, 3, 5, 1))
    x = torch.randn(valid.shape, generator=gen, dtype=F64)
    whole = whiten(x, valid)
    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce(rank):
        def reduce(tensor):
            slots[rank] = tensor
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before the next round overwrites the slots
            return total

        return reduce

    results = [None, None]

    def worker(rank):
        part = slice(2 * rank, 2 * rank + 2)
        results[rank] = whiten(x[part], valid[part], all_reduce(rank))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat(results), whole, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the policy term


def policy_loop(log_q, old, w, adv, valid, clip):
    total, count = 0.0, 0
    for i in range(valid.shape[0]):
        for t in range(valid.shape[1]):
            if valid[i, t]:
                rho = torch.exp(log_q[i, t] - old[i, t]) * w[i, t]
                total = total + torch.maximum(-adv[i, t] * rho, -adv[i, t] * rho.clamp(1 - clip, 1 + clip))
                count += 1
    return total / count


def test_policy_loss_value_and_gradient_match_loop():
    gen, valid = frame(T=8, lengths=(8, 6, 3))
    old = -torch.rand(valid.shape, generator=gen, dtype=F64) * 4
    # current log-probs near the old ones, some far enough for the clip to bite either way
    log_q = (old + torch.randn(valid.shape, generator=gen, dtype=F64) * 0.4).requires_grad_()
    w = torch.exp(torch.randn(valid.shape, generator=gen, dtype=F64) * 0.2)
    adv = torch.randn(valid.shape, generator=gen, dtype=F64)
    terms = policy_loss(log_q, old, w, adv, valid, clip=0.2)
    want = policy_loop(log_q, old, w, adv, valid, 0.2)
    assert terms.loss.item() == pytest.approx(want.item(), rel=1e-12)
    (got_grad,) = torch.autograd.grad(terms.loss, log_q)
    (want_grad,) = torch.autograd.grad(want, log_q)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    assert 0 < terms.clip_fraction.item() < 1  # both branches are exercised
    assert torch.all(got_grad[~valid] == 0)


def test_policy_loss_at_the_old_policy_is_minus_mean_weighted_advantage():
    """theta = theta_old: rho = w, and with w = 1 the loss is -mean A (0 after whitening)."""
    gen, valid = frame()
    old = -torch.rand(valid.shape, generator=gen, dtype=F64)
    adv = whiten(torch.randn(valid.shape, generator=gen, dtype=F64), valid)
    ones = torch.ones_like(old)
    terms = policy_loss(old.clone(), old, ones, adv, valid, clip=0.2)
    assert terms.loss.item() == pytest.approx(0.0, abs=1e-12)
    assert terms.mean_ratio.item() == pytest.approx(1.0) and terms.clip_fraction.item() == 0


# --------------------------------------------------------------------------- lean terms on real models


def _pair(arch):
    """A student and a wider teacher of one architecture, sharing a 1000-token vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, vocab_size=1000)

    def build(width):
        if arch == "gpt2":
            return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=2, n_positions=64, **special))
        if arch == "opt":
            return OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=width, ffn_dim=2 * width,
                                            num_attention_heads=2, max_position_embeddings=64,
                                            word_embed_proj_dim=width, **special))  # fmt: skip
        return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=1, hidden_size=width, intermediate_size=2 * width,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=64, **special))  # fmt: skip

    torch.manual_seed(0)
    return build(16).double().eval(), build(32).double().eval()


@pytest.fixture(scope="module", params=["gpt2", "opt", "qwen2"])
def states(request):
    """Final hidden states and output embeddings of a real forward of each model, and the
    positions scored (the valid ones of a ragged batch), per architecture."""
    student, teacher = _pair(request.param)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (3, 9), generator=gen)
    valid = torch.arange(9)[None, :] < torch.tensor([9, 5, 2])[:, None]
    out = {}
    for name, model in (("student", student), ("teacher", teacher)):
        with torch.no_grad():
            result = model(input_ids=ids, output_hidden_states=True)
        hidden, weight = result.hidden_states[-1], model.get_output_embeddings().weight.detach()
        torch.testing.assert_close(hidden @ weight.T, result.logits, rtol=1e-12, atol=1e-12)
        out[name] = (hidden[valid].detach(), weight)
    return out


def reverse_kl_loop(zs, zt):
    """mean_n sum_v q(v) (log q(v) - log p(v)), one row at a time."""
    total = 0.0
    for n in range(zs.shape[0]):
        log_q, log_p = zs[n] - torch.logsumexp(zs[n], 0), zt[n] - torch.logsumexp(zt[n], 0)
        total = total + sum(torch.exp(log_q[v]) * (log_q[v] - log_p[v]) for v in range(0, zs.shape[1]))
    return total / zs.shape[0]


def teacher_kd_loop(zs, zt):
    """mean_n -sum_v p(v) log q(v), one row at a time."""
    total = 0.0
    for n in range(zs.shape[0]):
        log_q, p = zs[n] - torch.logsumexp(zs[n], 0), torch.softmax(zt[n], 0)
        total = total - sum(p[v] * log_q[v] for v in range(0, zs.shape[1]))
    return total / zs.shape[0]


@pytest.mark.parametrize("chunk", [97, 1000, 4096])
@pytest.mark.parametrize(
    "lean, loop",
    [(lean_reverse_kl, reverse_kl_loop), (lean_teacher_kd, teacher_kd_loop)],
    ids=["reverse_kl", "teacher_kd"],
)
def test_two_model_terms_match_loops_on_all_architectures(states, lean, loop, chunk):
    hs0, ws0 = states["student"]
    ht, wt = states["teacher"]
    rows = slice(0, 6)  # the loop reference is slow: a few rows of the 16 suffice
    hs, ws = hs0[rows].clone().requires_grad_(), ws0.clone().requires_grad_()
    got = lean(hs, ws, ht[rows], wt, chunk_size=chunk)
    want = loop(hs @ ws.T, ht[rows] @ wt.T)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    grads_got = torch.autograd.grad(got, (hs, ws))
    grads_want = torch.autograd.grad(want, (hs, ws))
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_two_model_terms_against_dense_forms_on_all_rows(states):
    """All valid rows, against the vectorised dense formulas (quicker than the loop)."""
    hs0, ws0 = states["student"]
    ht, wt = states["teacher"]
    hs, ws = hs0.clone().requires_grad_(), ws0.clone().requires_grad_()
    log_q = torch.log_softmax(hs @ ws.T, -1)
    log_p = torch.log_softmax(ht @ wt.T, -1)
    dense = {
        lean_reverse_kl: (log_q.exp() * (log_q - log_p)).sum(-1).mean(),
        lean_teacher_kd: -(log_p.exp() * log_q).sum(-1).mean(),
    }
    for lean, want in dense.items():
        got = lean(hs, ws, ht, wt, chunk_size=300)
        assert got.item() == pytest.approx(want.item(), rel=1e-10)
        for g, w in zip(
            torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(want, (hs, ws), retain_graph=True), strict=True
        ):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_reverse_kl_is_zero_for_the_teacher_itself_and_never_saves_vocabulary_sized_tensors(states):
    hs0, ws0 = states["student"]
    assert lean_reverse_kl(hs0, ws0, hs0, ws0).item() == pytest.approx(0.0, abs=1e-12)
    hs, ws = hs0.clone().requires_grad_(), ws0.clone().requires_grad_()
    ht, wt = states["teacher"]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        lean_reverse_kl(hs, ws, ht, wt, chunk_size=128)
    # the inputs and [N] vectors only: no [N, V] (or [N, chunk]) block survives the forward
    assert saved and set(saved) <= {hs.shape, ws.shape, ht.shape, wt.shape, torch.Size([hs.shape[0]])}, saved


def test_lean_log_probs_on_all_architectures(states):
    hs0, ws0 = states["student"]
    hs, ws = hs0.clone().requires_grad_(), ws0.clone().requires_grad_()
    tokens = torch.arange(hs.shape[0]) * 37 % 1000
    got = lean_log_probs(hs, ws, tokens, chunk_size=128)
    want = torch.log_softmax(hs @ ws.T, -1)[torch.arange(hs.shape[0]), tokens]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got.sum(), (hs, ws)), torch.autograd.grad(want.sum(), (hs, ws)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_whole_loss_matches_a_loop_reference_on_full_logits():
    """L_pg + L_single from token log-probs and full logits, each written per position."""
    gen, valid = frame(T=6, lengths=(6, 4, 2))
    B, T, V = valid.shape[0], valid.shape[1], 13
    zs = torch.randn(B, T, V, generator=gen, dtype=F64).requires_grad_()
    zt = torch.randn(B, T, V, generator=gen, dtype=F64)
    actions = torch.randint(0, V, (B, T), generator=gen)
    old = torch.log_softmax(zs.detach() + 0.3 * torch.randn(B, T, V, generator=gen, dtype=F64), -1).gather(
        -1, actions[..., None]
    )[..., 0]
    w = torch.exp(torch.randn(B, T, generator=gen, dtype=F64) * 0.1)
    r = rewards(torch.log_softmax(zt, -1).gather(-1, actions[..., None])[..., 0], old, valid, scale=0.5, clip=100.0)
    adv = advantages(r, valid, discount=0.95, length_norm=True, whitened=True)
    log_q = torch.log_softmax(zs, -1).gather(-1, actions[..., None])[..., 0]
    flat_s, flat_t = zs[valid], zt[valid]
    total = policy_loss(log_q, old, w, adv, valid, clip=0.2).loss + lean_reverse_kl(
        flat_s, torch.eye(V, dtype=F64), flat_t, torch.eye(V, dtype=F64), chunk_size=5
    )  # identity "embeddings": the rows are the logits themselves

    ref_adv = whiten_loop(returns_loop(r, valid, 0.95, True), valid)
    reference = policy_loop(log_q, old, w, ref_adv, valid, 0.2) + reverse_kl_loop(flat_s, flat_t)
    assert total.item() == pytest.approx(reference.item(), rel=1e-12)
    (got,) = torch.autograd.grad(total, zs, retain_graph=True)  # the two share log_q's graph
    torch.testing.assert_close(got, torch.autograd.grad(reference, zs)[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- malformed input


def test_malformed_tensors_raise_value_error():
    valid = torch.ones(2, 3, dtype=torch.bool)
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="mix weight"):
        mixture_probs(torch.zeros(1, 4), torch.zeros(1, 4), 1.0)
    with pytest.raises(ValueError, match="differ"):
        mixture_probs(torch.zeros(1, 4), torch.zeros(1, 5), 0.2)
    with pytest.raises(ValueError, match="tokens"):
        token_scores(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), 0.2)
    with pytest.raises(ValueError, match="like valid"):
        rewards(x, torch.zeros(2, 4, dtype=F64), valid, scale=0.5, clip=100)
    with pytest.raises(ValueError, match="bool"):
        discounted_returns(x, valid.long(), discount=0.95, length_norm=True)
    with pytest.raises(ValueError, match="no valid position"):
        whiten(x, torch.zeros_like(valid))
    with pytest.raises(ValueError, match="PPO clip"):
        policy_loss(x, x, x, x, valid, clip=1.5)
    with pytest.raises(ValueError, match="same rows"):
        lean_reverse_kl(torch.zeros(3, 4), torch.zeros(10, 4), torch.zeros(2, 8), torch.zeros(10, 8))
    with pytest.raises(ValueError, match="same vocabulary"):
        lean_teacher_kd(torch.zeros(3, 4), torch.zeros(10, 4), torch.zeros(3, 8), torch.zeros(11, 8))
