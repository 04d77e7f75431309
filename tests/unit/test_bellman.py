"""Bellman Distill loss against plain loop references written from docs/method.md §3-3.

The references below loop over batch, time and vocabulary and compute every term as the
spec writes it; they share no code with `bdctl.objectives.bellman`. The lean path is then
checked against the dense one on the real hidden states and output embeddings of tiny
randomly initialised GPT-2, OPT and Qwen2 causal LMs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bdctl.objectives.bellman import dense_loss, dense_terms
from bdctl.objectives.bellman_lean import lean_loss, lean_terms

# ----------------------------------------------------------------------------- helpers


def top_p_mask(teacher_logits: torch.Tensor, p: float) -> torch.Tensor:
    """docs/method.md §2: shortest prefix of the sorted teacher distribution reaching p.

    The token that crosses p is kept and at least one token always is; p = 1 keeps all.
    """
    if p >= 1.0:
        return torch.ones_like(teacher_logits, dtype=torch.bool)
    probs = torch.softmax(teacher_logits.double(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sparse_from_mask(mask: torch.Tensor, teacher_logits: torch.Tensor, seed: int = 0):
    """The same sets as ``[B, T, K]`` ids sorted by teacher probability, padded with junk ids."""
    gen = torch.Generator().manual_seed(seed)
    vocab = mask.shape[-1]
    k = int(mask.sum(-1).max())
    order = torch.where(mask, teacher_logits, float("-inf")).argsort(dim=-1, descending=True)
    ids = order[..., :k].clone()
    cand_mask = torch.arange(k) < mask.sum(-1, keepdim=True)
    junk = torch.randint(0, vocab, ids.shape, generator=gen)
    return torch.where(cand_mask, ids, junk), cand_mask


def make_batch(seed: int, *, B=3, T=6, V=9, p=0.8, scale=3.0, dtype=torch.float64):
    """Random logits, top-p sets and a response batch with every kind of sequence end.

    Row 0 ends with EOS at the last position (terminal), row 1 is truncated (two padding
    positions, last token not EOS), row 2 is a 3-token response ending with EOS.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen, dtype=dtype) * scale).requires_grad_()
    teacher = torch.randn(B, T, V, generator=gen) * 2.0
    mask = top_p_mask(teacher, p)
    lengths = torch.tensor([T, T - 2, 3][:B])
    valid = torch.arange(T)[None, :] < lengths[:, None]
    terminal = torch.zeros(B, T, dtype=torch.bool)
    terminal[0, T - 1] = True
    if B > 2:
        terminal[2, 2] = True
    # Half the actions are drawn from the set, half uniformly (often outside it).
    in_set_choice = torch.where(mask, torch.rand(B, T, V, generator=gen), -1.0).argmax(-1)
    uniform = torch.randint(0, V, (B, T), generator=gen)
    actions = torch.where(torch.rand(B, T, generator=gen) < 0.5, in_set_choice, uniform)
    actions = torch.where(valid, actions, -100)  # padding carries an invalid id on purpose
    return logits, mask, actions, valid, terminal, teacher


def ref_paper(logits, mask, actions, valid, terminal, *, gamma, alpha, q_min, chi2, outside="q_min"):
    """docs/method.md §3, one state at a time; outside="drop" (section 2.2) skips a transition
    whose action is outside its set, as a truncated last transition is skipped. The share of
    outside actions is counted before that."""
    B, T, V = logits.shape

    def q_values(b, t):
        z = logits[b, t]
        top = z.max()
        return [torch.clamp(z[a] - top, min=q_min) for a in range(V)]

    def value(b, t):
        q = q_values(b, t)
        return torch.log(sum(torch.exp(q[a]) for a in range(V) if mask[b, t, a]))

    outside_rule = outside
    phis, vterms, rewards, values, outside, sizes, q_means = [], [], [], [], [], [], []
    for b in range(B):
        for t in range(T):
            if not valid[b, t]:
                continue
            is_terminal = bool(terminal[b, t])
            has_next = t + 1 < T and bool(valid[b, t + 1])
            if not (is_terminal or has_next):
                continue  # last transition of a truncated response
            q = q_values(b, t)
            a = int(actions[b, t])
            outside.append(0.0 if mask[b, t, a] else 1.0)
            if outside_rule == "drop" and not mask[b, t, a]:
                continue
            q_hat = q[a] if mask[b, t, a] else torch.tensor(q_min, dtype=logits.dtype)
            v_t = value(b, t)
            v_next = 0.0 if is_terminal else value(b, t + 1)
            r = q_hat - gamma * v_next
            phis.append(r - r * r / (4 * alpha) if chi2 else r)
            vterms.append(v_t - gamma * v_next)
            rewards.append(r)
            values.append(v_t)
            members = [a2 for a2 in range(V) if mask[b, t, a2]]
            sizes.append(len(members))
            q_means.append(sum(q[a2] for a2 in members) / len(members))
    n = len(phis)
    loss = -sum(phis) / n + sum(vterms) / n
    return {
        "loss": loss,
        "mean_r": float(sum(rewards).detach() / n),
        "mean_v": float(sum(values).detach() / n),
        "chi2": float(sum(r * r for r in rewards).detach() / n / (4 * alpha)),
        "outside_share": sum(outside) / len(outside),
        "mean_set_size": sum(sizes) / n,
        "mean_q_candidates": float(sum(q_means).detach() / n),
        "num_transitions": n,
    }


def ref_released(logits, mask, valid, *, gamma, alpha, q_min, chi2, top_p, eps):
    """docs/method.md §4, one state and one vocabulary entry at a time."""
    B, T, V = logits.shape

    def q_values(b, t):
        z = logits[b, t]
        top = z.max()
        return [torch.clamp(z[a] - top, min=q_min) for a in range(V)]

    def value(b, t):
        q = q_values(b, t)
        norm = sum(torch.exp(q[a]) for a in range(V))
        raw = [torch.exp(q[a]) / norm * float(mask[b, t, a]) / top_p + eps for a in range(V)]
        total = sum(raw)
        pit = [x / total for x in raw]
        return float(valid[b, t]) * sum(pit[a] * (q[a] - torch.log(pit[a])) for a in range(V))

    n = sum(int(valid[b, t]) for b in range(B) for t in range(T - 1))
    reward_sum, value_sum, square_sum = 0.0, 0.0, 0.0
    for b in range(B):
        for t in range(T - 1):
            q = q_values(b, t)
            v_t = value(b, t)
            vn = value(b, t + 1) * float(valid[b, t + 1])
            d = [float(mask[b, t, a]) * q[a] * float(valid[b, t]) - gamma * vn for a in range(V)]
            reward_sum = reward_sum + sum(d) / V
            square_sum = square_sum + sum(x * x for x in d) / V
            value_sum = value_sum + v_t * float(valid[b, t]) - gamma * vn
    loss = -reward_sum / n + value_sum / n
    if chi2:
        loss = loss + square_sum / n / (4 * alpha)
    return loss


def assert_same_loss_and_grad(actual, expected, wrt, atol=1e-9, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    got = torch.autograd.grad(actual, wrt, retain_graph=True)
    want = torch.autograd.grad(expected, wrt, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


# ------------------------------------------------------------------ dense vs loop references

CASES = {
    # name: (p, scale, q_min)  -- scale 3 with q_min -2 makes the clip bite often
    "top_p_0.8": (0.8, 3.0, -10.0),
    "clipped": (0.8, 3.0, -2.0),
    "full_vocab_p1": (1.0, 3.0, -10.0),
    "single_token_sets": (1e-3, 3.0, -10.0),
}


@pytest.mark.parametrize("chi2", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_paper_variant_matches_loop_reference(case, chi2):
    p, scale, q_min = CASES[case]
    logits, mask, actions, valid, terminal, _ = make_batch(1, p=p, scale=scale)
    if case == "single_token_sets":
        assert bool((mask.sum(-1) == 1).all())
    if case == "full_vocab_p1":
        assert bool(mask.all())
    if case == "clipped":
        z = logits.detach()
        assert bool((z - z.max(-1, keepdim=True).values < q_min).any())
    hp = dict(gamma=0.9, alpha=0.1, q_min=q_min, chi2=chi2)
    expected = ref_paper(logits, mask, actions, valid, terminal, **hp)
    terms = dense_terms(logits, mask, actions, valid, terminal, variant="paper", top_p=p, **hp)
    assert_same_loss_and_grad(terms.loss, expected["loss"], logits)
    got = terms.as_floats()
    for key in ("mean_r", "mean_v", "chi2", "outside_share", "mean_set_size", "mean_q_candidates", "num_transitions"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    # The plain function returns the same scalar.
    same = dense_loss(logits, mask, actions, valid, terminal, top_p=p, **hp)
    torch.testing.assert_close(same, terms.loss)


@pytest.mark.parametrize("chi2", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_released_variant_matches_loop_reference(case, chi2):
    p, scale, q_min = CASES[case]
    logits, mask, actions, valid, terminal, _ = make_batch(2, p=p, scale=scale)
    hp = dict(gamma=0.9, alpha=0.1, q_min=q_min, chi2=chi2)
    expected = ref_released(logits, mask, valid, top_p=p, eps=1e-3, **hp)
    got = dense_loss(logits, mask, actions, valid, terminal, variant="released", top_p=p, eps=1e-3, **hp)
    assert_same_loss_and_grad(got, expected, logits)


def test_released_variant_ignores_actions_and_terminal():
    logits, mask, actions, valid, terminal, _ = make_batch(3)
    base = dense_loss(logits, mask, actions, valid, terminal, variant="released")
    other = dense_loss(logits, mask, torch.zeros_like(actions), valid, ~terminal, variant="released")
    torch.testing.assert_close(base, other)
    paper = dense_loss(logits, mask, actions, valid, terminal)
    paper_other = dense_loss(logits, mask, torch.zeros_like(actions), valid, ~terminal & valid)
    assert not torch.allclose(paper, paper_other)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_gradient_flows_through_the_max_shift(variant):
    """Q depends on z only through z - max z, so each state's logit gradients sum to 0.

    With a stop-gradient on the shift this would fail (the sums would be -dL/dQ summed).
    """
    logits, mask, actions, valid, terminal, _ = make_batch(4)
    loss = dense_loss(logits, mask, actions, valid, terminal, variant=variant)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad.sum(-1), torch.zeros_like(grad.sum(-1)), atol=1e-12, rtol=0)


def test_value_of_next_state_is_differentiated():
    """V_{t+1} carries gradient: the state after a kept non-terminal transition gets one
    even though its own transition is dropped (last token of a truncated response)."""
    logits, mask, actions, valid, terminal, _ = make_batch(5)
    loss = dense_loss(logits, mask, actions, valid, terminal)
    (grad,) = torch.autograd.grad(loss, logits)
    last_truncated = 3  # row 1 has length T - 2 = 4, no EOS: position 3 is not kept
    assert grad[1, last_truncated].abs().sum() > 0
    assert grad[1, last_truncated + 1 :].abs().sum() == 0  # padding gets nothing
    assert grad[2, 3:].abs().sum() == 0


def test_truncated_last_transition_is_left_out():
    """Changing the action of a truncated response's last token changes nothing."""
    logits, mask, actions, valid, terminal, _ = make_batch(6)
    base = dense_loss(logits, mask, actions, valid, terminal)
    changed = actions.clone()
    changed[1, 3] = (changed[1, 3] + 1) % logits.shape[-1]
    torch.testing.assert_close(dense_loss(logits, mask, changed, valid, terminal), base)
    changed[1, 2] = (changed[1, 2] + 1) % logits.shape[-1]
    mask2 = mask.clone()
    mask2[1, 2] = True  # make sure the new action's Q differs from q_min
    assert not torch.allclose(
        dense_loss(logits, mask2, changed, valid, terminal), dense_loss(logits, mask2, actions, valid, terminal)
    )


def test_hand_computed_single_transition():
    """One terminal transition, V = 2 tokens: L = -phi(Q(a)) + V_1, V_{t+1} = 0."""
    logits = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[True, True]]])
    actions = torch.tensor([[1]])
    one = torch.tensor([[True]])
    q_a = -1.0
    v = math.log(1.0 + math.exp(-1.0))
    alpha = 0.1
    expected = -(q_a - q_a**2 / (4 * alpha)) + v
    got = dense_loss(logits, mask, actions, one, one, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-12)


# -------------------------------------------------------------------------------- user errors


def test_all_padding_batch_raises():
    logits, mask, actions, valid, terminal, _ = make_batch(7)
    none = torch.zeros_like(valid)
    for variant in ("paper", "released"):
        with pytest.raises(ValueError, match="no kept transition"):
            dense_loss(logits, mask, actions, none, terminal, variant=variant)
    with pytest.raises(ValueError, match="no kept transition"):
        hidden = torch.randn(3, 6, 4)
        lean_loss(hidden, torch.randn(9, 4), None, None, actions, none, terminal)


def test_only_truncated_one_token_responses_raise():
    logits, mask, actions, valid, terminal, _ = make_batch(8)
    single = torch.zeros_like(valid)
    single[:, 0] = True
    with pytest.raises(ValueError, match="no kept transition"):
        dense_loss(logits, mask, actions, single, torch.zeros_like(valid))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"alpha": 0.0},
        {"alpha": -1.0},
        {"variant": "paperish"},
        {"gamma": 1.5},
        {"q_min": float("nan")},
        {"variant": "released", "eps": 0.0},
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    logits, mask, actions, valid, terminal, _ = make_batch(9)
    with pytest.raises(ValueError):
        dense_loss(logits, mask, actions, valid, terminal, **kwargs)


def test_empty_candidate_set_and_bad_action_raise():
    logits, mask, actions, valid, terminal, teacher = make_batch(10)
    empty = mask.clone()
    empty[0, 1] = False
    with pytest.raises(ValueError, match="empty"):
        dense_loss(logits, empty, actions, valid, terminal)
    ids, cand_mask = sparse_from_mask(mask, teacher)
    cand_mask = cand_mask.clone()
    cand_mask[0, 1] = False
    with pytest.raises(ValueError, match="empty"):
        lean_loss(torch.randn(3, 6, 4), torch.randn(9, 4), ids, cand_mask, actions, valid, terminal)
    bad = actions.clone()
    bad[0, 0] = 99
    with pytest.raises(ValueError, match="out of range"):
        dense_loss(logits, mask, bad, valid, terminal)


@pytest.mark.parametrize("chi2", [True, False])
@pytest.mark.parametrize("case", ["top_p_0.8", "clipped", "single_token_sets"])
def test_outside_drop_matches_loop_reference_dense_and_lean(case, chi2):
    """docs/method.md §3.4: with outside="drop" an out-of-set transition leaves every term and N, on the
    dense and the lean path (values, diagnostics and gradients)."""
    p, scale, q_min = CASES[case]
    logits, mask, actions, valid, terminal, teacher = make_batch(3, p=p, scale=scale)
    hp = dict(gamma=0.9, alpha=0.1, q_min=q_min, chi2=chi2)
    expected = ref_paper(logits, mask, actions, valid, terminal, outside="drop", **hp)
    kept_default = ref_paper(logits, mask, actions, valid, terminal, **hp)
    assert 0 < expected["num_transitions"] < kept_default["num_transitions"]  # something was dropped
    terms = dense_terms(logits, mask, actions, valid, terminal, top_p=p, outside="drop", **hp)
    assert_same_loss_and_grad(terms.loss, expected["loss"], logits)
    got = terms.as_floats()
    for key in ("mean_r", "mean_v", "chi2", "outside_share", "mean_set_size", "mean_q_candidates", "num_transitions"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    assert got["outside_share"] == pytest.approx(kept_default["outside_share"])  # measured before dropping
    hidden = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    ids, cand_mask = sparse_from_mask(mask, teacher)
    lean = lean_terms(hidden, weight, ids, cand_mask, actions, valid, terminal, outside="drop", chunk_size=4, **hp)
    dense = dense_terms(hidden @ weight.T, mask, actions, valid, terminal, outside="drop", **hp)
    assert_same_loss_and_grad(lean.loss, dense.loss, (hidden, weight))
    assert lean.num_transitions == dense.num_transitions == expected["num_transitions"]


def test_outside_drop_equals_q_min_when_every_action_is_in_its_set():
    """D* sampled inside A_t (generate.top_p == cache_top_p) makes the two rules one loss."""
    logits, mask, actions, valid, terminal, teacher = make_batch(4, p=0.8)
    inside = torch.where(mask, teacher, float("-inf")).argmax(-1)
    actions = torch.where(valid, inside, -100)
    hp = dict(gamma=0.99, alpha=0.1, q_min=-10.0, chi2=True)
    one = dense_terms(logits, mask, actions, valid, terminal, outside="drop", **hp)
    two = dense_terms(logits, mask, actions, valid, terminal, outside="q_min", **hp)
    assert float(one.outside_share) == 0.0
    assert_same_loss_and_grad(one.loss, two.loss, logits)


def test_outside_drop_is_a_paper_variant_setting():
    logits, mask, actions, valid, terminal, _ = make_batch(5)
    with pytest.raises(ValueError, match="paper variant"):
        dense_loss(logits, mask, actions, valid, terminal, variant="released", outside="drop")
    with pytest.raises(ValueError, match="outside must be one of"):
        dense_loss(logits, mask, actions, valid, terminal, outside="ignore")


def test_lean_rejects_released_variant_and_duplicate_candidates():
    logits, mask, actions, valid, terminal, teacher = make_batch(11)
    ids, cand_mask = sparse_from_mask(mask, teacher)
    hidden, weight = torch.randn(3, 6, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match="released"):
        lean_loss(hidden, weight, ids, cand_mask, actions, valid, terminal, variant="released")
    dup_ids = torch.cat([ids, ids[..., :1]], dim=-1)
    dup_mask = torch.cat([cand_mask, cand_mask[..., :1]], dim=-1)
    with pytest.raises(ValueError, match="twice"):
        lean_loss(hidden, weight, dup_ids, dup_mask, actions, valid, terminal)


# ----------------------------------------------------------------------- lean path vs dense


def test_lean_matches_dense_with_bias_and_tiny_chunks():
    """Random projection with an output bias; chunk sizes that split rows and vocabulary."""
    torch.manual_seed(0)
    B, T, H, V = 3, 6, 5, 40
    logits0, mask, actions, valid, terminal, teacher = make_batch(12, V=V, p=0.6)
    hidden = (torch.randn(B, T, H, dtype=torch.float64) * 2).requires_grad_()
    weight = torch.randn(V, H, dtype=torch.float64).requires_grad_()
    bias = torch.randn(V, dtype=torch.float64).requires_grad_()
    ids, cand_mask = sparse_from_mask(mask, teacher)
    for q_min in (-10.0, -2.0):
        for chunk in (1, 7, 1000):
            dense = dense_terms(hidden @ weight.T + bias, mask, actions, valid, terminal, q_min=q_min)
            lean = lean_terms(
                hidden, weight, ids, cand_mask, actions, valid, terminal, bias=bias, q_min=q_min, chunk_size=chunk
            )
            assert_same_loss_and_grad(lean.loss, dense.loss, (hidden, weight, bias))
            for key, value in dense.as_floats().items():
                assert lean.as_floats()[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def _tiny_models() -> dict[str, torch.nn.Module]:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vocab = 1000
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return {
        "gpt2": GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, **special)
        ),
        "opt": OPTForCausalLM(
            OPTConfig(
                num_hidden_layers=2,
                hidden_size=32,
                ffn_dim=64,
                num_attention_heads=2,
                vocab_size=vocab,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
                **special,
            )
        ),
        "qwen2": Qwen2ForCausalLM(
            Qwen2Config(
                num_hidden_layers=2,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=vocab,
                max_position_embeddings=64,
                **special,
            )
        ),
    }


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


@pytest.fixture(scope="module")
def model_states(tiny_models):
    """Per (arch, dtype): the final hidden states and output embedding of a real forward."""
    states = {}
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 1000, (3, 10), generator=gen)
    for name, model in tiny_models.items():
        for dtype in (torch.float32, torch.float64):
            m = copy.deepcopy(model).to(dtype).eval()
            with torch.no_grad():
                out = m(input_ids=input_ids, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            head = m.get_output_embeddings()
            assert head.bias is None
            weight = head.weight
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            # The lean path is only meaningful if these really are the logits' factors.
            torch.testing.assert_close(hidden @ weight.T, out.logits, atol=tol, rtol=tol)
            states[name, dtype] = (hidden.detach(), weight.detach())
    return states


@pytest.mark.parametrize("q_min", [-10.0, -0.1])
@pytest.mark.parametrize("p", [0.8, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2"])
def test_lean_matches_dense_on_tiny_causal_lms(model_states, arch, dtype, p, q_min):
    hidden0, weight0 = model_states[arch, dtype]
    B, T, _ = hidden0.shape
    V = weight0.shape[0]
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(B, T, V, generator=gen) * 3.0
    mask = top_p_mask(teacher, p)
    lengths = torch.tensor([T, T - 3, 4])
    valid = torch.arange(T)[None, :] < lengths[:, None]
    terminal = torch.zeros(B, T, dtype=torch.bool)
    terminal[0, T - 1] = True  # row 0 ends with EOS, row 1 truncated, row 2 EOS at 3
    terminal[2, 3] = True
    in_set = torch.where(mask, torch.rand(B, T, V, generator=gen), -1.0).argmax(-1)
    actions = torch.where(torch.rand(B, T, generator=gen) < 0.6, in_set, torch.randint(0, V, (B, T), generator=gen))

    hidden = hidden0.clone().requires_grad_()
    weight = weight0.clone().requires_grad_()
    logits = hidden @ weight.T
    if q_min > -1.0:  # random-init logits are small: this q_min makes the clip bite
        shifted = logits.detach() - logits.detach().max(-1, keepdim=True).values
        assert bool((shifted < q_min).any())
    hp = dict(gamma=0.99, alpha=0.1, q_min=q_min, chi2=True)
    dense = dense_loss(logits, mask, actions, valid, terminal, top_p=p, **hp)
    if p < 1.0:
        ids, cand_mask = sparse_from_mask(mask, teacher)
        assert 1 < ids.shape[-1] < V
        lean = lean_loss(hidden, weight, ids, cand_mask, actions, valid, terminal, chunk_size=97, **hp)
    else:
        lean = lean_loss(hidden, weight, None, None, actions, valid, terminal, chunk_size=97, **hp)
    assert_same_loss_and_grad(lean, dense, (hidden, weight), atol=1e-5, rtol=1e-5)


def test_lean_path_never_saves_vocabulary_sized_tensors():
    """Autograd keeps nothing of size N x V: neither the logits nor the [N, |U|] block.

    One chunk covers the whole vocabulary here, so the candidate projection is a single
    ``[N, |U|]`` block with ``|U|`` close to ``V``: saving it (e.g. via ``gather``) would fail.
    """
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 8, 32, 8, 1000
    teacher = torch.randn(B, T, V, generator=gen) * 3.0
    mask = top_p_mask(teacher, 0.8)
    ids, cand_mask = sparse_from_mask(mask, teacher)
    assert int(mask.any(dim=(0, 1)).sum()) > V // 2
    valid = torch.ones(B, T, dtype=torch.bool)
    terminal = torch.zeros(B, T, dtype=torch.bool)
    actions = torch.randint(0, V, (B, T), generator=gen)
    hidden = torch.randn(B, T, H, generator=gen).requires_grad_()
    weight = torch.randn(V, H, generator=gen).requires_grad_()
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    for cand in ((ids, cand_mask), (None, None)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lean_loss(hidden, weight, *cand, actions, valid, terminal, chunk_size=4096)
        loss.backward()
        biggest = max(math.prod(shape) for shape in saved)
        assert biggest < B * T * V // 2, (sorted(saved, key=math.prod)[-3:], B * T * V)
    # Sanity check of the hook itself: the dense path does save [B, T, V] tensors.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_loss(hidden @ weight.T, mask, actions, valid, terminal)
    assert max(math.prod(shape) for shape in saved) >= B * T * V


def random_sets(batch, frame, vocab, width, generator):
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:width] for _ in range(batch * frame)]).view(
        batch, frame, width
    )
    sizes = torch.randint(1, width + 1, (batch, frame), generator=generator)
    return ids, torch.arange(width)[None, None, :] < sizes[..., None]


@pytest.mark.parametrize("chi2", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_released_lean_terms_equal_the_dense_released_loss(chi2, dtype):
    from bdctl.objectives.bellman import candidate_mask
    from bdctl.objectives.bellman_lean import released_lean_terms

    g = torch.Generator().manual_seed(0)
    batch, frame, width, vocab, slots = 3, 7, 8, 61, 6
    hidden = torch.randn(batch, frame, width, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, width, generator=g, dtype=dtype).requires_grad_()
    ids, mask = random_sets(batch, frame, vocab, slots, g)
    valid = torch.ones(batch, frame, dtype=torch.bool)
    valid[1, 4:] = False  # a shorter response (its last token: "terminal" whatever it is)
    valid[2, 1:] = False  # a one-token response
    actions = torch.randint(0, vocab, (batch, frame), generator=g)
    actions[0, :3] = ids[0, :3, 0]  # some actions inside A_t
    settings = dict(gamma=0.9, alpha=0.3, q_min=-2.5, chi2=chi2)
    lean = released_lean_terms(
        hidden, weight, ids, mask, actions, valid, top_p=0.7, eps=1e-3, chunk_size=16, **settings
    )
    dense = dense_terms(
        hidden @ weight.T, candidate_mask(ids, mask, (batch, frame), vocab), actions, valid, torch.zeros_like(valid),
        variant="released", top_p=0.7, eps=1e-3, **settings,
    )  # fmt: skip
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert lean.loss.item() == pytest.approx(dense.loss.item(), rel=tol, abs=tol)
    for a, b in zip(
        torch.autograd.grad(lean.loss, (hidden, weight)), torch.autograd.grad(dense.loss, (hidden, weight)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for key in ("mean_r", "mean_v", "mean_q_candidates", "chi2", "outside_share", "mean_set_size"):
        assert float(getattr(lean, key)) == pytest.approx(float(getattr(dense, key)), rel=tol, abs=tol), key
    assert lean.num_transitions == dense.num_transitions == int(valid[:, :-1].sum())


def test_set_mass_is_the_students_probability_on_the_set():
    """Diagnostic: mean over kept transitions of sum_{a in A_t} softmax(z_t)(a), on the dense and
    the lean path (paper variant) and for the released variant."""
    from bdctl.objectives.bellman_lean import released_lean_terms

    logits, mask, actions, valid, terminal, teacher = make_batch(21, V=9, p=0.6)
    kept = valid & (terminal | torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1))
    probs = torch.softmax(logits.detach(), dim=-1)
    expected = float((probs * mask).sum(-1)[kept].mean())
    assert float(dense_terms(logits, mask, actions, valid, terminal).set_mass) == pytest.approx(expected, rel=1e-12)
    hidden = torch.randn(3, 6, 5, dtype=torch.float64)
    weight = torch.randn(9, 5, dtype=torch.float64)
    ids, cand_mask = sparse_from_mask(mask, teacher)
    probs = torch.softmax(hidden @ weight.T, dim=-1)
    lean = lean_terms(hidden, weight, ids, cand_mask, actions, valid, terminal, chunk_size=4)
    assert float(lean.set_mass) == pytest.approx(float((probs * mask).sum(-1)[kept].mean()), rel=1e-10)
    assert float(lean_terms(hidden, weight, None, None, actions, valid, terminal).set_mass) == 1.0
    released = released_lean_terms(hidden, weight, ids, cand_mask, actions, valid, gamma=0.99, alpha=0.1, q_min=-10.0,
                                   chi2=True, top_p=0.6, eps=1e-6, chunk_size=4)  # fmt: skip
    starts = valid.clone()
    starts[:, -1] = False
    assert float(released.set_mass) == pytest.approx(float((probs * mask).sum(-1)[starts].mean()), rel=1e-10)


@pytest.mark.parametrize("chi2", [True, False])
def test_released_lean_and_dense_agree_at_a_mid_response_eos(chi2):
    """A scored response with EOS inside it: the release masks EOS as padding, so that position is invalid
    while the next one is valid (its next value is nonzero). The release (the loop reference) and the
    dense form add that position's chi^2 term (gamma Vn)^2; the lean form must too (values and gradients)."""
    from bdctl.objectives.bellman import candidate_mask
    from bdctl.objectives.bellman_lean import released_lean_terms

    g = torch.Generator().manual_seed(3)
    batch, frame, width, vocab, slots = 2, 6, 5, 13, 4
    hidden = torch.randn(batch, frame, width, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64).requires_grad_()
    ids, mask = random_sets(batch, frame, vocab, slots, g)
    valid = torch.ones(batch, frame, dtype=torch.bool)
    valid[0, 2] = False  # the mid-response EOS: invalid, followed by valid positions
    valid[1, 1] = valid[1, 4] = False  # two of them, the second just before the last token
    actions = torch.randint(0, vocab, (batch, frame), generator=g)
    settings = dict(gamma=0.9, alpha=0.3, q_min=-2.5, chi2=chi2, top_p=0.7, eps=1e-3)
    dense_mask = candidate_mask(ids, mask, (batch, frame), vocab)
    lean = released_lean_terms(hidden, weight, ids, mask, actions, valid, chunk_size=4, **settings)
    dense = dense_terms(hidden @ weight.T, dense_mask, actions, valid, torch.zeros_like(valid), variant="released",
                        **settings)  # fmt: skip
    reference = ref_released((hidden @ weight.T).detach(), dense_mask, valid, **settings)
    assert dense.loss.item() == pytest.approx(float(reference), rel=1e-10)
    assert lean.loss.item() == pytest.approx(dense.loss.item(), rel=1e-10)
    for a, b in zip(
        torch.autograd.grad(lean.loss, (hidden, weight)), torch.autograd.grad(dense.loss, (hidden, weight)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for key in ("mean_r", "mean_v", "chi2"):
        assert float(getattr(lean, key)) == pytest.approx(float(getattr(dense, key)), rel=1e-10, abs=1e-12), key
