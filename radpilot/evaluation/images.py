"""Dose images for people and for the vision evaluator, rendered with matplotlib (Agg) to PNG bytes.

- ``plane_images``: axial, sagittal and coronal slices through the isocentre: CT in grey, the dose
  as a colour wash (doses under 10 % of the prescription left clear), structure contours, and a
  colour bar in Gy.
- ``structure_crops``: for each non-external structure, the axial, sagittal and coronal slices
  through its centroid, each cropped to the structure's extent plus a 5-pixel margin, side by side
  in one image, with the same colour scale.
- ``dvh_plot``: cumulative DVH curves.

Axial images show anterior up; sagittal and coronal show superior up. Pixel spacing is honoured.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from radpilot.case import DERIVED, Case, StructureKind
from radpilot.dosimetry import dvh_levels
from radpilot.evaluation.metrics import PlanDose

if TYPE_CHECKING:
    import matplotlib.image
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported on first use (a service that never
    renders an image starts without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


FIG_SIZE_IN = (6.0, 5.0)
DPI = 100
CROP_MARGIN_PX = 5
CROP_FIG_WIDTH_IN = 13.0
COLOURBAR_LABEL = "Dose [Gy]"
COLORS = ["#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _pyplot().close(fig)
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
        if s.kind is StructureKind.EXTERNAL or s.name in DERIVED:
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
        fig, ax = _pyplot().subplots(figsize=FIG_SIZE_IN)
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


PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # the cube axis each plane cuts


def _crop_window(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask)
    nr, nc = mask.shape
    return (
        slice(max(0, rows.min() - CROP_MARGIN_PX), min(nr, rows.max() + 1 + CROP_MARGIN_PX)),
        slice(max(0, cols.min() - CROP_MARGIN_PX), min(nc, cols.max() + 1 + CROP_MARGIN_PX)),
    )


def _through_structure(mask3d: np.ndarray, zyx: np.ndarray, plane: str) -> int:
    """The slice of ``plane`` through the structure's centroid (or, for a concave structure that
    misses its own centroid, through its median)."""
    axis = PLANE_AXIS[plane]
    index = round(float(zyx[:, axis].mean()))
    if not _slice(mask3d, plane, index).any():
        index = int(np.median(zyx[:, axis]))
    return index


def structure_crops(case: Case, dose_cube: np.ndarray) -> dict[str, bytes]:
    """Per structure, one image of three panels: axial, sagittal and coronal slices through its
    centroid, each cropped to the structure's extent plus a 5-pixel margin (same colour scale)."""
    vmax = _colour_max(case, dose_cube)
    out = {}
    for s in case.structures:
        if s.kind is StructureKind.EXTERNAL or s.name in DERIVED or not s.voxel_indices.size:
            continue
        mask3d = s.mask(case.grid)
        zyx = np.stack(np.unravel_index(s.voxel_indices, case.grid.shape), axis=1)
        fig, axes = _pyplot().subplots(1, 3, figsize=(CROP_FIG_WIDTH_IN, FIG_SIZE_IN[1]))
        shown = []
        for ax, plane in zip(axes, ("axial", "sagittal", "coronal"), strict=True):
            index = _through_structure(mask3d, zyx, plane)
            window = _crop_window(_slice(mask3d, plane, index))
            shown.append(_draw(ax, case, dose_cube, plane, index, vmax, window))
            ax.set_title(f"{s.name}: {plane}", fontsize=9)
        fig.colorbar(shown[0], ax=list(axes), label=COLOURBAR_LABEL, shrink=0.8)
        out[s.name] = _png(fig)
    return out


def dvh_plot(
    levels_gy: np.ndarray, curves: dict[str, np.ndarray], title: str = "Cumulative DVH"
) -> bytes:
    fig, ax = _pyplot().subplots(figsize=(7.0, 4.5))
    for k, (name, v) in enumerate(curves.items()):
        ax.plot(levels_gy, v, color=COLORS[k % len(COLORS)], label=name)
    return _dvh_figure(fig, ax, levels_gy, title, legend_size=8)


def _dvh_figure(fig: Figure, ax: Any, levels_gy: np.ndarray, title: str, legend_size: int) -> bytes:
    """Axes, grid, legend and title of a cumulative DVH plot, rendered to PNG."""
    ax.set_xlabel("Dose [Gy]")
    ax.set_ylabel("Volume [%]")
    ax.set_ylim(0, 101)
    ax.set_xlim(0, float(levels_gy[-1]) if len(levels_gy) else 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def dvh_compare_plot(
    levels_gy: np.ndarray,
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    labels: tuple[str, str],
) -> bytes:
    """Two plans' DVHs on one axis: ``before`` dashed, ``after`` solid, a colour per structure."""
    fig, ax = _pyplot().subplots(figsize=(7.0, 4.5))
    for k, name in enumerate(after):
        c = COLORS[k % len(COLORS)]
        if name in before:
            ax.plot(levels_gy, before[name], color=c, linestyle="--", linewidth=1)
        ax.plot(levels_gy, after[name], color=c, label=name)
    ax.plot([], [], color="k", linestyle="--", label=labels[0])
    ax.plot([], [], color="k", label=labels[1])
    title = f"Cumulative DVH: {labels[0]} (dashed) and {labels[1]} (solid)"
    return _dvh_figure(fig, ax, levels_gy, title, legend_size=7)


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
