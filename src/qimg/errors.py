"""The one exception type that reaches the command line.

Every failure a user can cause (bad option, missing file, damaged image) is a
QimgError carrying qemu-img's message text and the exit code qemu-img uses; the
CLI prints it as ``PROG: message`` and exits with ``code``.
"""


class QimgError(Exception):
    def __init__(self, message: str, code: int = 1, hint: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: print qemu-img's "Try 'PROG --help' for more information" after it
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UnsupportedError(QimgError):
    """An operation the format declares it cannot do (qemu-img: -ENOTSUP)."""
