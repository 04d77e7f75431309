"""The recipe schema: one validated dataclass per section, with help text on every field.

A recipe is data, not code. Every stage of the pipeline (data, teacher SFT, generation, student
SFT, distillation, evaluation, judging) reads its settings from here; defaults are the paper's
(docs/method.md §3, 4 and 5) so a paper recipe states them explicitly only for readability.
Unknown keys are errors everywhere (`extra="forbid"`).
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from bdctl.methods import METHODS, method_names

#: Times a request is asked in all while its reply is not A, B or Tie. A sampling or overloaded
#: endpoint often answers properly on another try; a deterministic one repeats itself, so more
#: tries would only cost time before the reply is reported as unparsed.
#: (Defined here, the leaf every layer reads, because judge.max_unparsed's help text cites it.)
PARSE_TRIES = 3


#: Every seed bdctl uses reaches `torch.manual_seed` (model initialisation; at most 64 bits) or
#: numpy's `default_rng` (the judge's bootstrap interval; no negative seeds), so a recipe seed is a
#: 64-bit unsigned integer: a larger or negative one would be accepted and crash a minute later.
SEED_BOUND = 2**64
Seed = Annotated[int, Field(ge=0, lt=SEED_BOUND)]

#: models.<role> keys that change how much memory a run takes, not what it computes (losses and gradients
#: agree to fp32 tolerance): a checkpoint or data split made with other values still belongs to the run,
#: so that a run can resume with gradient checkpointing after running out of memory.
MEMORY_SWITCHES = ("gradient_checkpointing", "attn_implementation")
#: data keys whose default reproduces what recipes did before the key existed.
_DATA_DEFAULTS = {"format": "instruction", "system_prompt": None}


def fingerprint_view(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe dump (`model_dump(mode="json")`) as fingerprints (resume, data split) see it: without
    the memory switches, and without data keys at the default that reproduces the behaviour from
    before they existed (run directories made then keep their fingerprints)."""
    view = {**recipe, "models": dict(recipe["models"]), "data": dict(recipe["data"])}
    for role, spec in view["models"].items():
        if isinstance(spec, dict):
            view["models"][role] = {k: v for k, v in spec.items() if k not in MEMORY_SWITCHES}
    for key, default in _DATA_DEFAULTS.items():
        if view["data"].get(key, default) == default:
            view["data"].pop(key, None)
    return view


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment,
    numbers are finite (`lr: .inf` would only surface later as a non-finite loss), and a boolean
    is never a number (pydantic's lax mode reads `epochs: true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Not pydantic's strict mode: that would also refuse `lr: 1e-4`, which YAML reads as a string.
        if info.field_name is not None and _boolean_for_number(cls.model_fields[info.field_name].annotation, value):
            raise PydanticCustomError("bool_for_number", "expected a number, not true or false")
        return value


def _boolean_for_number(annotation: Any, value: Any) -> bool:
    """Whether `value` holds a boolean where `annotation` expects a number and no boolean."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _boolean_for_number(args[0], value)
    if isinstance(value, bool):
        options = args if origin in (typing.Union, types.UnionType) else (annotation,)
        options = tuple(typing.get_args(o)[0] if typing.get_origin(o) is Annotated else o for o in options)
        takes_bool = any(o is bool or o is Any or typing.get_origin(o) is Literal for o in options)
        return not takes_bool and any(o in (int, float) for o in options)
    if origin in (typing.Union, types.UnionType):
        return any(_boolean_for_number(option, value) for option in args if option is not type(None))
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        return any(_boolean_for_number(args[0], item) for item in value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(_boolean_for_number(args[1], item) for item in value.values())
    return False


def _exactly_one(section: BaseModel, names: tuple[str, ...], what: str) -> None:
    given = [n for n in names if getattr(section, n) is not None]
    if len(given) != 1:
        raise ValueError(f"{what} needs exactly one of {', '.join(names)}; got {given or 'none'}")


# --------------------------------------------------------------------------- models


class TinyModel(Section):
    """A randomly initialised model built from a config: the tiny recipes' teachers and students."""

    arch: Literal["gpt2", "opt", "qwen2"] = Field(description="Architecture family to build.")
    layers: int = Field(gt=0, description="Number of transformer blocks.")
    hidden: int = Field(gt=0, description="Hidden size (embedding width).")
    heads: int = Field(gt=0, description="Attention heads; must divide `hidden`.")
    kv_heads: int | None = Field(None, gt=0, description="Key/value heads (qwen2 only; default = heads).")
    ffn: int | None = Field(None, gt=0, description="Feed-forward width (default 4 x hidden).")
    max_positions: int = Field(256, gt=0, description="Longest sequence the model accepts.")
    seed: Seed | None = Field(None, description="Initialisation seed (default: the recipe seed), 0 to 2**64 - 1.")

    @model_validator(mode="after")
    def _check(self) -> TinyModel:
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        if self.kv_heads is not None and (self.arch != "qwen2" or self.heads % self.kv_heads):
            raise ValueError("kv_heads is a qwen2 setting and must divide heads")
        return self


class FromTeacher(Section):
    """A student made of some of the teacher's decoder layers, with the teacher's embeddings, final
    norm and output layer (DistilBERT-style initialisation; beyond the paper, whose students are
    pretrained models of their own). Cut from the recipe's teacher *base* weights (models.teacher:
    a path or a gguf file), never from teacher_sft's export. docs/method.md §12 defines the choices."""

    layers: list[int] | None = Field(
        None, description="The teacher's layers to keep, 0-based, increasing, e.g. [0, 1, 2, 3, 4, 27, 28, 29]."
    )
    keep: int | None = Field(None, gt=0, description="How many layers to keep, chosen by `how` (instead of layers).")
    how: Literal["even", "ends"] | None = Field(
        None,
        description="With keep: k of L layers. even (the default): round(linspace(0, L-1, k)) (first and last "
        "included); ends: the first k-3 and the last 3 (k <= 3: the last k).",
    )

    @model_validator(mode="after")
    def _check(self) -> FromTeacher:
        _exactly_one(self, ("layers", "keep"), "from_teacher")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("from_teacher.layers is empty; name at least one of the teacher's layers")
            if min(self.layers) < 0:
                raise ValueError(f"from_teacher.layers {self.layers}: layer numbers start at 0")
            if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ValueError(
                    f"from_teacher.layers {self.layers}: expected increasing layer numbers without repeats "
                    "(the student keeps the teacher's order)"
                )
        if self.how is not None and self.keep is None:
            raise ValueError("from_teacher.how goes with keep, not with layers")
        return self


class LoRA(Section):
    """Train low-rank adapters instead of every weight (Hu et al. 2021, through the `peft` library;
    `pip install 'bdctl[lora]'`). Beyond the paper, which fine-tunes every weight. The base weights
    stay frozen; checkpoints hold the adapter and its optimizer state; every export is the base
    with the adapter merged in, a plain Hugging Face directory."""

    r: int = Field(8, gt=0, description="Rank of each adapter (the inner width of B @ A).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is (alpha / r) B @ A.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input (0: runs repeat exactly, resume included)."
    )
    target_modules: list[str] = Field(
        min_length=1,
        description="Names of the linear layers that get an adapter, matched against the last part of each "
        "module's name (gpt2: c_attn, c_proj, c_fc; opt: q_proj, k_proj, v_proj, out_proj, fc1, fc2; "
        "qwen2 / llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). Not the output "
        "embedding: the losses read its weight directly.",
    )
    save_adapter: bool = Field(
        False, description="Also keep the adapter alone (peft's format) in `adapter/` inside every export."
    )


class ModelSpec(Section):
    """Where a model comes from: a hub id or local directory (`path`), a GGUF file (`gguf`),
    the teacher's layers (`from_teacher`, students only), or a `tiny` spec."""

    path: str | None = Field(None, description="Hugging Face hub id or local directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tiny: TinyModel | None = Field(None, description="Build a small random model instead of loading one.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block's activations in the backward pass instead of keeping them "
        "(transformers' gradient checkpointing): less activation memory for about one more forward pass per step. "
        "Applies where this model trains (sft, distill, minillm); losses and gradients are unchanged.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None,
        description="Attention kernel wherever this model trains or samples: eager (plain matmuls, keeps the "
        "sequence x sequence score matrix), sdpa (torch's scaled_dot_product_attention), flash_attention_2 (needs "
        "the flash-attn package and a CUDA GPU; refused when not installed); null: transformers' default.",
    )
    gguf: str | None = Field(
        None,
        description="A GGUF file (llama.cpp's format), converted once, dequantised, into a Hugging Face directory "
        "runs/<name>/models/<role>/ (needs the gguf extra: pip install 'bdctl[gguf]').",
    )
    from_teacher: FromTeacher | None = Field(
        None,
        description="(student only) Cut from the teacher's base weights, built once into runs/<name>/models/student/.",
    )
    # The Hugging Face directory a gguf or from_teacher model is built into; set by Recipe from the
    # run directory (RunDir.built_model), never by hand, so every process computes the same one.
    _built: str | None = PrivateAttr(None)
    lora: LoRA | None = Field(
        None,
        description="Train this model through LoRA adapters in every stage that trains it (sft, distill, "
        "minillm); default: every weight, as the paper does.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        _exactly_one(self, ("path", "tiny", "gguf", "from_teacher"), "a model")
        if self.revision is not None and self.path is None:
            raise ValueError("revision goes with path (a hub id), not with tiny, gguf or from_teacher")
        return self

    @property
    def location(self) -> str | None:
        """Where from_pretrained reads this model: its path, the directory its gguf file or its cut is
        built into (bdctl.models.build_models), or None for a tiny spec (built in memory)."""
        if self.path is not None or self.tiny is not None:
            return self.path
        assert self._built is not None, "a gguf / from_teacher spec outside a Recipe has no directory"
        return self._built

    @property
    def label(self) -> str:
        """The source in a few words, as tables and messages show it."""
        if self.tiny is not None:
            return f"{self.tiny.arch} (tiny)"
        if self.gguf is not None:
            return f"{self.gguf} (gguf)"
        if self.from_teacher is not None:
            chosen = self.from_teacher.layers or f"{self.from_teacher.keep}, {self.from_teacher.how or 'even'}"
            return f"teacher's layers {chosen}"
        return str(self.path) if self.revision is None else f"{self.path}@{self.revision}"


class TokenizerTraining(Section):
    """A byte-level BPE trained deterministically on the recipe's own data (tiny recipes)."""

    vocab_size: int = Field(gt=256, description="Target vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Pairs seen fewer times are not merged.")


class TokenizerSpec(Section):
    """The one vocabulary teacher and student share (docs/method.md §2)."""

    path: str | None = Field(None, description="Hub id or local directory (default: the teacher's own).")
    gguf: str | None = Field(
        None,
        description="The tokenizer (and chat template) of a GGUF file, converted once into "
        "runs/<name>/models/tokenizer/.",
    )
    train: TokenizerTraining | None = Field(None, description="Train a BPE on the recipe's data instead.")
    _built: str | None = PrivateAttr(None)  # as ModelSpec._built

    @model_validator(mode="after")
    def _check(self) -> TokenizerSpec:
        given = [name for name in ("path", "gguf", "train") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"a tokenizer takes one of path, gguf or train, not {' and '.join(given)}")
        return self

    @property
    def location(self) -> str | None:
        """Where the tokenizer is read from: path, the directory its gguf is converted into, or None."""
        return self.path if self.gguf is None else self._built


class Models(Section):
    teacher: ModelSpec = Field(description="The teacher (fine-tuned by `sft --model teacher`).")
    student: ModelSpec = Field(description="The student to distil into.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The shared tokenizer.")

    @model_validator(mode="after")
    def _check(self) -> Models:
        tiny = self.teacher.tiny is not None or self.student.tiny is not None
        if self.teacher.from_teacher is not None:
            raise ValueError("teacher: from_teacher is for the student (a teacher is a path, gguf or tiny)")
        if self.student.from_teacher is not None and self.teacher.tiny is not None:
            raise ValueError(
                "student.from_teacher needs a teacher with path or gguf (a tiny teacher has no weights to cut)"
            )
        own = self.tokenizer.path is None and self.tokenizer.gguf is None and self.tokenizer.train is None
        if own and self.teacher.tiny is not None:
            raise ValueError("tiny teachers need tokenizer.train (or tokenizer.path)")
        if self.tokenizer.train is not None and not tiny:
            raise ValueError("tokenizer.train is only for tiny models; real models bring their own")
        return self


# --------------------------------------------------------------------------- data


class FieldMap(Section):
    """Which columns of the source hold the instruction, the optional input and the answer."""

    instruction: str = Field("instruction", description="Column with the instruction.")
    input: str | None = Field("input", description="Column with the optional input (null: none).")
    output: str = Field("output", description="Column with the reference answer.")


class SyntheticInstructions(Section):
    n: int = Field(gt=0, description="Number of examples to generate.")
    families: list[str] | None = Field(None, description="Task families to use (default: all).")


class InstructionSource(Section):
    """An instruction data set: synthetic, a local file, or a `datasets` hub name."""

    synthetic: SyntheticInstructions | None = Field(None, description="The built-in synthetic tasks.")
    path: str | None = Field(None, description="Local .jsonl, .json or .parquet file.")
    hub: str | None = Field(None, description="`datasets` name, e.g. databricks/databricks-dolly-15k.")
    hub_config: str | None = Field(None, description="`datasets` configuration name.")
    hub_split: str = Field("train", description="`datasets` split to read.")
    fields: FieldMap = Field(default_factory=FieldMap, description="Column names.")

    @model_validator(mode="after")
    def _check(self) -> InstructionSource:
        _exactly_one(self, ("synthetic", "path", "hub"), "a data source")
        return self


class Template(Section):
    """The prompt template (docs/method.md §7.2); `{instruction}` and `{input}` are filled in."""

    with_input: str = Field(description="Template for examples that have an input.")
    without_input: str = Field(description="Template for examples without an input.")

    @model_validator(mode="after")
    def _check(self) -> Template:
        if "{instruction}" not in self.with_input or "{input}" not in self.with_input:
            raise ValueError("with_input must contain {instruction} and {input}")
        if "{instruction}" not in self.without_input:
            raise ValueError("without_input must contain {instruction}")
        return self


class Split(Section):
    valid: int = Field(500, ge=1, description="Validation examples.")
    test: int = Field(500, ge=0, description="Test examples (the DollyEval set).")
    seed: Seed = Field(42, description="Seed of the random split, 0 to 2**64 - 1.")


class SyntheticCorpus(Section):
    n_docs: int = Field(gt=0, description="Number of synthetic documents.")


class PretrainCorpus(Section):
    """The pretraining corpus of the LM term (docs/method.md §5), packed into blocks."""

    synthetic: SyntheticCorpus | None = Field(None, description="The built-in synthetic corpus.")
    path: str | None = Field(None, description="Local .txt (one document per line) or .jsonl file.")
    hub: str | None = Field(None, description="`datasets` name, e.g. Skylion007/openwebtext (streamed).")
    hub_config: str | None = Field(None, description="`datasets` configuration name.")
    hub_split: str = Field("train", description="`datasets` split to read.")
    text_field: str = Field("text", description="Column holding the text.")
    block_size: int = Field(512, gt=1, description="Tokens per packed block.")

    @model_validator(mode="after")
    def _check(self) -> PretrainCorpus:
        _exactly_one(self, ("synthetic", "path", "hub"), "a pretraining corpus")
        return self


class Data(Section):
    source: InstructionSource = Field(description="The instruction data (Dolly in the paper).")
    template: Template | Literal["chat"] | None = Field(
        None,
        description="Prompt template: null (default: bdctl's Alpaca-style wording), {with_input, without_input} "
        "(your own wording), or chat: the tokenizer's own chat template (tokenizer.apply_chat_template), with the "
        "instruction, a blank line and the input (when there is one) as the user turn and the answer as the assistant "
        "turn; the template's end-of-turn token then ends every response (SFT labels, D* sampling, BD's terminal "
        "transitions, eval). chat needs a tokenizer that has a chat template (models.tokenizer.path or the teacher's).",
    )
    format: Literal["instruction", "messages", "sharegpt"] = Field(
        "instruction",
        description="Record format of data.source: instruction (one instruction / input / output turn, through "
        'data.source.fields), messages (OpenAI-style {"messages": [{"role": system|user|assistant, '
        '"content"}, ...]}) '
        'or sharegpt ({"conversations": [{"from": system|human|gpt, "value"}, ...]}). Conversations need '
        "data.template: chat; SFT trains on every assistant turn, and generate, distill, MiniLLM and eval work on the "
        "last assistant turn given the conversation before it. A conversation that does not end with an assistant "
        "turn, has an unknown role, or does not fit max_length is dropped and counted in data/split.json.",
    )
    system_prompt: str | None = Field(
        None,
        description="System turn of data.template: chat: null (default) leaves the chat template's own default; a "
        "string is the system turn of every example that has none of its own; none leaves the template's default "
        "system text out where the template allows it (it renders with an empty system turn when that is shorter "
        "than the default). Counted against max_prompt_length like the rest of the prompt.",
    )
    split: Split = Field(default_factory=Split, description="Train / validation / test split.")
    max_length: int = Field(512, gt=1, description="Longest prompt + response in tokens; longer are dropped.")
    max_prompt_length: int = Field(256, gt=0, description="Longest prompt in tokens; longer are dropped.")
    pretrain: PretrainCorpus | None = Field(None, description="Pretraining corpus for the LM term.")

    @model_validator(mode="after")
    def _check(self) -> Data:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if self.format != "instruction" and self.template != "chat":
            raise ValueError(
                f"data.format: {self.format} is rendered with the tokenizer's chat template: set data.template: chat"
            )
        if self.format != "instruction" and self.source.synthetic is not None:
            raise ValueError(
                f"data.format: {self.format} reads conversations from data.source.path or hub, not synthetic"
            )
        if self.system_prompt is not None and self.template != "chat":
            raise ValueError("data.system_prompt is the system turn of a chat template: set data.template: chat")
        return self


# --------------------------------------------------------------------------- deepspeed


class DeepSpeed(Section):
    config: str = Field("zero3", description="A file in deepspeed_configs/ (without .json) or a path.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, fp32 on CPU."
    )


# --------------------------------------------------------------------------- experiment trackers


TrackerName = Literal["tensorboard", "wandb", "mlflow"]


class TensorBoardSettings(Section):
    log_dir: str | None = Field(
        None,
        description="Where event files go: <log_dir>/<recipe>/<stage>/ (default: <stage directory>/tensorboard/, so "
        "`tensorboard --logdir runs/<name>` shows every stage).",
    )


class WandbSettings(Section):
    project: str = Field("bdctl", description="W&B project the runs go to.")
    entity: str | None = Field(None, description="W&B entity (user or team; default: your default entity).")
    mode: Literal["online", "offline"] | None = Field(
        None,
        description="online or offline (run files kept in <stage directory>/wandb/, upload later with `wandb sync`); "
        "default: WANDB_MODE, else online (needs `wandb login` or WANDB_API_KEY).",
    )
    tags: list[str] = Field(default_factory=list, description="Tags added to every run of this recipe.")


class MlflowSettings(Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (a server http://host:5000, file:/path or databricks); default: "
        "MLFLOW_TRACKING_URI, else a local file store in <run directory>/mlruns.",
    )
    experiment: str = Field("bdctl", description="MLflow experiment the runs go to (created if missing).")


class Tracking(Section):
    """Experiment trackers that receive what metrics.jsonl receives (rank 0 only)."""

    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="Trackers to send metrics to: any of tensorboard, wandb, mlflow (default: none; `--report-to` on "
        "the command line overrides it). Each run is named <recipe>/<stage>; a resumed stage continues its run.",
    )
    tensorboard: TensorBoardSettings = Field(default_factory=TensorBoardSettings, description="TensorBoard settings.")
    wandb: WandbSettings = Field(default_factory=WandbSettings, description="Weights & Biases settings.")
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings, description="MLflow settings.")


# --------------------------------------------------------------------------- stages


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # names that become directory names


class Protocol(Section):
    """A named sampling protocol: how answers are sampled for evaluation and Rouge-L selection
    (docs/method.md §8). Every model is evaluated under every protocol of stages.eval."""

    name: str = Field(pattern=_NAME, description="Name shown in tables and directories, e.g. minillm or release.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus: sample inside the top-p set (1.0: off).")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: off).")

    def sampling(self) -> dict[str, float | int]:
        """The keyword arguments of `bdctl.sampling.sample` this protocol sets."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def _default_protocols() -> list[Protocol]:
    return [Protocol(name="minillm")]  # MiniLLM's protocol: temperature 1, top_p 1.0, top_k 0


# AdamW's (beta1, beta2): the one definition stages.*.adam_betas and stages.distill.minillm.adam_betas share.
AdamBetas = tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]


class Train(Section):
    """Settings every training stage shares."""

    lr: float = Field(5e-6, gt=0, description="Peak learning rate (AdamW).")
    epochs: int = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Global batch: micro batch x accumulation x ranks.")
    micro_batch_size: int = Field(8, gt=0, description="Examples per rank per forward pass.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: AdamBetas | None = Field(
        None,
        description="AdamW (beta1, beta2) (null: the DeepSpeed config's; bdctl's configs have [0.9, 0.999]). "
        "The BD release: [0.9, 0.95].",
    )
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear",
        description="Learning rate after the warm-up, over schedule_steps: linear decay to zero, cosine decay to "
        "zero (transformers' get_cosine_schedule_with_warmup, the BD release's cosine_trm) or constant.",
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Share of schedule_steps with linear warm-up (used when warmup_steps is null)."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warm-up steps; replaces warmup_ratio (set one of them, not both)."
    )
    schedule_steps: int | None = Field(
        None,
        gt=0,
        description="Length of the schedule in optimizer steps (null: the run's steps). The BD release decays over "
        "5000 whatever its run's length; a run longer than schedule_steps is refused.",
    )
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clipping (0: off).")
    eval_every: int = Field(0, ge=0, description="Validate every N steps (0: once per epoch), and after the last step.")
    select: Literal["val_loss", "rouge_l"] = Field(
        "val_loss",
        description="Which validation score keeps a checkpoint: val_loss (lowest cross-entropy on the golden "
        "responses) or rouge_l (highest Rouge-L of answers sampled like stages.eval does).",
    )
    select_prompts: int | None = Field(
        None, gt=0, description="rouge_l: score the first N validation prompts (null: all of them)."
    )
    select_protocol: str | None = Field(
        None,
        description="rouge_l: the stages.eval protocol the validation answers are sampled with; it picks "
        "the stage's export (null: the first protocol).",
    )
    select_each_protocol: bool = Field(
        False,
        description="rouge_l: validate under every stages.eval protocol and keep one best export per protocol "
        "(export-<protocol>/); bdctl eval scores each protocol with the checkpoint chosen under it.",
    )
    checkpoint_every: int = Field(0, ge=0, description="DeepSpeed checkpoint every N steps (0: per epoch).")
    keep_checkpoints: int = Field(2, ge=1, description="How many DeepSpeed checkpoints to keep.")
    keep_checkpoints_after_finish: bool = Field(
        False,
        description="Keep the DeepSpeed checkpoints once the stage has finished and written its export (default: "
        "drop them; a finished stage needs only its export, metrics and manifest, and --force starts over).",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss stops the run, or its step is skipped (and counted)."
    )
    init: str = Field("base", description="Start weights: base, a stage name (its export), or a path.")

    @model_validator(mode="after")
    def _check_batch(self) -> Train:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) and warmup_ratio ({self.warmup_ratio:g}) are both set; "
                "give one of them"
            )
        if (
            self.warmup_steps is not None
            and self.schedule_steps is not None
            and self.warmup_steps >= self.schedule_steps
        ):
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than schedule_steps ({self.schedule_steps})"
            )
        return self


class SFTStage(Train):
    """Supervised fine-tuning (teacher SFT, student phase 1, the SFT baseline)."""


class GenerateVariant(Section):
    """A second teacher data set D* beside runs/<name>/generate: the same teacher and cache with
    some sampling settings changed (unset fields inherit stages.generate's). It is made by
    `bdctl generate RECIPE --variant NAME` into runs/<name>/generate-NAME, and a distill run trains
    on it with `stages.distill.dstar: generate-NAME`."""

    top_p: float | None = Field(None, gt=0, le=1, description="See stages.generate.top_p.")
    temperature: float | None = Field(None, gt=0, description="See stages.generate.temperature.")
    n_samples: int | None = Field(None, gt=0, description="See stages.generate.n_samples.")


class GenerateStage(Section):
    """Teacher data D* and the sparse top-p teacher cache (docs/method.md §2 and §7.3)."""

    model: str = Field("teacher_sft", description="Teacher weights: a stage name (its export) or a path.")
    n_samples: int = Field(8, gt=0, description="Responses sampled per training prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (no top-k).")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Sample D* from the teacher's top-p set, computed exactly as the cache stores it (same tie "
        "rule, crossing token kept, capped at cache_max_k) and renormalised (1.0: the whole vocabulary, the paper's "
        "protocol). With top_p == cache_top_p every action of D* lies in its cached set A_t (docs/method.md §3.4).",
    )
    max_new_tokens: int = Field(
        256,
        gt=0,
        description="Longest response, and at most data.max_length - prompt length; longer ones are truncated.",
    )
    batch_size: int = Field(
        16, gt=0, description="Sequences (prompt x sample) sampled together per batch per rank; one cache shard each."
    )
    cache_top_p: float = Field(0.8, gt=0, le=1, description="p of the cached top-p teacher sets.")
    cache_max_k: int = Field(64, gt=0, le=65535, description="Cap on cached tokens per position.")
    zero_inference: bool = Field(False, description="Run the teacher as a ZeRO-3 inference engine.")
    report_examples: int = Field(
        256, gt=0, description="Sequences re-scored (top 50, p = 1) for the sparsity report; an even spread of D*."
    )
    variants: dict[Annotated[str, Field(pattern=_NAME)], GenerateVariant] = Field(
        default_factory=dict,
        description="Further D* sets, each in runs/<name>/generate-<variant> (e.g. {nucleus: {top_p: 0.8}}).",
    )

    def variant(self, name: str | None) -> GenerateStage:
        """These settings with a variant's changes applied (None: the base D*)."""
        if name is None:
            return self
        changes = self.variants[name].model_dump(exclude_none=True)
        return self.model_copy(update={**changes, "variants": {}})


class Ablations(Section):
    """Extra Bellman Distill runs beside distill/bd, each changing one setting of stages.distill
    (the paper's Tables 2 and 4). Each value names a run: p -> distill/bd-p1.0, chi2 ->
    distill/bd-chi2-off, variant -> distill/bd-released; `bdctl distill RECIPE --ablation NAME`
    runs one, `bdctl reproduce` runs them all. A `combined` run that sets `method` ablates another
    distill method the same way (e.g. {kd-lr1e-4: {method: kd, lr: 1.0e-4}} -> distill/kd-lr1e-4)."""

    p: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=list, description="Top-p values to compare with stages.distill.p, e.g. [1.0, 0.5]."
    )
    chi2: list[bool] = Field(default_factory=list, description="chi^2 on/off, e.g. [false] for BD without it.")
    variant: list[Literal["paper", "released"]] = Field(
        default_factory=list, description="Loss variants, e.g. [released] for the released code's arithmetic."
    )
    outside: list[Literal["q_min", "drop"]] = Field(
        default_factory=list, description="Out-of-set actions, e.g. [drop] -> distill/bd-outside-drop."
    )
    anchor_coef: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=list, description="Anchor weights (beyond the paper), e.g. [0.5] -> distill/bd-anchor0.5."
    )
    alpha: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list, description="chi^2 strengths, e.g. [1.0] -> distill/bd-alpha1.0."
    )
    dstar: list[str] = Field(
        default_factory=list,
        description="D* sets to train on, e.g. [generate-nucleus] -> distill/bd-dstar-nucleus.",
    )
    released_eps: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list,
        description="The released variant at these epsilons (stages.distill.eps), e.g. [1.0e-4] -> "
        "distill/bd-released-eps0.0001 (variant: released, eps: 1e-4).",
    )
    combined: dict[Annotated[str, Field(pattern=_NAME)], dict[str, Any]] = Field(
        default_factory=dict,
        description="Named runs changing several stages.distill settings at once, e.g. "
        "{bd-nucleus-drop: {dstar: generate-nucleus, outside: drop}} -> distill/bd-nucleus-drop; with `method` "
        "(default bd) a run of another method, e.g. {jsd-beta0.9: {method: jsd, divergence: {jsd_beta: 0.9}}} "
        "(a nested section is replaced whole). Not minillm, and a name may not be a method's.",
    )

    def runs(self) -> dict[str, dict[str, Any]]:
        """Run name -> the stages.distill settings it changes."""
        names: dict[str, dict[str, Any]] = {}
        for value in self.p:
            names[f"bd-p{float(value)}"] = {"p": float(value)}
        for value in self.chi2:
            names[f"bd-chi2-{'on' if value else 'off'}"] = {"chi2": value}
        for variant in self.variant:
            names[f"bd-{variant}"] = {"variant": variant}
        for outside in self.outside:
            names[f"bd-outside-{outside.replace('_', '')}"] = {"outside": outside}
        for value in self.anchor_coef:
            names[f"bd-anchor{float(value)}"] = {"anchor_coef": float(value)}
        for value in self.alpha:
            names[f"bd-alpha{float(value)}"] = {"alpha": float(value)}
        for dstar in self.dstar:
            names[f"bd-dstar-{dstar.removeprefix('generate-')}"] = {"dstar": dstar}
        for value in self.released_eps:
            names[f"bd-released-eps{float(value)}"] = {"variant": "released", "eps": float(value)}
        for name, changes in self.combined.items():
            names[name] = dict(changes)
        return names


class MiniLLM(Section):
    """MiniLLM, the paper's fourth baseline (docs/method.md §6): the reverse KL KL(q_theta || p) by a
    clipped policy gradient on responses the student samples itself, the live teacher mixed into the
    sampling. Defaults are the MiniLLM code's ([C]), which produced the published numbers; where the
    MiniLLM paper ([P]) differs, the help text says so. `bdctl distill --method minillm` runs it into
    runs/<name>/distill/minillm; the shared settings of stages.distill (batch sizes, grad_clip, select,
    init, lm_coef, checkpoints) apply unless overridden below."""

    teacher_mix: float = Field(
        0.2, ge=0, lt=1, description="a: rollouts sample from (1 - a) q_student + a p_teacher at every token."
    )
    reward_scale: float = Field(0.5, gt=0, description="r_t = (log p - log q_old) / reward_scale, before the clip.")
    reward_clip: float = Field(100.0, gt=0, description="r_t is clipped to [-reward_clip, reward_clip].")
    discount: float = Field(0.95, ge=0, le=1, description="g of the returns G_t = sum_t' g^(t'-t) r_t' ([P]: 1).")
    length_norm: bool = Field(True, description="Divide G_t by the number of response tokens from t to the end.")
    whiten: bool = Field(True, description="Whiten the advantages over each minibatch (mean 0, std 1).")
    ppo_clip: float = Field(0.2, gt=0, lt=1, description="The ratio is clipped to [1 - ppo_clip, 1 + ppo_clip].")
    single_step: bool = Field(
        True, description="Add the single-step term: the exact reverse KL at every response token."
    )
    num_rollouts: int = Field(
        256, gt=0, description="Prompts answered per collection (one response each); a multiple of batch_size."
    )
    ppo_epochs: int = Field(4, ge=1, description="Passes of minibatches (batch_size rollouts each) over a collection.")
    pt_kd_ratio: float = Field(
        0.5, ge=0, le=1, description="k of the pretraining term L_PT = (1 - k) CE + k KD, live teacher ([P]: 0)."
    )
    pretrain_term: bool | None = Field(
        None,
        description="MiniLLM's pretraining term L_PT on data.pretrain: true / false; null (default) = on when the "
        "recipe has data.pretrain. MiniLLM's own switch: stages.distill.pretrain_term is BD's.",
    )
    max_new_tokens: int = Field(
        256, gt=0, description="Longest rollout response (after prompts of up to data.max_prompt_length)."
    )
    rollout_batch_size: int = Field(16, gt=0, description="Prompts sampled together per rank during a collection.")
    zero_inference: bool = Field(
        False,
        description="Partition the teacher over the ranks (ZeRO-3 inference engine) instead of a whole copy per rank.",
    )
    lr: float | None = Field(None, gt=0, description="Peak learning rate (null: stages.distill.lr); MiniLLM: 5e-6.")
    weight_decay: float | None = Field(
        None, ge=0, description="AdamW weight decay (null: stages.distill.weight_decay); MiniLLM: 1e-6."
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warm-up steps (null: stages.distill's warmup_steps / warmup_ratio); MiniLLM: 100.",
    )
    adam_betas: AdamBetas | None = Field(
        None, description="AdamW betas (null: stages.distill.adam_betas); MiniLLM: [0.9, 0.95]."
    )
    eval_every: int | None = Field(
        None, ge=0, description="Validate every N steps (null: stages.distill.eval_every); MiniLLM: 100."
    )
    max_steps: int | None = Field(
        None, gt=0, description="Stop after N steps (null: stages.distill.max_steps); MiniLLM: 5000."
    )


class Divergence(Section):
    """BEYOND THE PAPER: the divergence menu of other toolkits (docs/method.md §5.1), the settings of
    `--method forward_kl | reverse_kl | jsd | tvd | skew_kl | skew_rkl`. From a live teacher the
    divergence is exact (dense); from the cache (teacher_source: cache) it is computed between the
    distributions coarse-grained to the cached set A_t plus one tail bucket (never larger than exact)."""

    jsd_beta: float = Field(
        0.5, ge=0, le=1,
        description="jsd: beta of TRL's generalized JSD, beta KL(p||m) + (1 - beta) KL(q||m) with m = beta p + "
        "(1 - beta) q; 0 is taken as forward KL and 1 as reverse KL (TRL's convention). TRL's default: 0.5.",
    )  # fmt: skip
    skew_alpha: float = Field(
        0.1, ge=0, lt=1,
        description="skew_kl / skew_rkl: the skew a of DistiLLM's KL(p || a p + (1 - a) q) and "
        "KL(q || a q + (1 - a) p) (0: plain forward / reverse KL). DistiLLM's default: 0.1.",
    )  # fmt: skip
    temperature: float = Field(
        1.0, gt=0,
        description="tau dividing both logits before the softmax; the loss is scaled by tau^2. Needs "
        "teacher_source: live unless 1 (the cache holds the teacher's probabilities at temperature 1 only).",
    )  # fmt: skip
    data: Literal["golden", "dstar"] = Field(
        "golden",
        description="The responses scored: golden (data/train.jsonl's, with the score_train cache or the live "
        "teacher) or dstar (stages.distill.dstar's D*, with its cache or the live teacher).",
    )
    on_policy: float = Field(
        0.0,
        ge=0,
        le=1,
        description="GKD's lambda: the share of batches whose responses the student samples and the live teacher "
        "scores. Not implemented yet: only 0 (off-policy) is accepted.",
    )


class DistillStage(Train):
    """Bellman Distill, the KD / SeqKD / MiniLLM baselines and the divergence menu (docs/method.md §3 to 6)."""

    method: str = Field(
        "bd",
        description=f"Objective (`bdctl distill --method` overrides it): {method_names()} "
        "(bdctl/methods.py; the divergences are beyond the paper).",
    )
    teacher_source: Literal["cache", "live"] = Field("cache", description="Sparse cache or live teacher.")
    p: float = Field(0.8, gt=0, le=1, description="Top-p of the teacher candidate sets (1.0: no mask).")
    alpha: float = Field(0.1, gt=0, description="chi^2 regulariser strength.")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount.")
    q_min: float = Field(
        -10.0, lt=0, allow_inf_nan=False, description="Lower clip of Q (and value of actions outside A_t)."
    )
    chi2: bool = Field(True, description="Use the chi^2 regulariser phi(x) = x - x^2 / (4 alpha).")
    variant: Literal["paper", "released"] = Field("paper", description="Eq. 17 or the released code.")
    eps: float = Field(
        1e-6,
        gt=0,
        description="released variant: the epsilon added to every entry of the projected policy before it is "
        "renormalised (docs/method.md §4). The release never publishes its value (args.epsilon, from an arguments "
        "file it does not ship); 1e-6 is bdctl's choice. It decides the direction: <= 1e-6 raised the mass on A_t "
        "in a tabular chain, 1e-4 drove the arg-max out of A_t.",
    )
    lm_coef: float = Field(1.0, ge=0, description="Weight of the pretraining LM term.")
    pt_kd_ratio: float = Field(0.0, ge=0, le=1, description="Teacher KD mixed into the LM term.")
    kd_ratio: float = Field(0.5, ge=0, le=1, description="r in (1 - r) CE + r KD (MiniLLM: 0.5).")
    seqkd_kd_ratio: float = Field(
        0.0, ge=0, le=1, description="SeqKD only: r of (1 - r) CE + r KD on D* (0: plain SFT on D*, as MiniLLM)."
    )
    pretrain_term: bool | None = Field(
        None,
        description="The LM term on data.pretrain: true / false; null (default) = on for bd when data.pretrain "
        "is set, off for the kd / seqkd baselines (MiniLLM trained them without it). minillm has its own switch "
        "(stages.distill.minillm.pretrain_term).",
    )
    outside: Literal["q_min", "drop"] = Field(
        "q_min",
        description="What a D* action outside the teacher's set A_t gets: q_min (Eq. 17 with the release's clip, "
        "the paper) or drop (the transition is left out of every term, like a truncated last one; "
        "docs/method.md §3.4).",
    )
    anchor_coef: float = Field(
        0.0,
        ge=0,
        description="BEYOND THE PAPER: + anchor_coef x the token-mean cross-entropy of D*'s actions (the SeqKD "
        "term) over BD's transitions, to keep the student's mass where the teacher's is (0: the paper's loss).",
    )
    dstar: str = Field(
        "generate",
        description="The D* (and cache) bd and seqkd train on: generate, or generate-<variant> of "
        "stages.generate.variants.",
    )
    init: str = Field("auto", description="auto: student_sft export for BD, the base student otherwise.")
    diagnostic_responses: int = Field(
        64,
        ge=0,
        description="At every validation, every method (kd, seqkd, bd, minillm) logs the student's mass on A_t, "
        "the share of positions whose arg-max lies in A_t, the NLL of D*'s actions, the outside share and mean V "
        "on the first N responses of the D* cache (bdctl/diagnostics.py; 0: off).",
    )
    ablations: Ablations = Field(default_factory=Ablations, description="Extra BD runs, one setting changed each.")
    minillm: MiniLLM = Field(default_factory=MiniLLM, description="MiniLLM's settings (--method minillm).")
    divergence: Divergence = Field(
        default_factory=Divergence,
        description="BEYOND THE PAPER: the settings of the divergence methods (--method jsd, tvd, ...).",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}: expected one of {method_names()}")
        return value

    @model_validator(mode="after")
    def _check_divergence(self) -> DistillStage:
        if METHODS[self.method].divergence is None:
            return self
        if self.divergence.on_policy > 0:
            raise ValueError(
                f"divergence.on_policy is {self.divergence.on_policy:g}: on-policy mixing (GKD's lambda) is not "
                "implemented yet; set 0"
            )
        if self.divergence.temperature != 1.0 and self.teacher_source == "cache":
            raise ValueError(
                f"divergence.temperature is {self.divergence.temperature:g} but the teacher cache holds "
                "probabilities at temperature 1 only; set teacher_source: live or temperature: 1"
            )
        return self

    @model_validator(mode="after")
    def _check_minillm(self) -> DistillStage:
        if self.method == "minillm" and self.minillm.num_rollouts % self.batch_size:
            raise ValueError(
                f"minillm.num_rollouts ({self.minillm.num_rollouts}) must be a multiple of batch_size "
                f"({self.batch_size}): a collection is cut into whole minibatches"
            )
        return self


class EvalSet(Section):
    """One evaluation set: the data stage's test split, or a file / hub set with references."""

    name: str = Field(description="Name shown in tables (dolly, selfinst, vicuna, ...).")
    split: Literal["test", "valid"] | None = Field(None, description="Use the data stage's split.")
    path: str | None = Field(None, description="Local .jsonl, .json or .parquet file.")
    hub: str | None = Field(None, description="`datasets` name.")
    hub_config: str | None = Field(None, description="`datasets` configuration name.")
    hub_split: str = Field("test", description="`datasets` split to read.")
    fields: FieldMap = Field(default_factory=FieldMap, description="Column names (output may be a list).")
    limit: int | None = Field(None, gt=0, description="Use only the first N examples.")

    @model_validator(mode="after")
    def _check(self) -> EvalSet:
        _exactly_one(self, ("split", "path", "hub"), f"eval set {self.name!r}")
        return self


class EvalStage(Section):
    protocols: list[Protocol] = Field(
        default_factory=_default_protocols,
        description="Named sampling protocols; every model is evaluated under each (default: one, minillm: "
        "temperature 1, top_p 1.0, top_k 0). E.g. [{name: minillm}, {name: release, top_p: 0.8}].",
    )
    models: list[str] = Field(
        default_factory=lambda: ["teacher_sft", "student_sft"],
        description="Stage names (their exports), local directories or hub ids.",
    )
    sets: list[EvalSet] = Field(
        default_factory=lambda: [EvalSet(name="dolly", split="test")], description="Evaluation sets."
    )
    seeds: list[Seed] = Field(
        default_factory=lambda: [10, 20, 30, 40, 50], description="Sampling seeds, each 0 to 2**64 - 1."
    )
    max_new_tokens: int = Field(256, gt=0, description="Longest generated answer.")
    no_repeat_ngram_size: int | None = Field(None, gt=0, description="MiniLLM used 6.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch per rank.")

    @model_validator(mode="after")
    def _check_protocols(self) -> EvalStage:
        names = [p.name for p in self.protocols]
        if not names:
            raise ValueError("protocols is empty; give at least one (e.g. [{name: minillm}])")
        if len(set(names)) != len(names):
            raise ValueError(f"protocols: two protocols share a name ({', '.join(names)})")
        return self

    def protocol(self, name: str | None) -> Protocol:
        """The protocol called `name` (None: the first)."""
        if name is None:
            return self.protocols[0]
        return next(p for p in self.protocols if p.name == name)


class JudgeStage(Section):
    backend: Literal["hf", "openai"] = Field("hf", description="Local causal-LM judge or an HTTP endpoint.")
    hf_model: str = Field("teacher_sft", description="hf backend: a stage name or model path.")
    base_url: str = Field("https://api.openai.com/v1", description="openai backend: endpoint.")
    api_model: str = Field("gpt-4o-mini", description="openai backend: model name (the paper's judge).")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the key ('none': the endpoint needs no key)."
    )
    concurrency: int = Field(8, gt=0, description="Requests in flight.")
    retries: int = Field(4, ge=0, description="Retries on timeouts, 429 and 5xx.")
    max_unparsed: float = Field(
        0.05, ge=0, le=1,
        description="Largest share of a baseline's judgments whose reply is still not A, B or Tie after "
        f"{PARSE_TRIES} tries (left out of the win rate); above it the stage fails instead of reporting a rate "
        "from what is left.",
    )  # fmt: skip
    timeout: float = Field(60.0, gt=0, description="Seconds per request.")
    hf_batch_size: int = Field(8, gt=0, description="hf backend: judge prompts per forward pass.")
    max_answer_tokens: int = Field(
        384, gt=0, description="hf backend: each answer is cut to this many tokens to fit the judge's context."
    )
    candidate: str = Field("distill/bd", description="The model judged against the baselines.")
    baselines: list[str] = Field(
        default_factory=lambda: ["student_sft", "distill/kd", "distill/seqkd"], description="Baselines."
    )
    eval_set: str = Field("dolly", description="Which eval set's generations to judge.")
    protocol: str | None = Field(
        None, description="Which stages.eval protocol's generations to judge (null: the first)."
    )
    seed: Seed = Field(10, description="Which sampling seed's generations to judge.")


class Stages(Section):
    teacher_sft: SFTStage = Field(default_factory=SFTStage, description="Fine-tune the teacher.")
    student_sft: SFTStage = Field(default_factory=SFTStage, description="Phase 1 / the SFT baseline.")
    generate: GenerateStage = Field(default_factory=GenerateStage, description="Teacher data D*.")
    distill: DistillStage = Field(default_factory=DistillStage, description="Phase 2 and baselines.")
    eval: EvalStage = Field(default_factory=EvalStage, description="Rouge-L over seeds.")
    judge: JudgeStage = Field(default_factory=JudgeStage, description="Pairwise win rates.")


class Recipe(Section):
    """A teacher/student pair and every stage of the pipeline."""

    name: str = Field(
        description="Recipe name; the default run directory is runs/<name>: letters, digits, '.', '_', '-'.",
        min_length=1,
    )
    description: str = Field("", description="One line on what this recipe reproduces.")
    seed: Seed = Field(1234, description="Seed of model initialisation, data order and sampling, 0 to 2**64 - 1.")
    run_dir: str | None = Field(None, description="Where outputs go (default runs/<name>).")
    models: Models = Field(description="Teacher, student and tokenizer.")
    data: Data = Field(description="Instruction data, template, split and pretraining corpus.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="ZeRO config and precision.")
    stages: Stages = Field(default_factory=Stages, description="Per-stage hyperparameters.")
    tracking: Tracking = Field(
        default_factory=Tracking, description="Experiment trackers (TensorBoard, W&B, MLflow); off by default."
    )
    paper_rouge_l: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="The paper's Rouge-L for this pair, shown beside ours in the report: model (a stages.eval.models "
        "entry) -> eval set -> score.",
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Where a setting's value comes from: dotted recipe key (e.g. stages.distill.pt_kd_ratio) -> "
        "its source (a file:line of a public release, 'paper, Section N', or 'bdctl's choice: why'). "
        "`bdctl recipes show` prints each key's value beside its source.",
    )
    paper_protocols: dict[str, str] = Field(
        default_factory=dict,
        description="Which sampling protocol produced each paper_rouge_l model's numbers, shown beside them: a "
        "stages.eval protocol name, or a few words where it is not known (e.g. 'not stated').",
    )

    paper_selection: dict[str, str] = Field(
        default_factory=dict,
        description="How the checkpoint behind each paper_rouge_l model's numbers was selected, where the paper's "
        "code shows it (e.g. on the split it tests on), printed under the report's tables beside bdctl's own rule "
        "(select on validation, test on test).",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        """The name is a directory under runs/: not empty (the run would be runs/ itself), not a path."""
        if not name.strip() or name.strip(".") == "" or "/" in name or "\\" in name or name != name.strip():
            raise ValueError(
                f"expected a directory name (letters, digits, '.', '_', '-'), got {name!r}; it names runs/<name>"
            )
        return name

    @model_validator(mode="after")
    def _place_built_models(self) -> Recipe:
        """Where this run builds its gguf and from_teacher models (runs/<name>/models/<role>/): a
        function of the run directory, so the launching process and every rank agree on it."""
        from bdctl.rundir import RunDir

        run = RunDir.of(self)
        for role in ("teacher", "student"):
            spec = getattr(self.models, role)
            if spec.gguf is not None or spec.from_teacher is not None:
                spec._built = str(run.built_model(role))
        if self.models.tokenizer.gguf is not None:
            self.models.tokenizer._built = str(run.built_model("tokenizer"))
        return self

    @model_validator(mode="after")
    def _check_references(self) -> Recipe:
        """Names one section gives another must exist (protocols, D* variants, ablation settings)."""
        protocols = [p.name for p in self.stages.eval.protocols]
        for stage in ("teacher_sft", "student_sft", "distill"):
            chosen = getattr(self.stages, stage).select_protocol
            if chosen is not None and chosen not in protocols:
                raise ValueError(
                    f"stages.{stage}.select_protocol: {chosen!r} is not a stages.eval protocol ({', '.join(protocols)})"
                )
        if self.stages.judge.protocol is not None and self.stages.judge.protocol not in protocols:
            raise ValueError(
                f"stages.judge.protocol: {self.stages.judge.protocol!r} is not a stages.eval protocol "
                f"({', '.join(protocols)})"
            )
        dstars = ["generate", *(f"generate-{name}" for name in self.stages.generate.variants)]
        distill = self.stages.distill
        for name, changes in {"": {}, **distill.ablations.runs()}.items():
            where = f"stages.distill.ablations ({name})" if name else "stages.distill"
            try:
                # an ablation is a BD run unless it names its method (as `bdctl distill --ablation` runs it)
                method = {"method": changes.get("method", "bd")} if name else {}
                run = DistillStage.model_validate({**distill.model_dump(exclude={"ablations"}), **changes, **method})
            except ValueError as error:
                first = error.errors()[0] if hasattr(error, "errors") else {"loc": (), "msg": str(error)}
                key = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"{where}: {key}: {first['msg']}") from None
            if run.dstar not in dstars:
                raise ValueError(f"{where}: dstar {run.dstar!r} is not a D* of this recipe ({', '.join(dstars)})")
            if name and name in METHODS:
                raise ValueError(f"{where}: the run name is a method's (distill/{name}); name it another way")
            if name and METHODS[run.method].stage != "distill":
                raise ValueError(f"{where}: method {run.method}: ablations run the distill stage's methods only")
            if run.outside == "drop" and run.variant == "released":
                raise ValueError(
                    f"{where}: outside: drop applies to the paper variant (the released loss ignores actions)"
                )
            if run.outside == "drop" and run.teacher_source == "live" and run.p < 1:
                raise ValueError(f"{where}: outside: drop reads A_t from the cache; use teacher_source: cache")
        return self

    def sourced_settings(self) -> list[tuple[str, Any, str]]:
        """(dotted key, its value in this recipe, its source) for each entry of `sources`."""
        return [(key, self.setting(key), source) for key, source in self.sources.items()]

    def setting(self, key: str) -> Any:
        """The value of a dotted recipe key (stages.distill.lr); KeyError names the part that is not a setting."""
        node: Any = self
        for part in key.split("."):
            if isinstance(node, BaseModel) and part in type(node).model_fields:
                node = getattr(node, part)
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise KeyError(part)
        return node

    @model_validator(mode="after")
    def _check_sources(self) -> Recipe:
        for key in self.sources:
            try:
                self.setting(key)
            except KeyError as missing:
                raise ValueError(f"sources: {key!r} is not a recipe setting ({missing.args[0]!r} is unknown)") from None
        return self

    @model_validator(mode="after")
    def _check_paper_results(self) -> Recipe:
        models, sets = self.stages.eval.models, [s.name for s in self.stages.eval.sets]
        for model, scores in self.paper_rouge_l.items():
            if model not in models:
                raise ValueError(f"paper_rouge_l: {model!r} is not one of stages.eval.models ({', '.join(models)})")
            for name in scores:
                if name not in sets:
                    raise ValueError(f"paper_rouge_l.{model}: {name!r} is not an eval set ({', '.join(sets)})")
        for field, entries in (("paper_protocols", self.paper_protocols), ("paper_selection", self.paper_selection)):
            for model in entries:
                if model not in self.paper_rouge_l:
                    raise ValueError(f"{field}: {model!r} has no paper_rouge_l entry")
        return self
