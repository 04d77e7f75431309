"""GGUF models: files the tests write themselves (tests/gguf_files.py) from tiny random llama and
qwen2 models, converted by bdctl into Hugging Face directories: the converted model's logits equal
the source's (fp32: to 1e-5; Q8_0: each weight within half a quantisation step), the tokenizer and
chat template survive, the directory is built once and reused while the file's sha256 holds, and
bad files end in one line each."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from bdctl.errors import UserError
from bdctl.gguf_models import convert
from bdctl.models import build_models
from bdctl.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from gguf_files import CHAT_TEMPLATE, tiny_hf_model, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def sources(tiny_tokenizer, tmp_path_factory):
    """arch -> (source model, its fp32 GGUF file)."""
    folder = tmp_path_factory.mktemp("gguf")
    found = {}
    for arch in ("llama", "qwen2"):
        model = tiny_hf_model(arch, tiny_tokenizer)
        found[arch] = (model, write_gguf(model, tiny_tokenizer, folder / f"{arch}.gguf"))
    return found


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_converted_model_has_the_source_logits_and_tokenizer(arch, sources, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, file = sources[arch]
    facts = convert(file, tmp_path / "out", "models.teacher.gguf")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    # no digits: a qwen2 file's tokenizer splits numbers digit by digit, as Qwen2's does, which the
    # tests' own BPE (trained without that rule) does not
    text = "reverse the words, then say the answer"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert type(converted).__name__ == type(model).__name__
    torch.testing.assert_close(_logits(converted, ids), _logits(model, ids), rtol=0, atol=1e-5)
    assert facts["architecture"] == arch and facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_q8_0_weights_are_within_half_a_quantisation_step(tiny_tokenizer, tmp_path):
    """Q8_0 stores blocks of 32 weights as q = round(w / d), d = max|w| / 127, and the scale as fp16
    (llama.cpp's ggml-quants.c, which gguf's quantize copies bit for bit); dequantising gives
    q * fp16(d), off by at most d/2 + 127 |d - fp16(d)| <= d (1/2 + 127 * 2^-11) = 0.562 d per weight
    (measured: 0.526 d on 16k Gaussian weights)."""
    from transformers import AutoModelForCausalLM

    model = tiny_hf_model("llama", tiny_tokenizer, seed=3)
    file = write_gguf(model, tiny_tokenizer, tmp_path / "q8.gguf", quantize="Q8_0")
    convert(file, tmp_path / "out", "models.teacher.gguf")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    quantised = 0
    for name, source in model.state_dict().items():
        error = (converted[name] - source).abs()
        if source.ndim == 2 and "embed_tokens" not in name:
            blocks = source.abs().reshape(source.shape[0], -1, 32).amax(-1, keepdim=True)
            bound = (blocks / 127 * (0.5 + 127 * 2**-11)).expand(-1, -1, 32).reshape(source.shape)
            assert (error <= bound + 1e-8).all(), name
            assert error.max() > 0, name  # it really was quantised
            quantised += 1
        else:
            assert error.max() == 0, name
    assert quantised == 7 * 3 + 1  # q k v o gate up down per layer, and the head


def _recipe(tmp_path, gguf: Path, **student):
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f'models={{"teacher": {{"gguf": "{gguf}"}}, "student": {student or {"gguf": str(gguf)}}}}'.replace("'", '"'),
    ]
    return load_recipe("smoke", overrides)[0]


def test_built_once_reused_and_a_changed_file_refused(sources, tiny_tokenizer, tmp_path):
    file = shutil.copy(sources["qwen2"][1], tmp_path / "teacher.gguf")
    recipe = _recipe(tmp_path, Path(file))
    built = Path(recipe.models.teacher.location)
    lines: list[str] = []
    build_models(recipe, lines.append)
    assert built == tmp_path / "run" / "models" / "teacher"
    stamp = (built / "MANIFEST.json").stat().st_mtime_ns
    recorded = __import__("json").loads((built / "MANIFEST.json").read_text())
    assert recorded["source"]["sha256"] and recorded["source"]["path"] == str(Path(file).resolve())
    assert recorded["kind"] == "gguf" and recorded["architecture"] == "qwen2"

    build_models(recipe, lines.append)  # unchanged: nothing rebuilt
    os.utime(file)  # touched, same content: the hash is checked and the directory still reused
    build_models(recipe, lines.append)
    assert (built / "MANIFEST.json").stat().st_mtime_ns == stamp
    assert sum("building" in line for line in lines) == 2  # teacher and student, once each

    write_gguf(tiny_hf_model("qwen2", tiny_tokenizer, seed=9), tiny_tokenizer, Path(file))
    with pytest.raises(UserError, match=r"now sha256 .*delete .*models/teacher"):
        build_models(recipe, lines.append)


def _truncated(source: Path, tmp_path: Path) -> Path:
    data = source.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    return cut


def _other_architecture(tmp_path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / f"{arch}.gguf"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda s, t: t / "missing.gguf", "missing.gguf: no such file"),
        (lambda s, t: (t / "a.gguf").write_text("not a model") and t / "a.gguf", "not a GGUF file"),
        (lambda s, t: _truncated(s, t), "cut-short GGUF file"),
        (lambda s, t: _other_architecture(t, "bert"), "transformers cannot load a GGUF file of architecture 'bert'"),
        (lambda s, t: _other_architecture(t, "falcon"), "architecture 'falcon' is not one bdctl trains"),
    ],
    ids=["missing", "not-gguf", "cut-short", "unknown-arch", "untrained-arch"],
)
def test_bad_files_end_in_one_line(make, expected, sources, tmp_path):
    bad = make(sources["llama"][1], tmp_path)
    recipe = _recipe(tmp_path, bad)
    with pytest.raises(UserError) as raised:
        build_models(recipe, lambda line: None)
    message = str(raised.value)
    assert expected in message and "\n" not in message
    assert "models.teacher.gguf" in message and str(bad.name) in message
    assert not (tmp_path / "run" / "models" / "teacher").exists()  # nothing half-built left as if complete


def test_without_the_gguf_package_the_line_names_the_extra(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    recipe = _recipe(tmp_path, sources["llama"][1])
    with pytest.raises(UserError, match=r"needs the gguf package \(pip install 'bdctl\[gguf\]'\)"):
        build_models(recipe, lambda line: None)
