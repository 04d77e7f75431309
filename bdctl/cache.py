"""The sparse teacher cache: the teacher's responses and top-p sets, on disk, memory-mappable.

Layout of a cache directory (format 2, what bdctl writes)::

    cache/
      w0000-000000.tokens.u16      response token ids of the shard's examples, concatenated
      w0000-000000.kept.u8         set size at each generated position (one per token)
      w0000-000000.covered.u16     probability mass of each set, as a log-probability code (below)
      w0000-000000.cand_ids.u16    candidate token ids, all sets concatenated in position order
      w0000-000000.cand_logp.u8    their log-probabilities, quantised and delta-coded (below)
      w0000-000000.escapes.u16     the log-probability codes that do not fit in one byte
      w0000-000000.index.json      the shard's per-example index; written last
      w0001-000000.*               another writer's (rank's) shards
      MANIFEST.json                written last of all by `finalize`

All arrays are raw little-endian binary (``numpy.memmap``-able) with no header. Within an example,
position ``t`` predicts response token ``t``; its set is ``kept[t]`` consecutive entries of the
candidate arrays, by decreasing probability (ties: lower id first), so per-position offsets are
the cumulative sum of ``kept`` over the example (recomputed on read rather than stored).

Widths (format 2) are the fewest bytes the shard's values need, recorded in its index: token and
candidate ids take 2 bytes (``.u16``) when every id is below 65536, 3 bytes (``.u24``, little
endian) below 2**24, else 4 (``.i32``); ``kept`` takes 1 byte when ``max_k <= 255``, else 2.

Probabilities (format 2). Each probability ``q`` is stored as the integer code
``c = round(-ln(q) * 1024)`` (``LOGP_SCALE``), clipped to ``[0, 65534]``; ``65535`` is ``q = 0``.
Read back (float32) as ``exp(-c / 1024)``, ``q`` keeps a relative error of at most ``exp(1/2048) -
1 = 4.885e-4``: float16's worst-case rounding (``2**-11 = 4.883e-4``, for ``q >= 6.1e-5``; float16
is worse below) to within 0.03 %. A set's covered mass is one such code per token. Candidate codes
are stored in ``cand_logp.u8`` as differences modulo 65536, each from the previous candidate's code
in the same example (the example's first from 0); a difference of 255 or more (a negative one
too: the first member of a set, mostly) is the byte 255, and the difference itself is the next
entry of ``escapes.u16``. Sets are sorted by decreasing probability, so within a set the
differences are small and most fit in the byte.

Format 1 (caches made before format 2; still read, and written by ``CacheWriter(format=1)``):
``tokens.i32``, ``kept.u16``, ``covered.f16`` (each set's mass), ``cand_ids.i32`` and
``cand_probs.f16`` (float16 probabilities): 8 bytes per token and 6 per candidate.

A shard's index (JSON) holds the format version, ``top_p`` and ``max_k``, the element counts of
each data file (format 2: also ``id_bytes``, ``kept_bytes``, ``logp_scale`` and ``n_escapes``), and
one column per field: ``prompt_id``, ``sample_index``, ``seed``, ``finish`` ("eos" / "length"),
``token_start`` / ``token_count`` (into the per-token arrays), ``cand_start`` (into the candidate
arrays; the count is the sum of the example's ``kept``) and, format 2, ``escape_start``. Each shard
is read by its own format's rule; the manifest's ``format`` is the highest among its shards. A
format this bdctl does not know is refused with one line naming the version and the file.

Visibility rule: the data files are written and fsynced first, then the index is written
atomically; a shard without its index (a writer that died) does not exist for anyone. The cache
as a whole does not exist until `finalize` has written ``MANIFEST.json`` (teacher, tokenizer hash,
``top_p``, ``max_k``, counts, bytes); `TeacherCache` refuses a directory without it.

Bytes per generated token (format 2, vocabulary <= 65536, ``max_k <= 255``): 2 (token) + 1 (kept)
+ 2 (covered) + 3 per candidate (2 id, 1 log-probability byte) + 2 per escape, plus the index;
about 3.5 per candidate at a mean set size of 25 with top-1 probability 0.3
(benchmarks/bench_cache.py), against 6 in format 1 and ``2 |V|`` for dense fp16 logits.
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

from bdctl.errors import UserError, space_for
from bdctl.rundir import manifest, mark_complete, read_json, write_text_atomic
from bdctl.sampling import FINISH_EOS, FINISH_LENGTH, Sample
from bdctl.topp import Capture

FORMAT_VERSION = 2  # what new caches are written as
READABLE_FORMATS = (1, 2)

# Format 1 data files of a shard: suffix -> dtype. Little-endian explicitly, so caches move between machines.
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

# Format 2: log-probability codes (module docstring).
LOGP_SCALE = 1024  # codes per nat: a read-back probability is within exp(1/2048) - 1 = 4.885e-4 of the stored one
LOGP_ZERO = 65535  # the code of probability 0
_MAX_CODE = LOGP_ZERO - 1
_ESCAPE = 255  # a cand_logp byte that says "the difference is the next escapes.u16 entry"
_ID_SUFFIX = {2: "u16", 3: "u24", 4: "i32"}
# Read-back probability of each code: exact float64 exp rounded once to float32, the same on every machine.
_CODE_PROBS = np.exp(-np.arange(LOGP_ZERO + 1, dtype=np.float64) / LOGP_SCALE).astype(np.float32)
_CODE_PROBS[LOGP_ZERO] = 0.0


def logp_codes(probs: np.ndarray) -> np.ndarray:
    """Format 2's uint16 code of each probability: ``round(-ln q * LOGP_SCALE)``, 0 -> ``LOGP_ZERO``."""
    q = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        code = np.rint(-np.log(q) * LOGP_SCALE)
    return np.where(q > 0, np.clip(code, 0, _MAX_CODE), LOGP_ZERO).astype(np.uint16)


def code_probs(codes: np.ndarray) -> np.ndarray:
    """float32 probabilities of format 2 codes (the inverse of `logp_codes`, up to its rounding)."""
    return _CODE_PROBS[np.asarray(codes, dtype=np.uint16)]


def _id_bytes(largest: int) -> int:
    """The fewest bytes (2, 3 or 4) that hold ids up to ``largest``."""
    return 2 if largest < 1 << 16 else 3 if largest < 1 << 24 else 4


def _v2_files(index: dict) -> dict[str, int]:
    """Format 2 data files of a shard: suffix -> size in bytes, from its index."""
    ids, kept = _ID_SUFFIX[index["id_bytes"]], "u8" if index["kept_bytes"] == 1 else "u16"
    tokens, entries = index["n_tokens"], index["n_entries"]
    return {
        f"tokens.{ids}": tokens * index["id_bytes"],
        f"kept.{kept}": tokens * index["kept_bytes"],
        "covered.u16": 2 * tokens,
        f"cand_ids.{ids}": entries * index["id_bytes"],
        "cand_logp.u8": entries,
        "escapes.u16": 2 * index["n_escapes"],
    }


def _shard_files(index: dict) -> dict[str, int]:
    """A shard's data files (suffix -> size in bytes) by its format."""
    if index["format"] == 1:
        counts = {suffix: index["n_tokens"] if suffix in PER_TOKEN else index["n_entries"] for suffix in ARRAYS}
        return {suffix: counts[suffix] * dtype.itemsize for suffix, dtype in ARRAYS.items()}
    return _v2_files(index)


def _encode_ids(ids: np.ndarray, width: int) -> np.ndarray:
    """Little-endian ids in ``width`` bytes (as a byte array when 3)."""
    if width == 2:
        return ids.astype("<u2")
    if width == 4:
        return ids.astype("<i4")
    return np.ascontiguousarray(ids.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3])


def _decode_ids(data: np.ndarray, start: int, stop: int, width: int) -> np.ndarray:
    """int32 ids ``[start, stop)`` of a memory-mapped id file of ``width`` bytes per id."""
    if width == 2:
        return data[start:stop].astype(np.int32)
    if width == 4:
        return np.asarray(data[start:stop])
    out = np.zeros((stop - start, 4), dtype=np.uint8)
    out[:, :3] = np.asarray(data[3 * start : 3 * stop]).reshape(-1, 3)
    return out.view("<i4").reshape(-1)


def _encode_logp(probs: np.ndarray, example_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cand_logp bytes, escapes) of concatenated examples' candidates (module docstring)."""
    code = logp_codes(probs).astype(np.int64)
    previous = np.zeros_like(code)
    previous[1:] = code[:-1]
    previous[example_starts[example_starts < len(code)]] = 0  # each example starts from 0
    step = (code - previous) % 65536
    escaped = step >= _ESCAPE
    return np.where(escaped, _ESCAPE, step).astype(np.uint8), step[escaped].astype("<u2")


def _decode_logp(steps: np.ndarray, escapes: np.ndarray) -> np.ndarray:
    """float32 probabilities of one example's candidates from its cand_logp bytes and escapes."""
    code = steps.astype(np.int64)
    if len(escapes):
        code[steps == _ESCAPE] = escapes
    # Codes are running sums of the differences, modulo 65536 as the differences were taken.
    # torch's cumsum, several times faster than numpy's on these arrays (the read path's main cost).
    code = torch.cumsum(torch.from_numpy(code), 0).numpy()
    np.bitwise_and(code, 0xFFFF, out=code)
    return np.take(_CODE_PROBS, code)


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

    ``format`` is the cache format to write (module docstring): by default the format of the
    shards already in the directory (a resumed cache stays in one format), else ``FORMAT_VERSION``.
    """

    def __init__(self, directory: str | Path, writer: int, *, top_p: float, max_k: int, format: int | None = None):
        if not 0 <= writer <= 9999:
            raise ValueError(f"writer number must lie in [0, 9999], got {writer}")
        if not 1 <= max_k <= _MAX_KEPT:
            raise ValueError(f"max_k must lie in [1, {_MAX_KEPT}], got {max_k}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.top_p = float(top_p)
        self.max_k = int(max_k)
        if format is None:
            found = {
                read_json(_index_path(self.directory, shard)).get("format") for shard in visible_shards(self.directory)
            }
            format = found.pop() if len(found) == 1 else FORMAT_VERSION
        if format not in READABLE_FORMATS:
            raise ValueError(f"cache format must be one of {READABLE_FORMATS}, got {format!r}")
        self.format = int(format)
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
        ids = np.asarray(capture.ids)
        if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError("candidate ids must fit in int32")
        probs = np.asarray(capture.probs)
        if len(probs) and not (np.isfinite(probs).all() and probs.min() >= 0):
            raise ValueError("candidate probabilities must be finite and non-negative")
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
        tokens = np.concatenate([np.zeros(0, np.int64)] + [p.tokens for p in pending])
        all_kept = np.concatenate([np.zeros(0, np.int64)] + kept).astype(np.int64)
        ids = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(p.capture.ids) for p in pending])
        probs = np.concatenate([np.zeros(0, np.float32)] + [np.asarray(p.capture.probs) for p in pending])
        token_counts = np.array([len(p.tokens) for p in pending], dtype=np.int64)
        entry_counts = np.array([int(k.sum()) for k in kept], dtype=np.int64)
        cand_start = np.cumsum(entry_counts) - entry_counts
        layout: dict[str, Any] = {}
        arrays: dict[str, np.ndarray]
        covered = np.concatenate([np.zeros(0, np.float32)] + [np.asarray(p.capture.covered) for p in pending])
        if self.format == 1:
            arrays = {
                "tokens.i32": tokens, "kept.u16": all_kept, "covered.f16": covered, "cand_ids.i32": ids,
                "cand_probs.f16": probs,
            }  # fmt: skip
            arrays = {suffix: array.astype(ARRAYS[suffix]) for suffix, array in arrays.items()}
        else:
            width = _id_bytes(max(int(tokens.max(initial=0)), int(ids.max(initial=0))))
            steps, escapes = _encode_logp(probs, cand_start)
            kept_bytes = 1 if self.max_k <= np.iinfo(np.uint8).max else 2
            # escape_start goes with the per-example columns: escapes before each example's first candidate
            escaped = np.concatenate([[0], np.cumsum(steps == _ESCAPE, dtype=np.int64)])
            layout = {
                "id_bytes": width, "kept_bytes": kept_bytes, "logp_scale": LOGP_SCALE, "n_escapes": len(escapes),
            }  # fmt: skip
            suffix = _ID_SUFFIX[width]
            arrays = {
                f"tokens.{suffix}": _encode_ids(tokens, width),
                f"kept.{'u8' if kept_bytes == 1 else 'u16'}": all_kept.astype("<u1" if kept_bytes == 1 else "<u2"),
                "covered.u16": logp_codes(covered).astype("<u2"),
                f"cand_ids.{suffix}": _encode_ids(ids, width),
                "cand_logp.u8": steps,
                "escapes.u16": escapes,
            }
        needed = sum(array.nbytes for array in arrays.values())
        try:
            with space_for(self.directory, f"cache shard {shard}", needed):
                for name, array in arrays.items():
                    _write_file_synced(_data_path(self.directory, shard, name), array)
        except UserError:
            for name in arrays:  # without its index the shard never counted: free what it took
                _data_path(self.directory, shard, name).unlink(missing_ok=True)
            raise

        index: dict[str, Any] = {
            "format": self.format,
            "writer": self.writer,
            "shard": shard,
            "top_p": self.top_p,
            "max_k": self.max_k,
            "n_examples": len(pending),
            "n_tokens": int(token_counts.sum()),
            "n_entries": int(entry_counts.sum()),
            **layout,
            "prompt_id": [p.prompt_id for p in pending],
            "sample_index": [p.sample_index for p in pending],
            "seed": [p.seed for p in pending],
            "finish": [p.finish_reason for p in pending],
            "token_start": (np.cumsum(token_counts) - token_counts).tolist(),
            "token_count": token_counts.tolist(),
            "cand_start": cand_start.tolist(),
        }
        if self.format != 1:
            index["escape_start"] = escaped[cand_start].tolist()
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
    shard is not enough: its stage is complete, so a plain rerun would have nothing to do.) The
    recipe is the one the stage's job.json names, so the command can be pasted as it is."""
    from bdctl.rundir import stage_command

    directory = Path(directory)
    stage = directory.parent.name
    if not stage.startswith(("generate", "score_")):  # a cache outside a run directory: D* by default
        stage = "generate"
    try:
        recipe = read_json(directory.parent / "job.json")["recipe_path"]
    except (OSError, ValueError, TypeError, KeyError):
        recipe = None
    if not isinstance(recipe, str):
        return f"make the cache again: rerun the command that made it with --force ({stage_command(stage, 'RECIPE')})"
    return f"make the cache again: {stage_command(stage, recipe)} --force"


def shard_damage(directory: Path, shard: str) -> str | None:
    """What is wrong with a visible shard, in words, or None when its index reads and every data
    file has the size the index says (a copy or a disk that cut a file short)."""
    path = _index_path(directory, shard)
    try:
        index = read_json(path)
        if index.get("format") not in READABLE_FORMATS:
            return None  # not damage: a newer format, which `check_format` refuses with its own line
        expected_sizes = _shard_files(index)
        index["prompt_id"], index["sample_index"]  # noqa: B018 (the columns a resume reads)
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"{path.name} is not a complete index"
    for suffix, expected in expected_sizes.items():
        data = _data_path(directory, shard, suffix)
        size = data.stat().st_size if data.is_file() else -1
        if size != expected:
            found = "is missing" if size < 0 else f"has {size} bytes"
            return f"{data.name} {found}, its index says {expected}"
    return None


def drop_damaged_shards(directory: str | Path) -> list[str]:
    """Before an unfinished cache is continued: remove every shard that `shard_damage` finds
    damaged (index first, so it stops counting at once), so that the batches it held are computed
    again and only those. Returns "shard: what was wrong" for each one removed."""
    directory = Path(directory)
    dropped = []
    for shard in visible_shards(directory):
        damage = shard_damage(directory, shard)
        if damage is None:
            continue
        _index_path(directory, shard).unlink()
        for path in directory.glob(f"{shard}.*"):
            path.unlink()
        dropped.append(f"{shard}: {damage}")
    return dropped


def check_format(version: Any, path: Path) -> None:
    """One line when ``path`` (a shard index or a manifest) is in a format this bdctl cannot read."""
    if version not in READABLE_FORMATS:
        readable = " and ".join(str(v) for v in READABLE_FORMATS)
        raise UserError(
            f"cache file {path} has format {version!r}; this bdctl reads formats {readable} "
            "(a cache made by a newer bdctl: upgrade bdctl, or make the cache again)"
        )


def _load_indices(directory: Path) -> list[dict]:
    """Every visible shard's index, each checked against its data files (one line on damage)."""
    indices = []
    for shard in visible_shards(directory):
        damage = shard_damage(directory, shard)
        if damage is not None:
            raise UserError(f"cache {directory}: shard {shard} is damaged ({damage}); {remake_hint(directory)}")
        path = _index_path(directory, shard)
        index = read_json(path)
        check_format(index.get("format"), path)
        indices.append(index)
    return indices


def _shard_bytes(directory: Path, index: dict) -> tuple[int, int]:
    """(data bytes, index bytes) of one shard."""
    shard = index["shard"]
    data = sum(_data_path(directory, shard, suffix).stat().st_size for suffix in _shard_files(index))
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
        data, idx = _shard_bytes(directory, index)
        data_bytes, index_bytes = data_bytes + data, index_bytes + idx
        kept, covered = _ShardData(directory, index).sets()
        # A set cut short by the cap: max_k members that still cover less than p.
        capped += int(((kept == max_k) & (covered.astype(np.float32) < np.float32(top_p) - 1e-3)).sum())

    total_bytes = data_bytes + index_bytes
    payload: dict[str, Any] = {
        "format": max(index["format"] for index in indices),
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


def _map(path: Path, dtype: Any) -> np.ndarray:
    # np.memmap cannot map an empty file; an empty array is what it would hold.
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class _ShardData:
    """One shard's data files, memory-mapped read-only, decoded by the shard's format."""

    def __init__(self, directory: Path, index: dict):
        self.format = int(index["format"])
        shard = index["shard"]
        if self.format == 1:
            self.arrays = {
                suffix: _map(_data_path(directory, shard, suffix), dtype) for suffix, dtype in ARRAYS.items()
            }
            return
        self.id_bytes = int(index["id_bytes"])
        id_dtype = {2: "<u2", 3: np.uint8, 4: "<i4"}[self.id_bytes]
        suffixes = list(_v2_files(index))  # tokens, kept, covered, cand_ids, cand_logp, escapes
        dtypes = [id_dtype, "<u1" if index["kept_bytes"] == 1 else "<u2", "<u2", id_dtype, np.uint8, "<u2"]
        # Plain ndarray views of the maps: slicing a np.memmap subclass costs more than decoding a short set.
        self.tokens, self.kept, self.covered, self.ids, self.steps, self.escapes = (
            np.asarray(_map(_data_path(directory, shard, suffix), dtype))
            for suffix, dtype in zip(suffixes, dtypes, strict=True)
        )

    def tokens_and_capture(self, t0: int, count: int, c0: int, e0: int, e1: int) -> tuple[np.ndarray, Capture]:
        """One example's response tokens ``[t0, t0 + count)`` and their sets, which start at candidate
        ``c0`` and (format 2) use escapes ``[e0, e1)``."""
        if self.format == 1:
            arrays = self.arrays
            kept = np.asarray(arrays["kept.u16"][t0 : t0 + count])
            c1 = c0 + int(kept.sum(dtype=np.int64))
            capture = Capture(
                ids=np.asarray(arrays["cand_ids.i32"][c0:c1]),
                probs=np.asarray(arrays["cand_probs.f16"][c0:c1]),
                kept=kept,
                covered=np.asarray(arrays["covered.f16"][t0 : t0 + count]),
            )
            return np.asarray(arrays["tokens.i32"][t0 : t0 + count]), capture
        kept = self.kept[t0 : t0 + count]
        c1 = c0 + int(kept.sum(dtype=np.int64))
        probs = _decode_logp(self.steps[c0:c1], self.escapes[e0:e1])
        covered = np.take(_CODE_PROBS, self.covered[t0 : t0 + count])
        capture = Capture(ids=_decode_ids(self.ids, c0, c1, self.id_bytes), probs=probs, kept=kept, covered=covered)
        return _decode_ids(self.tokens, t0, t0 + count, self.id_bytes), capture

    def sets(self) -> tuple[np.ndarray, np.ndarray]:
        """(kept, covered) of every position of the shard."""
        if self.format == 1:
            return np.asarray(self.arrays["kept.u16"]), np.asarray(self.arrays["covered.f16"])
        return self.kept, np.take(_CODE_PROBS, self.covered)


def _escape_ranges(index: dict) -> list[tuple[int, int]]:
    """Each example's escapes ``[start, stop)`` in its shard (all empty in format 1)."""
    if index["format"] == 1:
        return [(0, 0)] * index["n_examples"]
    starts = index["escape_start"]
    return list(zip(starts, starts[1:] + [index["n_escapes"]], strict=True))


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
        check_format(found.get("format", 1), self.directory / "MANIFEST.json")
        self.manifest: dict[str, Any] = found
        indices = _load_indices(self.directory)
        self._indices = [{k: v for k, v in index.items() if not isinstance(v, list)} for index in indices]

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
        escapes = np.array([r for index in indices for r in _escape_ranges(index)], dtype=np.int64).reshape(-1, 2)
        self._escape_range = escapes[order]
        expected = self.manifest.get("counts", {}).get("examples")
        if expected is not None and expected != len(order):
            raise UserError(
                f"cache {self.directory}: the manifest lists {expected} examples but the shards hold "
                f"{len(order)} (shards were added or removed after it was finished); {remake_hint(self.directory)}"
            )
        self._maps: dict[int, _ShardData] = {}

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

    def _data(self, shard: int) -> _ShardData:
        data = self._maps.get(shard)
        if data is None:
            data = self._maps[shard] = _ShardData(self.directory, self._indices[shard])
        return data

    def __getitem__(self, i: int) -> CacheExample:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"cache indices must be integers, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for a cache of {n}")
        i = int(i) % n
        tokens, capture = self._data(int(self._shard_of[i])).tokens_and_capture(
            int(self._token_start[i]),
            int(self._token_count[i]),
            int(self._cand_start[i]),
            *self._escape_range[i].tolist(),
        )
        return CacheExample(
            prompt_id=int(self._prompt_id[i]),
            sample_index=int(self._sample_index[i]),
            seed=int(self._seed[i]),
            finish_reason=_FINISH_NAMES[int(self._finish[i])],
            tokens=tokens,
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
