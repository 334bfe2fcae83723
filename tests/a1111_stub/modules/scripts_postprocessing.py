"""Stand-in for modules.scripts_postprocessing: PostprocessedImage, ScriptPostprocessing and the Extras runner.

The runner calls every section's process_firstpass, then every section's process, in order; a section's
controls are the keyword arguments of its process() (no UI is built here).
"""
import inspect
import types


class PostprocessedImage:
    def __init__(self, image):
        self.image = image
        self.info = {}
        self.shared = types.SimpleNamespace(target_width=None, target_height=None)


class ScriptPostprocessing:
    name = None
    order = 1000
    filename = None
    controls = None

    def ui(self):
        pass

    def process(self, pp, **args):
        pass

    def process_firstpass(self, pp, **args):
        pass

    def image_changed(self):
        pass


class _Control:
    def __init__(self, value):
        self.value = value


class ScriptPostprocessingRunner:
    def __init__(self):
        self.scripts = None

    def scripts_in_preferred_order(self):
        if self.scripts is None:
            from modules import scripts

            self.scripts = []
            for data in scripts.postprocessing_scripts_data:
                script = data.script_class()
                script.filename = data.path
                params = list(inspect.signature(script.process).parameters.values())[1:]
                script.controls = {p.name: _Control(p.default) for p in params
                                   if p.kind is p.POSITIONAL_OR_KEYWORD}
                self.scripts.append(script)
        return sorted(self.scripts, key=lambda s: (s.order, s.name))

    def create_args_for_run(self, scripts_args):
        return {s.name: dict(scripts_args.get(s.name) or {}) for s in self.scripts_in_preferred_order()}

    def run(self, pp, args):
        chosen = [(s, {k: args.get(s.name, {}).get(k, c.value) for k, c in s.controls.items()})
                  for s in self.scripts_in_preferred_order()]
        for script, kwargs in chosen:
            script.process_firstpass(pp, **kwargs)
        for script, kwargs in chosen:
            script.process(pp, **kwargs)

    def image_changed(self):
        for script in self.scripts_in_preferred_order():
            script.image_changed()
