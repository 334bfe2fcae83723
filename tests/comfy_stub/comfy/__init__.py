"""Stand-in for the `comfy` package of ComfyUI (tests only)."""
