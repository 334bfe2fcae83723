"""Stand-in for modules.extensions: registered extension folders; each lists its scripts/ files."""
import os


class Extension:
    def __init__(self, path):
        self.path = path
        self.canonical_name = os.path.basename(path).lower()

    def list_files(self, subdir, extension):
        from modules.scripts import ScriptFile

        folder = os.path.join(self.path, subdir)
        if not os.path.isdir(folder):
            return []
        return [ScriptFile(self.path, f, os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                if f.endswith(extension) and os.path.isfile(os.path.join(folder, f))]


extensions = []


def register(path):
    extensions.append(Extension(path))


def active():
    return list(extensions)
