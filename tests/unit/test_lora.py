"""LoRA students (bdctl/lora.py): adapters on the three tiny architectures, the merged export against
the adapted model's own logits, the adapter in peft's format, and the one-line errors."""

from __future__ import annotations

import sys

import pytest

from bdctl.errors import UserError
from bdctl.recipe.schema import LoRA, ModelSpec, TinyModel

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

TARGETS = {"gpt2": ["c_attn", "c_fc"], "opt": ["q_proj", "v_proj", "fc2"], "qwen2": ["q_proj", "o_proj", "down_proj"]}
ARCHS = list(TARGETS)


def tiny(arch: str) -> ModelSpec:
    extra = {"kv_heads": 2} if arch == "qwen2" else {}
    return ModelSpec(tiny=TinyModel(arch=arch, layers=2, hidden=32, heads=4, max_positions=64, **extra))


def adapted(arch: str, tokenizer, **settings):
    from bdctl.models import load_model

    spec = LoRA(target_modules=TARGETS[arch], r=4, alpha=8.0, **settings)
    model = load_model(tiny(arch), tokenizer, seed=3, lora=spec, where="models.student.lora")
    # B starts at zero (the adapted model is the base); give it values so the merge has work to do
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_go_where_asked_and_only_they_train(arch, tiny_tokenizer):
    from bdctl.lora import trainable_parameters
    from bdctl.models import build_tiny_model, load_model

    base = build_tiny_model(tiny(arch).tiny, tiny_tokenizer, seed=3).eval()
    spec = LoRA(target_modules=TARGETS[arch], r=4, alpha=8.0)
    model = load_model(tiny(arch), tokenizer=tiny_tokenizer, seed=3, lora=spec, where="w").eval()
    assert type(model) is type(base)  # the model itself, not a peft wrapper: policy_module needs base_model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted_layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted_layers == set(TARGETS[arch])
    # r x (in + out) per adapted layer, 2 layers
    assert trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0: before training the adapted model is the base model exactly
        assert torch.equal(model(ids).logits, base(ids).logits)
    # the same adapters on every rank: A comes from the seed, not from the global RNG's state
    torch.manual_seed(123)
    again = load_model(tiny(arch), tokenizer=tiny_tokenizer, seed=3, lora=spec, where="w")
    for (name, a), b in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_loads_without_peft_and_gives_the_adapted_logits(arch, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from bdctl.lora import merged_state_dict

    model = adapted(arch, tiny_tokenizer)
    state = merged_state_dict(model, rank=0)
    assert not any("lora" in k or "base_layer" in k for k in state)
    model.save_pretrained(tmp_path, state_dict=state, safe_serialization=True)
    assert not (tmp_path / "adapter_config.json").exists()
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, len(tiny_tokenizer), (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids).logits, merged.eval()(ids).logits
    assert not torch.allclose(expected, adapted_base_logits(arch, tiny_tokenizer, ids), atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def adapted_base_logits(arch, tokenizer, ids):
    from bdctl.models import build_tiny_model

    with torch.no_grad():
        return build_tiny_model(tiny(arch).tiny, tokenizer, seed=3).eval()(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_a_plain_reference(arch, tiny_tokenizer):
    """W + (alpha / r) B @ A written out by hand (GPT-2's Conv1D stores W transposed: in x out)."""
    from bdctl.lora import merged_state_dict

    model = adapted(arch, tiny_tokenizer)
    state = merged_state_dict(model, rank=0)
    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        base = module.base_layer.weight
        delta = 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight  # alpha / r = 8 / 4
        expected = base + (delta.T if arch == "gpt2" else delta)
        torch.testing.assert_close(state[f"{name}.weight"], expected.detach(), rtol=0, atol=1e-6)
        checked += 1
    assert checked == 2 * len(TARGETS[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapter_loads_in_peft_on_the_base(arch, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    from bdctl.lora import adapter_state_dict, save_adapter
    from bdctl.models import build_tiny_model

    model = adapted(arch, tiny_tokenizer)
    save_adapter(model, adapter_state_dict(model, rank=0), tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    base = build_tiny_model(tiny(arch).tiny, tiny_tokenizer, seed=3)
    restored = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "target", "fragments"),
    [
        ("gpt2", "q_proj", ["'q_proj' is not a linear layer of this gpt2 model", "c_attn, c_fc, c_proj"]),
        ("opt", "c_attn", ["'c_attn' is not a linear layer of this opt model", "fc1, fc2, k_proj, out_proj"]),
        ("qwen2", "lm_head", ["'lm_head' is the output embedding", "down_proj, gate_proj, k_proj"]),
    ],
)
def test_a_missing_target_module_is_one_line_naming_it_and_the_real_ones(arch, target, fragments, tiny_tokenizer):
    from bdctl.models import check_lora, load_model

    spec = LoRA(target_modules=[target])
    for attempt in (
        lambda: check_lora(tiny(arch), tiny_tokenizer, spec, "models.student.lora"),  # launching process
        lambda: load_model(tiny(arch), tiny_tokenizer, 0, lora=spec, where="models.student.lora"),  # ranks
    ):
        with pytest.raises(UserError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message and message.startswith("models.student.lora.target_modules: ")
        for fragment in fragments:
            assert fragment in message


def test_lora_without_peft_names_the_extra(tiny_tokenizer, monkeypatch):
    from bdctl.models import check_lora

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(UserError, match=r"models.student.lora: LoRA needs the peft library.*bdctl\[lora\]"):
        check_lora(tiny("gpt2"), tiny_tokenizer, LoRA(target_modules=["c_attn"]), "models.student.lora")


def test_recipe_settings_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="target_modules"):
        LoRA(target_modules=[])
    with pytest.raises(ValidationError, match="dropout"):
        LoRA(target_modules=["c_attn"], dropout=1.0)
    with pytest.raises(ValidationError, match="extra"):
        LoRA(target_modules=["c_attn"], rank=4)  # type: ignore[call-arg]


@pytest.mark.parametrize("arch", ARCHS)
def test_recipes_show_counts_the_adapters_the_model_gets(arch, tiny_tokenizer):
    from bdctl.lora import trainable_parameters
    from bdctl.models import load_model, tiny_config
    from bdctl.sizes import lora_parameters, training_gib_per_gpu

    spec = LoRA(target_modules=TARGETS[arch], r=4)
    model = load_model(tiny(arch), tiny_tokenizer, 0, lora=spec, where="w")
    trained = trainable_parameters(model)
    assert lora_parameters(tiny_config(tiny(arch).tiny, tiny_tokenizer), spec) == trained
    total = sum(p.numel() for p in model.parameters())
    # fp32: 4 bytes of weights per parameter, 4 + 8 of gradient and Adam moments per trained one
    assert training_gib_per_gpu(total, 2, 3, "fp32", trained) * 2**30 == pytest.approx((4 * total + 12 * trained) / 2)
    assert training_gib_per_gpu(total, 2, 2, "fp32", trained) * 2**30 == pytest.approx(4 * total + 12 * trained / 2)
