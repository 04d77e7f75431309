"""GGUF models (llama.cpp's format): check a file, and convert it once, dequantised to float32,
into a Hugging Face directory of the run (`models.<role>: {gguf: FILE}` -> runs/<name>/models/<role>/:
model.safetensors, config.json, the tokenizer with its chat template, MANIFEST.json).

The conversion is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`), which
reads the file through the `gguf` package (the optional extra `bdctl[gguf]`). Everything a user
can get wrong stops before it in one line naming the file: missing, not GGUF, cut short, an
architecture transformers cannot load or bdctl does not train. The manifest records the source's
sha256; `models.build_models` compares it on every later command.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from bdctl.errors import UserError

GGUF_MAGIC = b"GGUF"
INSTALL = "pip install 'bdctl[gguf]'"
# GGUF's general.architecture -> the transformers model type it converts to (the ones bdctl trains).
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "gpt2": "gpt2"}


def require_gguf(what: str) -> None:
    """The `gguf` package, or one line saying which extra installs it."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"{what}: reading a GGUF file needs the gguf package ({INSTALL})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_header(path: Path, what: str) -> dict[str, Any]:
    """What the file says of itself (architecture, name, file type, tensor count), after checking
    it is a whole GGUF file: the magic, a readable header, and every tensor's bytes inside the file
    (a copy cut short fails here, not halfway through a conversion). Reads no tensor data."""
    if not path.exists():
        raise UserError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{what} {path}: not a file (expected a .gguf file)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{what} {path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    require_gguf(f"{what} {path}")
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # numpy / struct errors of a header that ends early or lies
        raise UserError(f"{what} {path}: damaged or cut-short GGUF file ({_first_line(exc)})") from None
    if end > size:
        raise UserError(f"{what} {path}: cut-short GGUF file ({size} bytes where its tensors need {end})")

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": field("general.file_type"),
        "tensors": len(reader.tensors),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
    }


def check_architecture(header: dict[str, Any], path: Path, what: str) -> str:
    """The transformers model type the file converts to, or one line: transformers cannot load
    this architecture from GGUF, or bdctl does not train it."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = header["architecture"]
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{what} {path}: transformers cannot load a GGUF file of architecture {arch!r}")
    if arch not in MODEL_TYPES:
        raise UserError(
            f"{what} {path}: architecture {arch!r} is not one bdctl trains (expected one of {', '.join(MODEL_TYPES)})"
        )
    return MODEL_TYPES[arch]


def convert(source: Path, out: Path, what: str, tokenizer_only: bool = False) -> dict[str, Any]:
    """Write the model (unless `tokenizer_only`) and tokenizer of a checked GGUF file into `out`,
    a fresh directory, and return the facts its manifest records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    header = read_header(source, what)
    facts: dict[str, Any] = {"kind": "gguf", "gguf_architecture": header["architecture"], "gguf_name": header["name"]}
    facts["gguf_tensor_types"] = header["tensor_types"]
    folder, name = str(source.parent), source.name
    try:
        if not tokenizer_only:
            facts["architecture"] = check_architecture(header, source, what)
            # dequantize=True: plain float32 weights, a model like any other (transformers would
            # otherwise keep quantised blocks in place, which cannot be trained or saved)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
            )
            model.save_pretrained(out)
            facts["parameters"] = sum(p.numel() for p in model.parameters())
            facts["dtype"] = "float32 (dequantised)"
            del model
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except UserError:
        raise
    except Exception as exc:  # transformers' ValueError / NotImplementedError / KeyError for what it cannot map
        raise UserError(f"{what} {source}: transformers cannot convert it ({_first_line(exc)})") from None
    tokenizer.save_pretrained(out)
    facts["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
    facts["vocabulary"] = len(tokenizer)
    return facts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
