"""Parity of the torch dlib face network (``load_identity_network("dlib")``) with dlib's own C++ descriptor.

    OMP_NUM_THREADS=1 python bench/dlib_parity.py [--photos ../shared/data/faces-deepface]

Every face dlib's HOG detector finds (upsample 1) in insightface's t1.jpg and in the photos of the folder: the
150x150 chip ``dlib.get_face_chip(img, shape, 150, 0.25)`` goes through both networks. Prints the minimum cosine
and maximum relative L2 error, then, for the folder's ``identities.csv``, the Euclidean distance of every
same-person and different-person pair of photos (largest face each) from both networks and the largest gap.
"""
import argparse
import csv
import itertools
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=ROOT / ".." / "shared" / "data" / "faces-deepface")
    args = ap.parse_args()

    import dlib
    import insightface
    from PIL import Image

    from headsup_core.faces import load_identity_network
    from headsup_core.faces.dlib_backend import PREDICTOR_FILE, RECOGNIZER_FILE, default_model_dir

    d = default_model_dir()
    det, sp = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(d / PREDICTOR_FILE))
    rec = dlib.face_recognition_model_v1(str(d / RECOGNIZER_FILE))
    net = load_identity_network("dlib")
    files = [Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"]
    files += sorted(p for p in args.photos.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    chips, ref, owner = [], [], []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        rects = sorted(det(img, 1), key=lambda r: -r.area())
        for k, r in enumerate(rects):
            chip = dlib.get_face_chip(img, sp(img, r), 150, 0.25)
            chips.append(chip)
            ref.append(np.asarray(rec.compute_face_descriptor(chip)))
            owner.append((f.name, k))
    t = time.perf_counter()
    with torch.no_grad():
        x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()
        ours = torch.cat([net(b) for b in x.split(32)]).double().numpy()
    dt = time.perf_counter() - t
    ref = np.stack(ref)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"{len(chips)} faces in {len(files)} photos; torch forward {dt / len(chips) * 1000:.1f} ms/face (CPU)")
    print(f"min cosine {cos.min():.9f}  max relative L2 {rel.max():.2e}")
    ids_csv = args.photos / "identities.csv"
    if not ids_csv.is_file():
        return
    first = {name: i for i, (name, k) in reversed(list(enumerate(owner))) if k == 0}
    ident = {r["file"]: r["identity"] for r in csv.DictReader(ids_csv.open())}
    names = [n for n in ident if n in first]
    gaps, same, diff = [], [], []
    for a, b in itertools.combinations(names, 2):
        i, j = first[a], first[b]
        d_ref, d_ours = np.linalg.norm(ref[i] - ref[j]), np.linalg.norm(ours[i] - ours[j])
        gaps.append(abs(d_ref - d_ours))
        (same if ident[a] == ident[b] else diff).append(round(d_ref, 3) == round(d_ours, 3))
    print(f"pairs: {len(same)} same-person, {len(diff)} different; distances equal to 3 decimals: "
          f"{sum(same)}/{len(same)} same, {sum(diff)}/{len(diff)} different; max |gap| {max(gaps):.2e}")


if __name__ == "__main__":
    main()
