"""ComfyUI nodes without ComfyUI: schemas, model folders, and the node glue (memory manager, progress,
interrupts, OOM retry, conditioning) against the stand-in in tests/comfy_stub and a fake pipeline."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

sys.path.remove(str(Path(__file__).parent / "comfy_stub"))

from headsup_core.errors import HeadsUpError, InputImageError, MissingModelError  # noqa: E402

NODE_IDS = ["HeadsUpLoader", "HeadsUpFaceAnalysisLoader", "HeadsUpReferenceEncoder", "HeadsUpUpscale",
            "HeadsUpBlendUpscale", "HeadsUpPatchModel", "HeadsUpTagger"]


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    for sub in ("headsup", "checkpoints", "diffusers/sd21/unet", "insightface/models/mypack", "facedetection"):
        (models / sub).mkdir(parents=True)
    (models / "headsup" / "headsup.safetensors").write_bytes(b"x")
    (models / "headsup" / "osediff.pkl").write_bytes(b"x")
    (models / "headsup" / "notes.txt").write_text("not a model")
    (models / "checkpoints" / "v2-1_512-ema-pruned.safetensors").write_bytes(b"x")
    (models / "diffusers" / "sd21" / "model_index.json").write_text("{}")
    (models / "insightface" / "models" / "mypack" / "det.onnx").write_bytes(b"x")
    from headsup_core.testing.tiny_tags import write_random_ram

    write_random_ram(models / "ram", num_classes=16)
    p = harness.load_pack(models)
    p.models = models
    yield p
    harness.unload()


def test_root_imports_without_comfyui():
    # A fresh interpreter with no ComfyUI (nor the stand-in) on the path: importing the pack must work.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import harness; harness.STUB_DIR=None; "
            "m = harness.import_pack_root('pack_plain'); "
            "assert callable(m.comfy_entrypoint) and not hasattr(m, 'NODE_CLASS_MAPPINGS'); "
            "assert 'comfy_api' not in sys.modules and 'folder_paths' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent / "comfy_stub")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_entrypoint_lists_all_nodes_with_tooltips(pack):
    assert sorted(pack.nodes) == sorted(NODE_IDS)
    for node_id, cls in pack.nodes.items():
        schema = cls.GET_SCHEMA()
        assert schema.category == "HeadsUp"
        assert schema.display_name and schema.description
        for i in schema.inputs:
            assert i.tooltip, f"{node_id}.{i.id} has no tooltip"
        for o in schema.outputs:
            assert o.tooltip, f"{node_id} output {o.display_name} has no tooltip"


def _inputs(pack, node_id):
    return {i.id: i for i in pack.nodes[node_id].GET_SCHEMA().inputs}


def test_loader_lists_models_from_the_folders(pack):
    ins = _inputs(pack, "HeadsUpLoader")
    assert ins["weights"].options == ["headsup.safetensors", "osediff.pkl"]
    assert ins["base"].options == ["v2-1_512-ema-pruned.safetensors", "diffusers/sd21"]
    assert ins["dtype"].options == ["auto", "fp16", "bf16", "fp32"]
    packs = _inputs(pack, "HeadsUpFaceAnalysisLoader")["pack"].options
    assert packs[0] == "mypack" and "antelopev2" in packs and packs[-2:] == ["facexlib/retinaface_resnet50",
                                                                         "facexlib/retinaface_mobile0.25"]


def test_upscale_inputs_optional_sockets(pack):
    ins = _inputs(pack, "HeadsUpUpscale")
    assert [i for i in ins] == ["model", "image", "scale", "tile_size", "color_fix", "reference",
                                "face_analysis", "conditioning", "strength", "match_threshold", "tags"]
    assert [i for i in ins if ins[i].optional] == ["reference", "face_analysis", "conditioning", "strength",
                                                   "match_threshold", "tags"]
    assert ins["tags"].force_input  # a socket, not a widget: saved workflows' widget values keep their places
    assert ins["color_fix"].options == ["adain", "wavelet", "none"] and ins["scale"].default == 4.0


def test_folder_registration_keeps_existing_entries(pack, tmp_path):
    fp = pack.folder_paths
    fp.folder_names_and_paths["headsup"] = ([str(tmp_path / "from_yaml")], set())
    pack.module("nodes.paths").register_folders()
    paths, exts = fp.folder_names_and_paths["headsup"]
    assert paths[0] == str(tmp_path / "from_yaml")
    assert str(pack.models / "headsup") in paths
    assert ".safetensors" in exts and ".pkl" in exts
    for name in ("insightface", "facedetection"):
        assert str(pack.models / name) in fp.folder_names_and_paths[name][0]


def test_base_resolution_and_missing_files(pack):
    paths = pack.module("nodes.paths")
    assert paths.resolve_base("diffusers/sd21") == str(pack.models / "diffusers" / "sd21")
    assert paths.resolve_base("v2-1_512-ema-pruned.safetensors").endswith("v2-1_512-ema-pruned.safetensors")
    with pytest.raises(MissingModelError, match="gone.safetensors.*models/headsup"):
        pack.nodes["HeadsUpLoader"].execute(weights="gone.safetensors", base="diffusers/sd21", dtype="auto")
    with pytest.raises(MissingModelError, match="insightface pack 'antelopev2'.*models/antelopev2"):
        pack.nodes["HeadsUpFaceAnalysisLoader"].execute(backend="insightface", pack="antelopev2",
                                                        provider="auto")
    face_loader = pack.nodes["HeadsUpFaceAnalysisLoader"]
    with pytest.raises(InputImageError, match="insightface backend needs an insightface pack"):
        face_loader.execute(backend="insightface", pack="facexlib/retinaface_resnet50", provider="auto")
    with pytest.raises(InputImageError, match="facexlib backend needs a 'facexlib/...' detector"):
        face_loader.execute(backend="facexlib", pack="antelopev2", provider="auto")
    with pytest.raises(InputImageError, match="cannot use the DirectML provider"):
        face_loader.execute(backend="facexlib", pack="facexlib/retinaface_resnet50", provider="DirectML")


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=8))


class FakePlan:
    """A plan of ``tile_px`` output pixels (None: automatic), halved down to 64 px like the core's."""

    def __init__(self, tile_px):
        self.tile_px, self.estimate = tile_px, {"activations": 1 << 20}

    def halved(self):
        t = (self.tile_px or 512) // 2
        return FakePlan(t) if t >= 64 else None

    def describe(self):
        return f"{self.tile_px} px"


class FakePipe:
    """Records calls; raises OOM while tile_size is above `oom_above`; reports `tiles` progress steps."""

    dtype = torch.float32

    def __init__(self, oom_above=None, tiles=3):
        self.model, self.calls, self.oom_above, self.tiles = FakeModel(), [], oom_above, tiles

    device = torch.device("cpu")

    def plan(self, image, options):
        return FakePlan(options.tile_size)

    def conditioning_in_use(self):
        return {"reference": True, "mask": True}

    def upscale(self, image, reference=None, *, options, plan, face_analyzer=None, progress=None, interrupt=None,
                return_info=False):
        from headsup_core.errors import InterruptedByUser

        tile_size = plan.tile_px  # the plan that runs: the options' tile size, then halved
        scale = options.scale
        self.calls.append(dict(tile_size=tile_size, reference=reference, prompt_embeds=options.prompt_embeds,
                               face_analyzer=face_analyzer, color_fix=options.color_fix, strength=options.strength,
                               match_threshold=options.match_threshold, tag_source=options.tag_source))
        if self.oom_above is not None and (tile_size or 512) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        for t in range(self.tiles):
            progress(t + 1, self.tiles)
            if interrupt is not None and interrupt():
                raise InterruptedByUser("stopped")
        b, h, w, c = image.shape
        out = image.repeat_interleave(int(scale), 1).repeat_interleave(int(scale), 2)
        info = {"face_mask": torch.ones(b, 1, h * int(scale), w * int(scale)), "assignments": [[]] * b}
        return (out, info) if return_info else out


def _handle(pack, pipe):
    loaders = pack.module("nodes.loaders")
    return loaders.HeadsUpHandle(pipe=pipe, patcher=loaders.make_patcher(pipe, "cpu", "cpu"), name="fake")


def _run_upscale(pack, pipe, **kw):
    args = dict(image=torch.rand(2, 8, 6, 3), scale=2.0, tile_size=0, color_fix="adain")
    args.update(kw)
    return pack.nodes["HeadsUpUpscale"].execute(model=_handle(pack, pipe), **args)


def test_upscale_loads_through_memory_manager_and_reports_progress(pack):
    pack.mm.LOADS.clear()
    pack.utils.UPDATES.clear()
    pipe = FakePipe(tiles=3)
    out = _run_upscale(pack, pipe)
    image, mask = out.result
    assert image.shape == (2, 16, 12, 3) and mask.shape == (2, 16, 12)
    assert len(pack.mm.LOADS) == 1
    models, memory_required, full = pack.mm.LOADS[0]
    assert models[0].model.headsup is pipe.model and full is True and memory_required > 0
    assert pack.utils.UPDATES == [(1, 3), (2, 3), (3, 3)]
    assert pipe.calls[0]["tile_size"] is None  # 0 in the widget means "let the pipeline choose"
    assert pipe.calls[0]["strength"] == 1.0 and pipe.calls[0]["match_threshold"] == 0.3  # optional widgets
    _run_upscale(pack, pipe, strength=0.5, match_threshold=0.6)
    assert pipe.calls[-1]["strength"] == 0.5 and pipe.calls[-1]["match_threshold"] == 0.6


def test_upscale_halves_tile_on_oom(pack):
    pack.mm.LOADS.clear()
    pipe = FakePipe(oom_above=128)
    image, _ = _run_upscale(pack, pipe, tile_size=512).result
    assert [c["tile_size"] for c in pipe.calls] == [512, 256, 128]
    assert image.shape[1] == 16 and len(pack.mm.LOADS) == 3
    with pytest.raises(HeadsUpError, match="out of memory"):
        _run_upscale(pack, FakePipe(oom_above=1), tile_size=256)


def test_upscale_is_interruptible_between_tiles(pack):
    pipe = FakePipe(tiles=5)
    pack.mm.interrupt_current_processing(True)
    with pytest.raises(pack.mm.InterruptProcessingException):
        _run_upscale(pack, pipe)
    assert not pack.mm.processing_interrupted()


def test_conditioning_is_passed_to_the_core(pack):
    # The node passes the CONDITIONING's embedding on; the core checks it once (test_nodes_tiny checks the error).
    pipe = FakePipe()
    emb = torch.randn(1, 77, 8)
    _run_upscale(pack, pipe, conditioning=[[emb, {"pooled_output": None}]])
    assert pipe.calls[-1]["prompt_embeds"] is emb
    _run_upscale(pack, pipe)
    assert pipe.calls[-1]["prompt_embeds"] is None


def test_native_handle_is_not_loaded_by_the_nodes(pack):
    # A HeadsUpPatchModel handle (patcher None) loads the graph's models itself, per stage.
    pack.mm.LOADS.clear()
    loaders = pack.module("nodes.loaders")
    pipe = FakePipe()
    image, _ = pack.nodes["HeadsUpUpscale"].execute(model=loaders.HeadsUpHandle(pipe=pipe, patcher=None, name="n"),
                                                    image=torch.rand(1, 8, 6, 3), scale=2.0, tile_size=0,
                                                    color_fix="adain").result
    assert image.shape == (1, 16, 12, 3) and pack.mm.LOADS == [] and len(pipe.calls) == 1


def test_option_lists_come_from_the_core(pack):
    from headsup_core.color import COLOR_FIX_MODES
    from headsup_core.precision import DTYPE_CHOICES

    ins = {i.id: i for i in pack.nodes["HeadsUpUpscale"].GET_SCHEMA().inputs}
    assert ins["color_fix"].options == list(COLOR_FIX_MODES)
    ins = {i.id: i for i in pack.nodes["HeadsUpLoader"].GET_SCHEMA().inputs}
    assert ins["dtype"].options == list(DTYPE_CHOICES)


def test_scale_range_is_the_cores(pack):
    """The nodes offer exactly the scales the library accepts (they capped at 8 while the core allows 16)."""
    from headsup_core.options import MAX_SCALE, check_scale

    for node_id in ("HeadsUpUpscale", "HeadsUpBlendUpscale"):
        scale = {i.id: i for i in pack.nodes[node_id].GET_SCHEMA().inputs}["scale"]
        assert (scale.min, scale.max) == (1.0, MAX_SCALE), node_id
    check_scale(MAX_SCALE)
    with pytest.raises(InputImageError):
        check_scale(MAX_SCALE + 0.5)


def test_patch_model_schema_keeps_clip_optional_and_last(pack):
    schema = pack.nodes["HeadsUpPatchModel"].GET_SCHEMA()
    assert [(i.id, i.io_type) for i in schema.inputs] == [("model", "MODEL"), ("vae", "VAE"),
                                                         ("weights", "COMBO"), ("clip", "CLIP")]
    assert [i.optional for i in schema.inputs] == [False, False, False, True]
    assert schema.inputs[2].options == ["headsup.safetensors", "osediff.pkl"]
    assert [o.io_type for o in schema.outputs] == ["HEADSUP_MODEL"]
    with pytest.raises(MissingModelError, match="gone.safetensors.*models/headsup"):
        pack.nodes["HeadsUpPatchModel"].execute(model=None, vae=None, weights="gone.safetensors")


def test_reference_carries_its_analyzer(pack):
    ReferenceSet = pack.module("nodes.reference").ReferenceSet
    pipe, analyzer, other = FakePipe(), object(), object()
    _run_upscale(pack, pipe, reference=ReferenceSet(references=("r1", "r2"), analyzer=analyzer))
    assert pipe.calls[-1]["reference"] == ["r1", "r2"] and pipe.calls[-1]["face_analyzer"] is analyzer
    _run_upscale(pack, pipe, reference=ReferenceSet(references=("r1",), analyzer=analyzer), face_analysis=other)
    assert pipe.calls[-1]["face_analyzer"] is other


def test_pack_lists_nodes_without_face_libraries(tmp_path):
    # insightface, onnxruntime and facexlib blocked: the nodes still list; the face node says what is missing.
    (tmp_path / "insightface" / "models" / "p").mkdir(parents=True)
    (tmp_path / "insightface" / "models" / "p" / "det.onnx").write_bytes(b"x")
    (tmp_path / "facedetection").mkdir()
    (tmp_path / "facedetection" / "detection_mobilenet0.25_Final.pth").write_bytes(b"x")
    code = f"""
import sys
for name in ("insightface", "onnxruntime", "facexlib"):
    sys.modules[name] = None
sys.path.insert(0, {str(Path(__file__).parent / "comfy_stub")!r})
import harness
from headsup_core.errors import MissingDependencyError
pack = harness.load_pack({str(tmp_path)!r})
print(sorted(pack.nodes))
for backend, name in (("insightface", "p"), ("facexlib", "facexlib/retinaface_mobile0.25")):
    try:
        pack.nodes["HeadsUpFaceAnalysisLoader"].execute(backend=backend, pack=name, provider="CPU")
    except MissingDependencyError as err:
        print("missing:", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(sorted(NODE_IDS))
    assert len(lines) == 3 and "onnxruntime" in lines[1] and "facexlib" in lines[2], lines


def test_tagger_node_tags_each_image_through_the_memory_manager(pack):
    pack.mm.LOADS.clear()
    tagger = pack.nodes["HeadsUpTagger"]
    ins = _inputs(pack, "HeadsUpTagger")
    assert ins["ram"].options == ["DAPE.pth", "ram_swin_large_14m.pth"] and ins["ram"].default == "ram_swin_large_14m.pth"
    assert ins["dape"].default == "DAPE.pth" and ins["dape"].options[-1].startswith("none")
    (out,) = tagger.execute(image=torch.rand(2, 40, 30, 3), ram="ram_swin_large_14m.pth", dape="DAPE.pth").result
    lines = out.split("\n")
    assert len(lines) == 2 and all(line.startswith("tag ") for line in lines)
    assert len(pack.mm.LOADS) == 1 and pack.mm.LOADS[0][2] is True  # force_full_load
    plain = tagger.execute(image=torch.rand(1, 40, 30, 3), ram="ram_swin_large_14m.pth", dape=ins["dape"].options[-1])
    assert isinstance(plain.result[0], str)
    with pytest.raises(MissingModelError, match="nope.pth"):
        tagger.execute(image=torch.rand(1, 8, 8, 3), ram="ram_swin_large_14m.pth", dape="nope.pth")


def test_upscale_tags_input_becomes_the_tag_source(pack):
    pipe = FakePipe()
    _run_upscale(pack, pipe, tags="tag 1, tag 2")
    source = pipe.calls[-1]["tag_source"]
    assert source(None) == "tag 1, tag 2" and source(None) == "tag 1, tag 2"
    _run_upscale(pack, pipe, tags="a, b\nc")  # two lines for a batch of two: one per image, in order
    source = pipe.calls[-1]["tag_source"]
    assert [source(None), source(None), source(None)] == ["a, b", "c", "a, b"]
    _run_upscale(pack, pipe, tags="  ")
    assert pipe.calls[-1]["tag_source"] is None
    _run_upscale(pack, pipe, tags="x", conditioning=[[torch.zeros(1, 77, 8), {}]])
    assert pipe.calls[-1]["tag_source"] is None and pipe.calls[-1]["prompt_embeds"] is not None
