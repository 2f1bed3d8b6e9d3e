"""Timing and memory primitives shared by every case (they run inside the case's own process)."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any


def measure(fn: Callable[[], Any], warmup: int, steps: int) -> dict[str, Any]:
    """Run `fn` `warmup` times untimed, then `steps` times timed.

    Warm-up absorbs one-off costs (allocator growth, oneDNN kernel selection, lazy imports) that
    a user pays once per process, not per call. All samples are kept, not just the median, so a
    reader can see the spread on a noisy shared machine.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1 to time anything, got {steps}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"samples_s": samples, "median_s": statistics.median(samples), "min_s": min(samples)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory now, from /proc (0.0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
