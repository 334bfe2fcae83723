"""Stand-in for modules.script_callbacks: on_ui_settings registration and the settings-page call."""
_ui_settings = []


def clear_callbacks():
    _ui_settings.clear()


def on_ui_settings(callback, *, name=None):
    _ui_settings.append(callback)


def ui_settings_callback():
    for callback in _ui_settings:
        callback()
