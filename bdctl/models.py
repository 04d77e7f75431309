"""Models and the shared tokenizer: load from the hub or a local directory, or build tiny ones.

Teacher and student must share one vocabulary (docs/method.md §2: the student's Q-values are
read off the same token ids as the teacher's candidate sets), so `check_vocabularies` runs before
any compute and stops with one clear line when they differ.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from bdctl import cut, gguf_models
from bdctl.errors import UserError
from bdctl.recipe.schema import ModelSpec, Recipe, TinyModel, TokenizerTraining
from bdctl.rundir import manifest, mark_complete, recover_dir, replace_dir, stage_lock

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
    if spec.location is not None:
        return spec.location, None
    # Models._check: without a tokenizer of its own, the teacher has a path or a gguf file
    assert recipe.models.teacher.location is not None
    return recipe.models.teacher.location, recipe.models.teacher.revision


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
        return source.location, source.revision
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


def load_model(source: str | Path | ModelSpec, tokenizer, seed: int):
    """The weights of `source`: a tiny spec is built, a path or hub id goes through from_pretrained.

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
    return model


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


# --------------------------------------------------------------------------- models built into the run


def build_models(recipe: Recipe, log=print) -> None:
    """Build, once, the Hugging Face directories the recipe's gguf and from_teacher entries name
    (runs/<name>/models/<role>/, `ModelSpec.location`), in the launching process before any rank
    starts: a GGUF file converted (bdctl.gguf_models), a student cut from the teacher's base
    weights (bdctl.cut). A directory counts once its MANIFEST.json is there (written last, then the
    whole directory renamed into place). A later command reuses it while its source is the same
    file (the sha256 recorded in the manifest) and the same layer choice; otherwise it stops with
    one line: the stages already trained from the old one would silently mix two models."""
    models = recipe.models
    wanted: list[tuple[str, str]] = []  # (role, kind), teacher before the student cut from it
    if models.tokenizer.gguf is not None:
        wanted.append(("tokenizer", "gguf"))
    for role in ("teacher", "student"):
        if getattr(models, role).gguf is not None:
            wanted.append((role, "gguf"))
    if models.student.from_teacher is not None:
        wanted.append(("student", "from_teacher"))
    for role, kind in wanted:
        spec = models.tokenizer if role == "tokenizer" else getattr(models, role)
        assert spec.location is not None  # Recipe._place_built_models
        built = Path(spec.location)
        source = _gguf_source(spec.gguf, role) if kind == "gguf" else _teacher_source(recipe)
        if _up_to_date(built, source, role):
            continue
        with stage_lock(built.parent):  # one builder of runs/<name>/models/ at a time
            if _up_to_date(built, source, role):
                continue
            log(f"building {built} from {source['label']} ...")
            tmp = built.with_name(f".{built.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                if kind == "gguf":
                    facts = gguf_models.convert(Path(source["path"]), tmp, f"models.{role}.gguf", role == "tokenizer")
                else:
                    facts = _cut_student(recipe, tmp)
                mark_complete(tmp, role=role, source=_recorded(source), **facts)
                replace_dir(tmp, built)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log(f"built {built} ({_summary(facts)})")


def built_facts(directory: str | Path) -> dict | None:
    """The manifest of a directory build_models made (None for any other directory): what the
    model card of an export that starts from it names (source, layer choice, parameter count)."""
    found = manifest(Path(directory))
    return found if found is not None and found.get("kind") in ("gguf", "from_teacher") else None


def _gguf_source(file: str | None, role: str) -> dict:
    assert file is not None
    path = Path(file).expanduser()
    header_error = None if path.is_file() else f"models.{role}.gguf {file}: no such file"
    if header_error:
        raise UserError(header_error)
    stat = path.stat()
    return {"label": f"{file} (gguf)", "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _teacher_source(recipe: Recipe) -> dict:
    """The teacher's base weights a student is cut from, and what identifies them: the manifest's
    sha256 of a converted GGUF, or the weight files of a local directory (a hub id: id and revision)."""
    teacher = recipe.models.teacher
    spec = recipe.models.student.from_teacher
    assert spec is not None and teacher.location is not None
    chosen = spec.model_dump(mode="json")
    if teacher.gguf is not None:
        converted = manifest(Path(teacher.location)) or {}
        return {"label": f"the teacher {teacher.label}", "choice": chosen, "sha256": converted["source"]["sha256"]}
    local = _local_dir(teacher.location)
    if local is None:
        return {"label": f"the teacher {teacher.label}", "choice": chosen, "hub": teacher.label}
    check_model_dir(teacher.location, "teacher model ")
    files = sorted(p for p in local.iterdir() if p.name.endswith((".safetensors", ".bin")))
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"label": f"the teacher {teacher.label}", "choice": chosen, "path": str(local.resolve()), "files": stats}


def _up_to_date(built: Path, source: dict, role: str) -> bool:
    """Whether `built` was made from this very source; one line when it was made from another.
    Unchanged file sizes and times keep the recorded sha256 (no re-hashing of a large file on
    every command); otherwise the content is hashed and compared."""
    recover_dir(built)
    found = manifest(built)
    if found is None:
        return False
    theirs = found.get("source", {})
    if theirs.get("choice") != source.get("choice"):
        raise UserError(
            f"{built}: cut with the teacher's layers {found.get('layers')} ({theirs.get('choice')}), but the recipe "
            f"now asks {source.get('choice')}; delete {built} (and the stages trained from it) to cut again, or use "
            "another run_dir"
        )
    stat_keys = ("path", "size", "mtime_ns", "files", "hub")
    if "sha256" not in source and all(theirs.get(k) == source.get(k) for k in stat_keys):
        return True
    mine = source.get("sha256") or _content_hash(source)
    if mine != theirs.get("sha256"):
        raise UserError(
            f"{built}: built from a source of sha256 {str(theirs.get('sha256'))[:12]}, but {source['label']} is now "
            f"sha256 {mine[:12]}; delete {built} (and the stages trained from it) to build it again, or use another "
            "run_dir"
        )
    return True


def _content_hash(source: dict) -> str:
    if "files" in source:
        digest = hashlib.sha256()
        for name, _, _ in source["files"]:
            digest.update(name.encode() + gguf_models.sha256_file(Path(source["path"]) / name).encode())
        return digest.hexdigest()
    if "path" in source:
        return gguf_models.sha256_file(Path(source["path"]))
    return hashlib.sha256(json.dumps(source.get("hub")).encode()).hexdigest()


def _recorded(source: dict) -> dict:
    """The source as the manifest records it, with its sha256."""
    return {**source, "sha256": source.get("sha256") or _content_hash(source)}


def _cut_student(recipe: Recipe, out: Path) -> dict:
    """The student cut from the teacher's base weights, with the shared tokenizer, into `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = recipe.models.student.from_teacher
    teacher = recipe.models.teacher
    assert spec is not None and teacher.location is not None
    try:
        model = AutoModelForCausalLM.from_pretrained(teacher.location, revision=teacher.revision, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"teacher model {teacher.label}: cannot load it to cut the student ({_first_line(exc)})"
        ) from None
    total = cut.layer_count(model.config)
    layers = cut.choose_layers(spec, total)
    student = cut.cut(model, layers)
    student.save_pretrained(out)
    source = tokenizer_source(recipe)
    assert source is not None  # Models._check: a from_teacher student has a real teacher, so no trained tokenizer
    load_tokenizer(*source).save_pretrained(out)
    return cut.facts(layers, total, student)


def _summary(facts: dict) -> str:
    parts = [f"{facts['parameters'] / 1e6:,.2f} M parameters"] if "parameters" in facts else []
    if "layers" in facts:
        parts.append(f"layers {facts['layers']} of {facts['teacher_layers']}")
    return ", ".join(parts) or "tokenizer"


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
