"""`bdctl generate` through the real CLI: D*, the sparse teacher cache and the sparsity report;
one rank against two, ZeRO-3 inference, SIGKILL and resume, scoring golden data, bad input.

One teacher SFT is shared by the module; every test copies its run directory and generates with
small settings. Every run uses one thread per rank: the numbers are then bit-identical between
runs, whatever else the machine is doing (a thread team on a busy 2-core machine also stalls).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RECIPES, assert_user_error, run_cli

pytestmark = pytest.mark.slow  # every test runs `bdctl generate` (DeepSpeed ranks) in a subprocess

SMOKE = str(RECIPES / "smoke.yaml")
N_SAMPLES = 2
MAX_NEW = 24
SETTINGS = [
    "--set", f"stages.generate.n_samples={N_SAMPLES}", "--set", f"stages.generate.max_new_tokens={MAX_NEW}",
    "--set", "stages.generate.report_examples=64",
]  # fmt: skip
# Four epochs (instead of 2) make the smoke teacher peaked enough for short responses and sets of all sizes.
TEACHER = ["--set", "stages.teacher_sft.epochs=4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_rank():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, one_thread_per_rank) -> Path:
    """A run directory holding the data split, the tokenizer and the finished teacher SFT."""
    cwd = tmp_path_factory.mktemp("teacher")
    result = run_cli("sft", SMOKE, "--model", "teacher", *TEACHER, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "runs/smoke"


def fresh(teacher_run: Path, cwd: Path) -> Path:
    """A working directory with a copy of the teacher's run directory; returns the run directory."""
    run = cwd / "runs/smoke"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    return run


def generate(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("generate", SMOKE, *TEACHER, *SETTINGS, *args, cwd=cwd)


def cache_contents(stage: Path) -> list[tuple]:
    from bdctl.cache import TeacherCache

    return [
        (e.prompt_id, e.sample_index, e.seed, e.finish_reason, e.tokens.tobytes(), e.capture.ids.tobytes(),
         e.capture.probs.tobytes(), e.capture.kept.tobytes(), e.capture.covered.tobytes())
        for e in TeacherCache(stage / "cache")
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(teacher_run, tmp_path_factory) -> Path:
    """An uninterrupted one-rank generation; returns its stage directory."""
    cwd = tmp_path_factory.mktemp("reference")
    fresh(teacher_run, cwd)
    result = generate(cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: runs/smoke/generate/dstar.jsonl" in result.stderr
    return cwd / "runs/smoke/generate"


# --------------------------------------------------------------------------- outputs


def test_generate_writes_dstar_cache_and_report(reference):
    from bdctl.cache import TeacherCache
    from bdctl.models import load_tokenizer, tokenizer_hash

    run = reference.parent
    train = [json.loads(line) for line in (run / "data/train.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(run / "tokenizer")
    eos = tokenizer.eos_token_id
    dstar = [json.loads(line) for line in (reference / "dstar.jsonl").read_text().splitlines()]

    # every training prompt, N_SAMPLES times, in (prompt id, sample index) order, each seed its own
    assert len(dstar) == len(train) * N_SAMPLES
    assert [(r["prompt_id"], r["sample_index"]) for r in dstar] == sorted(
        (t["id"], j) for t in train for j in range(N_SAMPLES)
    )
    assert len({r["seed"] for r in dstar}) == len(dstar)
    prompts = {t["id"]: t["prompt"] for t in train}
    for record in dstar:
        ids = record["response_ids"]
        assert record["prompt"] == prompts[record["prompt_id"]]
        limit = min(MAX_NEW, 128 - len(tokenizer(record["prompt"])["input_ids"]))  # smoke: max_length 128
        assert 1 <= len(ids) <= limit
        if record["finish_reason"] == "eos":
            assert ids[-1] == eos and eos not in ids[:-1]
            assert record["response"] == tokenizer.decode(ids[:-1], clean_up_tokenization_spaces=False)
        else:
            assert record["finish_reason"] == "length" and len(ids) == limit and eos not in ids
    reasons = {r["finish_reason"] for r in dstar}
    assert reasons == {"eos", "length"}, reasons  # the trained teacher stops by itself, sometimes

    # the cache: the same sequences, its manifest says how it was made
    cache = TeacherCache(reference / "cache")
    assert [(e.prompt_id, e.sample_index, e.seed, e.tokens.tolist(), e.finish_reason) for e in cache] == [
        (r["prompt_id"], r["sample_index"], r["seed"], r["response_ids"], r["finish_reason"]) for r in dstar
    ]
    info = cache.manifest
    assert info["teacher"] == "teacher_sft (runs/smoke/teacher_sft/export)"
    assert (info["top_p"], info["max_k"], info["tokenizer_hash"]) == (0.8, 64, tokenizer_hash(tokenizer))
    assert info["counts"]["examples"] == len(dstar) and info["counts"]["prompts"] == len(train)
    assert info["counts"]["tokens"] == sum(len(r["response_ids"]) for r in dstar)
    assert 8 < info["bytes_per_token"] < 4 + 2 + 2 + 6 * 64 + 8

    # the report: Figure 1 as a table and a PNG, top-p set sizes, bytes per token
    stats = json.loads((reference / "sparsity.json").read_text())
    curve = [stats["top_k_cumulative_probability"][str(k)] for k in range(1, 51)]
    assert 0 < curve[0] and all(a <= b + 1e-6 for a, b in zip(curve, curve[1:], strict=False)) and curve[-1] <= 1 + 1e-5
    sizes = [stats["top_p_mean_set_size"][p] for p in ("0.5", "0.8", "0.9", "0.95")]
    assert 1 <= sizes[0] <= sizes[1] <= sizes[2] <= sizes[3]
    assert stats["scored_sequences"] == 64 and stats["cache"]["bytes_per_token"] == round(info["bytes_per_token"], 3)
    page = (reference / "sparsity.md").read_text()
    assert "| 50 |" in page and "bytes per token" in page and "| 0.95 |" in page
    assert (reference / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # progress as JSON lines, and the stage is complete
    metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["event"] == "start" and metrics[-1]["event"] == "done"
    assert sum(m["rows"] for m in metrics if m["event"] == "batch") == len(dstar)
    done = json.loads((reference / "MANIFEST.json").read_text())
    assert done["sequences"] == len(dstar) and done["report"]["png"] == "sparsity.png"


def test_cache_equals_top_p_sets_of_a_fresh_teacher_forward(reference):
    """End to end from the files: for generated sequences, the cached set at every position is
    the top-p set of a fresh (no KV cache, unbatched) forward over prompt + response."""
    import torch
    from transformers import AutoModelForCausalLM

    from bdctl.cache import TeacherCache
    from bdctl.models import load_tokenizer
    from bdctl.topp import top_p_set

    run = reference.parent
    tokenizer = load_tokenizer(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run / "teacher_sft/export").eval()
    prompts = {
        json.loads(line)["id"]: json.loads(line)["prompt"]
        for line in (run / "data/train.jsonl").read_text().splitlines()
    }
    cache = TeacherCache(reference / "cache")
    p, k = cache.top_p, cache.max_k
    positions = ambiguous = 0
    sizes = set()
    for i in range(0, len(cache), len(cache) // 12):
        example = cache[i]
        prompt = tokenizer(prompts[example.prompt_id])["input_ids"]
        response = example.tokens.tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0]
        probs = torch.softmax(logits[len(prompt) - 1 : len(prompt) + len(response) - 1].float(), dim=-1)
        reference_sets = top_p_set(probs, p, k)
        offsets = example.capture.offsets()
        for t in range(len(response)):
            ids = example.capture.ids[offsets[t] : offsets[t + 1]]
            got = example.capture.probs[offsets[t] : offsets[t + 1]].astype(np.float64)
            q = probs[t].double().numpy()
            # float16 in the cache: about 3 significant digits
            np.testing.assert_allclose(got, q[ids], rtol=2e-3, atol=1e-6, err_msg=f"example {i} position {t}")
            assert abs(float(example.capture.covered[t]) - q[ids].sum()) < 2e-3
            kept = int(reference_sets.kept[t])
            positions += 1
            sizes.add(len(ids))
            if len(ids) == kept and (ids == reference_sets.ids[t, :kept].numpy()).all():
                continue
            # Float noise between the KV-cached batched pass and this one may reorder tokens whose
            # probabilities are within noise of each other at a set boundary; then the cached set
            # must still be a valid top-p set of the fresh probabilities, to within that noise.
            ambiguous += 1
            members, eps = q[ids], 1e-5
            assert (members[:-1] >= members[1:] - eps).all()
            outside = np.delete(q, ids)
            assert outside.max() <= members.min() + eps
            assert members[:-1].sum() < p + eps and (members.sum() >= p - eps or len(ids) == k)
    assert ambiguous <= max(2, positions // 100), (ambiguous, positions)
    assert min(sizes) < 8 and max(sizes) == k  # small sets and sets cut by the cap both occur


def test_a_cache_from_another_tokenizer_or_p_is_refused(reference):
    """What distillation calls before using a cache: one clear line on a mismatch."""
    from bdctl.cache import check
    from bdctl.errors import UserError
    from bdctl.models import load_tokenizer, tokenizer_hash

    right = tokenizer_hash(load_tokenizer(reference.parent / "tokenizer"))
    check(reference / "cache", right, 0.8, max_k=64)
    with pytest.raises(UserError, match="made with tokenizer .* generate the cache again with this tokenizer"):
        check(reference / "cache", "0123456789abcdef", 0.8)
    with pytest.raises(UserError, match="made with top_p 0.8, the recipe asks for 0.5"):
        check(reference / "cache", right, 0.5)


# --------------------------------------------------------------------------- ranks, resume


def test_two_ranks_and_a_zero3_teacher_give_the_same_dstar_and_cache(teacher_run, tmp_path):
    """One rank, two data-parallel ranks, and a teacher partitioned over two ranks (ZeRO-3
    inference) produce the same samples and sets: the batches and the seeds do not depend on the
    ranks. Under ZeRO-3 a rank without a batch (336 prompts make 7 batches) idles in step."""
    small = [
        "--set",
        "stages.generate.n_samples=1",
        "--set",
        "stages.generate.max_new_tokens=8",
        "--set",
        "stages.generate.batch_size=48",
    ]
    stages = {}
    for name, extra in (
        ("one", []),
        ("two", ["--nproc", "2"]),
        ("zero", ["--nproc", "2", "--set", "stages.generate.zero_inference=true"]),
    ):  # fmt: skip
        cwd = tmp_path / name
        fresh(teacher_run, cwd)
        result = generate(cwd, *small, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        stages[name] = cwd / "runs/smoke/generate"
    assert {p.name[:5] for p in (stages["two"] / "cache").glob("*.index.json")} == {"w0000", "w0001"}
    assert (stages["two"] / "dstar.jsonl").read_bytes() == (stages["one"] / "dstar.jsonl").read_bytes()
    assert cache_contents(stages["two"]) == cache_contents(stages["one"])
    # ZeRO-3 computes the linear layers its own way (a matmul, then the bias), so the teacher's
    # probabilities may differ from the plain model's in the last bits: the same samples, and
    # the same sets up to that noise.
    assert (stages["zero"] / "dstar.jsonl").read_bytes() == (stages["one"] / "dstar.jsonl").read_bytes()
    assert_caches_agree(stages["zero"], stages["one"])


def assert_caches_agree(a: Path, b: Path) -> None:
    """Same sequences; the same sets with probabilities within float16 noise, except at a rare
    position where two tokens within noise of each other sit at a set boundary."""
    from bdctl.cache import TeacherCache

    positions = differing = 0
    for x, y in zip(TeacherCache(a / "cache"), TeacherCache(b / "cache"), strict=True):
        assert (x.prompt_id, x.sample_index, x.seed, x.finish_reason) == (
            y.prompt_id,
            y.sample_index,
            y.seed,
            y.finish_reason,
        )
        assert (x.tokens == y.tokens).all()
        ox, oy = x.capture.offsets(), y.capture.offsets()
        for t in range(len(x)):
            positions += 1
            ids_x, ids_y = x.capture.ids[ox[t] : ox[t + 1]], y.capture.ids[oy[t] : oy[t + 1]]
            if len(ids_x) != len(ids_y) or (ids_x != ids_y).any():
                differing += 1
                continue
            px, py = x.capture.probs[ox[t] : ox[t + 1]], y.capture.probs[oy[t] : oy[t + 1]]
            np.testing.assert_allclose(px.astype(np.float32), py.astype(np.float32), rtol=2e-3, atol=1e-6)
    assert differing <= max(2, positions // 200), (differing, positions)


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bdctl", "generate", SMOKE, *TEACHER, *SETTINGS, *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def test_sigkill_midway_then_resume_equals_an_uninterrupted_run(reference, teacher_run, tmp_path):
    from bdctl.cache import visible_shards

    fresh(teacher_run, tmp_path)
    stage = tmp_path / "runs/smoke/generate"
    total = len(list((reference / "cache").glob("*.index.json")))
    process = start(tmp_path)
    deadline = time.time() + 120
    while len(visible_shards(stage / "cache")) < 6:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no shards appeared in time"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up
    process.wait()
    left = len(visible_shards(stage / "cache"))
    assert 6 <= left < total and not (stage / "MANIFEST.json").exists() and not (stage / "dstar.jsonl").exists()

    result = generate(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming runs/smoke/generate: " in result.stderr and "sequences already in the cache" in result.stderr
    assert (stage / "dstar.jsonl").read_bytes() == (reference / "dstar.jsonl").read_bytes()
    assert cache_contents(stage) == cache_contents(reference)
    starts = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["already_done"] for m in starts if m["event"] == "start"][-1] >= 6 * 16


@pytest.mark.slow
def test_sigterm_stops_with_75_and_a_message_then_resumes(reference, teacher_run, tmp_path):
    """One rank runs in the bdctl process itself: SIGTERM must not kill it outright (-15, no word)."""
    from bdctl.cache import visible_shards

    fresh(teacher_run, tmp_path)
    stage = tmp_path / "runs/smoke/generate"
    process = start(tmp_path)
    deadline = time.time() + 120
    while len(visible_shards(stage / "cache")) < 2:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no shards appeared in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # as a scheduler would
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: preempted after ") and "run the same command again" in lines[-1], lines[-3:]
    assert "Traceback" not in stderr and not (stage / "MANIFEST.json").exists()

    result = generate(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming runs/smoke/generate: " in result.stderr
    assert cache_contents(stage) == cache_contents(reference)
    assert not (stage / "PREEMPT").exists()


# --------------------------------------------------------------------------- scoring


def test_score_train_caches_the_golden_responses(teacher_run, tmp_path):
    from bdctl.cache import TeacherCache
    from bdctl.data.batching import tokenize_examples
    from bdctl.models import load_tokenizer

    run = fresh(teacher_run, tmp_path)
    result = run_cli("generate", SMOKE, *TEACHER, "--score", "train", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stage = run / "score_train"
    rows = [json.loads(line) for line in (run / "data/train.jsonl").read_text().splitlines()]
    golden = {r["id"]: e for r, e in zip(rows, tokenize_examples(rows, load_tokenizer(run / "tokenizer")), strict=True)}
    cache = TeacherCache(stage / "cache")
    assert len(cache) == len(rows) and cache.manifest["extra"]["mode"] == "score"
    for example in cache:
        assert example.sample_index == 0 and example.finish_reason == "eos"
        expected = golden[example.prompt_id]
        assert example.tokens.tolist() == expected.ids[expected.prompt_len :]  # answer + EOS, as training sees it
    assert not (stage / "dstar.jsonl").exists() and (stage / "sparsity.png").is_file()
    assert json.loads((stage / "MANIFEST.json").read_text())["mode"] == "score"


# --------------------------------------------------------------------------- bad input


def test_help_shows_an_example(tmp_path):
    result = run_cli("generate", "--help", cwd=tmp_path)
    assert (
        result.returncode == 0 and "bdctl generate recipes/smoke.yaml" in result.stdout and "--score" in result.stdout
    )


def test_unfinished_teacher(teacher_run, tmp_path):
    run = fresh(teacher_run, tmp_path)
    (run / "teacher_sft/MANIFEST.json").unlink()
    result = generate(tmp_path)
    assert_user_error(
        result, "teacher_sft: that stage of runs/smoke has not finished; run it first:", "--model teacher"
    )
    assert not (tmp_path / "runs/smoke/generate").exists()


def test_bad_input(teacher_run, tmp_path):
    from bdctl.models import build_tiny_model, train_tokenizer
    from bdctl.recipe.schema import TinyModel, TokenizerTraining

    run = fresh(teacher_run, tmp_path)
    # a teacher that speaks another vocabulary
    other = train_tokenizer(["completely different text"] * 20, TokenizerTraining(vocab_size=280), tmp_path / "t")
    build_tiny_model(TinyModel(arch="gpt2", layers=1, hidden=16, heads=2), other, seed=0).save_pretrained(
        tmp_path / "other"
    )
    other.save_pretrained(tmp_path / "other")
    result = generate(tmp_path, "--set", f"stages.generate.model={tmp_path / 'other'}")
    assert_user_error(result, f"teacher model {tmp_path / 'other'}: its tokenizer differs from the shared one")

    # the teacher's export went missing after its stage finished
    shutil.move(run / "teacher_sft/export", tmp_path / "export")
    assert_user_error(generate(tmp_path), "the teacher export is missing")
    shutil.move(tmp_path / "export", run / "teacher_sft/export")

    # a damaged prompt file
    train = run / "data/train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:5] + ['{"id": 3, "prompt": "trunc'] + lines[6:]) + "\n")
    assert_user_error(generate(tmp_path), "runs/smoke/data/train.jsonl:6: unreadable prompt file")
    assert not (run / "generate").exists()


def test_an_unfinished_run_with_other_settings_is_not_continued(reference, teacher_run, tmp_path):
    run = fresh(teacher_run, tmp_path)
    shutil.copytree(reference, run / "generate")
    (run / "generate/MANIFEST.json").unlink()  # as if killed before the end
    changed = generate(tmp_path, "--set", "stages.generate.cache_top_p=0.5")
    assert_user_error(
        changed,
        "an unfinished run made with other settings (stages.generate.cache_top_p: 0.8 -> 0.5) is there; pass --force",
    )
    assert len(list((run / "generate/cache").glob("*.index.json"))) > 0  # nothing was deleted
    # a result-neutral setting (the sparsity report's size) is no reason to start over: it resumes
    shorter = generate(tmp_path, "--set", "stages.generate.report_examples=16")
    assert shorter.returncode == 0, shorter.stderr[-3000:]
    assert "sequences already in the cache" in shorter.stderr
    assert cache_contents(run / "generate") == cache_contents(reference)


def test_a_retrained_teacher_makes_a_finished_generate_stale(reference, teacher_run, tmp_path):
    """Issue 23: generate kept D* of the old teacher after `bdctl sft --model teacher --force`."""
    run = fresh(teacher_run, tmp_path)
    shutil.copytree(reference, run / "generate")
    again = generate(tmp_path)
    assert again.returncode == 0 and "already complete" in again.stderr
    retrain = run_cli(
        "sft", SMOKE, "--model", "teacher", *TEACHER, "--set", "stages.teacher_sft.max_steps=1", "--force", cwd=tmp_path
    )
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    stale = generate(tmp_path)
    assert_user_error(
        stale,
        "runs/smoke/generate is finished but was made from something else: teacher_sft was retrained after "
        "generate; pass --force to redo it (its old result is replaced), or use another name / run_dir to keep both",
    )
    assert (run / "generate/dstar.jsonl").read_bytes() == (reference / "dstar.jsonl").read_bytes()  # kept
    listed = run_cli("runs", "runs/smoke", "--json", cwd=tmp_path)
    states = {s["stage"]: s for s in json.loads(listed.stdout)[0]["stages"]}
    assert states["teacher_sft"]["state"] == "finished" and states["generate"]["state"] == "stale"
    assert states["generate"]["detail"].startswith("teacher_sft was retrained after generate")
