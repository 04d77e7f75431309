"""MiniLLM's teacher-mixed sampler (bdctl.rollouts) against full forwards, one row at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdctl.rollouts import mixed_sample, rollout_seed
from bdctl.sampling import _row_uniforms, sample

VOCAB, EOS, PAD = 24, 2, 0


def _models(arch):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    special = dict(bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, vocab_size=VOCAB)

    def build(width, seed):
        torch.manual_seed(seed)
        if arch == "gpt2":
            return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=2, n_positions=64, **special))
        return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=1, hidden_size=width, intermediate_size=2 * width,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=64, **special))  # fmt: skip

    student, teacher = build(16, 0).double().eval(), build(32, 1).double().eval()
    with torch.no_grad():  # sharpen the teacher a little so the mixture differs visibly from the student
        teacher.get_output_embeddings().weight.mul_(4.0)
    return student, teacher


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [3]]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_tokens_and_scores_are_the_mixture_of_full_forwards(arch):
    """Each drawn token inverts the cumulative mixture (1 - a) q + a p at its row's uniform, and the
    kept log-probabilities are those of an unpadded full forward of prompt + response so far."""
    student, teacher = _models(arch)
    a, steps = 0.3, 12
    seeds = [rollout_seed(7, 4, i) for i in range(len(PROMPTS))]
    found = mixed_sample(student, teacher, PROMPTS, seeds, mix=a, eos_id=EOS, pad_id=PAD, max_new_tokens=steps)
    uniforms = _row_uniforms(seeds, steps, torch.device("cpu"))
    lengths = []
    for row, (prompt, result) in enumerate(zip(PROMPTS, found, strict=True)):
        lengths.append(len(result.tokens))
        assert result.finish_reason == ("eos" if result.tokens[-1] == EOS else "length")
        assert EOS not in result.tokens[:-1] and (result.finish_reason == "eos" or len(result.tokens) == steps)
        sequence = torch.tensor([prompt + result.tokens])
        with torch.no_grad():
            q = torch.softmax(student(sequence).logits[0], -1)
            p = torch.softmax(teacher(sequence).logits[0], -1)
        for t, token in enumerate(result.tokens):
            position = len(prompt) - 1 + t
            mix = (1 - a) * q[position] + a * p[position]
            cdf = mix.cumsum(0)
            assert token == int(torch.searchsorted(cdf, uniforms[row, t] * cdf[-1], right=True))
            assert result.log_q[t] == pytest.approx(np.log(q[position, token].item()), rel=1e-9)
            assert result.log_p[t] == pytest.approx(np.log(p[position, token].item()), rel=1e-9)
            assert result.log_mix[t] == pytest.approx(np.log(mix[token].item()), rel=1e-9)
    assert len(set(lengths)) > 1  # rows of different lengths: some left the batch early


def test_a_row_is_the_same_alone_or_in_a_batch_and_mix_zero_is_the_plain_sampler():
    student, teacher = _models("gpt2")
    seeds = [rollout_seed(7, 0, i) for i in range(len(PROMPTS))]
    batch = mixed_sample(student, teacher, PROMPTS, seeds, mix=0.2, eos_id=EOS, pad_id=PAD, max_new_tokens=10)
    for i in range(len(PROMPTS)):
        alone = mixed_sample(
            student, teacher, [PROMPTS[i]], [seeds[i]], mix=0.2, eos_id=EOS, pad_id=PAD, max_new_tokens=10
        )[0]
        assert alone.tokens == batch[i].tokens
        np.testing.assert_allclose(alone.log_q, batch[i].log_q, rtol=1e-9)
    # a = 0 samples the student alone: the evaluation sampler's tokens for the same seeds
    pure = mixed_sample(student, teacher, PROMPTS, seeds, mix=0.0, eos_id=EOS, pad_id=PAD, max_new_tokens=10)
    plain = sample(student, PROMPTS, seeds, eos_id=EOS, pad_id=PAD, max_new_tokens=10)
    assert [r.tokens for r in pure] == [r.tokens for r in plain]
    assert all(np.array_equal(r.log_mix, r.log_q) for r in pure)
    assert rollout_seed(7, 0, 1) != rollout_seed(7, 1, 0) != rollout_seed(8, 0, 0)


def test_bad_settings():
    from bdctl.errors import UserError

    student, teacher = _models("gpt2")
    with pytest.raises(ValueError, match="mix"):
        mixed_sample(student, teacher, PROMPTS, [1, 2, 3, 4], mix=1.0, eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    with pytest.raises(UserError, match="exceeds the student's 64 positions"):
        mixed_sample(student, teacher, PROMPTS, [1, 2, 3, 4], mix=0.2, eos_id=EOS, pad_id=PAD, max_new_tokens=60)
    teacher.train()
    with pytest.raises(ValueError, match="teacher is in training mode"):
        mixed_sample(student, teacher, PROMPTS, [1, 2, 3, 4], mix=0.2, eos_id=EOS, pad_id=PAD, max_new_tokens=4)


def test_collated_rollouts_line_up_with_the_training_forward():
    """The stage's update batch reads the student's log-probability of each response token at position
    len(prompt) + t - 1 of the right-padded sequence: at the sampling weights it equals what the sampler
    kept (so rho_t = w_t on the first minibatch), for rows of different lengths."""
    from bdctl.recipe.schema import MiniLLM
    from bdctl.stages.minillm import Rollout, collate_rollouts, minibatch_advantages

    student, teacher = _models("gpt2")
    own = MiniLLM()
    seeds = [rollout_seed(7, 4, i) for i in range(len(PROMPTS))]  # rows of different lengths (see above)
    found = mixed_sample(
        student, teacher, PROMPTS, seeds, mix=own.teacher_mix, eos_id=EOS, pad_id=PAD, max_new_tokens=12
    )
    rollouts = [
        Rollout(
            row=i,
            tokens=np.asarray(f.tokens, dtype=np.int64),
            log_q=f.log_q,
            log_p=f.log_p,
            log_mix=f.log_mix,
            eos=f.finish_reason == "eos",
        )
        for i, f in enumerate(found)
    ]
    assert len({len(r.tokens) for r in rollouts}) > 1
    batch = collate_rollouts(rollouts, minibatch_advantages(rollouts, own), own, PROMPTS, PAD)
    valid = batch["valid"]
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at = logits.gather(1, batch["positions"][..., None].expand(-1, -1, VOCAB))
    log_q = torch.log_softmax(at, -1).gather(-1, batch["actions"][..., None])[..., 0]
    torch.testing.assert_close(log_q[valid], batch["old_log_q"][valid], rtol=1e-9, atol=1e-9)
    for i, r in enumerate(rollouts):
        n = len(r.tokens)
        assert valid[i].sum() == n and batch["actions"][i, :n].tolist() == r.tokens.tolist()
        np.testing.assert_allclose(batch["weights"][i, :n].numpy(), np.exp(r.log_q - r.log_mix), rtol=1e-12)
    adv = batch["advantages"][valid]
    assert (
        abs(adv.mean().item()) < 1e-9 and abs(adv.std(unbiased=False).item() - 1) < 1e-6
    )  # whitened over the minibatch


def test_collections_walk_the_seeded_prompt_order():
    from bdctl.data.batching import epoch_order
    from bdctl.stages.minillm import collection_rows

    rows = [collection_rows(c, 10, 4, seed=3) for c in range(5)]  # 20 positions: two passes of 10 prompts
    flat = [r for part in rows for r in part]
    assert flat == epoch_order(10, 3, 0) + epoch_order(10, 3, 1)
    assert collection_rows(2, 10, 4, seed=3) == rows[2]
