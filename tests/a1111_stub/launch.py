"""Stand-in for A1111's launch module: records run_pip calls; is_installed asks importlib.metadata."""
import importlib.metadata

pip_calls = []


def is_installed(package):
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def run_pip(command, desc=None, live=False):
    pip_calls.append((command, desc))
