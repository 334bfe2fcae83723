"""Training configuration: the shipped defaults (``configs/train_default.yaml``) deep-merged with a user file."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

from ..errors import HeadsUpError

PATH_KEYS = ("base", "init_weights", "output_dir", "resume")
DATA_PATH_KEYS = ("manifest", "degradation")
LOSS_PATH_KEYS = ("lpips_backbone", "arcface_weights")


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base and where not in ("", "stages"):
            raise HeadsUpError(f"Unknown training option {where}.{k}; see configs/train_default.yaml.")
        out[k] = _merge(base[k], v, f"{where}.{k}".strip(".")) if isinstance(v, dict) and isinstance(
            base.get(k), dict) else v
    return out


def _resolve(value, root: Path):
    if value in (None, "", "latest") or Path(value).is_absolute():
        return value
    return str((root / value).resolve())


def load_train_config(path=None, overrides: dict | None = None) -> dict:
    """Defaults <- YAML file <- ``overrides``. Relative paths in the file are relative to the file's folder."""
    import yaml

    cfg = yaml.safe_load(resources.files("headsup_core").joinpath("configs/train_default.yaml").read_text())
    root = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HeadsUpError(f"Training config {p} does not exist; start from configs/train_tiny.yaml.")
        user = yaml.safe_load(p.read_text()) or {}
        unknown = set(user) - set(cfg) - {"resume"}
        if unknown:
            raise HeadsUpError(f"Unknown training option(s) {sorted(unknown)} in {p}; see configs/train_default.yaml.")
        cfg = _merge(cfg, user, "")
        root = p.resolve().parent
    cfg = _merge(cfg, overrides or {}, "") if overrides else cfg
    for k in PATH_KEYS:
        cfg[k] = _resolve(cfg.get(k), root)
    for sec, keys in (("data", DATA_PATH_KEYS), ("losses", LOSS_PATH_KEYS)):
        for k in keys:
            cfg[sec][k] = _resolve(cfg[sec].get(k), root)
    for k in ("folders", "shards"):
        cfg["data"][k] = [_resolve(f, root) for f in cfg["data"].get(k) or []]
    for st in cfg["stages"]:
        for k in DATA_PATH_KEYS:
            if k in st.get("data", {}):
                st["data"][k] = _resolve(st["data"][k], root)
        for k in ("folders", "shards"):
            if k in st.get("data", {}):
                st["data"][k] = [_resolve(f, root) for f in st["data"][k]]
    return cfg


def stage_plan(cfg: dict) -> list[dict]:
    """Stages with their own data/losses (stage overrides on top of the global sections) and start steps."""
    plan, start = [], 0
    for i, st in enumerate(cfg["stages"]):
        if int(st.get("steps", 0)) <= 0:
            raise HeadsUpError(f"Stage {i} ({st.get('name')}) needs a positive 'steps'.")
        plan.append({"name": st.get("name", f"stage{i}"), "index": i, "start": start, "steps": int(st["steps"]),
                     "data": _merge(cfg["data"], st.get("data", {}), "data"),
                     "losses": _merge(cfg["losses"], st.get("losses", {}), "losses")})
        start += int(st["steps"])
    return plan
