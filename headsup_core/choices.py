"""Option lists every front end offers (CLI choices, ComfyUI combos, A1111 dropdowns), defined once.

Torch-free, so ``--help`` and the webui's script import stay cheap.
"""
COLOR_FIX_MODES = ("adain", "wavelet", "none")
VAE_TILING_MODES = ("exact", "fast")
WEIGHT_DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")  # storage of the UNet's weights (loading/dtypes.py)
