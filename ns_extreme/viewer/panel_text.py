"""The words of the "Extreme poses" panel: markdown for the summary, the selected view, the points and the pairs,
and the pose-set names the panel offers. Pure functions of the data (no viser)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ns_extreme.geometry.conventions import camera_centres_from_w2c
from ns_extreme.geometry.rotations import geodesic_angle_deg
from ns_extreme.posing.reconstruction import PairDiagnostic
from ns_extreme.viewer.point_layers import PointLayers
from ns_extreme.viewer.refinement import RefinementSummary, ViewRefinement
from ns_extreme.viewer.scene_data import SceneData

__all__ = [
    "NO_SELECTION",
    "VIEW_PROMPT",
    "pose_set_labels",
    "summary_markdown",
    "view_markdown",
    "points_markdown",
    "pairs_table_markdown",
    "pair_label",
    "pair_markdown",
    "fmt",
]

NO_SELECTION = "(none)"
VIEW_PROMPT = "Click a camera (or pick one above) to see its image and numbers."


def fmt(v: Optional[float], digits: int = 1) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def pose_set_labels(data: SceneData) -> dict[str, str]:
    """Pose set -> its name in the "Poses" dropdown, for the sets this dataset has (final poses first)."""
    final = "aligned"
    if data.has_input_poses:
        refined = any(r is not None and r.status == "refined" for r in data.view_refinement or [])
        failed = data.refinement is not None and data.refinement.status == "failed"
        final = "refined" if refined else "final (refinement failed)" if failed else "final (no view refined)"
    labels = {"aligned": final}
    if data.has_input_poses:
        labels["input"] = "input (before refinement)"
    if data.has_pretrained:
        labels["pretrained"] = "pretrained"
    return labels


def summary_markdown(data: SceneData) -> str:
    sfm = int(data.points_sfm.sum()) if data.has_sfm_points else 0  # type: ignore[union-attr]
    counts = (
        f"{len(data.points_xyz):,} points"
        if not sfm
        else (f"{len(data.points_xyz) - sfm:,} model points + {sfm:,} SfM points")
    )
    parts = [f"**{data.num_views} views**, {counts}, {len(data.pairs):,} pairs"]
    model = data.model
    if model is not None and (model.backbone or model.alignment):
        parts.append(f"model: {model.backbone or '?'}, alignment: {model.alignment or '?'}")
    if model is not None and model.licence:
        parts.append(f"weights licence: {model.licence}")
    if data.refinement is not None and data.refinement.status != "off":  # "off" is what every unrefined run says
        parts.append(_refinement_summary(data.refinement))
    if len(data.poses) > 1:
        parts.append("pose sets: " + " + ".join(pose_set_labels(data).values()))
    else:
        parts.append("pose sets: aligned only (pose with `--compare-pretrained` to compare)")
    return "  \n".join(parts)


def _refinement_summary(r: RefinementSummary) -> str:
    if r.status == "refined":
        text = f"refinement: **{r.views_refined if r.views_refined is not None else '?'} refined**, " \
               f"{r.views_kept if r.views_kept is not None else '?'} kept"  # fmt: skip
        if r.median_reproj_px is not None:
            text += f", median reprojection error {r.median_reproj_px:.2f} px"
    else:
        text = f"refinement: **{r.status}**"
    return text + (f"  \n⚠ {r.warning}" if r.warning else "")


def view_markdown(data: SceneData, i: Optional[int], thumbnail: str, normals: str = "") -> str:
    """The selected view's image (``thumbnail``: a data URL, or "" when unreadable), its normal map (``normals``:
    a data URL, "" when the dataset has none) and numbers."""
    if i is None:
        return VIEW_PROMPT
    w, h = (int(v) for v in data.sizes_wh[i])
    K = data.K[i]
    fovx = math.degrees(2 * math.atan2(w / 2, K[0, 0]))
    fovy = math.degrees(2 * math.atan2(h / 2, K[1, 1]))
    w2c = data.poses["aligned"][i]
    rows = [
        ("file", f"`{data.names[i]}`"),
        ("size", f"{w} × {h} px"),
        ("fx, fy", f"{K[0, 0]:.1f}, {K[1, 1]:.1f}"),
        ("cx, cy", f"{K[0, 2]:.1f}, {K[1, 2]:.1f}"),
        ("FoV x / y", f"{fovx:.1f}° / {fovy:.1f}°"),
    ]
    if data.input_K is not None:
        K_in = data.input_K[i]
        rows.append(("fx, fy before refinement", f"{K_in[0, 0]:.1f}, {K_in[1, 1]:.1f}"))
    if data.confidence is not None:
        c = data.confidence
        finite = c[np.isfinite(c)]
        rank = int(np.sum(finite <= c[i])) if math.isfinite(c[i]) else 0
        rows.append(("confidence", f"{fmt(float(c[i]), 4)} (rank {rank} of {len(finite)})"))
    if data.intrinsics_source is not None and data.intrinsics_source[i]:
        rows.append(("intrinsics", data.intrinsics_source[i]))
    rows.append(("centre (model world)", ", ".join(f"{v + 0.0:.3g}" for v in camera_centres_from_w2c(w2c))))  # no -0
    if data.has_pretrained:
        angle = geodesic_angle_deg(w2c[:3, :3], data.poses["pretrained"][i][:3, :3])
        rows.append((f"{pose_set_labels(data)['aligned']} vs pretrained", f"{angle:.1f}° rotation"))
    refinement = data.view_refinement[i] if data.view_refinement is not None else None
    if refinement is not None:
        rows += _refinement_rows(refinement)
    mine = [p for p in data.pairs if i in (p.i, p.j)]
    if mine:
        counts = {c: sum(p.overlap == c for p in mine) for c in ("large", "small", "none")}
        rows.append(("pairs", ", ".join(f"{k}: {v}" for k, v in counts.items())))
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    img = f"![{data.label(i)}]({thumbnail})\n\n" if thumbnail else ""
    if normals:
        img += f"![normals of {data.label(i)}]({normals})\n\n*normals (camera frame: x red, y green, z blue)*\n\n"
    return f"**{data.label(i)}**\n\n{img}{table}"


def _refinement_rows(r: ViewRefinement) -> list[tuple[str, str]]:
    def count(v: Optional[int]) -> str:
        return "–" if v is None else f"{v:,}"

    def percent(v: Optional[float], sign: str = "") -> str:
        return "–" if v is None else f"{100 * v:{sign}.2f} %"

    return [
        ("refinement", f"**{r.status}**" + (f" ({r.reason})" if r.reason else "")),
        ("matched with", ", ".join(f"`{p}`" for p in r.partners) or "–"),
        ("inliers / tracks", f"{count(r.inliers)} / {count(r.tracks)}"),
        ("reprojection error", f"{fmt(r.reproj_before_px, 2)} px → {fmt(r.reproj_after_px, 2)} px"),
        ("rotation change", f"{fmt(r.rotation_change_deg, 2)}°"),
        ("centre change", f"{percent(r.centre_change)} of the scene extent"),
        ("focal change", percent(r.focal_change, "+")),
    ]


def points_markdown(points: PointLayers) -> str:
    if points.total == 0:
        return "No point cloud in this dataset."
    if points.sfm is None:
        text = f"showing {points.visible:,} of {points.total:,} points"
    else:
        text = (
            f"showing {points.visible_model_points:,} of {len(points.model):,} model points (circles) and "
            f"{points.visible_sfm_points:,} of {len(points.sfm):,} SfM points (diamonds)"
        )
    if not points.filterable:
        text += "  \n(no per-point confidence in sparse_pc.ply: the percentile filter is off)"
    elif points.percentile > 0:
        text += f" (confidence ≥ {points.percentile:g}th percentile"
        text += ")" if points.sfm is None else " of the model points; SfM points are not filtered)"
    return text


def pair_label(data: SceneData, p: PairDiagnostic) -> str:
    return f"{data.label(p.i)} ↔ {data.label(p.j)}  {fmt(p.angle_deg)}° {p.overlap}"


def pairs_table_markdown(data: SceneData, rows: list[int], matching: int, max_rows: int) -> str:
    """The table of ``rows`` (indices into ``data.pairs``) out of ``matching`` pairs that pass the filter."""
    if not data.pairs:
        return "No pair diagnostics in this dataset (extreme_poses.json `pairs`)."
    head = "| views | angle° | overlap | pretrained° | Δ models° |\n|---|---|---|---|---|\n"
    body = "\n".join(
        f"| {data.label(p.i)}–{data.label(p.j)} | {fmt(p.angle_deg)} | {p.overlap} | "
        f"{fmt(p.pretrained_angle_deg)} | {fmt(p.model_disagreement_deg)} |"
        for p in (data.pairs[k] for k in rows)
    )
    counts = {c: sum(p.overlap == c for p in data.pairs) for c in ("large", "small", "none")}
    note = f"{matching:,} pairs shown" if matching <= max_rows else f"first {max_rows} of {matching:,} pairs"
    return (
        f"{note}; all: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "  \n"
        "angle = aligned model's relative rotation; Δ models = angle between the two models' estimates\n\n"
        + head
        + body
    )


def pair_markdown(data: SceneData, k: int) -> str:
    p = data.pairs[k]
    text = (
        f"**{data.label(p.i)} ↔ {data.label(p.j)}**: aligned {fmt(p.angle_deg)}°, "
        f"pretrained {fmt(p.pretrained_angle_deg)}°, Δ models {fmt(p.model_disagreement_deg)}°, "
        f"overlap **{p.overlap}**"
    )
    matched = data.refinement.pair(p.i, p.j) if data.refinement is not None else None
    if matched is not None:
        inliers = "–" if matched.inliers is None else f"{matched.inliers:,}"
        text += (
            f"  \nfeature matches: {inliers} inliers, "
            f"rotation disagreement {fmt(matched.rotation_disagreement_deg)}°, "
            + ("used by the refinement" if matched.accepted else "rejected by the refinement")
        )
    return text
