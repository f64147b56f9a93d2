"""Dose images for people and for the vision evaluator, rendered with matplotlib (Agg) to PNG bytes.

- ``plane_images``: axial, sagittal and coronal slices through the isocentre: CT in grey, the dose
  as a colour wash (doses under 10 % of the prescription left clear), structure contours, and a
  colour bar in Gy.
- ``structure_crops``: for each non-external structure, the axial slice through its centroid
  cropped to the structure's extent plus a 5-pixel margin, with the same colour scale.
- ``dvh_plot``: cumulative DVH curves.

Axial images show anterior up; sagittal and coronal show superior up. Pixel spacing is honoured.
"""

from __future__ import annotations

import io
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from radpilot.case import Case, StructureKind
from radpilot.dosimetry import dvh_levels
from radpilot.evaluation.metrics import PlanDose

FIG_SIZE_IN = (6.0, 5.0)
DPI = 100
CROP_MARGIN_PX = 5
COLOURBAR_LABEL = "Dose [Gy]"
COLORS = ["#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _slice(cube: np.ndarray, plane: str, index: int) -> np.ndarray:
    if plane == "axial":
        return cube[index, :, :]
    if plane == "coronal":
        return cube[:, index, :]
    if plane == "sagittal":
        return cube[:, :, index]
    raise ValueError(f"unknown plane {plane!r}; use axial, sagittal or coronal")


def _extent(case: Case, plane: str) -> tuple[float, float, float, float]:
    (nz, ny, nx), (dz, dy, dx), (oz, oy, ox) = (
        case.grid.shape,
        case.grid.spacing_mm,
        case.grid.origin_mm,
    )
    xs = (ox - dx / 2, ox + (nx - 0.5) * dx)
    ys = (oy - dy / 2, oy + (ny - 0.5) * dy)
    zs = (oz - dz / 2, oz + (nz - 0.5) * dz)
    if plane == "axial":
        return (xs[0], xs[1], ys[1], ys[0])  # anterior (small y) at the top
    if plane == "coronal":
        return (xs[0], xs[1], zs[0], zs[1])
    return (ys[0], ys[1], zs[0], zs[1])


def _draw(
    ax: plt.Axes,
    case: Case,
    dose_cube: np.ndarray,
    plane: str,
    index: int,
    vmax: float,
    window: tuple[slice, slice] | None = None,
) -> matplotlib.image.AxesImage:
    origin: Literal["upper", "lower"] = "upper" if plane == "axial" else "lower"
    ct = _slice(case.ct_hu, plane, index)
    dose = _slice(dose_cube, plane, index)
    extent = _extent(case, plane)
    if window is not None:
        ct, dose = ct[window], dose[window]
        extent = _window_extent(case, plane, window)
    ax.imshow(ct, cmap="gray", vmin=-200, vmax=300, extent=extent, origin=origin)
    wash = np.ma.masked_less(dose, 0.1 * case.prescription_gy)
    im = ax.imshow(wash, cmap="jet", vmin=0, vmax=vmax, alpha=0.45, extent=extent, origin=origin)
    for k, s in enumerate(case.structures):
        if s.kind is StructureKind.EXTERNAL or s.name == "NormalTissue":
            continue
        m = _slice(s.mask(case.grid), plane, index)
        if window is not None:
            m = m[window]
        if m.any():
            ax.contour(
                m.astype(float),
                levels=[0.5],
                colors=[COLORS[k % len(COLORS)]],
                linewidths=1.2,
                extent=extent,
                origin=origin,
            )
            ax.plot([], [], color=COLORS[k % len(COLORS)], label=s.name)
    ax.set_xlabel("mm")
    ax.set_ylabel("mm")
    return im


def _window_extent(
    case: Case, plane: str, window: tuple[slice, slice]
) -> tuple[float, float, float, float]:
    (dz, dy, dx), (oz, oy, ox) = case.grid.spacing_mm, case.grid.origin_mm
    rows, cols = window
    axes = {
        "axial": ((oy, dy), (ox, dx)),
        "coronal": ((oz, dz), (ox, dx)),
        "sagittal": ((oz, dz), (oy, dy)),
    }
    (ro, rd), (co, cd) = axes[plane]
    r0, r1 = ro + (rows.start - 0.5) * rd, ro + (rows.stop - 0.5) * rd
    c0, c1 = co + (cols.start - 0.5) * cd, co + (cols.stop - 0.5) * cd
    return (c0, c1, r1, r0) if plane == "axial" else (c0, c1, r0, r1)


def _colour_max(case: Case, dose_cube: np.ndarray) -> float:
    return float(max(dose_cube.max(), 1.1 * case.prescription_gy))


def plane_figures(case: Case, dose_cube: np.ndarray, title: str = "") -> dict[str, Figure]:
    """Figures for the axial, sagittal and coronal planes through the isocentre."""
    iz, iy, ix = case.grid.index_of(case.isocenter_mm)
    vmax = _colour_max(case, dose_cube)
    out = {}
    for plane, index in (("axial", iz), ("sagittal", ix), ("coronal", iy)):
        fig, ax = plt.subplots(figsize=FIG_SIZE_IN)
        im = _draw(ax, case, dose_cube, plane, index, vmax)
        fig.colorbar(im, ax=ax, label=COLOURBAR_LABEL)
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"{title} {plane}".strip())
        fig.tight_layout()
        out[plane] = fig
    return out


def plane_images(case: Case, dose_cube: np.ndarray, title: str = "") -> dict[str, bytes]:
    """PNG bytes for the axial, sagittal and coronal planes through the isocentre."""
    return {k: _png(f) for k, f in plane_figures(case, dose_cube, title).items()}


def structure_crops(case: Case, dose_cube: np.ndarray) -> dict[str, bytes]:
    """Per-structure axial crops (structure extent + 5 px margin) through each centroid."""
    vmax = _colour_max(case, dose_cube)
    out = {}
    for s in case.structures:
        if s.kind is StructureKind.EXTERNAL or s.name == "NormalTissue":
            continue
        zyx = np.stack(np.unravel_index(s.voxel_indices, case.grid.shape), axis=1)
        iz = round(float(zyx[:, 0].mean()))
        mask = s.mask(case.grid)[iz]
        if not mask.any():  # a concave structure may miss its own centroid slice
            iz = int(np.median(zyx[:, 0]))
            mask = s.mask(case.grid)[iz]
        ys, xs = np.nonzero(mask)
        ny, nx = mask.shape
        window = (
            slice(max(0, ys.min() - CROP_MARGIN_PX), min(ny, ys.max() + 1 + CROP_MARGIN_PX)),
            slice(max(0, xs.min() - CROP_MARGIN_PX), min(nx, xs.max() + 1 + CROP_MARGIN_PX)),
        )
        fig, ax = plt.subplots(figsize=FIG_SIZE_IN)
        im = _draw(ax, case, dose_cube, "axial", iz, vmax, window)
        fig.colorbar(im, ax=ax, label=COLOURBAR_LABEL)
        ax.set_title(f"{s.name} (axial crop)")
        fig.tight_layout()
        out[s.name] = _png(fig)
    return out


def dvh_plot(
    levels_gy: np.ndarray, curves: dict[str, np.ndarray], title: str = "Cumulative DVH"
) -> bytes:
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for k, (name, v) in enumerate(curves.items()):
        ax.plot(levels_gy, v, color=COLORS[k % len(COLORS)], label=name)
    ax.set_xlabel("Dose [Gy]")
    ax.set_ylabel("Volume [%]")
    ax.set_ylim(0, 101)
    ax.set_xlim(0, float(levels_gy[-1]) if len(levels_gy) else 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def dose_images(plan: PlanDose, with_dvh: bool = False) -> dict[str, bytes]:
    """Every image of one plan, rendered once: the three planes (``axial``, ``sagittal``,
    ``coronal``), ``crop_<structure>`` for each organ and target, and ``dvh`` on request.
    The vision evaluator, the evaluator's stored images and the report all take these."""
    cube = plan.cube()
    images = dict(plane_images(plan.case, cube))
    images.update({f"crop_{k}": v for k, v in structure_crops(plan.case, cube).items()})
    if with_dvh:
        levels = dvh_levels(float(plan.dose_rows.max()), 0.25)
        images["dvh"] = dvh_plot(levels, plan.dvh_curves(levels))
    return images
