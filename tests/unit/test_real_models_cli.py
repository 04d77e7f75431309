"""A recipe whose teacher is a GGUF file and whose student is cut from it, through the real CLI
in-process (typer's CliRunner): `bdctl recipes show` (sizes before anything is built), `bdctl sft
--dry-run` (builds both models, then prints the launch), and `bdctl recipes cuts`, whose NLL of
the whole teacher is checked against a plain per-token computation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bdctl.cli import app

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import write_recipe  # noqa: E402
from gguf_files import tiny_hf_model, write_gguf  # noqa: E402


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250", "NO_COLOR": "1"}, prog_name="bdctl")


@pytest.fixture
def real_recipe(in_tmp, tiny_tokenizer) -> Path:
    write_gguf(tiny_hf_model("qwen2", tiny_tokenizer, layers=4), tiny_tokenizer, in_tmp / "teacher.gguf")
    return write_recipe(
        in_tmp / "real.yaml",
        name="real",
        models={"teacher": {"gguf": "teacher.gguf"}, "student": {"from_teacher": {"keep": 2, "how": "ends"}}},
    )


def test_show_then_dry_run_then_cuts(real_recipe, in_tmp, tiny_tokenizer):
    shown = invoke("recipes", "show", str(real_recipe))
    assert shown.exit_code == 0, shown.output
    assert "teacher: teacher.gguf (gguf)" in shown.output and "student: teacher's layers [2, 3] of 4" in shown.output
    assert not (in_tmp / "runs").exists()  # show reads the file's metadata, builds nothing

    dry = invoke("sft", str(real_recipe), "--model", "student", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert '"stage": 3' in dry.output
    built = in_tmp / "runs" / "real" / "models"
    assert json.loads((built / "student" / "MANIFEST.json").read_text())["layers"] == [2, 3]
    assert json.loads((built / "teacher" / "MANIFEST.json").read_text())["architecture"] == "qwen2"

    cuts = invoke("recipes", "cuts", str(real_recipe), "--examples", "4")
    assert cuts.exit_code == 0, cuts.output
    rows = {line.split("│")[1].strip(): line for line in cuts.output.splitlines() if line.startswith("│")}
    assert set(rows) == {"teacher", "recipe", "even"}  # ends = the recipe's own, left out once
    assert "all 4" in rows["teacher"] and "[2, 3]" in rows["recipe"] and "[0, 3]" in rows["even"]

    # the teacher's NLL by hand: -log p(token | prefix) over each answer's tokens and its stop token
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(built / "teacher", dtype=torch.float32)
    rows_valid = [json.loads(line) for line in (in_tmp / "runs/real/data/valid.jsonl").read_text().splitlines()][:4]
    total, count = 0.0, 0
    for row in rows_valid:
        prompt = tiny_tokenizer(row["prompt"])["input_ids"]
        answer = tiny_tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        with torch.no_grad():
            logp = teacher(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        for offset, token in enumerate(answer):
            total -= logp[len(prompt) - 1 + offset, token].item()
            count += 1
    assert f"{total / count:.3f}" == rows["teacher"].split("│")[4].strip()


def test_cuts_without_a_cut_student_needs_keep(in_tmp, tiny_tokenizer):
    write_gguf(tiny_hf_model("llama", tiny_tokenizer, layers=2), tiny_tokenizer, in_tmp / "t.gguf")
    recipe = write_recipe(
        in_tmp / "r.yaml", name="r", models={"teacher": {"gguf": "t.gguf"}, "student": {"gguf": "t.gguf"}}
    )
    result = invoke("recipes", "cuts", str(recipe))
    assert result.exit_code == 2
    assert "the recipe's student is not cut from the teacher; pass --keep K" in result.output


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"teacher": {"gguf": "notes.gguf"}, "student": {"gguf": "notes.gguf"}}, "notes.gguf: not a GGUF file"),
        ({"teacher": {"gguf": "gone.gguf"}, "student": {"gguf": "gone.gguf"}}, "gone.gguf: no such file"),
        (
            {"teacher": {"gguf": "t.gguf"}, "student": {"from_teacher": {"layers": [0, 9]}}},
            "layer 9 is out of range; the teacher has 2 layers (0 to 1)",
        ),
    ],
    ids=["not-gguf", "missing", "layer-out-of-range"],
)
def test_bad_models_end_the_command_in_one_line(models, expected, in_tmp, tiny_tokenizer):
    (in_tmp / "notes.gguf").write_text("these are notes, not a model\n")
    write_gguf(tiny_hf_model("llama", tiny_tokenizer, layers=2), tiny_tokenizer, in_tmp / "t.gguf")
    recipe = write_recipe(in_tmp / "bad.yaml", name="bad", models=models)
    result = invoke("sft", str(recipe), "--model", "student", "--dry-run")
    assert result.exit_code == 2, result.output
    # progress lines (the teacher converted before the student's layers are checked) may precede it
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and expected in errors[0], result.output
    assert "Traceback" not in result.output and "WARNING" not in result.output
