"""A messages-format run through `bdctl reproduce`, end to end, then `bdctl export` of its BD student.

The smoke recipe cut to its cheapest (a few steps per stage, one eval seed, short answers) on conversations
(data.format: messages) written from the synthetic tasks: single turns, two-turn conversations, a system turn,
and records the data stage must drop and count. The tokenizer is the tests' own ChatML one
(tests/chat_tokenizer.py). Checked: the split's counts, every stage finished and the report written, eval's
prompts are the conversations before their last assistant turn, and the export's tokenizer renders them.
"""

from __future__ import annotations

import json

import pytest

from tests.chat_tokenizer import build_chat_tokenizer
from tests.conftest import run_cli, write_recipe

pytestmark = pytest.mark.slow  # `bdctl reproduce` starts one process per stage


def conversations() -> list[dict]:
    from bdctl.data.synthetic import synthetic_instructions

    rows = synthetic_instructions(72, seed=3)

    def turn(row):
        text = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return [{"role": "user", "content": text}, {"role": "assistant", "content": row["output"]}]

    records = []
    for index in range(0, 64, 2):  # 32 single turns
        records.append({"messages": turn(rows[index])})
    for index in range(1, 48, 4):  # 12 two-turn conversations, every third with a system turn
        system = [{"role": "system", "content": "Answer briefly."}] if index % 3 == 0 else []
        records.append({"messages": system + turn(rows[index]) + turn(rows[index + 2])})
    records.append({"messages": turn(rows[65])[:1]})  # no assistant turn: dropped
    records.append({"messages": [{"role": "tool", "content": "42"}, *turn(rows[67])]})  # unknown role: dropped
    return records


def test_messages_format_reproduces_end_to_end_and_exports(tmp_path):
    from typer.testing import CliRunner

    build_chat_tokenizer(tmp_path / "chat-tokenizer")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    tiny_run = {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8}
    recipe = write_recipe(
        tmp_path / "chat.yaml",
        name="chat",
        models__tokenizer={"path": str(tmp_path / "chat-tokenizer")},
        data__template="chat",
        data__format="messages",
        data__system_prompt="none",
        data__source={"path": str(data)},
        data__split={"valid": 4, "test": 4, "seed": 1},
        data__pretrain=None,
        stages__teacher_sft=tiny_run,
        stages__student_sft=tiny_run,
        stages__generate={"n_samples": 1, "max_new_tokens": 8, "batch_size": 32},
        stages__distill={
            "lr": 1.0e-3,
            "max_steps": 1,
            "batch_size": 8,
            "micro_batch_size": 8,
            "select": "val_loss",
            "ablations": {},
            "minillm": {
                "num_rollouts": 8,
                "ppo_epochs": 1,
                "max_new_tokens": 8,
                "rollout_batch_size": 8,
                "max_steps": 1,
                "eval_every": 1,
            },
        },  # fmt: skip
        stages__eval={"models": ["student_sft", "distill/bd"], "seeds": [10], "max_new_tokens": 8},
        stages__judge={"baselines": ["student_sft"], "max_answer_tokens": 8},
    )
    result = run_cli("reproduce", str(recipe), cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "chat"
    split = json.loads((run / "data" / "split.json").read_text())
    assert split["dropped"]["no_final_assistant"] == 1 and split["dropped"]["unknown_role"] == 1
    assert split["source_examples"] == 46 and split["train"] + split["valid"] + split["test"] <= 44
    train = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert any(len(row["turns"]) == 2 for row in train)  # two-turn conversations that fit are trained on
    for stage in ("teacher_sft", "generate", "student_sft", "distill/bd", "distill/kd", "distill/seqkd",
                  "distill/minillm", "eval", "judge"):  # fmt: skip
        assert (run / stage / "MANIFEST.json").is_file(), stage
    assert "## Rouge-L" in (run / "report.md").read_text()

    # eval answered the test conversations (their prompt: the conversation before the last assistant turn)
    test_rows = {row["id"]: row for row in map(json.loads, (run / "data" / "test.jsonl").read_text().splitlines())}
    answers = (run / "eval" / "generations" / "distill-bd" / "minillm" / "dolly" / "seed10.jsonl").read_text()
    assert sorted(json.loads(line)["prompt_id"] for line in answers.splitlines()) == sorted(test_rows)
    for row in test_rows.values():
        assert row["messages"][-1]["content"] == row["output"] and row["prompt"].endswith("<|im_start|>assistant\n")

    from bdctl.cli import app

    out = tmp_path / "exported"
    exported = CliRunner().invoke(app, ["export", str(run), "distill/bd", str(out)])
    assert exported.exit_code == 0, exported.output
    from transformers import AutoTokenizer

    from bdctl.modelcard import parse_front_matter

    tokenizer = AutoTokenizer.from_pretrained(out)
    row = next(iter(test_rows.values()))
    rendered = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert rendered == row["prompt"]  # the model is prompted the way it was trained (system_prompt none: same text)
    meta = parse_front_matter((out / "README.md").read_text())
    assert meta["datasets"] == [str(data)] and meta["tags"][:3] == ["distillation", "bdctl", "bd"]
    assert "conversations (data.format: messages)" in (out / "README.md").read_text()
