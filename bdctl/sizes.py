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


def cut_choice(recipe: Recipe) -> tuple[list[int], int] | None:
    """The teacher's layers a from_teacher student keeps and how many the teacher has, when the
    teacher's config can be read (None otherwise, or when the student is not cut)."""
    spec = recipe.models.student.from_teacher
    teacher = None if spec is None else model_config(recipe.models.teacher, recipe)
    if spec is None or teacher is None:
        return None
    from bdctl.cut import choose_layers, layer_count

    total = layer_count(teacher)
    return choose_layers(spec, total), total


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


def activation_gib(
    layers: int,
    hidden: int,
    heads: int,
    sequence: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    attention: str | None,
    precision: str = "bf16",
) -> float:
    """Activations one micro-batch keeps for its backward pass (per GPU; ZeRO does not partition them).

    Per transformer block, s b h (34 + 5 a s / h) bytes in 16-bit (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", eq. 1 without tensor parallelism): the
    5 a s^2 b term is the attention score matrices, which only eager attention keeps (sdpa, the default,
    and flash-attention recompute them). With gradient checkpointing each block keeps only its 2-byte
    input, plus one block's full activations while it is recomputed. The output logits are not counted:
    bdctl's losses compute them in chunks (objectives/lm.py: lean_cross_entropy). fp32 doubles it all.
    """
    s, b, h, a = sequence, micro_batch, hidden, heads
    block = s * b * h * 34 + (5 * a * s * s * b if attention == "eager" else 0)
    total = layers * 2 * s * b * h + block if gradient_checkpointing else layers * block
    return total * (2 if precision == "fp32" else 1) / 2**30


def config_shape(config) -> tuple[int, int, int]:
    """(layers, hidden size, attention heads) of a transformers config (GPT-2's names or the common ones)."""

    def first(*names: str) -> int:
        return next(int(getattr(config, n)) for n in names if isinstance(getattr(config, n, None), int))

    return (
        first("num_hidden_layers", "n_layer"),
        first("hidden_size", "n_embd"),
        first("num_attention_heads", "n_head"),
    )
