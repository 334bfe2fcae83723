"""Runs RAM's own tagging code (OSEDiff's ``ram/`` package: ``ram_lora.ram`` + ``inference_ram``) as the parity
reference for ``headsup_core.tags``. Nothing of it is in this project: point ``HEADSUP_RAM_REFERENCE`` at a
checkout of the public OSEDiff repository (the folder that holds ``ram/``), with ``loralib`` and ``timm``
importable. Callers skip when ``available()`` is false.

Only what keeps that code running offline on today's libraries is patched, never its maths: the BERT tokenizer
it asks the hub for (tagging never uses it) is replaced by a stand-in of the same length, three helpers that
transformers 5 moved are put back where the old import looks for them, fairscale (training-only) is stubbed, and the Swin config file it reads can be
swapped for a smaller Swin of the same structure.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

ENV = "HEADSUP_RAM_REFERENCE"
BERT_VOCAB = 30524  # len(BertTokenizer bert-base-uncased) + RAM's two added tokens


def available() -> bool:
    root = os.environ.get(ENV)
    return bool(root) and os.path.isdir(os.path.join(root, "ram", "models")) and all(
        importlib.util.find_spec(m) is not None for m in ("loralib", "timm", "scipy"))


def _shims():
    import torch
    import transformers.modeling_utils as mu
    from transformers import pytorch_utils as pu

    def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned):
        mask = torch.ones(n_heads, head_size)
        heads = set(heads) - already_pruned
        for head in heads:
            mask[head - sum(1 if h < head else 0 for h in already_pruned)] = 0
        mask = mask.view(-1).contiguous().eq(1)
        return heads, torch.arange(len(mask))[mask].long()

    if importlib.util.find_spec("fairscale") is None:  # imported by RAM's ViT for training-time checkpointing only
        names = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations"]
        for name in names:
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules[names[-1]].checkpoint_wrapper = lambda module, *a, **k: module
    for name, fn in (("apply_chunking_to_forward", pu.apply_chunking_to_forward),
                     ("prune_linear_layer", pu.prune_linear_layer),
                     ("find_pruneable_heads_and_indices", find_pruneable_heads_and_indices)):
        if not hasattr(mu, name):
            setattr(mu, name, fn)


class _Tokenizer:
    def __len__(self):
        return BERT_VOCAB

    def __call__(self, text):
        return types.SimpleNamespace(input_ids=[101] + [1000] * len(text.split()) + [102])


def load(ram_path, dape_path, tag_list, swin: dict | None = None):
    """RAM's model as OSEDiff's test_osediff.py builds it (``ram(..., image_size=384, vit='swin_l')`` + eval)."""
    root = os.environ[ENV]
    if root not in sys.path:
        sys.path.insert(0, root)
    _shims()
    import ram.models.ram_lora as rl

    rl.init_tokenizer = lambda *a, **k: _Tokenizer()
    if swin is not None:
        real = rl.read_json

        def read_json(path):
            cfg = real(path)
            return {**cfg, **swin} if "swinL_384" in str(path) else cfg

        rl.read_json = read_json
    model = rl.ram(pretrained=str(ram_path), pretrained_condition=str(dape_path) if dape_path else "",
                   image_size=384, vit="swin_l", tag_list=str(tag_list))
    return model.eval()


def run(model, lq):
    """(sigmoids, tags) for a (B, 3, H, W) 0..1 batch, through test_osediff.py's ram_transforms."""
    import torch
    from ram import inference_ram
    from torchvision import transforms

    ram_transforms = transforms.Compose([transforms.Resize((384, 384)),
                                         transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                                              std=[0.229, 0.224, 0.225])])
    x = ram_transforms(lq)
    with torch.no_grad():
        _, logits, _ = model.condition_forward(x, only_feature=False)
        tags = inference_ram(x, model)
    return torch.sigmoid(logits), tags
