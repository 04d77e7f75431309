"""The benchmarks that CI can afford, at smoke size: they run end to end and write every section.

No timing is asserted (CI machines are shared); only that each comparison ran and reported its ratios.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_bench_peers_smoke_writes_every_comparison(tmp_path):
    out = tmp_path / "peers.json"
    done = _run([sys.executable, "benchmarks/bench_peers.py", "--smoke", "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    assert out.with_suffix(".png").stat().st_size > 0
    comparisons = report["comparisons"]
    assert set(comparisons) == {"distill_vs_trl", "sampling_vs_generate", "loss_memory_vs_vocab"}

    distill = comparisons["distill_vs_trl"]
    if importlib.util.find_spec("trl") is None:  # the `bench` extra is not installed: the skip says so
        assert "pip install" in distill["skipped"]
    else:
        for side in ("kd_live", "kd_cache", "bd_cache"):
            ratio = distill["ratios"][f"{side} / trl"]
            for key in ("time_wall", "time_cpu", "peak_memory"):
                assert ratio[key]["n"] == distill["shape"]["rounds"]
                assert ratio[key]["min"] <= ratio[key]["median"] <= ratio[key]["max"]

    sampling = comparisons["sampling_vs_generate"]["ratios"]
    assert "sampler / generate (batched): tokens/s, cpu" in sampling
    assert "sampler / generate (per prompt): tokens/s, cpu" in sampling
    assert "capture overhead: time, cpu" in sampling

    memory = comparisons["loss_memory_vs_vocab"]
    vocabs = [str(v) for v in memory["shape"]["vocabs"]]
    for variant in ("bd_lean", "bd_dense", "kd_cache", "kd_dense"):
        assert sorted(memory["peak_mib"][variant]) == sorted(vocabs)
    assert f"bd lean / dense at {vocabs[-1]}: peak memory" in memory["ratios"]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_the_real_engine(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = _run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-small" and "SMALL" in report["label"]
    train = report["train"]
    assert train["zero_stage"] == 3
    for name in ("bd_step", "sft_step"):
        assert train[name]["tokens_per_s"] > 0
        assert train[name]["mfu"] is None  # no MFU without a GPU peak
    assert set(report["sampling"]["tokens_per_s"]) == {"sampler", "sampler_with_capture"}


@pytest.mark.slow
def test_bench_lora_on_the_tiny_student_counts_the_optimizer_state(tmp_path):
    out = tmp_path / "lora.json"
    command = [sys.executable, "benchmarks/bench_lora.py", "--models", "tiny", "--rounds", "1", "--steps", "1"]
    done = _run([*command, "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tiny = json.loads(out.read_text())["models"]["tiny"]
    for side in ("full", "lora"):
        (run,) = tiny["runs"][side]
        # fp32 partitions + Adam's two moments: 12 bytes per trained parameter, nothing else
        assert run["state_mib"] * 2**20 == 12 * run["trainable"]
    full, lora = tiny["runs"]["full"][0], tiny["runs"]["lora"][0]
    assert lora["trainable"] < full["trainable"] and lora["parameters"] > full["parameters"]  # + the adapters
    assert tiny["lora_over_full"]["state_mib"] == pytest.approx(lora["trainable"] / full["trainable"])
