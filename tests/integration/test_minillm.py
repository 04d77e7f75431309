"""`bdctl distill --method minillm` through the real CLI on the smoke recipe: to completion, SIGKILL and an
exact resume, the same rollouts and losses on one and two ranks; bad settings as one line each.

The runs share one directory with a briefly trained teacher and phase-1 student (module fixture); each test
copies it. Four steps: two collections of 16 rollouts, two PPO passes of one minibatch each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import assert_user_error, run_cli, write_recipe

pytestmark = pytest.mark.slow  # every test runs `bdctl distill --method minillm` (DeepSpeed) in a subprocess

STEPS = 4
SETTINGS = {
    "data__split__valid": 8,  # Rouge-L validation runs three times per run: keep it short
    "stages__teacher_sft__max_steps": 6,
    "stages__student_sft__max_steps": 3,
    "stages__distill__select": "rouge_l",
    "stages__distill__checkpoint_every": 1,
    "stages__distill__minillm__max_new_tokens": 16,
    "stages__distill__minillm__max_steps": STEPS,
    "stages__distill__minillm__lr": 1.0e-3,
}
KEYS = ("loss", "pg_loss", "single_kl", "mean_ratio", "clip_fraction", "pt_loss", "method_loss")


def records_of(cwd) -> list[dict]:
    path = cwd / "runs/smoke/distill/minillm/metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def by_step(records, event) -> dict[int, dict]:
    return {r["step"]: r for r in records if r["event"] == event}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("minillm")
    recipe = write_recipe(root / "smoke.yaml", **SETTINGS)
    for role in ("teacher", "student"):
        result = run_cli("sft", str(recipe), "--model", role, cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def copy_of(prepared, tmp_path) -> str:
    shutil.copytree(prepared / "runs", tmp_path / "runs")
    shutil.copy(prepared / "smoke.yaml", tmp_path / "smoke.yaml")
    return str(tmp_path / "smoke.yaml")


@pytest.fixture(scope="module")
def one_rank(prepared, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    recipe = copy_of(prepared, cwd)
    result = run_cli("distill", recipe, "--method", "minillm", cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return cwd, result, records_of(cwd)


def test_minillm_to_completion(one_rank):
    cwd, result, records = one_rank
    assert "minillm: reverse KL by policy gradient" in result.stderr and "teacher mixed in at a = 0.2" in result.stderr
    assert "(1 - 0.5) CE + 0.5 KD with the live teacher" in result.stderr
    start = records[0]
    assert start["method"] == "minillm" and start["total_steps"] == STEPS and start["per_collection"] == 2
    # no D* in this run directory: the diagnostics of bdctl.diagnostics are off, and the run says so
    assert any("diagnostics on A_t: off (D* has not been generated" in note for note in start["notes"])
    trains = by_step(records, "train")
    assert sorted(trains) == list(range(1, STEPS + 1))
    for record in trains.values():
        assert all(math.isfinite(record[k]) for k in KEYS), record
        assert record["loss"] == pytest.approx(record["method_loss"] + record["pt_loss"])  # lm_coef = 1
        assert record["single_kl"] >= 0 and 0 <= record["clip_fraction"] <= 1
    # the first minibatch trains at the sampling weights: rho_t = w_t, the importance weight
    rollouts = by_step(records, "rollout")
    assert sorted(rollouts) == [1, 3]  # collections before steps 1 and 3 (two PPO passes each)
    assert trains[1]["mean_ratio"] == pytest.approx(rollouts[1]["mean_weight"], rel=1e-4)
    for rollout in rollouts.values():
        assert rollout["rollouts"] == 16 and 1 <= rollout["mean_length"] <= 16 and 0.8 <= rollout["mean_weight"] <= 1.25
    evals = by_step(records, "eval")
    assert sorted(evals) == [0, 2, 4]
    assert not any(key.startswith("diag_") for record in evals.values() for key in record)
    done = json.loads((cwd / "runs/smoke/distill/minillm/MANIFEST.json").read_text())
    best = max(evals.values(), key=lambda e: (e["rouge_l"], -e["step"]))
    assert done["select"] == "rouge_l" and done["best_step"] == best["step"] and done["steps"] == STEPS

    from transformers import AutoModelForCausalLM

    export = cwd / "runs/smoke/distill/minillm/export"
    assert AutoModelForCausalLM.from_pretrained(export) is not None
    assert json.loads((export / "MANIFEST.json").read_text())["step"] == best["step"]


def test_minillm_with_a_lora_student(prepared, tmp_path):
    from tests.integration.test_distill import assert_low_rank_update

    recipe = copy_of(prepared, tmp_path)
    lora = "models.student.lora={r: 2, alpha: 4, target_modules: [c_fc]}"
    result = run_cli("distill", recipe, "--method", "minillm", "--set", lora, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    trains = by_step(records_of(tmp_path), "train")
    assert sorted(trains) == list(range(1, STEPS + 1))
    assert all(math.isfinite(record["loss"]) for record in trains.values())
    export = tmp_path / "runs/smoke/distill/minillm/export"
    assert_low_rank_update(export, tmp_path / "runs/smoke/student_sft/export", 2, ("c_fc",))


def test_sigkill_in_a_collection_then_rerun_resumes_exactly(one_rank, prepared, tmp_path):
    """Killed after the checkpoint of step 1, in the middle of the first collection: the rerun resumes
    on the checkpointed rollouts, collects the second collection again, and repeats every later step."""
    recipe = copy_of(prepared, tmp_path)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bdctl", "distill", recipe, "--method", "minillm"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    checkpoint = tmp_path / "runs/smoke/distill/minillm/checkpoints/step1/MANIFEST.json"
    deadline = time.time() + 600
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "runs/smoke/distill/minillm/MANIFEST.json").exists()

    result = run_cli("distill", recipe, "--method", "minillm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming" in result.stderr
    resumed, reference = records_of(tmp_path), one_rank[2]
    assert sorted(by_step(resumed, "train")) == list(range(1, STEPS + 1))
    first = min(s for s in by_step(resumed, "train") if s > 1)
    for step in range(first, STEPS + 1):
        for key in KEYS:
            assert by_step(resumed, "train")[step][key] == pytest.approx(
                by_step(reference, "train")[step][key], rel=1e-6, abs=1e-8
            ), (step, key)
    assert by_step(resumed, "rollout")[3]["digest"] == by_step(reference, "rollout")[3]["digest"]
    evals, reference_evals = by_step(resumed, "eval"), by_step(reference, "eval")
    assert sorted(evals) == [0, 2, 4] and all(
        evals[s]["rouge_l"] == pytest.approx(reference_evals[s]["rouge_l"], abs=1e-6) for s in (2, 4)
    )
    assert (
        json.loads((tmp_path / "runs/smoke/distill/minillm/MANIFEST.json").read_text())["best_step"]
        == json.loads((one_rank[0] / "runs/smoke/distill/minillm/MANIFEST.json").read_text())["best_step"]
    )


@pytest.mark.parametrize("zero_inference", [False, True], ids=["whole_teacher", "partitioned_teacher"])
def test_two_ranks_collect_the_same_rollouts_and_losses(one_rank, prepared, tmp_path, zero_inference):
    """2 ranks, the teacher a whole copy per rank or a ZeRO-3 inference engine partitioned over both
    (ranks in lockstep through both models): the rollouts and losses of one rank with a whole teacher."""
    recipe = copy_of(prepared, tmp_path)
    teacher = ("--set", f"stages.distill.minillm.zero_inference={str(zero_inference).lower()}")
    result = run_cli("distill", recipe, "--method", "minillm", "--nproc", "2", *teacher, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    two, one = records_of(tmp_path), one_rank[2]
    assert two[0]["world_size"] == 2
    # the same prompts, seeds and sampling batches: the same responses on 1 and 2 ranks
    assert {s: r["digest"] for s, r in by_step(two, "rollout").items()} == {
        s: r["digest"] for s, r in by_step(one, "rollout").items()
    }
    for step, record in by_step(two, "train").items():
        for key in KEYS:
            assert record[key] == pytest.approx(by_step(one, "train")[step][key], rel=1e-4, abs=1e-6), (step, key)


# --------------------------------------------------------------------------- bad settings: one line, exit 2


def submit_error(recipe, *overrides) -> str:
    from bdctl.errors import UserError
    from bdctl.launch import LaunchOptions
    from bdctl.submit import submit

    with pytest.raises(UserError) as caught:
        submit(
            "minillm",
            recipe,
            ["stages.distill.method=minillm", *overrides],
            {"method": "minillm"},
            LaunchOptions(),
            log=lambda m: None,
        )
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.slow  # runs `bdctl distill` in a subprocess
def test_bad_settings_are_one_line(tmp_path, monkeypatch):
    result = run_cli(
        "distill", "smoke", "--method", "minillm", "--set", "stages.distill.minillm.num_rollouts=20", cwd=tmp_path
    )
    assert_user_error(result, "minillm.num_rollouts (20) must be a multiple of batch_size (16)")
    monkeypatch.chdir(tmp_path)
    assert "stages.distill.minillm.ppo_epochs: input should be greater than or equal to 1, got 0" in submit_error(
        "smoke", "stages.distill.minillm.ppo_epochs=0"
    )
    assert "stages.distill.minillm.teacher_mix: input should be less than 1, got 1" in submit_error(
        "smoke", "stages.distill.minillm.teacher_mix=1"
    )
    assert "teacher_mix: input should be greater than or equal to 0" in submit_error(
        "smoke", "stages.distill.minillm.teacher_mix=-0.1"
    )
    recipe = str(write_recipe(tmp_path / "smoke.yaml"))
    assert f"run it first: bdctl sft {recipe} --model student" in submit_error(recipe)
    assert not (tmp_path / "runs/smoke/distill").exists()


def test_a_teacher_that_does_not_fit_names_both_sizes_and_zero_inference():
    from bdctl.stages.minillm import teacher_fit_error

    # gpt2-xl (1.56 B) beside gpt2-medium (355 M) on 4 x 16 GiB in bf16, ZeRO-3: 16 x 355 M / 4 = 1.3 GiB of
    # student states; the whole teacher is 2.9 GiB: fits. On 4 GiB GPUs it does not, and partitioned it does.
    assert teacher_fit_error(355_000_000, 1_560_000_000, 4, 3, "bf16", False, 16.0) is None
    error = teacher_fit_error(355_000_000, 1_560_000_000, 4, 3, "bf16", False, 4.0)
    assert "1,560 M parameters, a whole copy per GPU (2.9 GiB)" in error and "355 M parameters, 1.3 GiB" in error
    assert "set stages.distill.minillm.zero_inference: true" in error and "\n" not in error
    assert teacher_fit_error(355_000_000, 1_560_000_000, 4, 3, "bf16", True, 4.0) is None
    assert "use more GPUs" in teacher_fit_error(355_000_000, 1_560_000_000, 4, 3, "bf16", True, 1.5)
