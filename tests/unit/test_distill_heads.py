"""The distill stage's BD heads (bdctl.stages.distill) against plain references: which positions
BD scores (its N), the released variant's valid mask, outside: drop, and the anchor (beyond the
paper). The loss functions themselves are tested in test_bellman.py; here the stage's glue is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdctl.distill_data import Setup, batch_count, bd_scored, collate_examples, in_cached_set
from bdctl.objectives.bellman import dense_terms
from bdctl.recipe.schema import DistillStage
from bdctl.sampling import sample
from bdctl.stages.distill import anchor_loss, bd_terms
from bdctl.topp import Capture
from tests.unit.test_bellman import ref_released
from tests.unit.test_sampling import ARCHS, EOS, PAD, build_model, make_prompts

V = 12


def setup_for(**changes) -> Setup:
    base = dict(method="bd", variant="paper", kd_ratio=0.0, sets="cache", kd_teacher=None, pretrain=False,
                pt_kd=False, init="student_sft")  # fmt: skip
    return Setup(**{**base, **changes})


def random_capture(length: int, rng: np.random.Generator, width: int = 4) -> Capture:
    kept = rng.integers(1, width + 1, size=length).astype(np.int32)
    ids = np.concatenate([rng.choice(np.arange(3, V), size=k, replace=False) for k in kept]).astype(np.int32)
    probs = rng.random(ids.shape[0]).astype(np.float32)
    return Capture(ids=ids, probs=probs, kept=kept, covered=np.ones(length, dtype=np.float32))


def make_examples(seed: int = 0):
    """Three responses: EOS-terminated (6 tokens), truncated (4), EOS-terminated (3); actions
    drawn half from their set, half anywhere."""
    rng = np.random.default_rng(seed)
    examples = []
    for length, ends in ((6, True), (4, False), (3, True)):
        capture = random_capture(length, rng)
        offsets = capture.offsets()
        tokens = []
        for t in range(length):
            members = capture.ids[offsets[t] : offsets[t + 1]]
            tokens.append(int(rng.choice(members)) if rng.random() < 0.5 else int(rng.integers(3, V)))
        if ends:
            tokens[-1] = EOS
        prompt = [int(x) for x in rng.integers(3, V, size=int(rng.integers(2, 5)))]
        examples.append((prompt, np.asarray(tokens, dtype=np.int64), capture))
    return examples


def frame_inputs(examples, seed: int = 1):
    batch = collate_examples(examples, PAD, EOS, with_sets=True)
    gen = torch.Generator().manual_seed(seed)
    width = batch["input_ids"].shape[1]
    hidden = torch.randn(len(examples), width, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    return batch, hidden, weight


def frame_logits(batch, hidden, weight):
    positions = batch["positions"]
    h = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return h @ weight.T


def dense_mask(batch) -> torch.Tensor:
    mask = torch.zeros(*batch["valid"].shape, V, dtype=torch.bool)
    for b, t, k in zip(*torch.nonzero(batch["cand_mask"], as_tuple=True), strict=True):
        mask[b, t, batch["cand_ids"][b, t, k]] = True
    return mask


def test_released_variant_never_scores_the_eos_position():
    """docs/method.md §4, last paragraph: the release's valid mask is token != pad with pad = EOS,
    so the EOS position is not valid and the token before it is the response's last valid one."""
    batch, hidden, weight = frame_inputs(make_examples())
    config = DistillStage(variant="released", p=0.8, chi2=True)
    got = bd_terms(hidden, weight, batch, config)
    release_valid = batch["valid"] & (batch["actions"] != EOS)
    assert bool((batch["valid"] & ~release_valid).any())  # two EOS positions are taken out
    hp = dict(gamma=config.gamma, alpha=config.alpha, q_min=config.q_min, chi2=True, top_p=0.8, eps=config.eps)
    expected = ref_released(frame_logits(batch, hidden, weight), dense_mask(batch), release_valid, **hp)
    torch.testing.assert_close(got.loss, expected, atol=1e-9, rtol=1e-9)
    for g, w in zip(torch.autograd.grad(got.loss, (hidden, weight), retain_graph=True),
                    torch.autograd.grad(expected, (hidden, weight)), strict=True):  # fmt: skip
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    # N: the release's valid starts t < T; batch_count (the loop's unit) agrees with the loss
    assert got.num_transitions == int(release_valid[:, :-1].sum()) == batch_count(batch, setup_for(variant="released"))
    # and the dense released path (p = 1 in the stage) builds the same mask
    dense = bd_terms(hidden, weight, batch, config, dense=True)
    torch.testing.assert_close(dense.loss, got.loss, atol=1e-9, rtol=1e-9)


def test_scored_positions_and_count_follow_outside():
    batch, _, _ = frame_inputs(make_examples(2))
    inside = in_cached_set(batch)
    kept = bd_scored(batch, setup_for())
    dropped = bd_scored(batch, setup_for(outside="drop"))
    assert bool((kept & ~inside).any())
    assert torch.equal(dropped, kept & inside)
    assert batch_count(batch, setup_for(outside="drop")) == int((kept & inside).sum()) < batch_count(batch, setup_for())


@pytest.mark.parametrize("outside", ["q_min", "drop"])
def test_anchor_is_the_cross_entropy_of_the_scored_actions(outside):
    """BEYOND THE PAPER: anchor = mean over BD's scored positions of -log softmax(z_t)(a_t)."""
    batch, hidden, weight = frame_inputs(make_examples(3))
    scored = bd_scored(batch, setup_for(outside=outside))
    got = anchor_loss(hidden, weight, batch, scored)
    logits = frame_logits(batch, hidden, weight)
    terms = []
    for b, t in zip(*torch.nonzero(scored, as_tuple=True), strict=True):
        terms.append(-torch.log_softmax(logits[b, t], dim=-1)[batch["actions"][b, t]])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    g_got = torch.autograd.grad(got, (hidden, weight))
    g_exp = torch.autograd.grad(expected, (hidden, weight))
    for g, w in zip(g_got, g_exp, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    # the same N as the BD term, so BD + coef x anchor is one token mean
    config = DistillStage(outside=outside)
    assert bd_terms(hidden, weight, batch, config).num_transitions == int(scored.sum())


def test_stage_paper_head_equals_dense_terms_with_outside():
    batch, hidden, weight = frame_inputs(make_examples(4))
    config = DistillStage(outside="drop")
    lean = bd_terms(hidden, weight, batch, config)
    dense = dense_terms(frame_logits(batch, hidden, weight), dense_mask(batch), batch["actions"], batch["valid"],
                        batch["terminal"], outside="drop")  # fmt: skip
    torch.testing.assert_close(lean.loss, dense.loss, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("peak", [20.0, 1.0], ids=["trained-like", "barely-trained"])
def test_nucleus_dstar_has_no_outside_action_on_every_architecture(arch, peak):
    """D* sampled with generate.top_p == cache_top_p (issue 11, docs/method.md §3.4): the logged
    outside_share of BD on it is exactly 0, including a barely trained teacher whose capped sets
    do not reach p."""
    from bdctl.objectives.bellman_lean import lean_terms

    teacher = build_model(arch, peak=peak)
    prompts = make_prompts([4, 7, 5, 6], seed=5)
    results = sample(teacher, prompts, [11, 12, 13, 14], eos_id=EOS, pad_id=PAD, max_new_tokens=10,
                     set_top_p=0.8, capture_top_p=0.8, capture_max_k=6)  # fmt: skip
    if peak == 1.0:
        assert any(float(c) < 0.8 for r in results for c in r.capture.covered)  # the cap bit
    examples = [(p, np.asarray(r.tokens, dtype=np.int64), r.capture) for p, r in zip(prompts, results, strict=True)]
    batch = collate_examples(examples, PAD, EOS, with_sets=True)
    assert bool(in_cached_set(batch)[batch["valid"]].all())
    hidden = torch.randn(len(examples), batch["positions"].shape[1], 8, dtype=torch.float64)
    weight = torch.randn(teacher.config.vocab_size, 8, dtype=torch.float64)
    terms = lean_terms(hidden, weight, batch["cand_ids"], batch["cand_mask"], batch["actions"], batch["valid"],
                       batch["terminal"])  # fmt: skip
    assert float(terms.outside_share) == 0.0
