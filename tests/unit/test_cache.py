"""The sparse teacher cache on disk (bdctl.cache)."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import numpy as np
import pytest
import torch

from bdctl.cache import (
    FORMAT_VERSION,
    LOGP_SCALE,
    CacheWriter,
    TeacherCache,
    check,
    code_probs,
    collate_candidates,
    finalize,
    logp_codes,
    remake_hint,
    visible_shards,
    written_keys,
)
from bdctl.errors import UserError
from bdctl.sampling import sample
from bdctl.topp import Capture

P = 0.8
K = 16
TOKENIZER = "0123456789abcdef"
FORMATS = pytest.mark.parametrize("fmt", [1, 2])
# Format 2 keeps a probability to within this relative error (its log step is 1 / LOGP_SCALE nats);
# float16 (format 1) to within 2**-11 for probabilities >= 2**-14 (its normal range).
LOGP_REL = float(np.expm1(0.5 / LOGP_SCALE))
F16_REL = 2.0**-11


def fake_example(rng: np.random.Generator, length: int) -> tuple[np.ndarray, Capture]:
    """Random response tokens and a well-formed capture (sets of 1..K distinct ids)."""
    tokens = rng.integers(0, 50_000, size=length)
    kept = rng.integers(1, K + 1, size=length).astype(np.int32)
    ids = np.concatenate([np.zeros(0, np.int64)] + [rng.choice(50_000, size=k, replace=False) for k in kept])
    ids = ids.astype(np.int32)
    probs = rng.random(int(kept.sum())).astype(np.float32) / 4
    offsets = np.concatenate([[0], np.cumsum(kept)])
    covered = np.array([probs[a:b].sum() for a, b in zip(offsets[:-1], offsets[1:], strict=True)], dtype=np.float32)
    return tokens, Capture(ids=ids, probs=probs, kept=kept, covered=covered)


def write_cache(
    directory, *, writers: int = 2, shards: int = 2, per_shard: int = 3, seed: int = 0, final: bool = True, fmt=None
):
    """A cache from several writers; returns {(prompt_id, sample_index): (seed, finish, tokens, capture)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    for writer in range(writers):
        with CacheWriter(directory, writer, top_p=P, max_k=K, format=fmt) as out:
            for shard in range(shards):
                for j in range(per_shard):
                    # Prompts interleave across writers, as ranks share a strided split.
                    prompt_id = (shard * per_shard + j) * writers + writer
                    for sample_index in range(2):
                        tokens, capture = fake_example(rng, int(rng.integers(0, 12)))
                        finish = "eos" if sample_index == 0 else "length"
                        seed_value = 1000 * prompt_id + sample_index
                        out.add(
                            prompt_id=prompt_id, sample_index=sample_index, seed=seed_value, tokens=tokens,
                            finish_reason=finish, capture=capture,
                        )  # fmt: skip
                        expected[(prompt_id, sample_index)] = (seed_value, finish, tokens, capture)
                out.flush()
    if final:
        finalize(directory, teacher="tiny-teacher", tokenizer_hash=TOKENIZER, top_p=P, max_k=K, vocab_size=50_000)
    return expected


def assert_example_equal(example, stored, fmt: int = FORMAT_VERSION) -> None:
    seed, finish, tokens, capture = stored
    assert example.seed == seed and example.finish_reason == finish
    np.testing.assert_array_equal(example.tokens, tokens)
    np.testing.assert_array_equal(example.capture.kept, capture.kept)
    np.testing.assert_array_equal(example.capture.ids, capture.ids)
    assert example.tokens.dtype == np.int32 and example.capture.ids.dtype == np.int32
    if fmt == 1:
        # Probabilities and covered mass are stored as float16: exactly the float16 rounding.
        np.testing.assert_array_equal(example.capture.probs, capture.probs.astype(np.float16))
        np.testing.assert_array_equal(example.capture.covered, capture.covered.astype(np.float16))
        assert example.capture.probs.dtype == np.float16
        return
    # Format 2: exactly the read-back of the probability's code, within LOGP_REL of it; so is the covered mass.
    np.testing.assert_array_equal(example.capture.probs, code_probs(logp_codes(capture.probs)))
    np.testing.assert_allclose(example.capture.probs, capture.probs, rtol=LOGP_REL * 1.0001, atol=0)
    np.testing.assert_array_equal(example.capture.covered, code_probs(logp_codes(capture.covered)))
    assert example.capture.probs.dtype == np.float32


@FORMATS
def test_round_trip_two_writers(tmp_path, fmt):
    expected = write_cache(tmp_path / "cache", fmt=fmt)
    cache = TeacherCache(tmp_path / "cache")
    assert cache.manifest["format"] == fmt
    assert len(cache) == len(expected) == 24
    keys = [(cache[i].prompt_id, cache[i].sample_index) for i in range(len(cache))]
    assert keys == sorted(expected)  # ordered by (prompt, sample) whatever wrote them
    for i in range(len(cache)):
        assert_example_equal(cache[i], expected[keys[i]], fmt)
    # Random access, in any order, negative indices included.
    for i in np.random.default_rng(1).permutation(len(cache)).tolist() + [-1, -len(cache)]:
        example = cache[i]
        assert_example_equal(example, expected[(example.prompt_id, example.sample_index)], fmt)
    with pytest.raises(IndexError):
        cache[len(cache)]
    counts = cache.manifest["counts"]
    assert counts["examples"] == 24 and counts["prompts"] == 12 and counts["writers"] == 2 and counts["shards"] == 4
    assert counts["finish"] == {"eos": 12, "length": 12}
    assert counts["tokens"] == sum(len(v[2]) for v in expected.values())
    assert written_keys(tmp_path / "cache") == set(expected)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine cannot stall a thread team."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_round_trip_of_real_samples(tmp_path, one_thread):
    """Samples straight from the sampler go in and come back out (a tiny GPT-2 teacher)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=200, n_positions=64)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions, like a trained teacher
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    samples = sample(model, prompts, [1, 2, 3], eos_id=0, pad_id=0, max_new_tokens=12, capture_top_p=P, capture_max_k=K)
    with CacheWriter(tmp_path, 0, top_p=P, max_k=K) as out:
        for prompt_id, result in enumerate(samples):
            out.add_sample(prompt_id, 0, result)
    finalize(tmp_path, teacher="tiny", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)
    cache = TeacherCache(tmp_path)
    for prompt_id, result in enumerate(samples):
        example = cache[prompt_id]
        assert example.tokens.tolist() == result.tokens and example.finish_reason == result.finish_reason
        np.testing.assert_array_equal(example.capture.ids, result.capture.ids)
        np.testing.assert_allclose(example.capture.probs, result.capture.probs, rtol=LOGP_REL * 1.0001, atol=0)


def test_shard_without_index_is_invisible(tmp_path):
    expected = write_cache(tmp_path, writers=1, shards=2, final=False)
    # A writer that died after its data files but before its index: remove the last index.
    assert visible_shards(tmp_path) == ["w0000-000000", "w0000-000001"]
    (tmp_path / "w0000-000001.index.json").unlink()
    assert (tmp_path / "w0000-000001.tokens.u16").exists()
    assert visible_shards(tmp_path) == ["w0000-000000"]
    assert len(written_keys(tmp_path)) == len(expected) // 2
    manifest = finalize(tmp_path, teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)
    assert manifest["counts"]["examples"] == len(expected) // 2
    assert len(TeacherCache(tmp_path)) == len(expected) // 2
    # A restarted writer continues after its last visible shard, over the orphaned files.
    with CacheWriter(tmp_path, 0, top_p=P, max_k=K) as out:
        tokens, capture = fake_example(np.random.default_rng(5), 4)
        out.add(prompt_id=99, sample_index=0, seed=1, tokens=tokens, finish_reason="length", capture=capture)
        assert out.flush() == tmp_path / "w0000-000001.index.json"


def test_missing_manifest_is_refused(tmp_path):
    write_cache(tmp_path, final=False)
    with pytest.raises(UserError, match="not finished"):
        TeacherCache(tmp_path)
    with pytest.raises(UserError, match="not finished"):
        TeacherCache(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not finished"):
        check(tmp_path, TOKENIZER, P)


@FORMATS
def test_damaged_shard_is_refused(tmp_path, fmt):
    cache = tmp_path / "generate" / "cache"  # where the generate stage keeps it
    write_cache(cache, fmt=fmt)
    path = cache / ("w0001-000000.cand_probs.f16" if fmt == 1 else "w0001-000000.cand_logp.u8")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="w0001-000000 is damaged") as damaged:
        TeacherCache(cache)
    # The hint names a command that repairs it (a plain rerun of a complete stage does nothing),
    # with the recipe the stage's job.json names, never a placeholder.
    assert str(damaged.value).endswith(
        "make the cache again: rerun the command that made it with --force (bdctl generate RECIPE)"
    )
    for stage, command in (
        ("generate", "bdctl generate 'my recipes/x.yaml' --force"),
        ("score_train", "bdctl generate 'my recipes/x.yaml' --score train --force"),
        ("generate-sharp", "bdctl generate 'my recipes/x.yaml' --variant sharp --force"),
    ):
        (tmp_path / stage).mkdir(exist_ok=True)
        (tmp_path / stage / "job.json").write_text(json.dumps({"recipe_path": "my recipes/x.yaml"}))
        assert remake_hint(tmp_path / stage / "cache") == f"make the cache again: {command}"
    with pytest.raises(UserError) as damaged:
        TeacherCache(cache)
    assert str(damaged.value).endswith("make the cache again: bdctl generate 'my recipes/x.yaml' --force")


def test_check_tokenizer_and_p(tmp_path):
    write_cache(tmp_path / "x")
    cache = TeacherCache(tmp_path / "x")
    check(cache, TOKENIZER, 0.8)
    check(tmp_path / "x", TOKENIZER, 0.8, max_k=K)
    with pytest.raises(UserError) as info:
        check(cache, TOKENIZER, 0.9)
    assert str(info.value) == f"cache {tmp_path / 'x'}: made with top_p 0.8, the recipe asks for 0.9"
    with pytest.raises(UserError, match=f"made with tokenizer {TOKENIZER}, the run's tokenizer is ffff"):
        check(cache, "ffff", 0.8)
    with pytest.raises(UserError, match="at most 16 candidates, the recipe asks for 64"):
        check(cache, TOKENIZER, 0.8, max_k=64)


def test_finalize_refuses_duplicates_and_mixed_settings(tmp_path):
    rng = np.random.default_rng(0)
    tokens, capture = fake_example(rng, 3)
    for writer in (0, 1):
        with CacheWriter(tmp_path / "dup", writer, top_p=P, max_k=K) as out:
            out.add(prompt_id=4, sample_index=0, seed=0, tokens=tokens, finish_reason="eos", capture=capture)
    with pytest.raises(UserError, match="prompt 4 sample 0 is in shards w0000-000000 and w0001-000000"):
        finalize(tmp_path / "dup", teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)
    with CacheWriter(tmp_path / "mixed", 0, top_p=0.5, max_k=K) as out:
        out.add(prompt_id=1, sample_index=0, seed=0, tokens=tokens, finish_reason="eos", capture=capture)
    with pytest.raises(UserError, match="made with top_p 0.5"):
        finalize(tmp_path / "mixed", teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)
    with pytest.raises(UserError, match="no finished shard"):
        finalize(tmp_path / "empty", teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)


def test_writer_rejects_malformed_captures(tmp_path):
    tokens, capture = fake_example(np.random.default_rng(0), 5)
    out = CacheWriter(tmp_path, 0, top_p=P, max_k=K)
    with pytest.raises(ValueError, match="4 tokens but a capture of 5"):
        out.add(prompt_id=0, sample_index=0, seed=0, tokens=tokens[:4], finish_reason="eos", capture=capture)
    with pytest.raises(ValueError, match="finish_reason"):
        out.add(prompt_id=0, sample_index=0, seed=0, tokens=tokens, finish_reason="stop", capture=capture)
    small = CacheWriter(tmp_path, 1, top_p=P, max_k=2)
    with pytest.raises(ValueError, match="set sizes"):
        small.add(prompt_id=0, sample_index=0, seed=0, tokens=tokens, finish_reason="eos", capture=capture)
    assert out.flush() is None and visible_shards(tmp_path) == []


@FORMATS
def test_bytes_per_token(tmp_path, fmt):
    expected = write_cache(tmp_path, fmt=fmt)
    manifest = TeacherCache(tmp_path).manifest
    tokens = sum(len(v[2]) for v in expected.values())
    entries = sum(int(v[3].kept.sum()) for v in expected.values())
    if fmt == 1:
        # 4 (token) + 2 (kept) + 2 (covered) bytes per token, 4 (id) + 2 (prob) bytes per candidate.
        assert manifest["data_bytes"] == 8 * tokens + 6 * entries
    else:
        # 2 (token) + 1 (kept) + 2 (covered) bytes per token, 2 (id) + 1 (log-probability) per candidate,
        # 2 per escape.
        escapes = sum(p.stat().st_size for p in tmp_path.glob("*.escapes.u16"))
        assert manifest["data_bytes"] == 5 * tokens + 3 * entries + escapes
    files = [path for path in tmp_path.iterdir() if path.name != "MANIFEST.json"]
    assert manifest["total_bytes"] == sum(path.stat().st_size for path in files)
    assert manifest["bytes_per_token"] == pytest.approx(manifest["total_bytes"] / tokens)
    assert manifest["counts"]["entries"] == entries
    assert manifest["mean_set_size"] == pytest.approx(entries / tokens)
    assert manifest["dense_fp16_bytes_per_token"] == 100_000


def test_collate_candidates(tmp_path):
    expected = write_cache(tmp_path)
    cache = TeacherCache(tmp_path)
    examples = [cache[i] for i in range(5)]
    lengths = [len(e) for e in examples]
    batch = collate_candidates(examples)
    width, k = max(lengths), max(int(e.capture.kept.max()) for e in examples if len(e))
    assert batch["cand_ids"].shape == (5, width, k) and batch["cand_ids"].dtype == torch.long
    assert batch["cand_probs"].dtype == torch.float32 and batch["cand_mask"].dtype == torch.bool
    assert batch["valid"].tolist() == [[t < n for t in range(width)] for n in lengths]
    for row, example in enumerate(examples):
        for t in range(width):
            mask = batch["cand_mask"][row, t]
            if t >= lengths[row]:
                assert not mask.any() and (batch["cand_ids"][row, t] == 0).all()
                continue
            ids, probs = example.capture.position(t)
            n = len(ids)
            assert mask.tolist() == [j < n for j in range(k)]
            assert batch["cand_ids"][row, t, :n].tolist() == ids.tolist()
            assert torch.equal(batch["cand_probs"][row, t, :n], torch.from_numpy(probs.astype(np.float32)))
            assert (batch["cand_probs"][row, t, n:] == 0).all()
    # Aligned to a training batch: response position 0 at column offsets[b].
    offsets = [3, 0, 5, 1, 2]
    shifted = collate_candidates(examples, width=width + 6, offsets=offsets)
    for row, offset in enumerate(offsets):
        n = lengths[row]
        assert torch.equal(shifted["cand_ids"][row, offset : offset + n], batch["cand_ids"][row, :n])
        assert not shifted["valid"][row, :offset].any() and not shifted["valid"][row, offset + n :].any()
    with pytest.raises(ValueError):
        collate_candidates(examples, width=1, offsets=offsets)
    assert len(expected) == len(cache)


def _read_all(cache: TeacherCache) -> list[list[int]]:
    return [cache[i].capture.ids.tolist() for i in range(len(cache))]


def test_readers_in_several_processes(tmp_path):
    write_cache(tmp_path)
    cache = TeacherCache(tmp_path)
    here = _read_all(cache)  # maps every shard in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 20_000  # the maps are not pickled, only the small index
    assert _read_all(clone) == here
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_read_all, [cache, cache]) == [here, here]


def test_empty_responses_round_trip(tmp_path):
    """A shard whose responses are all empty (zero-byte data files) reads back and collates."""
    empty = Capture(
        ids=np.zeros(0, np.int32), probs=np.zeros(0, np.float32), kept=np.zeros(0, np.int32),
        covered=np.zeros(0, np.float32),
    )  # fmt: skip
    with CacheWriter(tmp_path, 0, top_p=P, max_k=K) as out:
        out.add(prompt_id=0, sample_index=0, seed=3, tokens=[], finish_reason="length", capture=empty)
    manifest = finalize(tmp_path, teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)
    assert manifest["counts"]["tokens"] == 0 and manifest["bytes_per_token"] == 0.0
    example = TeacherCache(tmp_path)[0]
    assert len(example) == 0 and example.seed == 3 and example.capture.ids.shape == (0,)
    batch = collate_candidates([example])
    assert batch["cand_ids"].shape == (1, 0, 1)


# --------------------------------------------------------------------------- format 2 and format 1


def test_logp_codes_keep_float16_precision():
    """A probability comes back within exp(1/2048) - 1 = 4.885e-4 (float16's worst case is 2**-11 = 4.883e-4);
    0 stays 0, 1 stays 1, and probabilities below the code range (exp(-64)) read back as exp(-64)."""
    q = np.exp(-np.random.default_rng(0).uniform(0, 40, 100_000)).astype(np.float32)
    back = code_probs(logp_codes(q))
    assert back.dtype == np.float32
    assert np.abs(back / q - 1).max() <= LOGP_REL + 2**-23  # + float32 rounding of the table
    assert LOGP_REL < 1.0003 * F16_REL
    assert code_probs(logp_codes(np.array([0.0, 1.0, 1e-30], np.float32))).tolist() == [
        0.0,
        1.0,
        pytest.approx(np.exp(-65534 / LOGP_SCALE), rel=1e-6),
    ]


@pytest.mark.parametrize(
    ("largest", "width", "suffix"), [(65_535, 2, "u16"), (70_000, 3, "u24"), (2**31 - 1, 4, "i32")]
)
def test_ids_take_the_fewest_bytes(tmp_path, largest, width, suffix):
    """Ids in 2 bytes below 65536, 3 below 2**24, else 4; kept in 1 byte when max_k <= 255, else 2;
    sets in any order (negative log-code differences) and zero probabilities round-trip."""
    rng = np.random.default_rng(width)
    kept = np.array([1, 3, 300, 2, 1], np.int32)
    ids = rng.choice(largest, size=int(kept.sum()) - 1, replace=False).astype(np.int32)
    ids = np.concatenate([ids, [largest]]).astype(np.int32)
    probs = rng.random(len(ids)).astype(np.float32) / 400  # unsorted
    probs[[0, 5]] = [0.9, 0.0]
    offsets = np.concatenate([[0], np.cumsum(kept)])
    covered = np.add.reduceat(probs, offsets[:-1])
    tokens = np.array([0, 7, largest, 3, 65_535])
    capture = Capture(ids=ids, probs=probs, kept=kept, covered=covered)
    max_k = 300
    with CacheWriter(tmp_path, 0, top_p=P, max_k=max_k) as out:
        out.add(prompt_id=0, sample_index=0, seed=0, tokens=tokens, finish_reason="eos", capture=capture)
    finalize(tmp_path, teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=max_k)
    index = json.loads((tmp_path / "w0000-000000.index.json").read_text())
    assert index["format"] == 2 and index["id_bytes"] == width and index["kept_bytes"] == 2
    assert (tmp_path / f"w0000-000000.cand_ids.{suffix}").stat().st_size == width * len(ids)
    assert (tmp_path / f"w0000-000000.tokens.{suffix}").stat().st_size == width * len(tokens)
    assert_example_equal(TeacherCache(tmp_path)[0], (0, "eos", tokens, capture))


def _rewrite(source: TeacherCache, directory, fmt: int) -> TeacherCache:
    """The examples of ``source`` written again, one shard per writer as in the fixture."""
    by_writer: dict[int, list] = {}
    for shard, example in zip(source._shard_of, source, strict=True):
        by_writer.setdefault(int(source._indices[shard]["writer"]), []).append(example)
    for writer, examples in by_writer.items():
        with CacheWriter(directory, writer, top_p=source.top_p, max_k=source.max_k, format=fmt) as out:
            for e in sorted(examples, key=lambda e: e.seed):
                out.add(
                    prompt_id=e.prompt_id, sample_index=e.sample_index, seed=e.seed, tokens=e.tokens,
                    finish_reason=e.finish_reason, capture=e.capture,
                )  # fmt: skip
    finalize(directory, teacher="t", tokenizer_hash=source.tokenizer_hash, top_p=source.top_p, max_k=source.max_k)
    return TeacherCache(directory)


def test_a_format_1_cache_from_the_old_writer_still_reads(tmp_path):
    """tests/fixtures/cache_v1 was written by bdctl's format-1 writer (main at df9855d). It reads; the
    format-1 writer kept here writes the same bytes; converted to format 2 it reads back within LOGP_REL."""
    from pathlib import Path

    fixture = Path(__file__).parents[1] / "fixtures" / "cache_v1"
    old = TeacherCache(fixture)
    assert old.manifest["format"] == 1 and len(old) == 4 and old.manifest["counts"]["tokens"] == 12
    _rewrite(old, tmp_path / "v1", fmt=1)
    for path in fixture.iterdir():
        if path.name != "MANIFEST.json":
            assert (tmp_path / "v1" / path.name).read_bytes() == path.read_bytes(), path.name
    new = _rewrite(old, tmp_path / "v2", fmt=2)
    assert new.manifest["format"] == 2 and new.manifest["data_bytes"] < old.manifest["data_bytes"]
    for a, b in zip(old, new, strict=True):
        assert (a.prompt_id, a.seed, a.finish_reason) == (b.prompt_id, b.seed, b.finish_reason)
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_array_equal(b.capture.ids, a.capture.ids)
        np.testing.assert_array_equal(b.capture.kept, a.capture.kept)
        np.testing.assert_allclose(b.capture.probs, a.capture.probs.astype(np.float32), rtol=LOGP_REL * 1.0001)
        np.testing.assert_allclose(b.capture.covered, a.capture.covered, rtol=LOGP_REL * 1.0001)


def test_writer_keeps_the_format_of_the_shards_there(tmp_path):
    """A resumed cache stays in one format: a writer continues in the format of the shards it finds."""
    write_cache(tmp_path, writers=1, shards=1, final=False, fmt=1)
    assert CacheWriter(tmp_path, 1, top_p=P, max_k=K).format == 1
    assert CacheWriter(tmp_path / "new", 0, top_p=P, max_k=K).format == FORMAT_VERSION == 2
    with pytest.raises(ValueError, match="cache format"):
        CacheWriter(tmp_path / "x", 0, top_p=P, max_k=K, format=3)


def test_an_unknown_format_is_refused_in_one_line(tmp_path):
    write_cache(tmp_path, writers=1, shards=1)
    manifest_path = tmp_path / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(UserError) as info:
        TeacherCache(tmp_path)
    message = str(info.value)
    assert "\n" not in message and f"{manifest_path} has format 3" in message and "reads formats 1 and 2" in message
    manifest_path.write_text(json.dumps(manifest))
    index_path = tmp_path / "w0000-000000.index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "format": 9}))
    with pytest.raises(UserError, match=f"{index_path} has format 9"):
        TeacherCache(tmp_path)


def _teacher_sets(rng: np.random.Generator, vocab: int, length: int) -> Capture:
    """Sets like the sampler's: distinct ids, probabilities sorted down, each >= 1e-4 (float16's normal
    range, where its relative rounding is at most 2**-11)."""
    kept = rng.integers(1, 9, size=length).astype(np.int32)
    sets = []
    for k in kept:
        q = np.sort(rng.dirichlet(np.full(k + 1, 0.7)))[::-1][:k]
        sets.append(np.maximum(q, 1e-4).astype(np.float32))
    ids = np.concatenate([rng.choice(vocab, size=k, replace=False) for k in kept]).astype(np.int32)
    probs = np.concatenate(sets)
    return Capture(ids=ids, probs=probs, kept=kept, covered=np.array([q.sum() for q in sets], np.float32))


@pytest.mark.parametrize("vocab", [1000, 70_000])  # 2-byte and 3-byte ids
def test_kd_and_bd_losses_from_format_2_match_format_1(tmp_path, vocab):
    """KD (dense reference and lean) and BD (dense and lean) from a format-2 cache against the same cache in
    format 1, and each against the exact float32 probabilities.

    Tolerance. Format 1 keeps each probability within F16_REL of the exact one, format 2 within LOGP_REL.
    If every probability of a set has a relative error of at most r, its renormalised KD target has one of
    at most 2r / (1 - r), and since KD is a mean of sums of q * (-log pi) >= 0, so has the KD loss. Hence
    |KD_2 - KD_exact| <= 2 LOGP_REL / (1 - LOGP_REL) KD_exact, the same bound as float16's
    |KD_1 - KD_exact| <= 2 F16_REL / (1 - F16_REL) KD_exact (to 0.03 %), and between the two formats
    r = (1 + LOGP_REL) / (1 - F16_REL) - 1. BD reads only the sets' members, so it is the same exactly.
    """
    from bdctl.objectives.bellman import candidate_mask, dense_loss
    from bdctl.objectives.bellman_lean import lean_loss
    from bdctl.objectives.kd import lean_sparse_kd_loss, sparse_kd_loss_dense

    rng = np.random.default_rng(vocab)
    captures = [_teacher_sets(rng, vocab, int(n)) for n in (6, 3, 8)]
    actions = [rng.integers(0, vocab, size=len(c)) for c in captures]
    for fmt in (1, 2):
        with CacheWriter(tmp_path / f"v{fmt}", 0, top_p=P, max_k=K, format=fmt) as out:
            for i, (tokens, capture) in enumerate(zip(actions, captures, strict=True)):
                out.add(prompt_id=i, sample_index=0, seed=i, tokens=tokens, finish_reason="eos", capture=capture)
        finalize(tmp_path / f"v{fmt}", teacher="t", tokenizer_hash=TOKENIZER, top_p=P, max_k=K)
    batches = {
        "exact": collate_candidates(captures),
        1: collate_candidates(list(TeacherCache(tmp_path / "v1"))),
        2: collate_candidates(list(TeacherCache(tmp_path / "v2"))),
    }
    assert TeacherCache(tmp_path / "v2")._indices[0]["id_bytes"] == (2 if vocab <= 65_536 else 3)
    torch.manual_seed(0)
    valid = batches["exact"]["valid"]
    hidden = torch.randn(*valid.shape, 8, dtype=torch.float64)
    weight = torch.randn(vocab, 8, dtype=torch.float64)
    logits = hidden @ weight.T
    acts = torch.zeros(valid.shape, dtype=torch.long)
    for row, a in enumerate(actions):
        acts[row, : len(a)] = torch.from_numpy(a)
    terminal = torch.zeros_like(valid)
    terminal[torch.arange(3), torch.tensor([len(a) - 1 for a in actions])] = True

    def kd(batch, lean: bool) -> float:
        sets = (batch["cand_ids"], batch["cand_probs"].double(), batch["cand_mask"], valid)
        return float(lean_sparse_kd_loss(hidden, weight, *sets) if lean else sparse_kd_loss_dense(logits, *sets))

    def bd(batch, lean: bool) -> float:
        if lean:
            return float(lean_loss(hidden, weight, batch["cand_ids"], batch["cand_mask"], acts, valid, terminal))
        mask = candidate_mask(batch["cand_ids"], batch["cand_mask"], valid.shape, vocab)
        return float(dense_loss(logits, mask, acts, valid, terminal))

    def bound(r: float) -> float:
        return 2 * r / (1 - r) + 1e-9  # + float64 arithmetic

    between = (1 + LOGP_REL) / (1 - F16_REL) - 1
    for lean in (False, True):
        exact, v1, v2 = (kd(batches[key], lean) for key in ("exact", 1, 2))
        assert abs(v1 - exact) <= bound(F16_REL) * exact
        assert abs(v2 - exact) <= bound(LOGP_REL) * exact
        assert abs(v2 - v1) <= bound(between) * v1
        assert bd(batches[2], lean) == bd(batches[1], lean) == bd(batches["exact"], lean)
