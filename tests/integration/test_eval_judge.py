"""`bdctl eval` and `bdctl judge` through the real CLI on the smoke recipe.

One module-scoped run of teacher and student SFT (a few steps; the teacher gets 512 positions so
that it can serve as the hf judge, whose prompt alone is ~300 tokens with the smoke tokenizer),
one module-scoped eval of both; every test works on its own copy of that run directory.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import RECIPES, assert_user_error, run_cli, write_recipe
from tests.unit.chat_server import ChatServer, Reply, answers_of, closed_port

pytestmark = pytest.mark.slow  # every test runs `bdctl eval` / `bdctl judge` in a subprocess

SMOKE = str(RECIPES / "smoke.yaml")
# Two seeds and short answers (the smoke models have 128 positions; prompts take up to ~80).
EVAL = [
    "--set",
    "stages.eval.seeds=[10,20]",
    "--set",
    "stages.eval.max_new_tokens=16",
    "--set",
    "stages.eval.models=[teacher_sft,student_sft]",
]
PAIR = ["--candidate", "teacher_sft", "--baseline", "student_sft"]
KEY_ENV = "BDCTL_TEST_JUDGE_KEY"


def copy_run(source: Path, dest: Path) -> Path:
    """A private copy of a run directory (DeepSpeed checkpoints left out: nothing here needs them)."""
    shutil.copytree(source / "runs", dest / "runs", ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def generations(root: Path, model: str, seed: int, eval_set: str = "dolly", protocol: str = "minillm") -> Path:
    return root / f"runs/smoke/eval/generations/{model}/{protocol}/{eval_set}/seed{seed}.jsonl"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ok(result) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    ok(run_cli("sft", SMOKE, "--model", "teacher", "--set", "stages.teacher_sft.max_steps=3",
               "--set", "models.teacher.tiny.max_positions=512", cwd=root))  # fmt: skip
    ok(run_cli("sft", SMOKE, "--model", "student", "--set", "stages.student_sft.max_steps=3", cwd=root))
    return root


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory) -> tuple[Path, object]:
    root = copy_run(trained, tmp_path_factory.mktemp("evaluated"))
    result = run_cli("eval", SMOKE, *EVAL, cwd=root)
    ok(result)
    return root, result


# --------------------------------------------------------------------------- eval


def test_eval_end_to_end_and_reuse(evaluated, tmp_path):
    from bdctl.metrics import mean_std, rouge_l

    source, result = evaluated
    root = copy_run(source, tmp_path)
    out = root / "runs/smoke/eval"
    references = {e["id"]: e["references"] for e in lines(out / "sets/dolly.jsonl")}
    assert len(references) == 32
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == ["teacher_sft", "student_sft"] and results["seeds"] == [10, 20]
    assert results["units"] == {"total": 4, "generated": 4, "reused": 0}
    assert results["protocols"] == [{"name": "minillm", "temperature": 1.0, "top_p": 1.0, "top_k": 0}]
    for model in ("teacher_sft", "student_sft"):
        per_seed = []
        for seed in (10, 20):
            records = lines(generations(root, model, seed))
            assert [r["prompt_id"] for r in records] == list(references)  # every prompt, in set order
            assert {(r["model"], r["protocol"], r["set"], r["seed"]) for r in records} == {
                (model, "minillm", "dolly", seed)
            }
            for r in records:  # Rouge-L exactly as docs/method.md §8.2 says, max over references
                assert r["rouge_l"] == pytest.approx(rouge_l(r["text"], references[r["prompt_id"]]))
                assert 0 < r["tokens"] <= 16 and r["finish_reason"] in ("eos", "length")
            per_seed.append(sum(r["rouge_l"] for r in records) / len(records))
        score = results["scores"]["minillm"][model]["dolly"]
        assert score["per_seed"] == {"10": pytest.approx(per_seed[0]), "20": pytest.approx(per_seed[1])}
        mean, std = mean_std(per_seed)
        assert (score["mean"], score["std"]) == (pytest.approx(mean), pytest.approx(std))
        assert f"| {model} | {mean:.2f} ± {std:.2f} |" in (out / "table.md").read_text()
        assert f"{mean:.2f} ± {std:.2f}" in result.stdout  # the rich table
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["model"] for r in rows] == ["teacher_sft", "student_sft"]
    assert float(rows[0]["dolly_mean"]) == pytest.approx(results["scores"]["minillm"]["teacher_sft"]["dolly"]["mean"])
    assert {r["protocol"] for r in rows} == {"minillm"}
    assert json.loads((out / "MANIFEST.json").read_text())["models"] == ["teacher_sft", "student_sft"]
    # sampling differs between seeds
    assert [r["text"] for r in lines(generations(root, "teacher_sft", 10))] != [
        r["text"] for r in lines(generations(root, "teacher_sft", 20))
    ]

    # A rerun reuses every unit: nothing is regenerated or rewritten.
    files = sorted((out / "generations").rglob("seed*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_cli("eval", SMOKE, *EVAL, cwd=root)
    ok(again)
    assert "4 reused, 0 to generate" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert json.loads((out / "results.json").read_text())["units"] == {"total": 4, "generated": 0, "reused": 4}

    # Another model (a local directory, a copy of the student) adds its units only. Its answers
    # equal the student's: a prompt's random numbers depend on (seed, prompt id) only.
    shutil.copytree(root / "runs/smoke/student_sft/export", root / "copy-of-student")
    more = run_cli("eval", SMOKE, *EVAL, "--model", "teacher_sft", "--model", "./copy-of-student", cwd=root)
    ok(more)
    assert "2 reused, 2 to generate" in more.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    [copy_dir] = [p for p in (out / "generations").iterdir() if p.name.startswith("copy-of-student-")]
    for seed in (10, 20):
        copy_texts = [r["text"] for r in lines(copy_dir / f"minillm/dolly/seed{seed}.jsonl")]
        assert copy_texts == [r["text"] for r in lines(generations(root, "student_sft", seed))]
    assert json.loads((out / "results.json").read_text())["models"] == ["teacher_sft", "./copy-of-student"]

    # A changed setting makes the units stale: they are generated again.
    changed = run_cli("eval", SMOKE, "--set", "stages.eval.seeds=[10]", "--set", "stages.eval.max_new_tokens=8",
                      "--model", "student_sft", cwd=root)  # fmt: skip
    ok(changed)
    assert "0 reused, 1 to generate" in changed.stderr
    assert max(r["tokens"] for r in lines(generations(root, "student_sft", 10))) <= 8


def test_sigterm_stops_eval_with_75_and_keeps_finished_results(trained, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root = copy_run(trained, tmp_path)
    # Batches of 4 prompts: a check for the stop request every few hundred milliseconds.
    args = [*EVAL, "--set", "stages.eval.batch_size=4"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    process = subprocess.Popen([sys.executable, "-m", "bdctl", "eval", SMOKE, *args], cwd=root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    done = root / "runs/smoke/eval/generations"
    deadline = time.time() + 300
    while not list(done.rglob("seed*.done.json")):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no eval unit finished in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: preempted during ") and "finished results are kept" in lines[-1], lines[-3:]
    assert "Traceback" not in stderr and not (root / "runs/smoke/eval/MANIFEST.json").exists()
    kept = len(list(done.rglob("seed*.done.json")))
    assert 1 <= kept < 4

    result = run_cli("eval", SMOKE, *args, cwd=root)
    ok(result)
    assert f"{kept} reused, {4 - kept} to generate" in result.stderr


@pytest.mark.slow
def test_every_model_under_every_protocol_with_reuse_per_protocol(evaluated, tmp_path):
    """Issue 11: a second protocol adds its own units (the first protocol's are reused), its
    answers differ, and results.json, table.md and table.csv say which protocol each number is of."""
    source, _ = evaluated
    root = copy_run(source, tmp_path)
    out = root / "runs/smoke/eval"
    files = sorted((out / "generations").rglob("seed*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    protocols = ["--set", "stages.eval.protocols=[{name: minillm}, {name: release, top_p: 0.8}]"]
    result = run_cli("eval", SMOKE, *EVAL, *protocols, cwd=root)
    ok(result)
    assert "4 reused, 4 to generate" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # minillm's units untouched
    results = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in results["protocols"]] == ["minillm", "release"]
    assert results["protocols"][1]["top_p"] == 0.8
    for model in ("teacher_sft", "student_sft"):
        release = lines(generations(root, model, 10, protocol="release"))
        assert {r["protocol"] for r in release} == {"release"}
        assert [r["text"] for r in release] != [r["text"] for r in lines(generations(root, model, 10))]
        per_seed = results["scores"]["release"][model]["dolly"]["per_seed"]
        assert per_seed["10"] == pytest.approx(sum(r["rouge_l"] for r in release) / len(release))
    table = (out / "table.md").read_text()
    assert "### Protocol minillm (temperature 1, top_p 1, top_k 0)" in table
    assert "### Protocol release (temperature 1, top_p 0.8, top_k 0)" in table
    assert "protocol release" in result.stdout  # the printed tables name their protocol
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [(r["protocol"], r["model"]) for r in rows] == [
        ("minillm", "teacher_sft"),
        ("minillm", "student_sft"),
        ("release", "teacher_sft"),
        ("release", "student_sft"),
    ]
    assert json.loads((out / "MANIFEST.json").read_text())["protocols"] == ["minillm", "release"]
    again = run_cli("eval", SMOKE, *EVAL, *protocols, cwd=root)
    ok(again)
    assert "8 reused, 0 to generate" in again.stderr


def test_two_ranks_give_the_same_generations(trained, evaluated, tmp_path):
    """Batches are formed for the whole set and dealt to ranks, and each prompt's seed comes from
    (seed, prompt id): every prompt is sampled in the same batch with the same random numbers."""
    one_rank, _ = evaluated
    root = copy_run(trained, tmp_path)
    ok(run_cli("eval", SMOKE, *EVAL, "--nproc", "2", "--model", "student_sft", cwd=root))
    for model in ("student_sft",):
        for seed in (10, 20):
            assert generations(root, model, seed).read_bytes() == generations(one_rank, model, seed).read_bytes()
            done = json.loads(generations(root, model, seed).with_suffix(".done.json").read_text())
            assert done["world_size"] == 2


def test_eval_set_from_local_jsonl_with_several_references(trained, tmp_path):
    from bdctl.metrics import rouge_l

    root = copy_run(trained, tmp_path)
    data = root / "qa.jsonl"
    rows = [
        {"question": "What is two plus two?", "context": "", "answers": ["Four.", "It is four.", "2 + 2 = 4"]},
        {"question": "Name a colour.", "context": "Think of the sky.", "answers": ["Blue."]},
        {"question": "Multiply ten by three.", "context": None, "answers": "Thirty."},  # one string is fine
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_set = {
        "name": "qa",
        "path": str(data),
        "fields": {"instruction": "question", "input": "context", "output": "answers"},
    }
    recipe = write_recipe(root / "r.yaml", stages__eval={"sets": [eval_set], "seeds": [10], "max_new_tokens": 16})
    ok(run_cli("eval", str(recipe), "--model", "teacher_sft", cwd=root))
    examples = lines(root / "runs/smoke/eval/sets/qa.jsonl")
    assert [e["references"] for e in examples] == [rows[0]["answers"], ["Blue."], ["Thirty."]]
    assert "### Input:\nThink of the sky." in examples[1]["prompt"]  # the recipe's template
    records = lines(generations(root, "teacher_sft", 10, "qa"))
    assert [r["prompt_id"] for r in records] == [0, 1, 2]
    for record, example in zip(records, examples, strict=True):
        best = rouge_l(record["text"], example["references"])
        assert record["rouge_l"] == pytest.approx(best)
        assert best == max(rouge_l(record["text"], [ref]) for ref in example["references"])
    assert "| teacher_sft |" in (root / "runs/smoke/eval/table.md").read_text()


# --------------------------------------------------------------------------- judge


def test_judge_hf_end_to_end(evaluated, tmp_path):
    root = copy_run(evaluated[0], tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (root / "runs/smoke/eval/generations").rglob("seed*")}
    result = run_cli("judge", SMOKE, "--backend", "hf", *PAIR, *EVAL, cwd=root)
    ok(result)
    assert "generating" not in result.stderr  # the eval stage's answers were used
    assert {p: p.stat().st_mtime_ns for p in before} == before
    out = root / "runs/smoke/judge"
    results = json.loads((out / "results.json").read_text())
    record = results["baselines"]["student_sft"]
    assert record["wins"] + record["ties"] + record["losses"] + record["unparseable"] == 2 * 32
    assert record["pairs"] == 32 and 0 <= record["win_rate"] <= 1
    assert record["ci_low"] <= record["win_rate"] <= record["ci_high"]
    assert results["judge"]["backend"] == "hf" and results["verdicts"]["new"] == 64
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == 64
    assert "| student_sft |" in (out / "table.md").read_text()
    assert (out / "table.csv").read_text().startswith("baseline,wins,ties,losses,unparseable")
    assert record["both_orders_parsed"] == 32 and 0 <= record["consistent_pairs"] <= 32
    assert record["consistency"] == record["consistent_pairs"] / 32 and 0 <= record["first_position"] <= 1
    assert record["position_driven"] == (record["consistency"] < 0.5)
    assert "consistent %" in (out / "table.md").read_text() and "consistent %" in result.stdout
    assert (out / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    judgments = lines(out / "judgments/teacher_sft_vs_student_sft.jsonl")
    assert len(judgments) == 32 and {"model_first", "model_second"} <= set(judgments[0])
    assert (out / "MANIFEST.json").is_file() and "student_sft" in result.stdout

    again = run_cli("judge", SMOKE, "--backend", "hf", *PAIR, *EVAL, cwd=root)
    ok(again)
    assert json.loads((out / "results.json").read_text())["verdicts"]["new"] == 0  # all from the cache
    assert json.loads((out / "results.json").read_text())["baselines"] == results["baselines"]


def longer_answer_wins(body) -> Reply:
    """A deterministic judge: the longer answer wins; equal lengths tie."""
    answer_a, answer_b = answers_of(body)
    if len(answer_a) == len(answer_b):
        return Reply(content="Tie")
    return Reply(content="A" if len(answer_a) > len(answer_b) else "B")


def test_judge_openai_end_to_end_generating_missing_answers(trained, tmp_path, monkeypatch):
    """Against a local chat-completions server, through the CLI; the answers for seed 30 do not
    exist yet and are generated first (with the eval stage's settings, into its directory)."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    root = copy_run(trained, tmp_path)
    with ChatServer(longer_answer_wins, script=[Reply(content="Answer A, probably")]) as server:
        args = [*PAIR, *EVAL, "--set", "stages.judge.seed=30", "--set", f"stages.judge.base_url={server.base_url}",
                "--set", f"stages.judge.api_key_env={KEY_ENV}",
                "--set", "stages.judge.api_model=test-judge"]  # fmt: skip
        result = run_cli("judge", SMOKE, "--backend", "openai", *args, cwd=root)
        ok(result)
        assert "generating 2 missing" in result.stderr
        assert server.recorded[0].headers["authorization"] == "Bearer sk-test"
        assert {r.body["model"] for r in server.recorded} == {"test-judge"}
        assert {r.body["temperature"] for r in server.recorded} == {0}
        assert server.count == 64 + 1  # the scripted garbage reply was asked again
        record = json.loads((root / "runs/smoke/judge/results.json").read_text())["baselines"]["student_sft"]
        assert record["unparseable"] == 0 and record["wins"] + record["ties"] + record["losses"] == 64
        # The verdicts follow the answers whatever their order: a consistent judge, not flagged.
        assert record["consistency"] == 1.0 and record["position_driven"] is False
        assert (
            "position-driven" not in result.stderr and "Warning" not in (root / "runs/smoke/judge/table.md").read_text()
        )
        # The verdicts agree with the answers the eval stage saved.
        teacher = {r["prompt_id"]: r["text"] for r in lines(generations(root, "teacher_sft", 30))}
        student = {r["prompt_id"]: r["text"] for r in lines(generations(root, "student_sft", 30))}
        judgments = lines(root / "runs/smoke/judge/judgments/teacher_sft_vs_student_sft.jsonl")
        for j in judgments:
            a, b = teacher[int(j["prompt_id"])].strip(), student[int(j["prompt_id"])].strip()
            expected = 0.5 if len(a) == len(b) else float(len(a) > len(b))
            assert j["model_first"]["outcome"] in (expected, None)

        again = run_cli("judge", SMOKE, "--backend", "openai", *args, cwd=root)
        ok(again)
        assert server.count == 65  # the cache answered everything
        assert "generating" not in again.stderr


def test_failing_endpoint_keeps_finished_verdicts(evaluated, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    root = copy_run(evaluated[0], tmp_path)
    healthy = threading.Event()
    answered = []

    def flaky(body) -> Reply:
        if not healthy.is_set() and len(answered) >= 10:
            return Reply(status=503, content=None)
        answered.append(1)
        return Reply(content="A")

    with ChatServer(flaky) as server:
        args = [*PAIR, *EVAL, "--set", f"stages.judge.base_url={server.base_url}",
                "--set", f"stages.judge.api_key_env={KEY_ENV}",
                "--set", "stages.judge.concurrency=1", "--set", "stages.judge.retries=1"]  # fmt: skip
        failed = run_cli("judge", SMOKE, "--backend", "openai", *args, cwd=root)
        assert_user_error(failed, f"judge endpoint {server.base_url} failing after 2 tries: HTTP 503")
        verdicts = root / "runs/smoke/judge/verdicts.jsonl"
        assert len(verdicts.read_text().splitlines()) == 10  # finished work kept
        assert not (root / "runs/smoke/judge/MANIFEST.json").exists()

        healthy.set()
        before = server.count
        result = run_cli("judge", SMOKE, "--backend", "openai", *args, cwd=root)
        ok(result)
        assert server.count - before == 64 - 10  # only the missing verdicts are asked
        assert (root / "runs/smoke/judge/MANIFEST.json").is_file()

    # This judge always says "A": every pair scores one win and one loss, an exact 50 % that is
    # position alone. It is flagged in results.json, the tables and the command's output.
    out = root / "runs/smoke/judge"
    record = json.loads((out / "results.json").read_text())["baselines"]["student_sft"]
    assert (record["win_rate"], record["ci_low"], record["ci_high"]) == (0.5, 0.5, 0.5)
    assert record["consistency"] == 0.0 and record["first_position"] == 1.0 and record["position_driven"] is True
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "position-driven judge: against student_sft (0.0% consistent" in warning[0]
    assert "**Warning:** position-driven judge" in (out / "table.md").read_text()
    assert (out / "table.csv").read_text().splitlines()[1].endswith(",0.0,1.0,True")


def test_sigterm_stops_the_judge_with_75_and_keeps_its_verdicts(evaluated, tmp_path):
    """Like eval: SIGTERM is a preemption (exit 75, one line), not a death by signal (-15)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = copy_run(evaluated[0], tmp_path)
    verdicts = root / "runs/smoke/judge/verdicts.jsonl"
    with ChatServer(lambda body: Reply(content="A", delay_s=0.05)) as server:
        args = [*PAIR, *EVAL, "--set", f"stages.judge.base_url={server.base_url}",
                "--set", "stages.judge.api_key_env=none", "--set", "stages.judge.concurrency=1"]  # fmt: skip
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        command = [sys.executable, "-m", "bdctl", "judge", SMOKE, "--backend", "openai", *args]
        process = subprocess.Popen(command, cwd=root, env={**env, "NO_COLOR": "1", "COLUMNS": "200"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.time() + 300
        while not verdicts.is_file() or len(verdicts.read_text().splitlines()) < 5:
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "no verdict in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 75, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: judge: stopped by SIGTERM; the verdicts it finished are kept in "), lines[
            -3:
        ]
        assert "Traceback" not in stderr and not (root / "runs/smoke/judge/MANIFEST.json").exists()
        kept = len(verdicts.read_text().splitlines())
        assert 5 <= kept < 64
        before = server.count
        ok(run_cli("judge", SMOKE, "--backend", "openai", *args, cwd=root))
        assert server.count - before == 64 - kept  # the rerun asks only what was not finished


@pytest.mark.slow
def test_unparsed_verdicts_and_a_failed_force_leave_no_results(evaluated, tmp_path):
    """A judge that answers "Maybe" fails the stage (never cached, so the repaired endpoint is
    asked again); a failing `--force` leaves none of the previous run's results behind."""
    root = copy_run(evaluated[0], tmp_path)
    out = root / "runs/smoke/judge"
    results = [
        out / name for name in ("results.json", "table.md", "table.csv", "win_rates.png", "MANIFEST.json", "judgments")
    ]

    def judge(server_url: str, *extra: str):
        return run_cli("judge", SMOKE, "--backend", "openai", *PAIR, *EVAL,
                       "--set", f"stages.judge.base_url={server_url}", "--set", "stages.judge.api_key_env=none",
                       "--set", "stages.judge.retries=0", *extra, cwd=root)  # fmt: skip

    with ChatServer(longer_answer_wins) as good:
        ok(judge(good.base_url))
    assert all(path.exists() for path in results)
    recorded = (root / "runs/smoke/recipe.yaml").read_text()  # the recipe of the latest finished command
    assert f"base_url: {good.base_url}" in recorded

    with ChatServer(lambda body: Reply(content="Maybe")) as vague:
        failed = judge(vague.base_url, "--force")
        assert vague.count == 64 * 3  # every request asked three times
    assert_user_error(failed, "64 of 64 judgments against student_sft (100.0%) were not A, B or Tie after 3 tries",
                      "(e.g. 'Maybe'); stages.judge.max_unparsed allows 5%")  # fmt: skip
    assert not any(path.exists() for path in results), [p for p in results if p.exists()]
    assert (root / "runs/smoke/recipe.yaml").read_text() == recorded  # the failed command's is not recorded
    assert not (out / "verdicts.jsonl").exists() or not (out / "verdicts.jsonl").read_text()  # nothing cached

    with ChatServer(longer_answer_wins) as good:
        ok(judge(good.base_url))
        assert good.count == 64
    # --force against an endpoint that is down: the results just made are gone, not left looking current.
    url = f"http://127.0.0.1:{closed_port()}/v1"
    assert_user_error(judge(url, "--force"), f"judge endpoint {url} unreachable after 1 tries")
    assert not any(path.exists() for path in results), [p for p in results if p.exists()]
    # A share within max_unparsed is reported, not fatal: one request never gets a verdict.
    vague_about = []

    def vague_once(body) -> Reply:
        question = body["messages"][-1]["content"]
        vague_about[:] = vague_about or [question]
        return Reply(content="Maybe") if question == vague_about[0] else longer_answer_wins(body)

    with ChatServer(vague_once) as flaky:
        ok(judge(flaky.base_url))
        assert flaky.count == 64 + 2
    record = json.loads((out / "results.json").read_text())["baselines"]["student_sft"]
    assert record["unparseable"] == 1 and record["pairs"] == 32


# --------------------------------------------------------------------------- bad input


def test_unreachable_endpoint(evaluated, tmp_path):
    root = copy_run(evaluated[0], tmp_path)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    result = run_cli(
        "judge", SMOKE, "--backend", "openai", *PAIR, *EVAL, "--set", f"stages.judge.base_url={url}",
        "--set", "stages.judge.api_key_env=none", "--set", "stages.judge.retries=1", cwd=root,
    )  # fmt: skip
    assert_user_error(result, f"judge endpoint {url} unreachable after 2 tries: connection refused")


def test_judge_before_eval_without_generating(trained, tmp_path):
    root = copy_run(trained, tmp_path)
    result = run_cli("judge", SMOKE, "--backend", "openai", "--no-generate", *PAIR, *EVAL,
                     "--set", "stages.judge.api_key_env=none", cwd=root)  # fmt: skip
    assert_user_error(
        result,
        "generations/teacher_sft/minillm/dolly/seed10.jsonl: no current generations of teacher_sft",
        f"run `bdctl eval {SMOKE} --model teacher_sft --model student_sft --set 'stages.eval.seeds=[10,20]' "
        "--set stages.eval.max_new_tokens=16 --set 'stages.eval.models=[teacher_sft,student_sft]'` first",
    )
    assert not (root / "runs/smoke/judge/MANIFEST.json").exists()


def test_bad_model_and_judge_settings(trained, tmp_path):
    root = copy_run(trained, tmp_path)
    # 256 new tokens do not fit smoke's 128-position student
    result = run_cli(
        "eval", SMOKE, "--set", "stages.eval.max_new_tokens=256", "--set", "stages.eval.models=[student_sft]", cwd=root
    )
    assert_user_error(result, "model student_sft has 128 positions", "stages.eval.max_new_tokens to at most")
    # the default candidate is BD, which this run has not trained
    result = run_cli("judge", SMOKE, *EVAL, cwd=root)
    assert_user_error(result, "distill/bd: that stage of runs/smoke has not finished; run it first: bdctl distill")
    # a judge whose context cannot hold the judge prompt
    result = run_cli("judge", SMOKE, *PAIR, *EVAL, "--set", "stages.judge.hf_model=student_sft", cwd=root)
    assert_user_error(result, "judge model student_sft reads at most 128 tokens")
    assert_user_error(
        run_cli("eval", SMOKE, *EVAL, "--model", "./nowhere", cwd=root), "model ./nowhere: no such directory"
    )
    result = run_cli(
        "judge",
        SMOKE,
        "--backend",
        "openai",
        *PAIR,
        *EVAL,
        "--set",
        "stages.judge.api_key_env=BDCTL_UNSET_KEY",
        cwd=root,
    )
    assert_user_error(result, "environment variable BDCTL_UNSET_KEY is empty or unset")


def test_eval_set_without_references(tmp_path):
    data = tmp_path / "noref.jsonl"
    data.write_text('{"instruction": "Say hi.", "input": ""}\n')
    recipe = write_recipe(tmp_path / "r.yaml", stages__eval={"sets": [{"name": "noref", "path": str(data)}]})
    assert_user_error(
        run_cli("eval", str(recipe), cwd=tmp_path),
        f"{data}:1: eval set 'noref' has no reference answers (no field 'output')",
    )
    data.write_text('{"instruction": "Say hi.", "input": "", "output": ["", " "]}\n')
    assert_user_error(
        run_cli("eval", str(recipe), cwd=tmp_path), "eval set 'noref' has an example without a reference answer"
    )


def test_help_shows_examples(tmp_path):
    eval_help = run_cli("eval", "--help", cwd=tmp_path)
    assert eval_help.returncode == 0 and "bdctl eval recipes/smoke.yaml" in eval_help.stdout
    judge_help = run_cli("judge", "--help", cwd=tmp_path)
    assert judge_help.returncode == 0 and "bdctl judge recipes/smoke.yaml --backend hf" in judge_help.stdout
    assert "single process" in judge_help.stdout
