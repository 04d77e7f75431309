"""Gradient checkpointing and the attention kernel on the real ZeRO-3 engine: student SFT of the smoke recipe on
conversations, three steps, with and without the switches; every step's loss agrees to fp32 tolerance (the weights
after step 1 depend on step 1's gradients, so equal later losses mean equal gradients too)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from tests.chat_tokenizer import build_chat_tokenizer
from tests.conftest import write_recipe

pytestmark = pytest.mark.slow  # two DeepSpeed ZeRO-3 runs (in this process)


def sft_losses(root, tokenizer_dir, data, **switches) -> list[float]:
    from bdctl.launch import LaunchOptions
    from bdctl.submit import submit

    recipe = write_recipe(
        root / "r.yaml",
        models__tokenizer={"path": str(tokenizer_dir)},
        models__student={"tiny": {"arch": "qwen2", "layers": 2, "hidden": 32, "heads": 4}, **switches},
        data__template="chat",
        data__format="messages",
        data__source={"path": str(data)},
        data__split={"valid": 4, "test": 4, "seed": 1},
        data__pretrain=None,
        stages__student_sft={"lr": 1.0e-2, "max_steps": 3, "batch_size": 8, "micro_batch_size": 4},
    )
    saved = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    level = logging.getLogger().level
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            submit("sft", str(recipe), [], {"model": "student"}, LaunchOptions(), log=lambda _: None)
    finally:
        logging.getLogger().setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    metrics = (root / "runs" / "smoke" / "student_sft" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, metrics) if record["event"] == "train"]


def test_switches_leave_zero3_sft_losses_unchanged(tmp_path):
    from bdctl.data.synthetic import synthetic_instructions

    build_chat_tokenizer(tmp_path / "tok")
    data = tmp_path / "chats.jsonl"
    rows = synthetic_instructions(40, seed=5)
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["instruction"]},
                        {"role": "assistant", "content": r["output"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )  # fmt: skip
    )
    (tmp_path / "plain").mkdir()
    (tmp_path / "switched").mkdir()
    plain = sft_losses(tmp_path / "plain", tmp_path / "tok", data, attn_implementation="eager")
    switched = sft_losses(
        tmp_path / "switched", tmp_path / "tok", data, attn_implementation="sdpa", gradient_checkpointing=True
    )
    assert len(plain) == 3
    assert switched == pytest.approx(plain, rel=1e-5, abs=1e-6)
