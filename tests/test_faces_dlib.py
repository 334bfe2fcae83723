"""The dlib face backend with its real registry weights (dlib-bin + face-recognition-models) on real photos:
insightface's t1.jpg (six people) and Tom_Hanks_54745.png, scikit-image's astronaut and coffee."""
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

from headsup_core.errors import FaceError  # noqa: E402
from headsup_core.faces import build_face_condition, encode_reference, load_face_analyzer  # noqa: E402
from headsup_core.faces.identity import MATCH_THRESHOLD, SAME_PERSON_THRESHOLD, similarity  # noqa: E402
from headsup_core.imageio import to_uint8_rgb  # noqa: E402
from headsup_core.files.read import load_image  # noqa: E402


@pytest.fixture(scope="module")
def dlib_faces():
    from headsup_core.faces import dlib_backend

    if not dlib_backend.available():
        pytest.skip("face-recognition-models is not installed")
    return load_face_analyzer("dlib")


@pytest.fixture(scope="module")
def t1(t1_jpg):
    return to_uint8_rgb(load_image(t1_jpg))


@pytest.fixture(scope="module")
def t1_faces(dlib_faces, t1):
    return dlib_faces.detect(t1)


def _inside(face) -> bool:
    x1, y1, x2, y2 = face.bbox
    k = face.kps
    return bool(((k[:, 0] >= x1) & (k[:, 0] <= x2) & (k[:, 1] >= y1) & (k[:, 1] <= y2)).all())


def test_t1_six_faces_boxes_hold_landmarks_six_identities(dlib_faces, t1_faces):
    assert dlib_faces.backend == "dlib" and dlib_faces.has_recognizer
    assert len(t1_faces) == 6
    for f in t1_faces:
        assert _inside(f)
        assert f.kps[0, 0] < f.kps[1, 0]  # image-left eye first
        assert f.kps[0, 1] < f.kps[2, 1] < f.kps[3, 1]  # eyes above the nose above the mouth
        assert f.embedding.shape == (128,) and np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
    sims = [similarity(a.embedding, b.embedding, dlib_faces.identity_kind)
            for i, a in enumerate(t1_faces) for b in t1_faces[i + 1:]]
    assert max(sims) < MATCH_THRESHOLD  # six distinct people on the common scale


def test_embed_at_given_landmarks_matches_detection(dlib_faces, t1, t1_faces):
    f = t1_faces[0]
    again = dlib_faces.embed(t1, f.kps)
    assert similarity(again, f.embedding, "dlib_resnet_v1") > SAME_PERSON_THRESHOLD


def test_tom_hanks_aligned_crop_and_astronaut_are_found(dlib_faces, tom_hanks_png):
    from headsup_core.faces.align import ARCFACE_112

    tom = to_uint8_rgb(load_image(tom_hanks_png))
    faces = dlib_faces.detect(tom)
    assert len(faces) == 1 and _inside(faces[0])
    # The crop is ArcFace-aligned: eyes and nose land within a few pixels of the template (112 px crop).
    assert np.abs(faces[0].kps[:3] - ARCFACE_112[:3]).max() < 4.0
    astro = dlib_faces.detect(np.ascontiguousarray(skdata.astronaut()))
    assert astro and 150 < astro[0].kps[:2, 0].mean() < 280 and 90 < astro[0].kps[:2, 1].mean() < 150


def test_faceless_reference_is_a_clear_error(dlib_faces):
    with pytest.raises(FaceError, match="No face found in reference"):
        encode_reference(np.ascontiguousarray(skdata.coffee()), dlib_faces)


def _reference_crops(t1, faces, seed=0):
    """Each person's face from the full-resolution photo, mirrored and colour-jittered so no pixel is shared."""
    rng = np.random.default_rng(seed)
    crops = []
    for f in faces:
        x1, y1, x2, y2 = (int(v) for v in f.bbox)
        m = int(0.6 * (x2 - x1))
        crop = t1[max(0, y1 - m):y2 + m, max(0, x1 - m):x2 + m][:, ::-1].astype(np.float32)
        crop = crop * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)
        crops.append(np.ascontiguousarray(np.clip(crop, 0, 255).astype(np.uint8)))
    return crops


def test_group_portrait_every_reference_on_its_own_face(dlib_faces, t1, t1_faces, tiny_pipe):
    lq = cv2.resize(t1, (t1.shape[1] // 2, t1.shape[0] // 2), interpolation=cv2.INTER_AREA)
    people = _reference_crops(t1, t1_faces)
    stranger = np.ascontiguousarray(skdata.astronaut())
    photos = people + [stranger]
    order = list(range(len(photos)))
    random.Random(3).shuffle(order)
    refs = [encode_reference(photos[i], dlib_faces) for i in order]  # ref k is photos[order[k]]
    _, info = tiny_pipe.upscale(lq, scale=1.0, reference=refs, face_analyzer=dlib_faces, return_info=True)
    report = info["assignments"][0]
    assert len(report) == 6
    centres = np.array([f.kps[:2].mean(axis=0) for f in t1_faces]) / 2  # person p's eyes in LQ pixels
    for a in report:
        x1, y1, x2, y2 = a["box"]
        person = int(np.argmin(np.linalg.norm(centres - ((x1 + x2) / 2, (y1 + y2) / 2), axis=1)))
        assert a["reference_index"] is not None, a
        assert order[a["reference_index"]] == person, a  # its own face
        assert a["similarity"] >= MATCH_THRESHOLD
    assert order.index(6) not in [a["reference_index"] for a in report]  # the stranger lands on nobody
    assert float(info["face_mask"].max()) > 0.99


def test_auto_picks_dlib_without_insightface_pack(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="headsup_core.faces"):
        a = load_face_analyzer("auto", model_root=tmp_path)  # an empty insightface root
    assert a.backend == "dlib" and "Licence" in caplog.text and "public domain" in a.auto_note
    assert load_face_analyzer("none") is None


def test_auto_prefers_an_installed_insightface_pack(tiny_models):
    a = load_face_analyzer("auto", model_root=tiny_models["insightface_root"], device="cpu")
    assert a.backend == "insightface"


def test_mmod_detector_loads_and_finds_a_face(dlib_faces, tom_hanks_png):
    mmod = load_face_analyzer("dlib", detector="mmod", recognizer=False)
    faces = mmod.detect(to_uint8_rgb(load_image(tom_hanks_png)))
    assert len(faces) == 1 and faces[0].embedding is None and _inside(faces[0])


def test_mask_is_drawn_without_reference(dlib_faces, t1, tiny_pipe):
    lq = cv2.resize(t1, (320, 222), interpolation=cv2.INTER_AREA)
    cond = build_face_condition(lq, (222, 320), dlib_faces)
    assert cond.assignments and float(cond.mask.max()) > 0.99 and not cond.has_reference


def test_dataset_build_cli_default_faces_on_real_photos(t1, tmp_path, capsys):
    """`headsup dataset build` with no --faces: auto -> dlib finds the faces, measures eye distances and links the
    same people across photos into identity groups and reference pairs."""
    import json

    from PIL import Image

    from headsup_core.cli import main

    from headsup_core.faces import dlib_backend

    if not dlib_backend.available():
        pytest.skip("face-recognition-models is not installed")
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(t1).save(src / "group.jpg", quality=95)
    mirrored = np.clip(t1[:, ::-1].astype(np.float32) * (1.1, 1.0, 0.9) + 8, 0, 255).astype(np.uint8)
    Image.fromarray(mirrored).resize((1100, 761), Image.LANCZOS).save(src / "group_mirrored.png")
    Image.fromarray(skdata.astronaut()).save(src / "astronaut.png")
    Image.fromarray(skdata.coffee()).save(src / "coffee.png")
    out = tmp_path / "out"
    rc = main(["dataset", "build", str(src), str(out), "--min-size", "400x300", "--min-eye-distance", "20",
               "--quality-metric", "none", "--no-progress"])
    assert rc == 0
    recs = {Path(r["path"]).name: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert len(recs["group.jpg"]["faces"]) == 6 and len(recs["group_mirrored.png"]["faces"]) == 6
    assert recs["coffee.png"]["faces"] == [] and recs["coffee.png"]["reject"] == "face"
    eyes = [f["eye_distance"] for f in recs["group.jpg"]["faces"]]
    assert all(25 < e < 80 for e in eyes), eyes
    ids = [f["identity"] for f in recs["group.jpg"]["faces"]]
    assert len(set(ids)) == 6  # six people
    assert sorted(ids) == sorted(f["identity"] for f in recs["group_mirrored.png"]["faces"])  # the same six
    assert recs["astronaut.png"]["faces"][0]["identity"] not in ids
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity_model"] == "dlib_resnet_v1" and summary["pairs"]["train"] + summary["pairs"]["test"] == 12


def test_eval_id_similarity_uses_gt_landmarks_and_counts_missed_faces(dlib_faces, t1):
    """A face destroyed in the 'SR' image is still measured (at the GT's landmarks) and counted as missed."""
    from headsup_core.eval.metrics import face_metrics

    gt = np.ascontiguousarray(t1[150:500, 0:600])
    means, rows = face_metrics(gt, gt, dlib_faces)
    assert means["faces"] >= 3 and means["faces_missed"] == 0
    assert all(r["id_sim"] > 0.95 for r in rows)
    sr = gt.copy()
    x1, y1, x2, y2 = (int(v) for v in rows[0]["box"])
    sr[y1:y2, x1:x2] = cv2.GaussianBlur(sr[y1:y2, x1:x2], (0, 0), 6)  # the model lost this face
    worse, rows2 = face_metrics(sr, gt, dlib_faces)
    assert worse["faces"] == means["faces"] and worse["faces_missed"] >= 1
    assert rows2[0]["id_sim"] is not None and rows2[0]["id_sim"] < rows[0]["id_sim"]


def test_doctor_lists_face_backends_and_licences(dlib_faces, tmp_path):
    from headsup_core.doctor import report

    text = "\n".join(report(tmp_path))
    assert "Face backends" in text and "dlib:" in text and "public domain" in text
