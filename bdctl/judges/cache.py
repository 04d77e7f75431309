"""An append-only, crash-safe cache of judge verdicts (one JSON object per line).

Why JSONL: each verdict is one ``write`` of one line followed by ``fsync``, so a finished
verdict is on disk before the next request is answered, and a crash can only ever damage the
last, unterminated line. On opening, such a torn tail is cut off if it does not parse (it never
held a finished verdict) and kept if it does (the crash came between the record and its newline).
Any other unreadable line means the file was edited or is not a verdict cache: that is a
``UserError`` naming the line, never a silent skip.

Only verdicts are stored: a reply that is not A, B or Tie is not an answer to keep (the same
request is asked again by a later run). Records with a null verdict, which older versions wrote,
are skipped on loading for the same reason.

Keys are SHA-256 hashes of everything that determines a verdict: the judge's identity (backend,
model, endpoint, prompt version, decoding limits), the instruction, the input and the two answers
in the order shown. Swapping the answers gives another key, so both orders are stored.

One process writes a cache at a time; concurrent writers from several processes are not
supported (threads within a process are: writes are serialised by a lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from bdctl.errors import UserError, space_for
from bdctl.judges.base import JudgeOutput, JudgeRequest
from bdctl.judges.prompt import VERDICTS, Verdict


def verdict_key(identity: Mapping[str, str], request: JudgeRequest) -> str:
    """The cache key of ``request`` put to the judge described by ``identity``."""
    payload = {"judge": dict(identity), "request": asdict(request)}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedVerdict:
    """One stored verdict."""

    key: str
    verdict: Verdict
    raw: str
    scores: Mapping[str, float]

    def output(self) -> JudgeOutput:
        """The stored verdict as the backend gave it."""
        return JudgeOutput(raw=self.raw, verdict=self.verdict, scores=dict(self.scores))


class VerdictCache:
    """Verdicts by key, loaded from and appended to ``path`` (created on first write)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries: dict[str, CachedVerdict] = {}
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        # Set when the file ends in a complete record without its newline: the next write
        # must start a new line first.
        self._needs_newline = False
        self._torn_bytes = 0
        self._load()

    # -- reading --------------------------------------------------------------------------

    def _load(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise UserError(f"verdict cache {self.path} is not a file")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # split() leaves the text after the last newline as the final element: empty for a
        # well-formed file, the torn record otherwise.
        tail = lines.pop()
        for number, line in enumerate(lines, start=1):
            if line.strip():
                self._add(self._parse(line, number))
        if tail.strip():
            try:
                self._add(self._parse(tail, len(lines) + 1))
                self._needs_newline = True
            except UserError:
                self._torn_bytes = len(tail)

    def _parse(self, line: bytes, number: int) -> CachedVerdict | None:
        where = f"verdict cache {self.path} line {number}"
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{where} is not valid JSON ({exc}); delete the line or the file") from None
        if not isinstance(record, dict):
            raise UserError(f"{where} is not a JSON object; delete the line or the file")
        key, verdict, raw, scores = (record.get(name) for name in ("key", "verdict", "raw", "scores"))
        if not isinstance(key, str) or not isinstance(raw, str):
            raise UserError(f"{where} lacks a string 'key' and 'raw'; delete the line or the file")
        if verdict is not None and verdict not in VERDICTS:
            raise UserError(f"{where} has verdict {verdict!r}, expected one of A, B, Tie or null")
        if not isinstance(scores, dict) or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in scores.values()
        ):
            raise UserError(f"{where} has no 'scores' object of numbers; delete the line or the file")
        if verdict is None:
            return None  # an unparseable reply stored by an older version: not a verdict, ask again
        return CachedVerdict(key=key, verdict=verdict, raw=raw, scores={k: float(v) for k, v in scores.items()})

    def _add(self, entry: CachedVerdict | None) -> None:
        # A key stored twice (two runs racing, or a rerun after a lost write) keeps the latest.
        if entry is not None:
            self._entries[entry.key] = entry

    def get(self, key: str) -> CachedVerdict | None:
        """The stored verdict for ``key``, or ``None`` if it was never judged."""
        with self._lock:
            return self._entries.get(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def torn_bytes(self) -> int:
        """Size of the unfinished last record found on opening (cut off before the next write)."""
        return self._torn_bytes

    # -- writing --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        identity: Mapping[str, str],
        request: JudgeRequest,
        output: JudgeOutput,
    ) -> CachedVerdict:
        """Store a finished verdict durably (written and fsync'ed before returning)."""
        if output.verdict is None:
            raise ValueError("an unparseable reply is not a verdict and is not stored")
        record: dict[str, Any] = {
            "key": key,
            "verdict": output.verdict,
            "raw": output.raw,
            "scores": dict(output.scores),
            "judge": dict(identity),
            # The judged texts make the file auditable on its own.
            **asdict(request),
        }
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        entry = CachedVerdict(key=key, verdict=output.verdict, raw=output.raw, scores=dict(output.scores))
        with self._lock, space_for(self.path.parent, self.path.name, len(line.encode("utf-8"))):
            handle = self._open_for_append()
            if self._needs_newline:
                line = "\n" + line
                self._needs_newline = False
            # One write per record: a crash leaves at most this line torn, never an earlier one.
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            self._add(entry)
        return entry

    def _open_for_append(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._torn_bytes:
                # Cut the torn record off so that the file is whole lines again.
                with open(self.path, "r+b") as handle:
                    handle.truncate(self.path.stat().st_size - self._torn_bytes)
                self._torn_bytes = 0
            self._file = open(self.path, "ab")
        return self._file

    def close(self) -> None:
        """Close the file (further ``put`` calls reopen it)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> VerdictCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
