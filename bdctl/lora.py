"""LoRA students (beyond the paper, which fine-tunes every weight): low-rank adapters through the
`peft` library (the optional extra `bdctl[lora]`, imported only here and only when a recipe asks
for `models.<role>.lora`).

How it fits the rest of bdctl:
- `apply` injects the adapters into the Hugging Face model itself (peft's `get_peft_model`, then its
  `get_base_model()`): the model keeps its own class, `base_model` and output embedding, so
  `engine.policy_module`, the sampler and the losses (which read the output embedding's weight,
  docs/method.md §2) see an ordinary causal LM. Only the adapters require gradients, so the
  optimizer (`engine.make_engine`) and the DeepSpeed checkpoints hold the adapter and its Adam
  state; the frozen base is loaded again from its source on resume.
- The adapters are created from a fixed seed on every rank (identical before ZeRO-3 partitions
  them; B starts at zero, so step 0 is the base model exactly).
- `merged_state_dict` is what an export saves: every weight with its adapter merged in (peft's own
  `get_delta_weight`, which knows GPT-2's transposed Conv1D), under the plain model's names, so the
  export loads with `AutoModelForCausalLM` and no peft. `adapter_state_dict` / `save_adapter` keep
  the adapter alone in peft's format when `lora.save_adapter` is set.
"""

from __future__ import annotations

from pathlib import Path

from bdctl.errors import UserError
from bdctl.recipe.schema import LoRA

ADAPTER = "default"  # peft's name for the one adapter bdctl trains
ADAPTER_DIR = "adapter"  # inside an export, with lora.save_adapter
# Attribute of an adapted model holding its peft LoraConfig (a plain attribute, not a submodule).
_CONFIG_ATTRIBUTE = "bdctl_lora_config"
_SPEC_ATTRIBUTE = "bdctl_lora_spec"


def require_peft(where: str):
    """The peft module, or one line naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise UserError(
            f"{where}: LoRA needs the peft library, which is not installed (pip install 'bdctl[lora]')"
        ) from None
    return peft


def adaptable_names(model) -> list[str]:
    """The last name part of every linear layer an adapter can go on (torch Linear, GPT-2's Conv1D),
    the output embedding excluded: the losses multiply its weight directly, past any adapter."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head and name
    }
    return sorted(names)


def check_targets(model, spec: LoRA, where: str) -> None:
    """Every `target_modules` entry names a linear layer of `model`; one line naming the first that
    does not and the ones that do."""
    known = adaptable_names(model)
    head = model.get_output_embeddings()
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head and name}
    for target in spec.target_modules:
        if target in head_names:
            raise UserError(
                f"{where}.target_modules: {target!r} is the output embedding, which the losses read directly "
                f"and LoRA cannot adapt here (linear layers of this {model.config.model_type} model: "
                f"{', '.join(known)})"
            )
        if target not in known:
            raise UserError(
                f"{where}.target_modules: {target!r} is not a linear layer of this {model.config.model_type} model "
                f"(it has: {', '.join(known)})"
            )


def check_targets_of_config(config, spec: LoRA, where: str) -> None:
    """`check_targets` on a model built from `config` on the meta device (no weights, no memory):
    the launching process checks the recipe before any rank starts."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_targets(model, spec, where)


def lora_config(spec: LoRA, model_type: str | None = None, base: str | None = None):
    """peft's LoraConfig for `spec` (GPT-2's Conv1D stores weights transposed: fan_in_fan_out)."""
    peft = require_peft("models.*.lora")
    return peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        fan_in_fan_out=model_type == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def apply(model, spec: LoRA, seed: int, where: str, base: str | None = None):
    """`model` with LoRA adapters on `spec.target_modules`, every other weight frozen. Returns the
    model itself (its class unchanged), not a peft wrapper. `base`: the base weights' path, which
    a saved adapter names."""
    import torch

    peft = require_peft(where)
    check_targets(model, spec, where)
    config = lora_config(spec, model.config.model_type, base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same adapters on every rank, whatever the global RNG went through
        wrapped = peft.get_peft_model(model, config, adapter_name=ADAPTER)
    adapted = wrapped.get_base_model()
    setattr(adapted, _CONFIG_ATTRIBUTE, config)
    setattr(adapted, _SPEC_ATTRIBUTE, spec)
    return adapted


def spec_of(model) -> LoRA | None:
    """The recipe's LoRA settings of an adapted model, None for a model trained whole."""
    return getattr(model, _SPEC_ATTRIBUTE, None)


def trainable_parameters(model) -> int:
    """Parameters the optimizer updates (ZeRO-3 partitioned ones counted whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def _lora_layers(model) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def merged_state_dict(model, rank: int) -> dict:
    """On rank 0, the full weights of an adapted model with every adapter merged in, under the plain
    model's names (`...c_attn.base_layer.weight` + B @ A -> `...c_attn.weight`; the adapters
    themselves left out); gathered one layer at a time from the ZeRO-3 partitions. Collective."""
    import deepspeed

    layers = _lora_layers(model)
    state = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        plain = name.replace(".base_layer.", ".")
        layer = layers.get(owner.removesuffix(".base_layer")) if owner.endswith(".base_layer") else None
        if layer is not None and leaf == "weight":
            low_rank = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]  # type: ignore[attr-defined]
            with deepspeed.zero.GatheredParameters([param, *low_rank], modifier_rank=None):
                if rank == 0:
                    delta = layer.get_delta_weight(ADAPTER)  # type: ignore[attr-defined]
                    state[plain] = (param.detach() + delta.to(param.dtype)).to("cpu", copy=True)
        else:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    state[plain] = param.detach().to("cpu", copy=True)
    if rank == 0:
        persistent = set(model.state_dict().keys())
        state.update(
            {n.replace(".base_layer.", "."): b.detach().cpu() for n, b in model.named_buffers() if n in persistent}
        )
    return state


def adapter_state_dict(model, rank: int) -> dict:
    """On rank 0, the adapter alone under peft's saved names (`base_model.model.<module>.lora_A.weight`).
    Collective."""
    import deepspeed

    state = {}
    marker = f".{ADAPTER}."
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[f"base_model.model.{name.replace(marker, '.')}"] = param.detach().to("cpu", copy=True)
    return state


def save_adapter(model, state: dict, out_dir: Path) -> None:
    """The adapter in peft's format (adapter_config.json, adapter_model.safetensors): loadable with
    `peft.PeftModel.from_pretrained(base, out_dir)` on the base weights it was trained on."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    getattr(model, _CONFIG_ATTRIBUTE).save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"))
