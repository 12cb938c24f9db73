"""Run outputs while training: the JSONL log and the progress display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from depthgrow.errors import DepthgrowError

LOG_NAME = "log.jsonl"


class JsonlLog:
    """One JSON object per line. ``truncate_to`` cuts the file back to a byte offset recorded in a
    checkpoint, dropping what a killed run wrote after it, so a resumed log reads as one run."""

    def __init__(self, path: str | Path, *, truncate_to: int | None = None) -> None:
        self.path = Path(path)
        if truncate_to is None:
            self._handle = self.path.open("w")
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < truncate_to:
            raise DepthgrowError(
                f"{self.path} holds {size} bytes but the checkpoint was written after {truncate_to}: "
                "the log was cut or replaced, so the run cannot be resumed as one log"
            )
        self._handle = self.path.open("r+")
        self._handle.truncate(truncate_to)
        self._handle.seek(truncate_to)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")

    def flush(self) -> int:
        """Flush and return the byte offset a resume should truncate back to."""
        self._handle.flush()
        return self._handle.tell()

    def close(self) -> None:
        self._handle.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Progress:
    """A tqdm bar on a terminal; elsewhere (CI, files) a plain line every ``every_s`` seconds."""

    def __init__(self, *, total: int, initial: int, label: str, every_s: float = 30.0, stream: TextIO = sys.stderr):
        self.stream = stream
        self.label = label
        self.total = total
        self.every_s = every_s
        self._last_print = time.monotonic()
        self._step = initial
        self._bar = (
            tqdm(total=total, initial=initial, desc=label, file=stream, dynamic_ncols=True, leave=True)
            if stream.isatty()
            else None
        )

    def update(self, step: int, fields: dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._step)
            self._bar.set_postfix(fields, refresh=False)
        elif time.monotonic() - self._last_print >= self.every_s or step == self.total:
            self._last_print = time.monotonic()
            text = " ".join(f"{key}={value}" for key, value in fields.items())
            print(f"{self.label} step {step}/{self.total} {text}", file=self.stream, flush=True)
        self._step = step

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
