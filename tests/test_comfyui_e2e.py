"""End to end against a real ComfyUI checkout (skipped unless COMFYUI_PATH is set).

Starts `main.py --cpu` on a free loopback port with `--base-directory` pointing at a temporary folder that
holds the pack (symlinked into custom_nodes/), the tiny models in ComfyUI's model folders, and test photos
in input/. Then: /object_info lists the nodes; every shipped API workflow runs through POST /prompt and
saves images of the right size; bad workflows (missing weights, a reference without a face) report a clear
error in the history while the server stays up; a long run stops on POST /interrupt.

COMFYUI_PYTHON selects the interpreter that runs ComfyUI (default: $COMFYUI_PATH/venv/bin/python if it
exists, else this interpreter). It needs ComfyUI's requirements and this pack's requirements.txt.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

COMFYUI = os.environ.get("COMFYUI_PATH")
PACK_DIR = Path(__file__).resolve().parents[1]
API_DIR = PACK_DIR / "workflows" / "api"
NODE_IDS = ("HeadsUpLoader", "HeadsUpFaceAnalysisLoader", "HeadsUpReferenceEncoder", "HeadsUpUpscale",
            "HeadsUpBlendUpscale", "HeadsUpPatchModel", "HeadsUpTagger")
INPUT_SIZES = {"portrait.png": (96, 66), "reference.png": (112, 112), "group.png": (112, 56),
               "person_a.png": (112, 112), "person_b.png": (112, 112), "black.png": (64, 64), "big.png": (320, 320)}

SD2_BASE, SD2_WEIGHTS = "base_sd2.safetensors", "headsup_sd2.safetensors"

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")]


def _python():
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI) / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photo(name):
    import insightface

    return Image.open(Path(insightface.__file__).parent / "data" / "images" / name).convert("RGB")


def _write_inputs(folder):
    tom = _photo("Tom_Hanks_54745.png")
    other = _photo("t1.jpg").crop((0, 0, 400, 400)).resize((112, 112), Image.BICUBIC)
    group = Image.new("RGB", (224, 112))
    group.paste(tom, (0, 0))
    group.paste(other, (112, 0))
    rng = np.random.default_rng(0)
    images = {
        "portrait.png": _photo("t1.jpg"), "reference.png": tom, "group.png": group, "person_a.png": tom,
        "person_b.png": other, "black.png": Image.new("RGB", (64, 64)),
        "big.png": Image.fromarray(rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)),
    }
    for name, img in images.items():
        img.resize(INPUT_SIZES[name], Image.BICUBIC).save(folder / name)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models  # built once per session in conftest.py


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """A small SD2-shaped single file (real SD2 VAE and CLIP-H shapes) that CheckpointLoaderSimple accepts."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from sd2_small import write_sd2_small
    finally:
        sys.path.remove(str(Path(__file__).parent))
    return write_sd2_small(tmp_path_factory.mktemp("sd2"), with_clip=True)


def _prepare_base(tiny, sd2, base):
    """ComfyUI's base directory: the pack in custom_nodes, the test models, input photos."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/headsup", "models/checkpoints",
                "models/diffusers"):
        (base / sub).mkdir(parents=True)
    os.symlink(PACK_DIR, base / "custom_nodes" / "ComfyUI-HeadsUp", target_is_directory=True)
    models = base / "models"
    os.symlink(tiny["headsup"], models / "headsup" / "headsup.safetensors")
    os.symlink(base / "unmounted" / "moved.safetensors", models / "headsup" / "moved_away.safetensors")  # dangling
    os.symlink(tiny["base_single"], models / "checkpoints" / "base.safetensors")
    os.symlink(tiny["base"], models / "diffusers" / "base", target_is_directory=True)
    os.symlink(tiny["insightface_root"], models / "insightface", target_is_directory=True)
    os.symlink(tiny["facexlib_dir"], models / "facedetection", target_is_directory=True)
    from headsup_core.testing.tiny_tags import write_random_ram

    write_random_ram(models / "ram", num_classes=32)  # the tagger's files, random, in RAM's layout
    _write_inputs(base / "input")
    # extra_model_paths.yaml must keep working for our folders: a second headsup folder outside models/.
    (base / "elsewhere" / "my_headsup").mkdir(parents=True)
    os.symlink(tiny["headsup"], base / "elsewhere" / "my_headsup" / "extra.safetensors")
    extra_yaml = base / "extra_model_paths.yaml"
    extra_yaml.write_text(f"e2e:\n    base_path: {base / 'elsewhere'}\n    headsup: my_headsup\n")
    os.symlink(sd2["base"], models / "checkpoints" / "base_sd2.safetensors")
    os.symlink(sd2["weights"], models / "headsup" / "headsup_sd2.safetensors")
    (base / "input" / "portrait_copy.png").write_bytes((base / "input" / "portrait.png").read_bytes())
    return extra_yaml


def _start(base, extra_yaml, *flags, cpu=True):
    port = _free_port()
    log_path = base / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([_python(), "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1",
                                 "--port", str(port),
                                 "--base-directory", str(base), "--extra-model-paths-config", str(extra_yaml),
                                 *flags], cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = SimpleNamespace(url=f"http://127.0.0.1:{port}", base=base, proc=proc, log=log_path)
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            _get(srv, "/object_info/HeadsUpLoader")
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"ComfyUI did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
    return srv


def _stop(srv):
    proc = srv.proc
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tiny, sd2, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    srv = _start(base, _prepare_base(tiny, sd2, base))
    yield srv
    _stop(srv)


def _get(srv, path):
    with urllib.request.urlopen(srv.url + path, timeout=30) as r:
        return json.loads(r.read())


def _post(srv, path, payload=None):
    req = urllib.request.Request(srv.url + path, data=json.dumps(payload or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return r.status, (json.loads(body) if body else None)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _workflow(name, **widget_overrides):
    """An API workflow with the tiny models selected; overrides are {class_type: {input: value}}."""
    api = json.loads((API_DIR / f"{name}.json").read_text())
    overrides = {"HeadsUpLoader": {"base": "diffusers/base"}, "HeadsUpFaceAnalysisLoader": {"pack": "tiny"},
                 "CheckpointLoaderSimple": {"ckpt_name": SD2_BASE}, "HeadsUpPatchModel": {"weights": SD2_WEIGHTS}}
    for typ, values in widget_overrides.items():
        overrides.setdefault(typ, {}).update(values)
    for node in api.values():
        node["inputs"].update(overrides.get(node["class_type"], {}))
    return api


def _submit(srv, api):
    status, body = _post(srv, "/prompt", {"prompt": api, "client_id": "headsup-e2e"})
    assert status == 200, body
    return body["prompt_id"]


def _wait(srv, prompt_id, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            entry = _get(srv, f"/history/{prompt_id}").get(prompt_id)
        except (TimeoutError, urllib.error.URLError):  # a busy server on a loaded CPU answers late; ask again
            entry = None
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
            return entry
        assert srv.proc.poll() is None, f"ComfyUI died:\n{srv.log.read_text()[-3000:]}"
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout}s")


def _messages(entry, kind):
    return [data for name, data in entry["status"].get("messages", []) if name == kind]


def _image_sizes(srv, entry, node_id):
    out = []
    for img in entry["outputs"].get(node_id, {}).get("images", []):
        folder = srv.base / ("output" if img["type"] == "output" else "temp")
        with Image.open(folder / img["subfolder"] / img["filename"]) as im:
            out.append(im.size)
    return out


def test_object_info_lists_the_nodes_and_fits_the_workflows(server):
    info = _get(server, "/object_info")
    for node_id in NODE_IDS:
        assert info[node_id]["category"] == "HeadsUp"
    weights = info["HeadsUpLoader"]["input"]["required"]["weights"][1]["options"]
    assert weights == ["extra.safetensors", "headsup.safetensors", "headsup_sd2.safetensors", "moved_away.safetensors"]
    for path in sorted(API_DIR.glob("*.json")):
        for node in json.loads(path.read_text()).values():
            spec = info[node["class_type"]]
            order = spec["input_order"]
            known = order.get("required", []) + order.get("optional", [])
            assert set(node["inputs"]) <= set(known), (path.name, node["class_type"])
            assert set(order.get("required", [])) <= set(node["inputs"]), (path.name, node["class_type"])


def test_workflows_are_offered_as_templates(server):
    templates = _get(server, "/workflow_templates")
    assert sorted(templates["ComfyUI-HeadsUp"]) == sorted(p.stem for p in (PACK_DIR / "workflows").glob("*.json"))
    ui = _get(server, "/api/workflow_templates/ComfyUI-HeadsUp/headsup_portrait_x4.json")
    assert ui["version"] == 0.4 and {n["type"] for n in ui["nodes"]} >= {"HeadsUpLoader", "HeadsUpUpscale"}


def test_weights_from_an_extra_model_paths_folder(server):
    entry = _wait(server, _submit(server, _workflow("headsup_portrait_x4",
                                                    HeadsUpLoader={"weights": "extra.safetensors"})))
    assert entry["status"]["status_str"] == "success", entry["status"]


def _id_of(api, class_type, title_part=""):
    return next(k for k, v in api.items() if v["class_type"] == class_type and title_part in v["_meta"]["title"])


@pytest.mark.parametrize("name,lq", [("headsup_portrait_x4", "portrait.png"),
                                     ("headsup_reference_x4", "portrait.png"),
                                     ("headsup_group_references", "group.png"),
                                     ("headsup_graph_model_x4", "portrait.png"),
                                     ("headsup_portrait_tags_x4", "portrait.png")])
def test_shipped_workflow_runs(server, name, lq):
    api = _workflow(name)
    log_start = len(server.log.read_text())
    entry = _wait(server, _submit(server, api))
    assert entry["status"]["status_str"] == "success", entry["status"]
    w, h = INPUT_SIZES[lq]
    assert _image_sizes(server, entry, _id_of(api, "SaveImage")) == [(4 * w, 4 * h)]
    for node_id, node in api.items():
        if node["class_type"] == "PreviewImage":
            src = api[node["inputs"]["images"][0]]["class_type"]
            expected = (512, 512) if src == "HeadsUpReferenceEncoder" else (4 * w, 4 * h)  # aligned face / mask
            assert _image_sizes(server, entry, node_id) == [expected], (name, node["_meta"]["title"])
    if name == "headsup_portrait_tags_x4":  # the tagger's tags reached the upscaler's prompt
        report = server.log.read_text()[log_start:]
        assert re.search(r"HeadsUp tagger image 0: ", report) and re.search(r"HeadsUp image 0 tags: ", report), \
            report[-2000:]
    if name == "headsup_group_references":  # the console report: each person's reference on its own face
        report = server.log.read_text()[log_start:]
        assert re.search(r"face 0 \[.*\]: reference 0 \(similarity", report), report[-2000:]
        assert re.search(r"face 1 \[.*\]: reference 1 \(similarity", report), report[-2000:]


def _error_of(server, api):
    entry = _wait(server, _submit(server, api))
    assert entry["status"]["status_str"] == "error"
    errors = _messages(entry, "execution_error")
    assert len(errors) == 1, entry["status"]
    return errors[0]


# ComfyUI 0.3.64 does not check V3 combo values when a prompt is queued, so both an unknown name and a file
# that vanished (a dangling link to an unmounted drive) reach the loader, which must say what is missing.
@pytest.mark.parametrize("weights", ["nope.safetensors", "moved_away.safetensors"])
def test_missing_weights_file_reaches_the_history(server, weights):
    err = _error_of(server, _workflow("headsup_portrait_x4", HeadsUpLoader={"weights": weights}))
    assert err["node_type"] == "HeadsUpLoader" and err["exception_type"].endswith("MissingModelError")
    assert f"'{weights}' was not found" in err["exception_message"]
    assert str(server.base / "models" / "headsup") in err["exception_message"]
    assert server.proc.poll() is None and _get(server, "/system_stats")


def test_reference_without_a_face_reaches_the_history(server):
    api = _workflow("headsup_reference_x4")
    api[_id_of(api, "LoadImage", "Reference")]["inputs"]["image"] = "black.png"
    err = _error_of(server, api)
    assert err["node_type"] == "HeadsUpReferenceEncoder" and err["exception_type"].endswith("FaceError")
    assert "no face found in reference" in err["exception_message"].lower()
    assert server.proc.poll() is None and _get(server, "/system_stats")


def test_interrupt_stops_a_long_run(server):
    warm = _wait(server, _submit(server, _workflow("headsup_portrait_x4")))  # loader output cached by ComfyUI
    assert warm["status"]["status_str"] == "success"
    api = _workflow("headsup_portrait_x4", HeadsUpUpscale={"tile_size": 64})
    api[_id_of(api, "LoadImage")]["inputs"]["image"] = "big.png"
    prompt_id = _submit(server, api)
    deadline = time.time() + 120
    while not any(item[1] == prompt_id for item in _get(server, "/queue")["queue_running"]):
        assert time.time() < deadline, "the long run never started"
        time.sleep(0.2)
    time.sleep(3)  # inside HeadsUpUpscale's tiles by now (LoadImage is instant, the loader is cached)
    assert _post(server, "/interrupt")[0] == 200
    entry = _wait(server, prompt_id, timeout=120)
    interrupted = _messages(entry, "execution_interrupted")
    assert entry["status"]["status_str"] == "error" and len(interrupted) == 1
    assert interrupted[0]["node_type"] == "HeadsUpUpscale"
    assert not entry["outputs"].get(_id_of(api, "SaveImage"))
    assert server.proc.poll() is None and _get(server, "/system_stats")


# ------------------------------------------------------------------ HeadsUp on the graph's own MODEL/VAE/CLIP
def _native_graph(image="portrait.png", clip=False, scale=2.0, prefix="native", tile_size=0):
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD2_BASE}},
           "2": {"class_type": "HeadsUpPatchModel",
                 "inputs": {"model": ["1", 0], "vae": ["1", 2], "weights": SD2_WEIGHTS}},
           "3": {"class_type": "LoadImage", "inputs": {"image": image}},
           "4": {"class_type": "HeadsUpUpscale", "inputs": {"model": ["2", 0], "image": ["3", 0], "scale": scale,
                                                            "tile_size": tile_size, "color_fix": "adain"}},
           "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}}}
    if clip:
        api["2"]["inputs"]["clip"] = ["1", 1]
    return api


def _loader_graph(image="portrait.png", clip_prompt=None, scale=2.0, prefix="loader", tile_size=0):
    api = {"1": {"class_type": "HeadsUpLoader", "inputs": {"weights": SD2_WEIGHTS, "base": SD2_BASE,
                                                           "dtype": "fp32"}},
           "3": {"class_type": "LoadImage", "inputs": {"image": image}},
           "4": {"class_type": "HeadsUpUpscale", "inputs": {"model": ["1", 0], "image": ["3", 0], "scale": scale,
                                                            "tile_size": tile_size, "color_fix": "adain"}},
           "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}}}
    if clip_prompt is not None:  # the same CLIP through ComfyUI's own CLIPTextEncode
        api["6"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD2_BASE}}
        api["7"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 1], "text": clip_prompt}}
        api["4"]["inputs"]["conditioning"] = ["7", 0]
    return api


def _pixels(srv, entry, node_id="5"):
    (img,) = entry["outputs"][node_id]["images"]
    with Image.open(srv.base / "output" / img["subfolder"] / img["filename"]) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _run(srv, api):
    entry = _wait(srv, _submit(srv, api))
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


@pytest.mark.parametrize("clip", [False, True], ids=["stored_prompt", "clip_prompt"])
def test_patch_model_equals_loader_within_one_level(server, clip):
    """CheckpointLoaderSimple -> HeadsUpPatchModel -> HeadsUpUpscale x2 == HeadsUpLoader on the same files."""
    native = _pixels(server, _run(server, _native_graph(clip=clip, prefix=f"native_{clip}")))
    loader = _pixels(server, _run(server, _loader_graph(clip_prompt=", ," if clip else None,
                                                        prefix=f"loader_{clip}")))
    w, h = INPUT_SIZES["portrait.png"]
    assert native.shape == (2 * h, 2 * w, 3) and loader.shape == native.shape
    assert native.std() > 10  # a real image, not a flat or saturated one
    assert np.abs(native - loader).max() <= 1


def test_patch_model_tiled_equals_loader_tiled(server):
    """Both paths with 64-px tiles (3x3 exact VAE tiles of the 192x144 padded output): the native path runs the
    exact tiled VAE on ComfyUI's own VAE modules, so it agrees with HeadsUpLoader's within one level."""
    native = _pixels(server, _run(server, _native_graph(prefix="native_tiled", tile_size=64)))
    loader = _pixels(server, _run(server, _loader_graph(prefix="loader_tiled", tile_size=64)))
    w, h = INPUT_SIZES["portrait.png"]
    assert native.shape == loader.shape == (2 * h, 2 * w, 3) and native.std() > 10
    assert np.abs(native - loader).max() <= 1, np.abs(native - loader).max()


def test_native_exact_vae_tiles_in_comfyui_modules(server, sd2):
    """With only the VAE tiled (3x3 exact tiles of 8 latents, UNet untiled), the native backend on ComfyUI's
    own checkpoint loader and VAE modules: its VAE stages >= 60 dB from untiled and within 1/255 of the loader
    path's; its whole upscale within one level of the loader path's and as close to untiled."""
    probe = Path(__file__).with_name("comfy_native_probe.py")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([_python(), str(probe), str(sd2["base"]), str(sd2["weights"]),
                          str(server.base / "input" / "portrait.png")], cwd=COMFYUI, capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print("native exact tiled VAE in ComfyUI:", figures)
    assert figures["plans"]["native_tiled"] == figures["plans"]["loader_tiled"] == {"vae_mode": "exact",
                                                                                     "decoder_tiles": 9}
    assert figures["std"] > 10
    # the VAE stages alone (float): the exact tiles' own error, and the two layouts' agreement
    assert figures["vae_psnr_tiled_vs_untiled"] >= 60 and figures["vae_max_diff_vs_loader"] <= 1, figures
    # the whole pipeline (8-bit output; the x0 step amplifies encoder differences): the native path tiles as
    # exactly as the loader path and stays within one level of it
    assert figures["max_diff_vs_loader"] <= 1 and figures["untiled_max_diff_vs_loader"] <= 1, figures
    assert figures["psnr_tiled_vs_untiled"] >= figures["loader_psnr_tiled_vs_untiled"] - 0.5, figures


def _host_check_graph(image, prefix):
    """Plain host nodes on the graph's MODEL and VAE: VAE round trip and one img2img sampler step."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD2_BASE}},
            "3": {"class_type": "LoadImage", "inputs": {"image": image}},
            "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
            "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix + "_vae"}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait"}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["7", 0], "negative": ["7", 0],
                                                       "latent_image": ["4", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal",
                                                       "denoise": 0.5}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
            "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix + "_model"}}}


def test_graph_model_and_vae_are_unchanged_by_the_patch(server):
    before = _run(server, _host_check_graph("portrait.png", "before"))
    _run(server, _native_graph(clip=True, prefix="between"))
    # Same pixels under another file name, so ComfyUI's cache recomputes everything after the loader.
    after = _run(server, _host_check_graph("portrait_copy.png", "after"))
    for node in ("6", "10"):
        a, b = _pixels(server, before, node), _pixels(server, after, node)
        assert a.std() > 1 and np.array_equal(a, b), node


def _comfy_sees_a_gpu():
    out = subprocess.run([_python(), "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                         text=True)
    return out.stdout.strip().endswith("True")


def test_lowvram_run_completes(tiny, sd2, tmp_path):
    # ComfyUI refuses --lowvram together with --cpu, and without --cpu it needs a GPU.
    if not _comfy_sees_a_gpu():
        pytest.skip("--lowvram needs a GPU: ComfyUI rejects it together with --cpu")
    srv = _start(tmp_path, _prepare_base(tiny, sd2, tmp_path), "--lowvram", cpu=False)
    try:
        entry = _run(srv, _native_graph(clip=True, prefix="lowvram"))
        w, h = INPUT_SIZES["portrait.png"]
        assert _pixels(srv, entry).shape == (2 * h, 2 * w, 3)
    finally:
        _stop(srv)
