"""Launcher command lines (--dry-run) for local ranks, a hostfile, hand-started nodes and SLURM."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdctl.errors import UserError
from bdctl.launch import LaunchOptions, dry_run_text, first_host, launcher_command, read_hostfile, slurm_environment
from tests.conftest import RECIPES, assert_user_error, run_cli

JOB = Path("runs/x/teacher_sft/job.json")
SLURM = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[03-06,09]", "SLURM_JOB_ID": "4242"}  # fmt: skip


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for name in [*SLURM, "SLURM_STEP_NODELIST", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(name, raising=False)


def test_one_rank_runs_in_process():
    options = LaunchOptions()
    assert options.mode == "in-process" and options.world_size == 1 and options.is_primary
    assert dry_run_text(JOB, options).startswith("in-process (1 rank): ")


def test_local_ranks_go_through_torchrun():
    command = launcher_command(JOB, LaunchOptions(nproc=4, master_port=1234))
    assert command[1:] == ["-m", "bdctl.launch", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "4",
                           "--master_addr", "127.0.0.1", "--master_port", "1234",
                           "-m", "bdctl.worker", str(JOB)]  # fmt: skip


def test_hand_started_nodes():
    options = LaunchOptions(nproc=2, nnodes=3, node_rank=2, master_addr="10.0.0.1")
    assert options.world_size == 6 and not options.is_primary
    command = launcher_command(JOB, options)
    assert "--nnodes 3 --node_rank 2 --nproc_per_node 2 --master_addr 10.0.0.1 --master_port 29500" in " ".join(command)


def test_hostfile_goes_through_deepspeeds_launcher(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nworker-0 slots=4\nworker-1 slots=4  # spare\n\n")
    options = LaunchOptions(hostfile=str(hostfile), exclude="worker-1:2,3", master_port=6000)
    assert options.mode == "hostfile" and options.world_size == 6
    command = launcher_command(JOB, options)
    assert command[1:] == ["-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--exclude", "worker-1:2,3",
                           "--master_port", "6000", "--module", "bdctl.worker", str(JOB)]  # fmt: skip
    assert LaunchOptions(hostfile=str(hostfile), include="worker-1").world_size == 4


@pytest.mark.parametrize(
    "text,message",
    [
        ("a slots=2\na slots=2\n", ":2: host 'a' is listed twice"),
        ("a slots=2\nb slots\n", ":2: expected 'hostname slots=N' with N >= 1, got 'b slots'"),
        ("a slots=0\n", ":1: expected 'hostname slots=N' with N >= 1"),
        ("# nothing\n", ": the hostfile lists no hosts"),
    ],
)
def test_bad_hostfiles_name_the_line(tmp_path, text, message):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        read_hostfile(str(path))
    assert str(info.value) == f"{path}{message}" or str(info.value).startswith(f"{path}{message}")


def test_a_hostfile_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "hosts"
    path.write_bytes(b"a slots=2\nn\xe9ud slots=2\n")
    with pytest.raises(UserError) as info:
        read_hostfile(str(path))
    assert str(info.value) == f"{path}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"nnodes": 2, "node_rank": 5}, "--node-rank 5: expected a node rank from 0 to 1 (--nnodes 2)"),
        ({"node_rank": 1}, "--node-rank 1: expected a node rank from 0 to 0 (--nnodes 1)"),
        ({"master_port": 99999}, "--master-port 99999: expected a port number from 1 to 65535"),
        ({"master_port": 0}, "--master-port 0: expected a port number from 1 to 65535"),
    ],
)
def test_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(UserError) as info:
        LaunchOptions(**options)
    assert str(info.value) == message
    LaunchOptions(nnodes=2, node_rank=1, master_port=65535)  # the edges themselves are fine


def test_slurm_tasks_are_ranks(monkeypatch):
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    env = slurm_environment()
    assert env == {"RANK": 5, "WORLD_SIZE": 8, "LOCAL_RANK": 1, "MASTER_ADDR": "gpu03", "MASTER_PORT": 29500 + 242}
    options = LaunchOptions(nproc=2)  # SLURM's layout wins over --nproc
    assert options.mode == "slurm" and options.world_size == 8 and not options.is_primary
    assert dry_run_text(JOB, options).startswith("slurm: this task is rank 5 of 8 (local rank 1), master gpu03:29742: ")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a batch script's own single task is not an srun step of ranks
    assert slurm_environment() is None


@pytest.mark.parametrize(
    "nodelist,host",
    [("node1", "node1"), ("gpu[03-06,09]", "gpu03"), ("a[7],b[1-2]", "a7"), ("c1,c2", "c1"), ("x[010-012]", "x010")],
)
def test_first_host_of_a_nodelist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.slow  # runs `bdctl sft --dry-run` in a subprocess
def test_dry_run_through_the_cli(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    result = run_cli(
        "sft",
        str(RECIPES / "smoke.yaml"),
        "--hostfile",
        str(hostfile),
        "--set",
        "stages.teacher_sft.batch_size=32",
        "--dry-run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "-m deepspeed.launcher.runner --hostfile" in lines[0]
    config = __import__("json").loads("\n".join(lines[1:]))
    assert config["train_batch_size"] == 32 and config["gradient_accumulation_steps"] == 1  # 32 = 8 x 1 x 4 ranks
    assert config["zero_optimization"]["stage"] == 3
    assert not (tmp_path / "runs").exists()
    hostfile.write_text("worker-0 slots=2\nworker-0 slots=1\n")
    assert_user_error(
        run_cli("sft", "smoke", "--hostfile", str(hostfile), "--dry-run", cwd=tmp_path),
        f"{hostfile}:2: host 'worker-0' is listed twice",
    )
