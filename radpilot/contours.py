"""Structures RadPilot owns: contours rasterised with sub-voxel accuracy, and voxel fractions
carried exactly from the CT grid to the dose grid.

- ``rasterise``: closed planar contours (RTSTRUCT ``CLOSED_PLANAR``, patient mm) on the CT's
  slices -> the fraction of each CT voxel inside the structure. Each contour is a slab one slice
  thick; in plane, ``SUPERSAMPLE`` x ``SUPERSAMPLE`` points per voxel are tested against the
  polygons with the even-odd rule, so a contour inside another is a hole (DICOM's rule for nested
  contours), and two structures may share voxels (overlaps are kept: each is rasterised alone).
- ``contour_volume_cc``: the polygons' own volume (shoelace area x slice thickness, holes
  subtracted by nesting depth), the yardstick the rasterised volume is checked against.
- ``resample_fractions``: CT-grid fractions -> dose-grid fractions by exact box overlap (each
  dose voxel's fraction is the volume-weighted mean of the CT fractions it covers), so volume is
  conserved and a boundary dose voxel counts by the part that is inside.

Arrays are ``[z, y, x]``; grids are given by origin (voxel centre of index 0) and spacing, mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.path import Path as PolyPath

from radpilot.errors import DicomImportError

SUPERSAMPLE = 8  # in-plane sample points per voxel edge (64 per voxel)
MIN_FRACTION = 1e-3  # dose-grid voxels with less of the structure are left out


@dataclass(frozen=True)
class AxisGrid:
    """One axis of a regular grid: voxel centre of index 0, spacing, count."""

    origin: float
    spacing: float
    count: int

    def edges(self) -> np.ndarray:
        return self.origin + (np.arange(self.count + 1) - 0.5) * self.spacing


def polygon_area_mm2(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _slice_index(z_mm: float, axis: AxisGrid, roi: str) -> int:
    k = round((z_mm - axis.origin) / axis.spacing)
    if not 0 <= k < axis.count or abs(axis.origin + k * axis.spacing - z_mm) > 0.25 * abs(
        axis.spacing
    ):
        raise DicomImportError(
            f"ROI {roi!r} has a contour at z = {z_mm:.2f} mm that lies on no CT slice; "
            "contours must be drawn on the CT's slices"
        )
    return int(k)


def by_slice(contours: list[np.ndarray], zaxis: AxisGrid, roi: str) -> dict[int, list[np.ndarray]]:
    """Group (N, 3) x/y/z contour point arrays by CT slice; each becomes an (N, 2) polygon."""
    out: dict[int, list[np.ndarray]] = {}
    for c in contours:
        if c.shape[0] < 3:
            continue
        z = c[:, 2]
        if float(z.max() - z.min()) > 0.01:
            raise DicomImportError(f"ROI {roi!r} has a contour that is not planar in z")
        out.setdefault(_slice_index(float(z.mean()), zaxis, roi), []).append(c[:, :2].copy())
    return out


def contour_volume_cc(slices: dict[int, list[np.ndarray]], slice_mm: float) -> float:
    """Polygon volume: each slice's area (a contour nested in an odd number of others is a hole)
    times the slice thickness."""
    total = 0.0
    for polys in slices.values():
        paths = [PolyPath(p) for p in polys]
        for i, p in enumerate(polys):
            depth = sum(1 for j, q in enumerate(paths) if j != i and q.contains_point(p[0]))
            total += (-1.0 if depth % 2 else 1.0) * polygon_area_mm2(p)
    return total * abs(slice_mm) / 1000.0


def _subsample_offsets(n: int) -> np.ndarray:
    """``n`` in-voxel sample offsets (x, y) in (-0.5, 0.5): a low-discrepancy R2 sequence, so
    no straight edge (an axis, a 45-degree diagonal through voxel centres, as contouring tools
    draw them) meets a row of samples and biases the fraction."""
    g = 1.32471795724474602596  # the plastic number: R2's generator
    k = np.arange(n) + 0.5
    return np.column_stack([(k / g) % 1.0, (k / g**2) % 1.0]) - 0.5


def rasterise(
    slices: dict[int, list[np.ndarray]],
    zyx_axes: tuple[AxisGrid, AxisGrid, AxisGrid],
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Fraction (float32, 0..1) of every CT voxel inside the contours (even-odd rule)."""
    az, ay, ax = zyx_axes
    out = np.zeros((az.count, ay.count, ax.count), dtype=np.float32)
    offsets = _subsample_offsets(supersample * supersample)
    for k, polys in slices.items():
        lo = np.min([p.min(axis=0) for p in polys], axis=0)
        hi = np.max([p.max(axis=0) for p in polys], axis=0)
        ix0 = max(0, int(np.floor((lo[0] - ax.origin) / ax.spacing)) - 1)
        ix1 = min(ax.count, int(np.ceil((hi[0] - ax.origin) / ax.spacing)) + 2)
        iy0 = max(0, int(np.floor((lo[1] - ay.origin) / ay.spacing)) - 1)
        iy1 = min(ay.count, int(np.ceil((hi[1] - ay.origin) / ay.spacing)) + 2)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        cy, cx = np.meshgrid(
            ay.origin + np.arange(iy0, iy1) * ay.spacing,
            ax.origin + np.arange(ix0, ix1) * ax.spacing,
            indexing="ij",
        )
        points = np.column_stack(
            [
                (cx.ravel()[:, None] + offsets[None, :, 0] * ax.spacing).ravel(),
                (cy.ravel()[:, None] + offsets[None, :, 1] * ay.spacing).ravel(),
            ]
        )
        inside = np.zeros(points.shape[0], dtype=bool)
        for p in polys:
            inside ^= PolyPath(p).contains_points(points)  # even-odd: nested = hole
        frac = inside.reshape(iy1 - iy0, ix1 - ix0, offsets.shape[0]).mean(axis=2)
        out[k, iy0:iy1, ix0:ix1] = frac
    return out


def _overlap(src: AxisGrid, dst: AxisGrid) -> np.ndarray:
    """W[j, i]: the fraction of destination voxel j's length covered by source voxel i."""
    se, de = src.edges(), dst.edges()
    if src.spacing < 0:
        se = se[::-1]
    lo = np.maximum(de[:-1, None], np.minimum(se[:-1], se[1:])[None, :])
    hi = np.minimum(de[1:, None], np.maximum(se[:-1], se[1:])[None, :])
    return np.clip(hi - lo, 0.0, None) / abs(dst.spacing)


def resample_fractions(
    fraction: np.ndarray,
    src: tuple[AxisGrid, AxisGrid, AxisGrid],
    dst: tuple[AxisGrid, AxisGrid, AxisGrid],
) -> np.ndarray:
    """CT-grid fractions -> dose-grid fractions by exact box overlap (volume conserving)."""
    nz = np.flatnonzero(fraction.any(axis=(1, 2)))
    ny = np.flatnonzero(fraction.any(axis=(0, 2)))
    nx = np.flatnonzero(fraction.any(axis=(0, 1)))
    out = np.zeros((dst[0].count, dst[1].count, dst[2].count), dtype=np.float32)
    if nz.size == 0:
        return out
    box = fraction[nz[0] : nz[-1] + 1, ny[0] : ny[-1] + 1, nx[0] : nx[-1] + 1].astype(np.float64)
    weights = []
    for axis, (first, last) in zip(
        range(3), ((nz[0], nz[-1]), (ny[0], ny[-1]), (nx[0], nx[-1])), strict=True
    ):
        s = src[axis]
        sub = AxisGrid(s.origin + first * s.spacing, s.spacing, int(last - first + 1))
        weights.append(_overlap(sub, dst[axis]))
    res = np.einsum("az,zyx->ayx", weights[0], box, optimize=True)
    res = np.einsum("by,ayx->abx", weights[1], res, optimize=True)
    res = np.einsum("cx,abx->abc", weights[2], res, optimize=True)
    out[:] = np.clip(res, 0.0, 1.0)
    return out


def sparse_fractions(fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C-order voxel indices, fractions) of the voxels holding at least ``MIN_FRACTION``."""
    flat = fraction.ravel()
    idx = np.flatnonzero(flat >= MIN_FRACTION)
    return idx.astype(np.int64), flat[idx].astype(np.float32)


def sample_points(
    fraction: np.ndarray,
    ct_axes: tuple[AxisGrid, AxisGrid, AxisGrid],
    dose_axes: tuple[AxisGrid, AxisGrid, AxisGrid],
    factor: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Dosimetry sample points of a structure: the centres of a grid ``factor`` times finer than
    the dose grid, each with the structure's volume in it (in dose-voxel units, so the weights
    sum to the structure's volume in dose voxels). Returns (points [n, 3] as z, y, x mm,
    weights)."""
    fine = tuple(
        AxisGrid(a.origin - a.spacing / 2 + a.spacing / (2 * factor), a.spacing / factor,
                 a.count * factor)
        for a in dose_axes
    )  # fmt: skip
    frac = resample_fractions(fraction, ct_axes, (fine[0], fine[1], fine[2]))
    idx = np.argwhere(frac >= MIN_FRACTION)
    pts = np.column_stack([fine[k].origin + idx[:, k] * fine[k].spacing for k in range(3)]).astype(
        np.float64
    )
    w = frac[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float32) / np.float32(factor**3)
    return pts, w


def interpolation_matrix(
    points_zyx: np.ndarray,
    dose_axes: tuple[AxisGrid, AxisGrid, AxisGrid],
    row_voxels: np.ndarray,
) -> Any:
    """CSR [points x rows]: trilinear interpolation of a dose on the rows of a case. Neighbours
    outside the grid or without a row (no dose there) contribute zero, as in an exported
    RTDOSE, which holds zero outside the delineated voxels."""
    import scipy.sparse as sp

    n = points_zyx.shape[0]
    shape = tuple(a.count for a in dose_axes)
    base, frac = [], []
    for k, a in enumerate(dose_axes):
        u = (points_zyx[:, k] - a.origin) / a.spacing
        b = np.floor(u).astype(np.int64)
        base.append(b)
        frac.append(u - b)
    cols, vals = [], []
    for corner in range(8):
        off = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
        coef = np.ones(n)
        inside = np.ones(n, dtype=bool)
        ijk = []
        for k in range(3):
            i = base[k] + off[k]
            coef *= frac[k] if off[k] else 1.0 - frac[k]
            inside &= (i >= 0) & (i < shape[k])
            ijk.append(np.clip(i, 0, shape[k] - 1))
        lin = np.ravel_multi_index(tuple(ijk), shape)
        pos = np.searchsorted(row_voxels, lin)
        pos = np.clip(pos, 0, row_voxels.size - 1)
        inside &= row_voxels[pos] == lin
        cols.append(np.where(inside, pos, 0))
        vals.append(np.where(inside, coef, 0.0))
    m = sp.coo_matrix(
        (
            np.concatenate(vals).astype(np.float32),
            (np.tile(np.arange(n), 8), np.concatenate(cols)),
        ),
        shape=(n, row_voxels.size),
    ).tocsr()
    m.eliminate_zeros()
    return m
