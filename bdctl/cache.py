"""The sparse teacher cache: the teacher's responses and top-p sets, on disk, memory-mappable.

Layout of a cache directory::

    cache/
      w0000-000000.tokens.i32      response token ids of the shard's examples, concatenated
      w0000-000000.kept.u16        set size at each generated position (one per token)
      w0000-000000.covered.f16     probability mass of each set (one per token)
      w0000-000000.cand_ids.i32    candidate token ids, all sets concatenated in position order
      w0000-000000.cand_probs.f16  their teacher probabilities
      w0000-000000.index.json      the shard's per-example index; written last
      w0001-000000.*               another writer's (rank's) shards
      MANIFEST.json                written last of all by `finalize`

All arrays are raw little-endian binary (``numpy.memmap``-able) with no header. Within an example,
position ``t`` predicts response token ``t``; its set is ``kept[t]`` consecutive entries of the
candidate arrays, by decreasing probability (ties: lower id first), so per-position offsets are
the cumulative sum of ``kept`` over the example (up to 512 positions: recomputed on read rather
than stored, which saves 8 bytes per token).

A shard's index (JSON) holds the format version, ``top_p`` and ``max_k``, the element counts of
each data file, and one column per field: ``prompt_id``, ``sample_index``, ``seed``, ``finish``
("eos" / "length"), ``token_start`` / ``token_count`` (into the per-token arrays) and
``cand_start`` (into the candidate arrays; the count is the sum of the example's ``kept``).

Visibility rule: the data files are written and fsynced first, then the index is written
atomically; a shard without its index (a writer that died) does not exist for anyone. The cache
as a whole does not exist until `finalize` has written ``MANIFEST.json`` (teacher, tokenizer hash,
``top_p``, ``max_k``, counts, bytes); `TeacherCache` refuses a directory without it.

Bytes per generated token: 4 (token) + 2 (kept) + 2 (covered) + 6 per candidate (int32 id and
float16 probability), plus the index. With peaked teacher distributions at ``p = 0.8`` the sets
hold a few tokens, so a token costs a few tens of bytes against ``2 |V|`` for dense fp16 logits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdctl.errors import UserError
from bdctl.rundir import manifest, mark_complete, read_json, write_text_atomic
from bdctl.sampling import FINISH_EOS, FINISH_LENGTH, Capture, Sample

FORMAT_VERSION = 1

# Data files of a shard: suffix -> dtype. Little-endian explicitly, so caches move between machines.
ARRAYS: dict[str, np.dtype] = {
    "tokens.i32": np.dtype("<i4"),
    "kept.u16": np.dtype("<u2"),
    "covered.f16": np.dtype("<f2"),
    "cand_ids.i32": np.dtype("<i4"),
    "cand_probs.f16": np.dtype("<f2"),
}
PER_TOKEN = ("tokens.i32", "kept.u16", "covered.f16")
PER_ENTRY = ("cand_ids.i32", "cand_probs.f16")
INDEX_SUFFIX = "index.json"
_SHARD_NAME = re.compile(r"^w(\d{4})-(\d{6})$")
_FINISH_CODES = {FINISH_LENGTH: 0, FINISH_EOS: 1}
_FINISH_NAMES = {code: name for name, code in _FINISH_CODES.items()}
_MAX_KEPT = np.iinfo(np.uint16).max


def _shard_name(writer: int, number: int) -> str:
    return f"w{writer:04d}-{number:06d}"


def _index_path(directory: Path, shard: str) -> Path:
    return directory / f"{shard}.{INDEX_SUFFIX}"


def _data_path(directory: Path, shard: str, suffix: str) -> Path:
    return directory / f"{shard}.{suffix}"


def visible_shards(directory: str | Path) -> list[str]:
    """Names of the shards whose index exists (the only ones that count), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = []
    for path in directory.glob(f"*.{INDEX_SUFFIX}"):
        name = path.name[: -len(INDEX_SUFFIX) - 1]
        if _SHARD_NAME.match(name):
            names.append(name)
    return sorted(names)


def _write_file_synced(path: Path, data: np.ndarray) -> None:
    """Write raw array bytes and fsync, so the index written after it never points at air."""
    with open(path, "wb") as handle:
        handle.write(np.ascontiguousarray(data).tobytes())
        handle.flush()
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class CacheExample:
    """One cached response: what a writer buffers and a reader returns.

    Attributes:
        prompt_id, sample_index, seed: which prompt, which of its samples, and its seed.
        finish_reason: "eos" (the last token is EOS) or "length" (truncated).
        tokens: int32 ``[T]`` response token ids.
        capture: the top-p set at each of the ``T`` positions (ids int32, probs float16,
            kept uint16, covered float16, views into the memory map, when read back).
    """

    prompt_id: int
    sample_index: int
    seed: int
    finish_reason: str
    tokens: np.ndarray
    capture: Capture

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class CacheWriter:
    """Writes one writer's (one rank's) shards into a cache directory.

    Examples are buffered by :meth:`add` and written as one shard by :meth:`flush`. Call
    ``flush`` after each batch when the batch is the unit of resume: a batch is then either
    entirely in the cache or entirely absent. Several writers may share a directory as long as
    their ``writer`` numbers differ. A writer continues the numbering after its last visible
    shard, overwriting the data files of a shard that never got its index.
    """

    def __init__(self, directory: str | Path, writer: int, *, top_p: float, max_k: int):
        if not 0 <= writer <= 9999:
            raise ValueError(f"writer number must lie in [0, 9999], got {writer}")
        if not 1 <= max_k <= _MAX_KEPT:
            raise ValueError(f"max_k must lie in [1, {_MAX_KEPT}], got {max_k}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.top_p = float(top_p)
        self.max_k = int(max_k)
        mine = [
            int(match.group(2))
            for name in visible_shards(self.directory)
            if (match := _SHARD_NAME.match(name)) and int(match.group(1)) == writer
        ]
        self._next = max(mine) + 1 if mine else 0
        self._pending: list[CacheExample] = []

    def add(
        self,
        *,
        prompt_id: int,
        sample_index: int,
        seed: int,
        tokens: Sequence[int] | np.ndarray,
        finish_reason: str,
        capture: Capture,
    ) -> None:
        """Buffer one example: its response ``tokens`` and the top-p set at each of them."""
        if finish_reason not in _FINISH_CODES:
            raise ValueError(f"finish_reason must be 'eos' or 'length', got {finish_reason!r}")
        token_array = np.asarray(tokens, dtype=np.int64)
        kept = np.asarray(capture.kept)
        if kept.shape != token_array.shape:
            raise ValueError(f"{len(token_array)} tokens but a capture of {len(kept)} positions")
        if len(kept) and (kept.min() < 1 or kept.max() > self.max_k):
            raise ValueError(f"set sizes must lie in [1, {self.max_k}], got [{kept.min()}, {kept.max()}]")
        if int(kept.sum()) != len(capture.ids) or len(capture.ids) != len(capture.probs):
            raise ValueError("capture arrays disagree: ids and probs must hold kept.sum() entries")
        if len(capture.covered) != len(kept):
            raise ValueError("capture arrays disagree: covered must hold one value per position")
        if len(token_array) and (token_array.min() < 0 or token_array.max() > np.iinfo(np.int32).max):
            raise ValueError("token ids must fit in int32")
        self._pending.append(
            CacheExample(int(prompt_id), int(sample_index), int(seed), finish_reason, token_array, capture)
        )

    def add_sample(self, prompt_id: int, sample_index: int, sample: Sample) -> None:
        """Buffer a captured :class:`~bdctl.sampling.Sample` (its seed and finish reason included)."""
        if sample.capture is None:
            raise ValueError("the sample has no capture: sample with capture_top_p set")
        self.add(
            prompt_id=prompt_id, sample_index=sample_index, seed=sample.seed, tokens=sample.tokens,
            finish_reason=sample.finish_reason, capture=sample.capture,
        )  # fmt: skip

    def flush(self) -> Path | None:
        """Write the buffered examples as one shard; returns its index path (None if nothing)."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        shard = _shard_name(self.writer, self._next)
        kept = [np.asarray(p.capture.kept) for p in pending]
        arrays = {
            "tokens.i32": np.concatenate([p.tokens for p in pending]),
            "kept.u16": np.concatenate(kept),
            "covered.f16": np.concatenate([np.asarray(p.capture.covered) for p in pending]),
            "cand_ids.i32": np.concatenate([np.asarray(p.capture.ids) for p in pending]),
            "cand_probs.f16": np.concatenate([np.asarray(p.capture.probs) for p in pending]),
        }
        for suffix, array in arrays.items():
            _write_file_synced(_data_path(self.directory, shard, suffix), array.astype(ARRAYS[suffix]))

        token_counts = np.array([len(p.tokens) for p in pending], dtype=np.int64)
        entry_counts = np.array([int(k.sum()) for k in kept], dtype=np.int64)
        index = {
            "format": FORMAT_VERSION,
            "writer": self.writer,
            "shard": shard,
            "top_p": self.top_p,
            "max_k": self.max_k,
            "n_examples": len(pending),
            "n_tokens": int(token_counts.sum()),
            "n_entries": int(entry_counts.sum()),
            "prompt_id": [p.prompt_id for p in pending],
            "sample_index": [p.sample_index for p in pending],
            "seed": [p.seed for p in pending],
            "finish": [p.finish_reason for p in pending],
            "token_start": (np.cumsum(token_counts) - token_counts).tolist(),
            "token_count": token_counts.tolist(),
            "cand_start": (np.cumsum(entry_counts) - entry_counts).tolist(),
        }
        path = _index_path(self.directory, shard)
        # Compact JSON (one line): the index is read by programs, and it counts in bytes per token.
        write_text_atomic(path, json.dumps(index, separators=(",", ":")) + "\n")  # the shard is visible now
        self._next += 1
        return path

    @property
    def pending(self) -> int:
        """Examples added since the last flush."""
        return len(self._pending)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an error the buffer is dropped: its batch is redone on resume.
        if exc_type is None:
            self.flush()


def written_keys(directory: str | Path) -> set[tuple[int, int]]:
    """``(prompt_id, sample_index)`` of every example in a visible shard (for resuming)."""
    directory = Path(directory)
    keys: set[tuple[int, int]] = set()
    for shard in visible_shards(directory):
        index = read_json(_index_path(directory, shard))
        keys.update(zip(index["prompt_id"], index["sample_index"], strict=True))
    return keys


def remake_hint(directory: Path) -> str:
    """How to repair a damaged cache: the command that made it, started over. (Deleting the bad
    shard is not enough: its stage is complete, so a plain rerun would have nothing to do.)"""
    from bdctl.rundir import stage_command

    stage = Path(directory).parent.name
    if not stage.startswith(("generate", "score_")):  # a cache outside a run directory: D* by default
        stage = "generate"
    return f"make the cache again: {stage_command(stage, 'RECIPE')} --force"


def _load_indices(directory: Path) -> list[dict]:
    """Every visible shard's index, each checked against its data files (one line on damage)."""
    indices = []
    for shard in visible_shards(directory):
        index = read_json(_index_path(directory, shard))
        if index.get("format") != FORMAT_VERSION:
            raise UserError(
                f"cache {directory}: shard {shard} has format {index.get('format')!r}, expected {FORMAT_VERSION}"
            )
        for suffix, dtype in ARRAYS.items():
            count = index["n_tokens"] if suffix in PER_TOKEN else index["n_entries"]
            path = _data_path(directory, shard, suffix)
            size = path.stat().st_size if path.is_file() else -1
            if size != count * dtype.itemsize:
                found = "is missing" if size < 0 else f"has {size} bytes"
                raise UserError(
                    f"cache {directory}: shard {shard} is damaged ({path.name} {found}, its index says "
                    f"{count * dtype.itemsize}); {remake_hint(directory)}"
                )
        indices.append(index)
    return indices


def _shard_bytes(directory: Path, shard: str) -> tuple[int, int]:
    """(data bytes, index bytes) of one shard."""
    data = sum(_data_path(directory, shard, suffix).stat().st_size for suffix in ARRAYS)
    return data, _index_path(directory, shard).stat().st_size


def finalize(
    directory: str | Path,
    *,
    teacher: str,
    tokenizer_hash: str,
    top_p: float,
    max_k: int,
    vocab_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the visible shards and write the cache's manifest; call once every writer is done.

    Raises `UserError` when a shard was made with another ``top_p`` or ``max_k``, or when an
    example ``(prompt_id, sample_index)`` was written twice. Returns the manifest's payload.
    """
    directory = Path(directory)
    indices = _load_indices(directory)
    if not indices:
        raise UserError(f"cache {directory}: no finished shard to finalize")
    seen: dict[tuple[int, int], str] = {}
    finish_counts = {FINISH_EOS: 0, FINISH_LENGTH: 0}
    n_tokens = n_entries = data_bytes = index_bytes = capped = 0
    prompts: set[int] = set()
    for index in indices:
        shard = index["shard"]
        if abs(index["top_p"] - top_p) > 1e-9 or index["max_k"] != max_k:
            raise UserError(
                f"cache {directory}: shard {shard} was made with top_p {index['top_p']} and max_k "
                f"{index['max_k']}, expected top_p {top_p} and max_k {max_k}"
            )
        for key in zip(index["prompt_id"], index["sample_index"], strict=True):
            if key in seen:
                raise UserError(
                    f"cache {directory}: prompt {key[0]} sample {key[1]} is in shards {seen[key]} and {shard}"
                )
            seen[key] = shard
            prompts.add(key[0])
        for reason in index["finish"]:
            finish_counts[reason] += 1
        n_tokens += index["n_tokens"]
        n_entries += index["n_entries"]
        data, idx = _shard_bytes(directory, shard)
        data_bytes, index_bytes = data_bytes + data, index_bytes + idx
        kept = np.fromfile(_data_path(directory, shard, "kept.u16"), dtype=ARRAYS["kept.u16"])
        covered = np.fromfile(_data_path(directory, shard, "covered.f16"), dtype=ARRAYS["covered.f16"])
        # A set cut short by the cap: max_k members that still cover less than p.
        capped += int(((kept == max_k) & (covered.astype(np.float32) < np.float32(top_p) - 1e-3)).sum())

    total_bytes = data_bytes + index_bytes
    payload: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer_hash": tokenizer_hash,
        "top_p": float(top_p),
        "max_k": int(max_k),
        "counts": {
            "shards": len(indices),
            "writers": len({index["writer"] for index in indices}),
            "examples": len(seen),
            "prompts": len(prompts),
            "tokens": n_tokens,
            "entries": n_entries,
            "finish": finish_counts,
        },
        "mean_set_size": n_entries / n_tokens if n_tokens else 0.0,
        "capped_fraction": capped / n_tokens if n_tokens else 0.0,
        "data_bytes": data_bytes,
        "total_bytes": total_bytes,
        "bytes_per_token": total_bytes / n_tokens if n_tokens else 0.0,
    }
    if vocab_size is not None:
        payload["vocab_size"] = int(vocab_size)
        payload["dense_fp16_bytes_per_token"] = 2 * int(vocab_size)
    if extra:
        payload["extra"] = extra
    mark_complete(directory, **payload)
    return payload


# --------------------------------------------------------------------------- reading


class TeacherCache(Sequence[CacheExample]):
    """A finished cache, memory-mapped, with random access by example.

    Examples are ordered by ``(prompt_id, sample_index)``, whatever the number of writers that
    made the cache. Shards are mapped lazily and read-only, so any number of processes (data
    loader workers, ranks) can read at once; pickling drops the maps (each process maps its own).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        found = manifest(self.directory) if self.directory.is_dir() else None
        if found is None:
            raise UserError(
                f"cache {self.directory}: not finished (no MANIFEST.json); run the generate stage to completion"
            )
        self.manifest: dict[str, Any] = found
        indices = _load_indices(self.directory)
        self._shards = [index["shard"] for index in indices]

        def column(name: str, dtype: Any) -> np.ndarray:
            if not indices:
                return np.zeros(0, dtype=dtype)
            return np.concatenate([np.asarray(index[name], dtype=dtype) for index in indices])

        shard_of = np.concatenate(
            [np.zeros(0, np.int32)] + [np.full(index["n_examples"], i, np.int32) for i, index in enumerate(indices)]
        )
        prompt_id = column("prompt_id", np.int64)
        sample_index = column("sample_index", np.int64)
        order = np.lexsort((sample_index, prompt_id))
        self._shard_of = shard_of[order]
        self._prompt_id = prompt_id[order]
        self._sample_index = sample_index[order]
        self._seed = column("seed", np.int64)[order]
        finish = [reason for index in indices for reason in index["finish"]]
        self._finish = np.array([_FINISH_CODES[r] for r in finish], dtype=np.uint8)[order]
        self._token_start = column("token_start", np.int64)[order]
        self._token_count = column("token_count", np.int64)[order]
        self._cand_start = column("cand_start", np.int64)[order]
        expected = self.manifest.get("counts", {}).get("examples")
        if expected is not None and expected != len(order):
            raise UserError(
                f"cache {self.directory}: the manifest lists {expected} examples but the shards hold "
                f"{len(order)} (shards were added or removed after it was finished); {remake_hint(self.directory)}"
            )
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    @property
    def top_p(self) -> float:
        return float(self.manifest["top_p"])

    @property
    def max_k(self) -> int:
        return int(self.manifest["max_k"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self.manifest["tokenizer_hash"])

    def __len__(self) -> int:
        return int(self._prompt_id.shape[0])

    def _arrays(self, shard: int) -> dict[str, np.ndarray]:
        arrays = self._maps.get(shard)
        if arrays is None:
            arrays = {}
            for suffix, dtype in ARRAYS.items():
                path = _data_path(self.directory, self._shards[shard], suffix)
                # np.memmap cannot map an empty file; an empty array is what it would hold.
                empty = path.stat().st_size == 0
                arrays[suffix] = np.zeros(0, dtype=dtype) if empty else np.memmap(path, dtype=dtype, mode="r")
            self._maps[shard] = arrays
        return arrays

    def __getitem__(self, i: int) -> CacheExample:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"cache indices must be integers, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for a cache of {n}")
        i = int(i) % n
        arrays = self._arrays(int(self._shard_of[i]))
        t0, count = int(self._token_start[i]), int(self._token_count[i])
        kept = np.asarray(arrays["kept.u16"][t0 : t0 + count])
        c0 = int(self._cand_start[i])
        c1 = c0 + int(kept.sum(dtype=np.int64))
        capture = Capture(
            ids=np.asarray(arrays["cand_ids.i32"][c0:c1]),
            probs=np.asarray(arrays["cand_probs.f16"][c0:c1]),
            kept=kept,
            covered=np.asarray(arrays["covered.f16"][t0 : t0 + count]),
        )
        return CacheExample(
            prompt_id=int(self._prompt_id[i]),
            sample_index=int(self._sample_index[i]),
            seed=int(self._seed[i]),
            finish_reason=_FINISH_NAMES[int(self._finish[i])],
            tokens=np.asarray(arrays["tokens.i32"][t0 : t0 + count]),
            capture=capture,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # a pickled memmap would be copied whole; each process maps its own
        return state


def open_cache(directory: str | Path) -> TeacherCache:
    """The finished cache at ``directory`` (`UserError` when it is missing or unfinished)."""
    return TeacherCache(directory)


def check(
    cache: TeacherCache | str | Path, tokenizer_hash: str, p: float | None = None, max_k: int | None = None
) -> None:
    """Refuse, with one line, a cache made with another tokenizer, or another ``p`` or ``max_k``
    when they are given."""
    if not isinstance(cache, TeacherCache):
        cache = TeacherCache(cache)
    where = f"cache {cache.directory}"
    if cache.tokenizer_hash != tokenizer_hash:
        raise UserError(
            f"{where}: made with tokenizer {cache.tokenizer_hash}, the run's tokenizer is {tokenizer_hash}; "
            "generate the cache again with this tokenizer"
        )
    if p is not None and abs(cache.top_p - float(p)) > 1e-9:
        raise UserError(f"{where}: made with top_p {cache.top_p:g}, the recipe asks for {float(p):g}")
    if max_k is not None and cache.max_k != max_k:
        raise UserError(f"{where}: made with at most {cache.max_k} candidates, the recipe asks for {max_k}")


# --------------------------------------------------------------------------- collation


def collate_candidates(
    examples: Sequence[CacheExample | Capture],
    *,
    width: int | None = None,
    offsets: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Padded tensors of the candidate sets of a batch, aligned to response positions.

    By default time index ``t`` is response position ``t`` (the state before response token
    ``t``), and ``T`` is the longest response. To align with a training batch instead, give
    ``width`` (its sequence length) and ``offsets[b]`` (where row ``b``'s position 0 lands,
    e.g. ``prompt_len - 1`` under the convention that position ``j`` predicts token ``j + 1``).

    Returns:
        cand_ids: long ``[B, T, K]`` candidate ids (0 in padding slots), ``K`` = the largest
            set in the batch.
        cand_probs: float32 ``[B, T, K]`` teacher probabilities (0 in padding slots).
        cand_mask: bool ``[B, T, K]``, True for real candidates.
        covered: float32 ``[B, T]`` mass of each set (0 where there is no response position).
        valid: bool ``[B, T]``, True where a response position is.
    """
    captures = [e.capture if isinstance(e, CacheExample) else e for e in examples]
    lengths = [len(c) for c in captures]
    if offsets is None:
        offsets = [0] * len(captures)
    if len(offsets) != len(captures):
        raise ValueError(f"{len(offsets)} offsets for {len(captures)} examples")
    needed = max((o + n for o, n in zip(offsets, lengths, strict=True)), default=0)
    if width is None:
        width = needed
    elif needed > width:
        raise ValueError(f"a response reaches position {needed} but the batch is {width} wide")
    k = max((int(np.max(c.kept)) for c in captures if len(c)), default=1)

    batch = len(captures)
    ids = np.zeros((batch, width, k), dtype=np.int64)
    probs = np.zeros((batch, width, k), dtype=np.float32)
    mask = np.zeros((batch, width, k), dtype=bool)
    covered = np.zeros((batch, width), dtype=np.float32)
    for row, (capture, offset) in enumerate(zip(captures, offsets, strict=True)):
        n = len(capture)
        if n == 0:
            continue
        member = np.arange(k)[None, :] < np.asarray(capture.kept, dtype=np.int64)[:, None]  # [n, k]
        # Boolean assignment fills in row-major order: position by position, rank by rank,
        # which is exactly the order of the flat arrays.
        ids[row, offset : offset + n][member] = capture.ids
        probs[row, offset : offset + n][member] = capture.probs
        mask[row, offset : offset + n] = member
        covered[row, offset : offset + n] = capture.covered
    return {
        "cand_ids": torch.from_numpy(ids),
        "cand_probs": torch.from_numpy(probs),
        "cand_mask": torch.from_numpy(mask),
        "covered": torch.from_numpy(covered),
        "valid": torch.from_numpy(mask[:, :, 0].copy()),
    }
