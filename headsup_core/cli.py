"""The ``headsup`` command line: upscale, make-tiny, convert-osediff, doctor (+ train/eval subcommands)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import signal
import sys
from pathlib import Path

from .choices import COLOR_FIX_MODES, VAE_TILING_MODES, WEIGHT_DTYPE_CHOICES
from .errors import HeadsUpError, InputImageError, InterruptedByUser

EXTENSION_MODULES = ("headsup_core.train.cli", "headsup_core.eval.cli", "headsup_core.tags.cli")
log = logging.getLogger("headsup")


def _load_face_analyzer(args, root: Path):
    """--faces: auto takes an insightface pack, then dlib, then facexlib weights, then none (and says which)."""
    from .faces.analyzer import choose_face_analyzer

    if args.faces == "none" and not args.reference:
        return None
    return choose_face_analyzer(args.faces, insightface_root=args.face_models or root / "insightface",
                                facexlib_root=args.face_models or root / "facedetection", dlib_root=args.face_models,
                                pack=args.face_pack, device=args.device, required=bool(args.reference))


def _check_file_options(args) -> None:
    for name in ("jpeg_quality", "webp_quality"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 100:
            raise InputImageError(f"--{name.replace('_', '-')} must be between 0 and 100, got {value}.")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise InputImageError(f"--max-pixels must be a whole number above 0, got {args.max_pixels}.")


def _upscale_one(job, pipe, options, references, analyzer, args, stop) -> None:
    """Read, upscale and write one file; the tile bar is this file's."""
    from tqdm import tqdm

    from .files.read import read_photo
    from .files.write import save_photo
    from .runner import upscale_with_retry

    photo = read_photo(job.src, args.max_pixels)
    bar = tqdm(total=1, desc=job.src.name, unit="step", leave=False, disable=args.quiet, position=1)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result, info = upscale_with_retry(pipe, photo.pixels, options=options, reference=references,
                                          face_analyzer=analyzer, progress=progress, interrupt=stop.pending,
                                          return_info=True)
    finally:
        bar.close()
    save_photo(result, job.dst, photo.meta, jpeg_quality=args.jpeg_quality, webp_quality=args.webp_quality,
               keep_gps=args.keep_gps)
    t = info["timings"][0]
    faces = info["assignments"][0]
    note = f", {len(faces)} face(s)" if analyzer is not None else ""
    for face in faces:
        if face.get("reference_index") is not None:
            note += f"; reference {face['reference_index']} -> face {face['face_index']} (sim {face['similarity']:.2f})"
    if not args.quiet:
        h, w = (result.shape[:2] if hasattr(result, "shape") else (result.height, result.width))
        tqdm.write(f"{job.src} -> {job.dst} ({w}x{h}; encode {t['encode_s']:.1f}s, unet "
                   f"{t['unet_s']:.1f}s, decode {t['decode_s']:.1f}s{note})")


def cmd_upscale(args) -> int:
    from tqdm import tqdm

    from .batch import StopRequest, plan_jobs
    from .files.read import load_image
    from .model_paths import find_weights, model_root, resolve_base
    from .options import UpscaleOptions
    from .options import check_scale
    from .pipeline import HeadsUpPipeline
    from .spill import remove_stale_spill_dirs
    from .tags.cli import tagger_from_args

    scale = check_scale(args.scale)
    _check_file_options(args)
    options = UpscaleOptions(scale=scale, prompt=args.prompt, tile_size=args.tile_size, color_fix=args.color_fix,
                             seed=args.seed, strength=args.strength, vae_tiling=args.vae_tiling,
                             memory_fraction=args.memory_fraction, memory_budget_mb=args.memory_budget_mb)
    jobs = plan_jobs(args.inputs, args.output, scale, recursive=args.recursive, overwrite=args.overwrite,
                     skip_existing=args.skip_existing, fmt=args.format)
    single = len(jobs) == 1 and not any(Path(i).is_dir() for i in args.inputs)
    todo = [job for job in jobs if not job.skip]
    remove_stale_spill_dirs()
    if args.engine == "ray":  # the same jobs and files, on a Ray cluster (batch_ray)
        from .batch_ray import run_ray_batch

        return run_ray_batch(jobs, todo, args, options, _upscale_one, _load_face_analyzer)
    done, failed = 0, []
    with StopRequest() as stop:
        if todo:
            root = model_root(args.models)
            options = dataclasses.replace(options, tag_source=tagger_from_args(args, root))
            base = resolve_base(args.base, root, args.download)
            weights = args.weights or find_weights(root)
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
        outer = tqdm(total=len(todo), desc="images", unit="image", disable=args.quiet or len(todo) < 2, position=0)
        for job in todo:
            if stop.pending():
                break
            try:
                _upscale_one(job, pipe, options, references, analyzer, args, stop)
                done += 1
            except InterruptedByUser:
                if stop.pending():
                    break
                raise
            except Exception as err:  # noqa: BLE001 - in a batch one bad file is reported and the rest go on
                if single:
                    raise
                reason = str(err) if isinstance(err, HeadsUpError) else f"{type(err).__name__}: {err}"
                failed.append(job.src)
                tqdm.write(f"headsup: failed: {job.src}: {reason}", file=sys.stderr)
                if getattr(err, "no_space", False):  # every later file would fail the same way
                    tqdm.write("headsup: stopping the batch: the output disk is full.", file=sys.stderr)
                    break
            outer.update(1)
        outer.close()
    if stop.pending():
        name = signal.Signals(stop.signum).name
        print(f"headsup: stopped by {name} after {done} of {len(todo)} image(s); no partial output was left.",
              file=sys.stderr)
        return stop.exit_code
    skipped = len(jobs) - len(todo)
    if not single and (failed or not args.quiet):
        left = len(todo) - done - len(failed)
        tail = f", {left} not started" if left else ""
        print(f"headsup: {done} done, {skipped} skipped, {len(failed)} failed{tail}",
              file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def cmd_make_tiny(args) -> int:
    from .testing.tiny_models import make_tiny

    paths = make_tiny(args.folder, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:>20}: {path}")
    return 0


def cmd_convert(args) -> int:
    from .loading.weights import convert_osediff, convert_osediff_with_base

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
    from .tags.cli import add_tag_arguments

    add_tag_arguments(up)
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
    up.add_argument("--skip-existing", action="store_true", help="leave inputs whose output exists (resume a run)")
    up.add_argument("-r", "--recursive", action="store_true",
                    help="also read sub-folders of input folders; outputs keep the relative paths")
    up.add_argument("--format", default="png", metavar="EXT",
                    help="output format for folder outputs: png (default), jpg, webp, tif, bmp or same (as the "
                    "input); a single output file's format follows its extension")
    up.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                    help="JPEG quality 0-100 (default 95, always 4:4:4 chroma)")
    up.add_argument("--webp-quality", type=int, default=None, metavar="Q",
                    help="lossy WebP at quality 0-100 (default: lossless)")
    up.add_argument("--keep-gps", action="store_true", help="keep GPS location tags (dropped by default)")
    up.add_argument("--max-pixels", type=int, default=None, metavar="N",
                    help="refuse inputs above N pixels, Pillow's decompression-bomb guard (default "
                    "$HEADSUP_MAX_PIXELS, else 89478485)")
    up.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="ray: upscale the files on a Ray cluster, one pipeline actor per GPU "
                    "(needs the scale extra)")
    up.add_argument("--ray-address", help="with --engine ray: join this cluster (auto, ray://HEAD:10001); "
                    "default: start a local Ray")
    up.add_argument("--ray-actors", type=int, default=None, metavar="N",
                    help="with --engine ray: pipeline actors (default: one per GPU, else 1)")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar, summary or informational lines (warnings and errors still show)")
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
    # -q keeps warnings and errors (a non-commercial licence is a warning) and drops the informational lines
    level = logging.DEBUG if args.verbose else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
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
