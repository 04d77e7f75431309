"""Shared test helpers: the project's recipes, a CLI runner in a subprocess, tiny tokenizers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Tests never download (nothing can be, here or in CI): offline mode makes a hub lookup that is
# meant to fail (an unknown model or data set id) fail at once instead of after DNS timeouts.
# Subprocesses (the CLI under test) inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


_IN_SLOW_TEST = [False]


def pytest_runtest_setup(item):
    """Whether the test about to run (fixtures included, even module-scoped ones) is marked slow."""
    _IN_SLOW_TEST[0] = item.get_closest_marker("slow") is not None


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`bdctl ARGS` in a fresh interpreter, as a user would run it.

    Only in tests marked `slow`: the fast subset (`pytest -m "not slow"`) starts no CLI process.
    """
    assert _IN_SLOW_TEST[0], "a test that runs the CLI in a subprocess must be marked @pytest.mark.slow"
    # Drop a process group's variables that an in-process DeepSpeed test may have set.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONWARNINGS="ignore", NO_COLOR="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "bdctl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, and one error line (the last) containing every fragment.

    Progress lines printed before the problem was found (e.g. the data split) may precede it.
    """
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def write_recipe(path: Path, base: str = "smoke", **changes) -> Path:
    """A copy of a project recipe with dotted-key changes (`data__source={...}` uses __ for dots)."""
    raw = yaml.safe_load((RECIPES / f"{base}.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty directory, so runs/ lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the synthetic tasks, as tiny recipes make it."""
    from bdctl.data.synthetic import synthetic_corpus, synthetic_instructions
    from bdctl.models import train_tokenizer
    from bdctl.recipe.schema import TokenizerTraining

    rows = synthetic_instructions(300, seed=1)
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows] + synthetic_corpus(50, seed=1)
    return train_tokenizer(texts, TokenizerTraining(vocab_size=400), tmp_path_factory.mktemp("tok"))


# The longest modules first (measured wall times of the full suite, 2026-11-30): `make test` hands
# whole modules to two workers in collection order, so a long module collected last would run
# alone at the end while the other worker idles.
LONGEST_FIRST = (
    "integration/test_reproduce.py",
    "integration/test_distill.py",
    "integration/test_resume.py",
    "integration/test_eval_judge.py",
    "integration/test_minillm.py",
    "integration/test_generate.py",
    "integration/test_messages_reproduce.py",
    "integration/test_harness.py",
    "integration/test_lora.py",
    "integration/test_sft_cli.py",
    "integration/test_multinode.py",
    "integration/test_fingerprints.py",
    "integration/test_real_models.py",
    "integration/test_memory_switches_zero3.py",
    "integration/test_failure_modes.py",
    "unit/test_trackers.py",
    "integration/test_bad_inputs.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the order within a module and among the rest is kept
