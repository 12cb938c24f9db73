"""How much memory a piece of work took: the peak above what the process held when it began.

On CUDA this is the caching allocator's peak of allocated bytes. On the CPU it is the resident set's
high-water mark, which Linux keeps per process (``VmHWM`` in ``/proc/self/status``) and lets a process
reset (writing 5 to ``/proc/self/clear_refs``): the figure then counts every allocation, torch's and
Python's, that was resident at once. Elsewhere there is no figure (None).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measured:
    bytes: int | None = None  # the peak above the start; None: this machine gives no figure


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # the kernel counts in kB
    raise OSError(f"no {field} in {_STATUS}")


def _reset_resident_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Measured]:
    """Measure the peak memory of the with-block above what this process held at its start (on ``device``:
    CUDA memory on a GPU, resident host memory on the CPU).

    The counters are the process's: this resets CUDA's peak statistics or the kernel's VmHWM (and with it
    ``ru_maxrss``), so a measurement around this one, or one of the caller's own, loses its peak. On the
    CPU the figure counts every thread of the process (an asynchronous checkpoint's writer included) and
    freed memory the allocator keeps resident (glibc keeps large freed blocks unless
    ``MALLOC_MMAP_THRESHOLD_`` is fixed)."""
    measured = Measured()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield measured
        torch.cuda.synchronize(device)
        measured.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    try:
        start = _status_bytes("VmRSS")
    except OSError:
        yield measured
        return
    resettable = _reset_resident_peak()
    yield measured
    if resettable:
        measured.bytes = max(0, _status_bytes("VmHWM") - start)
