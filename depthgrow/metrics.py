"""Run outputs while training: the JSONL log and the progress display."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

from depthgrow.errors import DepthgrowError, OutputWriteError

T = TypeVar("T")

LOG_NAME = "log.jsonl"


class JsonlLog:
    """One JSON object per line. ``truncate_to`` cuts the file back to a byte offset recorded in a
    checkpoint, dropping what a killed run wrote after it, so a resumed log reads as one run.

    Every line is strict JSON: a non-finite number (a diverged loss) is written as null and named, with
    its value, under ``"nonfinite"`` (``{"val_loss": null, "nonfinite": {"val_loss": "nan"}}``). A write
    that fails raises :class:`OutputWriteError` naming the log."""

    def __init__(self, path: str | Path, *, truncate_to: int | None = None) -> None:
        self.path = Path(path)
        self._pending = 0  # bytes written since the last flush: what a failed flush needed
        if truncate_to is None:
            self._handle = self._guarded(lambda: self.path.open("w"))
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < truncate_to:
            raise DepthgrowError(
                f"{self.path} holds {size} bytes but the checkpoint was written after {truncate_to}: "
                "the log was cut or replaced, so the run cannot be resumed as one log"
            )
        self._handle = self._guarded(lambda: self.path.open("r+"))
        self._handle.truncate(truncate_to)
        self._handle.seek(truncate_to)

    def write(self, record: dict[str, Any]) -> None:
        line = strict_json(record) + "\n"
        self._pending += len(line)
        self._guarded(lambda: self._handle.write(line), needed_bytes=self._pending)

    def flush(self) -> int:
        """Flush and return the byte offset a resume should truncate back to."""
        self._guarded(self._handle.flush, needed_bytes=self._pending)
        self._pending = 0
        return self._handle.tell()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed flush was reported when it happened
            self._handle.close()

    def _guarded(self, action: Callable[[], T], *, needed_bytes: int | None = None) -> T:
        try:
            return action()
        except OSError as error:
            raise OutputWriteError.of(self.path, error, needed_bytes=needed_bytes, note="the run stopped") from None


def strict_json(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: non-finite numbers become null, named under "nonfinite"."""
    nonfinite: dict[str, str] = {}

    def finite(key: str, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[key] = str(value)
            return None
        if isinstance(value, list | tuple):
            return [finite(key, item) for item in value]
        if isinstance(value, dict):
            return {name: finite(f"{key}.{name}", item) for name, item in value.items()}
        return value

    cleaned = {key: finite(key, value) for key, value in record.items()}
    if nonfinite:
        cleaned["nonfinite"] = nonfinite
    return json.dumps(cleaned, allow_nan=False)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    records = []
    with Path(path).open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise DepthgrowError(f"{path} line {number} is not a JSON record: {error}") from None
    return records


class Progress:
    """A tqdm bar on a terminal; elsewhere (CI, files) a plain line every ``every_s`` seconds."""

    def __init__(
        self, *, total: int, initial: int, label: str, every_s: float = 30.0, stream: TextIO | None = None
    ) -> None:
        stream = stream or sys.stderr  # looked up now, so that a redirected stderr is honoured
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
