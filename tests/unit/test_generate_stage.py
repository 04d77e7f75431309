"""The generate stage's pieces without the CLI: seeds, the global batch plan, truncation to a
prompt's own limit, the prompt-file checks, the sparsity report, and the ZeRO-3 lockstep
protocol (ranks must run the same forward passes and collectives)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bdctl.errors import UserError
from bdctl.report_sparsity import sparsity_stats, top_k_curve, top_p_sizes, write_report
from bdctl.sampling import Lockstep, sample
from bdctl.stages.generate import Item, _truncate, generate_batch, plan_batches, read_rows, sample_seed
from bdctl.topp import Capture, top_p_set
from tests.unit.test_sampling import PAD, build_model, make_prompts


@pytest.fixture(scope="module")
def gpt2():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_model("gpt2")
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- seeds and batches


def test_sample_seeds_are_deterministic_distinct_and_fit_int64():
    seeds = {sample_seed(7, prompt, index) for prompt in range(200) for index in range(8)}
    assert len(seeds) == 1600 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(7, 3, 1) == sample_seed(7, 3, 1) != sample_seed(8, 3, 1)


def items_of(lengths: list[int], n: int, max_new: int, max_length: int) -> list[Item]:
    return [
        Item(pid, j, sample_seed(0, pid, j), [5] * length, None, min(max_new, max_length - length))
        for pid, length in enumerate(lengths)
        for j in range(n)
    ]


def test_batches_group_lengths_keep_samples_together_and_cover_every_item_once():
    lengths = [30, 12, 30, 7, 19, 12, 25, 8]
    items = items_of(lengths, n=3, max_new=8, max_length=64)
    batches = plan_batches(items, batch_size=6, positions=64)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    assert all(len(b) <= 6 for b in batches)
    firsts = [len(items[b[0]].prompt) for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first
    assert batches[0] == [0, 1, 2, 6, 7, 8]  # the two 30-token prompts, their samples side by side
    assert plan_batches(items, 6, 64) == batches  # a function of the data alone


def test_batches_are_cut_where_a_prompt_plus_the_largest_limit_would_not_fit():
    # max_new_tokens beyond max_length - prompt: each prompt's limit is what is left of max_length
    lengths = [40, 38, 20, 19, 18, 5]
    items = items_of(lengths, n=2, max_new=500, max_length=64)
    batches = plan_batches(items, batch_size=8, positions=64)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for batch in batches:
        longest = max(len(items[i].prompt) for i in batch)
        assert longest + max(items[i].limit for i in batch) <= 64
    # with a larger position table the same items need no cut
    assert [len(b) for b in plan_batches(items, batch_size=8, positions=1024)] == [8, 4]


def test_a_truncated_row_equals_sampling_it_with_its_own_limit(gpt2):
    prompts = make_prompts([6, 6, 4])
    seeds = [3, 4, 5]
    long = sample(gpt2, prompts, seeds, eos_id=None, pad_id=PAD, max_new_tokens=12, capture_top_p=0.8, capture_max_k=16)
    short = sample(gpt2, prompts, seeds, eos_id=None, pad_id=PAD, max_new_tokens=5, capture_top_p=0.8, capture_max_k=16)
    for a, b in zip(long, short, strict=True):
        tokens, reason, capture = _truncate(a, 5)
        assert tokens == b.tokens and reason == b.finish_reason == "length"
        for name in ("ids", "probs", "kept", "covered"):
            np.testing.assert_array_equal(getattr(capture, name), getattr(b.capture, name))
        assert _truncate(a, 12)[0] == a.tokens  # within its limit: untouched


# --------------------------------------------------------------------------- the prompt file


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"id": 1, "prompt": "a"}\n{"id": 2, "prom', "train.jsonl:2: unreadable prompt file"),
        (b"\xff\xfe\x00\x00garbage\n", "train.jsonl: unreadable prompt file"),
        (b'{"id": 1}\n', "train.jsonl:1: expected an object with id, prompt"),
        (b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "train.jsonl:2: prompt id 1 appears twice"),
        (b'{"id": "x", "prompt": "a"}\n', "'id' must be an integer"),
        (b"\n", "train.jsonl: no prompts"),
    ],
)
def test_a_damaged_prompt_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_rows(path, scoring=False)


def test_scoring_needs_the_golden_output(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n')
    assert read_rows(path, scoring=False)[0]["id"] == 1
    with pytest.raises(UserError, match="expected an object with id, prompt, output"):
        read_rows(path, scoring=True)
    with pytest.raises(UserError, match="prompt file not found"):
        read_rows(tmp_path / "gone.jsonl", scoring=False)


# --------------------------------------------------------------------------- the report


def captures_of(probs: torch.Tensor, lengths: list[int], p: float, max_k: int) -> list[Capture]:
    sets = top_p_set(probs, p, max_k)
    out, start = [], 0
    for n in lengths:
        kept = sets.kept[start : start + n].numpy()
        member = np.arange(sets.ids.shape[1])[None, :] < kept[:, None]
        out.append(
            Capture(
                ids=sets.ids[start : start + n].numpy()[member].astype(np.int32),
                probs=sets.probs[start : start + n].numpy()[member],
                kept=kept.astype(np.int32),
                covered=sets.covered[start : start + n].numpy(),
            )
        )
        start += n
    return out


def test_report_numbers_equal_brute_force():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 120, generator=generator) * torch.linspace(0.5, 6, 40)[:, None]
    probs = torch.softmax(logits, dim=-1)
    lengths = [10, 25, 5]
    curve = top_k_curve(captures_of(probs, lengths, 1.0, 50))
    ordered = torch.sort(probs.double(), dim=-1, descending=True).values
    np.testing.assert_allclose(curve, ordered.cumsum(-1)[:, :50].mean(0).numpy(), rtol=1e-5)
    sizes = top_p_sizes(captures_of(probs, lengths, 0.95, 120))
    for p, size in sizes.items():
        expected = top_p_set(probs, p, 120).kept.double().mean().item()
        assert size == pytest.approx(expected), p


def test_report_files(tmp_path):
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(30, 80, generator=generator) * 3, dim=-1)
    manifest = {
        "teacher": "t", "top_p": 0.8, "max_k": 64,
        "counts": {"examples": 3, "tokens": 30, "finish": {"eos": 2, "length": 1}},
        "mean_set_size": 4.2, "capped_fraction": 0.0, "total_bytes": 900, "bytes_per_token": 30.0,
        "dense_fp16_bytes_per_token": 160,
    }  # fmt: skip
    stats = sparsity_stats(captures_of(probs, [30], 1.0, 50), captures_of(probs, [30], 0.95, 80), manifest, sequences=1)
    paths = write_report(stats, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["cache"]["dense_over_cache"] == pytest.approx(160 / 30, rel=1e-2)
    page = paths["markdown"].read_text()
    assert "| 50 |" in page and "| 0.5 |" in page and "bytes per token | 30.00" in page


# --------------------------------------------------------------------------- ZeRO-3 lockstep


def _lockstep_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank: rounds with batches of different lengths, or none; counts its collectives."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build_model("gpt2")
    forwards = [0]
    model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    lockstep = Lockstep(model, PAD, torch.device("cpu"))
    prompt = make_prompts([5], seed=rank)[0]
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    forwards[0] = 0
    config = SimpleNamespace(temperature=1.0, top_p=1.0, cache_top_p=0.8, cache_max_k=8)
    records = []
    # round 1: limits 3 / 7: rank 0's batch ends first; nobody stops early
    # round 2: rank 0 has no batch and idles in step with rank 1
    # round 3: greedy, and EOS is each rank's first token: every rank is done after step 0
    rounds = [({0: 3, 1: 7}, None), ({1: 4}, None), ({0: 6, 1: 6}, first)]
    for limits, eos in rounds:
        forwards[0] = 0
        batch = [Item(rank, 0, 11, prompt, None, limits[rank])] if rank in limits else None
        tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=PAD)
        if eos is not None:
            config = SimpleNamespace(temperature=0.0, top_p=1.0, cache_top_p=0.8, cache_max_k=8)
        results = generate_batch(model, batch, tokenizer, config, lockstep)
        records.append({"forwards": forwards[0], "collectives": lockstep.steps, "tokens": [len(r[0]) for r in results]})
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(records))
    dist.destroy_process_group()


@pytest.mark.slow
def test_lockstep_keeps_ranks_in_step(tmp_path):
    import torch.multiprocessing as mp

    from bdctl.engine import free_port

    mp.spawn(_lockstep_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # a prefill plus one forward per agreed step on every rank: 7 steps, then 4
    assert [(r[0]["forwards"], r[0]["collectives"], r[0]["tokens"]) for r in records] == [(7, 6, [3]), (7, 6, [7])]
    assert [(r[1]["forwards"], r[1]["collectives"], r[1]["tokens"]) for r in records] == [(4, 3, []), (4, 3, [4])]
    # everyone is done after the first step: one forward, one collective
    assert [(r[2]["forwards"], r[2]["collectives"]) for r in records] == [(1, 1), (1, 1)]
