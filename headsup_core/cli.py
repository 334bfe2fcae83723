"""The ``headsup`` command line: upscale, make-tiny, convert-osediff, doctor (+ train/eval subcommands)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .choices import COLOR_FIX_MODES, VAE_TILING_MODES, WEIGHT_DTYPE_CHOICES
from .errors import HeadsUpError, InputImageError, InterruptedByUser

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EXTENSION_MODULES = ("headsup_core.train.cli", "headsup_core.eval.cli")
log = logging.getLogger("headsup")


def _expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise InputImageError(f"Input not found: {p}")
    if not files:
        raise InputImageError(f"No images found in {', '.join(inputs)} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return files


def _output_paths(files: list[Path], out: str, scale: float, overwrite: bool) -> list[Path]:
    target = Path(out)
    if len(files) == 1 and target.suffix.lower() in IMAGE_SUFFIXES:
        paths = [target]
    else:
        if target.suffix.lower() in IMAGE_SUFFIXES:
            raise InputImageError(f"{len(files)} inputs need an output folder, but -o {out} names a file.")
        tag = f"{scale:g}".replace(".", "p")
        paths = [target / f"{f.stem}_headsup_x{tag}.png" for f in files]
    if not overwrite:
        clash = [p for p in paths if p.exists()]
        if clash:
            raise InputImageError(f"{clash[0]} already exists; pass --overwrite to replace it.")
    return paths


def _load_face_analyzer(args, root: Path):
    """--faces: auto takes an insightface pack, then dlib, then facexlib weights, then none (and says which)."""
    backend = args.faces
    if backend == "none":
        if args.reference:
            raise InputImageError("--reference needs face analysis; use --faces auto, dlib, insightface or facexlib.")
        return None
    from .faces import load_face_analyzer
    from .faces.analyzer import load_auto

    if backend == "auto":
        analyzer = load_auto(insightface_root=args.face_models or root / "insightface",
                             facexlib_root=args.face_models or root / "facedetection", pack=args.face_pack,
                             device=args.device)
        if analyzer is None and args.reference:
            raise InputImageError("--reference needs face analysis, but no face backend is installed: "
                                  "pip install dlib-bin face-recognition-models (or add an insightface pack).")
        if analyzer is not None and not getattr(args, "quiet", False):
            print(f"faces: {analyzer.auto_note}")
        return analyzer
    if backend == "insightface":
        folder = args.face_models or root / "insightface"
    elif backend == "dlib":
        folder = args.face_models
    else:
        folder = args.face_models or root / "facedetection"
    return load_face_analyzer(backend, model_root=folder, pack=args.face_pack, device=args.device)


def cmd_upscale(args) -> int:
    from tqdm import tqdm

    from .imageio import load_image, save_image_atomic
    from .model_paths import find_weights, model_root, resolve_base
    from .memory import upscale_with_retry
    from .options import UpscaleOptions
    from .pipeline import HeadsUpPipeline, check_scale

    scale = check_scale(args.scale)
    files = _expand_inputs(args.inputs)
    outputs = _output_paths(files, args.output, scale, args.overwrite)
    root = model_root(args.models)
    base = resolve_base(args.base, root, args.download)
    weights = args.weights or find_weights(root)
    options = UpscaleOptions(scale=scale, prompt=args.prompt, tile_size=args.tile_size, color_fix=args.color_fix,
                             seed=args.seed, strength=args.strength, vae_tiling=args.vae_tiling,
                             memory_fraction=args.memory_fraction, memory_budget_mb=args.memory_budget_mb)
    pipe = HeadsUpPipeline.from_files(base, weights, device=args.device, dtype=args.dtype,
                                      sample_latent=args.sample_latent, weight_dtype=args.weight_dtype)
    used = pipe.conditioning_in_use()
    if args.reference and not used["reference"]:
        note = pipe.note_reference_unused()  # said once; no face matching, no reference encode below
        if not args.quiet:
            print(f"reference ignored: {note}")
        args.reference = []
    # faces are analysed only when a face mask or a reference can reach the UNet
    analyzer = _load_face_analyzer(args, root) if used["mask"] or args.reference else None
    references = [load_image(r, args.max_pixels) for r in args.reference] if args.reference else None
    if references:
        from .faces import encode_reference

        references = [encode_reference([img], analyzer) for img in references]
    for src, dst in zip(files, outputs):
        image = load_image(src, args.max_pixels)
        bar = tqdm(total=1, desc=src.name, unit="tile", leave=False, disable=args.quiet)

        def progress(done, total, bar=bar):
            bar.total = total
            bar.n = done
            bar.refresh()

        result, info = upscale_with_retry(pipe, image, options=options, reference=references,
                                          face_analyzer=analyzer, progress=progress, return_info=True)
        bar.close()
        save_image_atomic(result, dst)
        t = info["timings"][0]
        faces = info["assignments"][0]
        note = f", {len(faces)} face(s)" if analyzer is not None else ""
        for face in faces:
            if face.get("reference_index") is not None:
                note += f"; reference {face['reference_index']} -> face {face['face_index']} (sim {face['similarity']:.2f})"
        if not args.quiet:
            print(f"{src} -> {dst} ({result.width}x{result.height}; encode {t['encode_s']:.1f}s, unet "
                  f"{t['unet_s']:.1f}s, decode {t['decode_s']:.1f}s{note})")
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny

    paths = make_tiny(args.folder, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:>20}: {path}")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import convert_osediff, convert_osediff_with_base

    if args.base:
        out = convert_osediff_with_base(args.input, args.output, args.base)
    else:
        log.warning("headsup: no --base given, so no default prompt embedding is stored; runs will need the "
                    "base's text encoder (give --base <SD2.1-base file> to store it).")
        out = convert_osediff(args.input, args.output)
    print(f"wrote {out}")
    return 0


def cmd_doctor(args) -> int:
    from .doctor import run_doctor

    return run_doctor(args.models, download=args.download)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headsup", description="HeadsUp portrait super-resolution "
                                     "(one-step diffusion with face-aware, reference-based identity).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    up = sub.add_parser("upscale", help="upscale images", description="Upscale portrait photos with HeadsUp.")
    up.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of images")
    up.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor >= 1, e.g. 2, 3.5, 4 (default 4)")
    up.add_argument("--base", help="SD2.x base: a single .safetensors/.ckpt file or a diffusers folder "
                    "(default: found under the model root's checkpoints/)")
    up.add_argument("--weights", help="HeadsUp .safetensors or OSEDiff .pkl (default: first file in headsup/)")
    up.add_argument("--models", help="model root holding checkpoints/, headsup/, insightface/, facedetection/ "
                    "(default $HEADSUP_MODEL_ROOT or ~/.cache/headsup/models)")
    up.add_argument("--download", action="store_true", help="allow downloading the SD2.1-base file if it is missing")
    up.add_argument("--reference", action="append", default=[], metavar="R",
                    help="reference photo of a person in the image; repeat for group photos (one per person)")
    up.add_argument("--faces", choices=["auto", "insightface", "dlib", "facexlib", "none"], default="auto",
                    help="face analysis (face mask + references). auto (default): an installed insightface pack, "
                         "then dlib (pip install dlib-bin face-recognition-models), then facexlib weights, "
                         "then none; it prints which one and its licence")
    up.add_argument("--face-models", type=Path, help="insightface root (with models/<pack>/) or facexlib folder")
    up.add_argument("--face-pack", help="insightface pack name, e.g. antelopev2 or buffalo_l (default: auto)")
    up.add_argument("--tile-size", type=int, help="tile edge in output pixels for every stage (default: from the "
                    "memory budget; a stage that fits runs untiled); halved and retried on out-of-memory")
    up.add_argument("--memory-budget-mb", type=float, default=None,
                    help="memory budget in MB for the work on top of the loaded model, instead of a fraction of "
                    "free memory; tiles follow it and the exact tiled VAE spills to a temporary file beyond it")
    up.add_argument("--memory-fraction", type=float, default=None,
                    help="share of the free RAM (CPU) or VRAM (GPU) the tiles may use (default: "
                    "$HEADSUP_MEMORY_FRACTION, else 0.5 on CPU, 0.8 on GPU)")
    up.add_argument("--color-fix", choices=COLOR_FIX_MODES, default="adain",
                    help="colour correction against the input (default adain)")
    up.add_argument("--strength", type=float, default=1.0,
                    help="fidelity <-> detail: 1 = full restoration, lower stays closer to the input (default 1)")
    up.add_argument("--prompt", help="optional text prompt P, encoded in OSEDiff's form \", P,\" with the base's "
                    "text encoder (default: OSEDiff's \", ,\" or the embedding stored in the weights)")
    up.add_argument("--seed", type=int, default=0, help="seed, used only with --sample-latent")
    up.add_argument("--sample-latent", action="store_true",
                    help="sample the VAE posterior like OSEDiff instead of its mode (non-deterministic per seed)")
    up.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: best available)")
    up.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="weights precision (default: fp32 on CPU, fp16 on GPU; the UNet output and the "
                    "one-step update are always fp32)")
    up.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPE_CHOICES), default="auto",
                    help="dtype the UNet's weights are kept in between layers, each layer computing in --dtype "
                    "(default auto: as --dtype, or fp16 on a CPU when fp32 weights would take over half the "
                    "memory budget; fp16 halves resident weights at some speed; bf16 rounds them more coarsely than fp16)")
    up.add_argument("--vae-tiling", choices=VAE_TILING_MODES, default="exact",
                    help="tiled VAE statistics: exact = whole-image GroupNorm statistics pooled over all tiles "
                    "(default), fast = estimated from a small preview (cheaper, visibly less exact)")
    up.add_argument("--overwrite", action="store_true", help="replace existing output files")
    up.add_argument("--max-pixels", type=int, default=None, metavar="N",
                    help="refuse inputs above N pixels, Pillow's decompression-bomb guard (default "
                    "$HEADSUP_MAX_PIXELS, else 89478485)")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    up.set_defaults(func=cmd_upscale)

    tiny = sub.add_parser("make-tiny", help="write tiny random models in every supported format (no downloads)",
                          description="Write tiny random test models: base/ (diffusers), base.safetensors, "
                          "headsup.safetensors, osediff.pkl and tiny face-analysis packs.")
    tiny.add_argument("folder", metavar="DIR", help="folder to write into")
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tiny.set_defaults(func=cmd_make_tiny)

    conv = sub.add_parser("convert-osediff", help="convert an OSEDiff .pkl to a HeadsUp .safetensors",
                          description="Convert OSEDiff weights (.pkl, read safely) to the HeadsUp format.")
    conv.add_argument("input", metavar="IN.pkl", help="OSEDiff checkpoint")
    conv.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="HeadsUp checkpoint to write")
    conv.add_argument("--base", help="SD2.1-base file or folder: store its text encoder's embedding of OSEDiff's "
                      "default prompt \", ,\" and its fingerprint, so runs need no text encoder")
    conv.set_defaults(func=cmd_convert)

    doc = sub.add_parser("doctor", help="show which models were found where, and what is missing",
                         description="Report models, optional packages, devices and licences.")
    doc.add_argument("--models", help="model root (default $HEADSUP_MODEL_ROOT or ~/.cache/headsup/models)")
    doc.add_argument("--download", action="store_true", help="download the SD2.1-base file if it is missing")
    doc.set_defaults(func=cmd_doctor)

    for name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            log.debug("optional CLI module %s not available: %s", name, err)
            continue
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except HeadsUpError as err:
        if isinstance(err, InterruptedByUser):
            print("headsup: interrupted", file=sys.stderr)
            return 130
        print(f"headsup: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headsup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
