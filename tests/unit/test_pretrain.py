"""The pretraining corpus packed into blocks (bdctl.data.pretrain): packing, sources, step order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bdctl.data.pretrain import PretrainBlocks, pack_blocks, prepare_blocks, pretrain_dir
from bdctl.errors import UserError
from bdctl.recipe import load_recipe
from bdctl.recipe.schema import PretrainCorpus, SyntheticCorpus
from bdctl.rundir import RunDir

DOCS = [f"document number {i} says {' '.join(['word'] * (i % 7 + 1))}." for i in range(60)]


def stream(tokenizer, docs):
    """The reference token stream: each document's tokens, then EOS."""
    out = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        out += ids + [tokenizer.eos_token_id]
    return out


def recipe_with(corpus: PretrainCorpus):
    recipe, _ = load_recipe("smoke")
    recipe.data.pretrain = corpus
    return recipe


def test_blocks_are_the_eos_separated_stream_cut_into_block_size(tiny_tokenizer):
    blocks, counts = pack_blocks(DOCS, tiny_tokenizer, 16)
    reference = stream(tiny_tokenizer, DOCS)
    assert blocks.dtype == np.int32 and blocks.shape == (len(reference) // 16, 16)
    np.testing.assert_array_equal(blocks.reshape(-1), reference[: blocks.size])  # the tail is dropped
    assert counts == {"documents": len(DOCS), "blocks": len(blocks), "tokens": blocks.size, "exhausted": True}
    assert (blocks == tiny_tokenizer.eos_token_id).sum() >= len(DOCS) - 2  # EOS between documents
    again, _ = pack_blocks(iter(DOCS), tiny_tokenizer, 16)
    np.testing.assert_array_equal(blocks, again)  # deterministic


def test_max_blocks_stops_reading_early(tiny_tokenizer):
    read = []

    def documents():
        for doc in DOCS * 100:
            read.append(doc)
            yield doc

    full, _ = pack_blocks(DOCS * 100, tiny_tokenizer, 8)
    few, counts = pack_blocks(documents(), tiny_tokenizer, 8, max_blocks=5)
    assert few.shape == (5, 8) and not counts["exhausted"]
    np.testing.assert_array_equal(few, full[:5])  # a prefix of the full packing
    assert len(read) < len(DOCS) * 100  # the corpus was not read whole


def test_block_size_must_be_at_least_two(tiny_tokenizer):
    with pytest.raises(UserError, match="block_size must be at least 2"):
        pack_blocks(DOCS, tiny_tokenizer, 1)


def test_step_order_is_a_function_of_step_and_global_micro_batch(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS) + "\n")
    blocks = prepare_blocks(
        recipe_with(PretrainCorpus(path=str(path), block_size=8)),
        RunDir(tmp_path / "run"),
        tiny_tokenizer,
        needed=10**6,
        log=lambda m: None,
    )
    n = len(blocks)
    assert n == len(stream(tiny_tokenizer, DOCS)) // 8  # the whole (small) corpus
    batch, micro = 8, 2
    for step in range(3 * n // batch):
        # ranks 1, 2 or 4: micro-batch g of a step is the same whoever trains it
        whole = np.concatenate(
            [blocks.micro_batch(step, g, micro, batch, seed=3).numpy() for g in range(batch // micro)]
        )
        ids = blocks.indices(step * batch, batch, seed=3)
        np.testing.assert_array_equal(whole, np.stack([np.asarray(b) for b in [list(blocks)[i] for i in ids]]))
    # each pass over the stream visits every block once, in a seeded order that changes per pass
    first, second = blocks.indices(0, n, seed=3), blocks.indices(n, n, seed=3)
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    assert blocks.indices(0, n, seed=3) == first and blocks.indices(0, n, seed=4) != first
    with pytest.raises(ValueError, match="outside a global batch"):
        blocks.micro_batch(0, 4, micro, batch, seed=3)


def test_jsonl_corpus_and_reuse(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    recipe = recipe_with(PretrainCorpus(path=str(path), text_field="body", block_size=8))
    run = RunDir(tmp_path / "run")
    messages = []
    blocks = prepare_blocks(recipe, run, tiny_tokenizer, needed=20, log=messages.append)
    assert len(blocks) == 20 and "20 blocks of 8 tokens" in messages[0]
    reference, _ = pack_blocks(DOCS, tiny_tokenizer, 8, max_blocks=20)
    np.testing.assert_array_equal(np.stack(list(blocks)), reference)
    # fewer blocks needed: the packed ones are reused, and only the first `needed` are read
    assert len(prepare_blocks(recipe, run, tiny_tokenizer, needed=12, log=messages.append)) == 12
    assert len(messages) == 1
    # more needed: packed again, the first blocks unchanged
    more = prepare_blocks(recipe, run, tiny_tokenizer, needed=30, log=messages.append)
    assert len(more) == 30 and len(messages) == 2
    np.testing.assert_array_equal(np.stack(list(more))[:20], reference)
    assert PretrainBlocks(pretrain_dir(run), limit=20).indices(0, 20, 1) == blocks.indices(0, 20, 1)


def test_hub_corpus_from_a_local_datasets_directory(tiny_tokenizer, tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "owt"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    recipe = recipe_with(PretrainCorpus(hub=str(data), block_size=8))
    blocks = prepare_blocks(recipe, RunDir(tmp_path / "run"), tiny_tokenizer, needed=15, log=lambda m: None)
    reference, _ = pack_blocks(DOCS, tiny_tokenizer, 8, max_blocks=15)
    np.testing.assert_array_equal(np.stack(list(blocks)), reference)


def test_synthetic_corpus_and_errors(tiny_tokenizer, tmp_path):
    recipe = recipe_with(PretrainCorpus(synthetic=SyntheticCorpus(n_docs=30), block_size=16))
    blocks = prepare_blocks(recipe, RunDir(tmp_path / "a"), tiny_tokenizer, needed=8, log=lambda m: None)
    again = prepare_blocks(recipe, RunDir(tmp_path / "b"), tiny_tokenizer, needed=8, log=lambda m: None)
    np.testing.assert_array_equal(np.stack(list(blocks)), np.stack(list(again)))  # seeded by the recipe

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi\n")
    with pytest.raises(UserError, match="fewer than 512 tokens"):
        prepare_blocks(
            recipe_with(PretrainCorpus(path=str(tiny))),
            RunDir(tmp_path / "c"),
            tiny_tokenizer,
            needed=4,
            log=lambda m: None,
        )
    with pytest.raises(UserError, match="file not found"):
        prepare_blocks(
            recipe_with(PretrainCorpus(path=str(tmp_path / "gone.txt"))), RunDir(tmp_path / "d"), tiny_tokenizer,
            needed=4, log=lambda m: None,
        )  # fmt: skip
