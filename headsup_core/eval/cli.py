"""``headsup eval`` and ``headsup compare`` (registered by headsup_core.cli through ``register``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import COLOR_FIX_MODES

DEFAULT_METRICS = "psnr,ssim,lpips,dists,fid,niqe,musiq,maniqa,clipiqa,id_sim,face_psnr,face_lpips"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods and models")
    g.add_argument("--method", default="bicubic", type=_csv,
                   help="comma-separated methods: bicubic, osediff, blend, headsup (default: bicubic)")
    g.add_argument("--scale", type=int, default=4, help="upscaling factor; GT images are degraded by it (default 4)")
    g.add_argument("--base", help="base model: a diffusers folder or an SD2.x single file")
    g.add_argument("--weights", help="HeadsUp .safetensors for --method headsup")
    g.add_argument("--osediff-weights",
                   help="general model for osediff and blend (an OSEDiff .pkl or converted .safetensors; "
                        "omit for the base model alone)")
    g.add_argument("--face-weights", help="face model for blend (default: the --osediff-weights model)")
    g.add_argument("--feather", type=float, default=24.0,
                   help="blend: paste-mask feather in 512-crop pixels; 0 = hard paste (default 24)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    g.add_argument("--tile-size", type=int, help="output tile size in pixels (default: chosen for the device)")
    g.add_argument("--color-fix", default="adain", choices=COLOR_FIX_MODES,
                   help="colour fix of the diffusion methods (default adain)")
    g.add_argument("--seed", type=int, default=0, help="seed for LQ synthesis and the models (default 0)")
    f = p.add_argument_group("faces")
    f.add_argument("--faces", default="insightface", choices=("insightface", "facexlib", "none"),
                   help="face analyzer for blend, face metrics, seam score and references (default insightface)")
    f.add_argument("--face-models",
                   help="insightface model root (holding models/<pack>/) or facexlib weights folder")
    f.add_argument("--face-pack", help="insightface pack name (default: antelopev2, buffalo_l or the only one)")
    f.add_argument("--identity", default="auto", choices=("auto", "dlib", "analyzer"),
                   help="network for ID similarity: auto/dlib = dlib's ResNet in torch (public domain; auto falls "
                        "back to the analyzer without face-recognition-models), analyzer = the face analyzer's own "
                        "recognizer (default auto)")
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics-root",
                   help="folder holding the metric weights, laid out like a torch hub dir (pyiqa/, checkpoints/, "
                        "clip/, huggingface/); default $HEADSUP_METRICS_ROOT or ~/.cache/headsup/metrics")
    m.add_argument("--crop-border", type=int,
                   help="pixels cropped from each side for PSNR/SSIM (default: the scale)")


def _inputs(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gt", help="folder of ground-truth images (LQ is synthesised from them)")
    src.add_argument("--manifest", help="PortraitSR-4K-style JSONL manifest from `headsup dataset build`")
    src.add_argument("--lq", help="folder of real low-quality images (no GT: no-reference metrics only)")
    p.add_argument("--reference", action="store_true",
                   help="give the manifest's reference photos to the headsup method")
    p.add_argument("--split", default="test", help="manifest split to evaluate (default test; 'all' for every one)")
    p.add_argument("--max-side", type=int, help="shrink GT images to this longest side first (quick runs)")
    p.add_argument("--limit", type=int, help="evaluate at most this many images")


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", help="benchmark methods on a test set (metrics, speed, memory) and write CSV/JSON/markdown",
        description="Run bicubic / OSEDiff / blend / HeadsUp over GT images, a manifest or real LQ images and "
                    "write results.csv, results.json and results.md. Metrics whose weights are missing are "
                    "skipped with a note; nothing is downloaded.")
    _inputs(ev)
    _add_model_args(ev)
    ev.add_argument("--metrics", default=DEFAULT_METRICS, type=_csv,
                    help=f"comma-separated metrics (default: {DEFAULT_METRICS})")
    ev.add_argument("--no-images", action="store_true", help="do not save the output images (FID needs them)")
    ev.add_argument("-o", "--out", required=True, help="output folder for the reports and images")
    ev.set_defaults(func=run_eval_command)

    cp = subparsers.add_parser(
        "compare", help="write a PNG grid: LQ / bicubic / each method / GT with face insets and metrics",
        description="Upscale the given images with each method and write one comparison picture. Inputs are GT "
                    "images (degraded to LQ first) unless --inputs-are-lq is given.")
    cp.add_argument("images", nargs="+", help="image files")
    cp.add_argument("--inputs-are-lq", action="store_true", help="the images are LQ inputs (no GT column)")
    cp.add_argument("--max-side", type=int, help="shrink GT images to this longest side first")
    _add_model_args(cp)
    cp.add_argument("--metrics", default="psnr,ssim,lpips,id_sim", type=_csv,
                    help="metrics printed under each tile (default psnr,ssim,lpips,id_sim)")
    cp.add_argument("--tile-width", type=int, default=320, help="width of each tile in pixels (default 320)")
    cp.add_argument("--title", help="a line of text above the grid")
    cp.add_argument("-o", "--out", required=True, help="output PNG path")
    cp.set_defaults(func=run_compare_command)

    ea = subparsers.add_parser(
        "eval-arms", help="measure saved training arms (e.g. bench/train_toy.py's) on the people of a folder",
        description="Evaluate saved arms (folders with arm.json + weights.safetensors, or a folder of them) on "
                    "every photo of FOLDER whose person (identities.csv: file,identity) has another photo to "
                    "serve as the reference: fixed face-centred crops, x4 Real-ESRGAN LQ, restored with the "
                    "reference and without. Writes arms_eval.csv (per crop), arms_eval.json and arms_eval.md "
                    "(per arm and mode: face PSNR/SSIM, background PSNR, image PSNR, dlib identity cosine "
                    "from the C++ descriptor and the torch port).")
    ea.add_argument("arms", nargs="+", help="saved arm folders, or folders holding them")
    ea.add_argument("--data", required=True, help="folder of photos with identities.csv (file,identity)")
    ea.add_argument("--base", help="base model folder (default: the one each arm.json names)")
    ea.add_argument("--per-photo", type=int, default=1, help="fixed crops per photo (default 1)")
    ea.add_argument("--gt-size", type=int, default=96, help="GT crop size the arms were trained on (default 96)")
    ea.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    ea.add_argument("-o", "--out", required=True, help="output folder (reports; prepared photos in OUT/data)")
    ea.set_defaults(func=_run_eval_arms)


def _analyzer(args, notes: dict):
    """The face analyzer; if it cannot load and nothing strictly needs it, face metrics are skipped with a note."""
    if args.faces == "none":
        return None
    from ..errors import HeadsUpError
    from ..faces import load_face_analyzer

    try:
        return load_face_analyzer(args.faces, model_root=args.face_models, pack=args.face_pack,
                                  device=args.device)
    except HeadsUpError as err:
        if "blend" in args.method or getattr(args, "reference", False):
            raise
        notes["faces"] = f"face analyzer unavailable, face metrics and seam score skipped: {err}"
        return None


def _setup(args, metric_names, samples_kw):
    from .metrics import MetricSuite
    from .runner import build_methods, load_samples

    samples, notes = load_samples(scale=args.scale, seed=args.seed, **samples_kw)
    analyzer = _analyzer(args, notes)
    if analyzer is None and "faces" not in notes:
        dropped = [m for m in metric_names if m in ("id_sim", "face_psnr", "face_lpips")]
        if dropped:
            notes["faces"] = f"--faces none: skipped {', '.join(dropped)}, the seam score and blend"
    device = args.device or "cpu"
    suite = MetricSuite(tuple(m for m in metric_names), device=device, weights_root=args.metrics_root,
                        crop_border=args.scale if args.crop_border is None else args.crop_border)
    methods = build_methods(args.method, base=args.base, weights=args.weights,
                            osediff_weights=args.osediff_weights, face_weights=args.face_weights,
                            device=args.device, scale=args.scale, tile_size=args.tile_size,
                            color_fix=args.color_fix, seed=args.seed, analyzer=analyzer, feather=args.feather)
    identity = None
    if analyzer is not None and "id_sim" in metric_names:
        from ..faces.identity_net import default_embedder

        identity = default_embedder(getattr(args, "identity", "auto"), device=device)
    return samples, notes, analyzer, suite, methods, identity


def run_eval_command(args) -> int:
    from .runner import run_eval, write_reports

    kw = dict(gt_dir=args.gt, manifest=args.manifest, lq_dir=args.lq, max_side=args.max_side, limit=args.limit,
              split=None if args.split == "all" else args.split)
    samples, notes, analyzer, suite, methods, identity = _setup(args, args.metrics, kw)
    if not args.reference:
        for s in samples:
            s.references = []
    out = Path(args.out)
    result = run_eval(samples, methods, scale=args.scale, suite=suite, analyzer=analyzer,
                      out_dir=None if args.no_images else out, device=args.device, identity=identity)
    result["notes"] = {**notes, **result["notes"]}
    config = {k: v for k, v in vars(args).items() if k != "func"}
    paths = write_reports(result, out, config)
    print(paths["md"].read_text(encoding="utf-8"))
    print(f"Wrote {paths['csv']}, {paths['json']} and {paths['md']}")
    return 0


def _run_eval_arms(args) -> int:
    from .arms import run_eval_arms_command as run

    return run(args)


def run_compare_command(args) -> int:
    import tempfile

    from .compare import make_grid
    from .runner import run_eval

    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(args.images):  # load_samples takes folders; link the files into one
            src = Path(img)
            if not src.is_file():
                from ..errors import InputImageError

                raise InputImageError(f"Image file not found: {src}")
            (Path(tmp) / f"{i:03d}_{src.stem}{src.suffix.lower()}").symlink_to(src.resolve())
        kw = dict(lq_dir=tmp) if args.inputs_are_lq else dict(gt_dir=tmp, max_side=args.max_side)
        samples, notes, analyzer, suite, methods, identity = _setup(args, args.metrics, kw)
        result = run_eval(samples, methods, scale=args.scale, suite=suite, analyzer=analyzer, device=args.device,
                          identity=identity)
    rows, metrics, boxes = [], [], []
    for s in samples:
        imgs = result["images"][s.name]
        rows.append([(k, v) for k, v in imgs.items()])
        metrics.append({r["method"]: {k: r.get(k) for k in args.metrics if k in r}
                        for r in result["rows"] if r["image"] == s.name})
        faces = analyzer.detect(s.gt if s.gt is not None else s.lq) if analyzer is not None else []
        box = max(faces, key=lambda f: f.area).bbox if faces else None
        if box is not None and s.gt is None:
            box = box * args.scale  # detected on the LQ; boxes are in the largest image's pixels
        boxes.append(box)
    size = make_grid(rows, args.out, metrics=metrics, face_boxes=boxes, tile_width=args.tile_width,
                     title=args.title)
    for k, v in {**notes, **result["notes"]}.items():
        print(f"note {k}: {v}", file=sys.stderr)
    print(f"Wrote {args.out} ({size[0]}x{size[1]})")
    return 0
