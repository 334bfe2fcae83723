"""Stand-in for modules.esrgan_model, which Forge Classic's load_upscalers imports unconditionally (it needs
the real spandrel and a GPU backend); no ESRGAN upscaler is registered here."""
