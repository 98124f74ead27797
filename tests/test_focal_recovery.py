"""Focal recovery from camera-frame point maps (π³ predicts no intrinsics): synthetic maps from a known K."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ns_extreme.posing.focal import padding_mask, recover_focal


def synthetic_point_maps(
    focals, hw, noise: float = 0.01, outliers: float = 0.10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """[S, H, W, 3] camera-frame points of a smooth random surface seen by pinhole cameras with focal f_s and
    principal point (W/2, H/2) (pixel centres at j + 0.5), ``noise`` relative Gaussian noise on every
    coordinate, and a fraction ``outliers`` of pixels replaced by random points (some very close to z = 0).
    Also returns confidences in [0.2, 1] (outliers get random ones too)."""
    rng = np.random.default_rng(seed)
    H, W = hw
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    maps = []
    for s, f in enumerate(focals):
        z = 2.0 + np.sin(u / 37.0 + s) * np.cos(v / 23.0) + rng.uniform(0.0, 0.2, (H, W))
        X = np.stack(((u - W / 2) / f * z, (v - H / 2) / f * z, z), axis=-1)
        X *= 1.0 + noise * rng.standard_normal(X.shape)
        flat = X.reshape(-1, 3)
        pick = rng.choice(H * W, int(outliers * H * W), replace=False)
        flat[pick] = rng.uniform([-5.0, -5.0, 0.01], [5.0, 5.0, 6.0], (len(pick), 3))
        maps.append(X)
    return np.stack(maps), rng.uniform(0.2, 1.0, (len(focals), H, W))


@pytest.mark.parametrize("hw", [(518, 518), (392, 518), (434, 574), (56, 70)], ids=["square", "4:3", "pi3-4:3", "tiny"])
def test_known_focal_is_recovered_within_1_percent_with_noise_and_10_percent_outliers(hw):
    focals = np.array([40.0, 300.0, 520.0, 1500.0, 6000.0])  # ~170 to ~5 degree horizontal field of view
    points, conf = synthetic_point_maps(focals, hw)
    H, W = hw
    for weights in (conf, None):
        K = recover_focal(points, weights, hw)
        assert K.shape == (len(focals), 3, 3) and K.dtype == np.float64
        np.testing.assert_allclose(K[:, 0, 0] / focals, 1.0, atol=0.01)
        np.testing.assert_array_equal(K[:, 0, 0], K[:, 1, 1])
        np.testing.assert_array_equal(K[:, :, 2], np.tile([W / 2, H / 2, 1.0], (len(focals), 1)))
        assert (K[:, [0, 1, 2, 2], [1, 0, 0, 1]] == 0).all()


def test_heavier_noise_and_30_percent_outliers_stay_within_1_percent():
    focals = np.array([350.0, 800.0])
    points, _ = synthetic_point_maps(focals, (392, 518), noise=0.05, outliers=0.30, seed=1)
    np.testing.assert_allclose(recover_focal(points, None, (392, 518))[:, 0, 0] / focals, 1.0, atol=0.01)


def test_exact_point_maps_give_the_exact_focal():
    points, _ = synthetic_point_maps([432.1, 97.0], (42, 56), noise=0.0, outliers=0.0)
    np.testing.assert_allclose(recover_focal(points)[:, 0, 0], [432.1, 97.0], rtol=1e-10)


def test_shared_focal_uses_all_views():
    points, conf = synthetic_point_maps([480.0] * 3, (392, 518), seed=2)
    K = recover_focal(points, conf, (392, 518), shared=True)
    assert np.unique(K[:, 0, 0]).size == 1
    assert K[0, 0, 0] == pytest.approx(480.0, rel=0.01)


def test_torch_inputs_conf_with_channel_dim_and_mask():
    points, conf = synthetic_point_maps([250.0, 600.0], (56, 84), noise=0.0, outliers=0.0)
    bad = points.copy()
    bad[:, :, :20] = [3.0, -2.0, 0.5]  # garbage in the masked-out columns
    mask = np.ones(bad.shape[:3], dtype=bool)
    mask[:, :, :20] = False
    K = recover_focal(
        torch.from_numpy(bad).float(), torch.from_numpy(conf)[..., None], (56, 84), mask=torch.from_numpy(mask)
    )
    np.testing.assert_allclose(K[:, 0, 0], [250.0, 600.0], rtol=1e-4)


def test_views_without_usable_pixels_get_nan():
    points, _ = synthetic_point_maps([300.0, 300.0], (28, 28), noise=0.0, outliers=0.0)
    points[1, ..., 2] = -1.0  # everything behind the camera
    K = recover_focal(points)
    assert K[0, 0, 0] == pytest.approx(300.0) and np.isnan(K[1, 0, 0])


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[S, H, W, 3\]"):
        recover_focal(np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="does not match"):
        recover_focal(np.ones((1, 4, 5, 3)), image_hw=(5, 4))


def test_padding_mask_finds_white_borders_only():
    images = torch.rand(3, 3, 20, 30, generator=torch.Generator().manual_seed(0)) * 0.9
    images[1, :, :4] = 1.0  # pad mode: rows above and below
    images[1, :, -5:] = 1.0
    images[2, :, :, :3] = 1.0  # mixed shapes: columns left and right
    images[2, :, :, -3:] = 1.0
    images[0, :, 8:12, :] = 1.0  # white inside the image is not padding
    images[2, 0, 0, 3] = 1.0  # a white pixel next to the padding is not padding either
    mask = padding_mask(images)
    assert mask[0].all()
    assert not mask[1, :4].any() and not mask[1, -5:].any() and mask[1, 4:-5].all()
    assert not mask[2, :, :3].any() and not mask[2, :, -3:].any() and mask[2, :, 3:-3].all()
