"""π³ backbone: official key layout, released bias checkpoint, tiny-model forward contract (shapes, determinism,
permutation equivariance), loading, π³'s resize rule, and the Pi3Backbone through the posing pipeline."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import read_key_list
from safetensors.torch import save_file

from ns_extreme.models import ModelLoadError, get_spec, load_model
from ns_extreme.models.pi3 import Pi3, Pi3Config
from ns_extreme.models.pi3.heads import PixelShuffleHead, orthogonalise
from ns_extreme.models.pi3.preprocess import pi3_resize_hw, preprocess_images_pi3

TINY = Pi3Config.tiny()
OUTPUTS = ("points", "local_points", "conf", "camera_poses")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- key layout


def test_tiny_config_has_exactly_the_official_key_names(state_dict_keys):
    official = read_key_list(state_dict_keys / "pi3.txt")
    with torch.device("meta"):
        tiny = Pi3(TINY)
    assert list(tiny.state_dict()) == list(official)


@pytest.mark.parametrize(
    "change, message",
    [({"num_heads": 3}, "multiple of 4"), ({"head_num_heads": 5}, "multiple of 4"), ({"depth": 35}, "even")],
)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Pi3Config(**{**TINY.__dict__, **change})


# ---------------------------------------------------------------------------------------------- released biases


def test_packaged_pi3_alignment_is_the_released_file(bias_ckpts):
    from ns_extreme.models.loading import released_alignment_path

    spec = get_spec("pi3")
    assert released_alignment_path(spec).read_bytes() == (bias_ckpts / "PI3_changed_bias.pth").read_bytes()
    assert spec.default_weights == "yyfz233/Pi3" and not spec.reference_frame and spec.ignored_checkpoint_prefixes == ()
    assert "CC BY-NC 4.0" in spec.licence and "BSD-3-Clause" in spec.licence


# ---------------------------------------------------------------------------------------------- tiny forward


@pytest.fixture(scope="module")
def tiny() -> Pi3:
    torch.manual_seed(0)
    model = Pi3(TINY).eval()
    # Default init zeroes biases/tokens and sets LayerScale to 0.01, which would hide wiring mistakes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 or name.endswith("token") else 0.05))
    return model


def _rotations_are_proper(T: torch.Tensor) -> None:
    R = T[..., :3, :3].double()
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(T[..., 3, :], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand_as(T[..., 3, :]))


def test_tiny_forward_shapes_and_geometry(tiny):
    x = torch.rand(3, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny(x)
    assert set(out) == set(OUTPUTS)
    assert out["points"].shape == out["local_points"].shape == (1, 3, 56, 70, 3)
    assert out["conf"].shape == (1, 3, 56, 70, 1)
    assert out["camera_poses"].shape == (1, 3, 4, 4)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert (out["local_points"][..., 2] > 0).all()  # depth = exp(.)
    _rotations_are_proper(out["camera_poses"])
    # Global points are the local points moved by the camera-to-world pose.
    T = out["camera_poses"][0].double()
    local = out["local_points"][0].double()
    expected = torch.einsum("sij,shwj->shwi", T[:, :3, :3], local) + T[:, None, None, :3, 3]
    torch.testing.assert_close(out["points"][0].double(), expected, rtol=1e-5, atol=1e-5)


def test_tiny_forward_is_deterministic_and_batch_consistent(tiny):
    x = torch.rand(2, 3, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = tiny(x)
        again = tiny(x)
        single = tiny(x[1])
    for key in OUTPUTS:
        assert torch.equal(batched[key], again[key])
        torch.testing.assert_close(batched[key][1:], single[key], rtol=1e-4, atol=1e-5)


def test_permuting_frames_permutes_outputs_and_keeps_relative_poses(tiny):
    """No reference view: identical register tokens for every frame and no frame index anywhere."""
    x = torch.rand(4, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = tiny(x)
        b = tiny(x[perm])
    for key in OUTPUTS:
        torch.testing.assert_close(b[key], a[key][:, perm], rtol=1e-4, atol=1e-4)
    # Relative poses T_i^-1 T_j of the same two images do not depend on the order the images came in.
    Ta, Tb = a["camera_poses"][0].double(), b["camera_poses"][0].double()
    rel_a = torch.linalg.inv(Ta)[:, None] @ Ta[None]
    rel_b = torch.linalg.inv(Tb)[:, None] @ Tb[None]
    torch.testing.assert_close(rel_b, rel_a[perm][:, perm], rtol=1e-4, atol=1e-4)
    # ... whereas the frames do interact (global attention): dropping one changes the others' outputs.
    with torch.no_grad():
        c = tiny(x[:3])
    assert not torch.allclose(c["local_points"], a["local_points"][:, :3], atol=1e-4)


def test_heads_subset_gives_identical_outputs(tiny):
    x = torch.rand(2, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tiny(x)
        camera = tiny(x, heads=("camera",))
        points = tiny(x, heads=("points",))
        conf = tiny(x, heads=("conf",))
    assert set(camera) == {"camera_poses"} and set(points) == {"local_points"} and set(conf) == {"conf"}
    assert torch.equal(camera["camera_poses"], full["camera_poses"])
    assert torch.equal(points["local_points"], full["local_points"])
    assert torch.equal(conf["conf"], full["conf"])


@pytest.mark.parametrize(
    "shape, message",
    [((2, 3, 50, 56), "multiples of 14"), ((2, 4, 56, 56), "expected images"), ((3, 56, 56), "expected images")],
)
def test_bad_input_shapes_raise(tiny, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny(torch.rand(*shape))


def test_unknown_head_raises(tiny):
    with pytest.raises(ValueError, match="unknown heads"):
        tiny(torch.rand(1, 3, 56, 56), heads=("depth",))


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    x = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        tiny.zero_grad()
        tiny.set_gradient_checkpointing(checkpointing)
        tiny.requires_grad_(True)
        out = tiny(x, heads=("camera", "points"))
        (out["camera_poses"].square().sum() + out["local_points"].square().mean()).backward()
        grads.append(tiny.decoder[32].attn.qkv.bias.grad.clone())
    tiny.set_gradient_checkpointing(False)
    tiny.requires_grad_(False)
    tiny.zero_grad()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_keeps_fp32_heads(tiny):
    x = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(x)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    _rotations_are_proper(out["camera_poses"])
    rotations = out["camera_poses"][..., :3, :3]
    assert float((rotations == rotations.bfloat16().float()).float().mean()) < 0.5  # not bf16-rounded
    with torch.no_grad():
        fp32 = tiny(x)
    assert not torch.equal(out["camera_poses"], fp32["camera_poses"])  # the backbone really ran in bf16
    assert (out["camera_poses"] - fp32["camera_poses"]).abs().max() < 1e-2  # measured 9.6e-4


# ---------------------------------------------------------------------------------------------- head pieces


def test_orthogonalise_returns_the_nearest_rotation():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(64, 9, generator=g, dtype=torch.float64)
    R = orthogonalise(m)
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye)
    torch.testing.assert_close(torch.det(R), torch.ones(64, dtype=R.dtype))
    # The nearest rotation (Frobenius) to the row-normalised matrix beats any other candidate.
    n = torch.nn.functional.normalize(m.reshape(-1, 3, 3), dim=-1)
    other = orthogonalise(m + 0.05 * torch.randn(64, 9, generator=g, dtype=torch.float64))
    assert bool(((R - n).square().sum((1, 2)) <= (other - n).square().sum((1, 2)) + 1e-12).all())
    # Rotations with rescaled rows come back unchanged; improper inputs still give det +1.
    Q, _ = torch.linalg.qr(torch.randn(8, 3, 3, generator=g, dtype=torch.float64))
    Q = Q * torch.det(Q)[:, None, None]
    scaled = Q * torch.tensor([2.0, 0.5, 3.0], dtype=Q.dtype)[:, None]
    torch.testing.assert_close(orthogonalise(scaled.reshape(8, 9)), Q)
    torch.testing.assert_close(torch.det(orthogonalise((-Q).reshape(8, 9))), torch.ones(8, dtype=Q.dtype))


def test_orthogonalise_gradient_is_exact_and_finite_at_rotations():
    """The rotation's gradient matches finite differences, including for inputs that already are rotations
    (repeated singular values, where torch's generic SVD backward returns NaN)."""
    g = torch.Generator().manual_seed(7)
    m = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonalise, (m,), eps=1e-6, atol=1e-6)
    Q, _ = torch.linalg.qr(torch.randn(6, 3, 3, generator=g, dtype=torch.float64))
    Q = (Q * torch.det(Q)[:, None, None]).reshape(6, 9).requires_grad_(True)
    assert torch.autograd.gradcheck(orthogonalise, (Q,), eps=1e-6, atol=1e-6)
    w = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((orthogonalise(Q.float()) * w.float()).sum(), Q)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-3


def test_pixel_shuffle_head_layout():
    """Token (r, c), output value k*p² + i*p + j becomes pixel (r*p + i, c*p + j) of channel k."""
    p, rows, cols = 14, 2, 3
    head = PixelShuffleHead(rows * cols, 3, p)
    with torch.no_grad():
        # One-hot tokens; value = 1000 * token index + output index.
        head.proj.weight.copy_(1000.0 * torch.arange(rows * cols, dtype=torch.float32).expand(3 * p * p, -1))
        head.proj.bias.copy_(torch.arange(3 * p * p, dtype=torch.float32))
        out = head(torch.eye(rows * cols)[None], rows, cols)[0]  # [H, W, 3]
    assert out.shape == (rows * p, cols * p, 3)
    for r, c, i, j, k in [(0, 0, 0, 0, 0), (1, 2, 13, 5, 2), (0, 1, 7, 0, 1), (1, 0, 3, 9, 0)]:
        assert out[r * p + i, c * p + j, k].item() == 1000 * (r * cols + c) + k * p * p + i * p + j


# ---------------------------------------------------------------------------------------------- loading


@pytest.fixture()
def tiny_file(tmp_path, tiny):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    return path


def test_load_model_reads_pi3_weights_strictly(tmp_path, tiny, tiny_file):
    x = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(7))
    model = load_model("pi3", weights=tiny_file, alignment="pretrained", config=TINY)
    with torch.no_grad():
        expected, got = tiny(x), model(x)
    for key in OUTPUTS:
        assert torch.equal(got[key], expected[key])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert "CC BY-NC 4.0" in model.load_report.licence
    # Every model key is required, including the image_mean/std buffers; extra keys are refused.
    state = dict(tiny.state_dict())
    del state["image_std"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="image_std"):
        load_model("pi3", weights=tmp_path / "missing.safetensors", alignment="pretrained", config=TINY)
    state = {**tiny.state_dict(), "encoder.mask_token": torch.zeros(1, TINY.embed_dim)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelLoadError, match="mask_token"):
        load_model("pi3", weights=tmp_path / "extra.safetensors", alignment="pretrained", config=TINY)


def test_released_alignment_does_not_fit_a_tiny_model():
    with pytest.raises(ModelLoadError, match="wrong shapes"):
        load_model("pi3", weights="random", alignment="aligned", config=TINY)


def test_vggt_alignment_is_refused_for_pi3(bias_ckpts):
    with pytest.raises(ModelLoadError, match="not parameters"):
        load_model("pi3", weights="random", alignment=bias_ckpts / "VGGT_changed_bias.pth", config=TINY)


# ---------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "original_hw, expected_hw",
    [((3024, 4032), (434, 574)), ((768, 1024), (434, 574)), ((1024, 768), (574, 434)), ((1080, 1920), (378, 672)),
     ((4000, 6000), (406, 616)), ((500, 500), (504, 504)), ((512, 768), (406, 616))],
)  # fmt: skip
def test_pi3_resize_rule(original_hw, expected_hw):
    H, W = pi3_resize_hw(original_hw)
    assert (H, W) == expected_hw
    assert H % 14 == 0 and W % 14 == 0 and H * W <= 255_000


def test_preprocess_images_pi3_takes_the_size_of_the_first_image_and_records_it():
    rng = np.random.default_rng(0)
    landscape = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    portrait = rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)
    batch = preprocess_images_pi3([landscape, portrait])
    assert batch.images.shape == (2, 3, 434, 574)
    assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
    first, second = batch.records
    assert first.mode == "pi3" and first.final_hw == (434, 574) and second.original_hw == (400, 300)
    assert first.valid_mask_preprocessed().all()
    # The portrait is stretched: x and y scales differ, and intrinsics map through the record exactly.
    sx, sy = second.scale_xy
    assert sx == pytest.approx(574 / 300) and sy == pytest.approx(434 / 400)
    K = np.array([[350.0, 0.0, 150.0], [0.0, 350.0, 200.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(second.intrinsics_to_preprocessed(K)[:2, 2], [287.0, 217.0])
    np.testing.assert_allclose(second.intrinsics_to_original(second.intrinsics_to_preprocessed(K)), K)


# ---------------------------------------------------------------------------------------------- backbone + pipeline


@pytest.fixture(scope="module")
def random_tiny():
    """load_model's random initialisation, with ``make_outputs_plausible`` applied (what the CLI will use)."""
    return load_model("pi3", weights="random", alignment="pretrained", config=TINY)


def test_pi3_backbone_predictions(random_tiny):
    from ns_extreme.posing.backbone import Pi3Backbone

    backbone = Pi3Backbone(random_tiny)
    x = torch.rand(3, 3, 56, 70, generator=torch.Generator().manual_seed(8))
    pred = backbone.predict(x)
    with torch.no_grad():
        out = random_tiny(x[None])
    assert pred.w2c_opencv.shape == (3, 3, 4) and pred.intrinsics.shape == (3, 3, 3)
    assert pred.depth.shape == pred.confidence.shape == (3, 56, 70)
    np.testing.assert_allclose(pred.w2c_opencv[0], np.eye(4)[:3], atol=1e-12)  # world = camera of frame 0
    # w2c is the inverse of the predicted camera-to-world, re-anchored at frame 0: w2c_i = c2w_i^-1 c2w_0.
    c2w = out["camera_poses"][0].double().numpy()
    expected = np.linalg.inv(c2w) @ c2w[0]
    np.testing.assert_allclose(pred.w2c_opencv, expected[:, :3], atol=1e-5)
    np.testing.assert_allclose(pred.depth, out["local_points"][0, ..., 2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(pred.confidence, torch.sigmoid(out["conf"][0, ..., 0]).numpy(), rtol=1e-6)
    assert ((pred.confidence > 0) & (pred.confidence < 1)).all()
    K = pred.intrinsics
    assert (K[:, 0, 0] > 0).all() and np.array_equal(K[:, 0, 0], K[:, 1, 1])
    np.testing.assert_allclose(K[:, :2, 2], np.tile([35.0, 28.0], (3, 1)))
    # Unanchored: exactly the inverse of the predicted camera-to-world.
    raw = Pi3Backbone(random_tiny, anchor_first_frame=False).predict(x)
    np.testing.assert_allclose(raw.w2c_opencv, np.linalg.inv(c2w)[:, :3], atol=1e-5)


def test_pose_images_end_to_end_with_a_tiny_random_pi3(random_tiny, dev_small):
    from ns_extreme.io.images import list_images
    from ns_extreme.posing import PosingOptions, pose_images
    from ns_extreme.posing.backbone import Pi3Backbone
    from ns_extreme.posing.refine import RefineOptions

    paths = list_images(dev_small / "strecha_Herz-Jesus-P8" / "images")[:5]
    backbone = Pi3Backbone(random_tiny, target_size=140)
    recon = pose_images(
        paths, backbone, PosingOptions(max_points=2000, refinement=RefineOptions(refine=False)), progress=False
    )
    assert recon.w2c_opencv.shape == (5, 3, 4) and np.isfinite(recon.w2c_opencv).all()
    assert (
        np.isfinite(recon.intrinsics).all()
        and (recon.intrinsics[:, 0, 0] > 0).all()
        and (recon.intrinsics[:, 1, 1] > 0).all()
    )
    # Principal point at the centre of the original images.
    np.testing.assert_allclose(recon.intrinsics[:, :2, 2], recon.sizes_wh / 2.0, rtol=1e-6)
    assert len(recon.points_xyz) > 0 and np.isfinite(recon.points_xyz).all()
    assert recon.provenance["backbone"] == "pi3"
    # Chunked inference needs the recovered intrinsics too (the Sim(3) join unprojects shared frames).
    chunked = pose_images(
        paths,
        backbone,
        PosingOptions(max_points=2000, max_frames_per_pass=3, chunk_overlap=1, refinement=RefineOptions(refine=False)),
        progress=False,
    )
    assert np.isfinite(chunked.w2c_opencv).all() and (chunked.intrinsics[:, 0, 0] > 0).all()


@pytest.mark.slow
def test_full_size_pi3_forward_on_two_images():
    """Opt-in (`-m slow`, ~4 GB RAM, minutes on 2 cores): released architecture, random weights, released biases."""
    from ns_extreme.posing.backbone import Pi3Backbone

    model = load_model("pi3", weights="random", alignment="aligned")
    assert model.load_report.alignment.parameters == 82_944
    images = torch.rand(2, 3, 392, 518, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the module fixture's single thread is for the tiny model
    try:
        pred = Pi3Backbone(model).predict(images)
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(pred.w2c_opencv).all() and (pred.intrinsics[:, 0, 0] > 0).all()
    assert pred.depth.shape == (2, 392, 518) and (pred.depth > 0).all()
