"""A LoRA student through the real CLI: `bdctl sft` on two ranks under ZeRO-3, killed after a checkpoint
and resumed, gives the same losses and the same exported weights as an uninterrupted run; the export
is a plain Hugging Face directory (the adapter merged in, and kept beside it with save_adapter); the
model card says LoRA. (Distill with a LoRA student: tests/integration/test_distill.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import RECIPES, run_cli

pytestmark = pytest.mark.slow  # `bdctl sft` on two ranks in a subprocess, three times (~3 min on 2 cores)

SMOKE = str(RECIPES / "smoke.yaml")
STEPS = 10
SETTINGS = [
    "--nproc", "2",
    "--set", "models.student.lora={r: 4, alpha: 8, target_modules: [c_attn, c_fc], save_adapter: true}",
    "--set", f"stages.student_sft.max_steps={STEPS}",
    "--set", "stages.student_sft.checkpoint_every=4",
    "--set", f"stages.student_sft.eval_every={STEPS}",
    "--set", "data.split.valid=8",
]  # fmt: skip
STAGE = "runs/smoke/student_sft"


def losses(cwd) -> dict[int, float]:
    records = [json.loads(line) for line in (cwd / STAGE / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def weights(export):
    from safetensors.torch import load_file

    return load_file(str(export / "model.safetensors"))


def prepare_base(cwd):
    """The run's data and tokenizer (as `bdctl sft` makes them), and a tiny student saved as a plain
    directory that the runs start from (stages.student_sft.init): the adapter's base, known exactly.
    (A tiny spec built under ZeRO-3's partitioned init gets other random weights than one built whole.)"""
    from bdctl.data.prepare import prepare_data
    from bdctl.models import build_tiny_model, load_tokenizer
    from bdctl.recipe import load_recipe
    from bdctl.rundir import RunDir

    recipe, _ = load_recipe(SMOKE, [s for s in SETTINGS if "=" in s and s.startswith("data.")])
    run = RunDir(cwd / "runs/smoke")
    prepare_data(recipe, run, log=lambda *_: None)
    tokenizer = load_tokenizer(run.tokenizer)
    build_tiny_model(recipe.models.student.tiny, tokenizer, recipe.seed).save_pretrained(cwd / "base")
    tokenizer.save_pretrained(cwd / "base")
    return ["--set", f"stages.student_sft.init={cwd / 'base'}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lora-reference")
    result = run_cli("sft", SMOKE, "--model", "student", *SETTINGS, *prepare_base(cwd), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def test_the_export_is_merged_plain_and_carded(reference):
    import torch
    from transformers import AutoModelForCausalLM

    export = reference / STAGE / "export"
    model, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not any(info.values()), info
    assert not any("lora" in name for name in weights(export))
    # the adapter, kept beside it, applied to the base student gives the export's logits
    from peft import PeftModel

    from bdctl.models import load_tokenizer

    tokenizer = load_tokenizer(export)
    base = AutoModelForCausalLM.from_pretrained(reference / "base")
    assert json.loads((export / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == str(
        reference / "base"
    )
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base.eval()(ids).logits
    adapted = PeftModel.from_pretrained(base, str(export / "adapter")).eval()  # wraps `base` in place
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before, adapted(ids).logits, atol=1e-4)  # the adapter trained
    card = (export / "README.md").read_text()
    assert "| LoRA | r 4, alpha 8, dropout 0, target modules c_attn, c_fc;" in card
    assert "- lora" in card  # the hub tag


def test_killed_and_resumed_gives_the_same_weights(reference, tmp_path):
    start_from = prepare_base(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bdctl", "sft", SMOKE, "--model", "student", *SETTINGS, *start_from],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    metrics = tmp_path / STAGE / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # until the checkpoint of step 4 is written and step 6 trained
        assert process.poll() is None, process.communicate()
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        records = [json.loads(line) for line in lines if line.endswith("}")]
        if any(r["event"] == "checkpoint" for r in records) and any(r.get("step", 0) >= 6 for r in records):
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / STAGE / "MANIFEST.json").exists()
    result = run_cli("sft", SMOKE, "--model", "student", *SETTINGS, *start_from, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr
    assert losses(tmp_path) == pytest.approx(losses(reference), rel=1e-6, abs=1e-7)
    import torch

    ours, theirs = weights(tmp_path / STAGE / "export"), weights(reference / STAGE / "export")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
