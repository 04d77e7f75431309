"""Hub-ready exports: the Jinja chat template of bdctl's own prompt format (rendered and compared with
render_prompt), the model card's hub metadata, and `bdctl export` (in-process through typer's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdctl.recipe.schema import Template

OWN = Template(without_input="Q: {instruction}\nRéponse ✓:", with_input='Q: {instruction} "{{x}}"\\n\nIn: {input}\nA:')
CASES = [
    (" Sort these. ", " b a "), ("Say {input} hi.", ""), ("x\n\ny", "{instruction}"), ("Tab\t", "  "), ("Ça?", "é")
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from bdctl.models import train_tokenizer
    from bdctl.recipe.schema import TokenizerTraining

    texts = ["hello world, a task"] * 20
    return train_tokenizer(texts, TokenizerTraining(vocab_size=300), tmp_path_factory.mktemp("t"))


@pytest.mark.parametrize("template", [None, OWN], ids=["bdctl's", "recipe's own"])
def test_the_chat_template_renders_exactly_bdctls_prompt(tokenizer, template):
    from bdctl.data.template import jinja_chat_template, render_prompt

    tokenizer.chat_template = jinja_chat_template(template)
    for instruction, input in CASES:
        turn = {"role": "user", "content": instruction, "input": input}
        rendered = tokenizer.apply_chat_template([turn], tokenize=False, add_generation_prompt=True)
        assert rendered == render_prompt(instruction, input, template)
        # without an input key: the form without input
        plain = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False)
        assert plain == render_prompt(instruction, "", template)
    # an assistant turn is its text and the EOS, the stop token it was trained with; a system turn is left out
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yo"}]  # fmt: skip
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == render_prompt("Hi", "", template) + (
        "Yo" + tokenizer.eos_token
    )


def test_the_card_carries_the_hubs_metadata(tmp_path):
    from bdctl.engine import base_model_card
    from bdctl.modelcard import card_facts, parse_front_matter, render_card
    from tests.unit.test_chat_and_cards import INFO, variant

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# base\n")
    (base / "config.json").write_text(json.dumps({"license": "mit", "model_type": "gpt2"}))
    job = variant(
        recipe__models__student={"path": str(base), "revision": None, "tiny": None},
        recipe__stages__eval__sets=[{"name": "dolly", "split": "test"}, {"name": "vicuna", "path": "data/v.jsonl"}],
    )
    card = base_model_card(job)
    assert card == {"license": "apache-2.0", "language": ["en"]}  # the card's word over the config's
    test = {"minillm": {name: {"mean": 25.0, "std": 0.5, "per_seed": {"10": 25.0}} for name in ("dolly", "vicuna")}}
    text = render_card(card_facts(job, "export", INFO, None, test, version="9", command="c", base_card=card))
    meta = parse_front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["datasets"] == ["databricks/databricks-dolly-15k"]
    assert meta["tags"] == ["distillation", "bdctl", "bd", "bellman-distill"]
    names = [r["dataset"]["name"] for r in meta["model-index"][0]["results"]]
    # validation loss, Rouge-L under two protocols, then the two test sets
    assert names == ["databricks/databricks-dolly-15k"] * 4 + ["data/v.jsonl"]
    assert "base_model" not in meta  # a local directory is no hub id
    assert "| dolly: Rouge-L, protocol minillm" in text  # the tables keep bdctl's set names
    # a tiny student: nothing known, nothing claimed
    assert base_model_card(variant(recipe__models__student={"path": None, "tiny": {"arch": "gpt2"}})) == {}


def fake_run(root: Path, finished: bool = True) -> Path:
    """A run with one distill stage whose export is a (file-level) Hugging Face directory."""
    from bdctl.rundir import mark_complete

    stage = root / "run" / "distill" / "bd"
    (stage / "export").mkdir(parents=True)
    (stage / "job.json").write_text(json.dumps({"recipe": {"data": {"template": None}}}))
    for name, text in {"config.json": "{}", "tokenizer_config.json": "{}", "README.md": "---\ntags: [bdctl]\n---\n",
                       "model.safetensors": "w"}.items():  # fmt: skip
        (stage / "export" / name).write_text(text)
    (root / "run" / "student_sft").mkdir()
    (root / "run" / "student_sft" / "job.json").write_text("{}")
    if finished:
        mark_complete(stage, stage="distill")
    return root / "run"


def invoke(*args: str):
    from bdctl.cli import app

    return CliRunner().invoke(app, ["export", *args], env={"COLUMNS": "300"})


def test_export_copies_the_model_card_and_adds_the_prompt_format(tmp_path):
    from bdctl.data.template import jinja_chat_template

    run = fake_run(tmp_path)
    out = tmp_path / "out" / "tiny-bd"
    result = invoke(str(run), "distill/bd", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "chat_template.jinja", "config.json", "model.safetensors", "tokenizer_config.json"
    ]  # fmt: skip
    assert (out / "chat_template.jinja").read_text() == jinja_chat_template()
    assert f"huggingface-cli upload <your-name>/<model-name> {out}" in result.output
    assert not list(out.parent.glob(".*"))  # no temporary directory left behind


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no run", "{tmp}/nowhere: no such run directory"),
        ("not a run", "{tmp}/out: not a run directory"),
        ("unknown stage", "{run}: no stage 'distill/kd' that exports a model (finished ones: distill/bd)"),
        ("unfinished", "{run}/student_sft: not finished (no MANIFEST.json); finished stages: distill/bd"),
        ("no protocol export", "{run}/distill/bd/export-release: no such export (this stage has: export)"),
        ("file", "{tmp}/file: a file, not a directory"),
        ("not empty", "{tmp}/full: not empty"),
    ],
)
def test_export_refuses_in_one_line(tmp_path, case, expected):
    run = fake_run(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = {
        "no run": [str(tmp_path / "nowhere"), "distill/bd", str(tmp_path / "o")],
        "not a run": [str(tmp_path / "out"), "distill/bd", str(tmp_path / "o")],
        "unknown stage": [str(run), "distill/kd", str(tmp_path / "o")],
        "unfinished": [str(run), "student_sft", str(tmp_path / "o")],
        "no protocol export": [str(run), "distill/bd", str(tmp_path / "o"), "--protocol", "release"],
        "file": [str(run), "distill/bd", str(tmp_path / "file")],
        "not empty": [str(run), "distill/bd", str(tmp_path / "full")],
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected.format(tmp=tmp_path, run=run) in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_the_card_names_a_conversation_format():
    from bdctl.modelcard import card_facts, render_card
    from tests.unit.test_chat_and_cards import INFO, variant

    job = variant(recipe__data__template="chat", recipe__data__format="sharegpt", recipe__data__system_prompt="Hi.")
    text = render_card(card_facts(job, "export", INFO, None, None, version="9", command="c"))
    assert "conversations (data.format: sharegpt) in the tokenizer's own chat template" in text
    assert "system prompt: 'Hi.'" in text


def test_the_hf_judge_keeps_its_plain_prompt_for_a_bdctl_export(tmp_path):
    """An export's chat template is bdctl's prompt format, not a conversation: a judge that is a bdctl export
    (judge.hf_model: teacher_sft, the default) reads the plain-text judge prompt as before."""
    from transformers import AutoTokenizer

    from bdctl.data.template import jinja_chat_template
    from bdctl.judges.hf_backend import HFJudge
    from tests.unit.test_judge_core import tiny_judge_dir

    directory = tiny_judge_dir(tmp_path / "judge", chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = jinja_chat_template()
    tokenizer.save_pretrained(directory)
    assert HFJudge.from_pretrained(directory, batch_size=1).uses_chat_template is False
