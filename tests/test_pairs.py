"""Pair lists: mining on real Strecha scenes, labels, JSON round trip / validation, paper .npy import."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ns_extreme.align.pairs import (
    PairFileError,
    PairList,
    PairRecord,
    PairView,
    candidate_pairs,
    check_relative_path,
    import_unscene_pairs,
    mine_pairs,
    scan_megaunscene,
    views_from_colmap,
    views_from_transforms,
)

CASTLE = "strecha_castle-P19_odd9"
FOUNTAIN = "strecha_fountain-P11"


def parse_images_txt(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent reader of COLMAP images.txt: name → (qvec wxyz, tvec)."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        p = line.split()
        if len(p) == 10:
            out[p[9]] = (np.array(p[1:5], dtype=float), np.array(p[5:8], dtype=float))
    return out


def rot_wxyz(q: np.ndarray) -> np.ndarray:
    return Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()


def scene_views(dev_small: Path, scene: str) -> list[PairView]:
    return views_from_colmap(dev_small / scene / "sparse" / "0", dev_small / scene / "images")


def by_names(records: list[PairRecord]) -> dict[tuple[str, str], PairRecord]:
    return {(r.view1.path, r.view2.path): r for r in records}


# ------------------------------------------------------------------------------------------------ real scenes


def test_castle_all_pairs_angles_and_labels(dev_small):
    po = json.loads((dev_small / CASTLE / "pair_overlap.json").read_text())
    views = scene_views(dev_small, CASTLE)
    assert [v.path for v in views] == po["names"]
    records = mine_pairs(views, "castle", strategy="all", balance=False)
    assert len(records) == 36  # 9 choose 2, unordered, unique
    idx = {n: i for i, n in enumerate(po["names"])}
    for r in records:
        i, j = idx[r.view1.path], idx[r.view2.path]
        assert i < j
        assert r.scene == "castle" and r.overlap_reference is None
        assert abs(r.rel_angle_deg - po["rel_rot_deg"][i][j]) <= 0.01, (r.view1.path, r.view2.path)

    # Every pair that shares no verified match and faces > 90° apart is labelled none (10 such pairs).
    no_match_far = [
        r
        for r in records
        if po["gt_consistent_matches"][idx[r.view1.path]][idx[r.view2.path]] == 0 and r.rel_angle_deg > 90
    ]
    assert len(no_match_far) == 10
    assert {r.overlap for r in no_match_far} == {"none"}

    # Real counts under the rule: castle images have fovx 58.20°, fovy 40.65°. The views ring a courtyard
    # and neighbours are 24–42° apart, so only the two pairs with yaw < 29.1° (0001/0003 at 23.9°,
    # 0005/0007 at 25.2°) are large; the other 5 neighbour pairs (yaw 32–41°) and 0011/0013 are small;
    # every pair with |yaw| > 58.2° (the rule is purely angular) is none: 27 of 36.
    assert Counter(r.overlap for r in records) == {"none": 27, "small": 7, "large": 2}
    pairs = by_names(records)
    assert pairs[("0001.jpg", "0003.jpg")].overlap == "large"
    assert pairs[("0005.jpg", "0007.jpg")].overlap == "large"
    # 0003/0007: 276 verified matches, yet yaw 58.8° > 58.2° → none (co-visibility is not part of the rule)
    assert po["gt_consistent_matches"][1][3] == 276
    assert pairs[("0003.jpg", "0007.jpg")].overlap == "none"
    # 0001/0005: yaw 57.4° < 58.2° → small, although 58.9° apart in total
    assert pairs[("0001.jpg", "0005.jpg")].overlap == "small"


def test_transforms_json_gives_same_pairs_as_colmap(dev_small):
    from_colmap = mine_pairs(scene_views(dev_small, CASTLE), "castle", strategy="all", balance=False)
    from_tj = mine_pairs(
        views_from_transforms(dev_small / CASTLE / "transforms.json"), "castle", strategy="all", balance=False
    )
    assert [r.view1.path for r in from_tj][:2] == ["images/0001.jpg", "images/0001.jpg"]
    assert len(from_tj) == len(from_colmap)
    for a, b in zip(from_colmap, from_tj):
        assert "images/" + a.view1.path == b.view1.path and "images/" + a.view2.path == b.view2.path
        assert b.rel_angle_deg == pytest.approx(a.rel_angle_deg, abs=1e-3)
        assert b.overlap == a.overlap


def _hand_knn_pairs(dist: np.ndarray, k: int, mutual: bool = False) -> set[tuple[int, int]]:
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    nn = {i: set(np.argsort(d[i])[:k].tolist()) for i in range(len(d))}
    return {(min(i, j), max(i, j)) for i in nn for j in nn[i] if not mutual or i in nn[j]}


def test_knn_mining_on_fountain(dev_small):
    views = scene_views(dev_small, FOUNTAIN)
    gt = parse_images_txt(dev_small / FOUNTAIN / "sparse" / "0" / "images.txt")
    names = [v.path for v in views]
    R = np.stack([rot_wxyz(gt[n][0]) for n in names])
    t = np.stack([gt[n][1] for n in names])
    centres = -np.einsum("nji,nj->ni", R, t)  # C = −Rᵀt
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    expected = _hand_knn_pairs(dist, 2)
    # the 11 fountain cameras lie on an arc: each view's 2 nearest are its neighbours along the arc
    chain = {(i, i + 1) for i in range(10)}
    assert expected == chain | {(0, 2), (8, 10)}
    assert set(candidate_pairs(views, "knn-center", k=2)) == expected

    records = mine_pairs(views, "fountain", strategy="knn-center", k=2, balance=False)
    assert {(names.index(r.view1.path), names.index(r.view2.path)) for r in records} == expected
    assert len(records) == len(expected)  # unique unordered pairs
    mutual = _hand_knn_pairs(dist, 2, mutual=True)
    assert set(candidate_pairs(views, "knn-center", k=2, mutual=True)) == mutual
    assert mutual < expected

    axes = R[:, 2, :]  # optical axes in world coordinates
    angle = np.degrees(np.arccos(np.clip(axes @ axes.T, -1, 1)))
    assert set(candidate_pairs(views, "knn-direction", k=2)) == _hand_knn_pairs(angle, 2)
    # k beyond n-1 is every pair
    assert len(candidate_pairs(views, "knn-direction", k=50)) == 55
    with pytest.raises(ValueError):
        candidate_pairs(views, "nearest", k=2)  # type: ignore[arg-type]


def test_castle_knn_center_is_the_courtyard_ring(dev_small):
    views = scene_views(dev_small, CASTLE)
    ring = {(i, i + 1) for i in range(8)} | {(0, 8)}
    assert set(candidate_pairs(views, "knn-center", k=2)) == ring


def test_balance_and_max_pairs_deterministic(dev_small):
    views = scene_views(dev_small, CASTLE)  # all pairs: 27 none, 7 small, 2 large
    a = mine_pairs(views, "castle", strategy="all", balance=True, seed=0)
    b = mine_pairs(views, "castle", strategy="all", balance=True, seed=0)
    assert a == b
    assert Counter(r.overlap for r in a) == {"large": 2, "small": 2, "none": 2}
    others = [mine_pairs(views, "castle", strategy="all", balance=True, seed=s) for s in range(1, 6)]
    assert any(o != a for o in others)  # the seed drives which small/none pairs are kept
    # output keeps candidate (view index) order
    order = [(r.view1.path, r.view2.path) for r in a]
    assert order == sorted(order)

    capped = mine_pairs(views, "castle", strategy="all", balance=True, max_pairs=4, seed=3)
    assert Counter(r.overlap for r in capped) == {"large": 2, "small": 1, "none": 1}
    assert capped == mine_pairs(views, "castle", strategy="all", balance=True, max_pairs=4, seed=3)
    five = mine_pairs(views, "castle", strategy="all", balance=True, max_pairs=5)
    assert Counter(r.overlap for r in five) == {"large": 2, "small": 2, "none": 1}

    unbalanced = mine_pairs(views, "castle", strategy="all", balance=False, max_pairs=5, seed=1)
    assert len(unbalanced) == 5
    assert unbalanced == mine_pairs(views, "castle", strategy="all", balance=False, max_pairs=5, seed=1)
    assert len(mine_pairs(views, "castle", strategy="all", balance=False, max_pairs=100)) == 36

    # fountain: 21 large, 17 small, 17 none → 17 each
    fountain = mine_pairs(scene_views(dev_small, FOUNTAIN), "fountain", strategy="all", balance=True)
    assert Counter(r.overlap for r in fountain) == {"large": 17, "small": 17, "none": 17}


def test_scan_megaunscene(tmp_path, dev_small):
    root = tmp_path / "megaunscene"
    castle = root / "scenes" / "Castle" / "0"
    shutil.copytree(dev_small / CASTLE / "sparse" / "0", castle / "sparse" / "0")
    (castle / "images").mkdir()
    fountain = root / "scenes" / "Fountain" / "3"
    shutil.copytree(dev_small / FOUNTAIN / "sparse" / "0", fountain / "sparse")  # model directly in sparse/
    (root / "scenes" / "Fountain" / "7" / "images").mkdir(parents=True)  # no model: skipped
    found = scan_megaunscene(root)
    assert [(s.scene, s.recon, len(s.views)) for s in found] == [("Castle", "0", 9), ("Fountain", "3", 11)]
    assert found[0].views[0].path == "scenes/Castle/0/images/0001.jpg"
    records = mine_pairs(found[0].views, found[0].scene, strategy="all", balance=False)
    PairList(root=str(root), records=records).save_json(tmp_path / "pairs.json")
    loaded = PairList.load_json(tmp_path / "pairs.json")
    assert loaded.image_path(loaded.records[0].view1) == castle / "images" / "0001.jpg"
    with pytest.raises(FileNotFoundError):
        scan_megaunscene(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------ pair JSON


def _small_list(dev_small: Path) -> PairList:
    views = scene_views(dev_small, CASTLE)
    records = mine_pairs(views, "castle", strategy="knn-center", k=2, balance=False)
    records[0] = dataclasses.replace(records[0], overlap_reference="small", rel_translation=(0.1, -2.0, 3.5))
    return PairList(root="data/castle", records=records)


def test_pair_json_round_trip(tmp_path, dev_small):
    pl = _small_list(dev_small)
    path = tmp_path / "out" / "pairs.json"
    pl.save_json(path)
    assert [p.name for p in path.parent.iterdir()] == ["pairs.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["format"] == "ns_extreme.pairs" and data["num_pairs"] == 9
    labels = Counter(r.overlap for r in pl.records)
    assert data["counts"] == {c: labels[c] for c in ("large", "small", "none")}
    loaded = PairList.load_json(path)
    assert loaded == pl
    assert loaded.records[0].overlap_reference == "small"
    assert loaded.records[0].rel_translation == (0.1, -2.0, 3.5)
    np.testing.assert_allclose(loaded.gt_relative_rotations(), pl.gt_relative_rotations(), atol=1e-12)
    # the stored quaternion reproduces the COLMAP rotation
    gt = parse_images_txt(dev_small / CASTLE / "sparse" / "0" / "images.txt")
    v = loaded.records[0].view1
    np.testing.assert_allclose(v.rotation(), rot_wxyz(gt[v.path][0]), atol=1e-9)
    np.testing.assert_allclose(v.tvec, gt[v.path][1], atol=1e-9)


def _corrupt(tmp_path: Path, dev_small: Path, edit) -> Path:
    path = tmp_path / "pairs.json"
    _small_list(dev_small).save_json(path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_missing_field_is_named(tmp_path, dev_small):
    path = _corrupt(tmp_path, dev_small, lambda d: d["pairs"][2]["view2"].pop("fx"))
    with pytest.raises(PairFileError) as exc:
        PairList.load_json(path)
    assert exc.value.field == "view2.fx" and exc.value.index == 2
    assert str(path) in str(exc.value) and "pair 2" in str(exc.value) and "view2.fx" in str(exc.value)

    path = _corrupt(tmp_path, dev_small, lambda d: d["pairs"][0].pop("overlap"))
    with pytest.raises(PairFileError, match="pair 0: field 'overlap'"):
        PairList.load_json(path)
    path = _corrupt(tmp_path, dev_small, lambda d: d.pop("root"))
    with pytest.raises(PairFileError, match="field 'root'"):
        PairList.load_json(path)


@pytest.mark.parametrize(
    "bad_path",
    ["../outside.jpg", "images/../../outside.jpg", "/etc/passwd", "C:\\images\\a.jpg", "..\\..\\a.jpg", ""],
)
def test_paths_escaping_root_are_rejected(tmp_path, dev_small, bad_path):
    path = _corrupt(tmp_path, dev_small, lambda d: d["pairs"][4]["view1"].__setitem__("path", bad_path))
    with pytest.raises(PairFileError) as exc:
        PairList.load_json(path)
    assert exc.value.field == "view1.path" and exc.value.index == 4


def test_other_corruptions(tmp_path, dev_small):
    # a '..' that stays inside the root is fine
    assert check_relative_path("images/sub/../0001.jpg") == "images/sub/../0001.jpg"
    cases = {
        "overlap": lambda d: d["pairs"][1].__setitem__("overlap", "medium"),
        "view1.qvec_wxyz": lambda d: d["pairs"][1]["view1"].__setitem__("qvec_wxyz", [1, 2]),
        "view1.width": lambda d: d["pairs"][1]["view1"].__setitem__("width", -5),
        "view2.cx": lambda d: d["pairs"][1]["view2"].__setitem__("cx", "abc"),
        "rel_angle_deg": lambda d: d["pairs"][1].__setitem__("rel_angle_deg", 270.0),
    }
    for field, edit in cases.items():
        with pytest.raises(PairFileError) as exc:
            PairList.load_json(_corrupt(tmp_path, dev_small, edit))
        assert exc.value.field == field and exc.value.index == 1
    bad = tmp_path / "broken.json"
    bad.write_text('{"root": "x", "pairs": [')
    with pytest.raises(PairFileError, match="invalid JSON"):
        PairList.load_json(bad)
    with pytest.raises(PairFileError, match="cannot read"):
        PairList.load_json(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------ .npy import


def _unscene_entry(gt, n1: str, n2: str, label: str, with_c: bool = True) -> dict:
    def img(name: str) -> dict:
        q, _ = gt[name]
        d = {
            "path": f"scenes/Castle/0/images/{name}",
            "qw": q[0],
            "qx": q[1],
            "qy": q[2],
            "qz": q[3],
            "fx": 689.87,
            "fy": 691.04,
            "width": 768,
            "height": 512,
        }
        if with_c:
            d.update(cx=380.1725, cy=251.7025)
        return d

    return {
        "img1": img(n1),
        "img2": img(n2),
        "overlap_amount": label,
        "scene": "Castle",
        "t_x": 0.5,
        "t_y": -0.1,
        "t_z": 0.2,
    }


def test_import_unscene_pairs(tmp_path, dev_small):
    gt = parse_images_txt(dev_small / CASTLE / "sparse" / "0" / "images.txt")
    pairs = {
        0: _unscene_entry(gt, "0001.jpg", "0003.jpg", "small"),  # our rule: large (yaw 23.9°)
        1: _unscene_entry(gt, "0001.jpg", "0017.jpg", "none"),  # yaw −67.5° → none
        2: _unscene_entry(gt, "0005.jpg", "0015.jpg", "none", with_c=False),
    }
    path = tmp_path / "UnScenePairs.npy"
    np.save(path, pairs, allow_pickle=True)

    with pytest.raises(PairFileError, match="--allow-pickle") as exc:
        import_unscene_pairs(path, allow_pickle=False)
    assert "arbitrary code" in str(exc.value)

    pl = import_unscene_pairs(path, allow_pickle=True, root="/data/megaunscene")
    assert pl.root == "/data/megaunscene" and len(pl) == 3
    r0, r1, r2 = pl.records
    assert (r0.overlap, r0.overlap_reference) == ("large", "small")
    assert (r1.overlap, r1.overlap_reference) == ("none", "none")
    assert r2.overlap == "none"
    po = json.loads((dev_small / CASTLE / "pair_overlap.json").read_text())
    assert r0.rel_angle_deg == pytest.approx(po["rel_rot_deg"][0][1], abs=0.01)
    assert r1.rel_angle_deg == pytest.approx(po["rel_rot_deg"][0][8], abs=0.01)
    assert r2.rel_angle_deg == pytest.approx(po["rel_rot_deg"][2][7], abs=0.01)
    assert (r2.view1.cx, r2.view1.cy) == (384.0, 256.0)  # missing cx/cy → image centre
    assert (r0.view1.cx, r0.view1.cy) == (380.1725, 251.7025)
    assert r0.rel_translation == (0.5, -0.1, 0.2) and r0.view1.tvec is None
    assert r0.view1.path == "scenes/Castle/0/images/0001.jpg" and r0.scene == "Castle"
    # the imported list saves and loads as a normal pair list
    pl.save_json(tmp_path / "pairs.json")
    assert PairList.load_json(tmp_path / "pairs.json") == pl


def test_import_unscene_pairs_validation(tmp_path, dev_small):
    gt = parse_images_txt(dev_small / CASTLE / "sparse" / "0" / "images.txt")
    entry = _unscene_entry(gt, "0001.jpg", "0003.jpg", "small")
    del entry["img2"]["fx"]
    path = tmp_path / "bad.npy"
    np.save(path, {0: _unscene_entry(gt, "0001.jpg", "0003.jpg", "large"), 1: entry}, allow_pickle=True)
    with pytest.raises(PairFileError) as exc:
        import_unscene_pairs(path, allow_pickle=True)
    assert exc.value.field == "img2.fx" and exc.value.index == 1 and str(path) in str(exc.value)

    escaping = _unscene_entry(gt, "0001.jpg", "0003.jpg", "large")
    escaping["img1"]["path"] = "../../home/user/x.jpg"
    np.save(path, {0: escaping}, allow_pickle=True)
    with pytest.raises(PairFileError, match="img1.path"):
        import_unscene_pairs(path, allow_pickle=True)

    np.save(path, np.arange(3))
    with pytest.raises(PairFileError, match="dict"):
        import_unscene_pairs(path, allow_pickle=True)


def test_view_helpers_match_colmap(dev_small):
    views = scene_views(dev_small, CASTLE)
    gt = parse_images_txt(dev_small / CASTLE / "sparse" / "0" / "images.txt")
    v = views[4]
    q, t = gt[v.path]
    R = rot_wxyz(q)
    np.testing.assert_allclose(v.center(), -R.T @ t, atol=1e-9)
    np.testing.assert_allclose(v.viewing_direction(), R.T @ np.array([0.0, 0.0, 1.0]), atol=1e-12)
    assert v.fov_xy_deg()[0] == pytest.approx(math.degrees(2 * math.atan(384 / 689.87)))
    assert v.qvec_wxyz[0] >= 0


def test_symlinked_folders_inside_the_root_are_followed(tmp_path, dev_small):
    """The root check is on the path as written: a dataset folder linked into the root (the usual way to keep
    big collections on another disk) is read, while '..' in the same list is refused."""
    from ns_extreme.align.data import PairDataset

    root = tmp_path / "root"
    root.mkdir()
    (root / "castle").symlink_to(dev_small / CASTLE / "images", target_is_directory=True)
    records = mine_pairs(scene_views(dev_small, CASTLE), "castle", strategy="knn-center", k=1, balance=False)[:2]
    linked = [dataclasses.replace(r, view1=dataclasses.replace(r.view1, path="castle/" + Path(r.view1.path).name),
                                  view2=dataclasses.replace(r.view2, path="castle/" + Path(r.view2.path).name))
              for r in records]  # fmt: skip
    PairList(root=str(root), records=linked).save_json(tmp_path / "pairs.json")
    pairs = PairList.load_json(tmp_path / "pairs.json")
    item = PairDataset(pairs, root, image_size=56)[0]
    assert item["images"].shape[:2] == (2, 3) and float(item["images"].std()) > 0.05  # real pixels were read
    np.testing.assert_allclose(
        item["R_gt"].numpy(), np.stack([linked[0].view1.rotation(), linked[0].view2.rotation()]), atol=1e-12
    )

    escaping = json.loads((tmp_path / "pairs.json").read_text())
    escaping["pairs"][1]["view2"]["path"] = "castle/../../outside.jpg"
    (tmp_path / "escaping.json").write_text(json.dumps(escaping))
    with pytest.raises(PairFileError, match="escapes"):
        PairList.load_json(tmp_path / "escaping.json")
