"""The shipped UI workflows in ComfyUI's real frontend, driven in headless Chromium (Playwright).

A real ComfyUI (COMFYUI_PATH, as in test_comfyui_e2e.py) serves its own frontend: the
``comfyui-frontend-package`` that its requirements pin. For every UI-format JSON in workflows/, the test
drops the file on the page with a synthetic drop event (the frontend's own drag-and-drop handler loads it),
checks that every node type is known and that every HeadsUp widget took the saved value and accepts it,
queues it from the page (the frontend's own graph-to-prompt conversion and POST /prompt), and checks the
saved image. The model names the workflows ship with are mapped to the small test models.

Skipped with a reason unless COMFYUI_PATH is set, Chromium is installed (CHROMIUM_PATH or `chromium` on PATH)
and Playwright imports; tools/install_browser_test.sh installs the last two. With HEADSUP_SCREENSHOTS=DIR the
screenshots of the loaded workflows are written to DIR (docs/images/ in the repository) and a 512-px JPEG
thumbnail of each to workflows/ for ComfyUI's template browser.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import test_comfyui_e2e as e2e  # noqa: E402  (server helpers)

sys.path.remove(str(Path(__file__).parent))

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
WORKFLOWS = sorted((e2e.PACK_DIR / "workflows").glob("*.json"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LQ_OF = {"headsup_group_references": "group.png"}  # others start from portrait.png


def _playwright_missing():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return True
    return False


pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow,
    pytest.mark.skipif(not e2e.COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run"),
    pytest.mark.skipif(not CHROMIUM, reason="Chromium not found (tools/install_browser_test.sh installs it)"),
    pytest.mark.skipif(_playwright_missing(), reason="playwright not installed (tools/install_browser_test.sh)"),
]


sd2 = e2e.sd2  # the same small SD2-shaped base the end-to-end test writes (module-scoped fixture)


@pytest.fixture(scope="module")
def server(tiny_models, sd2, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_browser")
    extra_yaml = e2e._prepare_base(tiny_models, sd2, base)
    models = base / "models"
    # The names the shipped workflows use -> the SD2-shaped test base and weights (both paths accept them).
    os.symlink(sd2["base"], models / "checkpoints" / "v2-1_512-ema-pruned.safetensors")
    (models / "headsup" / "headsup.safetensors").unlink()
    os.symlink(sd2["weights"], models / "headsup" / "headsup.safetensors")
    packs = Path(tiny_models["insightface_root"]) / "models"
    (models / "insightface_local" / "models").mkdir(parents=True)
    os.symlink(packs / "tiny", models / "insightface_local" / "models" / "antelopev2", target_is_directory=True)
    (models / "insightface").unlink()
    (models / "insightface_local").rename(models / "insightface")
    srv = e2e._start(base, extra_yaml)
    # A returning user: no first-run template dialog over the canvas.
    assert e2e._post(srv, "/settings/Comfy.TutorialCompleted", True)[0] == 200
    yield srv
    e2e._stop(srv)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS[1:])
        yield b
        b.close()


def _open(browser, server):
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    errors = []
    page.on("pageerror", lambda err: errors.append(f"{err}\n{err.stack}"))
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                           "Object.keys(window.LiteGraph.registered_node_types).includes('HeadsUpUpscale')",
                           timeout=120_000)
    page.wait_for_timeout(1500)  # let the default graph settle
    page.keyboard.press("Escape")  # close any dialog left open
    return page, errors


DROP_JS = """async ([name, text]) => {
    const dt = new DataTransfer();
    dt.items.add(new File([text], name, {type: "application/json"}));
    document.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""

INSPECT_JS = """() => {
    const known = window.LiteGraph.registered_node_types;
    return window.app.graph._nodes.map(n => ({
        id: n.id, type: n.type, known: !!known[n.type] && !n.has_errors,
        widgets: (n.widgets || []).filter(w => w.type !== "button").map(w => ({
            name: w.name, type: w.type, value: w.value,
            options: (w.options && Array.isArray(w.options.values)) ? w.options.values : null,
            min: w.options ? w.options.min : null, max: w.options ? w.options.max : null})),
    }));
}"""


def _check_loaded(nodes, wf):
    saved = {n["id"]: n for n in wf["nodes"]}
    assert sorted(n["id"] for n in nodes) == sorted(saved), "the page does not hold the dropped workflow"
    missing = [n["type"] for n in nodes if not n["known"]]
    assert not missing, f"missing node types: {missing}"
    for n in nodes:
        if not n["type"].startswith("HeadsUp"):
            continue
        values = [w["value"] for w in n["widgets"]]
        assert values == saved[n["id"]]["widgets_values"], (n["type"], values)  # order and count held
        for w in n["widgets"]:
            if w["options"] is not None:
                assert w["value"] in w["options"], (n["type"], w["name"], w["value"], w["options"])
            if isinstance(w["value"], (int, float)) and w["min"] is not None:
                assert w["min"] <= w["value"] <= w["max"], (n["type"], w["name"])


def _save_screenshot(page, name):
    target = os.environ.get("HEADSUP_SCREENSHOTS")
    if not target:
        return
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1; c.ds.offset = [20, 40]; "
                  "c.setDirty(true, true); }")
    page.wait_for_timeout(500)
    shot = folder / f"workflow_{name}.png"
    page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1600, "height": 900})
    with Image.open(shot) as im:  # keep the docs small: palette PNG
        im.convert("RGB").quantize(128).save(shot, optimize=True)
        thumb = im.convert("RGB")
        thumb.thumbnail((512, 512))
        thumb.save(e2e.PACK_DIR / "workflows" / f"{name}.jpg", quality=80, optimize=True)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_and_runs_from_the_page(browser, server, path):
    wf = json.loads(path.read_text())
    page, page_errors = _open(browser, server)
    startup_errors = list(page_errors)
    try:
        page.evaluate(DROP_JS, [path.name, path.read_text()])
        page.wait_for_function("(n) => window.app.graph._nodes.length === n", arg=len(wf["nodes"]), timeout=30_000)
        page.wait_for_timeout(800)
        _check_loaded(page.evaluate(INSPECT_JS), wf)
        _save_screenshot(page, path.stem)

        with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as resp:
            page.evaluate("() => window.app.queuePrompt(0, 1)")
        body = resp.value.json()
        assert resp.value.status == 200 and not body.get("node_errors"), body
        entry = e2e._wait(server, body["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        save_id = next(str(n["id"]) for n in wf["nodes"] if n["type"] == "SaveImage")
        (img,) = entry["outputs"][save_id]["images"]
        with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
            w, h = e2e.INPUT_SIZES[LQ_OF.get(path.stem, "portrait.png")]
            assert im.size == (4 * w, 4 * h)
            assert np.asarray(im.convert("RGB")).std() > 5
        new_errors = page_errors[len(startup_errors):]
        assert not new_errors, (new_errors, startup_errors)
    finally:
        page.close()
    time.sleep(0.1)
