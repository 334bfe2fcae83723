"""Stand-in for modules.extensions: the extensions the driver registers, with the API scripts.list_scripts uses."""
import os


class _Metadata:
    def get_script_requirements(self, field, section, extra_section=None):
        return []


class Extension:
    def __init__(self, path):
        self.path = path
        self.name = self.canonical_name = os.path.basename(path).lower()
        self.is_builtin = False
        self.enabled = True
        self.metadata = _Metadata()

    def list_files(self, subdir, extension):
        from modules import scripts

        dirpath = os.path.join(self.path, subdir)
        if not os.path.isdir(dirpath):
            return []
        res = [scripts.ScriptFile(self.path, f, os.path.join(dirpath, f)) for f in sorted(os.listdir(dirpath))]
        return [x for x in res if os.path.splitext(x.path)[1].lower() == extension and os.path.isfile(x.path)]


extensions = []


def register(path):
    extensions.append(Extension(path))


def active():
    return [x for x in extensions if x.enabled]
