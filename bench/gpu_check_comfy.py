"""The ComfyUI part of the GPU check: HeadsUpLoader and HeadsUpPatchModel run in-process inside the ComfyUI
checkout at ``COMFYUI_PATH`` (run with ComfyUI's interpreter, ``COMFYUI_PYTHON``) and are compared with the
standalone pipeline on the same files and device.

    COMFYUI_PATH=... python -m bench.gpu_check_comfy --device cuda      (bench/gpu_check.py calls it)

The models are the end-to-end test's (tests/sd2_small.py: a small SD2-shaped single file that ComfyUI's own
CheckpointLoaderSimple accepts, and HeadsUp weights for it); the pack is imported the way ComfyUI imports it
(tests/comfy_stub/harness.py ``import_pack_root``, loaded by path so the stand-in modules stay out of the way).
ComfyUI runs with ``--force-fp32`` so the three paths compute alike; the target is 1 grey level (1/255).
Prints one ``BENCH_RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "  # as bench/pipeline.py's workers (not imported: this runs in ComfyUI's interpreter)


def log(msg: str) -> None:
    print(f"[gpu-check comfy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_comfy(comfy_path: str, device: str):
    """Import ComfyUI in this process with its command line set for ``device``; returns its ``nodes`` module."""
    sys.argv = [sys.argv[0], "--force-fp32"] + (["--cpu"] if device == "cpu" else [])
    if device.startswith("cuda:"):
        sys.argv += ["--cuda-device", device.split(":", 1)[1]]
    sys.path.insert(0, comfy_path)  # before the repository root: ComfyUI's nodes.py, not the pack's nodes/
    import comfy.options

    comfy.options.enable_args_parsing()
    # ComfyUI's top-level nodes.py, loaded by its path (the pack's own ``nodes/`` package shares the name, and
    # ComfyUI's modules import it as ``nodes``, so it is registered under that name).
    import importlib.util

    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() != Path(comfy_path, "nodes.py").resolve():
        raise RuntimeError(f"'nodes' is already imported from {loaded.__file__}, not ComfyUI's; run this script "
                           "in a fresh process with COMFYUI_PATH set.")
    if loaded is None:
        spec = importlib.util.spec_from_file_location("nodes", Path(comfy_path) / "nodes.py")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules["nodes"] = loaded
        spec.loader.exec_module(loaded)
    return loaded


def _image(h: int, w: int) -> np.ndarray:
    """A smooth test image with edges (random noise would make every path's differences look alike)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(9 * x) * 0.5 + 0.5, np.cos(7 * y + 3 * x) * 0.5 + 0.5, (x * y * 4) % 1.0], -1)
    return (rgb * 255).round().astype(np.uint8)


def run(args) -> dict:
    import torch

    comfy_nodes = start_comfy(os.environ["COMFYUI_PATH"], args.device)
    import comfy.model_management as mm
    import folder_paths

    sys.path.insert(1, str(ROOT / "tests"))
    from sd2_small import write_sd2_small

    from headsup_core.pipeline import HeadsUpPipeline

    harness = _module_from(ROOT / "tests" / "comfy_stub" / "harness.py", "headsup_comfy_harness")
    h, w = (24, 32) if args.dry_run else (256, 256)
    lq = _image(h, w)
    with tempfile.TemporaryDirectory(prefix="headsup-gpu-check-comfy-") as tmp:
        files = write_sd2_small(Path(tmp) / "models", with_clip=False)
        root = harness.import_pack_root()
        pack = {n.GET_SCHEMA().node_id: n for n in asyncio.run(asyncio.run(root.comfy_entrypoint()).get_node_list())}
        folder_paths.add_model_folder_path("checkpoints", str(files["base"].parent))
        folder_paths.add_model_folder_path("headsup", str(files["weights"].parent))
        dev = mm.get_torch_device()
        log(f"ComfyUI device {dev}; {w}x{h} -> {2 * w}x{2 * h}")
        image = torch.from_numpy(lq).float().div(255)[None]

        def upscale(handle) -> np.ndarray:
            out = pack["HeadsUpUpscale"].execute(model=handle, image=image, scale=2.0, tile_size=0,
                                                 color_fix="adain").result[0]
            return (out[0].float().cpu().numpy() * 255).round().astype(np.int16)

        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            loader = pack["HeadsUpLoader"].execute(weights=files["weights"].name, base=files["base"].name,
                                                   dtype="fp32").result[0]
            by_loader = upscale(loader)
            model, _, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(files["base"].name)[:3]
            patched = pack["HeadsUpPatchModel"].execute(model=model, vae=vae, weights=files["weights"].name).result[0]
            by_patch = upscale(patched)
            host_dtype = str(model.model.get_dtype()).replace("torch.", "")
            mm.unload_all_models()
            pipe = HeadsUpPipeline.from_files(files["base"], files["weights"], device=dev, dtype="fp32")
            alone = pipe.upscale(lq, 2, color_fix="adain").astype(np.int16)

    def compare(out, dtype):
        levels = float(np.abs(out - alone).max()) if out.shape == alone.shape else None
        return {"max_levels": levels, "device": str(dev), "dtype": dtype,
                "status": "ok" if levels is not None else f"shape {out.shape} != {alone.shape}"}

    paths = {"HeadsUpLoader -> HeadsUpUpscale": compare(by_loader, "fp32"),
             "CheckpointLoaderSimple -> HeadsUpPatchModel -> HeadsUpUpscale": compare(by_patch, f"host {host_dtype}")}
    ok = all(p["status"] == "ok" for p in paths.values())
    return {"status": "ok" if ok else "failed", "paths": paths, "standalone_std": float(alone.std())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="a small image (the CPU check)")
    args = ap.parse_args(argv)
    if not os.environ.get("COMFYUI_PATH"):
        ap.error("set COMFYUI_PATH to a ComfyUI checkout")
    print(RESULT_TAG + json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
