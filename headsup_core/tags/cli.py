"""Command line for the tagger: ``--tags`` options of ``headsup upscale`` and the ``headsup tags IMAGE...`` command."""
from __future__ import annotations

from pathlib import Path

TAG_CHOICES = ("none", "dape", "ram")


def add_tag_arguments(parser, default: str = "none") -> None:
    parser.add_argument("--tags", choices=TAG_CHOICES, default=default,
                        help="language description extraction: dape = OSEDiff's DAPE tags of the input (RAM + "
                        "DAPE's LoRA), ram = plain RAM tags, none = OSEDiff's empty form (default " + default + "); "
                        "the prompt becomes \"TAGS, PROMPT,\". Files from <models>/ram/ unless given below")
    parser.add_argument("--ram", type=Path, help="RAM weights (default <models>/ram/ram_swin_large_14m.pth)")
    parser.add_argument("--dape", type=Path, help="DAPE weights (default <models>/ram/DAPE.pth)")
    parser.add_argument("--tag-list", type=Path, help="ram_tag_list.txt (default: next to the RAM weights, else "
                        "<models>/ram/)")
    parser.add_argument("--tag-thresholds", type=Path, help="ram_tag_list_threshold.txt (default: as --tag-list)")


def tagger_from_args(args, root=None):
    """The ``DapeTagger`` the options ask for, or None for ``--tags none`` (files checked now, loaded on first use)."""
    if getattr(args, "tags", "none") == "none":
        return None
    from .tagger import DapeTagger

    return DapeTagger(root, args.ram, args.dape, args.tag_list, args.tag_thresholds, use_dape=args.tags == "dape",
                      device=getattr(args, "device", None))


def cmd_tags(args) -> int:
    from ..batch import expand_inputs
    from ..imageio import to_batch
    from ..files.read import load_image

    tagger = tagger_from_args(args, args.models)
    files = [src for src, _ in expand_inputs(args.inputs)]  # the same inputs (and refusals) as headsup upscale
    for src in files:
        tags = tagger(to_batch(load_image(src)).rgb)
        print(f"{src}: {tags}" if len(files) > 1 else tags)
    return 0


def register(sub) -> None:
    p = sub.add_parser("tags", help="print the DAPE/RAM tags of images (what --tags dape feeds the prompt)",
                       description="Print the tags OSEDiff's DAPE (or plain RAM) finds in each image, joined with "
                       "', ' in RAM's class order.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="images or folders")
    p.add_argument("--models", help="model root (default $HEADSUP_MODEL_ROOT or ~/.cache/headsup/models)")
    p.add_argument("--device", help="cuda, mps or cpu (default cpu)")
    add_tag_arguments(p, default="dape")
    p.set_defaults(func=cmd_tags)
