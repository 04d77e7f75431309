"""`bdctl sft` through the real CLI: one and two ZeRO-3 ranks, three architectures, bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import RECIPES, assert_user_error, run_cli, write_recipe

pytestmark = pytest.mark.slow  # every test runs `bdctl` in a subprocess

SMOKE = str(RECIPES / "smoke.yaml")


def metrics(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def assert_loadable_export(export, tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bdctl.models import tokenizer_hash

    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer_hash(tokenizer) == tokenizer_hash(AutoTokenizer.from_pretrained(tokenizer_dir))
    prompt = tokenizer("### Instruction:\nWhat is two plus two?\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    return model


def test_teacher_sft_one_rank(tmp_path):
    result = run_cli("sft", SMOKE, "--model", "teacher", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stage = tmp_path / "runs/smoke/teacher_sft"
    done = json.loads((stage / "MANIFEST.json").read_text())
    evals = [m for m in metrics(stage) if m["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals  # it learns
    assert done["select"] == "val_loss" and done["best_score"] == min(m["val_loss"] for m in evals)
    trains = [m for m in metrics(stage) if m["event"] == "train"]
    assert len(trains) == done["steps"] == 2 * (283 // 16) or len(trains) == done["steps"]
    assert all(m["tokens_per_s"] > 0 and m["lr"] >= 0 for m in trains)
    model = assert_loadable_export(stage / "export", tmp_path / "runs/smoke/tokenizer")
    assert model.config.n_layer == 2
    assert (tmp_path / "runs/smoke/recipe.yaml").is_file() and (stage / "recipe.yaml").is_file()
    assert not (stage / "checkpoints").exists()  # a finished stage drops its DeepSpeed checkpoints by default

    again = run_cli("sft", SMOKE, "--model", "teacher", cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stderr


def test_student_sft_two_ranks(tmp_path):
    keep = ("--set", "stages.student_sft.keep_checkpoints_after_finish=true")  # the checkpoint is inspected below
    result = run_cli("sft", SMOKE, "--model", "student", "--nproc", "2", *keep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stage = tmp_path / "runs/smoke/student_sft"
    start = next(m for m in metrics(stage) if m["event"] == "start")
    assert start["world_size"] == 2
    checkpoint = next(p for p in (stage / "checkpoints").iterdir() if p.is_dir())
    assert len(list(checkpoint.glob("zero_pp_rank_*_model_states.pt"))) == 2  # a real 2-rank ZeRO checkpoint
    assert list(checkpoint.glob("*optim_states.pt"))
    assert_loadable_export(stage / "export", tmp_path / "runs/smoke/tokenizer")


def test_world_size_does_not_change_the_result(tmp_path):
    """The global batch and its token-mean loss do not depend on how it is cut across ranks."""
    losses = {}
    for nproc in ("1", "2"):
        cwd = tmp_path / nproc
        cwd.mkdir()
        result = run_cli(
            "sft", SMOKE, "--model", "student", "--nproc", nproc, "--set", "stages.student_sft.max_steps=3", cwd=cwd
        )
        assert result.returncode == 0, result.stderr[-3000:]
        losses[nproc] = [m["loss"] for m in metrics(cwd / "runs/smoke/student_sft") if m["event"] == "train"]
    assert len(losses["1"]) == 3
    assert losses["1"] == pytest.approx(losses["2"], rel=1e-4)


@pytest.mark.parametrize("arch", ["opt", "qwen2"])
def test_sft_other_architectures(arch, tmp_path):
    result = run_cli(
        "sft", SMOKE, "--model", "student", "--set", f"models.student.tiny.arch={arch}",
        "--set", "stages.student_sft.max_steps=4", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model = assert_loadable_export(tmp_path / "runs/smoke/student_sft/export", tmp_path / "runs/smoke/tokenizer")
    assert model.config.model_type == arch


def test_help_shows_examples(tmp_path):
    # That `bdctl --help` stays instant (imports no torch, deepspeed or transformers) is checked
    # through sys.modules by tests/unit/test_cli_imports.py, not with a wall clock here.
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "sft" in result.stdout
    sft_help = run_cli("sft", "--help", cwd=tmp_path)
    assert "bdctl sft recipes/smoke.yaml --model teacher" in sft_help.stdout


def test_dry_run_prints_the_launcher_command(tmp_path):
    result = run_cli("sft", SMOKE, "--model", "student", "--nproc", "2", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0
    assert (
        "-m bdctl.launch --nnodes 1 --node_rank 0 --nproc_per_node 2" in result.stderr
        and "-m bdctl.worker" in result.stderr
    )
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


# --- bad input: one line, exit code 2, no traceback -------------------------------------------


def test_missing_recipe_file(tmp_path):
    assert_user_error(run_cli("sft", "recipes/nope.yaml", cwd=tmp_path), "recipes/nope.yaml: recipe file not found")


def test_unknown_key_and_wrong_type(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", stages__teacher_sft__lrr=1)
    assert_user_error(run_cli("sft", str(path), cwd=tmp_path), f"{path}: stages.teacher_sft.lrr: unknown key")
    result = run_cli("sft", SMOKE, "--set", "stages.teacher_sft.lr=fast", cwd=tmp_path)
    assert_user_error(result, "stages.teacher_sft.lr: expected a number, got 'fast'")


def test_missing_data_file(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", data__source={"path": str(tmp_path / "gone.jsonl")})
    assert_user_error(run_cli("sft", str(path), cwd=tmp_path), f"{tmp_path / 'gone.jsonl'}: file not found")


def test_malformed_jsonl_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "inp\n')
    path = write_recipe(tmp_path / "r.yaml", data__source={"path": str(data)})
    assert_user_error(run_cli("sft", str(path), cwd=tmp_path), f"{data}:2: malformed JSON line")
    assert not (tmp_path / "runs/smoke/data/MANIFEST.json").exists()


def test_vocabulary_mismatch(tmp_path):
    from bdctl.models import build_tiny_model, train_tokenizer
    from bdctl.recipe.schema import TinyModel, TokenizerTraining

    other = train_tokenizer(["completely different text"] * 20, TokenizerTraining(vocab_size=280), tmp_path / "t")
    build_tiny_model(TinyModel(arch="gpt2", layers=1, hidden=16, heads=2), other, seed=0).save_pretrained(
        tmp_path / "teacher"
    )
    other.save_pretrained(tmp_path / "teacher")
    path = write_recipe(tmp_path / "r.yaml", models__teacher={"path": str(tmp_path / "teacher")})
    result = run_cli("sft", str(path), "--model", "student", cwd=tmp_path)
    assert_user_error(result, f"teacher model {tmp_path / 'teacher'}: its tokenizer differs from the shared one")
    assert not (tmp_path / "runs/smoke/student_sft").exists()


def test_batch_that_does_not_split_over_ranks(tmp_path):
    result = run_cli("sft", SMOKE, "--model", "student", "--nproc", "3", cwd=tmp_path)
    assert_user_error(
        result, "stages.student_sft.batch_size (16) is not a multiple of micro_batch_size (4) x ranks (3)"
    )
