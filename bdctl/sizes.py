"""How big a model is and what it needs per GPU: parameter counts from configs on the meta device
(no weights, no network), and the memory of ZeRO-2 / ZeRO-3 training states and inference copies."""

from __future__ import annotations

from pathlib import Path

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

    location = spec.location
    assert location is not None  # not tiny: a path, or where a gguf / from_teacher model is built
    built = spec.path is None and (Path(location) / "config.json").is_file()
    if spec.from_teacher is not None and not built:  # not cut yet: the teacher's config with the kept layers
        from bdctl.cut import choose_layers, layer_count, with_layers

        teacher = model_config(recipe.models.teacher, recipe)
        return None if teacher is None else with_layers(teacher, choose_layers(spec.from_teacher, layer_count(teacher)))
    try:
        if spec.gguf is not None and not built:  # not converted yet: the file's own metadata
            gguf = Path(spec.gguf).expanduser()
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoConfig.from_pretrained(location, revision=spec.revision, local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None


def count_parameters(config) -> int:
    """Parameters of a model built from `config` on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def training_gib_per_gpu(params: int, gpus: int, zero_stage: int, precision: str) -> float:
    """Model states per GPU for mixed-precision AdamW training (activations not included).

    bf16/fp16: 2 bytes weights + 2 bytes gradients + 12 bytes fp32 master weights and Adam moments
    per parameter (the ZeRO paper's 16 bytes); fp32: 4 + 4 + 8. ZeRO-2 partitions gradients and
    optimizer states over the GPUs, ZeRO-3 the weights as well.
    """
    weights, grads, optimizer = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    if zero_stage == 3:
        per_gpu = (weights + grads + optimizer) * params / gpus
    else:
        per_gpu = weights * params + (grads + optimizer) * params / gpus
    return per_gpu / 2**30


def inference_gib(params: int, precision: str) -> float:
    """A full inference copy (generation holds one per GPU; KV cache not included)."""
    return params * (4 if precision == "fp32" else 2) / 2**30
