"""User-facing errors.

Every error a user can cause (bad file, bad image, missing model) is raised as a subclass of
``HeadsUpError`` whose message is one clear sentence saying what was wrong and what to do. Front ends
(CLI, ComfyUI nodes, A1111) show ``str(err)`` and nothing else.
"""


class HeadsUpError(Exception):
    """Base class for errors a user can fix."""


class WeightsError(HeadsUpError, ValueError):
    """A weights file is corrupt, unsafe, of the wrong architecture or of an unknown format."""


class InputImageError(HeadsUpError, ValueError):
    """An input image (or a parameter such as the scale) cannot be processed."""


class MissingModelError(HeadsUpError, FileNotFoundError):
    """A model file or folder is not where it is expected."""


class MissingDependencyError(HeadsUpError, ImportError):
    """An optional Python package is needed for the requested feature but is not installed."""


class FaceError(HeadsUpError, ValueError):
    """Face analysis could not do what was asked (for example no face in a reference photo)."""


class InterruptedByUser(HeadsUpError):
    """Processing was interrupted between tiles by the host application."""


class OutputError(HeadsUpError, OSError):
    """An output file cannot be written (no space left, no permission, unknown format)."""
