"""Stand-in for modules.modelloader.load_upscalers: every Upscaler subclass, constructed, lists its scalers."""
from modules import shared
from modules.upscaler import Upscaler, UpscalerNone


def load_upscalers():
    classes = {}
    for cls in reversed(Upscaler.__subclasses__()):
        classes.setdefault(str(cls), cls)  # the newest copy of a reloaded class wins
    datas = []
    for cls in reversed(list(classes.values())):
        scaler = cls(None)
        datas += scaler.scalers
    shared.sd_upscalers = sorted(datas, key=lambda d: "" if isinstance(d.scaler, UpscalerNone) else d.name.lower())
