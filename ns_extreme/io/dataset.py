"""Write a Reconstruction as a nerfstudio dataset that COLMAP-reading trainers can use too.

Layout (product spec 2.1): images/, transforms.json (original resolution, OpenGL camera-to-world), sparse_pc.ply (x y z
red green blue confidence), depth/ (optional), normals/ (models with a normal head), splats.ply (3DGS, when given),
colmap/sparse/0/, extreme_poses.json. Everything is staged in a hidden
sibling folder and published by one rename, so a failed or interrupted run leaves nothing half-written.

World frames: colmap/ and extreme_poses.json use the reconstruction's world (the model's frame 0 with
OpenCV axes, or the --poses-from world). transforms.json and sparse_pc.ply are that world mapped by
``applied_transform``, exactly like ``ns-process-data`` does for COLMAP input (y-down -> z-up), except for
--poses-from transforms.json, whose world is kept as is.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from PIL import Image

import ns_extreme
from ns_extreme.io.atomic import atomic_write_json, staged_output_dir
from ns_extreme.io.colmap_model import write_colmap_model
from ns_extreme.io.depth import write_depth_npy, write_depth_png_mm
from ns_extreme.io.gaussian_ply import write_gaussian_ply
from ns_extreme.io.images import PreprocessRecord, load_rgb
from ns_extreme.io.layout import EXIF_ORIENTATION, copy_colmap_model, reencode_with_exif, write_downscaled_images
from ns_extreme.io.masks import write_mask_png
from ns_extreme.io.normals import write_normals_png
from ns_extreme.io.ply import write_ply
from ns_extreme.io.sfm_points import POINT_SOURCE_SFM
from ns_extreme.io.transforms_json import apply_world_transform, write_transforms_json

COLMAP_TO_NERFSTUDIO = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0]])
"""nerfstudio's applied_transform for COLMAP worlds: (x, y, z) -> (x, z, -y)."""

DepthFormat = Literal["png", "npy", "none"]


def depth_at_original_resolution(depth_pre: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Nearest-neighbour resample of a preprocessed depth map onto the original pixel grid (0 = not seen,
    e.g. rows removed by the crop).

    The preprocessing map is a per-axis scale + shift, so columns and rows are looked up separately: memory is
    the output plus O(H + W) (a 100 MP photo needs 400 MB, not the ~10 GB of a full pixel-coordinate grid).
    """
    H, W = record.original_hw
    # Same arithmetic as PreprocessRecord.points_to_preprocessed on pixel centres (j + 0.5, i + 0.5).
    u = record.points_to_preprocessed(np.stack([np.arange(W) + 0.5, np.full(W, 0.5)], axis=-1))[:, 0]
    v = record.points_to_preprocessed(np.stack([np.full(H, 0.5), np.arange(H) + 0.5], axis=-1))[:, 1]
    col = np.floor(u).astype(np.int64)
    row = np.floor(v).astype(np.int64)
    x0, y0, x1, y1 = record.valid_region_preprocessed()
    cols_in = (col >= x0) & (col < x1)
    rows_in = (row >= y0) & (row < y1)
    out = np.zeros((H, W), dtype=np.float32)
    if cols_in.any() and rows_in.any():
        out[np.ix_(rows_in, cols_in)] = depth_pre[np.ix_(row[rows_in], col[cols_in])]
    return out


def point_properties(
    points_conf: np.ndarray, num_points: int, points_source: Optional[np.ndarray] = None
) -> dict[str, np.ndarray]:
    """The per-point properties written after x y z red green blue in sparse_pc.ply: ``confidence`` (float32,
    the model's depth confidence of the pixel each point came from; higher = more reliable, model-specific
    scale) and ``source`` (uint8: 0 = the model's depth, 1 = an SfM point triangulated from feature tracks).
    Readers that only know nerfstudio's six properties (open3d, plyfile) skip them."""
    conf = np.asarray(points_conf, dtype=np.float32)
    if conf.shape != (num_points,):
        raise ValueError(f"points_conf must have shape [{num_points}] like points_xyz, got {conf.shape}")
    source = np.zeros(num_points, np.uint8) if points_source is None else np.asarray(points_source, dtype=np.uint8)
    if source.shape != (num_points,):
        raise ValueError(f"points_source must have shape [{num_points}] like points_xyz, got {source.shape}")
    return {"confidence": conf, "source": source}


def _write_splats(path: Path, splats: Any, applied: np.ndarray) -> None:
    """Gaussians of the reconstruction's world into the saved world ``applied`` (rigid): centres and rotations."""
    from scipy.spatial.transform import Rotation

    quats = splats.quats_wxyz
    if len(quats):
        rotated = Rotation.from_matrix(applied[:, :3]) * Rotation.from_quat(quats, scalar_first=True)
        quats = rotated.as_quat(scalar_first=True, canonical=True)
    write_gaussian_ply(
        path, apply_world_transform(applied, splats.means), quats, splats.scales, splats.opacity, splats.f_dc
    )


def _view_refinement(recon, i: int, image_files: list[str]) -> dict[str, Any]:
    """Per-view fields of the refinement stage (none when it did not run)."""
    if recon.refinement is None:
        return {}
    view = dict(vars(recon.refinement.views[i]))
    view["partners"] = [image_files[j] for j in view["partners"]]
    return {
        "input_w2c_opencv": recon.input_w2c_opencv[i].tolist(),
        "input_K": recon.input_intrinsics[i].tolist(),
        "refinement": view,
    }


def _needs_reencoding(path: Path) -> bool:
    """nerfstudio reads images with plain PIL: re-encode what it would read differently from our loader."""
    try:
        with Image.open(path) as img:
            rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (None, 1)
            return rotated or img.mode not in ("RGB", "L") or img.format not in ("JPEG", "PNG")
    except OSError:
        return True


def _export_image(src: Path, images_dir: Path, used_stems: set[str]) -> str:
    """Copy (or re-encode as PNG) ``src`` into ``images_dir`` under a name whose stem no other exported image
    has (depth maps are named by the stem: ``a.jpg`` and a re-encoded ``a.tif`` must not collide)."""
    reencode = _needs_reencoding(src)
    suffix = ".png" if reencode else src.suffix
    stem = src.stem
    if stem.casefold() in used_stems:
        base = f"{src.stem}_{src.suffix.lstrip('.').lower() or 'img'}"
        stem, k = base, 1
        while stem.casefold() in used_stems:
            k += 1
            stem = f"{base}{k}"
    used_stems.add(stem.casefold())
    name = f"{stem}{suffix}"
    if reencode:
        reencode_with_exif(src, Image.fromarray(load_rgb(src)), images_dir / name)
    else:
        shutil.copy2(src, images_dir / name)
    return f"images/{name}"


def _unique_names(paths: list[Path]) -> None:
    names = [p.name for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"images with the same file name cannot share one dataset: {duplicates[:5]}")


def _provenance(recon, applied: np.ndarray, extra: Optional[dict[str, Any]], image_files: list[str]) -> dict[str, Any]:
    return {
        "ns_extreme_version": ns_extreme.__version__,
        **recon.provenance,
        **(extra or {}),
        "world": {
            "source": recon.world_source,
            "convention": (
                "colmap/ and the poses below: world-to-camera, OpenCV axes; transforms.json: applied_transform @ world"
            ),
            "applied_transform": applied.tolist(),
        },
        "views": [
            {
                "file": image_files[i],
                "source": str(recon.image_paths[i]),
                "width": int(recon.sizes_wh[i, 0]),
                "height": int(recon.sizes_wh[i, 1]),
                "intrinsics_source": recon.intrinsics_source[i],
                **_view_refinement(recon, i, image_files),
                "confidence": float(recon.view_confidence[i]),
                "w2c_opencv": recon.w2c_opencv[i].tolist(),
                "K": recon.intrinsics[i].tolist(),
                **(
                    {"pretrained_w2c_opencv": recon.pretrained_w2c_opencv[i].tolist()}
                    if recon.pretrained_w2c_opencv is not None
                    else {}
                ),
                "preprocess": {
                    "mode": recon.records[i].mode,
                    "resized_hw": list(recon.records[i].resized_hw),
                    "crop_offset_xy": list(recon.records[i].crop_offset_xy),
                    "pad_offset_xy": list(recon.records[i].pad_offset_xy),
                    "final_hw": list(recon.records[i].final_hw),
                },
            }
            for i in range(recon.num_views)
        ],
        "warnings": recon.warnings,
        "pairs": [vars(p) for p in recon.pairs],
        "chunk_joins": recon.chunk_residuals,
        "refinement": recon.refinement.summary() if recon.refinement is not None else {"status": "off"},
        "points": {
            "count": int(len(recon.points_xyz)),
            "mean_confidence": float(recon.points_conf.mean()) if len(recon.points_conf) else None,
        },
        "timings_s": recon.timings,
    }


def write_dataset(
    recon,
    output_dir: str | Path,
    overwrite: bool = False,
    depth_format: DepthFormat = "png",
    extra_provenance: Optional[dict[str, Any]] = None,
    num_downscales: int = 3,
    splats: Optional[Any] = None,
    normals: bool = True,
) -> Path:
    """Write ``recon`` (a ns_extreme.posing.Reconstruction) to ``output_dir``; returns the folder.

    ``num_downscales``: images_2 ... images_(2**n) copies (nerfstudio's ``--num-downscales``; 0 = none).
    ``normals``: write ``recon.normals`` (if any) to normals/ as PNG (``ns_extreme.io.normals``). ``splats``
    (``ns_extreme.posing.splats.Splats`` in the reconstruction's world): written to splats.ply, a 3DGS PLY in the
    world of transforms.json and sparse_pc.ply."""
    if num_downscales < 0:
        raise ValueError(f"--num-downscales must be 0 or more, got {num_downscales}")
    _unique_names(recon.image_paths)
    if depth_format not in ("png", "npy", "none"):
        raise ValueError(f"depth format must be png, npy or none, got {depth_format!r}")
    applied = np.eye(4)[:3] if recon.world_source == "transforms" else COLMAP_TO_NERFSTUDIO
    final = Path(output_dir)
    with staged_output_dir(final, overwrite=overwrite) as out:
        (out / "images").mkdir()
        used_stems: set[str] = set()
        image_files = [_export_image(p, out / "images", used_stems) for p in recon.image_paths]
        write_downscaled_images(out, image_files, num_downscales)
        mask_files = None
        if recon.masks is not None:
            (out / "masks").mkdir()
            mask_files = [f"masks/{Path(rel).stem}.png" for rel in image_files]
            for mask, name in zip(recon.masks, mask_files):
                write_mask_png(out / name, mask)
        depth_files = None
        if depth_format != "none":
            (out / "depth").mkdir()
            depth_files = []
            for i, rel in enumerate(image_files):
                depth = depth_at_original_resolution(recon.depth[i], recon.records[i])
                if recon.masks is not None:
                    depth[~recon.masks[i]] = 0.0
                name = f"depth/{Path(rel).stem}.{depth_format}"
                (write_depth_png_mm if depth_format == "png" else write_depth_npy)(out / name, depth)
                depth_files.append(name)
        normal_files = None
        if normals and recon.normals is not None:
            (out / "normals").mkdir()
            normal_files = []
            for i, rel in enumerate(image_files):
                n = np.stack(
                    [depth_at_original_resolution(recon.normals[i][..., c], recon.records[i]) for c in range(3)], -1
                )
                if recon.masks is not None:
                    n[~recon.masks[i]] = 0.0
                name = f"normals/{Path(rel).stem}.png"
                write_normals_png(out / name, n)
                normal_files.append(name)
        if splats is not None:
            _write_splats(out / "splats.ply", splats, applied)
        write_ply(
            out / "sparse_pc.ply",
            apply_world_transform(applied, recon.points_xyz),
            recon.points_rgb,
            extra=point_properties(recon.points_conf, len(recon.points_xyz), recon.points_source),
        )
        write_transforms_json(
            out / "transforms.json",
            image_files,
            recon.w2c_opencv,
            recon.intrinsics,
            recon.sizes_wh,
            applied_transform=applied,
            ply_file_path="sparse_pc.ply",
            depth_paths_rel=depth_files,
            mask_paths_rel=mask_files,
            extra={"ns_extreme": "extreme_poses.json"},
            normal_paths_rel=normal_files,
        )
        # SfM points go in with their tracks; the model's points, which have none, after them.
        model_points = recon.points_source != POINT_SOURCE_SFM
        write_colmap_model(
            out / "colmap" / "sparse" / "0",
            [Path(f).name for f in image_files],
            recon.w2c_opencv,
            recon.intrinsics,
            recon.sizes_wh,
            recon.points_xyz[model_points],
            recon.points_rgb[model_points],
            sfm_points=recon.sfm_points,
        )
        copy_colmap_model(out / "colmap" / "sparse" / "0", out)
        outputs = {
            "normals": {"files": normal_files, "frame": "camera, OpenCV axes", "encoding": "rgb = (n + 1) / 2 * 255"}
            if normal_files
            else None,
            "splats": {"file": "splats.ply", "count": len(splats)} if splats is not None else None,
        }
        provenance = _provenance(recon, applied, extra_provenance, image_files)
        provenance["outputs"] = {k: v for k, v in outputs.items() if v is not None}
        atomic_write_json(out / "extreme_poses.json", provenance)
    return final
