"""The DeepSpeed layer: "auto" fields from the recipe, and a real ZeRO-3 step that matches plain torch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bdctl.engine import deepspeed_config, gathered_state_dict, init_distributed, make_engine, policy_module
from bdctl.errors import UserError
from bdctl.models import build_tiny_model
from bdctl.objectives.lm import dense_cross_entropy, lean_cross_entropy
from bdctl.recipe import load_recipe
from bdctl.recipe.schema import TinyModel


def smoke_config(world: int = 2, **overrides):
    recipe, _ = load_recipe("smoke", [f"{k}={v}" for k, v in overrides.items()])
    train = recipe.stages.teacher_sft
    return deepspeed_config(recipe, train, "teacher_sft", world, 100, 64, "fp32", gpu=False)


def test_auto_fields_come_from_the_recipe():
    config = smoke_config(world=2, **{"stages.teacher_sft.batch_size": 32, "stages.teacher_sft.micro_batch_size": 4})
    assert config["train_batch_size"] == 32 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 4  # 32 = 4 x 4 x 2
    assert config["zero_optimization"]["stage"] == 3
    assert config["optimizer"]["params"]["lr"] == 3e-3 and config["optimizer"]["params"]["torch_adam"] is True
    assert config["bf16"]["enabled"] is False
    assert "auto" not in json.dumps(config)


def test_linear_schedule():
    from bdctl.engine import linear_schedule

    assert [round(linear_schedule(4, 0)(s), 3) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [round(linear_schedule(6, 2)(s), 3) for s in range(7)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_batch_that_does_not_split_is_a_clear_error():
    with pytest.raises(
        UserError,
        match=r"stages.teacher_sft.batch_size \(16\) is not a multiple of micro_batch_size \(8\) x ranks \(4\)",
    ):
        smoke_config(world=4)


def test_unknown_config_and_unfillable_auto(tmp_path):
    with pytest.raises(UserError, match=r"deepspeed.config: no config named 'zero9'"):
        smoke_config(**{"deepspeed.config": "zero9"})
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"train_batch_size": "auto", "mystery": {"knob": "auto"}}))
    with pytest.raises(UserError, match=rf"{custom}: mystery.knob: bdctl cannot fill 'auto' here"):
        smoke_config(**{"deepspeed.config": str(custom)})


@pytest.fixture(scope="module")
def single_rank_group():
    """A process group of one for in-process DeepSpeed. DeepSpeed caches the group, so it lives
    until the test process ends (tests/conftest.py keeps its variables out of CLI subprocesses)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()


@pytest.mark.slow  # a real DeepSpeed ZeRO-3 engine in this process
@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2"])
def test_zero3_step_through_the_policy_module_matches_plain_torch(arch, tiny_tokenizer, single_rank_group):
    """The loss runs on the gathered output embedding (an external ZeRO-3 parameter): its value
    and the weights after one SGD step (lr 1: the update is the gradient) must equal plain torch
    autograd on full logits, so every gradient, the tied embedding's included, is right."""
    spec = TinyModel(arch=arch, layers=2, hidden=32, heads=4, max_positions=64)
    model = build_tiny_model(spec, tiny_tokenizer, seed=0)
    reference = copy.deepcopy(model)
    config = {
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}}, "zero_allow_untested_optimizer": True,
    }  # fmt: skip
    engine = make_engine(policy_module(model), config)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 4:8] = ids[:, 5:9]

    loss = engine(ids, mask, loss_fn=lambda h, w: lean_cross_entropy(h, w, labels))
    engine.backward(loss)
    engine.step()

    expected = dense_cross_entropy(reference(input_ids=ids, attention_mask=mask).logits, labels)
    expected.backward()

    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    trained = gathered_state_dict(engine.module.lm, rank=0)
    for name, value in reference.named_parameters():
        torch.testing.assert_close(value.detach() - trained[name], value.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # a fresh interpreter joins a process group of one (about 10 s)
def test_deepspeed_startup_prints_reach_the_log_not_the_terminal(tmp_path):
    """DeepSpeed's CPU backend print()s "deepspeed_shm_comm_op built successfully" when a rank
    joins its group: once per rank and command, ten lines in a smoke reproduction. It is kept
    for the rank's log (`startup_output`) instead."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import json; from bdctl.engine import init_distributed, startup_output; init_distributed(); "
        "print('KEPT ' + json.dumps(startup_output()))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [line for line in done.stdout.splitlines() if not line.startswith("KEPT ")]
    assert not any("built successfully" in line for line in printed + done.stderr.splitlines()), done.stdout
    kept = json.loads(done.stdout.splitlines()[-1].removeprefix("KEPT "))
    assert all("built successfully" in line for line in kept)  # where the op builds at all
