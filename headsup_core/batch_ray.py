"""``headsup upscale IN... -o OUT --engine ray``: the CLI's folder mode on a Ray cluster.

The jobs are planned on the driver exactly as in folder mode (``batch.plan_jobs``: output names, sub-folders,
``--skip-existing``/``--overwrite``), then a Ray Data pipeline hands them, one image per batch, to a pool of
pipeline actors: one per GPU when the cluster has GPUs (``num_gpus=1`` each), else ``--ray-actors`` CPU actors.
Each actor loads the models once and runs the CLI's own per-file function (``cli._upscale_one``: read with
``files.read``, upscale with the memory retry, write with ``files.write``, atomically), so every output is the
file folder mode writes. Inputs and outputs are paths: the nodes need the same folders mounted at the same
paths. A stop (Ctrl-C) ends the Ray job; no partial output is left (atomic writes), and ``--skip-existing``
resumes.
"""

from __future__ import annotations

import dataclasses
import sys

from .errors import HeadsUpError, InputImageError, MissingDependencyError


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise MissingDependencyError('--engine ray needs Ray Data; run `pip install "comfyui-headsup[scale]"`.') from e
    return ray


class _NeverStop:
    def pending(self) -> bool:
        return False


class UpscaleActor:
    """One pipeline (models loaded once, as ``cli.cmd_upscale`` loads them); called with one-image batches."""

    def __init__(self, args, options, upscale_one, load_face_analyzer):
        from .files.read import load_image
        from .model_paths import find_weights, model_root, resolve_base
        from .pipeline import HeadsUpPipeline
        from .tags.cli import tagger_from_args

        args.quiet = True  # an actor's lines would not reach the terminal; the driver reports each file
        root = model_root(args.models)
        self.options = dataclasses.replace(options, tag_source=tagger_from_args(args, root))
        pipe = HeadsUpPipeline.from_files(resolve_base(args.base, root, args.download),
                                          args.weights or find_weights(root), device=args.device, dtype=args.dtype,
                                          sample_latent=args.sample_latent, weight_dtype=args.weight_dtype)
        used = pipe.conditioning_in_use()
        if args.reference and not used["reference"]:
            args.reference = []
        self.analyzer = load_face_analyzer(args, root) if used["mask"] or args.reference else None
        self.references = None
        if args.reference:
            from .faces import encode_reference

            self.references = [encode_reference([load_image(r, args.max_pixels)], self.analyzer)
                               for r in args.reference]
        self.pipe, self.args, self.upscale_one = pipe, args, upscale_one

    def __call__(self, batch):
        from pathlib import Path

        from .batch import Job

        errors = []
        for src, dst in zip(batch["src"], batch["dst"]):
            try:
                self.upscale_one(Job(Path(src), Path(dst)), self.pipe, self.options, self.references, self.analyzer,
                             self.args, _NeverStop())
                errors.append("")
            except Exception as err:  # noqa: BLE001 - as in folder mode: one bad file is reported, the rest go on
                errors.append(str(err) if isinstance(err, HeadsUpError) else f"{type(err).__name__}: {err}")
        return {"src": list(batch["src"]), "error": errors}


def run_ray_batch(jobs, todo, args, options, upscale_one, load_face_analyzer) -> int:
    """Upscale ``todo`` on Ray; prints what folder mode prints and returns its exit status. ``upscale_one`` and
    ``load_face_analyzer`` are the CLI's own per-file step and face-analysis loader (passed in: the CLI imports
    this module, not the other way round)."""
    from tqdm import tqdm

    if args.ray_actors is not None and args.ray_actors < 1:
        raise InputImageError(f"--ray-actors must be 1 or more, got {args.ray_actors}.")
    done, failed = 0, []
    if todo:
        ray = _ray()
        if not ray.is_initialized():
            kw = {"address": args.ray_address} if args.ray_address else {}
            ray.init(include_dashboard=False, log_to_driver=False, **kw)
            ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = args.ray_actors or max(1, gpus)
        ds = ray.data.from_items([{"src": str(j.src), "dst": str(j.dst)} for j in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(UpscaleActor, fn_constructor_kwargs={"args": args, "options": options, "upscale_one": upscale_one,
                                                           "load_face_analyzer": load_face_analyzer}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0,
                            num_cpus=1)
        bar = tqdm(total=len(todo), desc="images", unit="image", disable=args.quiet or len(todo) < 2)
        try:
            for row in ds.iter_rows():
                if row["error"]:
                    failed.append(row["src"])
                    tqdm.write(f"headsup: failed: {row['src']}: {row['error']}", file=sys.stderr)
                else:
                    done += 1
                bar.update(1)
        except Exception as err:  # a model that does not load fails every actor: say why in one sentence
            cause = getattr(err, "cause", None) or err.__cause__
            if isinstance(cause, HeadsUpError):
                raise cause from None
            raise
        finally:
            bar.close()
    skipped = len(jobs) - len(todo)
    if failed or not args.quiet:
        print(f"headsup: {done} done, {skipped} skipped, {len(failed)} failed",
              file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
