"""A ground-truth posing backbone and the geometry helpers the posing tests share.

``GroundTruthBackbone`` implements the ``PosingBackbone`` protocol from known reference cameras and an
analytic scene (spheres), and mimics what VGGT returns: world = camera of the first frame of each call
(``w2c[0] = [I | 0]``), an arbitrary scale that differs per call (so chunked runs must be Sim(3)-joined),
intrinsics at the preprocessed resolution (the real principal point, wherever the crop/pad put it), z-depth
rendered exactly at the preprocessed pixel centres ``(j + 0.5, i + 0.5)``, confidence ``1 + exp(.) >= 2`` on
real pixels and ``1.0`` on padding, where the depth is deliberately garbage.

The reference cameras are used as pinhole cameras (their distortion, e.g. sacre_coeur's SIMPLE_RADIAL k1,
is ignored): the GT world is defined by the pinhole part, so every exported quantity is exactly predictable.
Everything here is written independently of ``ns_extreme.geometry`` (own Umeyama, own projection), so a
bug there cannot cancel out in the tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pycolmap
import torch

from ns_extreme.io.images import PreprocessRecord, preprocess_images
from ns_extreme.posing.backbone import FramePredictions

# ---------------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """Reference cameras of a dev_small scene, in image-name order (pinhole part of each camera)."""

    scene_dir: Path
    names: list[str]
    paths: list[Path]
    w2c: np.ndarray  # [N,3,4] OpenCV world-to-camera
    K: np.ndarray  # [N,3,3] original resolution
    sizes_wh: np.ndarray  # [N,2]

    @property
    def centres(self) -> np.ndarray:
        return camera_centres(self.w2c)

    @property
    def extent(self) -> float:
        """Scene extent used for relative position errors: largest camera distance from the centroid."""
        C = self.centres
        return float(np.linalg.norm(C - C.mean(0), axis=1).max())

    def subset(self, index: Sequence[int]) -> "Reference":
        index = list(index)
        return Reference(
            self.scene_dir, [self.names[i] for i in index], [self.paths[i] for i in index],
            self.w2c[index], self.K[index], self.sizes_wh[index],
        )  # fmt: skip


def load_reference(scene_dir: Path) -> Reference:
    """Read ``sparse/0`` with plain pycolmap (not ns_extreme's reader)."""
    rec = pycolmap.Reconstruction(str(scene_dir / "sparse" / "0"))
    images = sorted((rec.images[i] for i in rec.images), key=lambda im: im.name)
    return Reference(
        scene_dir=scene_dir,
        names=[im.name for im in images],
        paths=[scene_dir / "images" / im.name for im in images],
        w2c=np.stack([im.cam_from_world().matrix() for im in images]).astype(np.float64),
        K=np.stack([im.camera.calibration_matrix() for im in images]).astype(np.float64),
        sizes_wh=np.array([(im.camera.width, im.camera.height) for im in images], dtype=np.int64),
    )


# ---------------------------------------------------------------------------------------------- small geometry


def camera_centres(w2c: np.ndarray) -> np.ndarray:
    R, t = w2c[..., :3, :3], w2c[..., :3, 3]
    return -np.einsum("...ji,...j->...i", R, t)


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    """Geodesic angle of Ra·Rbᵀ (batched), via the quaternion-free atan2 form (accurate near 0)."""
    M = Ra[..., :3, :3] @ np.swapaxes(Rb[..., :3, :3], -1, -2)
    cos = (np.trace(M, axis1=-2, axis2=-1) - 1.0) / 2.0
    skew = np.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    sin = np.linalg.norm(skew, axis=-1) / 2.0
    return np.degrees(np.arctan2(sin, cos))


def project(X: np.ndarray, w2c: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (pixel centres at j + 0.5) and camera z of world points [M,3]."""
    Xc = X @ w2c[:3, :3].T + w2c[:3, 3]
    uvw = Xc @ K.T
    return uvw[:, :2] / uvw[:, 2:3], Xc[:, 2]


@dataclass(frozen=True)
class Similarity:
    """x ↦ s·R·x + t."""

    s: float
    R: np.ndarray
    t: np.ndarray

    def apply(self, X: np.ndarray) -> np.ndarray:
        return self.s * (np.asarray(X, dtype=np.float64) @ self.R.T) + self.t

    def w2c(self, w2c: np.ndarray) -> np.ndarray:
        """The same cameras after the world is mapped by this similarity (scale goes into t)."""
        out = np.array(w2c, dtype=np.float64)
        R_new = out[..., :3, :3] @ self.R.T
        out[..., :3, 3] = self.s * out[..., :3, 3] - R_new @ self.t
        out[..., :3, :3] = R_new
        return out


def umeyama(src: np.ndarray, dst: np.ndarray) -> Similarity:
    """Least-squares similarity dst ≈ s·R·src + t (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    U, D, Vt = np.linalg.svd(xd.T @ xs / len(src))
    S = np.diag([1.0, 1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt))])
    R = U @ S @ Vt
    s = float(np.trace(np.diag(D) @ S) / (xs * xs).sum(1).mean())
    return Similarity(s, R, mu_d - s * R @ mu_s)


@dataclass
class PoseErrors:
    sim: Similarity  # exported world -> reference world
    rot_deg: np.ndarray  # [N]
    pos_rel: np.ndarray  # [N], relative to the reference extent

    @property
    def max_rot_deg(self) -> float:
        return float(self.rot_deg.max())

    @property
    def max_pos_rel(self) -> float:
        return float(self.pos_rel.max())


def pose_errors(w2c_est: np.ndarray, ref: Reference) -> PoseErrors:
    """Align the estimated cameras to the reference with one Sim(3) (camera centres) and measure errors."""
    sim = umeyama(camera_centres(w2c_est), ref.centres)
    aligned = sim.w2c(w2c_est)
    rot = rotation_angle_deg(aligned[:, :3, :3], ref.w2c[:, :3, :3])
    pos = np.linalg.norm(camera_centres(aligned) - ref.centres, axis=1) / ref.extent
    return PoseErrors(sim, rot, pos)


# ---------------------------------------------------------------------------------------------- GT scene


@dataclass(frozen=True)
class Sphere:
    centre: np.ndarray
    radius: float

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Smallest t > 0 with |origin + t·d − c| = r for one origin [3] and (unnormalised) directions [M,3];
        inf on a miss."""
        oc = np.asarray(origin, dtype=np.float64).reshape(3) - self.centre
        a = np.einsum("...i,...i->...", dirs, dirs)
        b = 2.0 * (dirs @ oc)
        c = float(oc @ oc) - self.radius**2
        disc = b * b - 4.0 * a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        # Stable roots: q = -(b + sign(b)·sq)/2, t1 = q/a, t2 = c/q.
        q = -0.5 * (b + np.where(b >= 0, sq, -sq))
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = q / a, c / q
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        t = np.where(lo > 0, lo, np.where(hi > 0, hi, np.inf))
        return np.where(disc >= 0, t, np.inf)

    def distance(self, X: np.ndarray) -> np.ndarray:
        return np.abs(np.linalg.norm(X - self.centre, axis=-1) - self.radius)


@dataclass(frozen=True)
class SphereScene:
    """A large sphere enclosing every camera (each ray hits it) and a small one inside that occludes it."""

    spheres: tuple[Sphere, ...]

    def raycast(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        return np.min(np.stack([s.intersect(origin, dirs) for s in self.spheres]), axis=0)

    def distance(self, X: np.ndarray) -> np.ndarray:
        return np.min(np.stack([s.distance(X) for s in self.spheres]), axis=0)

    def depth(self, w2c: np.ndarray, K: np.ndarray, uv: np.ndarray) -> np.ndarray:
        """z-depth of the first surface hit through continuous pixel positions uv [..., 2]."""
        uv = np.asarray(uv, dtype=np.float64)
        pix = np.concatenate([uv, np.ones(uv.shape[:-1] + (1,))], axis=-1)
        rays_cam = pix @ np.linalg.inv(K).T  # camera z = 1 -> the ray parameter is the z-depth
        dirs = rays_cam @ w2c[:3, :3]  # Rᵀ·d, row form
        return self.raycast(camera_centres(w2c), dirs.reshape(-1, 3)).reshape(uv.shape[:-1])

    def points(self, w2c: np.ndarray, K: np.ndarray, uv: np.ndarray) -> np.ndarray:
        z = self.depth(w2c, K, uv)
        pix = np.concatenate([uv, np.ones(uv.shape[:-1] + (1,))], axis=-1)
        Xc = (pix @ np.linalg.inv(K).T) * z[..., None]
        return (Xc - w2c[:3, 3]) @ w2c[:3, :3]


def make_scene(w2c_ref: np.ndarray) -> SphereScene:
    """Big sphere: centred on the cameras, radius 3x their spread. Small sphere: at the point closest to all
    optical axes (what the cameras look at), radius a quarter of its distance to the nearest camera."""
    C = camera_centres(w2c_ref)
    m = C.mean(0)
    big = Sphere(m, 3.0 * float(np.linalg.norm(C - m, axis=1).max()) + 1e-9)
    axes = w2c_ref[:, 2, :3]  # optical axis = third row of R (world direction)
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for c, a in zip(C, axes):
        P = np.eye(3) - np.outer(a, a)
        A += P
        b += P @ c
    target = np.linalg.solve(A, b)
    if np.linalg.norm(target - m) > big.radius * 0.5:
        target = m + (target - m) * (0.5 * big.radius / np.linalg.norm(target - m))
    small = Sphere(target, 0.25 * float(np.linalg.norm(C - target, axis=1).min()))
    return SphereScene((big, small))


# ---------------------------------------------------------------------------------------------- backbone

_SHARED: dict[tuple, dict] = {}


def _rotation_about(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    th = np.radians(degrees)
    A = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(th) * A + (1 - np.cos(th)) * A @ A


@dataclass
class GroundTruthBackbone:
    """Exact predictions from reference cameras + an analytic scene, in VGGT's output convention.

    ``images`` is the preprocessed batch of the same files (``preprocess_images(paths, mode, target_size)``):
    each call identifies its frames by comparing the input tensors with it, so chunked calls work.
    ``scales[c % len(scales)]`` is the world scale of call c. ``corrupt`` = {call: {frame: fraction}} replaces
    that fraction of the frame's real-pixel depths by gross outliers (with high confidence) in that call.
    ``perturbed`` frames get a predicted rotation 1 degree off (camera centre kept) and focal lengths 2 %
    too long (depth stays true), as if the network erred on them: known poses / intrinsics must replace them.
    """

    w2c_ref: np.ndarray
    K_ref: np.ndarray
    records: list[PreprocessRecord]
    scene: SphereScene
    images: torch.Tensor
    target_size: int = 518
    scales: tuple[float, ...] = (0.37, 2.9, 0.61, 1.7)
    corrupt: dict[int, dict[int, float]] = field(default_factory=dict)
    perturbed: tuple[int, ...] = ()
    name: str = "ground-truth"
    patch_size: int = 14
    calls: list[list[int]] = field(default_factory=list)
    """Global frame indices of every call, in order (for the tests to inspect)."""

    @classmethod
    def for_reference(
        cls, ref: Reference, mode: str, target_size: int = 518, scene: Optional[SphereScene] = None, **kwargs
    ) -> "GroundTruthBackbone":
        """Backbone for ``ref``'s images. With the default scene, the preprocessed batch and the rendered GT
        depth are shared between backbones of the same images/mode/size (they are pure functions of them)."""
        key = (tuple(map(str, ref.paths)), ref.w2c.tobytes(), ref.K.tobytes(), mode, target_size)
        if scene is not None or key not in _SHARED:
            batch = preprocess_images(ref.paths, mode=mode, target_size=target_size, patch_size=14)
            shared = {"batch": batch, "scene": scene or make_scene(ref.w2c), "cache": {}}
            if scene is not None:
                return cls(ref.w2c, ref.K, batch.records, shared["scene"], batch.images, target_size, **kwargs)
            _SHARED[key] = shared
        shared = _SHARED[key]
        batch = shared["batch"]
        return cls(
            ref.w2c, ref.K, batch.records, shared["scene"], batch.images, target_size, _cache=shared["cache"], **kwargs
        )

    _cache: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def _digest(image: torch.Tensor) -> str:
        return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).hexdigest()

    def identify(self, images: torch.Tensor) -> list[int]:
        """Global frame index of each input image (exact match with the stored preprocessed batch)."""
        if "digests" not in self._cache:
            digests = [self._digest(img) for img in self.images]
            assert len(set(digests)) == len(digests), "identical preprocessed images cannot be told apart"
            self._cache["digests"] = {d: k for k, d in enumerate(digests)}
        index = self._cache["digests"]
        frames = []
        for img in images:
            k = index.get(self._digest(img))
            if k is None:
                raise AssertionError("GroundTruthBackbone was given an image that is not in its preprocessed batch")
            frames.append(k)
        return frames

    def expected_intrinsics_pre(self, k: int) -> np.ndarray:
        return self.records[k].intrinsics_to_preprocessed(self.K_ref[k])

    def gt_depth_pre(self, k: int) -> np.ndarray:
        """Reference-unit z-depth at every preprocessed pixel centre of frame k (padding included)."""
        key = ("depth", k)
        if key not in self._cache:
            H, W = self.records[k].final_hw
            u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
            self._cache[key] = self.scene.depth(self.w2c_ref[k], self.expected_intrinsics_pre(k), np.stack([u, v], -1))
        return self._cache[key].copy()

    def confidence_pre(self, k: int) -> np.ndarray:
        rec = self.records[k]
        H, W = rec.final_hw
        u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
        conf = 1.0 + np.exp(0.7 + 0.5 * np.sin(0.13 * u + 0.7 * k) * np.cos(0.11 * v))
        conf[~rec.valid_mask_preprocessed()] = 1.0
        return conf.astype(np.float32)

    def predict(self, images: torch.Tensor) -> FramePredictions:
        frames = self.identify(images)
        call = len(self.calls)
        self.calls.append(frames)
        s = float(self.scales[call % len(self.scales)])
        R0, t0 = self.w2c_ref[frames[0], :3, :3], self.w2c_ref[frames[0], :3, 3]
        w2c, Ks, depths, confs = [], [], [], []
        rng = np.random.default_rng(1000 + call)
        for k in frames:
            R, t = self.w2c_ref[k, :3, :3], self.w2c_ref[k, :3, 3]
            R_rel = R @ R0.T
            t_rel = s * (t - R_rel @ t0)
            K_pre = self.expected_intrinsics_pre(k)
            if k in self.perturbed:
                centre = -R_rel.T @ t_rel
                R_rel = _rotation_about([1.0, 2.0, 3.0], 1.0) @ R_rel
                t_rel = -R_rel @ centre
                K_pre = K_pre.copy()
                K_pre[0, 0] *= 1.02
                K_pre[1, 1] *= 1.02
            w2c.append(np.concatenate([R_rel, t_rel[:, None]], axis=1))
            Ks.append(K_pre)
            depth = s * self.gt_depth_pre(k)
            valid = self.records[k].valid_mask_preprocessed()
            # Garbage on padding, like a real network: random, so two passes never agree on it.
            depth[~valid] = float(np.median(depth[valid])) * rng.uniform(0.2, 3.0, size=int((~valid).sum()))
            fraction = self.corrupt.get(call, {}).get(k, 0.0)
            if fraction:
                rows, cols = np.nonzero(valid)
                pick = rng.choice(len(rows), size=int(fraction * len(rows)), replace=False)
                depth[rows[pick], cols[pick]] *= rng.uniform(0.2, 3.0, size=len(pick))
            depths.append(depth.astype(np.float32))
            confs.append(self.confidence_pre(k))
        return FramePredictions(
            w2c_opencv=np.stack(w2c), intrinsics=np.stack(Ks), depth=np.stack(depths), confidence=np.stack(confs)
        )


def noisy_reference(
    ref: Reference,
    seed: int,
    rotation_deg: tuple[float, float] = (3.0, 5.0),
    position: tuple[float, float] = (0.03, 0.05),
    focal: tuple[float, float] = (0.03, 0.05),
) -> Reference:
    """``ref`` with seeded per-view errors, as a feed-forward model makes them: a rotation by an angle drawn from
    ``rotation_deg`` about a random axis, the camera centre moved by a fraction of the extent drawn from
    ``position`` in a random direction, and fx = fy scaled by 1 ± a fraction drawn from ``focal``."""
    rng = np.random.default_rng(seed)
    w2c, K = ref.w2c.copy(), ref.K.copy()
    centres = ref.centres
    for i in range(len(w2c)):
        R = _rotation_about(rng.normal(size=3), rng.uniform(*rotation_deg)) @ ref.w2c[i, :3, :3]
        direction = rng.normal(size=3)
        centre = centres[i] + rng.uniform(*position) * ref.extent * direction / np.linalg.norm(direction)
        w2c[i, :3, :3], w2c[i, :3, 3] = R, -R @ centre
        f = 1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(*focal)
        K[i, 0, 0] *= f
        K[i, 1, 1] *= f
    return Reference(ref.scene_dir, ref.names, ref.paths, w2c, K, ref.sizes_wh)
