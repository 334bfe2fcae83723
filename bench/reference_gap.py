"""How far are held-out faces from their references? (the toy study's "why", bench/train_toy.py)

Both faces aligned as the conditioning aligns them (``faces.align.align_face``, 5-point similarity to the FFHQ
template, 128²), PSNR of the held-out GT face against (a) every other photo of the same person (the study's
references), (b) the GT face under the self-reference warp, landmark noise and colour jitter of the earlier
study (``train.data.self_reference``), (c) every held-out photo of another person (a floor). A reference can only
add face PSNR through what it shares with the GT pixels.

    python bench/reference_gap.py [--data FOLDER] [--test-ids 3 5 7 8] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces-deepface"


def reference_gap(manifest: Path, size: int = 128) -> dict:
    """How far each held-out face is from its reference, both aligned as the conditioning aligns them: PSNR of
    the aligned GT face against (a) each other photo of the person (the study's references), (b) the GT face
    under the self-reference warp/jitter of the earlier study, (c) a stranger's photo (a floor)."""
    from headsup_core.faces.align import align_face
    from headsup_core.train.data import _read_rgb, load_samples, self_reference

    def p(a, b):
        return 10 * math.log10(255.0**2 / max(float(np.mean((a.astype(np.float64) - b) ** 2)), 1e-10))

    samples = [s for s in load_samples(manifest, (), "test") if s.refs]
    crops = [align_face(_read_rgb(s.path), np.asarray(s.faces[0]["kps"], np.float32), size)[0] for s in samples]
    rng = np.random.default_rng(0)
    out = {"other_photo": [], "self_warp": [], "stranger": []}
    for i, (s, gt) in enumerate(zip(samples, crops)):
        for ref_path, ref_kps in s.refs[0]:
            out["other_photo"].append(p(gt, align_face(_read_rgb(ref_path), np.asarray(ref_kps, np.float32),
                                                       size)[0]))
        rgb = _read_rgb(s.path)
        out["self_warp"].append(p(gt, self_reference(rgb, np.asarray(s.faces[0]["kps"], np.float32), rng, size)[0]))
        same = {r[0] for r in s.refs[0]}  # every other photo of this person
        out["stranger"] += [p(gt, crops[j]) for j in range(len(samples)) if j != i and samples[j].path not in same]
    return {k: {"mean_db": float(np.mean(v)), "std_db": float(np.std(v)), "n": len(v)} for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder of photos with identities.csv (file,identity)")
    ap.add_argument("--test-ids", nargs="+", default=["3", "5", "7", "8"], help="held-out identities")
    ap.add_argument("--work", default="out/reference_gap", help="work folder (prepared photos, cached)")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    from headsup_core.eval.arms import prepare_pairs

    manifest = prepare_pairs(a.data, Path(a.work) / "data", a.test_ids)
    res = {"test_ids": a.test_ids, **reference_gap(manifest)}
    text = json.dumps(res, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
