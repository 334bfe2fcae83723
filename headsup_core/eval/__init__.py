"""Benchmark suite: metrics, the blending baseline, the seam score and comparison pictures.

Everything heavy (pyiqa, insightface, the diffusion pipeline) is imported inside functions so that importing
this package stays cheap and works without the optional ``eval`` extra.
"""
