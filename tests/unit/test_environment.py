"""The environment is input too (bdctl.environment): odd values are one line naming the variable,
and a RANK / WORLD_SIZE left in the shell does not make a one-rank command wait for other ranks."""

from __future__ import annotations

import pytest

from bdctl.environment import job_wait_seconds, launcher_rank, slurm_layout, stray_rank_variables
from bdctl.errors import UserError

STEP = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "1242"}  # fmt: skip


def message(call, env) -> str:
    with pytest.raises(UserError) as raised:
        call(env)
    text = str(raised.value)
    assert "\n" not in text and raised.value.exit_code == 2
    return text


def test_job_wait() -> None:
    assert job_wait_seconds({}) == 1800 and job_wait_seconds({"BDCTL_JOB_WAIT": "2.5"}) == 2.5
    assert job_wait_seconds({"BDCTL_JOB_WAIT": " "}) == 1800
    for odd in ("soon", "0", "-3", "inf", "nan"):
        assert message(job_wait_seconds, {"BDCTL_JOB_WAIT": odd}) == (
            f"environment variable BDCTL_JOB_WAIT={odd!r}: expected a number of seconds > 0 "
            "(how long a secondary node waits for node 0)"
        )


def test_a_complete_slurm_step_is_a_rank_layout() -> None:
    assert slurm_layout(STEP) == {"RANK": 2, "WORLD_SIZE": 4, "LOCAL_RANK": 0, "MASTER_ADDR": "gpu03",
                                  "MASTER_PORT": 29742}  # fmt: skip
    assert slurm_layout({k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}) is None  # not in a step
    assert slurm_layout({**STEP, "SLURM_NTASKS": "1"}) is None  # a batch script's own single task


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"SLURM_NTASKS": "four"}, "SLURM_NTASKS='four': expected a number of tasks >= 1 (SLURM_STEP_ID is set"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x': expected a task rank from 0 to 3"),
        ({"SLURM_PROCID": "4"}, "SLURM_PROCID='4': expected a task rank from 0 to 3"),
        ({"SLURM_PROCID": None}, "SLURM_PROCID is not set but SLURM_NTASKS=4"),
        ({"SLURM_LOCALID": "-1"}, "SLURM_LOCALID='-1': expected a local task rank >= 0"),
        ({"SLURM_JOB_NODELIST": None}, "SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are both unset"),
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc': expected a job id (a number)"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999': expected a port number from 1 to 65535"),
    ],
)
def test_partial_or_non_numeric_slurm_variables_are_one_line(change, expected) -> None:
    env = {**STEP, **{k: v for k, v in change.items() if v is not None}}
    for name in [k for k, v in change.items() if v is None]:
        del env[name]
    assert expected in message(slurm_layout, env)


def test_launcher_rank_variables_are_checked() -> None:
    assert launcher_rank({}) is None
    assert launcher_rank({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}) == (1, 2)
    assert "RANK='2': expected a rank from 0 to 1 (WORLD_SIZE=2)" in message(
        launcher_rank, {"RANK": "2", "WORLD_SIZE": "2"}
    )
    assert "RANK='1' is set but WORLD_SIZE is not" in message(launcher_rank, {"RANK": "1"})
    assert "WORLD_SIZE='many'" in message(launcher_rank, {"RANK": "0", "WORLD_SIZE": "many"})
    assert "MASTER_PORT='http'" in message(launcher_rank, {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "http"})


def test_stray_rank_variables() -> None:
    assert stray_rank_variables({}) == {} and stray_rank_variables({"RANK": "0", "WORLD_SIZE": "1"}) == {}
    assert stray_rank_variables({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == {"RANK": "1", "WORLD_SIZE": "2"}


def test_a_stray_rank_in_the_shell_is_ignored_with_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """Through `launch` in-process: RANK=1 WORLD_SIZE=2 from the shell used to make the one rank
    wait for a second that never comes; now the rank runs as rank 0 of 1, and a note says why."""
    import bdctl.worker
    from bdctl.launch import LaunchOptions, launch

    seen = {}

    def run_job(job_file) -> None:
        import os

        seen.update({name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})

    monkeypatch.setattr(bdctl.worker, "run_job", run_job)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "logs").mkdir()
    launch(tmp_path / "job.json", LaunchOptions())
    assert seen == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    note = capsys.readouterr().err.strip()
    assert note.startswith(
        "note: ignoring RANK=1 WORLD_SIZE=2 from the environment (set in the shell, not by a launcher)"
    )
    assert "\n" not in note


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        (
            {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "x"},
            [],
            "error: environment variable SLURM_NTASKS='x': expected a number of tasks >= 1 (SLURM_STEP_ID is set",
        ),
        (
            {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"},
            [],
            "error: environment variable SLURM_PROCID is not set but SLURM_NTASKS=2",
        ),
        ({}, ["--set", "stages.teacher_sft.epochs=true"], "stages.teacher_sft.epochs: expected a number, got true"),
        ({}, ["--set", "seed=99999999999999999999"], "seed: input should be less than 18446744073709551616"),
    ],
    ids=["slurm-not-a-number", "slurm-partial", "boolean-epochs", "seed-over-64-bits"],
)
def test_through_the_cli_odd_environment_and_values_are_one_line(env, args, expected) -> None:
    """The real CLI, in-process (--dry-run: nothing starts): exit 2 and one `error:` line."""
    from typer.testing import CliRunner

    from bdctl.cli import app
    from tests.conftest import RECIPES

    result = CliRunner().invoke(
        app, ["sft", str(RECIPES / "smoke.yaml"), "--model", "teacher", "--dry-run", *args],
        env={"COLUMNS": "400", "NO_COLOR": "1", **env}, prog_name="bdctl",
    )  # fmt: skip
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
