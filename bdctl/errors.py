"""The one error type for mistakes a user can fix (bad recipe, missing file, malformed data).

The CLI turns a `UserError` into a single red line and exit code 2, never a traceback.
Its message should name the file, line or key at fault and what was expected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A problem in the user's input: the message is shown as is, on one line.

    Subclasses (and a launcher relaying a rank's failure) may carry another exit code.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def decode_utf8(data: bytes, path: object, first_line: int = 1) -> str:
    """The text of a user's file (or of the part starting at line `first_line`), which must be
    UTF-8: other bytes are a user error naming the file and the line, not a UnicodeDecodeError
    traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None


# A full disk or an exhausted quota, however the library that wrote reports it: an OSError's errno,
# or the words of one that lost it (safetensors: "No space left on device (os error 28)").
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# torch.save and numpy's tofile report a short write without the errno ("unexpected pos 576 vs
# 534", "file write failed", "100000 requested and 0 written"): such an error counts as a full disk
# when the disk has indeed run (almost) out.
_SHORT_WRITE_WORDS = ("unexpected pos", "file write failed", "pytorchstreamwriter", "requested and")
_NEARLY_FULL = 1 << 20


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk or the quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(words in str(current).lower() for words in _DISK_FULL_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def free_bytes(directory: Path) -> int | None:
    """Free space on the file system that holds `directory` (its nearest existing parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_bytes(count: float) -> str:
    """ "1.5 GiB": a size for a person."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def disk_full_error(directory: Path, what: str, needed: int | None) -> UserError:
    """The one line for a write that found the disk full: where, what, how much it needed."""
    free = free_bytes(directory)
    need = f"it needs about {human_bytes(needed)}" if needed else "it needs more space"
    have = f", {human_bytes(free)} free" if free is not None else ""
    return UserError(
        f"{directory}: no space left on the device (or quota) writing {what}: {need}{have}; "
        "free some space, or set run_dir to a larger disk, and run the command again"
    )


@contextlib.contextmanager
def space_for(directory: Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Run a step that writes into `directory`; a full disk or quota on the way ends in
    `disk_full_error` (one line, exit 2) instead of the writing library's traceback. The step's
    own "write, then mark complete" order keeps what it left from looking complete."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if is_disk_full(exc) or _short_write(exc, directory):
            raise disk_full_error(directory, what, needed) from exc
        raise


def _short_write(exc: BaseException, directory: Path) -> bool:
    if not isinstance(exc, (RuntimeError, OSError)) or not any(w in str(exc).lower() for w in _SHORT_WRITE_WORDS):
        return False
    free = free_bytes(directory)
    return free is not None and free < _NEARLY_FULL


def not_a_regular_file(path: Path) -> str | None:
    """Why `path` is not a file bdctl can read as data (in words), or None when it is one. A FIFO
    or a device would block or never end, and a loop of symbolic links is not "not found"."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        return "file not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links that never reaches a file; point it at the file itself"
        raise
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file: bdctl reads it more than once; save its contents to a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    return "not a regular file"


def user_error_from(exc: BaseException) -> UserError | None:
    """The one place where an exception a user can cause becomes a `UserError` (one line, exit 2).

    Used by the CLI (`bdctl.cli.common.user_errors`) and by every rank (`bdctl.worker`), so both
    say the same line for the same failure:

        UserError                  itself
        OSError with a file name   PermissionError, IsADirectoryError, NotADirectoryError,
                                   FileNotFoundError, a full or read-only disk: "<path>: <reason>"
        a full disk or quota       without a file name (a write's errno, safetensors' words): one
                                   line; the steps that write (`space_for`) name the directory
                                   and the space they needed
        UnicodeDecodeError         a file that is not UTF-8 (callers that know the file say which:
                                   `decode_utf8`)
        SafetensorError            damaged weights (`bdctl.models` names the file where it knows it)
        DistNetworkError,          a rendezvous that failed: a node that cannot reach the master,
        DistStoreError             or a master whose nodes never came

    Anything else is a bug or the machine: None, and the caller keeps the traceback. Matched by
    class name where the class lives in torch or safetensors, so that importing this module
    imports neither (`bdctl --help` stays instant).
    """
    if isinstance(exc, UserError):
        return exc
    if is_disk_full(exc) and not (isinstance(exc, OSError) and exc.filename is not None):
        # A write outside the steps `space_for` guards, which did not say where: still one line.
        return UserError(
            f"no space left on the device (or quota): {_first_line(exc)}; free some space, or set "
            "run_dir to a larger disk, and run the command again"
        )
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = (exc.strerror or type(exc).__name__).lower()
        hint = _OS_HINTS.get(type(exc), "")
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        return UserError(f"{where}: {reason}{hint}")
    if isinstance(exc, UnicodeDecodeError):
        return UserError(
            f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"
        )
    name = type(exc).__name__
    if name == "SafetensorError":
        return UserError(f"damaged safetensors weights ({_first_line(exc)}); copy or export the model again")
    if name in ("DistNetworkError", "DistStoreError"):
        return UserError(f"rendezvous failed: {_first_line(exc)}")
    return None


_OS_HINTS: dict[type, str] = {
    PermissionError: " (check the permissions of the path and of its directory)",
    NotADirectoryError: " (a part of the path is a file, not a directory)",
    IsADirectoryError: " (expected a file)",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
