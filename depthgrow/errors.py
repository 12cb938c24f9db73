"""The exceptions the command line turns into one line and an exit status.

Anything raised as a :class:`DepthgrowError` is the user's to fix (a bad option, a missing file, a
checkpoint of another run): the command line prints its message on one line and exits with its
``exit_status`` (2), without a traceback. Two kinds of it stop a run that has started, each with a status
of its own so that a scheduler can tell them apart: :class:`Diverged` (3) and :class:`OutputWriteError`
(74, sysexits' EX_IOERR). An interrupt (Ctrl-C, SIGTERM) exits with 130. Every other exception is a bug
in depthgrow and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

INTERRUPTED_STATUS = 130
INTERRUPTED_MESSAGE = "depthgrow: interrupted"


class DepthgrowError(Exception):
    """A problem with the user's input, stated in one line that names what to change."""

    exit_status = 2


class Diverged(DepthgrowError):
    """The loss became non-finite or exploded; no checkpoint was written after it."""

    exit_status = 3


class OutputWriteError(DepthgrowError):
    """A run's output (checkpoint, log, summary) could not be written: disk full, permissions, I/O error."""

    exit_status = 74

    @classmethod
    def of(cls, path: Path, error: OSError, *, needed_bytes: int | None = None, note: str = "") -> OutputWriteError:
        """The one line for ``error`` on writing ``path``: when space ran out, how much the file needed and
        how much its file system has free; ``note`` says what was kept."""
        text = f"cannot write {path}: {error.strerror or error}"
        if error.errno in _OUT_OF_SPACE and needed_bytes is not None:
            text += f" (it needs {_size(needed_bytes)}"
            with contextlib.suppress(OSError):
                text += f"; {_size(shutil.disk_usage(path.parent).free)} free there"
            text += ")"
        return cls(f"{text}; {note}" if note else text)


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError that caused ``error`` (torch.save wraps a failed write in a RuntimeError), if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
