"""The recipe schema: one validated dataclass per section, with help text on every field.

A recipe is data, not code. Every stage of the pipeline (data, teacher SFT, generation, student
SFT, distillation, evaluation, judging) reads its settings from here; defaults are the paper's
(METHOD.md sections 2, 4 and 5) so a paper recipe states them explicitly only for readability.
Unknown keys are errors everywhere (`extra="forbid"`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bdctl.judges import PARSE_TRIES


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ModelSpec(Section):
    """Where a model comes from: a hub id or local directory (`path`), or a `tiny` spec."""

    path: str | None = Field(None, description="Hugging Face hub id or local directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tiny: TinyModel | None = Field(None, description="Build a small random model instead of loading one.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        _exactly_one(self, ("path", "tiny"), "a model")
        return self


class TokenizerTraining(Section):
    """A byte-level BPE trained deterministically on the recipe's own data (tiny recipes)."""

    vocab_size: int = Field(gt=256, description="Target vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Pairs seen fewer times are not merged.")


class TokenizerSpec(Section):
    """The one vocabulary teacher and student share (METHOD.md section 1)."""

    path: str | None = Field(None, description="Hub id or local directory (default: the teacher's own).")
    train: TokenizerTraining | None = Field(None, description="Train a BPE on the recipe's data instead.")

    @model_validator(mode="after")
    def _check(self) -> TokenizerSpec:
        if self.path is not None and self.train is not None:
            raise ValueError("a tokenizer takes either path or train, not both")
        return self


class Models(Section):
    teacher: ModelSpec = Field(description="The teacher (fine-tuned by `sft --model teacher`).")
    student: ModelSpec = Field(description="The student to distil into.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The shared tokenizer.")

    @model_validator(mode="after")
    def _check(self) -> Models:
        tiny = self.teacher.tiny is not None or self.student.tiny is not None
        if self.tokenizer.path is None and self.tokenizer.train is None and self.teacher.path is None:
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
    """The prompt template (METHOD.md section 5); `{instruction}` and `{input}` are filled in."""

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
    """The pretraining corpus of the LM term (METHOD.md section 4), packed into blocks."""

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
    template: Template | None = Field(None, description="Prompt template (default: bdctl's wording).")
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


# --------------------------------------------------------------------------- stages


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


class GenerateStage(Section):
    """Teacher data D* and the sparse top-p teacher cache (METHOD.md sections 1 and 5)."""

    model: str = Field("teacher_sft", description="Teacher weights: a stage name (its export) or a path.")
    n_samples: int = Field(8, gt=0, description="Responses sampled per training prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (no top-k, no top-p).")
    max_new_tokens: int = Field(
        256, gt=0, description="Longest response, and at most data.max_length - prompt length; longer ones are truncated."
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

    def runs(self) -> dict[str, tuple[str, object]]:
        """Run name -> (the stages.distill key it changes, the value)."""
        names: dict[str, tuple[str, object]] = {}
        for value in self.p:
            names[f"bd-p{float(value)}"] = ("p", float(value))
        for value in self.chi2:
            names[f"bd-chi2-{'on' if value else 'off'}"] = ("chi2", value)
        for value in self.variant:
            names[f"bd-{value}"] = ("variant", value)
        return names


class DistillStage(Train):
    """Bellman Distill and the KD / SeqKD baselines (METHOD.md sections 2 to 4)."""

    method: Literal["bd", "kd", "seqkd"] = Field("bd", description="Objective (`bdctl distill --method` overrides it).")
    teacher_source: Literal["cache", "live"] = Field("cache", description="Sparse cache or live teacher.")
    p: float = Field(0.8, gt=0, le=1, description="Top-p of the teacher candidate sets (1.0: no mask).")
    alpha: float = Field(0.1, gt=0, description="chi^2 regulariser strength.")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount.")
    q_min: float = Field(-10.0, lt=0, description="Lower clip of Q (and value of actions outside A_t).")
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
        "is set, off for the kd / seqkd baselines (MiniLLM trained them without it).",
    )
    init: str = Field("auto", description="auto: student_sft export for BD, the base student otherwise.")
    ablations: Ablations = Field(default_factory=Ablations, description="Extra BD runs, one setting changed each.")


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

    name: str = Field(description="Recipe name; the default run directory is runs/<name>.")
    description: str = Field("", description="One line on what this recipe reproduces.")
    seed: int = Field(1234, description="Seed of model initialisation, data order and sampling.")
    run_dir: str | None = Field(None, description="Where outputs go (default runs/<name>).")
    models: Models = Field(description="Teacher, student and tokenizer.")
    data: Data = Field(description="Instruction data, template, split and pretraining corpus.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="ZeRO config and precision.")
    stages: Stages = Field(default_factory=Stages, description="Per-stage hyperparameters.")
    paper_rouge_l: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="The paper's Rouge-L for this pair, shown beside ours in the report: model (a stages.eval.models "
        "entry) -> eval set -> score.",
    )

    @model_validator(mode="after")
    def _check_paper_results(self) -> Recipe:
        models, sets = self.stages.eval.models, [s.name for s in self.stages.eval.sets]
        for model, scores in self.paper_rouge_l.items():
            if model not in models:
                raise ValueError(f"paper_rouge_l: {model!r} is not one of stages.eval.models ({', '.join(models)})")
            for name in scores:
                if name not in sets:
                    raise ValueError(f"paper_rouge_l.{model}: {name!r} is not an eval set ({', '.join(sets)})")
        return self
