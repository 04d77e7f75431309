"""Comparing layer choices for a student cut from its teacher (`bdctl recipes cuts`): each
candidate's golden-answer NLL on the run's validation examples, before any training, beside the
whole teacher's. A cheap way to pick `from_teacher` (beyond the paper, like the cut itself).

NLL here is the mean cross-entropy per response token (the tokens SFT scores: the reference
answer and its stop token, `data.batching.collate`), in nats, in float32, on the first n
validation examples of the run's split (made here if the run has none yet).
"""

from __future__ import annotations

from dataclasses import dataclass

from bdctl.cut import choose_layers, cut, layer_count
from bdctl.errors import UserError
from bdctl.recipe.schema import FromTeacher, Recipe
from bdctl.rundir import RunDir


@dataclass
class Candidate:
    name: str  # "teacher", "recipe", "even", "ends"
    layers: list[int]
    parameters: int
    nll: float


def candidates(recipe: Recipe, total: int, keep: int | None) -> dict[str, list[int]]:
    """name -> layers: the recipe's own choice (if its student is cut), and even / ends with the
    same number of layers (or `keep`). Choices equal to an earlier one are left out."""
    own = recipe.models.student.from_teacher
    if keep is None:
        if own is None:
            raise UserError("recipes cuts: the recipe's student is not cut from the teacher; pass --keep K")
        keep = len(choose_layers(own, total))
    found: dict[str, list[int]] = {}
    if own is not None:
        found["recipe"] = choose_layers(own, total)
    for how in ("even", "ends"):
        layers = choose_layers(FromTeacher(keep=keep, how=how), total)
        if layers not in found.values():
            found[how] = layers
    return found


def compare(recipe: Recipe, keep: int | None, examples: int, log=print) -> list[Candidate]:
    """The whole teacher and each candidate cut, scored on `examples` validation examples."""
    import torch
    from transformers import AutoModelForCausalLM

    from bdctl.data.batching import collate, tokenize_examples
    from bdctl.data.prepare import prepare_data, read_split
    from bdctl.models import build_models, load_tokenizer

    teacher_spec = recipe.models.teacher
    if teacher_spec.tiny is not None:
        raise UserError("recipes cuts: the teacher is tiny (random weights); cutting needs a path or gguf teacher")
    build_models(recipe, log)
    run = RunDir.of(recipe)
    prepare_data(recipe, run, log)
    tokenizer = load_tokenizer(run.tokenizer, template=recipe.data.template)
    rows = read_split(run.data, "valid")[:examples]
    batches = [
        collate(tokenize_examples(rows[i : i + 8], tokenizer), tokenizer.pad_token_id) for i in range(0, len(rows), 8)
    ]
    assert teacher_spec.location is not None
    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_spec.location, revision=teacher_spec.revision, dtype=torch.float32
    ).eval()
    total = layer_count(teacher.config)
    chosen = {"teacher": list(range(total)), **candidates(recipe, total, keep)}
    found = []
    for name, layers in chosen.items():
        model = teacher if name == "teacher" else cut(teacher, layers)
        found.append(Candidate(name, layers, sum(p.numel() for p in model.parameters()), response_nll(model, batches)))
        log(f"{name}: layers {layers}: NLL {found[-1].nll:.3f}")
    return found


def response_nll(model, batches: list[dict]) -> float:
    """Mean cross-entropy per scored token (labels != IGNORE) over all batches."""
    import torch

    from bdctl.data.batching import IGNORE

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum"
            )
            total += loss.item()
            count += int((batch["labels"] != IGNORE).sum())
    return total / max(count, 1)
