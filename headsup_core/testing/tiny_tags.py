"""Random RAM/DAPE checkpoints in the exact key layout of RAM's own code, for tests, benchmarks and install checks.

``write_random_ram(folder, ...)`` writes ``ram_swin_large_14m.pth`` (``{"model": state}``, with RAM's buffers,
the tagging head, a tag encoder sharing the head's parameters, and unrelated text-decoder tensors that tagging
must not read) and ``DAPE.pth`` (a flat state: LoRA on the Swin's qkv and on the cross-attention query/key of
both the tagging head and the tag encoder, plus a few overridden tensors), and, when no vocabulary is given, a
synthetic ``ram_tag_list.txt`` / ``ram_tag_list_threshold.txt``. ``full=True`` gives Swin-L's real sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..tags.files import DAPE_WEIGHTS, RAM_WEIGHTS, TAG_LIST, TAG_THRESHOLDS
from ..tags.swin import _relative_position_index, _shift_mask

FULL_SWIN = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
SMALL_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))  # same structure, fewer blocks
HIDDEN, INTER, LABEL_DIM, WINDOW, IMG, LORA_R = 768, 3072, 512, 12, 384, 8
CENTRE_LOGIT = 0.3  # sigmoid 0.57: about a third of the tags above RAM's usual 0.65


def _linear(sd, name, n_out, n_in, g, bias=True, std=None):
    sd[name + ".weight"] = torch.randn(n_out, n_in, generator=g) * (std if std is not None else n_in ** -0.5)
    if bias:
        sd[name + ".bias"] = torch.randn(n_out, generator=g) * 0.02


def _norm(sd, name, n, g):
    sd[name + ".weight"] = 1 + 0.1 * torch.randn(n, generator=g)
    sd[name + ".bias"] = 0.05 * torch.randn(n, generator=g)


def _swin(sd, g, embed_dim, depths, num_heads):
    p = "visual_encoder."
    sd[p + "patch_embed.proj.weight"] = torch.randn(embed_dim, 3, 4, 4, generator=g) * 0.2
    sd[p + "patch_embed.proj.bias"] = torch.randn(embed_dim, generator=g) * 0.02
    _norm(sd, p + "patch_embed.norm", embed_dim, g)
    res = IMG // 4
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim, r = embed_dim * 2 ** i, res // 2 ** i
        w = min(WINDOW, r)
        for j in range(depth):
            b = f"{p}layers.{i}.blocks.{j}."
            _norm(sd, b + "norm1", dim, g)
            sd[b + "attn.relative_position_bias_table"] = torch.randn((2 * w - 1) ** 2, heads, generator=g) * 0.5
            sd[b + "attn.relative_position_index"] = _relative_position_index(w)
            _linear(sd, b + "attn.qkv", 3 * dim, dim, g)
            _linear(sd, b + "attn.proj", dim, dim, g)
            _norm(sd, b + "norm2", dim, g)
            _linear(sd, b + "mlp.fc1", 4 * dim, dim, g)
            _linear(sd, b + "mlp.fc2", dim, 4 * dim, g, std=(4 * dim) ** -0.5 * 0.5)
            if j % 2 == 1 and r > WINDOW:
                sd[b + "attn_mask"] = _shift_mask(r, r, w, w // 2)
        if i < len(depths) - 1:
            _norm(sd, f"{p}layers.{i}.downsample.norm", 4 * dim, g)
            _linear(sd, f"{p}layers.{i}.downsample.reduction", 2 * dim, 4 * dim, g, bias=False)
    _norm(sd, p + "norm", embed_dim * 2 ** (len(depths) - 1), g)
    return embed_dim * 2 ** (len(depths) - 1)


def _bert_layer(sd, p, g, cross=True, self_attn=False):
    if self_attn:
        for n in ("query", "key", "value"):
            _linear(sd, f"{p}attention.self.{n}", HIDDEN, HIDDEN, g)
        _linear(sd, p + "attention.output.dense", HIDDEN, HIDDEN, g)
        _norm(sd, p + "attention.output.LayerNorm", HIDDEN, g)
    if cross:
        _linear(sd, p + "crossattention.self.query", HIDDEN, HIDDEN, g)
        _linear(sd, p + "crossattention.self.key", HIDDEN, LABEL_DIM, g)
        _linear(sd, p + "crossattention.self.value", HIDDEN, LABEL_DIM, g)
        _linear(sd, p + "crossattention.output.dense", HIDDEN, HIDDEN, g)
        _norm(sd, p + "crossattention.output.LayerNorm", HIDDEN, g)
    _linear(sd, p + "intermediate.dense", INTER, HIDDEN, g)
    _linear(sd, p + "output.dense", HIDDEN, INTER, g, std=INTER ** -0.5 * 0.5)
    _norm(sd, p + "output.LayerNorm", HIDDEN, g)


def random_ram_states(num_classes: int, seed: int = 0, full: bool = False, head_layers: int = 2,
                      encoder_layers: int = 3):
    """(ram_state, dape_state) in RAM's key layout, random."""
    g = torch.Generator().manual_seed(seed)
    cfg = FULL_SWIN if full else SMALL_SWIN
    sd: dict[str, torch.Tensor] = {}
    width = _swin(sd, g, **cfg)
    _linear(sd, "image_proj", LABEL_DIM, width, g)
    sd["label_embed"] = torch.randn(num_classes, LABEL_DIM, generator=g)
    _linear(sd, "wordvec_proj", HIDDEN, LABEL_DIM, g)
    sd["fc.weight"] = torch.randn(1, HIDDEN, generator=g) * 0.1
    for i in range(head_layers):
        _bert_layer(sd, f"tagging_head.encoder.layer.{i}.", g)
    sd["fc.bias"] = torch.zeros(1)  # write_random_ram centres it
    for i in range(encoder_layers):  # the tag encoder: self-attention + cross-attention; its first layers are tied
        _bert_layer(sd, f"tag_encoder.encoder.layer.{i}.", g, self_attn=True)
        if i < head_layers:  # a real save of the tied model holds the same values under both names
            for k in [k for k in sd if k.startswith(f"tagging_head.encoder.layer.{i}.")]:
                sd[k.replace("tagging_head.", "tag_encoder.", 1)] = sd[k].clone()
    _norm(sd, "tag_encoder.embeddings.LayerNorm", HIDDEN, g)
    _norm(sd, "text_decoder.bert.encoder.layer.0.output.LayerNorm", HIDDEN, g)
    dape: dict[str, torch.Tensor] = {}
    for k in [k for k in sd if k.endswith("attn.qkv.weight")]:
        dim = sd[k].shape[1]
        dape[k[:-6] + "lora_A"] = torch.randn(2 * LORA_R, dim, generator=g) * dim ** -0.5
        dape[k[:-6] + "lora_B"] = torch.randn(2 * dim, LORA_R, generator=g) * 0.3
    for owner in ("tagging_head", "tag_encoder"):
        for i in range(head_layers):
            for n, n_in in (("query", HIDDEN), ("key", LABEL_DIM)):
                p = f"{owner}.encoder.layer.{i}.crossattention.self.{n}."
                dape[p + "lora_A"] = torch.randn(LORA_R, n_in, generator=g) * n_in ** -0.5
                dape[p + "lora_B"] = torch.randn(HIDDEN, LORA_R, generator=g) * 0.3
    dape["image_proj.bias"] = torch.randn(LABEL_DIM, generator=g) * 0.02
    dape["visual_encoder.norm.bias"] = torch.randn(width, generator=g) * 0.05
    return sd, dape


def write_random_ram(folder, tag_list=None, thresholds=None, num_classes: int = 64, seed: int = 0,
                     full: bool = False) -> dict:
    """Write the two checkpoints (and a synthetic vocabulary unless ``tag_list`` is given) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tag_list is not None:
        tags = Path(tag_list).read_text(encoding="utf-8").splitlines()
        num_classes = len(tags)
    ram, dape = random_ram_states(num_classes, seed, full)
    torch.save(dape, folder / DAPE_WEIGHTS)
    paths = {"ram": folder / RAM_WEIGHTS, "dape": folder / DAPE_WEIGHTS}
    torch.save({"model": ram}, folder / RAM_WEIGHTS)
    # Centre the logits of a noise image (what tests feed) below the usual threshold: a mix of tags passes.
    from ..tags.files import tagging_state_dict
    from ..tags.tagger import build_net, preprocess

    with torch.no_grad():
        noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        logits = build_net(tagging_state_dict(paths["ram"], paths["dape"]))(preprocess(noise))
    ram["fc.bias"] = ram["fc.bias"] + (CENTRE_LOGIT - logits.median())
    torch.save({"model": ram}, folder / RAM_WEIGHTS)
    if tag_list is None:
        (folder / TAG_LIST).write_text("\n".join(f"tag {i}" for i in range(num_classes)) + "\n", encoding="utf-8")
        g = torch.Generator().manual_seed(seed + 1)
        th = 0.4 + 0.35 * torch.rand(num_classes, generator=g)
        (folder / TAG_THRESHOLDS).write_text("\n".join(f"{v:.4f}" for v in th.tolist()) + "\n", encoding="utf-8")
        paths.update(tag_list=folder / TAG_LIST, thresholds=folder / TAG_THRESHOLDS)
    else:
        paths.update(tag_list=Path(tag_list), thresholds=Path(thresholds))
    return paths
