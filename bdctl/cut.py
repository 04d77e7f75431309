"""Students cut from their teacher (`models.student: {from_teacher: ...}`, docs/method.md §8): a
subset of the teacher's decoder layers, in the teacher's order, with the teacher's embeddings,
final norm and output layer: the DistilBERT-style initialisation. Beyond the paper, whose students
are pretrained models of their own. The cut shares the teacher's tokenizer by construction.

Which layers (`choose_layers`), for a teacher of L layers and k kept:
  layers: [...]   exactly those (0-based, increasing, each < L)
  how: even       round(i (L-1) / (k-1)) for i = 0..k-1, rounding halves up: the first and the last
                  layer and evenly spaced ones between (k = 1: layer 0)
  how: ends       the first k-3 and the last 3 (k <= 3: the last k), e.g. 8 of 30: 0-4 and 27-29
"""

from __future__ import annotations

import math
import re
from typing import Any

from bdctl.errors import UserError
from bdctl.recipe.schema import FromTeacher

# model type -> the state-dict prefix of its decoder layers and the config field counting them
LAYER_LISTS = {
    "gpt2": ("transformer.h.", "n_layer"),
    "opt": ("model.decoder.layers.", "num_hidden_layers"),
    "qwen2": ("model.layers.", "num_hidden_layers"),
    "qwen3": ("model.layers.", "num_hidden_layers"),
    "llama": ("model.layers.", "num_hidden_layers"),
    "mistral": ("model.layers.", "num_hidden_layers"),
}
WHERE = "models.student.from_teacher"


def choose_layers(spec: FromTeacher, total: int) -> list[int]:
    """The teacher's layers the student keeps (module docstring), or one line on a choice that does
    not fit a teacher of `total` layers."""
    if spec.layers is not None:
        outside = [i for i in spec.layers if i >= total]
        if outside:
            raise UserError(
                f"{WHERE}.layers: layer {outside[0]} is out of range; the teacher has {total} layers (0 to {total - 1})"
            )
        return list(spec.layers)
    assert spec.keep is not None  # FromTeacher: exactly one of layers, keep
    k = spec.keep
    if k > total:
        raise UserError(f"{WHERE}.keep: {k} layers asked of a teacher that has {total}")
    if spec.how == "ends":
        return list(range(max(k - 3, 0))) + list(range(total - min(k, 3), total))
    if k == 1:
        return [0]
    return [math.floor(i * (total - 1) / (k - 1) + 0.5) for i in range(k)]


def layer_count(config) -> int:
    return int(getattr(config, _layer_list(config)[1]))


def cut(teacher, layers: list[int]):
    """A new model of the teacher's class and config with only `layers`, their weights and the
    teacher's embeddings, final norm and head copied exactly (built from the config, so each
    attention's cache index is its new position)."""
    import torch
    from transformers import AutoModelForCausalLM

    prefix = _layer_list(teacher.config)[0]
    config = with_layers(teacher.config, layers)
    # on the CPU, not the meta device: rotary tables are buffers no state dict carries
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    source = teacher.state_dict()
    weights = {}
    for name in student.state_dict():
        found = pattern.match(name)
        theirs = name if found is None else f"{prefix}{layers[int(found.group(1))]}.{name[found.end() :]}"
        weights[name] = source[theirs].detach().clone()
    student.load_state_dict(weights, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student.eval()


def with_layers(config, layers: list[int]):
    """A copy of a teacher's config for a student of `layers` (per-layer settings cut the same way)."""
    import copy

    config = copy.deepcopy(config)
    setattr(config, _layer_list(config)[1], len(layers))
    if isinstance(getattr(config, "layer_types", None), list):  # qwen2/3: sliding or full attention per layer
        config.layer_types = [config.layer_types[i] for i in layers]
    return config


def facts(layers: list[int], teacher_layers: int, student) -> dict[str, Any]:
    return {
        "kind": "from_teacher",
        "layers": layers,
        "teacher_layers": teacher_layers,
        "architecture": student.config.model_type,
        "parameters": sum(p.numel() for p in student.parameters()),
        "beyond_the_paper": "a student cut from its teacher's layers (DistilBERT-style initialisation)",
    }


def _layer_list(config) -> tuple[str, str]:
    found = LAYER_LISTS.get(config.model_type)
    if found is None:
        raise UserError(f"{WHERE}: cannot cut a {config.model_type!r} teacher (supported: {', '.join(LAYER_LISTS)})")
    return found
