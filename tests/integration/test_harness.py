"""`bdctl eval --harness`: lm-evaluation-harness on eval's models, offline, with a multiple-choice task the test
writes itself over a local JSONL file; its accuracy checked against one computed by hand from the model's
log-probabilities. The model is a tiny student saved as a plain directory (no training stage to wait for)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import RECIPES, assert_user_error, run_cli

pytestmark = pytest.mark.slow  # `bdctl eval` in a subprocess

SMOKE = str(RECIPES / "smoke.yaml")
EVAL = ["--set", "stages.eval.seeds=[10]", "--set", "stages.eval.max_new_tokens=8"]


# A multiple-choice task of the test's own over a local JSONL file: lm-eval reads it with no network.
HARNESS_DOCS = [
    {"question": "What is two plus two?", "choices": ["four", "five", "blue"], "answer": 0},
    {"question": "Name a colour.", "choices": ["seven", "green", "run"], "answer": 1},
    {"question": "Reverse the word cat.", "choices": ["tac", "dog", "act"], "answer": 0},
    {"question": "Count to three.", "choices": ["a b", "one two three", "xyz"], "answer": 1},
    {"question": "Sort 3 1 2.", "choices": ["3 2 1", "2 1 3", "1 2 3"], "answer": 2},
    {"question": "Is fire hot?", "choices": ["no", "yes"], "answer": 1},
]


def write_harness_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in HARNESS_DOCS))
    (folder / "bdctl_toy.yaml").write_text(
        "task: bdctl_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def harness_reference(export: Path) -> float:
    """Accuracy by hand: the choice with the highest log-probability of " <choice>" after the question
    (lm-eval's multiple_choice with its default target delimiter " ")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(export).eval(), AutoTokenizer.from_pretrained(export)
    right = 0
    for doc in HARNESS_DOCS:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(HARNESS_DOCS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The run's data and tokenizer (as any stage makes them) and a tiny student saved beside them."""
    from bdctl.data.prepare import prepare_data
    from bdctl.models import build_tiny_model, load_tokenizer
    from bdctl.recipe import load_recipe
    from bdctl.rundir import RunDir

    root = tmp_path_factory.mktemp("harness")
    recipe, _ = load_recipe(SMOKE)
    run = RunDir(root / "runs/smoke")
    prepare_data(recipe, run, log=lambda *_: None)
    tokenizer = load_tokenizer(run.tokenizer)
    build_tiny_model(recipe.models.student.tiny, tokenizer, recipe.seed).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    write_harness_task(root / "tasks")
    return root


def test_harness_scores_go_beside_rouge_l(model_dir):
    from bdctl.recipe import load_recipe
    from bdctl.report import write_report
    from bdctl.rundir import RunDir

    root, model = model_dir, str(model_dir / "student")
    args = ["--model", model, "--harness", "bdctl_toy", "--harness-include", str(model_dir / "tasks")]
    result = run_cli("eval", SMOKE, *EVAL, *args, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    out = root / "runs/smoke/eval"
    results = json.loads((out / "results.json").read_text())
    harness = results["harness"]
    assert results["models"] == [model] and harness["tasks"] == ["bdctl_toy"]
    accuracy = harness["scores"][model]["bdctl_toy"]["acc"]
    assert accuracy == pytest.approx(harness_reference(root / "student"))
    assert harness["samples"][model] == {"bdctl_toy": len(HARNESS_DOCS)}
    name = results["model_dirs"][model]
    assert json.loads((out / "harness" / f"{name}.json").read_text())["results"]["bdctl_toy"]["acc,none"] == accuracy
    table = (out / "table.md").read_text()
    assert "### lm-evaluation-harness (beyond the paper)" in table and f"| {model} | {accuracy:.4f} ± " in table
    assert "lm-evaluation-harness" in result.stdout  # the terminal table
    assert "Rouge-L" in result.stdout and results["scores"]  # Rouge-L as before, beside it
    recipe, _ = load_recipe(SMOKE)
    report = write_report(RunDir(root / "runs/smoke"), recipe, SMOKE, [], {}).read_text()
    assert "## lm-evaluation-harness (beyond the paper)" in report and f"| {model} | {accuracy:.4f}" in report


def test_unknown_harness_task_is_one_line(model_dir, tmp_path):
    tasks = model_dir / "tasks"
    result = run_cli("eval", SMOKE, *EVAL, "--model", str(model_dir / "student"), "--harness", "bdctl_toy,bdctl_toi",
                     "--harness-include", str(tasks), cwd=model_dir)  # fmt: skip
    assert_user_error(result, "--harness: unknown lm-eval task 'bdctl_toi'", f"nor in {tasks}", "close: bdctl_toy")
