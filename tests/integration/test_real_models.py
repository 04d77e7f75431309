"""The cheapest real path of a GGUF teacher and a student cut from it: `bdctl sft --model
student` for two steps on the real DeepSpeed engine (one rank), whose export's model card names
the layers, the parameter count and the source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_recipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from gguf_files import tiny_hf_model, write_gguf  # noqa: E402


@pytest.mark.slow
def test_sft_of_a_student_cut_from_a_gguf_teacher(in_tmp, tiny_tokenizer):
    write_gguf(tiny_hf_model("qwen2", tiny_tokenizer, layers=4), tiny_tokenizer, in_tmp / "teacher.gguf")
    recipe = write_recipe(
        in_tmp / "real.yaml",
        name="real",
        models={"teacher": {"gguf": "teacher.gguf"}, "student": {"from_teacher": {"layers": [0, 3]}}},
    )
    result = run_cli("sft", str(recipe), "--model", "student", "--set", "stages.student_sft.max_steps=2", cwd=in_tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    run = in_tmp / "runs" / "real"
    built = json.loads((run / "models" / "student" / "MANIFEST.json").read_text())
    card = (run / "student_sft" / "export" / "README.md").read_text()
    assert f"the teacher's layers [0, 3] of 4 with its embeddings, final norm and head, {built['parameters']:,}" in card
    assert f"sha256 {built['source']['sha256'][:12]}" in card
