"""SD2.x text conditioning, offline: the OpenCLIP-H text tower from a single file, the CLIP BPE tokenizer, and
OSEDiff's prompt form.

* Single files keep the text tower in one of two layouts: LDM ``cond_stage_model.model.*`` (v2-1 512/768) or
  sgm ``conditioner.embedders.0.model.*`` (SD-Turbo). Either is converted with diffusers' own
  ``convert_open_clip_checkpoint`` (no hand-written key map) into a transformers ``CLIPTextModel`` built from
  the config shipped in ``configs/sd2/text_encoder`` (23 layers: SD2 uses the penultimate block, then the
  final layer norm; the file's 24th block is not used).
* The tokenizer is CLIP's BPE (vocabulary ``bpe_simple_vocab_16e6.txt.gz``, MIT licence, OpenAI) read from an
  installed package that carries it (``openai-clip`` or ``open_clip_torch``), padded with ``!`` as SD2 does.
* OSEDiff conditions on ``f"{tags}, {prompt},"``; with no tags and no prompt that is ``", ,"``.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import gzip
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import MissingModelError, WeightsError

log = logging.getLogger("headsup")
TEXT_PREFIXES = {"ldm": "cond_stage_model.model.", "sgm": "conditioner.embedders.0.model."}
TEXT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sd2" / "text_encoder"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGES = ("clip", "open_clip")  # openai-clip, open_clip_torch: both ship the same BPE vocabulary
SD2_PAD_TOKEN = "!"
MAX_LENGTH = 77

# A tag source maps the LQ image (1x3xHxW float tensor in 0..1) to a tag string, e.g. a RAM/DAPE tagger.
TagSource = Callable[[torch.Tensor], str]


def osediff_prompt(prompt: str | None = None, tags: str | None = None) -> str:
    """OSEDiff's conditioning text: ``f"{tags}, {prompt},"`` (no tags, no prompt: ``", ,"``)."""
    return f"{(tags or '').strip()}, {(prompt or '').strip()},"


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars ("Loading weights ...") while we load or save small parts."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover
        yield
        return
    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


# ----------------------------------------------------------------------------------------------- tokenizer
def find_bpe_vocab() -> Path:
    """The CLIP BPE vocabulary file from an installed package, without importing that package."""
    for name in BPE_PACKAGES:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / BPE_FILE
            if path.is_file():
                return path
    raise MissingModelError(
        f"The CLIP tokenizer vocabulary ({BPE_FILE}) was not found; it ships with the openai-clip package: "
        "pip install openai-clip (or open_clip_torch)."
    )


def bpe_vocab_and_merges(path: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merge list, built from the BPE file exactly as CLIP's own tokenizer builds them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


@functools.lru_cache(maxsize=1)
def sd2_tokenizer():
    """The SD2 tokenizer (CLIP BPE, 77 tokens, padded with ``!``), built offline from the BPE vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocab_and_merges(find_bpe_vocab())
    with tempfile.TemporaryDirectory(prefix="headsup_tok_") as tmp:
        write_tokenizer_files(tmp, vocab, merges)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def write_tokenizer_files(folder: str | os.PathLike, vocab: dict[str, int] | None = None,
                          merges: list[str] | None = None) -> None:
    """Write a diffusers-style ``tokenizer/`` folder (vocab.json, merges.txt, SD2 settings)."""
    if vocab is None or merges is None:
        vocab, merges = bpe_vocab_and_merges(find_bpe_vocab())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "pad_token": SD2_PAD_TOKEN,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "do_lower_case": True}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "pad_token": SD2_PAD_TOKEN, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}), encoding="utf-8")


def prompt_length(tokenizer, encoder) -> int:
    """How many tokens a prompt is padded and truncated to: what this tokenizer and text encoder were trained with.

    A diffusers folder's own ``tokenizer/`` settings are honoured (capped by the encoder's positions); single files
    carry no tokenizer and get SD2's 77 from ``sd2_tokenizer``. ``model_max_length`` is a huge sentinel when unset.
    """
    positions = int(getattr(getattr(encoder, "config", None), "max_position_embeddings", MAX_LENGTH))
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < positions:
        return declared
    return positions


def tokenize(tokenizer, text: str, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """``max_length`` token ids; a longer prompt is cut to the text encoder's length, with one warning saying so."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()  # its own "sequence length is longer" notice would be a second warning
    try:
        ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    finally:
        tlog.set_verbosity(level)
    if len(ids) + 2 > max_length:  # + the start and end tokens
        dropped = tokenizer.decode(ids[max_length - 2:]).strip()
        logging.getLogger("headsup").warning(
            "headsup: the prompt has %d tokens but the text encoder reads at most %d, so its end is ignored: %r.",
            len(ids) + 2, max_length, dropped if len(dropped) <= 60 else "..." + dropped[-57:])
    return tokenizer(text, max_length=max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------- text tower
def text_config(override: dict | None = None):
    from transformers import CLIPTextConfig

    if override:
        return CLIPTextConfig(**{k: v for k, v in override.items() if not k.startswith("_")})
    return CLIPTextConfig.from_json_file(str(TEXT_CONFIG_DIR / "config.json"))


def text_layout(keys) -> str | None:
    """'ldm' or 'sgm' when the state dict holds an OpenCLIP text tower under that prefix, else None."""
    for layout, prefix in TEXT_PREFIXES.items():
        if f"{prefix}token_embedding.weight" in keys:
            return layout
    return None


def openclip_blocks(sd: dict, prefix: str) -> int:
    marker = f"{prefix}transformer.resblocks."
    ids = {int(k[len(marker):].split(".", 1)[0]) for k in sd if k.startswith(marker)}
    return max(ids) + 1 if ids else 0


def check_text_tower(sd: dict, prefix: str, config, path: str) -> None:
    """One-sentence refusals for a text tower that does not fit SD2's (width, depth)."""
    emb = sd.get(f"{prefix}token_embedding.weight")
    if emb is None:
        raise WeightsError(f"{path} has no text encoder ({prefix}token_embedding.weight is missing).")
    if emb.ndim != 2 or emb.shape[1] != config.hidden_size:
        raise WeightsError(f"{path}: the text encoder is {emb.shape[-1]} wide but SD2's OpenCLIP-H text encoder is "
                           f"{config.hidden_size} wide; this is not an SD2.x text encoder.")
    blocks = openclip_blocks(sd, prefix)
    if blocks < config.num_hidden_layers:
        raise WeightsError(f"{path}: the text encoder has {blocks} transformer blocks but SD2 needs "
                           f"{config.num_hidden_layers} (the file is truncated or not SD2.x).")
    for n in range(config.num_hidden_layers):
        key = f"{prefix}transformer.resblocks.{n}.attn.in_proj_weight"
        if key not in sd:
            raise WeightsError(f"{path}: the text encoder is incomplete ({key} is missing).")


def convert_text_encoder(sd: dict, layout: str, path: str, config_override: dict | None = None):
    """OpenCLIP text tower (LDM or sgm prefix) -> transformers ``CLIPTextModel`` (fp32, eval), via diffusers."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel

    prefix = TEXT_PREFIXES[layout]
    config = text_config(config_override)
    check_text_tower(sd, prefix, config, path)
    tower = {k: v for k, v in sd.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = CLIPTextModel(config)
    converted = convert_open_clip_checkpoint(model, tower, prefix=prefix)
    own = model.state_dict()
    has_prefix = any(k.startswith("text_model.") for k in own)  # transformers 4 keeps it, 5 drops it
    state = {}
    for key, value in converted.items():
        if key == "text_projection.weight":
            continue  # SD2 conditions on the hidden states; the projection is not used
        name = key if has_prefix else key.removeprefix("text_model.")
        if ".encoder.layers." in f".{name}":
            layer = int(name.split("encoder.layers.", 1)[1].split(".", 1)[0])
            if layer >= config.num_hidden_layers:
                continue  # SD2 uses the penultimate block: the file's last block is not part of the model
        state[name] = value
    missing = sorted(set(own) - set(state) - {k for k in own if k.endswith("position_ids")})
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(f"{path}: the text encoder does not fit SD2's ({len(missing)} missing, "
                           f"{len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[:2]}).")
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise WeightsError(f"{path}: the text encoder tensor {key} has shape {tuple(value.shape)} but SD2 needs "
                               f"{tuple(own[key].shape)}.")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers built on the meta device
        if buf.device.type == "meta":
            if not name.endswith("position_ids"):
                raise WeightsError(f"{path}: cannot initialise the text encoder buffer {name}.")
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(
                leaf, torch.arange(config.max_position_embeddings).expand(1, -1).clone(), persistent=False)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- encoding
_EMBED_CACHE: dict[tuple[str, str], torch.Tensor] = {}
_EMBED_CACHE_MAX = 32


class PromptEncoder:
    """Encodes prompts with a base's text encoder, loaded only when needed and freed after each use.

    ``loader()`` returns ``(tokenizer, CLIPTextModel)``. Results are cached per (base key, text) process-wide,
    so a prompt is encoded once per base.
    """

    def __init__(self, loader: Callable[[], tuple[Any, Any]], key: str):
        self.loader = loader
        self.key = key

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor:
        cached = _EMBED_CACHE.get((self.key, text))
        if cached is not None:
            return cached
        tokenizer, encoder = self.loader()
        try:
            ids = tokenize(tokenizer, text, prompt_length(tokenizer, encoder))
            embeds = encoder(ids.to(encoder.device))[0].float().cpu()
        finally:
            del encoder  # free the text encoder right away: it is ~1.4 GB for SD2 and not needed again
            gc.collect()
        if len(_EMBED_CACHE) >= _EMBED_CACHE_MAX:
            _EMBED_CACHE.pop(next(iter(_EMBED_CACHE)))
        _EMBED_CACHE[(self.key, text)] = embeds
        return embeds


def single_file_text_loader(path: str, layout: str, tensors: dict | None = None,
                            config_override: dict | None = None) -> Callable[[], tuple[Any, Any]]:
    """A loader for the text tower of a single file. ``.safetensors`` are re-read lazily (only the tower's
    tensors); for pickled checkpoints the tower's tensors, already read, are kept in ``tensors``."""
    prefix = TEXT_PREFIXES[layout]
    kept = None if path.endswith(".safetensors") else {k: v for k, v in (tensors or {}).items()
                                                       if k.startswith(prefix)}

    def load():
        sd = kept
        if sd is None:
            from .stream import SingleFile

            src = SingleFile(path)
            sd = src.read(src.keys_with_prefix(prefix))  # checked for NaN/inf as it is read
        return sd2_tokenizer(), convert_text_encoder(sd, layout, path, config_override)
    return load
