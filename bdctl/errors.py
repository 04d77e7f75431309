"""The one error type for mistakes a user can fix (bad recipe, missing file, malformed data).

The CLI turns a `UserError` into a single red line and exit code 2, never a traceback.
Its message should name the file, line or key at fault and what was expected.
"""


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


def user_error_from(exc: BaseException) -> UserError | None:
    """The one place where an exception a user can cause becomes a `UserError` (one line, exit 2).

    Used by the CLI (`bdctl.cli.common.user_errors`) and by every rank (`bdctl.worker`), so both
    say the same line for the same failure:

        UserError                  itself
        OSError with a file name   PermissionError, IsADirectoryError, NotADirectoryError,
                                   FileNotFoundError, a full or read-only disk: "<path>: <reason>"
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
