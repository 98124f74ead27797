"""The refinement stage on real photos: SfM-grade poses where views overlap, input poses elsewhere, never fatal.

A test backbone returns the reference cameras of the dev_small scenes with seeded errors (3–5° rotation, 3–5 % of
the extent in position, 3–5 % in focal length, ``posing_helpers.noisy_reference``), so the real pipeline runs on
the real images: features, matching, verification and bundle adjustment are pycolmap's, nothing is mocked except
where a failure is injected on purpose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from posing_helpers import (
    GroundTruthBackbone,
    Reference,
    camera_centres,
    load_reference,
    noisy_reference,
    pose_errors,
    rotation_angle_deg,
)

from ns_extreme.io.colmap_model import read_colmap_model
from ns_extreme.io.dataset import write_dataset
from ns_extreme.io.ply import read_ply
from ns_extreme.posing import PosingOptions, pose_images
from ns_extreme.posing.refine import RefineOptions

FOUNTAIN = "strecha_fountain-P11"
HERZ_JESUS = "strecha_Herz-Jesus-P8"
CASTLE = "strecha_castle-P19_odd9"
SACRE = "hloc_sacre_coeur"
TARGET = 280  # network input width of the test backbone: refinement works on the originals anyway


def _relative_errors(w2c: np.ndarray, ref: Reference, views: list[int] | None = None) -> np.ndarray:
    """Relative-rotation error (degrees) of every pair of ``views`` against the reference."""
    views = list(range(len(w2c))) if views is None else views
    R, G = w2c[:, :3, :3], ref.w2c[:, :3, :3]
    return np.array(
        [rotation_angle_deg(R[j] @ R[i].T, G[j] @ G[i].T) for a, i in enumerate(views) for j in views[a + 1 :]]
    )


def _pose(ref: Reference, predicted: Reference, paths: list[Path] | None = None, **options):
    backbone = GroundTruthBackbone.for_reference(predicted, "crop", TARGET)
    opts = PosingOptions(max_points=20_000, **options)
    return pose_images(paths or ref.paths, backbone, opts, progress=False)


_RUNS: dict[str, tuple] = {}


def _noisy_run(dev_small: Path, tmp_path_factory, scene: str):
    """(reference, noisy input, reconstruction, written dataset) of a scene posed from noisy predictions."""
    if scene not in _RUNS:
        ref = load_reference(dev_small / scene)
        noisy = noisy_reference(ref, seed=7)
        recon = _pose(ref, noisy)
        out = write_dataset(recon, tmp_path_factory.mktemp(scene) / "dataset")
        _RUNS[scene] = (ref, noisy, recon, out)
    return _RUNS[scene]


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("scene", [FOUNTAIN, HERZ_JESUS])
def test_overlapping_scene_reaches_sfm_accuracy(dev_small: Path, tmp_path_factory, scene: str) -> None:
    ref, noisy, recon, _ = _noisy_run(dev_small, tmp_path_factory, scene)
    before = _relative_errors(recon.input_w2c_opencv, ref)
    after = _relative_errors(recon.w2c_opencv, ref)
    assert np.median(before) > 3.0  # the input really is a few degrees off
    assert np.median(after) < 0.1 and after.max() < 0.5, (np.median(after), after.max())
    assert pose_errors(recon.w2c_opencv, ref).max_pos_rel < 0.01
    focal_error = np.abs(recon.intrinsics[:, 0, 0] / ref.K[:, 0, 0] - 1.0)
    assert focal_error.max() < 0.005, focal_error
    assert np.abs(noisy.K[:, 0, 0] / ref.K[:, 0, 0] - 1.0).min() > 0.02
    assert all(v.status == "refined" for v in recon.refinement.views)
    assert recon.refinement.median_reproj_px() < 1.0


def test_zero_noise_moves_nothing_beyond_the_reference_accuracy(dev_small: Path) -> None:
    """From the reference itself, the refined cameras stay within the reference's own accuracy (Strecha's LIDAR
    ground truth; the same BA from scratch agrees with it to a few hundredths of a degree)."""
    ref = load_reference(dev_small / HERZ_JESUS)
    recon = _pose(ref, ref)
    moved = [
        rotation_angle_deg(recon.w2c_opencv[i, :3, :3], recon.input_w2c_opencv[i, :3, :3])
        for i in range(len(ref.paths))
    ]
    rel = _relative_errors(recon.w2c_opencv, ref)
    assert np.median(rel) < 0.05 and rel.max() < 0.1, rel
    assert max(moved) < 0.25  # the Sim(3) gauge onto the input frame adds a common rotation of this size at most
    assert pose_errors(recon.w2c_opencv, ref).max_pos_rel < 0.005
    assert np.abs(recon.intrinsics[:, 0, 0] / ref.K[:, 0, 0] - 1.0).max() < 0.002


def test_partial_overlap_refines_linked_views_and_keeps_the_rest_bit_for_bit(dev_small: Path) -> None:
    """Castle courtyard (every view faces another side) plus a photo of an unrelated place: the unrelated view
    shares no verified match and keeps its input pose exactly; the linked views get better, and every view the
    trust region sends back is exactly its input."""
    ref = load_reference(dev_small / CASTLE)
    other = load_reference(dev_small / SACRE)
    stranger = Reference(ref.scene_dir, ref.names + other.names[:1], ref.paths + other.paths[:1],
                         np.concatenate([ref.w2c, ref.w2c[:1]]), np.concatenate([ref.K, ref.K[:1]]),
                         np.concatenate([ref.sizes_wh, other.sizes_wh[:1]]))  # fmt: skip
    stranger.K[-1] = other.K[0]
    noisy = noisy_reference(stranger, seed=3)
    recon = _pose(stranger, noisy)
    views = recon.refinement.views
    last = len(views) - 1
    assert views[last].status == "kept" and views[last].reason == "no verified partner"
    kept = [i for i, v in enumerate(views) if v.status == "kept"]
    for i in kept:
        assert np.array_equal(recon.w2c_opencv[i], recon.input_w2c_opencv[i])
        assert np.array_equal(recon.intrinsics[i], recon.input_intrinsics[i])
    refined = [i for i, v in enumerate(views) if v.status == "refined"]
    assert len(refined) >= 4, [(v.status, v.reason) for v in views]
    before = _relative_errors(recon.input_w2c_opencv[:last], ref, [i for i in refined])
    after = _relative_errors(recon.w2c_opencv[:last], ref, [i for i in refined])
    assert np.median(after) < 0.5 * np.median(before), (np.median(before), np.median(after))
    assert all(v.partners and v.inliers >= 30 for v in (views[i] for i in refined))


# ---------------------------------------------------------------------------------------------- known poses


def _known_model(tmp_path: Path, ref: Reference, views: list[int], w2c: np.ndarray) -> Path:
    from ns_extreme.io.colmap_model import write_colmap_model

    return write_colmap_model(
        tmp_path / "known", [ref.names[i] for i in views], w2c[views], ref.K[views], ref.sizes_wh[views]
    )


def test_known_poses_fixed_stay_bit_identical_and_anchor_the_others(dev_small: Path, tmp_path: Path) -> None:
    ref = load_reference(dev_small / FOUNTAIN)
    known = [0, 4, 8]
    recon = _pose(ref, noisy_reference(ref, seed=11), poses_from=_known_model(tmp_path, ref, known, ref.w2c))
    given = read_colmap_model(tmp_path / "known")
    for i, w2c in zip(known, given.w2c_opencv):
        assert np.array_equal(recon.w2c_opencv[i], w2c)  # bit for bit, as read from the given model
        assert recon.refinement.views[i].reason == "known pose kept (--known-poses fixed)"
    # Placing the model's views by a Sim(3) fitted to three noisy ones leaves some of them > 10° off: the trust
    # region keeps those (bit for bit); the refined ones are where the reference puts them.
    others = [i for i in range(len(ref.paths)) if i not in known and recon.refinement.views[i].status == "refined"]
    assert len(others) >= 5, [(v.status, v.reason) for v in recon.refinement.views]
    for i, view in enumerate(recon.refinement.views):
        if view.status == "kept":
            assert np.array_equal(recon.w2c_opencv[i], recon.input_w2c_opencv[i])
    # The given world is kept: no similarity fit is needed to compare with the reference.
    rot = [rotation_angle_deg(recon.w2c_opencv[i, :3, :3], ref.w2c[i, :3, :3]) for i in others]
    pos = np.linalg.norm(camera_centres(recon.w2c_opencv[others]) - ref.centres[others], axis=1) / ref.extent
    assert max(rot) < 0.15 and pos.max() < 0.01, (rot, pos)


def test_known_poses_prior_are_refined_in_the_given_world(dev_small: Path, tmp_path: Path) -> None:
    ref = load_reference(dev_small / FOUNTAIN)
    known = [0, 3, 6, 9]
    priors = noisy_reference(ref, seed=5, rotation_deg=(1.0, 2.0), position=(0.01, 0.02), focal=(0.0, 0.0))
    recon = _pose(
        ref,
        noisy_reference(ref, seed=11),
        poses_from=_known_model(tmp_path, ref, known, priors.w2c),
        known_poses="prior",
    )
    for i in known:
        assert not np.array_equal(recon.w2c_opencv[i], priors.w2c[i])
        assert recon.refinement.views[i].status == "refined"
    rel = _relative_errors(recon.w2c_opencv, ref)
    assert np.median(rel) < 0.1, np.median(rel)
    # The world is the priors' (their errors average out), not the model's frame 0: no fit needed.
    rot = [rotation_angle_deg(recon.w2c_opencv[i, :3, :3], ref.w2c[i, :3, :3]) for i in range(len(ref.paths))]
    assert max(rot) < 1.5, rot
    centres = camera_centres(recon.w2c_opencv)
    assert np.linalg.norm(centres - ref.centres, axis=1).max() / ref.extent < 0.03


def test_unrelated_photo_keeps_its_given_pose(dev_small: Path, tmp_path: Path) -> None:
    ref = load_reference(dev_small / HERZ_JESUS)
    other = load_reference(dev_small / SACRE)
    paths = ref.paths[:4] + other.paths[:1]
    sub = Reference(ref.scene_dir, ref.names[:4] + other.names[:1], paths, np.concatenate([ref.w2c[:4], ref.w2c[4:5]]),
                    np.concatenate([ref.K[:4], other.K[:1]]),
                    np.concatenate([ref.sizes_wh[:4], other.sizes_wh[:1]]))  # fmt: skip
    given = _known_model(tmp_path, sub, [0, 4], sub.w2c)
    recon = _pose(sub, noisy_reference(sub, seed=2), paths=paths, poses_from=given)
    assert np.array_equal(recon.w2c_opencv[4], read_colmap_model(given).w2c_opencv[1])
    assert recon.refinement.views[4].status == "kept"


# ---------------------------------------------------------------------------------------------- never fatal


def _assert_complete_feed_forward(recon, out: Path, warning: str) -> None:
    assert any(warning in w for w in recon.warnings), recon.warnings
    assert np.array_equal(recon.w2c_opencv, recon.input_w2c_opencv)
    assert not (recon.points_source == 1).any()
    for name in ("transforms.json", "sparse_pc.ply", "extreme_poses.json", "colmap/sparse/0/images.bin"):
        assert (out / name).is_file(), name
    provenance = json.loads((out / "extreme_poses.json").read_text())
    assert provenance["refinement"]["status"] == "failed" and warning in provenance["refinement"]["warning"]


def test_blank_images_end_with_a_warning_and_a_complete_dataset(tmp_path: Path, dev_small: Path) -> None:
    ref = load_reference(dev_small / HERZ_JESUS).subset(range(3))
    blank = tmp_path / "blank"
    blank.mkdir()
    for i, p in enumerate(ref.paths):
        Image.new("RGB", tuple(ref.sizes_wh[i]), (120 + i, 120 + i, 120 + i)).save(blank / p.name)
    blank_ref = Reference(blank, ref.names, [blank / p.name for p in ref.paths], ref.w2c, ref.K, ref.sizes_wh)
    recon = _pose(blank_ref, noisy_reference(blank_ref, seed=1))
    out = write_dataset(recon, tmp_path / "out")
    _assert_complete_feed_forward(recon, out, "no two views with enough verified matches")


def test_single_matched_pair_is_refined(dev_small: Path, tmp_path: Path) -> None:
    ref = load_reference(dev_small / FOUNTAIN).subset([4, 5])
    recon = _pose(ref, noisy_reference(ref, seed=4))
    out = write_dataset(recon, tmp_path / "out")
    assert [v.status for v in recon.refinement.views] == ["refined", "refined"]
    assert _relative_errors(recon.w2c_opencv, ref)[0] < 0.2
    assert (out / "colmap/sparse/0/points3D.bin").is_file()


def test_bundle_adjustment_exception_ends_with_a_warning(dev_small: Path, tmp_path: Path, monkeypatch) -> None:
    import pycolmap

    def broken(*args, **kwargs):
        raise RuntimeError("injected: Ceres failed")

    monkeypatch.setattr(pycolmap, "create_default_bundle_adjuster", broken)
    ref = load_reference(dev_small / HERZ_JESUS).subset(range(3))
    recon = _pose(ref, noisy_reference(ref, seed=1))
    out = write_dataset(recon, tmp_path / "out")
    _assert_complete_feed_forward(recon, out, "refinement failed (injected: Ceres failed)")


def test_pycolmap_unimportable_ends_with_a_warning(dev_small: Path, tmp_path: Path, monkeypatch) -> None:
    ref = load_reference(dev_small / HERZ_JESUS).subset(range(3))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pycolmap", None)  # `import pycolmap` raises ImportError
        recon = _pose(ref, noisy_reference(ref, seed=1))
    out = write_dataset(recon, tmp_path / "out")
    _assert_complete_feed_forward(recon, out, "pycolmap cannot be imported")


def test_no_refine_writes_the_feed_forward_dataset(dev_small: Path, tmp_path: Path) -> None:
    ref = load_reference(dev_small / HERZ_JESUS).subset(range(3))
    noisy = noisy_reference(ref, seed=1)
    recon = _pose(ref, noisy, refinement=RefineOptions(refine=False))
    assert recon.refinement is None and recon.input_w2c_opencv is None
    out = write_dataset(recon, tmp_path / "out")
    provenance = json.loads((out / "extreme_poses.json").read_text())
    assert provenance["refinement"] == {"status": "off"}
    assert "refinement" not in provenance["views"][0]


# ---------------------------------------------------------------------------------------------- outputs


def test_colmap_model_has_tracks_that_reproject(dev_small: Path, tmp_path_factory) -> None:
    import pycolmap

    ref, _, recon, out = _noisy_run(dev_small, tmp_path_factory, FOUNTAIN)
    rec = pycolmap.Reconstruction(str(out / "colmap/sparse/0"))
    tracked = [(i, p) for i, p in rec.points3D.items() if p.track.length() >= 2]
    assert len(tracked) == int((recon.points_source == 1).sum()) > 1000
    errors = []
    for point_id, p in tracked[:2000]:
        for e in p.track.elements:
            image = rec.images[e.image_id]
            uv = image.camera.img_from_cam(image.cam_from_world() * p.xyz)
            errors.append(np.linalg.norm(uv - image.points2D[e.point2D_idx].xy))
            assert image.points2D[e.point2D_idx].point3D_id == point_id
    assert np.median(errors) < 0.5 and np.max(errors) < 6.0
    # Observations sit on real image content: the reference cameras reproject the (aligned) points there too.
    rec.update_point_3d_errors()
    assert rec.compute_mean_reprojection_error() < 1.0


def test_nerfstudio_colmap_parser_reads_refined_dataset(dev_small: Path, tmp_path_factory) -> None:
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    ref, _, recon, out = _noisy_run(dev_small, tmp_path_factory, FOUNTAIN)
    config = ColmapDataParserConfig(
        data=out, colmap_path=Path("colmap/sparse/0"), images_path=Path("images"), orientation_method="none",
        center_method="none", auto_scale_poses=False, scale_factor=1.0, eval_mode="all", load_3D_points=True,
    )  # fmt: skip
    outputs = config.setup().get_dataparser_outputs(split="train")
    assert len(outputs.image_filenames) == len(ref.paths)
    assert outputs.metadata["points3D_xyz"].shape[0] == len(recon.points_xyz)
    fx = np.sort(outputs.cameras.fx[:, 0].double().numpy())
    assert np.allclose(fx, np.sort(recon.intrinsics[:, 0, 0]), rtol=1e-6)


def test_point_cloud_sources_and_provenance(dev_small: Path, tmp_path_factory) -> None:
    ref, noisy, recon, out = _noisy_run(dev_small, tmp_path_factory, FOUNTAIN)
    _, _, properties = read_ply(out / "sparse_pc.ply")
    source = np.asarray(properties["source"])
    assert set(np.unique(source)) == {0, 1}
    assert (source == 1).sum() == len(recon.sfm_points)
    provenance = json.loads((out / "extreme_poses.json").read_text())
    summary = provenance["refinement"]
    assert summary["status"] == "refined" and summary["views_refined"] == len(ref.paths)
    assert summary["median_reproj_px"] < 1.0
    assert set(summary["timings_s"]) == {"features_s", "matching_s", "bundle_adjustment_s"}
    assert summary["pairs"] and all({"i", "j", "inliers", "accepted"} <= set(p) for p in summary["pairs"])
    view = provenance["views"][0]
    assert np.allclose(view["input_w2c_opencv"], recon.input_w2c_opencv[0])
    assert view["refinement"]["status"] == "refined"
    assert view["refinement"]["partners"] and all(p.startswith("images/") for p in view["refinement"]["partners"])
    assert view["refinement"]["reproj_after_px"] < view["refinement"]["reproj_before_px"]
    assert 3.0 <= view["refinement"]["rotation_change_deg"] <= 5.5  # the seeded 3–5° error, taken out


def test_points_sfm_only_and_model_only(dev_small: Path) -> None:
    ref = load_reference(dev_small / HERZ_JESUS).subset(range(4))
    noisy = noisy_reference(ref, seed=9)
    sfm_only = _pose(ref, noisy, refinement=RefineOptions(points="sfm"))
    assert len(sfm_only.points_xyz) > 500 and (sfm_only.points_source == 1).all()
    model_only = _pose(ref, noisy, refinement=RefineOptions(points="3dfm"))
    assert (model_only.points_source == 0).all() and model_only.sfm_points is None
    # Both: the model's points fill in only where SfM observed nothing.
    both = _pose(ref, noisy)
    n_sfm = int((both.points_source == 1).sum())
    assert n_sfm == len(sfm_only.points_xyz)
    assert 0 < int((both.points_source == 0).sum()) < len(model_only.points_xyz)


def test_refinement_stage_loads_and_warns_without_pycolmap() -> None:
    """In a process where pycolmap never loads, the stage module itself still imports and answers with a warning."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        sys.modules["pycolmap"] = None
        import numpy as np
        from ns_extreme.posing.refine import RefineOptions, refine_poses
        w2c = np.tile(np.eye(4)[:3], (2, 1, 1))
        K = np.tile(np.diag([100.0, 100.0, 1.0]), (2, 1, 1))
        sizes = np.array([[64, 48], [64, 48]])
        result = refine_poses(["a.png", "b.png"], w2c, K, sizes, RefineOptions(), progress=False)
        assert np.array_equal(result.w2c_opencv, w2c)
        print(result.status, "|", result.warning)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("failed | refinement skipped: pycolmap cannot be imported")
