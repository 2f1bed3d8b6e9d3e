"""Timing and memory primitives shared by every case (they run inside the case's own process)."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any


def measure(
    fn: Callable[[], Any], warmup: int, steps: int, sync: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Run `fn` `warmup` times untimed, then `steps` times timed, one perf_counter pair per call.

    `sync` (a GPU's `torch.cuda.synchronize`) is called before the clock starts and before it
    stops: a GPU runs the queued kernels after `fn` returns, so without it the clock would time the
    launches, not the work.

    Warm-up absorbs one-off costs (allocator growth, oneDNN kernel selection, lazy imports, a
    torch.compile) that a user pays once per process, not per call; their times are kept
    (`warmup_s`) but stay out of the median. The garbage collector is paused while timing: a
    collection landing in one sample is noise, not a cost of the model. All samples are kept, none
    dropped, so a reader can see the spread on a noisy shared machine; the median summarises them.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1 to time anything, got {steps}")
    warmups = [_timed(fn, sync) for _ in range(warmup)]
    gc.collect()
    gc.disable()
    try:
        samples = [_timed(fn, sync) for _ in range(steps)]
    finally:
        gc.enable()
    return {
        "samples_s": samples,
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "warmup_s": warmups,
    }


def _timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory now, from /proc (0.0 where /proc is unavailable)."""
    return _status_mb("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count of this process (Linux `clear_refs` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_mb() -> float | None:
    """VmHWM: the peak resident memory since `reset_peak_rss` (or since start); None without /proc."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (reported in kB) in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
