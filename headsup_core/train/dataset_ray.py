"""``headsup dataset build --engine ray``: the builder's per-image stages as Ray Data operators.

    items (driver: folders, tar shards, parquet/CSV lists; images already in OUT/cache.jsonl are skipped)
      -> read + header/size/aspect rules   CPU tasks  (check_header)
      -> decode + SHA-256 + pHash          CPU tasks  (decode_and_hash); emits only the two downscaled copies
      -> faces, landmarks, identity        actor pool (detect_faces; models loaded once per actor, num_gpus)
      -> quality                           actor pool (the scorer on the quality copy)
      -> driver: appended to OUT/cache.jsonl as results stream in (a re-run skips finished images)
    global stages, over metadata only: ``dataset.apply_rules`` with exact duplicates by a Ray Data group-by on
    the SHA-256 (``exact_duplicates_ray``) and the nearest-neighbour searches of ``neighbours`` on the driver
    (pHash and identity neighbours by faiss, identity groups by union-find, the identity-disjoint split),
    then the outputs of the local engine plus WebDataset shards (written by Ray tasks) and
    ``manifest.parquet``. docs/training.md states what runs on the driver and its limit.

Full-resolution pixels exist only inside the decode task: what moves between operators is the encoded file
(read -> decode) and the downscaled copies (``detect_size`` and ``quality_size`` long side). Ray Data's streaming
executor bounds the blocks in flight (backpressure), so the object store holds at most about
``concurrency x batch_size`` encoded files and downscaled copies per operator, whatever the dataset size.
The per-image functions are the local builder's, so both engines give the same records and results.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HeadsUpError, MissingDependencyError
from . import dataset as D
from .neighbours import group_identities_nn, near_duplicates_nn

log = logging.getLogger(__name__)


@dataclass
class RayOptions:
    address: str | None = None          # None: a local Ray; "auto" or "ray://host:10001": join a running cluster
    num_cpus: int | None = None         # for a local Ray only
    batch_size: int = 8                 # images per batch in every operator
    cpu_concurrency: int | None = None  # max parallel CPU tasks per CPU operator (None: Ray decides)
    face_actors: int = 1                # face actor pool size
    quality_actors: int = 1             # quality actor pool size
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    actor_cpus: float = 0.5             # CPUs reserved per model actor
    task_cpus: float = 1.0              # CPUs reserved per CPU task (must differ from actor_cpus, see below)
    shard_size: int = 1000              # kept images per output WebDataset shard (0: no shards)


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise MissingDependencyError('--engine ray needs Ray Data; run `pip install "comfyui-headsup[scale]"`.') from e
    return ray


# ---------------------------------------------------------------- operators (batches are pandas frames)
def _rows(batch):
    return batch.to_dict("records")


def _frame(rows):
    import pandas as pd

    return pd.DataFrame(rows)


def read_and_check(batch, opts: D.BuildOptions):
    import io

    from .shards import read_bytes

    out = []
    for row in _rows(batch):
        item = json.loads(row["item"])
        rec = {k: v for k, v in item.items()}
        try:
            data = read_bytes(item)
        except OSError as e:
            out.append({"rec": json.dumps({**rec, "reject": "corrupt", "detail": f"cannot read ({e})"}), "data": b""})
            continue
        rec = D.check_header(io.BytesIO(data), rec, opts)
        out.append({"rec": json.dumps(rec), "data": b"" if "reject" in rec else data})
    return _frame(out)


def _pack(rgb):
    return rgb.tobytes(), list(rgb.shape)


def _unpack(data, shape):
    return np.frombuffer(data, np.uint8).reshape([int(v) for v in shape])


def decode_and_downscale(batch, opts: D.BuildOptions, with_quality: bool):
    out = []
    for row in _rows(batch):
        rec, o = json.loads(row["rec"]), {"det": b"", "det_shape": [0], "det_scale": 1.0, "q": b"", "q_shape": [0]}
        if "reject" not in rec:
            rec, rgb = D.decode_and_hash(row["data"], rec)
            if rgb is not None:
                small, s = D._downscale(rgb, opts.detect_size)
                o["det"], o["det_shape"] = _pack(np.ascontiguousarray(small))
                o["det_scale"] = s
                if with_quality:
                    o["q"], o["q_shape"] = _pack(np.ascontiguousarray(D._downscale(rgb, opts.quality_size)[0]))
                del rgb, small
        out.append({"rec": json.dumps(rec), **o})
    return _frame(out)


class FaceStage:
    """Face detection, landmarks and identity embeddings; the models load once per actor."""

    def __init__(self, analyzer_factory, identity_factory=None):
        self.analyzer = analyzer_factory() if analyzer_factory is not None else None
        self.identity = identity_factory() if identity_factory is not None else None

    def __call__(self, batch):
        out = []
        for row in _rows(batch):
            rec = json.loads(row["rec"])
            if "reject" not in rec:
                rec["faces"], kind = D.detect_faces(_unpack(row["det"], row["det_shape"]), float(row["det_scale"]),
                                                    self.analyzer, self.identity)
                if kind:
                    rec["identity_model"] = kind
            out.append({"rec": json.dumps(rec), "q": row["q"], "q_shape": row["q_shape"]})
        return _frame(out)


class QualityStage:
    def __init__(self, scorer_factory):
        self.scorer = scorer_factory()

    def __call__(self, batch):
        out = []
        for row in _rows(batch):
            rec = json.loads(row["rec"])
            if "reject" not in rec and self.scorer is not None:
                rec["quality"] = float(self.scorer(_unpack(row["q"], row["q_shape"])))
            out.append({"rec": json.dumps(rec)})
        return _frame(out)


# ---------------------------------------------------------------- the build
def _pyiqa_factory(opts: D.BuildOptions):
    return lambda: D.make_pyiqa_scorer(opts.quality_metric, opts.quality_weights, opts.device)[0]


def init_ray(ro: RayOptions):
    ray = _ray()
    if not ray.is_initialized():
        kw = {"address": ro.address} if ro.address else {"num_cpus": ro.num_cpus}
        ray.init(include_dashboard=False, log_to_driver=False, **kw)
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def run_pipeline(items: list[dict], opts: D.BuildOptions, analyzer_factory, scorer_factory, ro: RayOptions,
                 identity_factory=None):
    """Yields the analysed records (in completion order)."""
    ray = init_ray(ro)
    gpus = ro.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    # Ray Data fuses a task stage into the next actor stage when their resource requests are equal; then the
    # decode work would run inside the face actors, serially. Different num_cpus keep them separate operators.
    if ro.task_cpus == ro.actor_cpus and not gpus:
        raise HeadsUpError("--task-cpus must differ from --actor-cpus (else Ray fuses the CPU stages into "
                           "the model actors)")
    cpu_kw = {"num_cpus": ro.task_cpus, **({"concurrency": ro.cpu_concurrency} if ro.cpu_concurrency else {})}
    ds = ray.data.from_items([{"item": json.dumps(it)} for it in items],  # one block per batch: streams
                             override_num_blocks=max(1, -(-len(items) // max(1, ro.batch_size))))
    ds = ds.map_batches(read_and_check, fn_kwargs={"opts": opts}, batch_size=ro.batch_size,
                        batch_format="pandas", **cpu_kw)
    ds = ds.map_batches(decode_and_downscale, fn_kwargs={"opts": opts, "with_quality": scorer_factory is not None},
                        batch_size=ro.batch_size, batch_format="pandas", **cpu_kw)
    face_kw = {"analyzer_factory": analyzer_factory, "identity_factory": identity_factory}
    ds = ds.map_batches(FaceStage, fn_constructor_kwargs=face_kw,
                        batch_size=ro.batch_size, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=ro.face_actors), num_gpus=gpus,
                        num_cpus=ro.actor_cpus)
    if scorer_factory is not None:
        ds = ds.map_batches(QualityStage, fn_constructor_kwargs={"scorer_factory": scorer_factory},
                            batch_size=ro.batch_size, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=ro.quality_actors),
                            num_gpus=gpus if opts.device != "cpu" else 0.0, num_cpus=ro.actor_cpus)
    for batch in ds.iter_batches(batch_size=ro.batch_size, batch_format="pandas"):
        for r in batch["rec"]:
            yield json.loads(r)


def build_dataset_ray(sources, out, opts: D.BuildOptions | None = None, analyzer_factory=None, scorer="auto",
                      ray_options: RayOptions | None = None, progress: bool = True,
                      identity_factory=None) -> dict:
    """As ``dataset.build_dataset`` (same cache, records, rules and outputs), on Ray Data. ``analyzer_factory``
    is a picklable zero-argument callable that returns the face analyzer (each actor calls it once);
    ``scorer`` is "auto" (pyiqa from the options), None, or a picklable zero-argument scorer factory;
    ``identity_factory`` likewise returns the ``IdentityEmbedder`` (None: the analyzer's own recognizer)."""
    from tqdm import tqdm

    from .sources import list_items

    opts, ro = opts or D.BuildOptions(), ray_options or RayOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = list_items(sources)
    if scorer == "auto":
        probe, q_note = D.make_pyiqa_scorer(opts.quality_metric, opts.quality_weights, opts.device)
        scorer_factory = _pyiqa_factory(opts) if probe is not None else None
        del probe
    else:
        scorer_factory, q_note = scorer, "custom scorer" if scorer is not None else "quality rule disabled"
    if scorer_factory is None:
        log.warning(q_note)
    analyzer = analyzer_factory() if analyzer_factory is not None else None  # for the cache key (as local)
    identity = identity_factory() if identity_factory is not None and analyzer is not None else None
    key = D._cache_key(opts, q_note, analyzer, identity)
    del analyzer, identity
    cache_path = out / "cache.jsonl"
    cache = D._load_cache(cache_path, key)
    todo = [it for it in items if not (it["path"] in cache and all(cache[it["path"]].get(k) == it.get(k)
                                                                   for k in ("bytes", "mtime", "member_offset")))]
    if todo:
        with cache_path.open("a") as fh, tqdm(total=len(todo), desc="analysing images (ray)",
                                              disable=not progress) as bar:
            for rec in run_pipeline(todo, opts, analyzer_factory, scorer_factory, ro, identity_factory):
                rec["key"] = key
                if rec.get("reject") == "corrupt":
                    log.warning("skipping %s: %s", rec["path"], rec["detail"])
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                cache[rec["path"]] = rec
                bar.update(1)
    recs = [dict(cache[it["path"]]) for it in items]
    summary = D.apply_rules(recs, opts, q_note, near_fn=near_duplicates_nn, link_fn=group_identities_nn,
                            exact_fn=lambda hashes: exact_duplicates_ray(hashes, ro))
    summary["analysed_this_run"] = len(todo)
    pairs = list(summary["pairs"])
    D._write_outputs(out, recs, summary)
    if ro.shard_size > 0:
        from .shards import write_shards

        summary["shards"] = write_shards(out, recs, pairs, ro.shard_size,
                                          map_fn=lambda f, xs: _ray_map(f, xs, ro))
    return summary


def _keep_first_of_group(group):
    """One SHA-256 group: every row but the lowest index (the first path) is an exact duplicate of it."""
    first = int(group["i"].min())
    return group.loc[group["i"] != first, ["i"]].assign(first=first)


def exact_duplicates_ray(hashes: dict[int, str], ro: RayOptions) -> dict[int, int]:
    """``dataset.exact_duplicates`` as a Ray Data group-by over the hashes (a hash shuffle across the cluster)."""
    if not hashes:
        return {}
    ray = init_ray(ro)
    blocks = max(1, min(256, len(hashes) // 100_000))
    ds = ray.data.from_items([{"i": i, "sha256": h} for i, h in hashes.items()], override_num_blocks=blocks)
    # Ray >= 2.41 takes the shuffle's partition count; its default (hundreds) is all overhead on small sets
    kw = {"num_partitions": blocks} if "num_partitions" in inspect.signature(ds.groupby).parameters else {}
    dups = ds.groupby("sha256", **kw).map_groups(_keep_first_of_group, batch_format="pandas")
    return {int(r["i"]): int(r["first"]) for r in dups.iter_rows()}


def _ray_map(fn, plans, ro: RayOptions):
    """Each shard written by its own Ray task (the source bytes are read there, not on the driver)."""
    if not plans:
        return []
    ray = init_ray(ro)
    task = ray.remote(num_cpus=1)(lambda p: fn(p))
    return ray.get([task.remote(p) for p in plans])
