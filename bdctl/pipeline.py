"""The paper's pipeline as an ordered list of stages, each with the command that runs it, and the
memory a model needs per GPU under ZeRO-2 and ZeRO-3.

    data split -> teacher SFT -> generate D* (+ cache) -> student SFT (phase 1)
               -> distill: BD, its ablations and the baselines (KD, SeqKD, MiniLLM) -> eval -> judge
"""

from __future__ import annotations

from dataclasses import dataclass

from bdctl.recipe.schema import ModelSpec, Recipe


@dataclass(frozen=True)
class Stage:
    directory: str  # under the run directory
    command: str  # with RECIPE where the recipe goes
    needs: tuple[str, ...]  # stage directories that must be finished first


def stages(recipe: Recipe) -> list[Stage]:
    """The pipeline for `recipe`, in the order it runs."""
    distill = recipe.stages.distill

    def dstar_of(changes: dict) -> str:  # the D* stage a BD run trains on
        return changes.get("dstar", distill.dstar)

    return [
        Stage("teacher_sft", "bdctl sft RECIPE --model teacher", ()),
        Stage("generate", "bdctl generate RECIPE", ("teacher_sft",)),
        *(
            Stage(f"generate-{name}", f"bdctl generate RECIPE --variant {name}", ("teacher_sft",))
            for name in recipe.stages.generate.variants
        ),
        # the teacher's distribution on the golden responses, for KD from the cache
        Stage("score_train", "bdctl generate RECIPE --score train", ("teacher_sft",)),
        Stage("student_sft", "bdctl sft RECIPE --model student", ()),
        Stage("distill/bd", "bdctl distill RECIPE --method bd", (dstar_of({}), "student_sft")),
        *(
            Stage(f"distill/{name}", f"bdctl distill RECIPE --ablation {name}", (dstar_of(changes), "student_sft"))
            for name, changes in distill.ablations.runs().items()
        ),
        Stage("distill/kd", "bdctl distill RECIPE --method kd", ("score_train",)),
        Stage("distill/seqkd", "bdctl distill RECIPE --method seqkd", (dstar_of({}),)),
        # online: the student's own rollouts with the live teacher (stages.generate.model) mixed in
        Stage("distill/minillm", "bdctl distill RECIPE --method minillm", ("teacher_sft", "student_sft")),
        Stage("eval", "bdctl eval RECIPE", tuple(recipe.stages.eval.models)),
        Stage("judge", f"bdctl judge RECIPE --backend {recipe.stages.judge.backend}", ("eval",)),
    ]


def stage_command(stage_dir: str, recipe_path: str) -> str:
    """The command that produces a stage directory (the one place for this map; `stages` below
    writes the same commands with RECIPE)."""
    if stage_dir.endswith("_sft"):
        return f"bdctl sft {recipe_path} --model {stage_dir.removesuffix('_sft')}"
    if stage_dir.startswith("distill/"):
        name = stage_dir.removeprefix("distill/")
        method = name in ("bd", "kd", "seqkd", "minillm")
        return f"bdctl distill {recipe_path} " + (f"--method {name}" if method else f"--ablation {name}")
    if stage_dir.startswith("score_"):
        return f"bdctl generate {recipe_path} --score {stage_dir.removeprefix('score_')}"
    if stage_dir.startswith("generate-"):  # a D* variant (stages.generate.variants)
        return f"bdctl generate {recipe_path} --variant {stage_dir.removeprefix('generate-')}"
    return f"bdctl {stage_dir} {recipe_path}"


# --------------------------------------------------------------------------- sizes


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
