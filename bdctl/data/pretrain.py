"""The pretraining corpus of the LM term (docs/method.md §5), packed into fixed-length blocks.

    blocks = prepare_blocks(recipe, run, tokenizer, needed=total_steps * batch_size)
    ids = blocks.micro_batch(step, index=g, micro=4, seed=recipe.seed)   # long [4, block_size]

Packing. Documents are tokenised without special tokens, each followed by the end-of-sequence
token (so EOS separates documents), concatenated in corpus order into one stream, and cut into
blocks of `block_size` tokens; the incomplete tail is dropped. A block may start or end inside
a document, as in GPT-2's and MiniLLM's LM data.

Sources: the built-in synthetic corpus, a local .txt (one document per line) or .jsonl file, or
a `datasets` hub name read in streaming mode. Only as many blocks as the run can use are packed
(`needed`): a 40 GB corpus is never tokenised whole. A corpus with fewer blocks is cycled.

Order. The blocks are visited in passes; pass `e` is a permutation of all blocks seeded by
(seed, e). Global step `s` uses the stream positions `[s * B, (s + 1) * B)` of the concatenated
passes, and micro-batch `g` of that step (numbered over the whole global batch) the positions
`g * micro ...`. So the blocks of a step depend only on the seed, the step and the global batch:
never on the number of ranks, and a resumed run continues exactly where it stopped.

Storage. The launching process packs once per run directory into `runs/<name>/pretrain/`
(`blocks.i32`, raw little-endian int32 `[n_blocks, block_size]`, and `MANIFEST.json`, written
last); ranks memory-map it. A later stage that needs more blocks of the same corpus repacks
(streaming is deterministic, so the first blocks stay the same and a run only ever reads the
first `needed`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from bdctl.errors import UserError, space_for
from bdctl.rundir import RunDir, manifest, mark_complete, replace_dir

BLOCKS_FILE = "blocks.i32"
_DTYPE = np.dtype("<i4")
_DOCS_PER_CALL = 256  # documents tokenised per tokenizer call


def pack_blocks(
    texts: Iterable[str], tokenizer, block_size: int, max_blocks: int | None = None
) -> tuple[np.ndarray, dict]:
    """Tokenise documents in order, EOS after each, and cut the stream into blocks.

    Returns int32 ``[n, block_size]`` (``n <= max_blocks`` when given) and counts: documents read,
    tokens used, and whether the corpus ran out before ``max_blocks`` blocks were filled.
    """
    if block_size < 2:
        raise UserError(f"data.pretrain.block_size must be at least 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no end-of-sequence token to separate documents")
    blocks: list[np.ndarray] = []
    carry: list[int] = []
    docs = 0
    exhausted = True
    iterator = iter(texts)
    while True:
        if max_blocks is not None and len(blocks) >= max_blocks:
            exhausted = False
            break
        batch = [text for _, text in zip(range(_DOCS_PER_CALL), iterator, strict=False)]
        if not batch:
            break
        docs += len(batch)
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            carry.extend(ids)
            carry.append(eos)
        whole = len(carry) // block_size
        if max_blocks is not None:
            whole = min(whole, max_blocks - len(blocks))
        if whole:
            cut = whole * block_size
            blocks.extend(np.asarray(carry[:cut], dtype=_DTYPE).reshape(whole, block_size))
            carry = carry[cut:]
    array = np.stack(blocks) if blocks else np.zeros((0, block_size), dtype=_DTYPE)
    return array, {"documents": docs, "blocks": len(array), "tokens": int(array.size), "exhausted": exhausted}


def corpus_fingerprint(recipe, tokenizer_digest: str) -> str:
    """What decides the packed blocks: the corpus spec, the tokenizer, and (synthetic) the seed."""
    corpus = recipe.data.pretrain
    payload = {"corpus": corpus.model_dump(mode="json"), "tokenizer": tokenizer_digest}
    if corpus.synthetic is not None:
        payload["seed"] = recipe.seed
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def prepare_blocks(recipe, run: RunDir, tokenizer, needed: int, log=print) -> PretrainBlocks:
    """Pack (or reuse) the run's pretraining blocks; at least `needed` unless the corpus is smaller."""
    from bdctl.data.prepare import corpus_texts
    from bdctl.models import tokenizer_hash

    corpus = recipe.data.pretrain
    if corpus is None:
        raise UserError("data.pretrain: no pretraining corpus in the recipe")
    fingerprint = corpus_fingerprint(recipe, tokenizer_hash(tokenizer))
    directory = pretrain_dir(run)
    done = manifest(directory)
    if done is not None and done.get("fingerprint") == fingerprint and (done["blocks"] >= needed or done["exhausted"]):
        return PretrainBlocks(directory, limit=needed)

    array, counts = pack_blocks(corpus_texts(recipe), tokenizer, corpus.block_size, max_blocks=max(1, needed))
    where = corpus.hub or corpus.path or "the synthetic corpus"
    if len(array) == 0:
        raise UserError(
            f"data.pretrain: {where} holds fewer than {corpus.block_size} tokens: not one block of block_size"
        )
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    blocks = array.astype(_DTYPE)
    try:
        with space_for(directory, "the pretraining blocks", blocks.nbytes):
            blocks.tofile(tmp / BLOCKS_FILE)
            mark_complete(tmp, fingerprint=fingerprint, block_size=corpus.block_size, source=where, **counts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, directory)
    cycled = (
        " (the corpus is smaller than one pass of the run: its blocks are reused)"
        if counts["exhausted"] and len(array) < needed
        else ""
    )
    log(
        f"pretraining corpus: {len(array)} blocks of {corpus.block_size} tokens "
        f"from {counts['documents']} documents of {where}{cycled}"
    )
    return PretrainBlocks(directory, limit=needed)


def pretrain_dir(run: RunDir) -> Path:
    return run.root / "pretrain"


class PretrainBlocks:
    """The packed blocks of a run, memory-mapped, with the step -> blocks order described above."""

    def __init__(self, directory: str | Path, limit: int | None = None):
        self.directory = Path(directory)
        info = manifest(self.directory)
        if info is None:
            raise UserError(f"{self.directory}: the pretraining blocks are not finished (no MANIFEST.json)")
        self.block_size = int(info["block_size"])
        self.info = info
        path = self.directory / BLOCKS_FILE
        total = path.stat().st_size // (_DTYPE.itemsize * self.block_size)
        if total != info["blocks"]:
            raise UserError(
                f"{path}: holds {total} blocks, its manifest says {info['blocks']}; delete {self.directory}"
            )
        self._blocks = np.memmap(path, dtype=_DTYPE, mode="r", shape=(total, self.block_size))
        # A run reads only the first `limit` blocks, so a repack with more blocks changes nothing.
        self.n_blocks = total if limit is None else min(total, max(1, limit))
        self._orders: dict[tuple[int, int], list[int]] = {}

    def __len__(self) -> int:
        return self.n_blocks

    def _pass_order(self, seed: int, epoch: int) -> list[int]:
        key = (seed, epoch)
        if key not in self._orders:
            order = list(range(self.n_blocks))
            random.Random(seed * 1_000_003 + 7_919 * (epoch + 1)).shuffle(order)
            self._orders = {key: order}  # one pass at a time is all a run needs
        return self._orders[key]

    def indices(self, start: int, count: int, seed: int) -> list[int]:
        """Block ids at stream positions ``start .. start + count - 1`` (passes concatenated)."""
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.n_blocks)
            out.append(self._pass_order(seed, epoch)[offset])
        return out

    def micro_batch(self, step: int, index: int, micro: int, global_batch: int, seed: int):
        """Blocks (long ``[micro, block_size]``) of micro-batch `index` of global step `step`."""
        import torch

        if not 0 <= index * micro < global_batch:
            raise ValueError(f"micro-batch {index} of {micro} blocks lies outside a global batch of {global_batch}")
        ids = self.indices(step * global_batch + index * micro, micro, seed)
        return torch.from_numpy(np.asarray(self._blocks[ids], dtype=np.int64))

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.n_blocks):
            yield np.asarray(self._blocks[i])
