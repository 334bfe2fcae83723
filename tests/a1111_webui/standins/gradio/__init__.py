"""Stand-in for gradio: every component/layout name is a class that takes any arguments and is a context manager.

Enough for the webui's UI-building code (modules/ui_components.py, the Upscale section's ui()) to run headless.
"""


class Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        self.elem_classes = list(kwargs.get("elem_classes") or [])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):  # click, change, select, then, ...: event wiring does nothing here
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


_classes: dict = {}


def _component(name):
    if name not in _classes:
        _classes[name] = type(name, (Block,), {})
    return _classes[name]


class _Namespace:
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _component(name)


components = blocks = _Namespace()  # gr.components.Form, gr.blocks.Block
__version__ = "3.41.2-standin"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _component(name)
