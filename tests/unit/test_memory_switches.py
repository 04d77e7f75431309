"""models.<role>.gradient_checkpointing and attn_implementation: the loss SFT computes (hidden states through
the output embedding, bdctl.objectives.lm.lean_cross_entropy) and its gradients are unchanged to fp32 tolerance,
on the three tiny architectures; flash_attention_2 without flash-attn is one line; the memory plan counts them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bdctl.errors import UserError
from bdctl.recipe.schema import ModelSpec, TinyModel


def loss_and_grads(spec: ModelSpec, tokenizer, batch):
    from bdctl.models import load_model
    from bdctl.objectives.lm import lean_cross_entropy

    model = load_model(spec, tokenizer, seed=0).train()
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    loss = lean_cross_entropy(hidden.last_hidden_state, model.get_output_embeddings().weight, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2"])
def test_gradient_checkpointing_and_attention_leave_loss_and_gradients_unchanged(arch, tiny_tokenizer):
    from bdctl.data.batching import Tokenized, collate

    torch.manual_seed(0)
    examples = [Tokenized(torch.randint(3, len(tiny_tokenizer), (n,)).tolist(), 4) for n in (20, 13, 17)]
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    tiny = TinyModel(arch=arch, layers=3, hidden=32, heads=4)
    base_loss, base_grads, _ = loss_and_grads(ModelSpec(tiny=tiny, attn_implementation="eager"), tiny_tokenizer, batch)
    for switches in ({"gradient_checkpointing": True, "attn_implementation": "eager"}, {"attn_implementation": "sdpa"}):
        loss, grads, model = loss_and_grads(ModelSpec(tiny=tiny, **switches), tiny_tokenizer, batch)
        assert model.is_activation_checkpointing is switches.get("gradient_checkpointing", False)
        assert model.config._attn_implementation == switches["attn_implementation"]
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == base_grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            torch.testing.assert_close(grad, base_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_one_line():
    from bdctl.models import check_attention

    spec = ModelSpec(path="gpt2", attn_implementation="flash_attention_2")
    with pytest.raises(UserError, match=r"^models.student.attn_implementation: flash_attention_2 needs the flash-attn"):
        check_attention(spec, "student")
    check_attention(ModelSpec(path="gpt2", attn_implementation="sdpa"), "student")  # installed with torch: no error


def test_activation_memory_plan_accounts_for_the_switches():
    from bdctl.sizes import activation_gib

    common = dict(layers=24, hidden=2048, heads=16, sequence=512, micro_batch=4)
    eager = activation_gib(**common, gradient_checkpointing=False, attention="eager")
    sdpa = activation_gib(**common, gradient_checkpointing=False, attention="sdpa")
    checkpointed = activation_gib(**common, gradient_checkpointing=True, attention="sdpa")
    # Korthikanti et al. (2022): 34 s b h bytes per layer, 5 a s^2 b more with the score matrix kept
    per_layer = 512 * 4 * 2048 * 34
    scores = 5 * 16 * 512 * 512 * 4
    assert eager == pytest.approx(24 * (per_layer + scores) / 2**30)
    assert sdpa == pytest.approx(24 * per_layer / 2**30)
    # checkpointing keeps each block's 2-byte input, and one block's activations while it is recomputed
    assert checkpointed == pytest.approx((24 * 2 * 512 * 4 * 2048 + per_layer) / 2**30)
    assert checkpointed < sdpa < eager
    assert activation_gib(**common, gradient_checkpointing=False, attention="sdpa", precision="fp32") == 2 * sdpa


def test_recipes_show_lists_the_switches_activations_and_the_chat_prompt_overhead(tmp_path):
    from typer.testing import CliRunner

    from bdctl.cli import app
    from tests.chat_tokenizer import build_chat_tokenizer
    from tests.conftest import write_recipe

    tokenizer = build_chat_tokenizer(tmp_path / "tok", vocab_size=300)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        models__tokenizer={"path": str(tmp_path / "tok")},
        models__student__gradient_checkpointing=True,
        models__student__attn_implementation="eager",
        data__template="chat",
        data__system_prompt="Be brief.",
    )
    shown = CliRunner().invoke(app, ["recipes", "show", str(recipe), "--gpus", "2"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert "attention eager, gradient checkpointing" in shown.output and "attention default (sdpa)" in shown.output
    assert "activations GiB/GPU" in shown.output
    empty = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    overhead = len(tokenizer(empty)["input_ids"])
    assert f"every prompt starts with {overhead} tokens (system turn 'Be brief.'" in shown.output


def test_switches_do_not_change_what_a_checkpoint_or_data_split_must_match():
    """A run may resume with gradient checkpointing or another attention kernel (e.g. after running out of
    memory); a conversation format or system prompt is other data."""
    from bdctl.data.prepare import data_fingerprint
    from bdctl.job import Job
    from bdctl.recipe import load_recipe

    def fingerprints(*overrides: str) -> tuple[str, str]:
        recipe, _ = load_recipe("qwen2.5-3b-to-0.5b", list(overrides))
        job = Job(stage="sft", options={"model": "student"}, recipe=recipe, recipe_path="r.yaml", run_root="runs/x",
                  stage_name="student_sft", world_size=1)  # fmt: skip
        return data_fingerprint(recipe), job.fingerprint()

    plain = fingerprints()
    assert plain == fingerprints(
        "models.student.gradient_checkpointing=true", "models.teacher.attn_implementation=eager"
    )
    chat = fingerprints("data.template=chat")[0]
    assert len({plain[0], chat, fingerprints("data.template=chat", "data.system_prompt=none")[0]}) == 3
