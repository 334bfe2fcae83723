"""Tiny random models for tests, benchmarks and ``headsup make-tiny``: the same file formats and key layouts as
the real models (SD2 base, HeadsUp and OSEDiff weights, insightface/facexlib packs, RAM/DAPE tagger), small
enough to run on a CPU in seconds. Nothing here is used to upscale a real photo.

``tiny_models`` (base + weights), ``tiny_faces`` (face packs), ``tiny_tags`` (tagger weights).
"""
