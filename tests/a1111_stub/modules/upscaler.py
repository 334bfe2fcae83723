"""Stand-in for modules.upscaler: Upscaler (three webui variants of its upscale loop) and UpscalerData."""
import os

from PIL import Image

from modules import shared

# a1111: v1.8 (no call once the size is reached); forge: A1111 1.9+ / Forge (one call at scale 1, stops when
# interrupted); forge_classic: do_upscale first, up to 4 times, stopping only on size or int(scale) == 1.
LOOP = os.environ.get("A1111_STUB_LOOP", "a1111")


class Upscaler:
    name = None
    model_path = None
    user_path = None
    scalers = ()

    def __init__(self, create_dirs=False):
        self.scale = 1
        self.device = shared.device
        if self.model_path is None and self.name:
            self.model_path = os.path.join(shared.models_path, self.name)
        if self.model_path and create_dirs:
            os.makedirs(self.model_path, exist_ok=True)

    def do_upscale(self, img, selected_model):
        return img

    def upscale(self, img, scale, selected_model=None):
        self.scale = scale
        dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
        if LOOP == "forge_classic":
            for _ in range(4):
                img = self.do_upscale(img, selected_model)
                if (img.width >= dest_w and img.height >= dest_h) or int(scale) == 1:
                    break
        else:
            for i in range(3):
                if img.width >= dest_w and img.height >= dest_h and (LOOP == "a1111" or i > 0 or scale != 1):
                    break
                if LOOP == "forge" and shared.state.interrupted:
                    break
                shape = img.size
                img = self.do_upscale(img, selected_model)
                if shape == img.size:
                    break
        if img.size != (dest_w, dest_h):
            img = img.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
        return img


class UpscalerData:
    def __init__(self, name, path, upscaler=None, scale=4, model=None):
        self.name = name
        self.data_path = path
        self.local_data_path = path
        self.scaler = upscaler
        self.scale = scale
        self.model = model


class UpscalerNone(Upscaler):
    name = "None"

    def __init__(self, dirname=None):
        super().__init__(False)
        self.scalers = [UpscalerData("None", None, self)]
