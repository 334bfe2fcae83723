"""Faces: alignment maths, reference placement, masks and matching (synthetic data, stub analyzer)."""
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("skimage")

from headsup_core.errors import FaceError
from headsup_core.faces import DetectedFace, Reference, build_face_condition, match_references
from headsup_core.faces.align import FFHQ_512, align_face, apply, estimate_similarity, template


def similarity(scale, angle_deg, tx, ty):
    a = np.radians(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def dot_image(points, size_hw, radius=4.0):
    """Grey-level image with a Gaussian blob at each point (sub-pixel accurate centres)."""
    h, w = size_hw
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = np.zeros((h, w), np.float32)
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * radius ** 2))
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def blob_centres(grey, expected, window):
    """Intensity-weighted centroid of the blob near each expected point."""
    out = []
    for x, y in expected:
        x0, y0 = int(max(x - window, 0)), int(max(y - window, 0))
        patch = grey[y0:int(y + window) + 1, x0:int(x + window) + 1].astype(np.float64)
        patch = np.where(patch > patch.max() * 0.2, patch, 0)
        yy, xx = np.mgrid[:patch.shape[0], :patch.shape[1]]
        out.append([x0 + (patch * xx).sum() / patch.sum(), y0 + (patch * yy).sum() / patch.sum()])
    return np.array(out, np.float32)


class StubAnalyzer:
    """A face analyzer with fixed detections (the real backends are tested in test_faces_backends.py)."""

    backend = "stub"
    has_recognizer = True

    def __init__(self, faces):
        self.faces = faces
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        return list(self.faces)


def face_at(cx, cy, size, angle=0.0, embedding=None):
    """A DetectedFace whose landmarks are the FFHQ template mapped to a face of ``size`` px at (cx, cy)."""
    m = similarity(size / 512.0, angle, 0, 0)
    kps = apply(m, FFHQ_512 - 256.0) + (cx, cy)
    bbox = np.array([cx - 0.3 * size, cy - 0.3 * size, cx + 0.3 * size, cy + 0.45 * size], np.float32)
    emb = None if embedding is None else np.asarray(embedding, np.float32) / np.linalg.norm(embedding)
    return DetectedFace(bbox=bbox, kps=kps, det_score=0.99, embedding=emb)


# ---------------------------------------------------------------- alignment


def test_estimate_similarity_recovers_known_transform_from_warped_image():
    h, w = 400, 500
    src_pts = np.array([[150, 160], [250, 158], [200, 215], [160, 270], [245, 268]], np.float32)
    img = dot_image(src_pts, (h, w))
    known = similarity(1.23, 17.0, 40.0, -35.0)  # landmarks stay inside the 500x400 frame
    warped = cv2.warpAffine(img, known, (w, h), flags=cv2.INTER_CUBIC)
    found = blob_centres(warped, apply(known, src_pts), window=12)
    est = estimate_similarity(src_pts, found)
    probe = np.array([[0, 0], [w, 0], [0, h], [w, h], [200, 200]], np.float32)  # far from the landmarks too
    err = np.linalg.norm(apply(est, probe) - apply(known, probe), axis=1)
    assert err.max() < 0.5, err


def test_align_face_puts_landmarks_on_the_template():
    known = similarity(0.45, -30.0, 300.0, 120.0)
    kps = apply(known, FFHQ_512)
    img = dot_image(kps, (600, 700), radius=2.0)
    crop, crop_kps, frontal = align_face(np.repeat(img[:, :, None], 3, axis=2), kps)
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
    assert np.abs(crop_kps - template()).max() < 0.01
    assert frontal > 0.99
    found = blob_centres(crop[:, :, 0], template(), window=14)
    assert np.abs(found - template()).max() < 0.5
    # A profile-like landmark set (nose far off-centre) fits the template worse.
    bent = kps.copy()
    bent[2] += (60, 0)
    assert align_face(np.repeat(img[:, :, None], 3, axis=2), bent)[2] < frontal - 0.1


# ---------------------------------------------------------------- placing references


def make_reference(embedding=None, value=0):
    crop = np.full((512, 512, 3), value, np.uint8)
    crop[:, :, 0] = dot_image(FFHQ_512, (512, 512), radius=6.0)
    emb = None if embedding is None else np.asarray(embedding, np.float32) / np.linalg.norm(embedding)
    return Reference(crop=crop, kps=FFHQ_512.copy(), embedding=emb, sharpness=50.0, frontal=1.0, source="synthetic")


@pytest.mark.parametrize("scale_out, size, angle", [(2.0, 110.0, 12.0), (4.0, 60.0, -20.0), (1.0, 150.0, 0.0)])
def test_reference_landmarks_land_on_target_landmarks(scale_out, size, angle):
    lq_hw = (200, 240)
    face = face_at(120.0, 95.0, size, angle, embedding=[1, 0, 0])
    ref = make_reference(embedding=[1, 0, 0])
    out_hw = (int(lq_hw[0] * scale_out), int(lq_hw[1] * scale_out))
    cond = build_face_condition(np.zeros(lq_hw + (3,), np.uint8), out_hw, StubAnalyzer([face]), references=[ref])
    assert cond.has_reference and cond.assignments[0]["reference_index"] == 0
    assert tuple(cond.canvas.shape) == (1, 3) + out_hw and tuple(cond.mask.shape) == (1, 1) + out_hw
    red = ((cond.canvas[0, 0].numpy() + 1.0) * 127.5).clip(0, 255)
    target = face.scaled(scale_out * 1.0, scale_out * 1.0).kps
    found = blob_centres(red, target, window=max(4, size * scale_out / 512 * 14))
    assert np.abs(found - target).max() < 1.0, (found, target)
    # Pixels whose pre-image lies outside the 512² crop are exactly zero on the canvas.
    inv = cv2.invertAffineTransform(estimate_similarity(FFHQ_512, target))
    yy, xx = np.mgrid[:out_hw[0]:7, :out_hw[1]:7]
    pre = apply(inv, np.stack([xx.ravel(), yy.ravel()], 1))
    outside = ((pre < -2) | (pre > 514)).any(1)
    assert outside.any()
    assert float(cond.canvas[0, :, yy.ravel()[outside], xx.ravel()[outside]].abs().max()) == 0.0


def test_canvas_is_zero_without_reference_and_detection_runs_once():
    stub = StubAnalyzer([face_at(60, 60, 80)])
    cond = build_face_condition(np.zeros((128, 128, 3), np.uint8), (256, 256), stub)
    assert stub.calls == 1
    assert float(cond.canvas.abs().max()) == 0.0 and not cond.has_reference
    assert cond.assignments[0]["reference_index"] is None and cond.assignments[0]["similarity"] is None


# ---------------------------------------------------------------- masks


def test_mask_covers_face_boxes_and_nothing_far_outside():
    faces = [face_at(70, 80, 90, 10.0), face_at(230, 100, 120, -15.0)]
    cond = build_face_condition(np.zeros((200, 320, 3), np.uint8), (400, 640), StubAnalyzer(faces))
    mask = cond.mask[0, 0].numpy()
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    far = np.ones_like(mask, bool)
    yy, xx = np.mgrid[:400, :640]
    for a in cond.assignments:
        x1, y1, x2, y2 = a["box"]
        inside = mask[int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)]
        assert inside.min() > 0.9, inside.min()
        pad = 0.5 * max(x2 - x1, y2 - y1)
        far &= (xx < x1 - pad) | (xx > x2 + pad) | (yy < y1 - pad) | (yy > y2 + pad)
    assert far.any() and float(mask[far].max()) < 1e-3
    # Soft edge: some values strictly between 0 and 1.
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 100


def test_mask_without_reference_off_and_face_subset():
    faces = [face_at(60, 60, 80, embedding=[1, 0]), face_at(190, 60, 80, embedding=[0, 1])]
    lq = np.zeros((128, 256, 3), np.uint8)
    off = build_face_condition(lq, (256, 512), StubAnalyzer(faces), mask_without_reference=False)
    assert float(off.mask.max()) == 0.0
    # Only the face with a reference is masked when mask_without_reference is off.
    one = build_face_condition(lq, (256, 512), StubAnalyzer(faces), references=make_reference([0, 1]),
                               mask_without_reference=False)
    assert [a["reference_index"] for a in one.assignments] == [None, 0]
    assert float(one.mask[0, 0, :, :200].max()) == 0.0 and float(one.mask[0, 0, :, 300:].max()) > 0.99
    # face_indices picks a subset: the other face gets neither mask nor reference.
    sub = build_face_condition(lq, (256, 512), StubAnalyzer(faces), references=[make_reference([1, 0])],
                               face_indices=[1])
    assert [a["selected"] for a in sub.assignments] == [False, True]
    assert sub.assignments[0]["reference_index"] is None
    assert float(sub.mask[0, 0, :, :200].max()) == 0.0 and float(sub.canvas.abs().max()) == 0.0


# ---------------------------------------------------------------- matching


def test_match_references_crafted_embeddings():
    rng = np.random.default_rng(0)
    ids = np.linalg.qr(rng.standard_normal((64, 4)))[0].T  # four orthonormal identities

    def noisy(v):
        v = v + 0.04 * rng.standard_normal(64)
        return v / np.linalg.norm(v)

    faces = [noisy(ids[0]), noisy(ids[1]), noisy(ids[2])]
    refs = [ids[2], ids[0], ids[3]]  # ref 2 is nobody in the picture
    out = match_references(faces, refs, threshold=0.3)
    assert [r for r, _ in out] == [1, None, 0]
    assert out[0][1] > 0.8 and out[2][1] > 0.8 and out[1][1] is None
    # Everything below the threshold: nobody gets a reference.
    assert [r for r, _ in match_references(faces, [ids[3]], threshold=0.3)] == [None, None, None]
    assert [r for r, _ in match_references(faces, refs, threshold=0.99)] == [None, None, None]


def test_match_is_one_to_one_and_best_first():
    faces = [np.array([1.0, 0.0]), np.array([0.9, np.sqrt(1 - 0.81)])]
    refs = [np.array([1.0, 0.0])]
    assert match_references(faces, refs, 0.3) == [(0, 1.0), (None, None)]
    # Two references that both prefer face 0: the better one wins it, the other takes face 1 if above threshold.
    refs = [np.array([0.95, np.sqrt(1 - 0.95 ** 2)]), np.array([1.0, 0.0])]
    res = match_references(faces, refs, 0.3)
    assert res[0][0] == 1 and res[1][0] == 0


def test_match_without_identity():
    assert match_references([None, None], [np.ones(4)], 0.3) == [(0, None), (None, None)]
    assert match_references([None, None], [np.ones(4)], 0.3, face_areas=[10.0, 99.0]) == [(None, None), (0, None)]
    # Through build_face_condition: the larger face (on the right) gets the single reference.
    faces = [face_at(40, 60, 50), face_at(150, 60, 90)]
    cond = build_face_condition(np.zeros((128, 200, 3), np.uint8), (128, 200), StubAnalyzer(faces),
                                references=make_reference(None))
    assert [a["reference_index"] for a in cond.assignments] == [None, 0]
    with pytest.raises(FaceError, match="recognizer"):
        match_references([None, None], [np.ones(4), np.ones(4)], 0.3)


def test_group_photo_report_puts_each_reference_on_its_face():
    e = np.eye(3, dtype=np.float32)
    faces = [face_at(200, 60, 70, embedding=e[0] + 0.1), face_at(60, 60, 70, embedding=e[1] + 0.1),
             face_at(130, 150, 70, embedding=e[2] + 0.1)]
    refs = [make_reference(e[1]), make_reference(e[0])]
    cond = build_face_condition(np.zeros((200, 260, 3), np.uint8), (400, 520), StubAnalyzer(faces), references=refs)
    by_x = sorted(cond.assignments, key=lambda a: a["box"][0])
    assert [a["face_index"] for a in cond.assignments] == [0, 1, 2]  # left-to-right order
    assert by_x[0]["reference_index"] == 0 and by_x[0]["box"][0] < 200  # the face at x=60 (2x: 120)
    assert by_x[2]["reference_index"] == 1 and by_x[2]["box"][0] > 300
    assert by_x[1]["reference_index"] is None
    assert all(a["similarity"] > 0.9 for a in cond.assignments if a["reference_index"] is not None)
    assert cond.has_reference


def test_build_face_condition_rejects_raw_images_as_references():
    with pytest.raises(FaceError, match="encode_reference"):
        build_face_condition(np.zeros((64, 64, 3), np.uint8), (128, 128), StubAnalyzer([]),
                             references=[np.zeros((64, 64, 3), np.uint8)])


def test_no_face_gives_empty_condition():
    cond = build_face_condition(np.zeros((64, 64, 3), np.uint8), (256, 256), StubAnalyzer([]),
                                references=[make_reference([1, 0])])
    assert cond.assignments == [] and not cond.has_reference
    assert float(cond.mask.max()) == 0.0 and float(cond.canvas.abs().max()) == 0.0


def test_parsing_mask_replaces_the_ellipse():
    """An analyzer with a parser: its template-space mask is warped onto the face (plumbing, stub parser)."""

    class ParsingStub(StubAnalyzer):
        parser = object()

        def parse_mask(self, crop):
            assert crop.shape == (512, 512, 3)
            m = np.zeros((512, 512), np.float32)
            m[200:300, 150:360] = 1.0  # a horizontal band through the eyes and nose
            return m

    face = face_at(100, 100, 160)
    lq = np.zeros((200, 200, 3), np.uint8)
    plain = build_face_condition(lq, (200, 200), StubAnalyzer([face]))
    parsed = build_face_condition(lq, (200, 200), ParsingStub([face]))
    assert not np.allclose(plain.mask.numpy(), parsed.mask.numpy())
    band_centre = apply(estimate_similarity(FFHQ_512, face.kps), np.array([[255.0, 250.0]]))[0]
    assert float(parsed.mask[0, 0, int(band_centre[1]), int(band_centre[0])]) > 0.99


def test_as_references():
    from headsup_core.faces import as_references

    ref = make_reference([1, 0])
    assert as_references(None) == [] and as_references(ref) == [ref] and as_references([ref, ref]) == [ref, ref]
    with pytest.raises(FaceError, match="face analyzer"):
        as_references(np.zeros((32, 32, 3), np.uint8), analyzer=None)
    stub = StubAnalyzer([face_at(16, 16, 20, embedding=[1, 0])])
    got = as_references(np.zeros((32, 32, 3), np.uint8), stub)
    assert len(got) == 1 and got[0].crop.shape == (512, 512, 3)
    mixed = as_references([ref, np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)], stub)
    assert len(mixed) == 3 and mixed[0] is ref and all(r.num_images == 1 for r in mixed)  # one person per photo


def test_format_assignments():
    from headsup_core.faces import format_assignments

    text = format_assignments([
        {"face_index": 0, "box": [1, 2, 30, 40], "reference_index": 1, "similarity": 0.8123, "selected": True},
        {"face_index": 1, "box": [50, 2, 80, 40], "reference_index": None, "similarity": None, "selected": True},
        {"face_index": 2, "box": [90, 2, 120, 40], "reference_index": None, "similarity": None, "selected": False}])
    assert text.splitlines() == ["face 0 [1, 2, 30, 40]: reference 1 (similarity 0.81)",
                                 "face 1 [50, 2, 80, 40]: no reference", "face 2 [90, 2, 120, 40]: not selected"]
    assert format_assignments([]) == "no faces found"


def test_encode_reference_batch_tensor_and_identity_check():
    import torch

    from headsup_core.faces import encode_reference

    class PerImage(StubAnalyzer):
        """Face embedding depends on the image's mean, so two photos can be 'different people'."""

        def detect(self, image):
            bright = float(image.mean()) > 100
            return [face_at(32, 32, 40, embedding=[1, 0] if bright else [0, 1]),
                    face_at(20, 20, 20, embedding=[0, 1] if bright else [1, 0])]

    batch = torch.rand(2, 64, 64, 3) * 0.2 + 0.6  # ComfyUI IMAGE: two bright photos
    ref = encode_reference(batch, PerImage([]))
    assert ref.num_images == 2 and np.allclose(ref.embedding, [1, 0])
    # The second photo's best match to the identity so far is the small face: it is picked, not the largest.
    dark = np.full((64, 64, 3), 20, np.uint8)
    ref2 = encode_reference([np.full((64, 64, 3), 200, np.uint8), dark], PerImage([]))
    assert np.allclose(ref2.embedding, [1, 0])
    with pytest.raises(FaceError, match="same person"):
        encode_reference([np.full((64, 64, 3), 200, np.uint8), dark], _Alternating(), min_similarity=0.5)


class _Alternating(StubAnalyzer):
    """First photo: identity A; second photo: only identity B."""

    def __init__(self):
        super().__init__([])

    def detect(self, image):
        self.calls += 1
        return [face_at(32, 32, 40, embedding=[1, 0] if self.calls == 1 else [0, 1])]
