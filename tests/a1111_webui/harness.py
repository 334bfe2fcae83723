"""Builds a webui-like layout (extension copy, models, scratch root) and runs driver.py in an isolated Python."""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXTENSION_FILES = ("headsup_core", "scripts", "install.py", "requirements.txt", "pyproject.toml", "README.md")


def copy_extension(dest: Path) -> Path:
    """The extension folder as a webui clones it (extensions/<name>), not pip-installed."""
    ext = dest / "extensions" / "ComfyUI-HeadsUp"
    ext.mkdir(parents=True)
    for name in EXTENSION_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, ext / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy(src, ext / name)
    return ext


def standins_for(webui: Path) -> list[str]:
    dirs = [str(HERE / "standins")]
    if (webui / "modules_forge").is_dir():
        dirs.append(str(HERE / "standins_forge"))  # spandrel, esrgan_model (Forge Classic imports them eagerly)
    if (webui / "modules" / "gradio_extensions.py").is_file():
        dirs.append(str(HERE / "standins_gradio4"))  # Forge's ui_components patches gradio 4 internals
    return dirs


def run(tmp: Path, tiny: dict, path_prefix: list[str], webui: Path, upscale_script: Path,
        timeout: int = 600, env_extra: dict | None = None) -> dict:
    ext = copy_extension(tmp)
    models = tmp / "models"
    (models / "HeadsUp").mkdir(parents=True)
    (models / "Stable-diffusion" / "SD2").mkdir(parents=True)
    shutil.copy(tiny["headsup"], models / "HeadsUp" / "portrait.safetensors")
    # the webui's own checkpoint folder holds the base, chosen through the extension's setting
    shutil.copy(tiny["base_single"], models / "Stable-diffusion" / "SD2" / "tiny_sd2.safetensors")
    root = tmp / "root"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(upscale_script, root / "scripts" / "postprocessing_upscale.py")
    cfg = {"path_prefix": path_prefix, "site": site.getsitepackages(), "root": str(root), "webui": str(webui),
           "extension": str(ext), "models": str(models), "base_option": "Stable-diffusion/SD2/tiny_sd2.safetensors"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-I", "-S", str(HERE / "driver.py"), json.dumps(cfg)], check=False,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"driver failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["extension_dir"] = str(ext)
    return result


def check_common(r: dict) -> None:
    """What every webui variant must show (the "Done means" of issue 15)."""
    assert r["ok"], r.get("error", "") + r.get("stdout", "")
    assert not r["headsup_core_findable_before"]  # no editable install / site .pth could supply it
    assert Path(r["headsup_core_file"]).resolve().is_relative_to(Path(r["extension_dir"]).resolve())
    assert ["HeadsUp portrait", 4] in r["upscalers"]
    assert "ScriptPostprocessingHeadsUp" in r["postprocessing_scripts"]
    assert "Stable-diffusion/SD2/tiny_sd2.safetensors" in r["base_choices"]
    # Extras twice with the same settings: one HeadsUp pass (the webui's cache), the same picture
    assert r["passes_after"]["adain"] == 1 and r["passes_after"]["adain_again"] == 1
    assert r["diff_adain_again"] == 0.0
    # only the colour fix changes: a new pass and a new picture, and the infotext says so
    assert r["passes_after"]["wavelet"] == 2 and r["diff_wavelet"] > 1.0
    assert r["info_wavelet"]["HeadsUp"] == "colour fix wavelet"
    assert r["passes_after"]["disabled"] == 3 and r["diff_disabled_vs_wavelet"] > 1.0
    assert r["size"] == [96, 80]
    # "Scale to" a smaller size: no error, no pass; interrupt and resize 1: no pass
    assert r["scale_to_smaller"] == {"ok": True, "size": [24, 24], "passes": 0}
    assert r["interrupt"]["passes"] == 0 and r["interrupt"]["size"] == [96, 80]
    assert r["resize_1"]["passes"] == 0 and r["resize_1"]["size"] == [48, 40]
