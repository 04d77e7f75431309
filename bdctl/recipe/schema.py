"""The recipe schema: one validated dataclass per section, with help text on every field.

A recipe is data, not code. Every stage of the pipeline (data, teacher SFT, generation, student
SFT, distillation, evaluation, judging) reads its settings from here; defaults are the paper's
(docs/method.md §3, 4 and 5) so a paper recipe states them explicitly only for readability.
Unknown keys are errors everywhere (`extra="forbid"`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

#: Times a request is asked in all while its reply is not A, B or Tie. A sampling or overloaded
#: endpoint often answers properly on another try; a deterministic one repeats itself, so more
#: tries would only cost time before the reply is reported as unparsed.
#: (Defined here, the leaf every layer reads, because judge.max_unparsed's help text cites it.)
PARSE_TRIES = 3


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment,
    and numbers are finite (`lr: .inf` would only surface later as a non-finite loss)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    seed: int | None = Field(None, description="Initialisation seed (default: the recipe seed).")

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
    a path or a gguf file), never from teacher_sft's export. docs/method.md §8 defines the choices."""

    layers: list[int] | None = Field(
        None, description="The teacher's layers to keep, 0-based, increasing, e.g. [0, 1, 2, 3, 4, 27, 28, 29]."
    )
    keep: int | None = Field(None, gt=0, description="How many layers to keep, chosen by `how` (instead of layers).")
    how: Literal["even", "ends"] = Field(
        "even",
        description="With keep: k of L layers. even: round(linspace(0, L-1, k)) (first and last included); "
        "ends: the first k-3 and the last 3 (k <= 3: the last k).",
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
        if "how" in self.model_fields_set and self.keep is None:
            raise ValueError("from_teacher.how goes with keep, not with layers")
        return self


class ModelSpec(Section):
    """Where a model comes from: a hub id or local directory (`path`), a GGUF file (`gguf`),
    the teacher's layers (`from_teacher`, students only), or a `tiny` spec."""

    path: str | None = Field(None, description="Hugging Face hub id or local directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tiny: TinyModel | None = Field(None, description="Build a small random model instead of loading one.")
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
            chosen = self.from_teacher.layers or f"{self.from_teacher.keep}, {self.from_teacher.how}"
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
    seed: int = Field(42, description="Seed of the random split.")


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
    split: Split = Field(default_factory=Split, description="Train / validation / test split.")
    max_length: int = Field(512, gt=1, description="Longest prompt + response in tokens; longer are dropped.")
    max_prompt_length: int = Field(256, gt=0, description="Longest prompt in tokens; longer are dropped.")
    pretrain: PretrainCorpus | None = Field(None, description="Pretraining corpus for the LM term.")

    @model_validator(mode="after")
    def _check(self) -> Data:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
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


class Train(Section):
    """Settings every training stage shares."""

    lr: float = Field(5e-6, gt=0, description="Peak learning rate (AdamW).")
    epochs: int = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Global batch: micro batch x accumulation x ranks.")
    micro_batch_size: int = Field(8, gt=0, description="Examples per rank per forward pass.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps with linear warm-up.")
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
    runs one, `bdctl reproduce` runs them all."""

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
    combined: dict[Annotated[str, Field(pattern=_NAME)], dict[str, Any]] = Field(
        default_factory=dict,
        description="Named runs changing several stages.distill settings at once, e.g. "
        "{bd-nucleus-drop: {dstar: generate-nucleus, outside: drop}} -> distill/bd-nucleus-drop.",
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
        None, ge=0, description="Linear warm-up steps (null: stages.distill.warmup_ratio); MiniLLM: 100."
    )
    adam_betas: tuple[float, float] | None = Field(
        None, description="AdamW betas (null: the DeepSpeed config's); MiniLLM: [0.9, 0.95]."
    )
    eval_every: int | None = Field(
        None, ge=0, description="Validate every N steps (null: stages.distill.eval_every); MiniLLM: 100."
    )
    max_steps: int | None = Field(
        None, gt=0, description="Stop after N steps (null: stages.distill.max_steps); MiniLLM: 5000."
    )

    @model_validator(mode="after")
    def _check_betas(self) -> MiniLLM:
        if self.adam_betas is not None and not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1), got {list(self.adam_betas)}")
        return self


class DistillStage(Train):
    """Bellman Distill and the KD / SeqKD baselines (docs/method.md §3 to 4)."""

    method: Literal["bd", "kd", "seqkd", "minillm"] = Field(
        "bd", description="Objective (`bdctl distill --method` overrides it)."
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
    eps: float = Field(1e-6, gt=0, description="Smoothing of the released variant's projected policy.")
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
    ablations: Ablations = Field(default_factory=Ablations, description="Extra BD runs, one setting changed each.")
    minillm: MiniLLM = Field(default_factory=MiniLLM, description="MiniLLM's settings (--method minillm).")

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
    seeds: list[int] = Field(default_factory=lambda: [10, 20, 30, 40, 50], description="Sampling seeds.")
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
    seed: int = Field(10, description="Which sampling seed's generations to judge.")


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
    seed: int = Field(1234, description="Seed of model initialisation, data order and sampling.")
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
    paper_protocols: dict[str, str] = Field(
        default_factory=dict,
        description="Which sampling protocol produced each paper_rouge_l model's numbers, shown beside them: a "
        "stages.eval protocol name, or a few words where it is not known (e.g. 'not stated').",
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
                run = DistillStage.model_validate({**distill.model_dump(exclude={"ablations"}), **changes})
            except ValueError as error:
                first = error.errors()[0] if hasattr(error, "errors") else {"loc": (), "msg": str(error)}
                key = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"{where}: {key}: {first['msg']}") from None
            if run.dstar not in dstars:
                raise ValueError(f"{where}: dstar {run.dstar!r} is not a D* of this recipe ({', '.join(dstars)})")
            if run.outside == "drop" and run.variant == "released":
                raise ValueError(
                    f"{where}: outside: drop applies to the paper variant (the released loss ignores actions)"
                )
            if run.outside == "drop" and run.teacher_source == "live" and run.p < 1:
                raise ValueError(f"{where}: outside: drop reads A_t from the cache; use teacher_source: cache")
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
        for model in self.paper_protocols:
            if model not in self.paper_rouge_l:
                raise ValueError(f"paper_protocols: {model!r} has no paper_rouge_l entry")
        return self
