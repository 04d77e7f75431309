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
    from bdctl.engine import lr_factor

    assert [round(lr_factor("linear", 4, 0)(s), 3) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [round(lr_factor("linear", 6, 2)(s), 3) for s in range(7)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_release_cosine_schedule_follows_the_formula():
    """The BD release's regime (cosine, 100 warm-up steps over 5000 iterations) for a 4690-step run:
    bdctl's linear warm-up, then 0.5 (1 + cos(pi (step - 100) / 4900))."""
    import math

    from bdctl.engine import lr_schedule
    from bdctl.recipe.schema import Train

    train = Train(schedule="cosine", warmup_steps=100, schedule_steps=5000)
    factor = lr_schedule(train, "distill", 4690)
    assert factor(0) == pytest.approx(1 / 101) and factor(99) == pytest.approx(100 / 101)
    for step in (100, 101, 1000, 2550, 4689, 5000):
        assert factor(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 100) / 4900)), abs=1e-12)
    assert factor(2550) == pytest.approx(0.5) and factor(5000) == pytest.approx(0.0, abs=1e-12)


def test_cosine_decay_equals_transformers_after_the_warm_up():
    """An independent reference: transformers' get_cosine_schedule_with_warmup (the release's cosine_trm)."""
    from transformers import get_cosine_schedule_with_warmup

    from bdctl.engine import lr_factor

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=100, num_training_steps=5000).lr_lambdas[0]
    ours = lr_factor("cosine", 5000, 100)
    for step in range(100, 5001, 37):
        assert ours(step) == pytest.approx(reference(step), abs=1e-12)


def test_warm_up_from_ratio_or_steps_and_the_constant_schedule():
    from bdctl.engine import lr_schedule
    from bdctl.recipe.schema import Train

    by_ratio = lr_schedule(Train(warmup_ratio=0.1, schedule="constant"), "sft", 1000)  # 100 warm-up steps
    assert by_ratio(98) == pytest.approx(99 / 101) and by_ratio(100) == 1.0 and by_ratio(999) == 1.0
    # the ratio is a share of the schedule's length, not of the run's
    longer = lr_schedule(Train(warmup_ratio=0.1, schedule_steps=2000), "sft", 1000)
    assert longer(199) == pytest.approx(200 / 201) and longer(1000) == pytest.approx(1 - 800 / 1800)
    with pytest.raises(ValueError, match=r"warmup_steps \(5\) and warmup_ratio \(0.1\) are both set"):
        Train(warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(ValueError, match=r"warmup_steps \(100\) must be smaller than schedule_steps \(100\)"):
        Train(warmup_steps=100, schedule_steps=100)


def test_a_run_longer_than_its_schedule_is_refused():
    from bdctl.engine import lr_schedule
    from bdctl.recipe.schema import Train

    with pytest.raises(UserError, match=r"stages.distill.schedule_steps \(5000\) is shorter than the run \(6000"):
        lr_schedule(Train(schedule_steps=5000), "distill", 6000)


def test_adam_betas_reach_the_deepspeed_optimizer():
    assert smoke_config()["optimizer"]["params"]["betas"] == [0.9, 0.999]  # the config file's, when unset
    config = smoke_config(**{"stages.teacher_sft.adam_betas": "[0.9, 0.95]"})
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95]


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


@pytest.mark.slow  # a real DeepSpeed ZeRO-3 engine in this process
def test_betas_and_schedule_reach_a_real_engine(tiny_tokenizer, single_rank_group):
    """The recipe's adam_betas reach DeepSpeed's AdamW, and its learning rate after each step is
    lr x the schedule's factor (cosine with warm-up, as in the paper recipes)."""
    from bdctl.engine import lr_schedule

    recipe, _ = load_recipe(
        "smoke",
        [
            "stages.teacher_sft.adam_betas=[0.8, 0.9]", "stages.teacher_sft.schedule=cosine",
            "stages.teacher_sft.warmup_ratio=0", "stages.teacher_sft.warmup_steps=2",
            "stages.teacher_sft.schedule_steps=6",
            "stages.teacher_sft.batch_size=2", "stages.teacher_sft.micro_batch_size=2",
        ],
    )  # fmt: skip
    train = recipe.stages.teacher_sft
    config = deepspeed_config(recipe, train, "teacher_sft", 1, 6, 32, "fp32", gpu=False)
    model = build_tiny_model(TinyModel(arch="gpt2", layers=1, hidden=32, heads=4, max_positions=32), tiny_tokenizer, 0)
    factor = lr_schedule(train, "teacher_sft", 6)
    engine = make_engine(policy_module(model), config, factor)
    assert all(tuple(group["betas"]) == (0.8, 0.9) for group in engine.optimizer.param_groups)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 8))
    labels = ids.clone()
    for step in range(6):
        assert engine.get_lr()[0] == pytest.approx(train.lr * factor(step))
        loss = engine(ids, torch.ones_like(ids), loss_fn=lambda h, w: lean_cross_entropy(h, w, labels))
        engine.backward(loss)
        engine.step()


def test_the_optimisation_is_described_in_words():
    from bdctl.engine import describe_optimisation
    from bdctl.recipe.schema import Train

    release = Train(lr=5e-6, adam_betas=(0.9, 0.95), weight_decay=1e-6, schedule="cosine", warmup_steps=100,
                    schedule_steps=5000)  # fmt: skip
    assert describe_optimisation(release) == (
        "optimiser: AdamW lr 5e-06, betas [0.9, 0.95], weight decay 1e-06; cosine schedule, 100 warm-up steps, "
        "over 5000 steps"
    )
    ratio = describe_optimisation(Train(warmup_ratio=0.1))
    assert ratio.endswith("linear schedule, warm-up 0.1 of the schedule, over the run")


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
