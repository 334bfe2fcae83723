"""Cost of the DAPE tagger on this machine, and the full-size parity check against RAM's own code.

    OMP_NUM_THREADS=2 python bench/tags.py [--small] [--reference] [--vocab DIR]

Writes random weights in RAM's exact key layout (headsup_core/testing/tiny_tags.py; full size: Swin-L 384, depths
2/2/18/2, the 2-layer Q2L head, 4585 classes unless --small) to a temporary folder, then, in a fresh subprocess
(so the peak is its own): seconds to read the tensors and build the network, seconds per tag call at 384², RSS
after loading and the process's peak RSS (ru_maxrss), against the network's own size. With --reference and
HEADSUP_RAM_REFERENCE set (see tests/ram_reference.py), RAM's own code tags the same image in another
subprocess and the largest sigmoid difference and tag-string equality are reported. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/tags.py`: the repository root holds headsup_core and bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memstat import peak_rss_bytes, rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


def _image():
    import torch

    return torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))


def measure(folder: str) -> dict:
    import torch

    from headsup_core.tags import DapeTagger

    f = Path(folder)
    rss0 = rss_bytes()
    tagger = DapeTagger(ram=f / "ram_swin_large_14m.pth", dape=f / "DAPE.pth", tag_list=f / "ram_tag_list.txt",
                        thresholds=f / "ram_tag_list_threshold.txt", device="cpu", unload_after=False)
    t0 = time.perf_counter()
    tagger.load()
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    img = _image()
    t1 = time.perf_counter()
    probs = tagger.probabilities(img)
    first_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    tags = tagger.tag(img)[0]
    second_s = time.perf_counter() - t2
    torch.save(probs, f / "ours.pt")
    return {"threads": torch.get_num_threads(), "load_s": round(load_s, 2), "tag_first_s": round(first_s, 2),
            "tag_s": round(second_s, 2), "net_mb": round(tagger.size_bytes() / MB, 1),
            "rss_start_mb": round(rss0 / MB), "rss_loaded_mb": round(rss_loaded / MB),
            "peak_rss_mb": round(peak_rss_bytes() / MB),
            "file_mb": round(sum((f / n).stat().st_size for n in ("ram_swin_large_14m.pth", "DAPE.pth")) / MB),
            "n_tags": len(tags.split(", ")) if tags else 0, "tags": tags}


def reference(folder: str, small: bool) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import ram_reference
    import torch

    from headsup_core.testing.tiny_tags import SMALL_SWIN

    f = Path(folder)
    swin = dict(SMALL_SWIN, vision_width=SMALL_SWIN["embed_dim"] * 8) if small else None
    t0 = time.perf_counter()
    model = ram_reference.load(f / "ram_swin_large_14m.pth", f / "DAPE.pth", f / "ram_tag_list.txt", swin=swin)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs, tags = ram_reference.run(model, _image())
    torch.save(probs, f / "ref.pt")
    return {"ref_load_s": round(load_s, 2), "ref_tag_s": round(time.perf_counter() - t1, 2), "ref_tags": tags[0],
            "ref_peak_rss_mb": round(peak_rss_bytes() / MB)}


def _child(mode: str, folder: str, small: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", folder] + (["--small"] if small else []),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the small Swin of the CI test instead of Swin-L")
    ap.add_argument("--reference", action="store_true", help="also run RAM's own code (HEADSUP_RAM_REFERENCE)")
    ap.add_argument("--vocab", type=Path, default=ROOT.parent / "shared" / "data" / "ram",
                    help="folder with ram_tag_list.txt and ram_tag_list_threshold.txt (default ../shared/data/ram)")
    ap.add_argument("--child", choices=["measure", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = measure(args.folder) if args.child == "measure" else reference(args.folder, args.small)
        print(json.dumps(result))
        return 0
    from headsup_core.testing.tiny_tags import write_random_ram

    with tempfile.TemporaryDirectory() as folder:
        vocab = args.vocab if (args.vocab / "ram_tag_list.txt").is_file() else None
        t0 = time.perf_counter()
        write_random_ram(folder, vocab / "ram_tag_list.txt" if vocab else None,
                         vocab / "ram_tag_list_threshold.txt" if vocab else None, num_classes=4585, full=not args.small)
        if vocab:  # the children read everything from the folder (a temporary copy)
            import shutil

            for name in ("ram_tag_list.txt", "ram_tag_list_threshold.txt"):
                shutil.copy(vocab / name, Path(folder) / name)
        result = {"size": "small" if args.small else "Swin-L", "write_s": round(time.perf_counter() - t0, 1)}
        result.update(_child("measure", folder, args.small))
        if args.reference:
            import torch

            result.update(_child("reference", folder, args.small))
            ours, ref = torch.load(Path(folder) / "ours.pt"), torch.load(Path(folder) / "ref.pt")
            result["max_sigmoid_diff"] = float((ours - ref).abs().max())
            result["tags_identical"] = result["tags"] == result.pop("ref_tags")
        result["tags"] = result["tags"][:200]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
