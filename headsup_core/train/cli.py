"""CLI: ``headsup dataset build`` and ``headsup train`` (registered by ``headsup_core.cli``).

Heavy imports (torch, accelerate, pyiqa, insightface) happen inside the handlers only.
"""

from __future__ import annotations

import argparse

from ..errors import HeadsUpError


def _size(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 3840x2160, got {text!r}") from None
    return max(a, b), min(a, b)


def _range(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX such as 0.6-1.6, got {text!r}") from None
    if a > b:
        raise argparse.ArgumentTypeError(f"range {text!r} has MIN > MAX")
    return a, b


def cmd_dataset_build(args) -> int:
    from pathlib import Path

    from .dataset import BuildOptions, build_dataset, format_summary

    opts = BuildOptions(min_size=args.min_size, aspect=args.aspect, min_eye_distance=args.min_eye_distance,
                        quality_metric=args.quality_metric, quality_weights=args.quality_weights,
                        quality_percentile=args.quality_percentile, ref_similarity=args.ref_similarity,
                        near_dup_bits=args.near_dup_bits, test_fraction=args.test_fraction,
                        detect_size=args.detect_size, seed=args.seed, device=args.device)
    analyzer = factory = None
    if args.faces != "none":
        import functools

        from ..faces import load_face_analyzer

        factory = functools.partial(load_face_analyzer, args.faces, model_root=args.face_models,
                                    pack=args.face_pack, device=args.device)
        analyzer = factory() if args.engine == "local" else True
    if analyzer is None:
        print("warning: --faces none: every image is rejected by the face rule")
    identity = id_factory = None
    if analyzer is not None:
        import functools

        from ..faces.identity_net import default_embedder

        id_factory = functools.partial(default_embedder, args.identity, device=args.device)
        identity = id_factory()
        print(f"identity: {identity.name if identity is not None else 'the face analyzer recognizer'}")
        if identity is None:
            id_factory = None
    if args.shard_size is None:
        args.shard_size = 1000 if args.engine == "ray" else 0
    if args.engine == "ray":
        from .dataset_ray import RayOptions, build_dataset_ray

        ro = RayOptions(address=args.ray_address, num_cpus=args.ray_cpus, batch_size=args.batch_size,
                        cpu_concurrency=args.cpu_concurrency, face_actors=args.face_actors,
                        quality_actors=args.quality_actors, gpus_per_actor=args.gpus_per_actor,
                        actor_cpus=args.actor_cpus, task_cpus=args.task_cpus,
                        shard_size=args.shard_size)
        summary = build_dataset_ray(args.sources, args.out, opts, analyzer_factory=factory, ray_options=ro,
                                    progress=not args.no_progress, identity_factory=id_factory)
    else:
        summary = build_dataset(args.sources, args.out, opts, analyzer=analyzer, progress=not args.no_progress,
                                identity=identity)
        if args.shard_size:
            import json

            from .shards import write_shards

            recs = [json.loads(line) for line in (Path(args.out) / "manifest.jsonl").read_text().splitlines()]
            pairs = [json.loads(line) for line in (Path(args.out) / "pairs.jsonl").read_text().splitlines()]
            write_shards(args.out, recs, pairs, args.shard_size)
    print(format_summary(summary))
    print(f"manifest: {args.out}/manifest.jsonl   pairs: {args.out}/pairs.jsonl")
    return 0


def cmd_train(args) -> int:
    from .config import load_train_config
    from .trainer import Trainer

    from pathlib import Path

    overrides = {}  # command-line paths are relative to the current folder, not to the config
    if args.output_dir:
        overrides["output_dir"] = str(Path(args.output_dir).resolve())
    if args.resume:
        overrides["resume"] = args.resume if args.resume == "latest" else str(Path(args.resume).resolve())
    if args.device:
        overrides["device"] = args.device
    cfg = load_train_config(args.config, overrides)
    trainer = Trainer(cfg)
    history = trainer.train(max_steps=args.max_steps)
    if history:
        last = history[-1]
        print(f"trained to step {last['step']}: total loss {last['total']:.4g}; "
              f"checkpoint {trainer.out / 'headsup_final.safetensors'}")
    else:
        print(f"nothing to do: already at step {trainer.step}")
    return 0


def register(subparsers) -> None:
    ds = subparsers.add_parser("dataset", help="build a PortraitSR-4K-style training set",
                               description="Dataset tools for training HeadsUp.")
    ds_sub = ds.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)
    b = ds_sub.add_parser(
        "build", help="curate images into a manifest (resumable; sources are never modified)",
        description="Apply the PortraitSR-4K rules (resolution, aspect, quality, face size, duplicates), group faces "
                    "by identity across images into reference pairs, split train/test by identity and write "
                    "OUT/manifest.jsonl, OUT/pairs.jsonl and OUT/summary.json. Re-running resumes.")
    b.add_argument("sources", nargs="+", metavar="SRC", help="image files or folders (searched recursively)")
    b.add_argument("out", metavar="OUT", help="output folder for the manifest, pairs and cache")
    b.add_argument("--min-size", type=_size, default=(3840, 2160), metavar="WxH",
                   help="minimum resolution, either orientation (default 3840x2160)")
    b.add_argument("--aspect", type=_range, default=(0.6, 1.6), metavar="MIN-MAX",
                   help="allowed width/height ratio (default 0.6-1.6)")
    b.add_argument("--min-eye-distance", type=float, default=64, metavar="PX",
                   help="a kept image needs a face with at least this inter-eye distance (default 64)")
    b.add_argument("--quality-metric", default="qalign", metavar="NAME",
                   help="pyiqa no-reference metric (default qalign as in the paper; e.g. musiq, clipiqa, "
                        "maniqa; 'none' disables). If its weights cannot be loaded offline the rule is skipped "
                        "and the summary says so")
    b.add_argument("--quality-weights", metavar="FILE", help="local weights file for the quality metric")
    b.add_argument("--quality-percentile", type=float, default=10.0, metavar="P",
                   help="reject the worst P percent by quality (default 10)")
    b.add_argument("--ref-similarity", type=float, default=0.65, metavar="COS",
                   help="identity similarity for two faces to be the same person, on the common scale of "
                        "headsup_core.faces.identity (ArcFace cosine; other models calibrated to it) (default 0.65)")
    b.add_argument("--near-dup-bits", type=int, default=6, metavar="N",
                   help="perceptual-hash Hamming distance (of 64 bits) counted as a near duplicate (default 6)")
    b.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of images in the identity-disjoint test split (default 0.1)")
    b.add_argument("--detect-size", type=int, default=1600, metavar="PX",
                   help="faces are detected on a copy with this long side (default 1600)")
    b.add_argument("--faces", default="auto", choices=["auto", "insightface", "dlib", "facexlib", "none"],
                   help="face backend (default auto: an installed insightface pack, else dlib from the registry, "
                        "else facexlib; facexlib has no identity embeddings)")
    b.add_argument("--face-models", metavar="DIR", help="face model root (insightface: folder with models/<pack>)")
    b.add_argument("--face-pack", metavar="NAME", help="insightface pack name (default antelopev2/buffalo_l)")
    b.add_argument("--device", help="device for quality and face models (cpu, cuda, cuda:1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    b.add_argument("--identity", default="auto", choices=("auto", "dlib", "analyzer"),
                   help="identity embeddings: auto/dlib = dlib's ResNet in torch, batched (public domain; auto "
                        "falls back to the analyzer without face-recognition-models), analyzer = the face "
                        "analyzer's own recognizer (default auto)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: one process (default); ray: Ray Data operators (needs the 'scale' extra), same "
                        "results. Sources may then also be img2dataset .tar shards and .parquet/.csv path lists")
    r = b.add_argument_group("--engine ray")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="join a running Ray cluster ('auto', or ray://HEAD:10001); default: start a local Ray")
    r.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the local Ray (default: all)")
    r.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per operator batch (default 8)")
    r.add_argument("--cpu-concurrency", type=int, metavar="N",
                   help="max parallel tasks of each CPU operator (default: Ray decides)")
    r.add_argument("--face-actors", type=int, default=1, metavar="N",
                   help="face model actors (one per GPU on a GPU cluster) (default 1)")
    r.add_argument("--quality-actors", type=int, default=1, metavar="N", help="quality model actors (default 1)")
    r.add_argument("--gpus-per-actor", type=float, metavar="G",
                   help="GPUs per model actor (default 1 when the cluster has GPUs, else 0; fractions share a GPU)")
    r.add_argument("--actor-cpus", type=float, default=0.5, metavar="C",
                   help="CPUs reserved per model actor (default 0.5)")
    r.add_argument("--task-cpus", type=float, default=1.0, metavar="C",
                   help="CPUs reserved per CPU task (default 1; must differ from --actor-cpus, or Ray fuses the "
                        "decode stage into the model actors)")
    b.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="write OUT/shards/*.tar WebDataset shards of N kept images and OUT/manifest.parquet "
                        "(default 1000 with --engine ray, none with --engine local; 0 disables)")
    b.set_defaults(func=cmd_dataset_build)

    t = subparsers.add_parser(
        "train", help="train HeadsUp weights from a YAML config (accelerate)",
        description="Train the HeadsUp LoRA + conv_in on SD2.x with OSEDiff's losses and face supervision. "
                    "Start from headsup_core/configs/train_tiny.yaml (CPU) or train_default.yaml. Launch multi-GPU "
                    "runs with `accelerate launch -m headsup_core.cli train CONFIG.yaml`.")
    t.add_argument("config", metavar="CONFIG.yaml", help="training config (relative paths are relative to it)")
    t.add_argument("--output-dir", help="override output_dir")
    t.add_argument("--resume", metavar="STATE|latest", help="resume from a saved state folder, or the latest one")
    t.add_argument("--max-steps", type=int, help="stop after this many total steps (default: all stages)")
    t.add_argument("--device", help="'cpu' forces the CPU; otherwise accelerate picks the device")
    t.set_defaults(func=cmd_train)


__all__ = ["register", "HeadsUpError"]
