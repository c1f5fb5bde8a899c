"""The one exception type that reaches the command line.

Every failure a user can cause (bad option, missing file, damaged image) is a
QimgError carrying qemu-img's message text and the exit code qemu-img uses; the
CLI prints it as ``PROG: message`` and exits with ``code``.

Some qemu errors carry hint text after the message (error_append_hint, or an
error_printf after error_report).  qemu prints that text as it is, without the
program name; it goes in ``detail`` (raw, with its own newlines), never in
``message``.
"""


class QimgError(Exception):
    def __init__(self, message: str, code: int = 1, hint: bool = False, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: print qemu-img's "Try 'PROG --help' for more information" after it
        self.hint = hint
        #: text printed as it is after the message (qemu's hint lines)
        self.detail = detail

    def full_detail(self) -> str:
        """The detail of this error or, when a caller re-raised it with a
        prefix (``raise QimgError(f"...: {e.message}") from None``), of the
        error it wraps: qemu's error_prepend keeps the hint, so must we."""
        err: BaseException | None = self
        while isinstance(err, QimgError):
            if err.detail:
                return err.detail
            err = err.__cause__ or err.__context__
        return ""

    def __str__(self) -> str:
        return self.message


class UnsupportedError(QimgError):
    """An operation the format declares it cannot do (qemu-img: -ENOTSUP)."""
