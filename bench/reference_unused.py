"""What skipping the reference work saves when the weights cannot use a reference (OSEDiff: zero conv_in
reference/mask channels): a group photo with the tiny models from ``headsup make-tiny``.

    OMP_NUM_THREADS=1 python bench/reference_unused.py [--width 640] [--repeats 3]

Both arms run the same OSEDiff-layout weights on insightface's t1.jpg (six people) with two reference photos and
the tiny insightface pack. "before" forces the old behaviour (conditioning assumed in use: face detection,
reference identities, matching, canvas, reference VAE encode, mask); "after" is the shipped behaviour. The script
checks that the outputs are identical and prints the median wall time of each arm.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=640, help="width of the LQ group photo (t1.jpg resized)")
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import insightface
    from PIL import Image

    from headsup_core.faces import load_face_analyzer
    from headsup_core.pipeline import HeadsUpPipeline
    from headsup_core.testing.tiny_models import make_tiny

    images = Path(insightface.__file__).parent / "data" / "images"
    tiny = make_tiny(Path(tempfile.mkdtemp()))
    pipe = HeadsUpPipeline.from_files(tiny["base"], tiny["osediff"], device="cpu")
    analyzer = load_face_analyzer("insightface", model_root=tiny["insightface_root"], pack="tiny", device="cpu")
    t1 = Image.open(images / "t1.jpg").convert("RGB")
    lq = np.asarray(t1.resize((args.width, round(t1.height * args.width / t1.width)), Image.BICUBIC))
    refs = [np.asarray(Image.open(images / "Tom_Hanks_54745.png").convert("RGB")),
            np.ascontiguousarray(np.asarray(t1)[100:400, 500:800])]

    def run(force: bool):
        if force:  # the old behaviour: every input assumed to reach the UNet
            pipe.conditioning_in_use = lambda: {"reference": True, "mask": True}
        else:
            pipe.__dict__.pop("conditioning_in_use", None)
        t = time.perf_counter()
        out, info = pipe.upscale(lq, scale=args.scale, reference=refs, face_analyzer=analyzer, return_info=True)
        return time.perf_counter() - t, out, info

    run(False)  # warm-up
    times, outs, faces_s = {"before": [], "after": []}, {}, []
    for _ in range(args.repeats):
        for arm, force in (("before", True), ("after", False)):
            dt, outs[arm], info = run(force)
            times[arm].append(dt)
            if force:
                faces_s.append(info["timings"][0]["faces_s"])
    same = np.array_equal(outs["before"], outs["after"])
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"t1.jpg {lq.shape[1]}x{lq.shape[0]} x{args.scale:g}, 2 references, tiny models, CPU: before {b:.2f} s "
          f"(face stage {statistics.median(faces_s):.2f} s), after {a:.2f} s: saves {b - a:.2f} s "
          f"({100 * (b - a) / b:.0f} %); outputs identical: {same}")


if __name__ == "__main__":
    main()
