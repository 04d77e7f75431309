"""How big a model is and what it needs per GPU: parameter counts from configs on the meta device
(no weights, no network), and the memory of ZeRO-2 / ZeRO-3 training states and inference copies."""

from __future__ import annotations

from bdctl.recipe.schema import ModelSpec, Recipe


def model_config(spec: ModelSpec, recipe: Recipe):
    """The transformers config of a model if it can be read without the network (a tiny spec, a
    local directory, or a hub id already in the local cache); None otherwise."""
    if spec.tiny is not None:
        from bdctl.models import tiny_config

        vocab = recipe.models.tokenizer.train.vocab_size if recipe.models.tokenizer.train else 50257

        class _Vocabulary:  # tiny_config only asks the tokenizer for its size and special ids
            bos_token_id = eos_token_id = 0
            pad_token_id = 1

            def __len__(self) -> int:
                return vocab

        return tiny_config(spec.tiny, _Vocabulary())
    from transformers import AutoConfig

    assert spec.path is not None  # ModelSpec: exactly one of path, tiny
    try:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision, local_files_only=True)
    except (OSError, ValueError):
        return None


def count_parameters(config) -> int:
    """Parameters of a model built from `config` on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def training_gib_per_gpu(
    params: int, gpus: int, zero_stage: int, precision: str, trainable: int | None = None
) -> float:
    """Model states per GPU for mixed-precision AdamW training (activations not included).

    bf16/fp16: 2 bytes weights + 2 bytes gradients + 12 bytes fp32 master weights and Adam moments
    per parameter (the ZeRO paper's 16 bytes); fp32: 4 + 4 + 8. ZeRO-2 partitions gradients and
    optimizer states over the GPUs, ZeRO-3 the weights as well. `trainable` (LoRA: the adapters,
    counted in `params` too): only those have gradients and optimizer states.
    """
    weights, grads, optimizer = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    trained = params if trainable is None else trainable
    if zero_stage == 3:
        per_gpu = (weights * params + (grads + optimizer) * trained) / gpus
    else:
        per_gpu = weights * params + (grads + optimizer) * trained / gpus
    return per_gpu / 2**30


def lora_parameters(config, spec) -> int:
    """Parameters of the LoRA adapters `spec` (a recipe's `LoRA`) adds to a model built from `config`:
    r x (in + out) per targeted linear layer, read off a model on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if module is head or name.rsplit(".", 1)[-1] not in spec.target_modules:
            continue
        if isinstance(module, torch.nn.Linear):
            total += spec.r * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2: weight is in x out
            total += spec.r * sum(module.weight.shape)
    return total


def inference_gib(params: int, precision: str) -> float:
    """A full inference copy (generation holds one per GPU; KV cache not included)."""
    return params * (4 if precision == "fp32" else 2) / 2**30
