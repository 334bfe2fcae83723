"""The CLI's batch: which files to read, where each output goes, and a stop requested by a signal.

Folders keep their relative paths below the output folder (``-r`` walks sub-folders); ``--skip-existing``
resumes a run; SIGINT/SIGTERM are turned into a request polled at the next tile boundary (a second signal stops
at once), so the temporary output and the spill directory are removed and the exit status is 130/143.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from .errors import InputImageError
from .files.write import FORMATS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class Job:
    src: Path
    dst: Path
    skip: bool = False


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(f for f in found if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                  and not f.name.startswith(".headsup-"))


def expand_inputs(inputs: list[str], recursive: bool = False) -> list[tuple[Path, Path]]:
    """Each input file with its path relative to the folder it was found in (its name for a file given as is)."""
    files: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += [(f, f.relative_to(p)) for f in _folder_images(p, recursive)]
        elif p.exists():
            files.append((p, Path(p.name)))
        else:
            raise InputImageError(f"Input not found: {p}")
    if not files:
        hint = "" if recursive else "; add -r to look in sub-folders"
        raise InputImageError(f"No images found in {', '.join(inputs)} (looked for {', '.join(IMAGE_SUFFIXES)}"
                              f"{hint}).")
    return files


def _suffix(src: Path, ext: str) -> str:
    return src.suffix.lower() if ext == ".same" else ext


def plan_jobs(inputs: list[str], out: str, scale: float, *, recursive: bool = False, overwrite: bool = False,
              skip_existing: bool = False, fmt: str = "png") -> list[Job]:
    """One job per input; an existing output is an error unless ``overwrite`` or ``skip_existing``."""
    files = expand_inputs(inputs, recursive)
    target = Path(out)
    ext = "." + fmt.lower().lstrip(".")
    if ext != ".same" and ext not in FORMATS:
        raise InputImageError(f"Unknown output format {fmt!r}; use one of {', '.join(f[1:] for f in FORMATS)} or same.")
    if len(files) == 1 and target.suffix.lower() in IMAGE_SUFFIXES:
        jobs = [Job(files[0][0], target)]
    else:
        if target.suffix.lower() in IMAGE_SUFFIXES:
            raise InputImageError(f"{len(files)} inputs need an output folder, but -o {out} names a file.")
        tag = f"{scale:g}".replace(".", "p")
        jobs = [Job(src, target / rel.parent / f"{rel.stem}_headsup_x{tag}{_suffix(src, ext)}")
                for src, rel in files]
        seen: dict[Path, Path] = {}
        for job in jobs:
            if job.dst in seen:
                raise InputImageError(f"{seen[job.dst]} and {job.src} would both be written to {job.dst}; "
                                      "give them different names or separate runs.")
            seen[job.dst] = job.src
    for job in jobs:
        if job.dst.exists():
            if skip_existing:
                job.skip = True
            elif not overwrite:
                raise InputImageError(f"{job.dst} already exists; pass --overwrite to replace it, or "
                                      "--skip-existing to leave it.")
    return jobs


class StopRequest:
    """SIGINT/SIGTERM set ``signum``; ``pending()`` is polled between tiles. A second signal raises at once."""

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def pending(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._saved[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the host's handlers alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        return False
