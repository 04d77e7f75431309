"""Models and the shared tokenizer: load from the hub or a local directory, or build tiny ones.

Teacher and student must share one vocabulary (docs/method.md §2: the student's Q-values are
read off the same token ids as the teacher's candidate sets), so `check_vocabularies` runs before
any compute and stops with one clear line when they differ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from bdctl.errors import UserError
from bdctl.recipe.schema import LoRA, ModelSpec, Recipe, TinyModel, TokenizerTraining

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Architectures whose logits are exactly `final_hidden @ output_embedding.T` (no bias, no scaling,
# no soft-capping): the objectives compute logits from hidden states, so only these are allowed.
SUPPORTED_MODEL_TYPES = ("gpt2", "opt", "qwen2", "qwen3", "llama", "mistral")


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], spec: TokenizerTraining, out_dir: Path):
    """Train a byte-level BPE on `texts` (deterministic for the same texts) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(path: str | Path, revision: str | None = None, template: object = None):
    """A tokenizer from a local directory or hub id, with a pad token (the EOS if it has none).

    `template` is the recipe's data.template: with "chat" the tokenizer must have a chat template
    with an end-of-turn token, which then ends every response (`stop_id`).
    """
    from transformers import AutoTokenizer

    local = _local_dir(str(path))
    if local is not None and not local.exists():
        raise UserError(f"{path}: no such tokenizer directory")
    if local is not None and local.is_dir() and not any(local.iterdir()):
        raise UserError(
            f"{path}: empty directory, no tokenizer files (expected tokenizer.json or tokenizer_config.json)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load a tokenizer ({_first_line(exc)})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer has no end-of-sequence token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if template == "chat":
        setattr(tokenizer, _STOP_ATTRIBUTE, end_of_turn_id(tokenizer, str(path)))
    return tokenizer


# Set by load_tokenizer(template="chat"): the id `stop_id` returns instead of the EOS.
_STOP_ATTRIBUTE = "bdctl_stop_id"
# Stands for an answer while the chat template is probed for what follows an assistant turn.
_PROBE = "bdctl-probe-answer"


def stop_id(tokenizer) -> int | None:
    """The token that ends a response everywhere (SFT labels, D* sampling, BD's terminal
    transitions, eval's stopping and answer text): the chat template's end-of-turn token when the
    recipe uses data.template: chat (`load_tokenizer(..., template="chat")`), else the EOS; None
    for a tokenizer without one (responses then end at the length limit only)."""
    chosen = getattr(tokenizer, _STOP_ATTRIBUTE, None)
    if chosen is not None:
        return int(chosen)
    return None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)


def required_stop_id(tokenizer, why: str) -> int:
    """`stop_id`, for the methods whose transitions or rollouts need a response to be able to end."""
    found = stop_id(tokenizer)
    if found is None:
        raise UserError(f"the tokenizer has no end-of-sequence token; {why} needs one")
    return found


def end_of_turn_id(tokenizer, where: str) -> int:
    """The special token the tokenizer's chat template puts right after an assistant answer
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, a plain EOS), found by
    rendering a one-turn conversation around a probe answer; leading whitespace is skipped
    (Llama 2 writes ' </s>'). One line naming `where` when there is no template or no such token."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: the tokenizer has no chat template; data.template: chat uses the tokenizer's own "
            "(give a tokenizer that has one, or drop data.template: chat)"
        )
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as exc:  # a Jinja template may raise anything (TemplateError, its own raise_exception)
        raise UserError(
            f"{where}: the tokenizer's chat template cannot render a user/assistant turn ({_first_line(exc)})"
        ) from None
    after = text.split(_PROBE, 1)[1].lstrip() if isinstance(text, str) and _PROBE in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        raise UserError(
            f"{where}: the tokenizer's chat template puts no special end-of-turn token after an assistant answer "
            f"(it continues with {after[:20]!r}); data.template: chat needs one to end responses"
        )
    return int(ids[0])


def tokenizer_hash(tokenizer) -> str:
    """Fingerprint of a vocabulary: token -> id map plus the special tokens that matter here."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def tokenizer_source(recipe: Recipe) -> tuple[str, str | None] | None:
    """Where the shared tokenizer is loaded from, or None when the recipe trains one."""
    spec = recipe.models.tokenizer
    if spec.train is not None:
        return None
    if spec.path is not None:
        return spec.path, None
    # Models._check: without tokenizer.path or tokenizer.train, the teacher has a path
    assert recipe.models.teacher.path is not None
    return recipe.models.teacher.path, recipe.models.teacher.revision


# --------------------------------------------------------------------------- vocabulary check


def check_vocabularies(recipe: Recipe, tokenizer, sources: Mapping[str, str | Path | ModelSpec]) -> None:
    """Stop before any compute unless every model speaks the shared tokenizer's vocabulary.

    `sources` maps a role ("teacher", "student") to the weights it will use: a ModelSpec, or a
    directory (a stage export). Only tokenizers and configs are read, never weights.
    """
    from transformers import AutoConfig

    shared = tokenizer_hash(tokenizer)
    sizes = {}
    for role, source in sources.items():
        path, revision = _path_of(source)
        if path is None:  # a tiny spec: built on the shared tokenizer, so it matches by construction
            sizes[role] = len(tokenizer)
            continue
        check_model_dir(path, f"{role} model ")
        theirs = load_tokenizer(path, revision)
        if tokenizer_hash(theirs) != shared:
            raise UserError(
                f"{role} model {path}: its tokenizer differs from the shared one "
                f"({len(theirs)} vs {len(tokenizer)} tokens); teacher and student must share one vocabulary"
            )
        try:
            config = AutoConfig.from_pretrained(path, revision=revision)
        except (OSError, ValueError) as exc:
            raise UserError(f"{role} model {path}: cannot read its config ({_first_line(exc)})") from None
        sizes[role] = config.vocab_size
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{role} {size}" for role, size in sizes.items())
        raise UserError(f"output vocabulary sizes differ ({detail}); teacher and student must share one vocabulary")
    for role, size in sizes.items():
        if size < len(tokenizer):
            raise UserError(f"{role} model has {size} output rows but the tokenizer has {len(tokenizer)} tokens")


def _path_of(source: str | Path | ModelSpec) -> tuple[str | None, str | None]:
    if isinstance(source, ModelSpec):
        return source.path, source.revision
    return str(source), None


# --------------------------------------------------------------------------- models


def tiny_config(spec: TinyModel, tokenizer):
    """A transformers config for a tiny model on the shared tokenizer (dropout off: exact reruns)."""
    from transformers import GPT2Config, OPTConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    ffn = spec.ffn or 4 * spec.hidden
    if spec.arch == "gpt2":
        return GPT2Config(
            n_layer=spec.layers, n_embd=spec.hidden, n_head=spec.heads, n_inner=ffn,
            n_positions=spec.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
    if spec.arch == "opt":
        return OPTConfig(
            num_hidden_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
            ffn_dim=ffn, max_position_embeddings=spec.max_positions, word_embed_proj_dim=spec.hidden,
            dropout=0.0, attention_dropout=0.0, layerdrop=0.0, **common,
        )  # fmt: skip
    return Qwen2Config(
        num_hidden_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads, intermediate_size=ffn,
        max_position_embeddings=spec.max_positions, attention_dropout=0.0, **common,
    )  # fmt: skip


def build_tiny_model(spec: TinyModel, tokenizer, seed: int):
    """A randomly initialised model, identical for the same spec and seed on every rank."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed if spec.seed is not None else seed)
        model = AutoModelForCausalLM.from_config(tiny_config(spec, tokenizer), dtype=torch.float32)
    return model


def load_model(source: str | Path | ModelSpec, tokenizer, seed: int, lora: LoRA | None = None, where: str = ""):
    """The weights of `source`: a tiny spec is built, a path or hub id goes through from_pretrained.
    With `lora` (the trained model's `models.<role>.lora`, named by `where`), LoRA adapters are
    injected and every base weight frozen (`bdctl.lora.apply`).

    Call it while a `HfDeepSpeedConfig` for ZeRO-3 is alive and transformers partitions the
    weights as it loads them (deepspeed.zero.Init), so a large model never sits whole on one rank.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(source, ModelSpec) and source.tiny is not None:
        model = build_tiny_model(source.tiny, tokenizer, seed)
    else:
        path, revision = _path_of(source)
        if path is None:
            raise ValueError("a ModelSpec without a path is tiny: build_tiny_model builds it")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch.float32)
        except Exception as exc:  # OSError, ValueError, safetensors' own error for damaged weights
            if not isinstance(exc, (OSError, ValueError)) and type(exc).__name__ != "SafetensorError":
                raise
            raise UserError(f"{path}: cannot load the model ({_first_line(exc)})") from None
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model type {model.config.model_type!r} is not supported "
            f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError(f"model type {model.config.model_type!r}: an output layer with a bias is not supported")
    if lora is not None:
        from bdctl import lora as adapters

        base = source.path if isinstance(source, ModelSpec) else str(source)
        model = adapters.apply(model, lora, seed, where, base)
    return model


def check_lora(source: str | Path | ModelSpec, tokenizer, lora: LoRA | None, where: str) -> None:
    """Launching process, before any rank starts: a recipe asking for LoRA has peft installed and
    names target modules the model has (checked on a model built on the meta device)."""
    if lora is None:
        return
    from bdctl import lora as adapters

    adapters.require_peft(where)
    if isinstance(source, ModelSpec) and source.tiny is not None:
        config = tiny_config(source.tiny, tokenizer)
    else:
        config = _read_config(source)
    adapters.check_targets_of_config(config, lora, where)


def _read_config(source: str | Path | ModelSpec):
    from transformers import AutoConfig

    path, revision = _path_of(source)
    if path is None:
        raise ValueError("a ModelSpec without a path is tiny: model_config gives its config")
    check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the model config ({_first_line(exc)})") from None


def hidden_size(source: str | Path | ModelSpec) -> int:
    """Hidden width of a model without loading its weights (sizes DeepSpeed's buckets)."""
    if isinstance(source, ModelSpec) and source.tiny is not None:
        return source.tiny.hidden
    config = _read_config(source)
    return getattr(config, "hidden_size", None) or config.n_embd


def config_positions(config) -> int | None:
    """Longest sequence a model accepts, when its config says (learned position tables)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def max_positions(source: str | Path | ModelSpec) -> int | None:
    """`config_positions` of a model without loading its weights."""
    if isinstance(source, ModelSpec) and source.tiny is not None:
        return source.tiny.max_positions
    return config_positions(_read_config(source))


def count_parameters(model) -> int:
    """Parameters of a model, also when ZeRO-3 has partitioned them (ds_numel is the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# --------------------------------------------------------------------------- local model directories

# A safetensors header larger than this is not a header: the file is something else.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def _local_dir(path: str) -> Path | None:
    """The directory a model reference names, or None for a hub id ("gpt2", "org/name").

    Hub ids have at most one "/" and never start with "/", "." or "~"; anything else (or a path that
    exists) is meant as a local directory, and a missing one must say so rather than fail as a
    malformed hub id."""
    candidate = Path(path).expanduser()
    if candidate.exists() or path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith("/"):
        return candidate
    return None


def check_model_dir(path: str, what: str = "") -> None:
    """A local model directory that cannot load stops here, in one line naming the path or file,
    before any rank starts: missing, a file, empty, no config.json, no weights, or weights whose
    safetensors header is damaged or whose file is truncated. Reads headers only, never weights."""
    local = _local_dir(path)
    if local is None:
        return
    if not local.exists():
        raise UserError(f"{what}{path}: no such model directory")
    if not local.is_dir():
        raise UserError(f"{what}{path}: a file, not a model directory (expected a Hugging Face model directory)")
    names = {p.name for p in local.iterdir()}
    if not names:
        raise UserError(
            f"{what}{path}: empty directory (expected a Hugging Face model: config.json, weights, tokenizer)"
        )
    if "config.json" not in names:
        raise UserError(f"{what}{path}: not a Hugging Face model directory (no config.json)")
    index = local / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: damaged index (expected JSON with a weight_map)") from None
        for shard in shards:
            if not (local / shard).is_file():
                raise UserError(f"{local / shard}: missing (named by {index.name})")
            check_safetensors(local / shard)
    elif "model.safetensors" in names:
        check_safetensors(local / "model.safetensors")
    elif "pytorch_model.bin" in names:
        import zipfile

        if not zipfile.is_zipfile(local / "pytorch_model.bin"):  # torch.save's format; truncation breaks it
            raise UserError(
                f"{local / 'pytorch_model.bin'}: damaged or truncated weights; copy or export the model again"
            )
    elif not names & {"pytorch_model.bin.index.json", "model.safetensors.index.json"}:
        raise UserError(f"{what}{path}: no weights (expected model.safetensors or pytorch_model.bin)")


def check_safetensors(file: Path) -> None:
    """The file is a whole safetensors file: an 8-byte header length, a JSON header, and exactly
    the tensor bytes the header promises (a copy cut short, or another file renamed, fails)."""
    size = file.stat().st_size

    def damaged(detail: str) -> UserError:
        return UserError(f"{file}: damaged or truncated safetensors file ({detail}); copy or export the model again")

    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise damaged(f"{size} bytes, shorter than the header length")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise damaged(f"header of {length} bytes in a file of {size}")
        try:
            header = json.loads(handle.read(length))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise damaged("unreadable header") from None
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise damaged(f"{size} bytes where its header describes {expected}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
