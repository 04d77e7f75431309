"""Models: tiny GPT-2 / OPT / Qwen2 builds, local from_pretrained, the shared-vocabulary check."""

from __future__ import annotations

import pytest
import torch

from bdctl.errors import UserError
from bdctl.models import (
    build_tiny_model,
    check_vocabularies,
    load_model,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from bdctl.recipe import load_recipe
from bdctl.recipe.schema import TinyModel, TokenizerTraining

ARCHS = ("gpt2", "opt", "qwen2")


def tiny(arch: str, **extra) -> TinyModel:
    return TinyModel(arch=arch, layers=2, hidden=32, heads=4, max_positions=64, **extra)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_are_seeded_and_speak_the_shared_vocabulary(arch, tiny_tokenizer):
    a = build_tiny_model(tiny(arch), tiny_tokenizer, seed=3)
    b = build_tiny_model(tiny(arch), tiny_tokenizer, seed=3)
    c = build_tiny_model(tiny(arch), tiny_tokenizer, seed=4)
    assert a.config.model_type == arch and a.config.vocab_size == len(tiny_tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.get_output_embeddings().weight, c.get_output_embeddings().weight)
    state = torch.random.get_rng_state()
    build_tiny_model(tiny(arch), tiny_tokenizer, seed=5)
    assert torch.equal(state, torch.random.get_rng_state()), "building must not disturb the global RNG"


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_final_hidden_times_output_embedding(arch, tiny_tokenizer):
    """The objectives compute logits from hidden states; this is what makes that exact."""
    model = build_tiny_model(tiny(arch), tiny_tokenizer, seed=0).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_from_a_local_directory(arch, tiny_tokenizer, tmp_path):
    built = build_tiny_model(tiny(arch), tiny_tokenizer, seed=1)
    built.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, load_tokenizer(tmp_path), seed=0)
    for (name, x), y in zip(built.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_missing_model_and_tokenizer_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path / 'nope'}: cannot load the model"):
        load_model(tmp_path / "nope", None, seed=0)
    with pytest.raises(UserError, match=rf"^{tmp_path / 'nope'}: no such tokenizer directory"):
        load_tokenizer(tmp_path / "nope")


def test_tokenizer_training_is_deterministic(tmp_path):
    texts = ["the cat sat on the mat", "seven plus two is nine"] * 20
    one = train_tokenizer(texts, TokenizerTraining(vocab_size=300), tmp_path / "a")
    two = train_tokenizer(texts, TokenizerTraining(vocab_size=300), tmp_path / "b")
    assert tokenizer_hash(one) == tokenizer_hash(two)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    reloaded = load_tokenizer(tmp_path / "a")
    assert tokenizer_hash(reloaded) == tokenizer_hash(one) and reloaded.pad_token == "<|pad|>"


def test_vocabulary_mismatch_is_caught_before_any_compute(tiny_tokenizer, tmp_path):
    other = train_tokenizer(["entirely different words here"] * 10, TokenizerTraining(vocab_size=280), tmp_path / "tok")
    foreign = build_tiny_model(tiny("gpt2"), other, seed=0)
    foreign.save_pretrained(tmp_path / "foreign")
    other.save_pretrained(tmp_path / "foreign")
    recipe, _ = load_recipe("smoke")
    with pytest.raises(UserError, match=r"^teacher model .*foreign: its tokenizer differs from the shared one"):
        check_vocabularies(recipe, tiny_tokenizer, {"teacher": tmp_path / "foreign", "student": recipe.models.student})
    # same tokenizer, different output size: also refused
    wide = build_tiny_model(tiny("gpt2"), tiny_tokenizer, seed=0)
    wide.resize_token_embeddings(len(tiny_tokenizer) + 8)
    wide.save_pretrained(tmp_path / "wide")
    tiny_tokenizer.save_pretrained(tmp_path / "wide")
    with pytest.raises(UserError, match=r"^output vocabulary sizes differ \(teacher \d+, student \d+\)"):
        check_vocabularies(recipe, tiny_tokenizer, {"teacher": tmp_path / "wide", "student": recipe.models.student})
    same = build_tiny_model(tiny("opt"), tiny_tokenizer, seed=0)
    same.save_pretrained(tmp_path / "same")
    tiny_tokenizer.save_pretrained(tmp_path / "same")
    check_vocabularies(recipe, tiny_tokenizer, {"teacher": tmp_path / "same", "student": recipe.models.student})
