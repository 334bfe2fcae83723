"""Process memory for the bench scripts (run as ``python bench/X.py``, so this folder is on ``sys.path``)."""
from __future__ import annotations


def rss_bytes() -> int:
    """The current resident set size (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
