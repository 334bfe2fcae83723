"""Where the exact tiled VAE parks activations between its lockstep steps: RAM up to a budget, then a temporary file.

``SpillStore.put(tensor)`` returns a ``Slot``; ``slot.take()`` gives the tensor back (bit for bit: raw bytes,
same dtype, shape and strides) and forgets it. While the bytes the store holds in RAM stay within
``ram_budget``, a slot keeps its tensor; beyond it, the tensor is written to a file and read back by ``take`` with
plain file I/O (``tofile`` / ``np.fromfile``), never a lasting memory map, so the process's RSS stays bounded (the
page cache is the OS's business). ``ram_budget=None`` keeps everything in RAM.

Files live in one ``tempfile.TemporaryDirectory`` (``tempfile``'s default place, or env ``HEADSUP_SPILL_DIR``),
created at the first spill; each file is removed when its slot is taken, and ``close()`` (or leaving the ``with``
block, also on an exception or interrupt) removes the directory. A process killed outright (SIGKILL, or SIGTERM
with Python's default handler) runs no cleanup and leaves its ``headsup-spill-<pid>-*`` directory behind;
``remove_stale_spill_dirs()`` (run by the CLI at start) removes those whose process is gone.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

from .devices import version_counter
from .errors import HeadsUpError

ENV_SPILL_DIR = "HEADSUP_SPILL_DIR"
SPILL_PREFIX = "headsup-spill-"


class SpillSpaceError(HeadsUpError, OSError):
    """The spill directory's disk is full."""


def spill_dir() -> str | None:
    """The parent of the spill directory: env ``HEADSUP_SPILL_DIR``, else ``tempfile``'s default (``None``)."""
    return os.environ.get(ENV_SPILL_DIR) or None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's live process, or a platform without signal 0
        return True
    return True


def remove_stale_spill_dirs() -> list[str]:
    """Remove ``headsup-spill-<pid>-*`` directories whose process no longer runs; returns those removed."""
    parent = spill_dir() or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SPILL_PREFIX):
            continue
        pid = name[len(SPILL_PREFIX):].split("-", 1)[0]
        path = os.path.join(parent, name)
        if pid.isdigit() and not _pid_alive(int(pid)) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class _Blob:
    """One parked tensor's data, in RAM (``tensor``) or in a file (``path``), shared by the slots that hold it."""

    __slots__ = ("tensor", "path", "shape", "stride", "dtype", "nbytes", "refs")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.path, self.refs = tensor, None, 1
        self.shape, self.stride, self.dtype = tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype
        self.nbytes = tensor.numel() * tensor.element_size()


class Slot:
    """A parked tensor; ``take()`` gives it back once."""

    __slots__ = ("store", "blob")

    def __init__(self, store: "SpillStore", blob: _Blob):
        self.store, self.blob = store, blob

    @property
    def on_disk(self) -> bool:
        return self.blob is not None and self.blob.path is not None

    def take(self) -> torch.Tensor:
        """The tensor (on the store's device); the slot is empty afterwards."""
        return self.store.take(self)


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill ``numel`` consecutive storage places (contiguous or channels_last)."""
    return t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))


class SpillStore:
    def __init__(self, ram_budget: int | None = None, device: torch.device | str = "cpu",
                 expected_bytes: int | None = None):
        self.ram_budget = None if ram_budget is None else max(0, int(ram_budget))
        self.device = torch.device(device)
        self.expected_bytes = expected_bytes  # for the disk-full message: about what the stage parks in all
        self.ram_bytes = self.disk_bytes = 0
        self.peak_ram_bytes = self.peak_disk_bytes = self.spilled_bytes = 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._count = 0
        self._last = None  # (weakref to the tensor last put, its blob, its version)

    # ------------------------------------------------------------------------------------------------ use
    def put(self, t: torch.Tensor) -> Slot:
        # A resnet without a shortcut parks its input as the residual and then yields that same tensor: the
        # second slot shares the first's data (one copy in RAM or on disk).
        last = self._last
        if last is not None and last[0]() is t and last[1].refs > 0 and last[2] == version_counter(t):
            last[1].refs += 1
            return Slot(self, last[1])
        original = t
        if t.device != self.device:
            t = t.to(self.device)
        if not _dense(t):
            t = t.contiguous()
        blob = _Blob(t)
        if self.ram_budget is None or self.ram_bytes + blob.nbytes <= self.ram_budget:
            self.ram_bytes += blob.nbytes
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
        else:
            self._write(blob, t)
            blob.tensor = None
        self._last = (weakref.ref(original), blob, version_counter(original))
        return Slot(self, blob)

    def take(self, slot: Slot) -> torch.Tensor:
        blob, slot.blob = slot.blob, None
        if blob is None or blob.refs <= 0:
            raise RuntimeError("a parked VAE activation was taken twice")
        blob.refs -= 1
        if blob.path is None:
            t = blob.tensor
            if blob.refs == 0:
                blob.tensor = None
                self.ram_bytes -= blob.nbytes
            return t
        path = blob.path
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        finally:
            if blob.refs == 0:
                blob.path = None
                os.remove(path)
                self.disk_bytes -= blob.nbytes
        if raw.size != blob.nbytes:
            raise RuntimeError(f"HeadsUp: a spilled VAE activation in {os.path.dirname(path)} was truncated "
                               f"({raw.size} of {blob.nbytes} bytes).")
        return torch.from_numpy(raw).view(blob.dtype).as_strided(blob.shape, blob.stride)

    # ------------------------------------------------------------------------------------------------ files
    @property
    def directory(self) -> str | None:
        return None if self._tmp is None else self._tmp.name

    def _write(self, blob: _Blob, t: torch.Tensor) -> None:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=spill_dir())
        self._count += 1
        path = os.path.join(self._tmp.name, f"{self._count}.bin")
        # The storage places the tensor covers, in storage order (as_strided keeps its offset), as raw bytes:
        # bf16/fp16 included, numpy need not know the dtype.
        flat = t.as_strided((t.numel(),), (1,)).view(torch.uint8)
        try:
            with open(path, "wb") as fh:
                flat.numpy().tofile(fh)
        except OSError as exc:
            if os.path.exists(path):
                os.remove(path)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._full_error(blob.nbytes) from exc
            raise
        blob.path = path
        self.disk_bytes += blob.nbytes
        self.spilled_bytes += blob.nbytes
        self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)

    def _full_error(self, nbytes: int) -> SpillSpaceError:
        where = self._tmp.name if self._tmp is not None else (spill_dir() or tempfile.gettempdir())
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = 0
        need = max(self.disk_bytes + nbytes, (self.expected_bytes or 0) - (self.ram_budget or 0))
        mb = 2**20
        return SpillSpaceError(
            f"HeadsUp: the disk of the spill directory {where} is full ({free / mb:.0f} MB free): the exact tiled "
            f"VAE parks activations there that do not fit the memory budget and needs about {need / mb:.0f} MB "
            f"free there for this image. Free disk space there, set {ENV_SPILL_DIR} to a directory on a disk with "
            "room, or give HeadsUp more memory (memory_fraction / memory_budget_mb).")

    def close(self) -> None:
        """Remove every file (and the directory); the store holds nothing afterwards."""
        tmp, self._tmp = self._tmp, None
        self.ram_bytes = self.disk_bytes = 0
        self._last = None
        if tmp is not None:
            tmp.cleanup()

    def __enter__(self) -> "SpillStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
