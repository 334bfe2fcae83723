"""Stand-in for modules.script_callbacks: registration lists, clear_callbacks and the ui_settings call."""
callback_map = {"ui_settings": []}


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def on_ui_settings(callback, *, name=None):
    callback_map["ui_settings"].append(callback)


def ui_settings_callback():
    for callback in callback_map["ui_settings"]:
        callback()


def __getattr__(name):  # any other on_* registration is accepted and ignored
    if name.startswith("on_"):
        return lambda *a, **k: None
    raise AttributeError(name)
