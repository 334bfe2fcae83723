"""dlib's ResNet in torch is the default identity network of the identity loss, eval's ID similarity and the
dataset builder's embeddings (facexlib's ArcFace only when its weights file is given)."""
import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("kornia")

from headsup_core.faces import dlib_backend  # noqa: E402
from headsup_core.imageio import to_uint8_rgb  # noqa: E402
from headsup_core.files.read import load_image  # noqa: E402


@pytest.fixture(scope="module")
def scene(t1_jpg):
    if not dlib_backend.available():
        pytest.skip("face-recognition-models is not installed")
    from headsup_core.faces import load_face_analyzer
    from headsup_core.faces.identity_net import IdentityEmbedder

    analyzer = load_face_analyzer("dlib")
    img = to_uint8_rgb(load_image(t1_jpg))
    return analyzer, IdentityEmbedder(), img, analyzer.detect(img)


def test_identity_loss_network_choice(tmp_path):
    from headsup_core.errors import MissingModelError
    from headsup_core.train.losses import ArcFaceIdentity, DlibIdentity, load_identity_loss_net

    if not dlib_backend.available():
        pytest.skip("face-recognition-models is not installed")
    assert isinstance(load_identity_loss_net("auto", None), DlibIdentity)
    assert isinstance(load_identity_loss_net("auto", tmp_path / "absent.pth"), DlibIdentity)
    tiny = load_identity_loss_net("auto", None, tiny=True)
    assert isinstance(tiny, ArcFaceIdentity) and "tiny" in tiny.name
    with pytest.raises(MissingModelError, match="recognition_arcface_ir_se50"):
        load_identity_loss_net("arcface", None)
    assert "public domain" in DlibIdentity.name


def test_dlib_identity_loss_is_differentiable_and_matches_the_embedder(scene):
    from headsup_core.train.losses import DlibIdentity, FaceLosses, face_align_matrix

    _, embedder, img, faces = scene
    crop = img[:448, :640]  # three of the six faces, full resolution
    kept = [f for f in faces if f.bbox[2] < 640 and f.bbox[3] < 448]
    assert len(kept) >= 2
    gt = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    mats = torch.from_numpy(np.stack([face_align_matrix(f.kps) for f in kept]))
    boxes = torch.tensor([[0, *f.bbox] for f in kept], dtype=torch.float32)
    ident = DlibIdentity()
    losses = FaceLosses(None, ident, None, w_mse=0, w_lpips=0, w_id=4.0, w_adv=0)
    same, _ = losses(gt, gt, {"boxes": boxes, "align": mats})
    assert float(same["face_id"]) < 1e-5
    sr = (gt + 0.3 * torch.randn_like(gt)).clamp(-1, 1).requires_grad_(True)
    out, _ = losses(sr, gt, {"boxes": boxes, "align": mats})
    out["face_id"].backward()
    assert float(out["face_id"].detach()) > 1e-3 and float(sr.grad.abs().sum()) > 0
    # the loss's differentiable chip (5-point ArcFace alignment, then the template map; kornia sampling) is
    # close to the embedder's (3-point fit, OpenCV): the same person on dlib's scale (measured 0.981-0.997)
    from headsup_core.train.losses import align_faces

    with torch.no_grad():
        e_loss = ident(align_faces(gt, boxes[:, 0], ident.align_from_arcface(mats), 150)).numpy()
    e_ref = embedder.embed_many(crop, [f.kps for f in kept])
    assert (e_loss * e_ref).sum(1).min() > 0.97


def test_eval_id_similarity_uses_the_torch_network_and_names_it(scene):
    from headsup_core.eval.metrics import face_metrics

    analyzer, embedder, img, faces = scene
    means, _ = face_metrics(img, img, analyzer, gt_faces=faces, identity=embedder)
    assert means["faces"] == 6 and means["id_sim"] == pytest.approx(1.0, abs=1e-5)
    noisy = np.clip(img.astype(np.int16) + np.random.default_rng(0).integers(-40, 40, img.shape), 0, 255)
    means2, _ = face_metrics(noisy.astype(np.uint8), img, analyzer, gt_faces=faces, identity=embedder)
    assert 0.3 < means2["id_sim"] < 1.0
    assert "dlib" in embedder.name and "public domain" in embedder.name


def test_dataset_embeddings_are_batched_through_the_torch_network(scene, t1_jpg):
    from headsup_core.train.dataset import BuildOptions, _dec, analyse_image

    analyzer, embedder, img, faces = scene
    opts = BuildOptions(min_size=(64, 64), quality_metric="none")
    rec = analyse_image(t1_jpg, opts, analyzer, None, identity=embedder)
    assert rec["identity_model"] == "dlib_resnet_v1" and len(rec["faces"]) == 6
    embs = np.stack([_dec(f["embedding"]) for f in rec["faces"]])
    assert np.allclose(embs, embedder.embed_many(img, [f.kps for f in faces]), atol=1e-5)
    # the same faces from dlib's C++ descriptor: same person on dlib's own scale (native cosine > 0.99)
    assert (embs * np.stack([f.embedding for f in faces])).sum(1).min() > 0.99
