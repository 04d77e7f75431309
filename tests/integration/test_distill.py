"""`bdctl distill`: the loss heads against their dense references, and BD / KD / SeqKD through the real CLI.

The CLI tests share one run directory (module fixture): a briefly trained teacher and phase-1 student, and the
two teacher caches made here directly with bdctl.sampling + bdctl.cache (not with `bdctl generate`), where the
generate stage puts them: runs/smoke/generate/cache (D*) and runs/smoke/score_train/cache (the golden
responses scored). Each test copies it.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import assert_user_error, run_cli, write_recipe

P, MAX_K = 0.8, 16  # the caches' top-p and cap (a small cap keeps the near-uniform tiny teacher's sets cheap)
STEPS = 2
DISTILL = {
    "stages__generate__cache_max_k": MAX_K,
    "data__split__valid": 8,  # validation runs twice per stage: keep it short
    "stages__teacher_sft__max_steps": 6,
    "stages__student_sft__max_steps": 3,
    "stages__distill__batch_size": 8,
    "stages__distill__micro_batch_size": 2,
    "stages__distill__max_steps": STEPS,
    "stages__distill__lr": 1.0e-4,
}


# --------------------------------------------------------------------------- loss heads (fast)


def test_batches_align_the_response_frame_with_the_model():
    """Through collate + the stage's BD head, the loss is dense_loss of the logits at len(x) + t - 1
    (docs/method.md §2), computed here one example at a time; the count is the kept transitions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bdctl.distill_data import Setup, batch_count, collate_examples
    from bdctl.objectives.bellman import candidate_mask, dense_loss
    from bdctl.recipe.schema import DistillStage
    from bdctl.stages.distill import bd_terms
    from bdctl.topp import Capture

    torch.manual_seed(0)
    vocab, eos, pad = 40, 0, 1
    model = (
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32)).eval().double()
    )
    rng = np.random.default_rng(0)
    examples = []
    for prompt_len, length, ends in ((5, 4, True), (3, 6, False), (7, 2, True)):
        response = rng.integers(2, vocab, size=length)
        if ends:
            response[-1] = eos
        kept = rng.integers(1, 5, size=length)
        sets = [rng.choice(vocab, size=k, replace=False) for k in kept]
        sets[0] = np.array([response[0], *[v for v in sets[0] if v != response[0]]][: kept[0]])  # a_0 in A_0
        ids = np.concatenate(sets)
        capture = Capture(
            ids=ids.astype(np.int32),
            probs=np.ones(len(ids), np.float32),
            kept=kept,
            covered=np.ones(length, np.float32),
        )
        examples.append((rng.integers(2, vocab, size=prompt_len).tolist(), response.astype(np.int64), capture))
    batch = collate_examples(examples, pad, eos, with_sets=True)
    config = DistillStage(gamma=0.95, alpha=0.2, q_min=-4.0)
    with torch.no_grad():
        hidden = model.transformer(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        lean = bd_terms(hidden, model.lm_head.weight, batch, config)
        # the reference: each example alone, logits read at position len(prompt) + t - 1
        frame = max(len(r) for _, r, _ in examples)
        logits = torch.zeros(len(examples), frame, vocab, dtype=torch.float64)
        for b, (prompt, response, _) in enumerate(examples):
            out = model(torch.tensor([prompt + response.tolist()])).logits[0]
            logits[b, : len(response)] = out[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        mask = candidate_mask(batch["cand_ids"], batch["cand_mask"], (len(examples), frame), vocab)
        reference = dense_loss(
            logits, mask, batch["actions"], batch["valid"], batch["terminal"], gamma=0.95, alpha=0.2, q_min=-4.0
        )
    assert lean.loss.item() == pytest.approx(reference.item(), rel=1e-9)
    setup = Setup("bd", "paper", 0.0, "cache", None, False, False, "student_sft")
    assert batch_count(batch, setup) == lean.num_transitions == 4 + 5 + 2  # the truncated response loses its last


# --------------------------------------------------------------------------- the CLI (slow)


def make_caches(run, recipe_seed: int) -> None:
    """D* for 32 prompts x 2 samples and the golden training responses scored, from the teacher export."""
    from transformers import AutoModelForCausalLM

    from bdctl.cache import CacheWriter, finalize
    from bdctl.data.batching import tokenize_examples
    from bdctl.data.prepare import read_split
    from bdctl.models import load_tokenizer, tokenizer_hash
    from bdctl.rundir import mark_complete
    from bdctl.sampling import sample, score

    tokenizer = load_tokenizer(run / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(run / "teacher_sft/export").eval()
    rows = read_split(run / "data", "train")
    digest = tokenizer_hash(tokenizer)
    prompts = tokenizer([r["prompt"] for r in rows[:32]])["input_ids"]
    with CacheWriter(run / "generate/cache", 0, top_p=P, max_k=MAX_K) as out:
        for sample_index in range(2):
            for start in range(0, len(prompts), 16):
                chosen = range(start, start + 16)
                samples = sample(
                    teacher, [prompts[i] for i in chosen], [recipe_seed * 1000 + 10 * i + sample_index for i in chosen],
                    eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=20,
                    capture_top_p=P, capture_max_k=MAX_K,
                )  # fmt: skip
                for i, found in zip(chosen, samples, strict=True):
                    out.add_sample(rows[i]["id"], sample_index, found)
                out.flush()
    finalize(
        run / "generate/cache",
        teacher="teacher_sft",
        tokenizer_hash=digest,
        top_p=P,
        max_k=MAX_K,
        vocab_size=len(tokenizer),
    )
    mark_complete(run / "generate", stage="generate")

    examples = tokenize_examples(rows, tokenizer)
    captures = score(
        teacher, [e.ids[: e.prompt_len] for e in examples], [e.ids[e.prompt_len :] for e in examples],
        pad_id=tokenizer.pad_token_id, top_p=P, max_k=MAX_K, batch_size=32,
    )  # fmt: skip
    with CacheWriter(run / "score_train/cache", 0, top_p=P, max_k=MAX_K) as out:
        for row, example, capture in zip(rows, examples, captures, strict=True):
            tokens = example.ids[example.prompt_len :]
            out.add(prompt_id=row["id"], sample_index=0, seed=0, tokens=tokens, finish_reason="eos", capture=capture)
    finalize(
        run / "score_train/cache",
        teacher="teacher_sft",
        tokenizer_hash=digest,
        top_p=P,
        max_k=MAX_K,
        vocab_size=len(tokenizer),
    )
    mark_complete(run / "score_train", stage="score_train")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory with teacher and phase-1 student exports and both caches (about 40 s)."""
    root = tmp_path_factory.mktemp("distill")
    recipe = write_recipe(root / "smoke.yaml", **DISTILL)
    for role in ("teacher", "student"):
        result = run_cli("sft", str(recipe), "--model", role, cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not (root / f"runs/smoke/{role}_sft/checkpoints").exists()  # dropped once finished: copies stay small
    make_caches(root / "runs/smoke", recipe_seed=7)
    return root


def copy_of(prepared, tmp_path):
    shutil.copytree(prepared / "runs", tmp_path / "runs")
    shutil.copy(prepared / "smoke.yaml", tmp_path / "smoke.yaml")
    return str(tmp_path / "smoke.yaml")


def distill(recipe, method, cwd, *args):
    result = run_cli("distill", recipe, "--method", method, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    stage = cwd / "runs/smoke/distill" / method
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return result, stage, records


def trains(records):
    return [r for r in records if r["event"] == "train"]


def assert_diagnostics(records):
    """Every distill method logs bdctl.diagnostics at each validation, on the same D* sample."""
    from bdctl.diagnostics import DIAGNOSTICS

    assert any("diagnostics on A_t (top-p 0.8): the first 64 responses of D*" in n for n in records[0]["notes"])
    evals = [r for r in records if r["event"] == "eval"]
    assert evals
    for record in evals:
        for key in ("diag_mass_on_set", "diag_argmax_in_set", "diag_outside_share"):
            assert 0 <= record[key] <= 1, (key, record)
        assert record["diag_dstar_nll"] > 0 and record["diag_mean_v"] <= math.log(MAX_K) + 1e-9  # <= log |A_t|
        assert all(math.isfinite(record[key]) for key in DIAGNOSTICS)
    # the outside share is a property of the sample, the same at every validation
    assert len({round(r["diag_outside_share"], 9) for r in evals}) == 1
    return evals


def assert_loadable(export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer("### Instruction:\nWhat is two plus two?\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert json.loads((export / "MANIFEST.json").read_text())["complete"]


ROUGE_SELECTION = ("--set", "stages.distill.select=rouge_l")
BD_KEYS = ("mean_r", "mean_v", "mean_q_candidates", "chi2", "outside_share", "mean_set_size", "pt_loss", "method_loss")


@pytest.fixture(scope="module")
def bd_one_rank(prepared, tmp_path_factory):
    """BD (paper variant, sets from the cache, pretraining term on by default, checkpoint chosen by
    validation Rouge-L as in the paper) on one rank."""
    cwd = tmp_path_factory.mktemp("bd1")
    recipe = copy_of(prepared, cwd)
    result, stage, records = distill(recipe, "bd", cwd, *ROUGE_SELECTION)
    return cwd, result, stage, records


@pytest.mark.slow
def test_bd_one_rank_end_to_end(bd_one_rank):
    cwd, result, stage, records = bd_one_rank
    assert "bd (paper variant, chunked lean form) on D*" in result.stderr and "pretraining term on" in result.stderr
    start = records[0]
    assert start["setup"]["init"] == "student_sft" and start["setup"]["pretrain"] and start["train"] == 64
    steps = trains(records)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for record in steps:
        for key in ("loss", *BD_KEYS):
            assert math.isfinite(record[key]), (key, record)
        assert 0 <= record["outside_share"] <= 1 and 1 <= record["mean_set_size"] <= MAX_K
        assert record["loss"] == pytest.approx(record["method_loss"] + record["pt_loss"])  # lm_coef = 1
        assert record["tokens"] > 0  # kept transitions of the global batch
    assert "highest Rouge-L of sampled answers" in result.stderr
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, STEPS]
    assert all(0 <= e["rouge_l"] <= 100 and math.isfinite(e["val_loss"]) for e in evals)
    assert_diagnostics(records)
    done = json.loads((stage / "MANIFEST.json").read_text())
    best = max(evals, key=lambda e: (e["rouge_l"], -e["step"]))  # the first of equal scores is kept
    assert done["select"] == "rouge_l" and done["best_score"] == best["rouge_l"] and done["best_step"] == best["step"]
    assert json.loads((stage / "export/MANIFEST.json").read_text())["step"] == best["step"]
    assert_loadable(stage / "export")
    assert (cwd / "runs/smoke/pretrain/MANIFEST.json").is_file()


@pytest.mark.slow
def test_bd_two_ranks_give_the_one_rank_losses(bd_one_rank, prepared, tmp_path):
    recipe = copy_of(prepared, tmp_path)
    keep = ("--set", "stages.distill.keep_checkpoints_after_finish=true")  # inspected below
    _, stage, records = distill(recipe, "bd", tmp_path, "--nproc", "2", *ROUGE_SELECTION, *keep)
    assert records[0]["world_size"] == 2
    checkpoint = next(p for p in (stage / "checkpoints").iterdir() if p.is_dir())
    assert len(list(checkpoint.glob("zero_pp_rank_*_model_states.pt"))) == 2
    one, two = trains(bd_one_rank[3]), trains(records)
    for key in ("loss", *BD_KEYS):  # the pretraining blocks too are the same whatever the ranks
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    # Rouge-L validation: each prompt is sampled with its own seed in the same batch on any number
    # of ranks, by the ZeRO-3 engine kept in step across ranks, so the scores agree
    evals_one = [r["rouge_l"] for r in bd_one_rank[3] if r["event"] == "eval"]
    evals_two = [r["rouge_l"] for r in records if r["event"] == "eval"]
    assert evals_two == pytest.approx(evals_one, abs=1e-3)
    for one, two in zip(assert_diagnostics(bd_one_rank[3]), assert_diagnostics(records), strict=True):
        for key in ("diag_mass_on_set", "diag_argmax_in_set", "diag_dstar_nll", "diag_mean_v"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key  # the sample split over 2 ranks
    assert_loadable(stage / "export")


@pytest.mark.slow
def test_bd_with_a_live_teacher_equals_bd_from_the_cache(bd_one_rank, prepared, tmp_path):
    """The live teacher's sets are the cached ones (same rule and cap), so the losses agree."""
    recipe = copy_of(prepared, tmp_path)
    result, _, records = distill(recipe, "bd", tmp_path, "--set", "stages.distill.teacher_source=live")
    assert "the live teacher's top-p sets" in result.stderr
    one, live = trains(bd_one_rank[3]), trains(records)
    for key in ("loss", *BD_KEYS):
        assert [r[key] for r in live] == pytest.approx([r[key] for r in one], rel=1e-4), key


@pytest.mark.slow
def test_bd_from_a_format_1_cache_gives_the_same_losses(bd_one_rank, prepared, tmp_path):
    """A D* cache in format 1 (as bdctl wrote before format 2, by its format-1 writer) still distills; BD
    reads only the sets' members, which both formats keep exactly, so the losses are the format-2 run's."""
    from bdctl.cache import CacheWriter, TeacherCache, finalize

    recipe = copy_of(prepared, tmp_path)
    cache_dir = tmp_path / "runs/smoke/generate/cache"
    current = TeacherCache(cache_dir)
    assert current.manifest["format"] == 2
    with CacheWriter(tmp_path / "v1", 0, top_p=current.top_p, max_k=current.max_k, format=1) as out:
        for e in current:
            out.add(
                prompt_id=e.prompt_id, sample_index=e.sample_index, seed=e.seed, tokens=e.tokens,
                finish_reason=e.finish_reason, capture=e.capture,
            )  # fmt: skip
    keep = ("teacher", "tokenizer_hash", "top_p", "max_k", "vocab_size")
    finalize(tmp_path / "v1", **{key: current.manifest[key] for key in keep})
    shutil.rmtree(cache_dir)
    (tmp_path / "v1").rename(cache_dir)
    assert TeacherCache(cache_dir).manifest["format"] == 1
    _, _, records = distill(recipe, "bd", tmp_path)
    one, old = trains(bd_one_rank[3]), trains(records)
    for key in ("loss", *BD_KEYS):
        assert [r[key] for r in old] == pytest.approx([r[key] for r in one], rel=1e-6), key


@pytest.mark.slow
def test_bd_released_variant_with_a_live_teacher_resumes_exactly(prepared, tmp_path):
    """The released variant with the live teacher and teacher KD in the LM term; then drop the last
    checkpoint and the finish of the 4-step run: the rerun resumes at step 2 and repeats steps 3 and
    4 exactly (D* batches, the teacher's sets, pretraining blocks, Rouge-L selection state)."""
    recipe = copy_of(prepared, tmp_path)
    settings = (
        "--set", "stages.distill.variant=released", "--set", "stages.distill.teacher_source=live",
        "--set", "stages.distill.pt_kd_ratio=0.5", "--set", "stages.distill.lm_coef=0.5",
        "--set", "stages.distill.max_steps=4", "--set", "stages.distill.checkpoint_every=2",
        "--set", "stages.distill.eval_every=3", *ROUGE_SELECTION,
        "--set", "stages.distill.keep_checkpoints_after_finish=true",  # step 2's checkpoint is resumed from below
    )  # fmt: skip
    result, stage, records = distill(recipe, "bd", tmp_path, *settings)
    assert "bd (released variant, chunked lean form)" in result.stderr and "mixed with 0.5 exact KD" in result.stderr
    for record in trains(records):
        assert all(math.isfinite(record[k]) for k in ("loss", *BD_KEYS))
        assert record["loss"] == pytest.approx(record["method_loss"] + 0.5 * record["pt_loss"])
    assert_loadable(stage / "export")
    reference = {r["step"]: r for r in trains(records)}
    reference_evals = {e["step"]: e["rouge_l"] for e in records if e["event"] == "eval"}
    assert sorted(reference) == [1, 2, 3, 4]

    shutil.rmtree(stage / "checkpoints/step4")
    (stage / "MANIFEST.json").unlink()
    result, _, records = distill(recipe, "bd", tmp_path, *settings)
    assert "resuming" in result.stderr and "step2" in result.stderr
    resumed = {r["step"]: r for r in trains(records)}
    assert sorted(resumed) == [1, 2, 3, 4]  # metrics.jsonl was cut back to the checkpoint, then continued
    for step in (3, 4):
        for key in ("loss", "pt_loss", "mean_r", "mean_set_size"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), (step, key)
    evals = {e["step"]: e["rouge_l"] for e in records if e["event"] == "eval"}
    # validated every 3 steps and after the last one; the resumed run repeats both exactly
    assert sorted(evals) == sorted(reference_evals) == [0, 3, 4]
    assert evals[3] == pytest.approx(reference_evals[3], abs=1e-6) and evals[4] == pytest.approx(
        reference_evals[4], abs=1e-6
    )
    done = json.loads((stage / "MANIFEST.json").read_text())
    assert done["steps"] == 4 and done["best_score"] == pytest.approx(max(reference_evals.values()), abs=1e-6)


@pytest.mark.slow
def test_kd_from_the_cache_and_from_a_live_teacher(prepared, tmp_path):
    recipe = copy_of(prepared, tmp_path)
    cached, stage, records = distill(recipe, "kd", tmp_path)
    assert "an approximation of exact KD" in cached.stderr
    assert records[0]["setup"]["init"] == "base" and not records[0]["setup"]["pretrain"]
    assert records[0]["train"] == json.loads((tmp_path / "runs/smoke/data/split.json").read_text())["train"]
    sparse = trains(records)
    assert all(math.isfinite(r["kd"]) and r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"]) for r in sparse)
    assert_diagnostics(records)
    assert_loadable(stage / "export")

    live, _, records = distill(recipe, "kd", tmp_path, "--force", "--set", "stages.distill.teacher_source=live")
    assert "from the live teacher: exact KD" in live.stderr
    exact = trains(records)
    assert exact[0]["ce"] == pytest.approx(sparse[0]["ce"], rel=1e-6)  # same student, same batch
    # the cache keeps at most 16 tokens of a near-uniform teacher: the renormalised sets are another target
    assert math.isfinite(exact[0]["kd"]) and exact[0]["kd"] != pytest.approx(sparse[0]["kd"], rel=1e-6)


@pytest.mark.slow
def test_seqkd_on_dstar(prepared, tmp_path):
    recipe = copy_of(prepared, tmp_path)
    result, stage, records = distill(recipe, "seqkd", tmp_path, "--set", "stages.distill.seqkd_kd_ratio=0.5")
    assert "seqkd on D*: (1 - 0.5) CE + 0.5 KD" in result.stderr
    assert records[0]["train"] == 64
    assert all(math.isfinite(r["ce"]) and math.isfinite(r["kd"]) for r in trains(records))
    assert_diagnostics(records)
    assert_loadable(stage / "export")


LORA = "models.student.lora={r: 2, alpha: 4, target_modules: [c_attn, c_proj]}"


def assert_low_rank_update(export, base, rank: int, adapted: tuple[str, ...]) -> None:
    """Only the adapted layers changed, each by a matrix of rank <= r (the merged B @ A); the rest
    of the exported student is its starting weights exactly."""
    from safetensors.torch import load_file

    after, before = load_file(str(export / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert after.keys() == before.keys()
    trained = json.loads((export / "MANIFEST.json").read_text())["step"] > 0  # step 0 may score best
    changed = 0
    for name, weight in after.items():
        delta = (weight - before[name]).double()
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in adapted:
            assert torch.linalg.matrix_rank(delta).item() <= rank, name
            changed += int(bool(delta.abs().max() > 0))
        else:
            assert torch.equal(weight, before[name]), name
    assert bool(changed) == trained


@pytest.mark.slow
def test_bd_with_a_lora_student_on_two_ranks(prepared, tmp_path):
    recipe = copy_of(prepared, tmp_path)
    _, stage, records = distill(recipe, "bd", tmp_path, "--nproc", "2", "--set", LORA)
    assert all(math.isfinite(r["loss"]) for r in trains(records)) and len(trains(records)) == STEPS
    assert_loadable(stage / "export")
    assert_low_rank_update(stage / "export", tmp_path / "runs/smoke/student_sft/export", 2, ("c_attn", "c_proj"))
    card = (stage / "export/README.md").read_text()
    assert "| LoRA | r 2, alpha 4, dropout 0, target modules c_attn, c_proj;" in card


# --------------------------------------------------------------------------- bad input: one line, exit 2


def submit_error(recipe, method, *overrides) -> str:
    """The one-line error of a job that fails before launching (in-process: no interpreter start-up)."""
    from bdctl.errors import UserError
    from bdctl.launch import LaunchOptions
    from bdctl.submit import submit

    with pytest.raises(UserError) as caught:
        submit("distill", recipe, list(overrides), {"method": method}, LaunchOptions(), log=lambda message: None)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.slow  # runs `bdctl distill` in a subprocess
def test_p_and_alpha_out_of_range(tmp_path, monkeypatch):
    result = run_cli("distill", "smoke", "--method", "bd", "--set", "stages.distill.p=1.5", cwd=tmp_path)
    assert_user_error(result, "stages.distill.p: input should be less than or equal to 1, got 1.5")
    monkeypatch.chdir(tmp_path)
    assert "stages.distill.p: input should be greater than 0, got 0" in submit_error(
        "smoke", "bd", "stages.distill.p=0"
    )
    assert "stages.distill.alpha: input should be greater than 0, got 0" in submit_error(
        "smoke", "bd", "stages.distill.alpha=0"
    )
    assert "stages.distill.alpha: input should be greater than 0" in submit_error(
        "smoke", "bd", "stages.distill.alpha=-1"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # runs `bdctl distill` in a subprocess
def test_missing_inputs_name_the_command_to_run(tmp_path, monkeypatch):
    recipe = str(write_recipe(tmp_path / "smoke.yaml", **DISTILL))
    result = run_cli("distill", recipe, "--method", "bd", cwd=tmp_path)
    assert_user_error(result, "starts from the phase-1 student", f"run it first: bdctl sft {recipe} --model student")
    monkeypatch.chdir(tmp_path)
    assert (
        f"needs the teacher data D* (runs/smoke/generate has not finished); run it first: bdctl generate {recipe}"
        in submit_error(recipe, "seqkd")
    )
    assert f"run it first: bdctl generate {recipe} --score train" in submit_error(recipe, "kd")
    assert f"run it first: bdctl sft {recipe} --model teacher" in submit_error(
        recipe, "kd", "stages.distill.teacher_source=live"
    )  # the live teacher is the teacher SFT export
    assert "no data.pretrain corpus" in submit_error(
        recipe, "seqkd", "stages.distill.pretrain_term=true", "data.pretrain=null"
    )
    assert not (tmp_path / "runs/smoke/distill").exists()


@pytest.mark.slow
def test_cache_from_another_tokenizer_or_p(prepared, tmp_path, monkeypatch):
    recipe = copy_of(prepared, tmp_path)
    monkeypatch.chdir(tmp_path)
    # a cache holds the sets of every p up to its own (prefixes), not above
    wanted = "holds the teacher's top-p sets for p up to 0.8, stages.distill.p is 0.9"
    assert wanted in submit_error(recipe, "bd", "stages.distill.p=0.9")
    assert wanted in submit_error(recipe, "bd", "stages.distill.p=0.9", "stages.distill.variant=released")
    path = tmp_path / "runs/smoke/generate/cache/MANIFEST.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "tokenizer_hash": "0123456789abcdef"}))
    result = run_cli("distill", recipe, "--method", "bd", cwd=tmp_path)
    assert_user_error(result, "made with tokenizer 0123456789abcdef", "generate the cache again")
    assert not (tmp_path / "runs/smoke/distill").exists()


@pytest.mark.slow
def test_bd_on_the_nucleus_dstar_with_drop_anchor_and_a_best_export_per_protocol(prepared, tmp_path):
    """Issue 11 through the real CLI: `generate --variant nucleus` samples D* inside the cached
    top-p sets (generate.top_p == cache_top_p), so BD on it logs outside_share exactly 0; the anchor
    is labelled beyond the paper in the header and the manifest; Rouge-L selection validates under
    both protocols and keeps one export per protocol, which eval then uses for that protocol."""
    recipe = copy_of(prepared, tmp_path)
    study = [
        "--set", "stages.generate.variants={nucleus: {top_p: 0.8, n_samples: 1}}",
        "--set", f"stages.generate.cache_max_k={MAX_K}", "--set", "stages.generate.max_new_tokens=20",
        "--set", "stages.eval.protocols=[{name: minillm}, {name: release, top_p: 0.8}]",
        "--set", "stages.eval.max_new_tokens=16", "--set", "stages.eval.seeds=[10]",
    ]  # fmt: skip
    made = run_cli("generate", recipe, "--variant", "nucleus", *study, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    cache_manifest = json.loads((tmp_path / "runs/smoke/generate-nucleus/cache/MANIFEST.json").read_text())
    assert cache_manifest["extra"]["sample_top_p"] == 0.8 and cache_manifest["top_p"] == 0.8
    settings = [
        "--set", "stages.distill.dstar=generate-nucleus", "--set", "stages.distill.outside=drop",
        "--set", "stages.distill.anchor_coef=0.5", "--set", "stages.distill.select_each_protocol=true",
    ]  # fmt: skip
    result, stage, records = distill(recipe, "bd", tmp_path, *ROUGE_SELECTION, *study, *settings)
    assert "on D* (generate-nucleus)" in result.stderr
    assert "BEYOND THE PAPER: anchor + 0.5 x cross-entropy" in result.stderr
    steps = trains(records)
    assert steps and all(r["outside_share"] == 0.0 for r in steps)
    assert all(r["method_loss"] == pytest.approx(r["bd_loss"] + 0.5 * r["anchor_ce"], rel=1e-5) for r in steps)
    evals = [r for r in records if r["event"] == "eval"]
    assert all(e["rouge_l"] == e["rouge_l@minillm"] and "rouge_l@release" in e for e in evals)
    done = json.loads((stage / "MANIFEST.json").read_text())
    assert any("BEYOND THE PAPER" in line for line in done["notes"])
    assert done["select_protocol"]["name"] == "minillm"
    release = done["best_per_protocol"]["release"]
    best = max(evals, key=lambda e: (e["rouge_l@release"], -e["step"]))
    assert (release["best_step"], release["best_score"]) == (best["step"], best["rouge_l@release"])
    assert json.loads((stage / "export-release/MANIFEST.json").read_text())["step"] == best["step"]
    assert_loadable(stage / "export-release")

    evaluated = run_cli("eval", recipe, "--model", "distill/bd", *study, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    eval_dir = tmp_path / "runs/smoke/eval/generations/distill-bd"
    weights = {
        p: json.loads((eval_dir / p / "dolly/seed10.done.json").read_text())["weights"] for p in ("minillm", "release")
    }
    assert weights["minillm"].endswith("distill/bd/export") and weights["release"].endswith("distill/bd/export-release")


@pytest.mark.slow
def test_divergence_methods_from_the_cache_and_from_a_live_teacher(prepared, tmp_path):
    """The divergence menu (beyond the paper) through the real CLI: jsd from the score_train cache on the
    golden responses (coarse-grained), then skew_rkl from the live teacher on D* (dense, temperature 2)."""
    recipe = copy_of(prepared, tmp_path)
    result, stage, records = distill(recipe, "jsd", tmp_path, "--set", "stages.distill.divergence.jsd_beta=0.3")
    assert "BEYOND THE PAPER: jsd (beta = 0.3) at temperature 1 on the golden training responses" in result.stderr
    assert "coarse-grained to A_t plus one tail bucket" in result.stderr
    assert records[0]["train"] == json.loads((tmp_path / "runs/smoke/data/split.json").read_text())["train"]
    steps = trains(records)
    # JSD(beta) lies in [0, log 2] whatever the pair; the loss is the divergence alone
    assert steps and all(0 < r["jsd"] < math.log(2) and r["loss"] == pytest.approx(r["jsd"]) for r in steps)
    assert_loadable(stage / "export")
    card = (stage / "export/README.md").read_text()
    assert "beyond the paper" in card and "divergence.jsd_beta" in card

    live = ["--set", "stages.distill.teacher_source=live", "--set", "stages.distill.divergence.data=dstar",
            "--set", "stages.distill.divergence.temperature=2"]  # fmt: skip
    result, stage, records = distill(recipe, "skew_rkl", tmp_path, *live)
    assert "skew_rkl (a = 0.1) at temperature 2 on D*; live teacher: exact" in result.stderr
    assert records[0]["train"] == 64  # D*: 32 prompts x 2 samples
    assert all(math.isfinite(r["skew_rkl"]) and r["skew_rkl"] > 0 for r in trains(records))
    assert (stage / "export/MANIFEST.json").is_file()
