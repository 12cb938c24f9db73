"""The ``depthgrow`` command's entry point: Ctrl-C and SIGTERM are handled before torch is imported.

Importing torch and the rest takes a second or more; an interrupt in that second would otherwise print
a traceback of the import machinery (Ctrl-C) or end the process without a word (SIGTERM). From the
first line here on, either one ends the command with one line and exit status 130, whenever it comes;
while a run trains, the trainer takes both over to stop after a whole step with a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

from depthgrow.errors import INTERRUPTED_MESSAGE, INTERRUPTED_STATUS


class _Interrupts:
    """The handler of SIGINT and SIGTERM until the trainer takes them over: it raises KeyboardInterrupt and
    keeps the signals it received, because a KeyboardInterrupt raised inside a ``__del__`` or a library's
    catch-all during the imports is swallowed there (seen in CI: the run then trained on); the command
    checks ``received`` after the imports, and the trainer when it takes the signals over."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the command; an interrupt anywhere (one the trainer has not turned into a stop) ends it here."""
    interrupts = _Interrupts()
    signal.signal(signal.SIGTERM, interrupts)
    signal.signal(signal.SIGINT, interrupts)
    try:
        from depthgrow.cli import main as cli_main

        if interrupts.received:
            raise KeyboardInterrupt
        return cli_main(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        # not a return: an interrupt that lands in code torch's import runs through PyRun_* is marked
        # unhandled for good, and the interpreter would then end the process by SIGINT (status -2, about
        # 1 start in 10 here) whatever this function returns; everything that writes has closed by now
        os._exit(INTERRUPTED_STATUS)
