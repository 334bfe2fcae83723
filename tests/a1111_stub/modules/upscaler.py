"""Stand-in for modules.upscaler: Upscaler and UpscalerData with A1111's upscale() size rule."""
import os

from PIL import Image

from modules import shared


class Upscaler:
    name = None
    model_path = None
    user_path = None
    scalers: list = []

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
        # A1111: target rounded down to a multiple of 8, up to 3 passes, then a Lanczos resize to the target
        self.scale = scale
        dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
        for _ in range(3):
            if img.width >= dest_w and img.height >= dest_h:
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
