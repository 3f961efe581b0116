"""One-call blind PnP: :class:`BlindPnPSolver` wraps a checkpoint's network.

``solver(points_2d, points_3d, K=None)`` checks the input (the scene-file checks of
``evaluate.py``, :func:`bpnp.data.scenes.float_array`, plus at least :data:`MIN_POINTS` points per
side and a usable ``K``), runs the network on that one instance (batch 1, no padding: the
result ``evaluate.py`` gets on it) and returns a :class:`PnPSolution`. ``python -m bpnp.solve``
is its command line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from bpnp.data.scenes import SceneFileError, float_array
from bpnp.geometry.ransac import RansacStatus, seeded_generator
from bpnp.nodes import Status
from bpnp.runtime.checkpoint import load_network
from bpnp.runtime.cli import resolve_device

__all__ = ["BlindPnPSolver", "PnPSolution", "SolverInputError", "check_instance", "check_intrinsics", "MIN_POINTS",
           "DEFAULT_SEED"]

#: Fewest points per side: RANSAC's minimal sample (P3P) plus one to pick among its solutions.
MIN_POINTS = 4
#: RANSAC's seed when the caller gives none.
DEFAULT_SEED = 0


class SolverInputError(SceneFileError):
    """Bad input to :class:`BlindPnPSolver`: one line naming the argument. A ``ValueError``, and
    a :class:`~bpnp.data.scenes.SceneFileError`, so the command-line error policy
    (:mod:`bpnp.runtime.cli`) reports it like a bad scene file: one ``error:`` line, exit 2."""


@dataclass(frozen=True, eq=False)
class PnPSolution:
    """The solution of one instance: numpy arrays for numpy (or list) input, tensors on the
    input's device for tensor input; floating fields in the input's floating dtype (float64 for
    integer or list input, the default dtype for integer tensors).

    ``matches`` rule (the soft assignment alone): keypoint ``i``'s partner is the argmax of its
    row of the plan. With outlier bins (the shipped checkpoints) that row includes the bin, and
    ``-1`` means the bin holds more of keypoint ``i``'s mass than any single 3D point. Without
    bins a row is forced to sum to ``1 / m``, and ``-1`` means the best partner holds less than
    half of it. The plan spreads a keypoint's mass over neighbouring 3D points, so a soft match is
    often a neighbour of the true partner even when the pose is right (about half of them on an
    easy instance); ``pose_matches`` are the pairs the pose confirms.
    """

    R: Any
    """(3, 3) world-to-camera rotation, ``x_cam = R X + t``."""
    t: Any
    """(3,) translation."""
    matches: Any
    """(m,) int64: index into ``points_3d`` of each keypoint's partner in the soft assignment, or
    -1 (rule in the class docstring)."""
    inlier_prob: Any
    """(m,) probability that each keypoint has a partner: one minus its outlier-bin mass (a network
    with bins), else the share of its row that its best partner holds."""
    pose_matches: Any
    """(m,) int64: the pose's inliers as correspondences (what OpenCV's ``solvePnPRansac`` calls
    inliers): each keypoint's nearest 3D point by angle between its bearing and the ray to
    ``R X + t``, among those in front of the camera within RANSAC's inlier threshold
    (``ransac.threshold``, radians), or -1 where there is none."""
    status: Status | int
    """The PnP refinement's :class:`bpnp.nodes.Status` (``OK`` = converged; ``int(status)`` is
    its code); an int when the refinement did not run (-1)."""
    ransac_status: RansacStatus | int
    """:class:`bpnp.geometry.ransac.RansacStatus` of the initial pose (``OK`` = found)."""
    time_s: float
    """Wall time of this instance's solve (conversion, network, outputs; the input checks
    excluded), seconds."""


def _ndim(x: Any) -> int:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.ndim
    try:
        return int(np.ndim(x))
    except (ValueError, TypeError):  # a ragged list
        return -1


def _host(x: Any) -> Any:
    """A tensor as a CPU numpy array for the checks (dtypes numpy lacks, e.g. bfloat16, as float64);
    anything else as given."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach()
    if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.double()
    return x.cpu().numpy()


def _array(value: Any, key: str, shape: tuple, name: str, what: str) -> np.ndarray:
    try:
        return float_array(_host(value), key, shape, name, what)
    except SceneFileError as exc:
        raise SolverInputError(str(exc)) from None
    except (ValueError, TypeError) as exc:  # np.asarray of a ragged list and the like
        raise SolverInputError(f"{name}: {what} '{key}' is not an array ({exc})") from None


def check_intrinsics(K: Any, name: str = "BlindPnPSolver", key: str = "K", what: str = "argument") -> np.ndarray:
    """``K`` as a float64 (3, 3) pinhole intrinsics matrix: finite, last row ``(0, 0, 1)``, positive
    focal lengths ``K[0, 0]``, ``K[1, 1]``, invertible; else :class:`SolverInputError`
    ``"<name>: <what> '<key>' ..."``."""
    K = _array(K, key, (3, 3), name, what)
    label = f"{name}: {what} '{key}'"
    if np.max(np.abs(K[2] - (0.0, 0.0, 1.0))) > 1e-6:
        raise SolverInputError(f"{label} must have last row (0, 0, 1) (pinhole intrinsics), got {K[2].tolist()}")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise SolverInputError(f"{label} must have positive focal lengths K[0, 0], K[1, 1], got "
                               f"{K[0, 0]:g}, {K[1, 1]:g}")
    if not np.isfinite(np.linalg.cond(K)) or np.linalg.cond(K) > 1e12:
        raise SolverInputError(f"{label} is singular (not invertible), got {K.tolist()}")
    return K


def check_instance(points_2d: Any, points_3d: Any, K: Any = None, name: str = "BlindPnPSolver",
                   keys: Sequence[str] = ("points_2d", "points_3d", "K"),
                   what: str = "argument") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The checks of one instance, before any work: ``points_2d`` (m, 2) and ``points_3d`` (n, 3)
    numeric and finite (the messages of :func:`bpnp.data.scenes.validate_scene`), at least
    :data:`MIN_POINTS` per side, ``K`` (if given) per :func:`check_intrinsics`. ``keys`` and
    ``what`` name them in messages (``python -m bpnp.solve`` passes ``("p2d", "p3d", "K")`` and
    ``"key"`` with the file as ``name``).

    Returns:
        float64 copies ``(points_2d, points_3d, K or None)``.

    Raises:
        SolverInputError: one line, ``"<name>: <what> '<key>' <problem>"``.
    """
    k2, k3, kK = keys
    p2d = _array(points_2d, k2, ("m", 2), name, what)
    p3d = _array(points_3d, k3, ("n", 3), name, what)
    for key, x in ((k2, p2d), (k3, p3d)):
        if len(x) < MIN_POINTS:
            raise SolverInputError(f"{name}: {what} '{key}' holds {len(x)} point(s) (need at least {MIN_POINTS})")
    return p2d, p3d, None if K is None else check_intrinsics(K, name, kK, what)


def _out_spec(raw2d: Any, raw3d: Any) -> tuple[str, Any, Any]:
    """``("torch", dtype, device)`` if either input is a tensor, else ``("numpy", dtype, None)``."""
    tensors = [x for x in (raw2d, raw3d) if isinstance(x, torch.Tensor)]
    if tensors:
        floats = [x.dtype for x in tensors if x.is_floating_point()]
        dtype = floats[0] if floats else torch.get_default_dtype()
        for d in floats[1:]:
            dtype = torch.promote_types(dtype, d)
        return "torch", dtype, tensors[0].device
    kinds = [np.asarray(x).dtype for x in (raw2d, raw3d)]
    floats = [d for d in kinds if d.kind == "f"]
    return "numpy", (np.result_type(*floats) if floats else np.dtype(np.float64)), None


def _is_batch(x: Any) -> bool:
    """A list/tuple of instances (whose first item is a 2-D array), not one instance as nested lists."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and _ndim(x[0]) == 2


class BlindPnPSolver:
    """Blind PnP in one call: unmatched 2D keypoints and a 3D point cloud -> camera pose.

    Args:
        net: the network (:class:`bpnp.models.BlindPnPNet`), put in ``eval()`` mode;
            :meth:`from_checkpoint` loads one.
        seed: RANSAC's seed when a call gives none.

    Call: ``solver(points_2d, points_3d, K=None, *, seed=None)``

    - ``points_2d`` (m, 2): pixel keypoints when ``K`` (3, 3) is given, else camera-normalised
      coordinates ``(x / z, y / z)`` (undistorted).
    - ``points_3d`` (n, 3): world points. ``m`` and ``n`` may differ; neither set needs an
      order, and either may hold outliers.
    - ``K``: intrinsics, one for all instances or a list of one per instance.
    - Lists of instances (``solver([p2d_a, p2d_b], [p3d_a, p3d_b], K=[K_a, K_b])``) give a list
      of solutions; each instance is solved on its own.
    - ``seed``: every instance's RANSAC draws from
      ``bpnp.geometry.ransac.seeded_generator(seed, 0)``, so a result depends only on its
      instance and the seed (not on the other instances of a list).

    Returns :class:`PnPSolution` (or a list): numpy in, numpy out; tensors in, tensors out (on the
    input's device, in its floating dtype; computed without gradients). Bad input raises
    :class:`SolverInputError` (a ``ValueError``) with one line naming the argument, before any
    work (:func:`check_instance`).

    Example:
        >>> import numpy as np, torch
        >>> from pathlib import Path
        >>> import bpnp
        >>> from bpnp.so3 import so3_exp
        >>> ckpt = Path(bpnp.__file__).resolve().parents[1] / "checkpoints" / "bpnp_synthetic.pt"
        >>> solver = bpnp.BlindPnPSolver.from_checkpoint(ckpt)
        >>> rng = np.random.default_rng(0)
        >>> R = so3_exp(torch.tensor([0.3, -0.8, 0.4], dtype=torch.float64)).numpy()
        >>> t = np.array([0.1, -0.2, 3.0])
        >>> X = rng.normal(size=(400, 3))
        >>> X /= np.linalg.norm(X, axis=1, keepdims=True)  # a unit sphere ...
        >>> X = X[(X * (-R.T @ t - X)).sum(1) > 0][:100]  # ... 100 points of the side facing the camera
        >>> x = X @ R.T + t
        >>> p2d = rng.permutation(x[:, :2] / x[:, 2:])  # camera-normalised, shuffled
        >>> p2d = np.concatenate([p2d, rng.uniform(-0.3, 0.3, (10, 2))])  # 10 2D outliers
        >>> p3d = np.concatenate([X, rng.normal(size=(10, 3))])  # 10 3D outliers
        >>> sol = solver(p2d, p3d)
        >>> rot_err = np.degrees(np.arccos(np.clip((np.trace(sol.R.T @ R) - 1) / 2, -1, 1)))
        >>> bool(rot_err < 1.0), sol.status.name, sol.matches.shape, sol.R.dtype
        (True, 'OK', (110,), dtype('float64'))
    """

    def __init__(self, net: nn.Module, *, seed: int = DEFAULT_SEED) -> None:
        self.net = net.eval()
        self.seed = int(seed)
        ref = next(net.parameters(), None)
        self.device = ref.device if ref is not None else torch.device("cpu")
        self.dtype = ref.dtype if ref is not None else torch.float32

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", *, seed: int = DEFAULT_SEED,
                        **overrides: Any) -> "BlindPnPSolver":
        """The network of a checkpoint (Lightning ``.ckpt`` or weights-only file, e.g.
        ``checkpoints/bpnp_synthetic.pt``) on ``device``.

        ``overrides`` are inference settings over the checkpoint's, the vocabulary of
        :func:`bpnp.runtime.checkpoint.load_network`: groups (``ransac={"num_hypotheses": 2048}``)
        or dotted keys (``**{"refine.robust_scale": 1e-4}``).

        Raises:
            CheckpointError: missing, unreadable or incompatible checkpoint.
            SettingError: an unknown override key or a bad value (named).
            ConfigError: a device that is not there.
        """
        net = load_network(path, resolve_device(str(device)), overrides or None)
        return cls(net, seed=seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.net).__name__} on {self.device}, seed={self.seed})"

    def __call__(self, points_2d: Any, points_3d: Any, K: Any = None, *,
                 seed: int | None = None) -> PnPSolution | list[PnPSolution]:
        seed = self.seed if seed is None else int(seed)
        batch = _is_batch(points_2d)
        if batch != _is_batch(points_3d) or (batch and len(points_2d) != len(points_3d)):
            describe = (lambda x: f"a list of {len(x)} instances" if _is_batch(x) else "one instance")
            raise SolverInputError(f"BlindPnPSolver: arguments 'points_2d' and 'points_3d' must both be one instance "
                                   f"or lists of as many instances, got {describe(points_2d)} and {describe(points_3d)}")
        if not batch:
            p2d, p3d, K64 = check_instance(points_2d, points_3d, K)
            return self._solve(p2d, p3d, K64, seed, _out_spec(points_2d, points_3d))
        count = len(points_2d)
        if isinstance(K, (list, tuple)) and len(K) > 0 and (K[0] is None or _ndim(K[0]) == 2):
            if len(K) != count:
                raise SolverInputError(f"BlindPnPSolver: argument 'K' is a list of {len(K)} matrices for {count} "
                                       "instances (give one K, or one per instance)")
            Ks = list(K)
        else:
            Ks = [K] * count
        checked = [check_instance(a, b, k, f"BlindPnPSolver (instance {i})")
                   for i, (a, b, k) in enumerate(zip(points_2d, points_3d, Ks))]  # all before any work
        return [self._solve(*c, seed, _out_spec(a, b)) for c, a, b in zip(checked, points_2d, points_3d)]

    # -- one instance ------------------------------------------------------------------------------
    @torch.no_grad()
    def _solve(self, p2d: np.ndarray, p3d: np.ndarray, K: np.ndarray | None, seed: int,
               spec: tuple[str, Any, Any]) -> PnPSolution:
        start = time.perf_counter()
        if K is not None:  # pixels -> camera-normalised: K^-1 (u, v, 1)
            xyz = np.linalg.solve(K, np.concatenate([p2d, np.ones((len(p2d), 1))], axis=1).T).T
            p2d = xyz[:, :2] / xyz[:, 2:]
        x2 = torch.as_tensor(p2d, dtype=self.dtype, device=self.device)[None]
        x3 = torch.as_tensor(p3d, dtype=self.dtype, device=self.device)[None]
        out = self.net(p2d=x2, p3d=x3, generator=seeded_generator(seed, 0, self.device))
        m, n = len(p2d), len(p3d)
        P = out.P[0]
        if getattr(out, "P_aug", None) is not None:
            best = out.P_aug[0, :m].argmax(1)  # the bin is column n
            matches = torch.where(best == n, -1, best)
            inlier_prob = out.inlier2d[0]
        else:
            share, best = P.max(1)
            share = share / P.sum(1).clamp_min(torch.finfo(P.dtype).tiny)
            matches = torch.where(share >= 0.5, best, -1)
            inlier_prob = share
        f64 = dict(dtype=torch.float64, device=self.device)  # float32 resolves angles near 0 to ~3e-4 rad only
        pose_matches = self._pose_matches(torch.as_tensor(p2d, **f64), torch.as_tensor(p3d, **f64), out.R[0], out.t[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        fields = dict(R=out.R[0], t=out.t[0], matches=matches, inlier_prob=inlier_prob, pose_matches=pose_matches)
        kind, dtype, device = spec
        if kind == "torch":
            conv = {k: v.to(device=device, dtype=torch.long if k.endswith("matches") else dtype) for k, v in fields.items()}
        else:
            conv = {k: v.cpu().numpy().astype(np.int64 if k.endswith("matches") else dtype) for k, v in fields.items()}
        status = _enum(Status, int(out.pnp_status[0]))
        ransac_status = _enum(RansacStatus, int(out.ransac_status[0]))
        return PnPSolution(**conv, status=status, ransac_status=ransac_status, time_s=time.perf_counter() - start)

    def _pose_matches(self, p2d: torch.Tensor, p3d: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(m,) each keypoint's nearest 3D point by angle under ``(R, t)`` within RANSAC's
        threshold (cos above cos(threshold) > 0, so in front of the camera), or -1."""
        threshold = float(dict(getattr(self.net, "ransac_kwargs", None) or {}).get("threshold", 0.01))
        R, t = R.to(p2d.dtype), t.to(p2d.dtype)
        bearings = torch.nn.functional.normalize(torch.cat([p2d, torch.ones_like(p2d[:, :1])], 1), dim=1)
        rays = torch.nn.functional.normalize(p3d @ R.T + t, dim=1, eps=1e-12)
        best_cos, best = (bearings @ rays.T).max(1)
        return torch.where(best_cos > math.cos(threshold), best, -1)


def _enum(kind: type, value: int):
    try:
        return kind(value)
    except ValueError:
        return value
