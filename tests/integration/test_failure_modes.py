"""Bad input through the real CLI: one error line naming the culprit, exit 2, no traceback, and
nothing left that looks complete. Every case but the last fails before any rank starts (seconds
each); the last fails inside two ranks. tests/integration/test_bad_inputs.py has the table of the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RECIPES, assert_user_error, run_cli, write_recipe

pytestmark = pytest.mark.slow  # every test runs the CLI in a subprocess

SMOKE = str(RECIPES / "smoke.yaml")
ROOT = Path(__file__).resolve().parents[2]
LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


def lock_holder(stage: Path) -> subprocess.Popen:
    """A process that holds `stage`'s lock (as a running command would) until it is killed."""
    code = (
        "import time; from pathlib import Path; from bdctl.rundir import stage_lock\n"
        f"with stage_lock(Path({str(stage)!r})): print('held', flush=True); time.sleep(600)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", code, "sft", "smoke"], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "held"
    return process


# --------------------------------------------------------------------------- files that are not UTF-8


def test_a_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "latin.yaml"
    recipe.write_bytes(b"name: latin\ndescription: " + LATIN1 + b"\n")
    for command in (["sft", str(recipe), "--model", "student"], ["recipes", "show", str(recipe)]):
        assert_user_error(run_cli(*command, cwd=tmp_path), f"{recipe}:2: not UTF-8 text (byte 0xe9)")
    assert not (tmp_path / "runs").exists()


def test_data_and_eval_files_that_are_not_utf8_name_the_line(tmp_path):
    data = tmp_path / "latin.jsonl"
    good = b'{"instruction": "Say hi.", "input": "", "output": "hi"}\n'
    data.write_bytes(good * 2 + b'{"instruction": "' + LATIN1 + b'", "input": "", "output": "x"}\n')
    source = {"path": str(data)}
    recipe = write_recipe(tmp_path / "r.yaml", data__source=source)
    result = run_cli("sft", str(recipe), "--model", "student", cwd=tmp_path)
    assert_user_error(result, f"{data}:3: not UTF-8 text (byte 0xe9); save the file as UTF-8")
    assert not (tmp_path / "runs/smoke/recipe.yaml").exists()  # a failed command records no recipe

    recipe = write_recipe(tmp_path / "e.yaml", stages__eval={"sets": [{"name": "latin", "path": str(data)}]})
    assert_user_error(run_cli("eval", str(recipe), cwd=tmp_path), f"{data}:3: not UTF-8 text")

    corpus = tmp_path / "latin.txt"
    corpus.write_bytes(b"one document\n" + LATIN1 + b"\n")
    recipe = write_recipe(tmp_path / "p.yaml", data__pretrain={"path": str(corpus), "block_size": 64})
    assert_user_error(run_cli("sft", str(recipe), "--model", "student", cwd=tmp_path), f"{corpus}:2: not UTF-8 text")


def test_a_directory_given_as_a_data_file(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", data__source={"path": str(tmp_path / "data.jsonl")})
    result = run_cli("sft", str(recipe), "--model", "student", cwd=tmp_path)
    assert_user_error(result, f"{tmp_path / 'data.jsonl'}: is a directory, not a data file")


# --------------------------------------------------------------------------- launcher options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--nnodes", "2", "--node-rank", "5"], "--node-rank 5: expected a node rank from 0 to 1 (--nnodes 2)"),
        (["--node-rank", "1"], "--node-rank 1: expected a node rank from 0 to 0 (--nnodes 1)"),
        (["--master-port", "99999"], "--master-port 99999: expected a port number from 1 to 65535"),
        (["--master-port", "0"], "--master-port 0: expected a port number from 1 to 65535"),
    ],
)
def test_launcher_options_that_cannot_work(tmp_path, options, message):
    # Without the check, the first waits forever for node 0 and the others end in a launcher traceback.
    result = run_cli("sft", SMOKE, "--model", "student", *options, cwd=tmp_path, timeout=120)
    assert_user_error(result, message)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- one writer per stage


def test_a_second_command_on_a_stage_directory_is_refused(tmp_path):
    for command, stage in ((["sft", SMOKE, "--model", "student"], "student_sft"), (["eval", SMOKE], "eval"),
                           (["judge", SMOKE], "judge"), (["generate", SMOKE], "generate")):  # fmt: skip
        directory = tmp_path / "runs/smoke" / stage
        holder = lock_holder(directory)
        try:
            result = run_cli(*command, cwd=tmp_path)
            assert_user_error(
                result, f"runs/smoke/{stage} is in use by another command: `bdctl sft smoke` (pid {holder.pid} on ",
                "one command per stage directory at a time",
            )  # fmt: skip
        finally:
            holder.kill()
            holder.wait()
        assert not (tmp_path / "runs/smoke/data").exists()  # refused before preparing anything


def test_a_stale_lock_is_taken_over(tmp_path):
    data = tmp_path / "noref.jsonl"
    data.write_text('{"instruction": "Say hi.", "input": ""}\n')
    recipe = write_recipe(tmp_path / "r.yaml", stages__eval={"sets": [{"name": "noref", "path": str(data)}]})
    stage = tmp_path / "runs/smoke/eval"
    holder = lock_holder(stage)
    holder.send_signal(signal.SIGKILL)  # killed: its lock stays behind
    holder.wait()
    assert (stage / "LOCK").is_file()
    # The command gets past the lock to its own checks, and leaves no lock when it ends.
    assert_user_error(
        run_cli("eval", str(recipe), cwd=tmp_path), f"{data}:1: eval set 'noref' has no reference answers"
    )
    assert not (stage / "LOCK").exists()


# --------------------------------------------------------------------------- failures inside ranks


def test_weights_that_fail_inside_the_ranks_are_one_line(tmp_path):
    """Weights whose file is whole (the launching process's header check passes) but whose header
    lies about a tensor's type: both ranks fail to load them; the command shows the first failing
    rank's line naming the directory, no traceback, and no rank's output looks complete."""
    from bdctl.data.synthetic import synthetic_instructions
    from bdctl.models import build_tiny_model, train_tokenizer
    from bdctl.recipe.schema import TinyModel, TokenizerTraining

    model = tmp_path / "teacher"
    texts = [" ".join(row.values()) for row in synthetic_instructions(400, seed=7)]  # the smoke prompts fit
    tokenizer = train_tokenizer(texts, TokenizerTraining(vocab_size=512), model)
    spec = TinyModel(arch="gpt2", layers=1, hidden=32, heads=2, max_positions=128)
    build_tiny_model(spec, tokenizer, 1).save_pretrained(model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].replace(b'"dtype":"F32"', b'"dtype":"F16"', 1)  # same size, wrong type
    weights.write_bytes(data[:8] + header + data[8 + length :])
    recipe = write_recipe(tmp_path / "r.yaml", models__teacher={"path": str(model)}, models__tokenizer={})
    result = run_cli("sft", str(recipe), "--model", "teacher", "--nproc", "2", cwd=tmp_path)
    assert_user_error(result, f"{model}: cannot load the model (Error while deserializing header")
    assert "Traceback" not in result.stdout
    stage = tmp_path / "runs/smoke/teacher_sft"
    assert (stage / "logs/rank0.log").is_file() and not (stage / "MANIFEST.json").exists()
    assert not (tmp_path / "runs/smoke/recipe.yaml").exists()
