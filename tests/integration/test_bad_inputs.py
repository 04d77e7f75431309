"""Bad input through the real CLI, table-driven: recipes, data, model directories, run directories,
launcher options and judge settings. For every input: a non-zero exit (2), exactly one `error:`
line that names the culprit, no traceback, and nothing that looks complete (no stage
MANIFEST.json, no run recipe.yaml, no export).

Everything that fails before any rank starts runs in this process through typer's CliRunner (the
same `bdctl.cli.app`, the same error path as the installed command, without an interpreter start
per case). Inputs that need a launcher run (a rendezvous that never completes) start the CLI as a
subprocess and are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import RECIPES, assert_user_error, run_cli

SMOKE = str(RECIPES / "smoke.yaml")
GOOD_ROW = {"instruction": "Say hi.", "input": "", "output": "hi"}


def rows_file(path: Path, rows: list, suffix_text: str | None = None) -> Path:
    path.write_text(suffix_text if suffix_text is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_file(path: Path, **changes) -> Path:
    """smoke.yaml with dotted-key changes (`data__source=...`); `models__tokenizer={}` clears a key."""
    raw = yaml.safe_load(Path(SMOKE).read_text())
    for dotted, value in changes.items():
        node = raw
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Every bad input's files, made once: data files, model directories, hostfiles, recipes; and
    `prepared/runs/smoke` with the smoke recipe's data stage done (cases that fail after it copy it)."""
    from bdctl.data.prepare import prepare_data
    from bdctl.models import build_tiny_model, train_tokenizer
    from bdctl.recipe import load_recipe
    from bdctl.recipe.schema import TinyModel, TokenizerTraining
    from bdctl.rundir import RunDir

    root = tmp_path_factory.mktemp("bad")
    recipe, _ = load_recipe(SMOKE)
    prepare_data(recipe, RunDir(root / "prepared/runs/smoke"), log=lambda *_: None)

    # A tiny Hugging Face model directory, and damaged copies of it.
    good = root / "models/good"
    tokenizer = train_tokenizer(
        [f"say {w} please" for w in ("hi", "yes", "no")] * 20, TokenizerTraining(vocab_size=300), good
    )
    build_tiny_model(
        TinyModel(arch="gpt2", layers=1, hidden=32, heads=2, max_positions=128), tokenizer, 1
    ).save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    for name, damage in {
        "truncated": lambda d: (d / "model.safetensors").write_bytes(weights[: len(weights) // 2]),
        "garbage": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
        "tiny_file": lambda d: (d / "model.safetensors").write_bytes(b"\x01\x02"),
        "no_config": lambda d: (d / "config.json").unlink(),
        "no_weights": lambda d: (d / "model.safetensors").unlink(),
    }.items():
        shutil.copytree(good, root / f"models/{name}")
        damage(root / f"models/{name}")
    (root / "models/empty").mkdir()
    (root / "models/a_file").write_text("not a model\n")

    data = root / "data"
    data.mkdir()
    rows_file(data / "empty_responses.jsonl", [{**GOOD_ROW, "output": ""}] * 80)
    rows_file(data / "malformed.jsonl", [], '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n')
    rows_file(data / "missing_field.jsonl", [{"instruction": "a", "input": ""}])
    rows_file(data / "not_string.jsonl", [{**GOOD_ROW, "output": 3}])
    rows_file(data / "empty.jsonl", [], "")
    # ten distinct examples: repeats of one would be dropped as duplicates before the count
    rows_file(data / "few.jsonl", [{**GOOD_ROW, "instruction": f"Say hi {i} times."} for i in range(10)])
    rows_file(data / "object.json", [], '{"instruction": "a"}')
    rows_file(data / "table.csv", [], "instruction,output\na,b\n")
    (data / "latin.jsonl").write_bytes(b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n')
    (data / "a_dir.jsonl").mkdir()

    hosts = root / "hosts"
    hosts.mkdir()
    (hosts / "bad_line").write_text("localhost slots=two\n")
    (hosts / "empty").write_text("# nobody\n")
    (hosts / "unresolvable").write_text("localhost slots=1\nbdctl-no-such-host.invalid slots=1\n")
    (hosts / "ok").write_text("localhost slots=1\n")

    r = root / "recipes"
    r.mkdir()
    (r / "broken.yaml").write_text("name: [\n")
    (r / "a_list.yaml").write_text("- name\n- seed\n")
    (r / "latin.yaml").write_bytes(b"name: latin\ndescription: caf\xe9\n")
    for name in ("truncated", "garbage", "tiny_file", "no_config", "no_weights", "empty", "a_file", "good"):
        recipe_file(
            r / f"teacher_{name}.yaml", models__teacher={"path": str(root / "models" / name)}, models__tokenizer={}
        )
    recipe_file(
        r / "teacher_missing.yaml", models__teacher={"path": str(root / "models/missing")}, models__tokenizer={}
    )
    for name in (
        "empty_responses",
        "malformed",
        "missing_field",
        "not_string",
        "empty",
        "few",
        "latin",
        "a_dir",
        "missing",
    ):
        recipe_file(r / f"data_{name}.yaml", data__source={"path": str(data / f"{name}.jsonl")})
    recipe_file(r / "data_object.yaml", data__source={"path": str(data / "object.json")})
    recipe_file(r / "data_table.yaml", data__source={"path": str(data / "table.csv")})
    recipe_file(r / "corpus_missing.yaml", data__pretrain={"path": str(data / "corpus.txt"), "block_size": 64})
    recipe_file(
        r / "eval_set_missing.yaml", stages__eval={"sets": [{"name": "mine", "path": str(data / "nope.jsonl")}]}
    )
    (root / "a_file").write_text("a file where a directory should be\n")
    recipe_file(r / "run_dir_under_file.yaml", run_dir=str(root / "a_file/run"))
    recipe_file(r / "run_dir_is_file.yaml", run_dir=str(root / "a_file"))
    return root


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # the CLI arguments, given the `world` directory
    culprit: Callable[[Path], str]  # a fragment the one error line must contain
    prepared: bool = False  # run where the smoke data stage is already done (it fails after)


def _c(name, args, culprit, prepared=False) -> Case:
    as_fn = lambda v: v if callable(v) else (lambda w: v)  # noqa: E731
    return Case(name, as_fn(args), as_fn(culprit), prepared)


W = Path  # for readability in the table: `w` is the world directory
CASES = [
    # ---- recipes and --set
    _c("recipe file missing", ["sft", "nope.yaml"], "nope.yaml: recipe file not found"),
    _c("recipe name unknown", ["sft", "nosuchrecipe"], "nosuchrecipe: no such recipe file or name"),
    _c(
        "recipe is a directory",
        lambda w: ["sft", str(w / "data")],
        lambda w: f"{w / 'data'}: a directory, not a recipe file",
    ),
    _c("recipe not YAML", lambda w: ["sft", str(w / "recipes/broken.yaml")], "broken.yaml: line 2: not valid YAML"),
    _c(
        "recipe a YAML list",
        lambda w: ["sft", str(w / "recipes/a_list.yaml")],
        "a recipe is a YAML mapping of keys, got list",
    ),
    _c(
        "recipe not UTF-8", lambda w: ["sft", str(w / "recipes/latin.yaml")], "latin.yaml:2: not UTF-8 text (byte 0xe9)"
    ),
    _c(
        "--set unknown key",
        ["sft", SMOKE, "--set", "stages.teacher_sft.lrr=1"],
        "stages.teacher_sft.lrr: unknown key (did you mean 'lr'?",
    ),
    _c(
        "--set not a number",
        ["sft", SMOKE, "--set", "stages.teacher_sft.lr=fast"],
        "stages.teacher_sft.lr: expected a number, got 'fast'",
    ),
    _c(
        "--set lr=.inf",
        ["sft", SMOKE, "--set", "stages.teacher_sft.lr=.inf"],
        "stages.teacher_sft.lr: input should be a finite number, got inf",
    ),
    _c(
        "--set lr=.nan",
        ["sft", SMOKE, "--set", "stages.teacher_sft.lr=.nan"],
        "stages.teacher_sft.lr: input should be a finite number, got nan",
    ),
    _c(
        "--set negative lr",
        ["sft", SMOKE, "--set", "stages.teacher_sft.lr=-1"],
        "stages.teacher_sft.lr: input should be greater than 0",
    ),
    _c("--set name empty", ["sft", SMOKE, "--set", 'name=""'], '(--set name=""): name: expected a non-empty string'),
    _c("--set name a path", ["sft", SMOKE, "--set", "name=a/b"], "name: expected a directory name"),
    _c("--set name ..", ["sft", SMOKE, "--set", "name=.."], "name: expected a directory name"),
    _c(
        "--set without =",
        ["sft", SMOKE, "--set", "stages.teacher_sft.lr"],
        "--set stages.teacher_sft.lr: expected key.path=value",
    ),
    _c("--set seed not an integer", ["sft", SMOKE, "--set", "seed=1.5"], "seed: expected an integer, got 1.5"),
    _c(
        "--set prompt longer than max",
        ["sft", SMOKE, "--set", "data.max_prompt_length=600"],
        "max_prompt_length must be smaller than max_length",
    ),
    _c(
        "--set heads do not divide",
        ["sft", SMOKE, "--set", "models.teacher.tiny.heads=3"],
        "heads (3) must divide hidden (64)",
    ),
    # ---- run directories
    _c(
        "run_dir under a file",
        lambda w: ["sft", str(w / "recipes/run_dir_under_file.yaml")],
        lambda w: f"{w / 'a_file'} is a file, not a directory",
    ),
    _c(
        "run_dir is a file",
        lambda w: ["sft", str(w / "recipes/run_dir_is_file.yaml")],
        lambda w: f"{w / 'a_file'} is a file, not a directory",
    ),
    # ---- data
    _c(
        "data file missing",
        lambda w: ["sft", str(w / "recipes/data_missing.yaml")],
        lambda w: f"{w / 'data/missing.jsonl'}: file not found",
    ),
    _c(
        "data file a directory",
        lambda w: ["sft", str(w / "recipes/data_a_dir.yaml")],
        lambda w: f"{w / 'data/a_dir.jsonl'}: is a directory, not a data file",
    ),
    _c(
        "data malformed JSON",
        lambda w: ["sft", str(w / "recipes/data_malformed.yaml")],
        "malformed.jsonl:2: malformed JSON line",
    ),
    _c(
        "data missing field",
        lambda w: ["sft", str(w / "recipes/data_missing_field.yaml")],
        "missing_field.jsonl:1: missing field 'output'",
    ),
    _c(
        "data field not a string",
        lambda w: ["sft", str(w / "recipes/data_not_string.yaml")],
        "not_string.jsonl:1: field 'output' should be a string, got int",
    ),
    _c(
        "data not UTF-8",
        lambda w: ["sft", str(w / "recipes/data_latin.yaml")],
        "latin.jsonl:1: not UTF-8 text (byte 0xe9)",
    ),
    _c("data empty file", lambda w: ["sft", str(w / "recipes/data_empty.yaml")], "empty.jsonl has no examples"),
    _c(
        "data too few examples",
        lambda w: ["sft", str(w / "recipes/data_few.yaml")],
        "data: 10 usable examples (of 10; dropped none) leave nothing to train on after 32 validation",
    ),
    _c(
        "data all responses empty",
        lambda w: ["sft", str(w / "recipes/data_empty_responses.yaml")],
        "every one of the 80 examples of",
    ),
    _c(
        "data .json not a list",
        lambda w: ["sft", str(w / "recipes/data_object.yaml")],
        "object.json: expected a JSON list of records, got dict",
    ),
    _c(
        "data unsupported type",
        lambda w: ["sft", str(w / "recipes/data_table.yaml")],
        "table.csv: unsupported file type '.csv'",
    ),
    _c(
        "pretrain corpus missing",
        lambda w: ["sft", str(w / "recipes/corpus_missing.yaml")],
        lambda w: f"{w / 'data/corpus.txt'}: file not found",
    ),
    _c(
        "eval set file missing",
        lambda w: ["eval", str(w / "recipes/eval_set_missing.yaml"), "--model", str(w / "models/good")],
        "nope.jsonl: file not found",
    ),
    # ---- model directories
    _c(
        "teacher dir missing",
        lambda w: ["sft", str(w / "recipes/teacher_missing.yaml")],
        lambda w: f"teacher model {w / 'models/missing'}: no such model directory",
    ),
    _c(
        "teacher dir empty",
        lambda w: ["sft", str(w / "recipes/teacher_empty.yaml")],
        lambda w: f"teacher model {w / 'models/empty'}: empty directory",
    ),
    _c(
        "teacher dir a file",
        lambda w: ["sft", str(w / "recipes/teacher_a_file.yaml")],
        lambda w: f"teacher model {w / 'models/a_file'}: a file, not a model directory",
    ),
    _c(
        "teacher dir no config",
        lambda w: ["sft", str(w / "recipes/teacher_no_config.yaml")],
        "no_config: not a Hugging Face model directory (no config.json)",
    ),
    _c(
        "teacher dir no weights",
        lambda w: ["sft", str(w / "recipes/teacher_no_weights.yaml")],
        "no_weights: no weights (expected model.safetensors",
    ),
    _c(
        "teacher weights truncated",
        lambda w: ["sft", str(w / "recipes/teacher_truncated.yaml")],
        lambda w: f"{w / 'models/truncated/model.safetensors'}: damaged or truncated safetensors file",
    ),
    _c(
        "teacher weights garbage",
        lambda w: ["sft", str(w / "recipes/teacher_garbage.yaml")],
        lambda w: f"{w / 'models/garbage/model.safetensors'}: damaged or truncated safetensors file",
    ),
    _c(
        "teacher weights 2 bytes",
        lambda w: ["sft", str(w / "recipes/teacher_tiny_file.yaml")],
        "tiny_file/model.safetensors: damaged or truncated safetensors file (2 bytes",
    ),
    _c(
        "eval --model truncated weights",
        lambda w: ["eval", SMOKE, "--model", str(w / "models/truncated")],
        "truncated/model.safetensors: damaged or truncated",
        True,
    ),
    _c(
        "eval --model missing dir",
        lambda w: ["eval", SMOKE, "--model", "./no/such/model"],
        "model ./no/such/model: no such directory",
        True,
    ),
    _c(
        "eval --model stage typo",
        ["eval", SMOKE, "--model", "teacher_sf"],
        "error: no stage teacher_sf in runs/smoke (did you mean teacher_sft?)",
        True,
    ),
    _c(
        "eval --model unfinished stage",
        ["eval", SMOKE, "--model", "student_sft"],
        "student_sft: that stage of runs/smoke has not finished; run it first",
        True,
    ),
    _c(
        "generate before teacher_sft",
        ["generate", SMOKE],
        "teacher_sft: that stage of runs/smoke has not finished",
        True,
    ),
    # ---- launcher options
    _c(
        "--master-port out of range",
        ["sft", SMOKE, "--master-port", "99999"],
        "--master-port 99999: expected a port number from 1 to 65535",
    ),
    _c(
        "--node-rank beyond --nnodes",
        ["sft", SMOKE, "--nnodes", "2", "--node-rank", "5"],
        "--node-rank 5: expected a node rank from 0 to 1 (--nnodes 2)",
    ),
    _c("hostfile missing", ["sft", SMOKE, "--hostfile", "no_hostfile"], "no_hostfile: hostfile not found"),
    _c(
        "hostfile bad line",
        lambda w: ["sft", SMOKE, "--hostfile", str(w / "hosts/bad_line")],
        "bad_line:1: expected 'hostname slots=N'",
    ),
    _c(
        "hostfile no hosts",
        lambda w: ["sft", SMOKE, "--hostfile", str(w / "hosts/empty")],
        "the hostfile lists no hosts",
    ),
    _c(
        "hostfile --include unknown",
        lambda w: ["sft", SMOKE, "--hostfile", str(w / "hosts/ok"), "--include", "elsewhere"],
        "--include/--exclude: ",
    ),
    _c(
        "hostfile host unresolvable",
        lambda w: ["sft", SMOKE, "--model", "student", "--hostfile", str(w / "hosts/unresolvable")],
        "host 'bdctl-no-such-host.invalid' does not resolve",
        True,
    ),
    # ---- judge settings and endpoints
    _c(
        "judge candidate is a baseline",
        ["judge", SMOKE, "--candidate", "student_sft", "--baseline", "student_sft"],
        "the candidate 'student_sft' is also a baseline",
    ),
    _c(
        "judge eval_set unknown",
        ["judge", SMOKE, "--set", "stages.judge.eval_set=nosuch"],
        "stages.judge.eval_set 'nosuch' is not one of stages.eval.sets",
    ),
    _c("judge max_unparsed > 1", ["judge", SMOKE, "--set", "stages.judge.max_unparsed=2"], "stages.judge.max_unparsed"),
    _c(
        "judge API key unset",
        ["judge", SMOKE, "--backend", "openai", "--set", "stages.judge.api_key_env=BDCTL_NO_SUCH_KEY"],
        "environment variable BDCTL_NO_SUCH_KEY is empty or unset",
    ),
    _c(
        "judge base_url not a URL",
        [
            "judge",
            SMOKE,
            "--backend",
            "openai",
            "--set",
            "stages.judge.base_url=localhost:9",
            "--set",
            "stages.judge.api_key_env=none",
        ],
        "localhost:9",
    ),
    _c(
        "judge candidate typo",
        ["judge", SMOKE, "--candidate", "teacher_sf", "--baseline", "student_sft"],
        "error: no stage teacher_sf in runs/smoke (did you mean teacher_sft?)",
        True,
    ),
]


def looks_complete(root: Path) -> list[Path]:
    """Files that would make a failed command's output look finished (the data stage's own
    manifest is finished work of its own)."""
    runs = root / "runs"
    found = [p for p in runs.rglob("MANIFEST.json") if p.parent.name != "data"] if runs.is_dir() else []
    found += list(runs.glob("*/recipe.yaml")) + list(runs.rglob("export")) if runs.is_dir() else []
    return found


@pytest.fixture
def cli(monkeypatch):
    runner = CliRunner()

    def invoke(args: list[str], cwd: Path):
        from bdctl.cli import app

        monkeypatch.chdir(cwd)
        monkeypatch.setenv("COLUMNS", "400")
        monkeypatch.setattr(sys, "argv", ["bdctl", *args])  # the stage lock records it
        return runner.invoke(app, args)

    return invoke


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path, cli) -> None:
    if case.prepared:
        shutil.copytree(world / "prepared/runs", tmp_path / "runs")
    result = cli(case.args(world), tmp_path)
    shown = "".join(traceback.format_exception(result.exception)) if result.exception else ""
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], shown[-3000:])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert case.culprit(world) in errors[0], (case.culprit(world), errors[0])
    assert not looks_complete(tmp_path), looks_complete(tmp_path)


def test_at_least_forty_bad_inputs() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_run_directory_without_write_permission(world, tmp_path, cli) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    recipe = recipe_file(tmp_path / "r.yaml", run_dir=str(locked / "run"))
    result = cli(["sft", str(recipe)], tmp_path)
    assert result.exit_code == 2, result.output
    assert f"{locked}: no permission to write here" in result.stderr.strip().splitlines()[-1]


def test_recipes_list_shows_the_good_ones_and_marks_a_broken_one(tmp_path, cli) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes/broken.yaml").write_text("name: [\n")
    shutil.copy(SMOKE, tmp_path / "recipes/mine.yaml")
    result = cli(["recipes", "list"], tmp_path)
    assert result.exit_code == 2
    assert "broken (broken)" in result.stdout and "not valid YAML" in result.stdout
    assert str(tmp_path / "recipes/mine.yaml") in result.stdout and "gpt2-1.5b-to-120m" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: 1 recipe(s) do not load: {tmp_path / 'recipes/broken.yaml'} (their errors are in the table)"
    ]


def test_flags_are_shown_as_flags(cli, tmp_path) -> None:
    for command in ("sft", "eval", "judge", "generate", "distill"):
        result = cli([command, "--help"], tmp_path)
        assert result.exit_code == 0
        force = next(line for line in result.stdout.splitlines() if "--force" in line)
        assert "<bool>" not in force and "boolean" not in force.lower(), force


# --------------------------------------------------------------------------- failures inside ranks and launchers


def test_a_rank_failure_is_one_line_with_its_traceback_in_the_rank_log(world, tmp_path, monkeypatch) -> None:
    """Damaged weights found inside a rank (past the launching process's header check): the rank
    writes one line for the launcher and its traceback to logs/rank0.log, never to the terminal."""
    from safetensors.torch import load_file

    import bdctl.engine
    import bdctl.stages
    from bdctl.errors import UserError
    from bdctl.launch import LaunchOptions, _failure_message
    from bdctl.submit import plan
    from bdctl.worker import run_job

    monkeypatch.chdir(tmp_path)
    job = plan("sft", SMOKE, [], {"model": "student"}, LaunchOptions())
    job_file = job.stage_dir / "job.json"
    job.stage_dir.mkdir(parents=True)
    job.save(job_file)

    class Stage:
        @staticmethod
        def run(job, rank, world_size):
            load_file(world / "models/truncated/model.safetensors")

    monkeypatch.setattr(bdctl.engine, "init_distributed", lambda: (0, 1))
    monkeypatch.setattr(bdctl.stages, "stage_module", lambda stage: Stage)
    with pytest.raises(UserError, match=r"^damaged safetensors weights \(") as caught:
        run_job(job_file)
    assert len(str(caught.value).splitlines()) == 1
    logs = job.stage_dir / "logs"
    assert (logs / "error-rank0.txt").read_text() == f"{caught.value}\n"
    assert "Traceback" in (logs / "rank0.log").read_text() and "SafetensorError" in (logs / "rank0.log").read_text()
    (logs / "first-failure.json").write_text(json.dumps({"rank": 0, "exit_code": 2}))
    assert _failure_message(job.stage_dir, 2) == str(caught.value)


def test_a_launcher_failure_names_no_logs_directory_that_does_not_exist(tmp_path) -> None:
    from bdctl.launch import _failure_message

    message = _failure_message(tmp_path / "stage", 1)
    assert "logs" not in message.replace("before any rank wrote a log", "") and "exit code 1" in message


def test_a_damaged_model_is_one_line_where_it_loads(world) -> None:
    """The ranks' own loader names the directory for weights the header check could not see."""
    from bdctl.errors import UserError
    from bdctl.models import load_model

    with pytest.raises(UserError, match=r"models/truncated: cannot load the model \("):
        load_model(str(world / "models/truncated"), None, 1)


def test_pathological_record_is_dropped_before_tokenizer_training(tmp_path) -> None:
    """One record of 400 000 characters without a space: BPE training on it took minutes (time
    quadratic in a word's length); it is dropped before any tokenizer sees it, and counted."""
    from bdctl.data.prepare import prepare_data
    from bdctl.data.synthetic import synthetic_instructions
    from bdctl.recipe import load_recipe
    from bdctl.rundir import RunDir

    rows = synthetic_instructions(120, seed=3)
    rows[5] = {**rows[5], "output": "ab" * 200_000}
    rows[6] = {**rows[6], "output": "  "}
    data = rows_file(tmp_path / "long.jsonl", rows)
    recipe, _ = load_recipe(SMOKE, [f"data.source={{path: {data}}}", "data.split={valid: 8, test: 8, seed: 1}"])
    prepare_data(recipe, RunDir(tmp_path / "run"), log=lambda *_: None)
    report = json.loads((tmp_path / "run/data/split.json").read_text())
    assert report["dropped"]["text_too_long"] == 1 and report["dropped"]["empty_output"] == 1
    assert report["train"] + 16 + sum(report["dropped"].values()) == 120


def test_rendezvous_timeout_errors_name_the_master(tmp_path) -> None:
    """torchrun's launcher, in this process (no rank starts): node 1 cannot reach its master, node 0
    waits for a node that never comes; each stops after --rendezvous-timeout with one line."""
    from bdctl.launch import LAUNCH_FAILURE, _torchrun

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job_file = tmp_path / "stage/job.json"
    job_file.parent.mkdir()
    job_file.write_text("{}")
    for node in (1, 0):
        argv = ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
                "127.0.0.1", "--master_port", str(port), "--rdzv_conf", "timeout=1", "-m", "bdctl.worker",
                str(job_file)]  # fmt: skip
        assert _torchrun(argv) == 2
        message = (tmp_path / "stage/logs" / LAUNCH_FAILURE).read_text().strip()
        assert len(message.splitlines()) == 1 and "--rendezvous-timeout" in message
        if node == 1:
            assert message.startswith(f"rendezvous: node 1 could not reach the master at 127.0.0.1:{port} within 1 s")
        else:
            assert message.startswith(f"rendezvous: node 0 waited 1 s at 127.0.0.1:{port} for 2 nodes and not all came")


@pytest.mark.slow
def test_rendezvous_timeout_through_the_cli(world, tmp_path) -> None:
    """`--nnodes 2` on node 0 with no other node: the command says where it waits, then stops
    after --rendezvous-timeout with one line naming the master address and port (exit 2)."""
    shutil.copytree(world / "prepared/runs", tmp_path / "runs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("sft", SMOKE, "--model", "student", "--nnodes", "2", "--master-port", str(port),
                     "--rendezvous-timeout", "2", cwd=tmp_path, timeout=300)  # fmt: skip
    assert f"node 0 of 2: waiting up to 2 s for all 2 nodes at 127.0.0.1:{port}" in result.stderr
    assert_user_error(result, f"rendezvous: node 0 waited 2 s at 127.0.0.1:{port} for 2 nodes")
    assert not looks_complete(tmp_path)
