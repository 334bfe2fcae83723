"""Stand-in for the webui's scripts/postprocessing_upscale.py: the Extras "Upscale" section and its result cache.

As in the webui, results are cached by (image, upscaler name, mode, scale, width, height, crop); nothing else
(such as another section's settings) is part of the key, and only image_changed() clears the cache.
"""
import hashlib

from modules import scripts_postprocessing, shared
from PIL import Image

upscale_cache = {}


class ScriptPostprocessingUpscale(scripts_postprocessing.ScriptPostprocessing):
    name = "Upscale"
    order = 1000

    def process(self, pp, upscale_mode=0, upscale_by=2.0, upscale_to_width=None, upscale_to_height=None,
                upscale_crop=False, upscaler_1_name=None, upscaler_2_name=None, upscaler_2_visibility=0.0):
        upscaler = next((x for x in shared.sd_upscalers if x.name == upscaler_1_name), None)
        if upscaler is None or upscaler_1_name == "None":
            return
        image = pp.image
        if upscale_mode == 1:
            upscale_by = max(upscale_to_width / image.width, upscale_to_height / image.height)
            pp.info["Postprocess upscale to"] = f"{upscale_to_width}x{upscale_to_height}"
        else:
            pp.info["Postprocess upscale by"] = upscale_by
        key = (hashlib.sha1(image.tobytes()).hexdigest(), upscaler.name, upscale_mode, upscale_by,
               upscale_to_width, upscale_to_height, upscale_crop)
        result = upscale_cache.pop(key, None)
        if result is None:
            result = upscaler.scaler.upscale(image, upscale_by, upscaler.data_path)
        upscale_cache[key] = result
        while len(upscale_cache) > shared.opts.upscaling_max_images_in_cache:
            upscale_cache.pop(next(iter(upscale_cache)))
        if upscale_mode == 1 and upscale_crop:
            canvas = Image.new("RGB", (upscale_to_width, upscale_to_height))
            canvas.paste(result, box=(upscale_to_width // 2 - result.width // 2,
                                      upscale_to_height // 2 - result.height // 2))
            result = canvas
        pp.info["Postprocess upscaler"] = upscaler.name
        pp.image = result

    def image_changed(self):
        upscale_cache.clear()
