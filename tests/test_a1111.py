"""The A1111/Forge extension against a minimal stand-in for the webui's modules (tests/a1111_stub)."""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
STUB = Path(__file__).resolve().parent / "a1111_stub"


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models  # built once per session in conftest.py


@pytest.fixture(scope="module")
def webui(tiny, tmp_path_factory):
    """The extension script imported the way A1111 does, with models/HeadsUp holding the tiny models."""
    models = tmp_path_factory.mktemp("webui_models")
    hu = models / "HeadsUp"
    hu.mkdir()
    os.symlink(tiny["base"], hu / "base", target_is_directory=True)
    shutil.copy(tiny["headsup"], hu / "portrait.safetensors")
    shutil.copy(tiny["osediff"], hu / "osediff.pkl")
    (hu / "notes.txt").write_text("not a model")
    os.symlink(tiny["insightface_root"], models / "insightface", target_is_directory=True)
    sys.path.insert(0, str(STUB))
    try:
        from modules import shared

        shared.models_path = str(models)
        spec = importlib.util.spec_from_file_location("headsup_a1111_under_test", ROOT / "scripts" / "headsup_a1111.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod, shared
    finally:
        sys.path.remove(str(STUB))
        for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
            del sys.modules[name]


def _t1(width):
    from eval_util import t1_path

    im = Image.open(t1_path()).convert("RGB")
    return im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)


def test_discovers_one_entry_per_weights_file(webui):
    mod, _shared = webui
    up = mod.UpscalerHeadsUp(None)
    assert [s.name for s in up.scalers] == ["HeadsUp osediff", "HeadsUp portrait"]
    assert all(s.scaler is up and os.path.isfile(s.data_path) for s in up.scalers)
    # the upscaler is found the way modelloader.load_upscalers finds extensions' upscalers
    from modules import upscaler

    assert mod.UpscalerHeadsUp in upscaler.Upscaler.__subclasses__()


def test_upscales_t1_to_requested_scale(webui):
    from modules import devices

    mod, _shared = webui
    up = mod.UpscalerHeadsUp(None)
    data = next(s for s in up.scalers if s.name == "HeadsUp portrait")
    img = _t1(160)  # 160 x 111
    gc_before = devices.gc_calls
    out = data.scaler.upscale(img, 2, data.data_path)  # the call Extras and hires fix make
    assert out.size == (320, 216)  # A1111 rounds the target down to a multiple of 8
    up.scale = 2
    raw = up.do_upscale(img, data.data_path)
    assert raw.size == (320, 222)  # HeadsUp itself gives exactly 2x
    assert devices.gc_calls > gc_before
    pipe = mod._CACHE[next(iter(mod._CACHE))]
    assert pipe.device.type == "cpu"  # handed back to the CPU between runs


def test_postprocessing_section_settings_apply_to_this_job_only(webui):
    from modules import scripts_postprocessing

    mod, shared = webui
    section = mod.ScriptPostprocessingHeadsUp()
    pp = scripts_postprocessing.PostprocessedImage(_t1(64))
    shared.state.job_timestamp = "job-1"
    section.process_firstpass(pp, enable=True, reference=None, color_fix="wavelet", tile_size=128)
    section.process(pp, enable=True, reference=None, color_fix="wavelet", tile_size=128)
    assert mod.current_options()["color_fix"] == "wavelet" and mod.current_options()["tile_size"] == 128
    assert "wavelet" in pp.info["HeadsUp"]
    up = mod.UpscalerHeadsUp(None)
    up.scale = 2
    out = up.do_upscale(_t1(96), up.scalers[1].data_path)
    assert out.size == (192, 132)
    shared.state.job_timestamp = "job-2"  # e.g. a later hires fix: defaults again
    assert mod.current_options()["color_fix"] == "adain" and mod.current_options()["tile_size"] == 0
    section.process_firstpass(pp, enable=False)
    assert mod.current_options()["reference"] is None


def test_stops_when_interrupted(webui, monkeypatch):
    mod, shared = webui
    up = mod.UpscalerHeadsUp(None)
    data = up.scalers[0]
    pipe = up.load_model(data.data_path)
    calls = []
    real = pipe.upscale

    def spy(*a, progress=None, **k):
        def counting(done, total):
            calls.append(done)
            if done == 1:
                shared.state.interrupted = True  # the user presses Interrupt during the first tile
            progress(done, total)
        return real(*a, progress=counting, **k)

    monkeypatch.setattr(pipe, "upscale", spy)
    img = _t1(160)
    try:
        up.scale = 2
        out = up.do_upscale(img, data.data_path)
    finally:
        shared.state.interrupted = False
    assert out is img  # the input is handed on unchanged
    assert calls == [1]  # nothing ran after the interrupt


def test_missing_base_is_a_clear_error(webui, tmp_path, monkeypatch):
    from headsup_core.errors import MissingModelError

    mod, _shared = webui
    monkeypatch.delenv("HEADSUP_BASE", raising=False)
    with pytest.raises(MissingModelError, match="base"):
        mod.find_base(str(tmp_path))


@pytest.mark.slow  # ~20 s each: a fresh interpreter imports torch and diffusers
@pytest.mark.parametrize("loop", ["a1111", "forge", "forge_classic"])
def test_extension_as_cloned_through_stub_loader_and_extras(loop, tiny, tmp_path):
    """The driver of the real-webui test, on the stand-in: A1111's sys.path restore, the Upscale cache and the
    three upscale loops, with the extension's own folder as the only headsup_core (no editable install)."""
    from a1111_webui import harness

    r = harness.run(tmp_path, tiny, [str(STUB)], STUB, STUB / "scripts" / "postprocessing_upscale.py",
                    env_extra={"A1111_STUB_LOOP": loop})
    harness.check_common(r)
    assert r["syspath_restored"] == (loop == "a1111") and not (loop == "a1111" and r["ext_root_on_syspath"])
    # an interrupted job: A1111 1.8 calls do_upscale once (unchanged size stops it), Forge checks the flag
    # itself, Forge Classic calls it 4 times; none of them may cost a HeadsUp pass (checked in check_common)
    assert r["interrupt"]["do_upscale_calls"] == {"a1111": 1, "forge": 0, "forge_classic": 4}[loop]
    assert r["resize_1"]["do_upscale_calls"] == {"a1111": 0, "forge": 1, "forge_classic": 1}[loop]


@pytest.mark.parametrize("module", ["utils", "forge_util"])
def test_forge_prepare_free_memory_found_where_the_variant_keeps_it(webui, module, tmp_path, monkeypatch, capsys):
    mod, _shared = webui
    pkg = tmp_path / "modules_forge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / f"{module}.py").write_text("calls = []\n\ndef prepare_free_memory(aggressive=False):\n    calls.append(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mod, "_FREE", {})
    try:
        mod._free_memory()
        assert mod._FREE["source"] == f"modules_forge.{module}.prepare_free_memory"
        assert f"modules_forge.{module}" in capsys.readouterr().out  # which one is logged
        assert sys.modules[f"modules_forge.{module}"].calls == [1]
    finally:
        for name in [n for n in sys.modules if n.startswith("modules_forge")]:
            del sys.modules[name]


def test_forge_without_prepare_free_memory_says_so(webui, tmp_path, monkeypatch, capsys):
    mod, _shared = webui
    (tmp_path / "modules_forge").mkdir()
    (tmp_path / "modules_forge" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mod, "_FREE", {})
    try:
        assert mod.forge_prepare_free_memory() is None
        assert "WARNING" in capsys.readouterr().out
    finally:
        for name in [n for n in sys.modules if n.startswith("modules_forge")]:
            del sys.modules[name]


def _fake_safetensors(path, shapes, metadata=None):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=metadata)
    return str(path)


def test_base_setting_lists_only_sd2_files_of_the_webui(webui, tiny, tmp_path, monkeypatch):
    mod, shared = webui
    sd = tmp_path / "Stable-diffusion"
    (sd / "sub").mkdir(parents=True)
    shutil.copy(tiny["base_single"], sd / "sub" / "v2-1_512.safetensors")
    shutil.copy(tiny["base_sgm"], sd / "sd_turbo.safetensors")  # sgm layout (SD-Turbo)
    u = "model.diffusion_model."
    _fake_safetensors(sd / "sd15.safetensors", {f"{u}input_blocks.1.1.proj_in.weight": (4, 4, 1, 1)})
    _fake_safetensors(sd / "sdxl.safetensors", {f"{u}input_blocks.4.1.proj_in.weight": (4, 4),
                                                f"{u}label_emb.0.0.weight": (4, 4)})
    (sd / "notes.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setattr(shared.cmd_opts, "ckpt_dir", str(sd), raising=False)
    monkeypatch.delenv("HEADSUP_BASE", raising=False)
    assert mod.base_choices() == ["Automatic", "Stable-diffusion/sd_turbo.safetensors",
                                  "Stable-diffusion/sub/v2-1_512.safetensors"]
    # Automatic: models/HeadsUp/base* as before
    assert mod.find_base(mod.models_dir()) == os.path.join(mod.models_dir(), "base")
    monkeypatch.setattr(shared.opts, "headsup_base", "Stable-diffusion/sub/v2-1_512.safetensors", raising=False)
    assert mod.find_base(mod.models_dir()) == str(sd / "sub" / "v2-1_512.safetensors")
    up = mod.UpscalerHeadsUp(None)
    pipe = up.load_model(up.scalers[1].data_path)  # the base from the webui's own checkpoint folder loads
    assert next(iter(mod._CACHE))[0].endswith("v2-1_512.safetensors") and pipe is not None
    monkeypatch.setattr(shared.opts, "headsup_base", "Stable-diffusion/gone.safetensors", raising=False)
    with pytest.raises(Exception, match="gone.safetensors.*Settings"):
        mod.find_base(mod.models_dir())
    # nothing configured and nothing in models/HeadsUp: the error names the SD2 files to choose from
    monkeypatch.setattr(shared.opts, "headsup_base", "Automatic", raising=False)
    with pytest.raises(Exception, match="sd_turbo.safetensors.*HeadsUp base model"):
        mod.find_base(str(tmp_path / "empty"))
    mod._CACHE.clear()


def test_upscaler_scale_comes_from_the_weights(webui, tiny, tmp_path):
    mod, _shared = webui
    assert mod.weights_scale(str(tiny["headsup"])) == 4  # no scale recorded: OSEDiff's 4x
    assert mod.weights_scale(str(tiny["osediff"])) == 4
    assert mod.weights_scale(_fake_safetensors(tmp_path / "x2.safetensors", {"a": (1,)}, {"scale": "2"})) == 2


def test_no_pass_below_or_at_scale_1_or_when_interrupted(webui, monkeypatch):
    mod, shared = webui
    up = mod.UpscalerHeadsUp(None)
    monkeypatch.setattr(up, "load_model", lambda path: pytest.fail("a HeadsUp pass was started"))
    img = _t1(64)
    for scale in (0.5, 1):
        up.scale = scale
        assert up.do_upscale(img, up.scalers[0].data_path) is img
    up.scale = 2
    shared.state.interrupted = True
    try:
        assert up.do_upscale(img, up.scalers[0].data_path) is img
    finally:
        shared.state.interrupted = False


def test_osediff_weights_log_that_the_reference_is_ignored(webui, capsys):
    mod, shared = webui
    up = mod.UpscalerHeadsUp(None)
    data = next(s for s in up.scalers if s.name == "HeadsUp osediff")
    img = _t1(64)
    up.scale = 2
    plain = up.do_upscale(img, data.data_path)
    shared.state.job_timestamp = "job-osediff"
    mod.set_options(enable=True, reference=_t1(128), color_fix="adain", tile_size=0)
    try:
        out = up.do_upscale(img, data.data_path)
        again = up.do_upscale(img, data.data_path)
    finally:
        mod.set_options(enable=False)
    said = capsys.readouterr().out
    assert said.count("reference is ignored") == 1 and "conv_in" in said  # once, with the reason
    assert out.tobytes() == plain.tobytes() == again.tobytes() and out.size == plain.size == again.size


def test_tags_setting_gives_the_dape_tagger(webui, monkeypatch):
    import torch
    from headsup_core.errors import MissingModelError
    from headsup_core.testing.tiny_tags import write_random_ram

    mod, shared = webui
    mod.on_ui_settings()
    assert shared.opts.headsup_tags == "none" and mod.tag_source() is None
    monkeypatch.setattr(shared.opts, "headsup_tags", "dape", raising=False)
    with pytest.raises(MissingModelError, match="DAPE.pth"):
        mod.tag_source()
    paths = write_random_ram(os.path.join(mod.models_dir(), "ram"), num_classes=8)
    tagger = mod.tag_source()
    assert tagger.files.dape == paths["dape"] and mod.tag_source() is tagger  # cached
    assert isinstance(tagger(torch.rand(1, 3, 32, 32)), str)
    monkeypatch.setattr(shared.opts, "headsup_tags", "ram", raising=False)
    assert mod.tag_source().files.dape is None
    mod._TAGGER.clear()


def test_face_analysis_is_auto_like_the_cli(webui, tmp_path, monkeypatch):
    """Without an insightface pack, A1111 falls back like the CLI and ComfyUI (auto: dlib next), and says which."""
    from headsup_core.faces import dlib_backend

    if not dlib_backend.available():
        pytest.skip("dlib-bin and face-recognition-models are not installed")
    mod, shared = webui
    monkeypatch.setattr(shared, "models_path", str(tmp_path))  # no insightface/, no facedetection/
    monkeypatch.setattr(mod, "_ANALYZER", {})
    analyzer = mod.face_analyzer(required=True)
    assert analyzer is not None and analyzer.auto_note.startswith("dlib")
