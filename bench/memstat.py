"""Memory readings for the bench scripts: the process's resident set (now and its peak) and the machine's free RAM."""
from __future__ import annotations

import resource


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a Linux ``/proc`` file in bytes; None where it cannot be read."""
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The current resident set size (0 where it cannot be read)."""
    return _proc_bytes("/proc/self/status", "VmRSS") or 0


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``ru_maxrss``, which Linux reports in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int | None:
    """RAM the machine can still give (``MemAvailable``); None where it cannot be read."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")
