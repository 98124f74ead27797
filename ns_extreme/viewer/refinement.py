"""The bundle-adjustment refinement record of extreme_poses.json, as the viewer reads it.

Per view (``views[i].refinement``) and for the whole run (top-level ``refinement``); both are absent in
datasets posed without the refinement stage. Malformed values read as None (see ``json_values``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ns_extreme.viewer.json_values import opt_float, opt_int, opt_str

__all__ = ["ViewRefinement", "RefinementPair", "RefinementSummary"]


@dataclass(frozen=True)
class ViewRefinement:
    status: str
    """"refined" or "kept" (the input pose was kept, see ``reason``)."""
    reason: Optional[str]
    partners: tuple[str, ...]
    """File names of the views this one was matched with."""
    inliers: Optional[int]
    tracks: Optional[int]
    reproj_before_px: Optional[float]
    reproj_after_px: Optional[float]
    rotation_change_deg: Optional[float]
    centre_change: Optional[float]
    """Camera-centre shift as a fraction of the scene extent."""
    focal_change: Optional[float]
    """Relative focal-length change (0.012 = 1.2 %)."""

    @classmethod
    def from_json(cls, d: Any) -> Optional["ViewRefinement"]:
        if not isinstance(d, Mapping):
            return None
        partners = d.get("partners")
        return cls(
            status=str(d.get("status", "?")),
            reason=opt_str(d.get("reason")),
            partners=tuple(str(p) for p in partners) if isinstance(partners, list) else (),
            inliers=opt_int(d.get("inliers")),
            tracks=opt_int(d.get("tracks")),
            reproj_before_px=opt_float(d.get("reproj_before_px")),
            reproj_after_px=opt_float(d.get("reproj_after_px")),
            rotation_change_deg=opt_float(d.get("rotation_change_deg")),
            centre_change=opt_float(d.get("centre_change")),
            focal_change=opt_float(d.get("focal_change")),
        )


@dataclass(frozen=True)
class RefinementPair:
    i: int
    j: int
    """Dataset view indices (order of transforms.json)."""
    inliers: Optional[int]
    rotation_disagreement_deg: Optional[float]
    """Angle between the matched features' relative rotation and the model's."""
    accepted: bool


@dataclass(frozen=True)
class RefinementSummary:
    status: str
    """"refined", "failed" or "off"."""
    warning: Optional[str]
    views_refined: Optional[int]
    views_kept: Optional[int]
    median_reproj_px: Optional[float]
    pairs: tuple[RefinementPair, ...]

    @classmethod
    def from_json(cls, d: Any, view_index: Mapping[int, int]) -> Optional["RefinementSummary"]:
        """``view_index`` maps extreme_poses.json view indices to dataset view indices (pairs of views that are
        not in the dataset are left out)."""
        if not isinstance(d, Mapping):
            return None
        pairs = []
        for p in d.get("pairs") or []:
            if not isinstance(p, Mapping):
                continue
            i, j = view_index.get(opt_int(p.get("i"))), view_index.get(opt_int(p.get("j")))  # type: ignore[arg-type]
            if i is None or j is None:
                continue
            pairs.append(RefinementPair(i, j, opt_int(p.get("inliers")), opt_float(p.get("rotation_disagreement_deg")),
                                        bool(p.get("accepted"))))  # fmt: skip
        return cls(
            status=str(d.get("status", "?")),
            warning=opt_str(d.get("warning")),
            views_refined=opt_int(d.get("views_refined")),
            views_kept=opt_int(d.get("views_kept")),
            median_reproj_px=opt_float(d.get("median_reproj_px")),
            pairs=tuple(pairs),
        )

    def pair(self, i: int, j: int) -> Optional[RefinementPair]:
        return next((p for p in self.pairs if {p.i, p.j} == {i, j}), None)
