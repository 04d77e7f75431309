"""Batched sampling and the teacher's top-p capture (bdctl.sampling).

The models are tiny, randomly initialised GPT-2, OPT and Qwen2 networks built from configs. Their
output embedding is scaled up so the next-token distributions are peaked like a trained model's
(top-p sets of a handful of tokens at p = 0.8) rather than nearly uniform.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdctl.errors import UserError
from bdctl.sampling import FINISH_EOS, FINISH_LENGTH, length_grouped_batches, sample, score
from bdctl.topp import top_p_set

VOCAB = 300
EOS = 1
PAD = 2
P = 0.8
K = 64
ARCHS = ("gpt2", "opt", "qwen2")


def build_model(arch: str, *, peak: float = 20.0, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 64-wide model with an output embedding scaled by `peak`, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, **common)
        model = GPT2LMHeadModel(config)
    elif arch == "opt":
        config = OPTConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, ffn_dim=128, word_embed_proj_dim=64,
            max_position_embeddings=128, **common,
        )  # fmt: skip
        model = OPTForCausalLM(config)
    else:
        config = Qwen2Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
            max_position_embeddings=128, **common,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(peak)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine cannot stall a thread team."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=ARCHS)
def model(request) -> torch.nn.Module:
    return build_model(request.param)


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    return build_model("gpt2")


def make_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


PROMPTS = make_prompts([3, 9, 5, 1, 12, 7])


def reference_probs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """float32 ``[T, V]`` teacher probabilities from a fresh forward over prompt + response (no KV cache)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    return torch.softmax(logits[len(prompt) - 1 : len(prompt) + len(response) - 1].float(), dim=-1)


def assert_capture_matches(capture, probs: torch.Tensor, p: float = P, max_k: int = K, eps: float = 1e-5) -> int:
    """The captured sets are the top-p sets of ``probs [T, V]``; returns how many were ambiguous.

    Every set must equal the reference set exactly (ids in order, size), with probabilities
    within float tolerance. The one allowance is for float noise between two forward passes at
    a position where the reference itself is ambiguous to within ``eps`` (the cumulative mass
    within ``eps`` of p, or two tokens within ``eps`` across a boundary): there the captured set
    must still be a valid top-p set of ``probs`` to within ``eps``.
    """
    ref = top_p_set(probs, p, max_k)
    assert len(capture) == probs.shape[0]
    assert capture.ids.dtype == np.int32 and capture.probs.dtype == np.float32
    offsets = capture.offsets()
    ambiguous = 0
    for t in range(len(capture)):
        ids = capture.ids[offsets[t] : offsets[t + 1]]
        got = capture.probs[offsets[t] : offsets[t + 1]]
        q = probs[t].double().numpy()
        np.testing.assert_allclose(got, q[ids], rtol=1e-4, atol=1e-6, err_msg=f"position {t}")
        assert abs(float(capture.covered[t]) - q[ids].sum()) < 1e-5, f"position {t}"
        k = int(ref.kept[t])
        if len(ids) == k and (ids == ref.ids[t, :k].numpy()).all():
            continue
        ambiguous += 1
        members = q[ids]
        assert len(ids) <= max_k and len(set(ids.tolist())) == len(ids), f"position {t}"
        assert (members[:-1] >= members[1:] - eps).all(), f"position {t}: not by decreasing probability"
        outside = np.delete(q, ids)
        assert outside.size == 0 or outside.max() <= members.min() + eps, f"position {t}: not the top tokens"
        assert members[:-1].sum() < p + eps, f"position {t}: longer than needed"
        assert members.sum() >= p - eps or len(ids) == max_k, f"position {t}: does not reach p"
    return ambiguous


# --------------------------------------------------------------------------- the capture


def test_capture_equals_fresh_forward(model):
    """At every generated position, the captured set is the top-p set of a fresh forward."""
    samples = sample(
        model, PROMPTS, list(range(len(PROMPTS))), eos_id=None, pad_id=PAD, max_new_tokens=24,
        capture_top_p=P, capture_max_k=K,
    )  # fmt: skip
    sizes, ambiguous = [], 0
    for prompt, result in zip(PROMPTS, samples, strict=True):
        assert len(result.tokens) == 24
        ambiguous += assert_capture_matches(result.capture, reference_probs(model, prompt, result.tokens))
        sizes.extend(result.capture.kept.tolist())
    assert ambiguous <= 2  # float-noise boundary cases are rare: nearly every set matches exactly
    # The rigged models are peaked but not degenerate: sets of one and of several tokens occur.
    assert min(sizes) == 1 and max(sizes) > 3


def test_narrowed_capture_is_the_smaller_p_capture(model):
    """Distill with p below the cache's: the cached sets cut to top-p equal a capture made at that p."""
    kwargs = dict(eos_id=None, pad_id=PAD, max_new_tokens=16, capture_max_k=K)
    seeds = list(range(len(PROMPTS)))
    wide = sample(model, PROMPTS, seeds, capture_top_p=P, **kwargs)
    narrow = sample(model, PROMPTS, seeds, capture_top_p=0.5, **kwargs)
    for a, b in zip(wide, narrow, strict=True):
        assert a.tokens == b.tokens  # the capture does not change what is sampled
        cut = a.capture.narrowed(0.5)
        np.testing.assert_array_equal(cut.kept, b.capture.kept)
        np.testing.assert_array_equal(cut.ids, b.capture.ids)
        np.testing.assert_allclose(cut.covered, b.capture.covered, rtol=1e-6)
        assert (cut.kept <= a.capture.kept).all() and (cut.kept < a.capture.kept).any()
        head = a.capture.head(5)
        assert len(head) == 5 and head.ids.tolist() == a.capture.ids[: a.capture.kept[:5].sum()].tolist()


def test_capture_ignores_sampling_filters(gpt2):
    """The capture is the raw temperature-1 distribution, whatever the sampling options."""
    samples = sample(
        gpt2, PROMPTS[:3], [5, 6, 7], eos_id=None, pad_id=PAD, max_new_tokens=12, temperature=0.5, top_k=4,
        top_p=0.9, no_repeat_ngram_size=2, capture_top_p=P, capture_max_k=K,
    )  # fmt: skip
    for prompt, result in zip(PROMPTS[:3], samples, strict=True):
        assert assert_capture_matches(result.capture, reference_probs(gpt2, prompt, result.tokens)) <= 1


def test_score_equals_capture(model):
    """Scoring existing responses (batched, right-padded) writes the same sets as the capture."""
    samples = sample(
        model, PROMPTS, [11, 12, 13, 14, 15, 16], eos_id=None, pad_id=PAD, max_new_tokens=10,
        capture_top_p=P, capture_max_k=K,
    )  # fmt: skip
    scored = score(model, PROMPTS, [s.tokens for s in samples], pad_id=PAD, top_p=P, max_k=K, batch_size=4)
    ambiguous = 0
    for prompt, result, capture in zip(PROMPTS, samples, scored, strict=True):
        probs = reference_probs(model, prompt, result.tokens)
        ambiguous += assert_capture_matches(capture, probs) + assert_capture_matches(result.capture, probs)
    assert ambiguous <= 2


def test_capture_p_one_is_capped_at_k(gpt2):
    samples = sample(
        gpt2, PROMPTS[:2], [1, 2], eos_id=None, pad_id=PAD, max_new_tokens=5, capture_top_p=1.0, capture_max_k=16
    )
    for result in samples:
        assert (result.capture.kept == 16).all()
        assert (result.capture.covered < 1.0).all()


# --------------------------------------------------------------------------- top_p_set


def brute_force_top_p(row: list[float], p: float, max_k: int) -> tuple[list[int], float]:
    order = sorted(range(len(row)), key=lambda v: (-row[v], v))
    kept: list[int] = []
    mass = 0.0
    for v in order:
        if len(kept) == max_k or (kept and (p < 1.0 and mass >= p)):
            break
        kept.append(v)
        mass += row[v]
    return kept, mass


def test_top_p_set_single_token_above_p():
    probs = torch.tensor([[0.04, 0.9, 0.06], [0.9, 0.05, 0.05]])
    result = top_p_set(probs, 0.8, 64)
    assert result.kept.tolist() == [1, 1]
    assert result.ids[:, 0].tolist() == [1, 0]
    torch.testing.assert_close(result.covered, torch.tensor([0.9, 0.9]))


def test_top_p_set_keeps_the_crossing_token():
    probs = torch.tensor([[0.125, 0.5, 0.25, 0.125]])  # exact in binary: no rounding at the boundary
    assert top_p_set(probs, 0.75, 64).kept.tolist() == [2]  # 0.5 + 0.25 reaches 0.75 exactly
    assert top_p_set(probs, 0.76, 64).kept.tolist() == [3]
    assert top_p_set(probs, 0.5, 64).kept.tolist() == [1]
    assert top_p_set(probs, 0.49, 64).ids[0, :1].tolist() == [1]


def test_top_p_set_p_one_is_whole_vocabulary_capped_at_k():
    probs = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    whole = top_p_set(probs, 1.0, 64)
    assert whole.ids.shape == (3, 10) and whole.kept.tolist() == [10, 10, 10]
    torch.testing.assert_close(whole.covered, torch.ones(3))
    capped = top_p_set(probs, 1.0, 4)
    assert capped.kept.tolist() == [4, 4, 4]
    torch.testing.assert_close(capped.covered, torch.sort(probs, descending=True).values[:, :4].sum(-1))


def test_top_p_set_ties_break_by_lower_id():
    probs = torch.tensor([[0.125, 0.25, 0.125, 0.25, 0.25]])
    assert top_p_set(probs, 0.5, 64).ids[0, :2].tolist() == [1, 3]
    assert top_p_set(probs, 0.6, 64).ids[0, :3].tolist() == [1, 3, 4]
    assert top_p_set(probs, 1.0, 64).ids[0].tolist() == [1, 3, 4, 0, 2]
    # A tie across the cap boundary: all 1000 tokens equally likely, the 64 lowest ids win.
    uniform = torch.full((2, 1000), 1e-3)
    result = top_p_set(uniform, 0.5, 64)
    assert result.ids.tolist() == [list(range(64))] * 2


def test_top_p_set_cap_reports_covered_mass_below_p():
    uniform = torch.full((1, 1000), 1e-3)
    result = top_p_set(uniform, 0.5, 64)
    assert result.kept.tolist() == [64]
    assert abs(float(result.covered[0]) - 0.064) < 1e-5  # well short of p = 0.5: the cap cut it


def test_top_p_set_matches_brute_force_with_many_ties():
    generator = torch.Generator().manual_seed(3)
    # Coarsely quantised logits make many exact ties, at every rank and across the cap.
    logits = torch.randint(0, 6, (200, 120), generator=generator).double()
    logits[:50] *= 0.2  # flatter rows: sets wider than the first top-k pass, some cut by the cap
    probs = torch.softmax(logits, dim=-1)
    for p, max_k in ((0.3, 64), (0.8, 64), (0.8, 5), (0.95, 12), (1.0, 7), (0.9, 200)):
        result = top_p_set(probs, p, max_k)
        for row in range(probs.shape[0]):
            ids, mass = brute_force_top_p(probs[row].tolist(), p, max_k)
            k = int(result.kept[row])
            assert result.ids[row, :k].tolist() == ids, (p, max_k, row)
            assert abs(float(result.covered[row]) - mass) < 1e-9


def test_top_p_set_rejects_bad_arguments():
    with pytest.raises(UserError):
        top_p_set(torch.ones(1, 3) / 3, 0.0, 4)
    with pytest.raises(UserError):
        top_p_set(torch.ones(1, 3) / 3, 1.5, 4)
    with pytest.raises(UserError):
        top_p_set(torch.ones(1, 3) / 3, 0.5, 0)


# --------------------------------------------------------------------------- batching and padding


def test_batched_greedy_equals_unbatched(model):
    """Left padding, masks and position ids are right: a row decodes the same alone or batched."""
    prompts = make_prompts([2, 11, 6, 1, 8], seed=4)
    batched = sample(model, prompts, [0] * len(prompts), eos_id=None, pad_id=PAD, max_new_tokens=16, temperature=0)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = sample(model, [prompt], [0], eos_id=None, pad_id=PAD, max_new_tokens=16, temperature=0)[0]
        assert result.tokens == alone.tokens


def test_greedy_equals_transformers_generate(model):
    prompt = PROMPTS[4]
    ours = sample(model, [PROMPTS[0], prompt], [0, 0], eos_id=None, pad_id=PAD, max_new_tokens=12, temperature=0)[1]
    theirs = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=PAD
    )[0, len(prompt) :]
    assert ours.tokens == theirs.tolist()


def test_sample_does_not_depend_on_batch_mates(gpt2):
    """A row's sample depends on its prompt and seed, not on the other rows of its batch."""
    first = sample(gpt2, [PROMPTS[0], PROMPTS[1], PROMPTS[2]], [7, 8, 9], eos_id=None, pad_id=PAD, max_new_tokens=20)
    second = sample(gpt2, [PROMPTS[4], PROMPTS[1]], [3, 8], eos_id=None, pad_id=PAD, max_new_tokens=20)
    assert first[1].tokens == second[1].tokens


def test_same_batch_same_seeds_is_bit_identical(model):
    kwargs = dict(eos_id=None, pad_id=PAD, max_new_tokens=16, capture_top_p=P, capture_max_k=K)
    one = sample(model, PROMPTS, [1, 2, 3, 4, 5, 6], **kwargs)
    two = sample(model, PROMPTS, [1, 2, 3, 4, 5, 6], **kwargs)
    for a, b in zip(one, two, strict=True):
        assert a.tokens == b.tokens and a.seed == b.seed
        for field in ("ids", "probs", "kept", "covered"):
            assert np.array_equal(getattr(a.capture, field), getattr(b.capture, field))
    # Capturing never changes what is sampled.
    plain = sample(model, PROMPTS, [1, 2, 3, 4, 5, 6], eos_id=None, pad_id=PAD, max_new_tokens=16)
    assert [s.tokens for s in plain] == [s.tokens for s in one]
    changed = sample(model, PROMPTS, [1, 2, 3, 4, 5, 60], **kwargs)
    assert [s.tokens for s in changed[:5]] == [s.tokens for s in one[:5]]
    assert changed[5].tokens != one[5].tokens


def test_length_grouped_batches():
    lengths = [5, 1, 9, 5, 3, 9, 2]
    batches = length_grouped_batches(lengths, 3)
    assert batches == [[2, 5, 0], [3, 4, 6], [1]]
    assert batches == length_grouped_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_grouped_batches([], 4) == []
    with pytest.raises(UserError):
        length_grouped_batches(lengths, 0)


# --------------------------------------------------------------------------- stopping


def test_eos_stops_a_row_and_nothing_follows(model):
    greedy = sample(model, PROMPTS, [0] * 6, eos_id=None, pad_id=PAD, max_new_tokens=16, temperature=0)
    # Rig the EOS: the first token that row 1 produces for the first time at step >= 2.
    row = greedy[1].tokens
    step = next(t for t in range(2, len(row)) if row[t] not in row[:t])
    eos = row[step]
    results = sample(model, PROMPTS, [0] * 6, eos_id=eos, pad_id=PAD, max_new_tokens=16, temperature=0, capture_top_p=P)
    assert results[1].tokens == row[: step + 1]
    assert results[1].finish_reason == FINISH_EOS
    for full, result in zip(greedy, results, strict=True):
        assert len(result.capture) == len(result.tokens)
        if eos in full.tokens:
            cut = full.tokens.index(eos) + 1
            assert result.tokens == full.tokens[:cut] and result.finish_reason == FINISH_EOS
            assert result.tokens.count(eos) == 1 and result.tokens[-1] == eos
        else:
            assert result.tokens == full.tokens and result.finish_reason == FINISH_LENGTH
    # The rows that went on after others stopped still match their reference sets.
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert assert_capture_matches(result.capture, reference_probs(model, prompt, result.tokens)) <= 1


def test_all_done_hook_keeps_a_finished_rank_in_step(gpt2):
    """With a collective hook, a rank that finished keeps running forwards until all ranks have."""
    first = sample(gpt2, [PROMPTS[0]], [0], eos_id=None, pad_id=PAD, max_new_tokens=1, temperature=0)[0].tokens[0]
    forwards = []
    handle = gpt2.register_forward_pre_hook(lambda module, args: forwards.append(1))
    calls = []

    def all_done(local_done: bool) -> bool:
        calls.append(local_done)
        return len(calls) >= 5  # "the other ranks" finish after five steps

    try:
        result = sample(
            gpt2, [PROMPTS[0]], [0], eos_id=first, pad_id=PAD, max_new_tokens=20, temperature=0, all_done=all_done
        )[0]
    finally:
        handle.remove()
    assert result.tokens == [first] and result.finish_reason == FINISH_EOS
    assert calls == [True] * 5
    assert len(forwards) == 1 + 4  # the prefill, then one (dummy) forward per step not yet done everywhere


# --------------------------------------------------------------------------- sampling options


def test_no_repeat_ngram_size(gpt2):
    prompts = make_prompts([4, 6], seed=9)
    greedy = dict(eos_id=None, pad_id=PAD, max_new_tokens=40, temperature=0)
    plain = sample(gpt2, prompts, [0, 0], **greedy)
    banned = sample(gpt2, prompts, [0, 0], **greedy, no_repeat_ngram_size=2)

    def bigrams(tokens: list[int]) -> list[tuple[int, int]]:
        return list(zip(tokens, tokens[1:], strict=False))

    # Greedy decoding of a random model loops, so the ban has work to do.
    assert any(
        len(set(bigrams(p + r.tokens))) < len(bigrams(p + r.tokens)) for p, r in zip(prompts, plain, strict=True)
    )
    for prompt, result in zip(prompts, banned, strict=True):
        grams = bigrams(prompt + result.tokens)
        assert len(set(grams)) == len(grams)
    theirs = gpt2.generate(
        torch.tensor([prompts[1]]), do_sample=False, max_new_tokens=40, min_new_tokens=40, pad_token_id=PAD,
        no_repeat_ngram_size=3,
    )[0, len(prompts[1]) :]  # fmt: skip
    ours = sample(gpt2, prompts, [0, 0], **greedy, no_repeat_ngram_size=3)
    assert ours[1].tokens == theirs.tolist()


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)])
def test_degenerate_options_equal_greedy(gpt2, options):
    greedy = sample(gpt2, PROMPTS, [0] * 6, eos_id=None, pad_id=PAD, max_new_tokens=12, temperature=0)
    sampled = sample(gpt2, PROMPTS, [10, 20, 30, 40, 50, 60], eos_id=None, pad_id=PAD, max_new_tokens=12, **options)
    assert [s.tokens for s in sampled] == [s.tokens for s in greedy]


def first_token_frequencies(model, prompt: list[int], n: int, **options) -> np.ndarray:
    results = sample(model, [prompt] * n, list(range(n)), eos_id=None, pad_id=PAD, max_new_tokens=1, **options)
    return np.bincount([r.tokens[0] for r in results], minlength=VOCAB) / n


@pytest.mark.parametrize(
    "options",
    [dict(), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.6), dict(temperature=0.7, top_k=5, top_p=0.9)],
)
def test_sampling_follows_the_distribution(gpt2, options):
    """Empirical first-token frequencies over many seeds match the filtered softmax."""
    prompt = PROMPTS[1]
    with torch.no_grad():
        logits = gpt2(torch.tensor([prompt])).logits[0, -1].double()
    temperature = options.get("temperature", 1.0)
    probs = torch.softmax(logits / temperature, dim=-1)
    if options.get("top_k"):
        probs[probs < torch.topk(probs, options["top_k"]).values[-1]] = 0
        probs /= probs.sum()
    if options.get("top_p"):
        ids, _ = brute_force_top_p(probs.tolist(), options["top_p"], VOCAB)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[ids] = True
        probs = torch.where(keep, probs, 0.0)
        probs /= probs.sum()
    n = 4000
    freq = first_token_frequencies(gpt2, prompt, n, **options)
    expected = probs.numpy()
    assert (freq[expected == 0] == 0).all(), "a token outside the sampling distribution was drawn"
    # 4.5 standard deviations of a binomial count, plus a few counts of slack for rare tokens.
    tolerance = (4.5 * np.sqrt(n * expected * (1 - expected)) + 3) / n
    assert (np.abs(freq - expected) <= tolerance).all(), np.abs(freq - expected).max()


# --------------------------------------------------------------------------- validation


def test_rejects_bad_calls(gpt2):
    with pytest.raises(UserError, match="exceeds the model's 128 positions"):
        sample(gpt2, [[5] * 100], [0], eos_id=None, pad_id=PAD, max_new_tokens=40)
    with pytest.raises(UserError, match="empty prompt"):
        sample(gpt2, [[]], [0], eos_id=None, pad_id=PAD, max_new_tokens=4)
    with pytest.raises(ValueError, match="seeds"):
        sample(gpt2, [[5]], [0, 1], eos_id=None, pad_id=PAD, max_new_tokens=4)
    gpt2.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            sample(gpt2, [[5]], [0], eos_id=None, pad_id=PAD, max_new_tokens=4)
    finally:
        gpt2.eval()
    assert sample(gpt2, [], [], eos_id=None, pad_id=PAD, max_new_tokens=4) == []


def test_non_finite_logits_are_refused(gpt2):
    handle = gpt2.lm_head.register_forward_hook(lambda module, args, out: out * float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            sample(gpt2, [PROMPTS[0]], [0], eos_id=None, pad_id=PAD, max_new_tokens=3)
    finally:
        handle.remove()


def test_teacher_sets_are_the_caches_top_p_sets():
    from bdctl.stages.distill import frame_sets
    from bdctl.topp import teacher_sets, top_p_set

    g = torch.Generator().manual_seed(2)
    rows, weight = torch.randn(11, 6, generator=g) * 3, torch.randn(50, 6, generator=g)
    ids, kept = teacher_sets(rows, weight, 0.8, 12, chunk_size=20)  # row blocks of 4
    reference = top_p_set(torch.softmax(rows @ weight.T, dim=-1), 0.8, 12)
    torch.testing.assert_close(kept, reference.kept)
    for n in range(11):
        assert ids[n, : kept[n]].tolist() == reference.ids[n, : kept[n]].tolist()
    valid = torch.zeros(3, 5, dtype=torch.bool)
    valid.view(-1)[:11] = True
    cand_ids, cand_mask = frame_sets(valid, ids, kept)
    assert cand_ids.shape[:2] == (3, 5) and cand_mask.sum().item() == kept.sum().item()
    assert cand_ids[0, 1, : kept[1]].tolist() == ids[1, : kept[1]].tolist()


# --------------------------------------------------------------------------- D* inside the teacher's sets


@pytest.mark.parametrize("peak", [20.0, 1.0], ids=["trained-like", "barely-trained"])
def test_set_top_p_draws_every_token_inside_its_captured_set(model, peak):
    """generate.top_p == cache_top_p (docs/method.md §3.4): each drawn token lies in the top-p set the
    capture stores at its position, cap included. A barely trained teacher (peak 1: nearly uniform)
    has sets that hit the cap, where an uncapped nucleus would draw outside the cached set; the
    same draw without set_top_p does land outside, so the check can fail."""
    if peak != 20.0:
        model = _rescaled(model, peak)
    prompts = make_prompts([5, 9, 3, 7] * 4, seed=3)
    cap = 8
    capped = 0
    outside_without = 0
    for set_top_p in (P, None):
        results = sample(
            model, prompts, list(range(100, 100 + len(prompts))), eos_id=EOS, pad_id=PAD, max_new_tokens=12,
            set_top_p=set_top_p, capture_top_p=P, capture_max_k=cap,
        )  # fmt: skip
        for result in results:
            capture = result.capture
            for t, token in enumerate(result.tokens):
                ids, _ = capture.position(t)
                inside = token in set(ids.tolist())
                if set_top_p is not None:
                    assert inside, (t, token, ids)
                    capped += int(capture.kept[t]) == cap and capture.covered[t] < P
                else:
                    outside_without += not inside
    if peak == 1.0:
        assert capped > 0  # the cap did bite
        assert outside_without > 0  # and without set_top_p tokens fall outside the cached sets


def _rescaled(model: torch.nn.Module, peak: float) -> torch.nn.Module:
    """A copy of `model` whose output embedding is scaled back to `peak` (the fixture's is x20)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(peak / 20.0)
    return clone.eval()


def test_set_top_p_follows_the_renormalised_set(gpt2):
    """Frequencies of the first token match the teacher's distribution restricted to its capped
    top-p set (ties by lower id, crossing token kept) and renormalised."""
    prompt = PROMPTS[1]
    with torch.no_grad():
        logits = gpt2(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits, dim=-1)
    ids, _ = brute_force_top_p(probs.tolist(), 0.6, 4)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[ids] = True
    expected = torch.where(keep, probs, 0.0)
    expected = (expected / expected.sum()).numpy()
    n = 4000
    freq = first_token_frequencies(gpt2, prompt, n, set_top_p=0.6, capture_max_k=4)
    assert (freq[expected == 0] == 0).all()
    tolerance = (4.5 * np.sqrt(n * expected * (1 - expected)) + 3) / n
    assert (np.abs(freq - expected) <= tolerance).all(), np.abs(freq - expected).max()
