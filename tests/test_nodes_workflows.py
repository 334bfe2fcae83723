"""Golden test: every shipped workflow (UI format and API format) still fits the current node schemas.

Saved workflows must keep working (DESIGN §5.6): widget order and count, socket names and types, and the
fixed option lists are checked. Model-file combos are not checked against the disk (CI has no models)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

sys.path.remove(str(Path(__file__).parent / "comfy_stub"))

WORKFLOWS = harness.PACK_DIR / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
MODEL_COMBOS = {("HeadsUpLoader", "weights"), ("HeadsUpLoader", "base"), ("HeadsUpFaceAnalysisLoader", "pack"),
                ("HeadsUpPatchModel", "weights"), ("HeadsUpTagger", "ram"), ("HeadsUpTagger", "dape")}
# Output types of the ComfyUI core nodes the workflows use (checked for real in test_comfyui_e2e.py).
CORE_OUTPUTS = {"LoadImage": ["IMAGE", "MASK"], "MaskToImage": ["IMAGE"], "SaveImage": [], "PreviewImage": [],
                "CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"]}
CORE_INPUTS = {"SaveImage": {"images": "IMAGE"}, "PreviewImage": {"images": "IMAGE"}, "MaskToImage": {"mask": "MASK"}}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    pack = harness.load_pack(tmp_path_factory.mktemp("models"))
    yield {node_id: cls.GET_SCHEMA() for node_id, cls in pack.nodes.items()}, pack
    harness.unload()


def _is_widget(i, io):
    return isinstance(i, io.WidgetInput) and not getattr(i, "force_input", False)  # force_input: a socket


def _widgets(schema, io):
    return [i for i in schema.inputs if _is_widget(i, io)]


def _sockets(schema, io):
    return [i for i in schema.inputs if not _is_widget(i, io)]


def _check_value(node_id, widget, value, io):
    if isinstance(widget, io.Combo.Input):
        assert isinstance(value, str)
        if (node_id, widget.id) not in MODEL_COMBOS:
            assert value in widget.options, f"{node_id}.{widget.id}={value!r} not in {widget.options}"
    elif isinstance(widget, io.Float.Input):
        assert isinstance(value, (int, float)) and widget.min <= value <= widget.max
    elif isinstance(widget, io.Int.Input):
        assert isinstance(value, int) and widget.min <= value <= widget.max


def test_all_workflows_ship_in_both_formats():
    names = {"headsup_portrait_x4", "headsup_reference_x4", "headsup_group_references", "headsup_graph_model_x4",
             "headsup_portrait_tags_x4"}
    assert {p.stem for p in UI_FILES} == names and {p.stem for p in API_FILES} == names


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_matches_schemas(path, schemas):
    schemas, pack = schemas
    io = sys.modules["comfy_api.latest"].io
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    out_types = {}
    for n in wf["nodes"]:
        if n["type"] in schemas:
            schema = schemas[n["type"]]
            widgets = _widgets(schema, io)
            assert len(n["widgets_values"]) == len(widgets), f"{path.name}: {n['type']} widget count"
            for w, v in zip(widgets, n["widgets_values"]):
                _check_value(n["type"], w, v, io)
            sockets = _sockets(schema, io)
            # a workflow saved before an optional socket was added at the end lacks it, and still loads
            added = sockets[len(n["inputs"]):]
            assert all(a.optional for a in added), f"{path.name}: {n['type']} lacks required {[a.id for a in added]}"
            sockets = sockets[:len(n["inputs"])]
            assert [i["name"] for i in n["inputs"]] == [s.id for s in sockets]
            assert [i["type"] for i in n["inputs"]] == [s.io_type for s in sockets]
            for i, s in zip(n["inputs"], sockets):
                assert s.optional or i["link"] is not None, f"{path.name}: {n['type']}.{s.id} unconnected"
            out_types[n["id"]] = [o.io_type for o in schema.outputs]
            assert [o["type"] for o in n["outputs"]] == out_types[n["id"]]
        else:
            out_types[n["id"]] = CORE_OUTPUTS[n["type"]]
    assert len({l[0] for l in wf["links"]}) == len(wf["links"]) and wf["last_link_id"] >= len(wf["links"])
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert out_types[src][src_slot] == typ
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ and nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_matches_schemas_and_ui_copy(path, schemas):
    schemas, pack = schemas
    io = sys.modules["comfy_api.latest"].io
    api = json.loads(path.read_text())
    ui = json.loads((WORKFLOWS / path.name).read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(api) == set(ui_nodes)
    for nid, node in api.items():
        typ = node["class_type"]
        assert ui_nodes[nid]["type"] == typ
        inputs = node["inputs"]
        if typ not in schemas:
            for name, value in inputs.items():
                if isinstance(value, list):
                    src = api[value[0]]["class_type"]
                    src_types = ([o.io_type for o in schemas[src].outputs] if src in schemas else CORE_OUTPUTS[src])
                    assert src_types[value[1]] == CORE_INPUTS[typ][name]
            continue
        schema = schemas[typ]
        ids = {i.id: i for i in schema.inputs}
        assert set(inputs) <= set(ids), f"{path.name}: unknown inputs {set(inputs) - set(ids)}"
        assert {i.id for i in schema.inputs if not i.optional} <= set(inputs)
        widgets = _widgets(schema, io)
        assert [inputs[w.id] for w in widgets] == ui_nodes[nid]["widgets_values"]
        for w in widgets:
            _check_value(typ, w, inputs[w.id], io)
        for name, value in inputs.items():
            if isinstance(value, list):
                src = api[value[0]]["class_type"]
                src_types = [o.io_type for o in schemas[src].outputs] if src in schemas else CORE_OUTPUTS[src]
                assert src_types[value[1]] == ids[name].io_type, f"{path.name}: {typ}.{name}"
