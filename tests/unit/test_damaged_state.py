"""Damaged state left by a kill is repaired on the next run, never trusted and never fatal:
a metrics.jsonl whose last line was cut, cache shards and an index.json cut short."""

from __future__ import annotations

import json
from pathlib import Path

from bdctl.tracking import MetricsLog, read_metrics


def cut_metrics(path: Path) -> None:
    """metrics.jsonl as a kill leaves it: three records, the third cut mid-line."""
    lines = [json.dumps({"event": "train", "step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:17])


def test_a_cut_last_metrics_line_is_dropped_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    cut_metrics(path)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    log = MetricsLog(path, enabled=True)
    log.truncate_after(2)  # what a resume from step 2 does: it used to raise JSONDecodeError
    log.write(event="train", step=3, loss=0.5)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_record_appended_after_a_cut_line_is_not_lost(tmp_path: Path) -> None:
    """A stage that appends without truncating first (generate, eval) must not glue its first
    record onto the cut line, which would make both unreadable."""
    path = tmp_path / "metrics.jsonl"
    cut_metrics(path)
    MetricsLog(path, enabled=True).write(event="start")
    records = read_metrics(path)
    assert [r.get("step", r.get("event")) for r in records] == [1, 2, "start"]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3


def test_damaged_cache_shards_are_dropped_and_only_their_batches_redone(tmp_path: Path) -> None:
    """A shard whose data file or index.json was cut short used to count as done: the run failed
    only after computing everything else, then on every rerun. Now a resume drops exactly the
    damaged shards, so their examples are the ones left to compute."""
    from bdctl.cache import drop_damaged_shards, finalize, written_keys
    from tests.unit.test_cache import TOKENIZER, K, P, write_cache

    cache = tmp_path / "generate" / "cache"
    expected = write_cache(cache, final=False)  # 2 writers x 2 shards x 3 prompts x 2 samples
    intact = written_keys(cache)
    assert drop_damaged_shards(cache) == []  # nothing to do on an intact cache

    data = cache / "w0000-000001.cand_logp.u8"
    cut = len(data.read_bytes()) - 3
    data.write_bytes(data.read_bytes()[:cut])
    index = cache / "w0001-000000.index.json"
    index.write_text(index.read_text()[:40])
    lost = {key for key in intact if key[0] % 2 == 0 and key[0] >= 6} | {key for key in intact if key[0] in (1, 3, 5)}
    dropped = drop_damaged_shards(cache)
    assert dropped == [
        f"w0000-000001: w0000-000001.cand_logp.u8 has {cut} bytes, its index says {cut + 3}",
        "w0001-000000: w0001-000000.index.json is not a complete index",
    ]
    assert written_keys(cache) == intact - lost and len(lost) == 12
    assert not list(cache.glob("w0000-000001.*")) and not list(cache.glob("w0001-000000.*"))
    assert len(expected) == 24
    # What is left is a sound cache: redoing the lost examples and finalising succeeds.
    finalize(cache, teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)


def test_generate_resume_removes_damaged_shards_and_says_so(tmp_path: Path) -> None:
    """Where the repair happens: generate's `resumable` (the launching process, before any rank
    reads the cache) drops the damaged shard and says how many sequences remain."""
    from types import SimpleNamespace

    from bdctl.stages.generate import resumable
    from tests.unit.test_cache import write_cache

    stage = tmp_path / "runs/x/generate"
    write_cache(stage / "cache", final=False)  # 24 sequences in 4 shards
    (stage / "job.json").write_text(json.dumps({"info": {"resume_key": "k"}, "recipe_path": "x.yaml"}))
    data = stage / "cache/w0001-000001.tokens.u16"
    data.write_bytes(data.read_bytes()[:-1])
    job = SimpleNamespace(stage_dir=stage, info={"resume_key": "k"})
    said = resumable(job)  # type: ignore[arg-type]
    assert said is not None and said.startswith("18 sequences already in the cache; 1 damaged shard(s) removed")
    assert "(w0001-000001: w0001-000001.tokens.u16 has" in said
    assert resumable(job) == "18 sequences already in the cache"  # repaired: nothing more to say
