"""Dataset-builder throughput (``--engine local`` vs ``--engine ray`` with 1 and 2 workers), nearest-neighbour
pair search vs all-pairs, and a node-hours estimate for a web-scale build. Prints tables; asserts nothing.

    python bench/dataset_scale.py --images 200 --size 2400              # throughput on synthetic 2400 px images
    python bench/dataset_scale.py --src /data/photos --images 200        # ... or on real photos
    python bench/dataset_scale.py --skip-build --nn 10000,100000,1000000 # the search part only

Faces use the tiny insightface pack (``headsup_core.testing.tiny_faces``) unless ``--face-models``/``--face-pack`` name a
real one, quality a cheap stand-in scorer unless ``--quality-metric`` names a pyiqa metric. Measure on an idle
machine and say which (these numbers are meaningless under load from other jobs).
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python bench/dataset_scale.py`: the repository root holds bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import code_version  # noqa: E402


def _synth(folder: Path, n: int, size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        small = rng.integers(0, 256, (size // 32, (size * 9 // 16) // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size * 9 // 16, size), Image.BICUBIC).save(folder / f"{k:05d}.jpg", quality=90)


def _images(args, root: Path) -> list[Path]:
    from headsup_core.train.dataset import list_images

    if args.src:
        return list_images([args.src])[: args.images]
    _synth(root / "src", args.images, args.size)
    return list_images([root / "src"])


def _analyzer_factory(args, root: Path):
    from headsup_core.faces import load_face_analyzer

    if args.face_models:
        return functools.partial(load_face_analyzer, "insightface", model_root=args.face_models, pack=args.face_pack)
    from headsup_core.testing.tiny_faces import write_tiny_face_models

    write_tiny_face_models(root / "m")
    return functools.partial(load_face_analyzer, "insightface", model_root=str(root / "m" / "insightface"),
                             pack="tiny")


def _stand_in_quality():
    return lambda rgb: float(rgb.mean())


def per_stage_local(files, opts, analyzer, scorer) -> dict:
    """Seconds per image of each local stage, run one image at a time."""
    from headsup_core.train import dataset as D

    t = dict.fromkeys(("read+header", "decode+hash", "faces", "quality"), 0.0)
    for p in files:
        t0 = time.perf_counter()
        st = p.stat()
        rec = D.check_header(p, {"path": str(p), "bytes": st.st_size, "mtime": st.st_mtime}, opts)
        data = p.read_bytes()
        t1 = time.perf_counter()
        rec, rgb = D.decode_and_hash(data, rec)
        small, s = D._downscale(rgb, opts.detect_size)
        q = D._downscale(rgb, opts.quality_size)[0]
        t2 = time.perf_counter()
        D.detect_faces(small, s, analyzer)
        t3 = time.perf_counter()
        scorer(q)
        t4 = time.perf_counter()
        for k, a, b in (("read+header", t0, t1), ("decode+hash", t1, t2), ("faces", t2, t3), ("quality", t3, t4)):
            t[k] += b - a
    return {k: len(files) / v if v else float("inf") for k, v in t.items()}


class _StorePeak(threading.Thread):
    """Polls Ray's free object-store memory; ``peak`` is the largest amount in use seen."""

    def __init__(self, ray):
        super().__init__(daemon=True)
        self.ray, self.peak, self.stop = ray, 0.0, False

    def run(self):
        while not self.stop:
            total = self.ray.cluster_resources().get("object_store_memory", 0)
            free = self.ray.available_resources().get("object_store_memory", total)
            self.peak = max(self.peak, total - free)
            time.sleep(0.1)


def build_throughput(args, root: Path) -> list[tuple]:
    from headsup_core.train.dataset import BuildOptions, build_dataset

    files = _images(args, root)
    opts = BuildOptions(min_size=(1, 1), aspect=(0.1, 10), quality_metric=args.quality_metric or "none",
                        min_eye_distance=8)
    factory = _analyzer_factory(args, root)
    scorer = _stand_in_quality() if not args.quality_metric else "auto"
    rows = []
    stages = per_stage_local(files[: min(len(files), 20)], opts, factory(), _stand_in_quality())
    rows += [(f"local stage: {k}", f"{v:.2f}", "-") for k, v in stages.items()]
    t = time.perf_counter()
    build_dataset(files, root / "out_local", opts, analyzer=factory(), scorer=scorer if scorer != "auto" else "auto",
                  progress=False)
    rows.append(("local engine, overall", f"{len(files) / (time.perf_counter() - t):.2f}", "-"))
    if not args.no_ray:
        import ray

        from headsup_core.train.dataset_ray import RayOptions, build_dataset_ray

        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            peak = _StorePeak(ray)
            peak.start()
            # "workers" = the CPUs of the local Ray; the two model actors reserve 0.25 each, CPU tasks 0.5
            ro = RayOptions(batch_size=args.batch_size, face_actors=1, quality_actors=1, actor_cpus=0.25,
                            task_cpus=0.5, shard_size=0)
            t = time.perf_counter()
            build_dataset_ray(files, root / f"out_ray{workers}", opts, analyzer_factory=factory,
                              scorer=_stand_in_quality if not args.quality_metric else "auto", ray_options=ro,
                              progress=False)
            dt = time.perf_counter() - t
            peak.stop = True
            peak.join()
            ray.shutdown()
            rows.append((f"ray engine, {workers} worker(s), overall (incl. start-up)", f"{len(files) / dt:.2f}",
                         f"{peak.peak / 2**20:.0f} MiB"))
    return rows


def nn_search(sizes, dim: int = 128, all_pairs_max: int = 100_000) -> list[tuple]:
    """Identity-link search on synthetic clustered unit embeddings: faiss (``neighbours``) vs all-pairs."""
    from headsup_core.train.dataset import group_identities
    from headsup_core.train.neighbours import EXACT_MAX, group_identities_nn

    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(max(1, n // 5), dim)).astype(np.float32)
        emb = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.7, size=(n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        face_img = np.arange(n)
        t = time.perf_counter()
        _, links = group_identities_nn(face_img, emb, 0.65)
        t_nn = time.perf_counter() - t
        if n <= all_pairs_max:
            t = time.perf_counter()
            group_identities(face_img, emb, 0.65)
            t_all, note = time.perf_counter() - t, "measured"
        else:  # one 4096-row chunk of the all-pairs loop, scaled to all rows
            t = time.perf_counter()
            sim = emb[:4096] @ emb.T
            np.nonzero(sim >= 0.65)
            t_all, note = (time.perf_counter() - t) * n / 4096, "extrapolated from one 4096-row chunk"
        kind = "IndexFlatIP (exact)" if n <= EXACT_MAX else "IndexIVFFlat (approximate)"
        rows.append((f"{n:,}", kind, f"{t_nn:.2f}", f"{t_all:.2f} ({note})", len(links)))
    return rows


def estimate(stages: dict, candidates: float, header_pass: float, gpu_face_ips: float, gpu_quality_ips: float,
             cpus_per_node: int, gpus_per_node: int) -> str:
    """Node-hours for ``candidates`` images from per-core CPU rates and assumed per-GPU model rates."""
    read = candidates / (stages["read+header"] * cpus_per_node)
    survivors = candidates * header_pass
    decode = survivors / (stages["decode+hash"] * cpus_per_node)
    gpu = survivors / (min(gpu_face_ips, gpu_quality_ips) * gpus_per_node / 2)  # faces and quality share GPUs
    hours = (read + decode + gpu) / 3600
    return (f"{hours:,.0f} node-hours for {candidates:.0e} candidates "
            f"(read+header {read / 3600:,.0f} h at {stages['read+header']:.1f} img/s/core x {cpus_per_node} cores; "
            f"{header_pass:.1%} pass the size rules -> decode {decode / 3600:,.0f} h at "
            f"{stages['decode+hash']:.2f} img/s/core; faces+quality {gpu / 3600:,.0f} h at assumed "
            f"{gpu_face_ips:g}/{gpu_quality_ips:g} img/s per GPU x {gpus_per_node} GPUs; stages summed, not "
            f"overlapped, so an upper bound; reading assumes the shards are local, download excluded)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=2400, help="long side of the synthetic images (default 2400)")
    ap.add_argument("--src", help="a folder of real photos instead of synthetic ones")
    ap.add_argument("--face-models", help="insightface model root (default: the tiny pack)")
    ap.add_argument("--face-pack", default="antelopev2")
    ap.add_argument("--quality-metric", help="pyiqa metric (default: a stand-in mean-brightness scorer)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--nn", default="10000,100000,1000000", help="embedding counts for the search comparison")
    ap.add_argument("--all-pairs-max", type=int, default=100_000, help="measure all-pairs up to this size")
    ap.add_argument("--candidates", type=float, default=1e9)
    ap.add_argument("--header-pass", type=float, default=0.02,
                    help="assumed fraction of candidates passing the size/aspect rules (default 0.02)")
    ap.add_argument("--gpu-face-ips", type=float, default=150.0, help="assumed face images/s per GPU")
    ap.add_argument("--gpu-quality-ips", type=float, default=60.0, help="assumed Q-Align images/s per GPU")
    ap.add_argument("--cpus-per-node", type=int, default=64)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    args = ap.parse_args(argv)
    print(f"commit {code_version()}, {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs")
    stages = None
    if not args.skip_build:
        with tempfile.TemporaryDirectory() as d:
            rows = build_throughput(args, Path(d))
        print("\n| measurement | images/s | object store peak |\n|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
        stages = {r[0].split(": ")[1]: float(r[1]) for r in rows if r[0].startswith("local stage")}
    sizes = [int(x) for x in args.nn.split(",") if x]
    if sizes:
        print("\n| embeddings | faiss index | faiss s | all-pairs s | links |\n|---|---|---|---|---|")
        for r in nn_search(sizes, all_pairs_max=args.all_pairs_max):
            print("| " + " | ".join(str(x) for x in r) + " |")
    if stages:
        print("\n" + estimate(stages, args.candidates, args.header_pass, args.gpu_face_ips, args.gpu_quality_ips,
                              args.cpus_per_node, args.gpus_per_node))


if __name__ == "__main__":
    main()
