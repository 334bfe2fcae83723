"""Time and peak memory of one call, for ``headsup eval``'s speed/memory columns."""
from __future__ import annotations

import resource
import time

import torch


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """Time and peak memory of one call.

    GPU: CUDA's peak allocation. CPU on Linux: the process's peak RSS during the call (the high-water mark is
    reset through /proc/self/clear_refs first). Elsewhere: the process's peak RSS so far, which only grows.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda" if device is not None else False

    def __enter__(self):
        self.reset = False
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
                self.reset = _vm_hwm_mb() is not None
            except OSError:
                pass
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            self.kind = "CUDA peak allocated memory during each call"
        elif self.reset:
            self.mb = _vm_hwm_mb()
            self.kind = "process peak RSS during each call (CPU; includes the loaded models)"
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            self.kind = "process peak RSS so far (CPU; only grows, so later methods inherit earlier peaks)"
        self.seconds = time.perf_counter() - self.t0
        return False
