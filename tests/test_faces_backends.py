"""Faces with the real backends: tiny insightface pack (real model_zoo routing, SCRFD decoding, ArcFace
alignment) on the photos shipped in the insightface wheel, facexlib loading, and every error path."""
import shutil
from pathlib import Path

import numpy as np
import pytest

insightface = pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("cv2")

from headsup_core.errors import FaceError, InputImageError, MissingDependencyError, MissingModelError
from headsup_core.faces import build_face_condition, encode_reference, load_face_analyzer
from headsup_core.faces.align import ARCFACE_112, FFHQ_512
from headsup_core.testing.tiny_faces import write_tiny_face_models
from headsup_core.imageio import to_uint8_rgb
from headsup_core.files.read import load_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface calls a deprecated skimage API
IMAGES = Path(insightface.__file__).parent / "data" / "images"
TOM = IMAGES / "Tom_Hanks_54745.png"
GROUP = IMAGES / "t1.jpg"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_face_models(tmp_path_factory.mktemp("tiny_faces"))


@pytest.fixture(scope="module")
def analyzer(tiny):
    return load_face_analyzer("insightface", model_root=tiny["insightface_root"], pack="tiny", device="cpu")


def test_tiny_pack_is_routed_by_insightface_model_zoo(tiny):
    from insightface.model_zoo import model_zoo
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    det = model_zoo.get_model(str(tiny["insightface_det"]), providers=["CPUExecutionProvider"])
    rec = model_zoo.get_model(str(tiny["insightface_rec"]), providers=["CPUExecutionProvider"])
    assert isinstance(det, SCRFD) and det.use_kps and det.fmc == 3 and det._num_anchors == 2
    assert isinstance(rec, ArcFaceONNX) and rec.input_size == (112, 112) and rec.output_shape[-1] == 512


def test_real_photo_detection_with_tiny_pack(analyzer):
    tom = to_uint8_rgb(load_image(TOM))
    faces = analyzer.detect(tom)
    assert len(faces) == 1
    f = faces[0]
    # The aligned 112² photo gets the ArcFace template back through SCRFD's real decoding.
    assert np.abs(f.kps - ARCFACE_112).max() < 0.5
    assert f.det_score == pytest.approx(0.9) and f.embedding.shape == (512,)
    assert np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
    assert analyzer.detect(np.zeros((64, 64, 3), np.uint8)) == []


def test_encode_reference_from_real_photos(analyzer, tmp_path):
    ref = encode_reference(str(TOM), analyzer)
    assert ref.crop.shape == (512, 512, 3) and ref.crop.dtype == np.uint8
    assert np.abs(ref.kps - FFHQ_512).max() < 20  # ArcFace and FFHQ templates differ slightly in shape
    assert ref.embedding.shape == (512,) and np.linalg.norm(ref.embedding) == pytest.approx(1.0, abs=1e-5)
    assert "Tom_Hanks_54745.png" in ref.source and ref.sharpness > 0
    # Several photos: the mean identity is renormalised and the sharper crop is kept.
    tom = to_uint8_rgb(load_image(TOM))
    import cv2

    blurred = cv2.GaussianBlur(tom, (0, 0), 2.0)
    multi = encode_reference([blurred, TOM, load_image(TOM)], analyzer)
    assert multi.num_images == 3 and "image 1" in multi.source
    assert np.linalg.norm(multi.embedding) == pytest.approx(1.0, abs=1e-5)
    assert float(multi.embedding @ ref.embedding) > 0.9


def test_group_photo_two_references_each_on_its_own_face(analyzer):
    """Two people side by side, two references: the report puts each reference on its own face."""
    import cv2

    tom = to_uint8_rgb(load_image(TOM))
    group = to_uint8_rgb(load_image(GROUP))
    other = cv2.resize(group[100:400, 500:800], (112, 112), interpolation=cv2.INTER_AREA)  # a different "person"
    ref_tom = encode_reference(tom, analyzer)
    ref_other = encode_reference(other, analyzer)
    lq = np.concatenate([tom, other], axis=1)  # 224x112: the tiny detector reports one face per square cell
    cond = build_face_condition(lq, (448, 896), analyzer, references=[ref_other, ref_tom])
    assert [a["reference_index"] for a in cond.assignments] == [1, 0]
    assert all(a["similarity"] > 0.9 for a in cond.assignments)
    assert cond.assignments[0]["box"][2] <= 448 < cond.assignments[1]["box"][0]
    assert cond.has_reference and float(cond.canvas.abs().max()) > 0.5
    # A reference of someone else is below the threshold: no assignment.
    cond2 = build_face_condition(tom, (224, 224), analyzer, references=[ref_other])
    assert cond2.assignments[0]["reference_index"] is None
    assert cond2.assignments[0]["similarity"] is None and not cond2.has_reference


def test_reference_free_run_on_group_photo(analyzer):
    lq = to_uint8_rgb(load_image(GROUP))
    cond = build_face_condition(lq, (886 * 2, 1280 * 2), analyzer)
    assert len(cond.assignments) == 1 and not cond.has_reference
    assert float(cond.canvas.abs().max()) == 0.0
    x1, y1, x2, y2 = cond.assignments[0]["box"]
    assert float(cond.mask[0, 0, int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2].min()) > 0.9
    assert float(cond.mask[0, 0, :, :100].max()) == 0.0


# ---------------------------------------------------------------- error paths


def test_no_face_in_reference_names_the_image(analyzer, tmp_path):
    from PIL import Image

    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(black)
    with pytest.raises(FaceError, match="black.png"):
        encode_reference([TOM, black], analyzer)
    with pytest.raises(FaceError, match="image 1"):
        encode_reference([load_image(TOM), np.zeros((50, 50, 3), np.uint8)], analyzer)


def test_unreadable_reference_image(analyzer, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(InputImageError, match="broken.jpg"):
        encode_reference(bad, analyzer)
    with pytest.raises(InputImageError, match="missing.png"):
        encode_reference(tmp_path / "missing.png", analyzer)


def test_missing_pack(tmp_path, tiny):
    with pytest.raises(MissingModelError) as err:
        load_face_analyzer("insightface", model_root=tmp_path, pack="antelopev2", device="cpu")
    assert str(tmp_path / "models" / "antelopev2") in str(err.value)
    with pytest.raises(MissingModelError, match="No insightface model pack found"):
        load_face_analyzer("insightface", model_root=tmp_path, device="cpu")
    # With no pack name, the only pack present is used.
    assert load_face_analyzer("insightface", model_root=tiny["insightface_root"], device="cpu").has_recognizer
    # The antelopev2 zip's nested layout (antelopev2/antelopev2/*.onnx) is accepted.
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(tiny["insightface_pack"], nested)
    for pack in ("antelopev2", None):
        an = load_face_analyzer("insightface", model_root=tmp_path, pack=pack, device="cpu")
        assert an.pack_dir == nested


def test_pack_without_recognizer_or_detector(tmp_path, tiny):
    det_only = tmp_path / "models" / "det_only"
    rec_only = tmp_path / "models" / "rec_only"
    det_only.mkdir(parents=True)
    rec_only.mkdir(parents=True)
    shutil.copy(tiny["insightface_det"], det_only / "det.onnx")
    shutil.copy(tiny["insightface_rec"], rec_only / "rec.onnx")
    with pytest.raises(MissingModelError, match="no face recognizer"):
        load_face_analyzer("insightface", model_root=tmp_path, pack="det_only", device="cpu")
    with pytest.raises(MissingModelError, match="no face detector"):
        load_face_analyzer("insightface", model_root=tmp_path, pack="rec_only", device="cpu")
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    shutil.copy(tiny["insightface_rec"], broken / "rec.onnx")
    (broken / "det.onnx").write_bytes(b"truncated download")
    with pytest.raises(MissingModelError, match="Cannot load the insightface pack"):
        load_face_analyzer("insightface", model_root=tmp_path, pack="broken", device="cpu")
    empty = tmp_path / "models" / "empty"
    empty.mkdir()
    with pytest.raises(MissingModelError, match="no .onnx files"):
        load_face_analyzer("insightface", pack=str(empty))


def test_cuda_provider_requested_but_missing(tiny):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    for kwargs in ({"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}, {"device": "cuda:0"}):
        with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
            load_face_analyzer("insightface", model_root=tiny["insightface_root"], pack="tiny", **kwargs)


def test_unknown_backend():
    with pytest.raises(FaceError, match="Unknown face backend"):
        load_face_analyzer("openface")


# ---------------------------------------------------------------- facexlib


def test_facexlib_missing_weights_names_file_and_path(tmp_path):
    with pytest.raises(MissingModelError) as err:
        load_face_analyzer("facexlib", model_root=tmp_path)
    assert str(tmp_path / "detection_Resnet50_Final.pth") in str(err.value)


def test_facexlib_tiny_weights_load_and_report_no_face(tiny, tmp_path):
    pytest.importorskip("facexlib")
    pytest.importorskip("torchvision")
    fx = load_face_analyzer("facexlib", model_root=tiny["facexlib_dir"], detector="retinaface_mobile0.25",
                            device="cpu")
    assert not fx.has_recognizer
    tom = to_uint8_rgb(load_image(TOM))
    assert fx.detect(tom) == []  # facexlib's real RetinaFace decoding + NMS, with a "background" class head
    with pytest.raises(FaceError, match="Tom_Hanks_54745.png"):
        encode_reference(TOM, fx)
    # Parsing requested but its weights absent: the exact expected path is named.
    with pytest.raises(MissingModelError) as err:
        load_face_analyzer("facexlib", model_root=tiny["facexlib_dir"], detector="retinaface_mobile0.25",
                           parsing=True)
    assert str(Path(tiny["facexlib_dir"]) / "parsing_bisenet.pth") in str(err.value)
    # A recognizer from an insightface pack gives facexlib faces an identity.
    fx_id = load_face_analyzer("facexlib", model_root=tiny["facexlib_dir"], detector="retinaface_mobile0.25",
                               recognizer=tiny["insightface_pack"], device="cpu")
    assert fx_id.has_recognizer
    emb = fx_id.embed(tom, ARCFACE_112)
    assert emb.shape == (512,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    # A corrupt weights file is a WeightsError, not a crash.
    from headsup_core.errors import WeightsError

    bad = tmp_path / "detection_mobilenet0.25_Final.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="detection_mobilenet0.25_Final.pth"):
        load_face_analyzer("facexlib", model_root=tmp_path, detector="retinaface_mobile0.25")


@pytest.mark.slow
def test_facexlib_bisenet_parsing_loads_and_shapes_the_mask(tiny, tmp_path):
    """Random BiSeNet weights in facexlib's format (53 MB, written here, not by make-tiny) through the real
    loading path; its parsing replaces the template ellipse in the face mask."""
    pytest.importorskip("facexlib")
    pytest.importorskip("torchvision")
    import torch
    from facexlib.parsing.bisenet import BiSeNet

    from headsup_core.faces import DetectedFace

    shutil.copy(tiny["facexlib_retinaface"], tmp_path / "detection_mobilenet0.25_Final.pth")
    torch.manual_seed(0)
    torch.save(BiSeNet(num_class=19).state_dict(), tmp_path / "parsing_bisenet.pth")
    fx = load_face_analyzer("facexlib", model_root=tmp_path, detector="retinaface_mobile0.25", parsing=True)
    tom = to_uint8_rgb(load_image(TOM))
    crop = np.ascontiguousarray(np.repeat(np.repeat(tom, 5, 0), 5, 1)[:512, :512])
    parsed = fx.parse_mask(crop)
    assert parsed.shape == (512, 512) and parsed.dtype == np.float32 and set(np.unique(parsed)) <= {0.0, 1.0}
    face = DetectedFace(bbox=np.array([16, 11, 96, 110], np.float32), kps=ARCFACE_112.copy(), det_score=1.0)
    with_parsing = build_face_condition(tom, (224, 224), fx, faces=[face])
    plain = build_face_condition(tom, (224, 224), None, faces=[face])
    assert with_parsing.assignments[0]["box"] == plain.assignments[0]["box"]
    assert not np.allclose(with_parsing.mask.numpy(), plain.mask.numpy())
    x1, y1, x2, y2 = (int(v) for v in with_parsing.assignments[0]["box"])
    assert float(with_parsing.mask[0, 0, y1 + 2:y2 - 2, x1 + 2:x2 - 2].min()) > 0.9  # the box is always covered


def test_facexlib_wrapper_rescales_detections_of_large_images(tiny, monkeypatch):
    """RetinaFace sees a copy downscaled to 1280 px; boxes and landmarks come back in the caller's pixels."""
    pytest.importorskip("facexlib")
    pytest.importorskip("torchvision")
    fx = load_face_analyzer("facexlib", model_root=tiny["facexlib_dir"], detector="retinaface_mobile0.25",
                            recognizer=tiny["insightface_rec"], device="cpu")
    seen = {}

    def fake_detect(bgr, conf_threshold, use_origin_size):
        seen["shape"] = bgr.shape
        kps = (ARCFACE_112 * 2 + 100).ravel()
        return np.concatenate([[[100, 100, 324, 324, 0.97]], kps[None]], axis=1).astype(np.float32)

    monkeypatch.setattr(fx.net, "detect_faces", fake_detect)
    noise = np.random.default_rng(0).integers(0, 255, (1280, 2560, 3), dtype=np.uint8)  # flat grey embeds to 0
    faces = fx.detect(noise)
    assert seen["shape"] == (640, 1280, 3)
    assert len(faces) == 1 and faces[0].det_score == pytest.approx(0.97)
    np.testing.assert_allclose(faces[0].bbox, [200, 200, 648, 648])
    np.testing.assert_allclose(faces[0].kps, (ARCFACE_112 * 2 + 100) * 2, rtol=1e-5)
    assert faces[0].embedding is not None and np.linalg.norm(faces[0].embedding) == pytest.approx(1.0, abs=1e-5)
