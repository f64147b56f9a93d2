"""A NumPy-only C-shape phantom with an analytic pencil-beam dose model.

Seconds to build at any size, no pyRadPlan needed: for unit tests, and for GPU benchmarks on
machines where pyRadPlan is not installed. The geometry follows the TG-119 C-shape description
(core cylinder r = 10 mm, 100 mm long; C-shaped PTV from r = 15 to 37 mm, 80 mm long, open
anteriorly) inside a water cylinder. The dose model is a textbook approximation, not a
commissioned beam: build-up and exponential attenuation in depth, inverse square, and a square
beamlet aperture blurred by a Gaussian whose width grows with depth.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import erf

from radpilot.case import Beam, Case, Grid, Structure, StructureKind, as_csr32
from radpilot.cases.derived import with_normal_tissue

BUILDER_VERSION = 2  # 2: beamlet centres on multiples of the bixel width, kept


@dataclass(frozen=True)
class AnalyticParams:
    spacing_mm: float = 5.0
    bixel_mm: float = 5.0
    num_beams: int = 9
    body_radius_mm: float = 100.0
    body_length_mm: float = 140.0
    sigma_mm: float = 3.0  # lateral penumbra at the surface
    sigma_per_mm_depth: float = 0.02  # penumbra growth with depth
    cutoff_sigmas: float = 3.0
    mu_per_mm: float = 0.0045  # effective attenuation of 6 MV in water
    buildup_mm: float = 8.0
    prescription_gy: float = 50.0


def recipe(params: AnalyticParams) -> dict[str, object]:
    return {"builder": "analytic-cshape", "version": BUILDER_VERSION, "params": asdict(params)}


def _geometry(p: AnalyticParams) -> tuple[Grid, np.ndarray, dict[str, np.ndarray]]:
    h = p.spacing_mm
    nxy = int(np.ceil(2 * (p.body_radius_mm + 2 * h) / h))
    nz = int(np.ceil((p.body_length_mm + 4 * h) / h))
    origin = (-(nz - 1) * h / 2, -(nxy - 1) * h / 2, -(nxy - 1) * h / 2)
    grid = Grid((nz, nxy, nxy), (h, h, h), origin)
    z, y, x = (o + h * np.arange(n) for o, n in zip(origin, grid.shape, strict=True))
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    r = np.hypot(X, Y)
    phi = np.degrees(np.arctan2(Y, X))  # 90 deg = +y = anterior opening
    body = (r <= p.body_radius_mm) & (np.abs(Z) <= p.body_length_mm / 2)
    core = (r <= 10.0) & (np.abs(Z) <= 50.0)
    opening = np.abs(phi - 90.0) < 45.0
    ptv = (r >= 15.0) & (r <= 37.0) & (np.abs(Z) <= 40.0) & ~opening
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    masks = {"PTV": ptv, "Core": core, "BODY": body}
    return grid, ct, masks


def _beam_matrix(
    p: AnalyticParams, gantry_deg: float, xyz: np.ndarray, target_xyz: np.ndarray
) -> tuple[sp.csc_matrix, np.ndarray]:
    """Dose per unit fluence from every beamlet of one beam to the given voxel centres, and
    each kept beamlet's centre ``(x, z)`` in mm in the beam's eye view."""
    t = np.radians(gantry_deg)
    travel = np.array([np.sin(t), -np.cos(t)])  # beam direction in (x, y)
    lateral = np.array([np.cos(t), np.sin(t)])
    s = xyz[:, :2] @ travel
    u = xyz[:, :2] @ lateral
    zc = xyz[:, 2]
    R = p.body_radius_mm
    depth = np.clip(s + np.sqrt(np.clip(R**2 - u**2, 0, None)), 0, None)
    depth_dose = (1 - np.exp(-depth / p.buildup_mm)) * np.exp(-p.mu_per_mm * depth)
    depth_dose *= (1000.0 / (1000.0 + s)) ** 2
    sigma = p.sigma_mm + p.sigma_per_mm_depth * depth

    w = p.bixel_mm
    tu = target_xyz[:, :2] @ lateral
    tz = target_xyz[:, 2]
    u_lo, u_hi = np.floor(tu.min() / w - 1) * w, np.ceil(tu.max() / w + 1) * w
    z_lo, z_hi = np.floor(tz.min() / w - 1) * w, np.ceil(tz.max() / w + 1) * w
    nu = round((u_hi - u_lo) / w) + 1
    nz = round((z_hi - z_lo) / w) + 1
    # beamlet centres on multiples of the bixel width from the axis, as pyRadPlan places rays
    home_u = np.round((u - u_lo) / w).astype(np.int64)
    home_z = np.round((zc - z_lo) / w).astype(np.int64)
    reach = int(np.ceil(p.cutoff_sigmas * sigma.max() / w)) + 1

    rows, cols, vals = [], [], []
    inv = 1.0 / (np.sqrt(2.0) * sigma)
    for du in range(-reach, reach + 1):
        iu = home_u + du
        cu = u_lo + iu * w
        fu = 0.5 * (erf((u - cu + w / 2) * inv) - erf((u - cu - w / 2) * inv))
        for dz in range(-reach, reach + 1):
            iz = home_z + dz
            cz = z_lo + iz * w
            fz = 0.5 * (erf((zc - cz + w / 2) * inv) - erf((zc - cz - w / 2) * inv))
            v = depth_dose * fu * fz
            keep = (iu >= 0) & (iu < nu) & (iz >= 0) & (iz < nz) & (v > 1e-4)
            rows.append(np.flatnonzero(keep))
            cols.append(iu[keep] * nz + iz[keep])
            vals.append(v[keep])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    m = sp.csc_matrix(
        (np.concatenate(vals).astype(np.float32), (r, c)), shape=(xyz.shape[0], nu * nz)
    )
    used = np.flatnonzero(np.diff(m.indptr))  # drop beamlets that reach no voxel
    centres = np.stack([u_lo + (used // nz) * w, z_lo + (used % nz) * w], axis=1)
    return m[:, used], centres


def build_analytic_cshape(params: AnalyticParams | None = None) -> Case:
    p = params or AnalyticParams()
    grid, ct, masks = _geometry(p)
    structures = [
        Structure("PTV", StructureKind.TARGET, np.flatnonzero(masks["PTV"])),
        Structure("Core", StructureKind.OAR, np.flatnonzero(masks["Core"])),
        Structure("BODY", StructureKind.EXTERNAL, np.flatnonzero(masks["BODY"])),
    ]
    structures = with_normal_tissue(structures, grid)
    rows = np.unique(np.concatenate([s.voxel_indices for s in structures]))
    zyx = np.stack(np.unravel_index(rows, grid.shape), axis=1).astype(np.float64)
    zyx = zyx * np.array(grid.spacing_mm) + np.array(grid.origin_mm)
    xyz = zyx[:, ::-1]
    target_xyz = xyz[np.isin(rows, structures[0].voxel_indices)]
    gantries = [360.0 * k / p.num_beams for k in range(p.num_beams)]
    # one beam per thread: the element-wise NumPy/SciPy work releases the GIL, and the beams
    # are independent (a 1.5 mm matrix takes minutes on one core)
    threads = max(1, min(len(gantries), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        beams = list(pool.map(lambda g: _beam_matrix(p, g, xyz, target_xyz), gantries))
    blocks = [b for b, _ in beams]
    A = sp.hstack(blocks, format="csr")
    # scale so that a uniform unit fluence gives roughly the prescription in the target
    A = A * (
        p.prescription_gy
        / float(np.mean(A[np.searchsorted(rows, structures[0].voxel_indices)].sum(axis=1)))
    )
    return Case(
        name="analytic-cshape",
        grid=grid,
        ct_hu=ct,
        structures=structures,
        beams=[
            Beam(g, 0.0, b.shape[1], p.bixel_mm, xy)
            for g, (b, xy) in zip(gantries, beams, strict=True)
        ],
        isocenter_mm=(0.0, 0.0, 0.0),
        prescription_gy=p.prescription_gy,
        row_voxels=rows.astype(np.int64),
        dose_influence=as_csr32(A),
        metadata={"builder": "analytic-cshape", "params": asdict(p)},
    )
