"""Time and peak memory of face conditioning at large output sizes (tiny insightface pack, no downloads).

    OMP_NUM_THREADS=1 python bench/faces_condition.py [--out-side 8192] [--faces 4]

The LQ input is a row of aligned face crops (the tiny detector reports one face per square cell), each face gets a
reference, and build_face_condition renders the canvas and mask at the output size. Peak memory is the process's
max RSS growth, which includes the 1x3xHxW canvas and 1x1xHxW mask the pipeline needs anyway.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python bench/faces_condition.py`: the repository root holds bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memstat import peak_rss_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-side", type=int, default=4096, help="output width in pixels")
    ap.add_argument("--faces", type=int, default=4, help="faces side by side in the input")
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args()

    import insightface

    from headsup_core.faces import build_face_condition, encode_reference, load_face_analyzer
    from headsup_core.testing.tiny_faces import write_tiny_face_models
    from headsup_core.imageio import to_uint8_rgb
    from headsup_core.files.read import load_image

    tmp = Path(tempfile.mkdtemp())
    paths = write_tiny_face_models(tmp)
    analyzer = load_face_analyzer("insightface", model_root=paths["insightface_root"], pack="tiny", device="cpu")
    import cv2

    tom = to_uint8_rgb(load_image(Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"))
    side = args.out_side // args.scale // args.faces
    cells = [cv2.resize(np.roll(tom, 7 * i, axis=1), (side, side), interpolation=cv2.INTER_CUBIC)
             for i in range(args.faces)]
    lq = np.concatenate(cells, axis=1)
    refs = [encode_reference(c, analyzer) for c in cells]
    out = (lq.shape[0] * args.scale, lq.shape[1] * args.scale)
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    cond = build_face_condition(lq, out, analyzer, references=refs)
    dt = time.perf_counter() - t0
    full = (cond.canvas.numel() + cond.mask.numel()) * 4 / 2 ** 20
    print(f"LQ {lq.shape[1]}x{lq.shape[0]} -> {out[1]}x{out[0]}, {len(cond.assignments)} faces, "
          f"{sum(a['reference_index'] is not None for a in cond.assignments)} with references")
    print(f"build_face_condition: {dt:.2f} s, peak RSS growth {(peak_rss_bytes() - base) / 2**20:.0f} MiB "
          f"(canvas+mask tensors themselves: {full:.0f} MiB)")


if __name__ == "__main__":
    main()
