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
