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
from collections.abc import Callable
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
    ax.imshow(ct, cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], extent=extent,
              origin=origin)  # fmt: skip
    wash = np.ma.masked_less(dose, 0.1 * case.prescription_gy)
    im = ax.imshow(wash, cmap="jet", vmin=0, vmax=vmax, alpha=0.45, extent=extent, origin=origin)
    _outline(ax, case, plane, index, window, extent, origin, shift=0, width=1.2, style="solid")
    ax.set_xlabel("mm")
    ax.set_ylabel("mm")
    return im


def _outline(
    ax: Any,
    case: Case,
    plane: str,
    index: int,
    window: tuple[slice, slice] | None,
    extent: tuple[float, float, float, float],
    origin: Literal["upper", "lower"],
    shift: int,
    width: float,
    style: str,
    masks: dict[str, np.ndarray] | None = None,
) -> None:
    """Each organ's and target's outline in the slice (a colour per structure, ``shift`` along
    the palette), with a legend entry; ``masks``: the structures' masks, when already built."""
    for k, st in enumerate(case.structures):
        if st.kind is StructureKind.EXTERNAL or st.name in DERIVED:
            continue
        m = _slice(masks[st.name] if masks else st.mask(case.grid), plane, index)
        if window is not None:
            m = m[window]
        if m.any():
            c = COLORS[(k + shift) % len(COLORS)]
            ax.contour(m.astype(float), levels=[0.5], colors=[c], linewidths=width,
                       linestyles=style, extent=extent, origin=origin)  # fmt: skip
            ax.plot([], [], color=c, linewidth=width, linestyle=style, label=st.name)


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


PLAN_STYLES = ("-", "--", ":", "-.")  # the first plan of an overlay solid, then these


def dvh_overlay_plot(levels_gy: np.ndarray, plans: dict[str, dict[str, np.ndarray]]) -> bytes:
    """Several plans' DVHs on one axis: a colour per structure, a line style per plan (the
    first plan solid, the next dashed, dotted, dash-dotted)."""
    fig, ax = _pyplot().subplots(figsize=(7.0, 4.5))
    labels = list(plans)
    first = plans[labels[0]]
    for k, name in enumerate(first):
        c = COLORS[k % len(COLORS)]
        for j, label in enumerate(labels):
            if name in plans[label]:
                ax.plot(levels_gy, plans[label][name], color=c,
                        linestyle=PLAN_STYLES[j % len(PLAN_STYLES)],
                        linewidth=1.5 if j == 0 else 1, label=name if j == 0 else None)  # fmt: skip
    for j, label in enumerate(labels):
        ax.plot([], [], color="k", linestyle=PLAN_STYLES[j % len(PLAN_STYLES)], label=label)
    styles = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dotted"}
    title = "Cumulative DVH: " + ", ".join(
        f"{label} ({styles[PLAN_STYLES[j % len(PLAN_STYLES)]]})" for j, label in enumerate(labels)
    )
    if len(title) > 70:  # the legend names the plans' line styles
        title = "Cumulative DVH, one line style per plan"
    return _dvh_figure(fig, ax, levels_gy, title, legend_size=7)


def dvh_compare_plot(
    levels_gy: np.ndarray,
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    labels: tuple[str, str],
) -> bytes:
    """Two plans' DVHs on one axis: ``after`` solid, ``before`` dashed, a colour per structure."""
    return dvh_overlay_plot(levels_gy, {labels[1]: after, labels[0]: before})


ISODOSE_PCT = (107, 100, 95, 80, 50, 30)  # isodose lines in the report, % of the prescription
ISODOSE_COLOURS = ("#ff00ff", "#e00000", "#ff8c00", "#e6c200", "#00b000", "#00a0ff")
CT_WINDOW_HU = (-200.0, 300.0)  # width 500, level 50
BODY_MARGIN_PX = 3
# the patient's side at each image edge (left, right, top, bottom), LPS frame: axial images
# show the patient's right on the left (radiological convention) and anterior up
ORIENTATION = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def ct_window_text() -> str:
    lo, hi = CT_WINDOW_HU
    return f"CT window {lo:g} to {hi:g} HU (width {hi - lo:g}, level {(hi + lo) / 2:g})"


def _body_box(case: Case) -> tuple[slice, slice, slice] | None:
    """The body's bounding box (z, y, x) plus a margin, or None when the case has no body."""
    ext = case.external
    if ext is None or not ext.voxel_indices.size:
        return None
    zyx = np.unravel_index(ext.voxel_indices, case.grid.shape)
    return tuple(  # type: ignore[return-value]
        slice(max(0, int(a.min()) - BODY_MARGIN_PX), min(n, int(a.max()) + 1 + BODY_MARGIN_PX))
        for a, n in zip(zyx, case.grid.shape, strict=True)
    )


def _plane_window(box: tuple[slice, slice, slice] | None, plane: str) -> tuple[slice, slice] | None:
    if box is None:
        return None
    z, y, x = box
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[plane]


def _label_edges(ax: Any, plane: str) -> None:
    left, right, top, bottom = ORIENTATION[plane]
    style = {"transform": ax.transAxes, "fontsize": 11, "fontweight": "bold", "color": "#ffff66"}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _isodose_figure(
    case: Case,
    dose_cube: np.ndarray,
    prescription_gy: float,
    plane: str,
    index: int,
    title: str,
    box: tuple[slice, slice, slice] | None,
    masks: dict[str, np.ndarray],
    mark: tuple[float, float] | None = None,
) -> bytes:
    """One plane: the CT, isodose lines at ``ISODOSE_PCT`` of the prescription, the structures'
    outlines (``masks``), cropped to the body (``box``), with the patient's sides at the
    edges."""
    plt = _pyplot()
    origin: Literal["upper", "lower"] = "upper" if plane == "axial" else "lower"
    window = _plane_window(box, plane)
    ct, dose = _slice(case.ct_hu, plane, index), _slice(dose_cube, plane, index)
    extent = _extent(case, plane)
    if window is not None:
        ct, dose = ct[window], dose[window]
        extent = _window_extent(case, plane, window)
    fig, ax = plt.subplots(figsize=FIG_SIZE_IN)
    ax.imshow(ct, cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], extent=extent,
              origin=origin)  # fmt: skip
    for pct, colour in zip(ISODOSE_PCT, ISODOSE_COLOURS, strict=True):
        level = prescription_gy * pct / 100.0
        if float(dose.max()) >= level:
            ax.contour(dose, levels=[level], colors=[colour], linewidths=1.6, extent=extent,
                       origin=origin)  # fmt: skip
        ax.plot([], [], color=colour, linewidth=1.6, label=f"{pct} % ({level:.1f} Gy)")
    _outline(ax, case, plane, index, window, extent, origin, 1, 0.9, "dashed", masks)
    if mark is not None:
        ax.plot([mark[0]], [mark[1]], marker="x", color="#ffffff", markersize=10, mew=2.5)
        ax.plot([mark[0]], [mark[1]], marker="x", color="#ff00ff", markersize=8, mew=1.5,
                label="global maximum")  # fmt: skip
    _label_edges(ax, plane)
    ax.set_xlabel("mm")
    ax.set_ylabel("mm")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    return _png(fig)


def isodose_slicer(plan: PlanDose, prescription_gy: float) -> Callable[[int], bytes]:
    """A function rendering axial slice ``index`` of a plan as a PNG: CT, isodose lines,
    structure outlines, cropped to the body (a review page scrolls through these). The dose
    cube, the body's box and the masks are built once, for every slice it renders."""
    case, cube = plan.case, plan.cube()
    box, masks = _body_box(case), _outlined_masks(case)
    nz = case.grid.shape[0]

    def render(index: int) -> bytes:
        if not 0 <= index < nz:
            raise ValueError(f"slice {index} is out of range: the dose grid has {nz} slices")
        z_mm = case.grid.origin_mm[0] + index * case.grid.spacing_mm[0]
        title = f"axial slice {index + 1} of {nz}, z = {z_mm:.1f} mm"
        return _isodose_figure(case, cube, prescription_gy, "axial", index, title, box, masks)

    return render


def _outlined_masks(case: Case) -> dict[str, np.ndarray]:
    """The masks of the structures the isodose images outline (not the body, not derived)."""
    return {
        st.name: st.mask(case.grid)
        for st in case.structures
        if st.kind is not StructureKind.EXTERNAL and st.name not in DERIVED
    }


def _in_plane(point_zyx: tuple[float, float, float], plane: str) -> tuple[float, float]:
    """A world point's image coordinates (horizontal, vertical) in a plane's extent."""
    z, y, x = point_zyx
    return {"axial": (x, y), "coronal": (x, z), "sagittal": (y, z)}[plane]


def isodose_images(plan: PlanDose, prescription_gy: float) -> dict[str, tuple[str, bytes]]:
    """The report's dose images, by name: (caption, PNG). Planes through the isocentre
    (``iso_axial``, ``iso_sagittal``, ``iso_coronal``), through the global maximum
    (``hot_axial``, ``hot_sagittal``; marked) and, axial, through each organ's centroid
    (``oar_<name>``)."""
    case, cube = plan.case, plan.cube()
    grid = case.grid
    out: dict[str, tuple[str, bytes]] = {}
    # built once for every image: the body's box and the outlined structures' masks
    box, masks = _body_box(case), _outlined_masks(case)

    def figure(
        plane: str, index: int, caption: str, mark: tuple[float, float] | None = None
    ) -> tuple[str, bytes]:
        return caption, _isodose_figure(
            case, cube, prescription_gy, plane, index, caption, box, masks, mark
        )

    iz, iy, ix = grid.index_of(case.isocenter_mm)
    for plane, index, axis_mm in (
        ("axial", iz, ("z", case.isocenter_mm[0])),
        ("sagittal", ix, ("x", case.isocenter_mm[2])),
        ("coronal", iy, ("y", case.isocenter_mm[1])),
    ):
        caption = f"{plane} through the isocentre ({axis_mm[0]} = {axis_mm[1]:.0f} mm)"
        out[f"iso_{plane}"] = figure(plane, index, caption)
    spot = plan.hottest_point()
    if spot is not None:
        gy, (x, y, z), where = spot
        hz, _, hx = grid.index_of((z, y, x))
        inside = f", in {', '.join(where)}" if where else ""
        for plane, index in (("axial", hz), ("sagittal", hx)):
            caption = (
                f"{plane} through the global maximum: {gy:.1f} Gy "
                f"({100 * gy / prescription_gy:.0f} %) at x {x:.0f}, y {y:.0f}, z {z:.0f} mm"
                f"{inside}"
            )
            out[f"hot_{plane}"] = figure(plane, index, caption, _in_plane((z, y, x), plane))
    for st in case.structures:
        if st.kind is not StructureKind.OAR or st.name in DERIVED or not st.voxel_indices.size:
            continue
        zyx = np.stack(np.unravel_index(st.voxel_indices, grid.shape), axis=1)
        index = _through_structure(masks[st.name], zyx, "axial")
        z_mm = grid.origin_mm[0] + index * grid.spacing_mm[0]
        caption = f"axial through the centroid of {st.name} (z = {z_mm:.0f} mm)"
        out[f"oar_{st.name}"] = figure("axial", index, caption)
    return out


def goal_trend_plot(iterations: list[int], goals: list[dict[str, Any]], best: int) -> bytes:
    """Each goal's value across the iterations (one panel per goal), its limit dashed, passes
    green and misses red, the reported (best) iteration ringed. ``goals``: label, unit, limit,
    values (one per iteration, None where the goal was not checked), passed (likewise)."""
    plt = _pyplot()
    n = max(1, len(goals))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax, g in zip(axes.ravel(), goals, strict=False):
        pts = [(i, v, ok) for i, v, ok in zip(iterations, g["values"], g["passed"], strict=True)
               if v is not None]  # fmt: skip
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#555555", linewidth=1)
        for i, v, ok in pts:
            ax.plot([i], [v], marker="o", markersize=5, color="#2ca02c" if ok else "#d62728")
            if i == best:
                ax.plot([i], [v], marker="o", markersize=11, fillstyle="none", color="#000000")
        ax.axhline(g["limit"], color="#1f77b4", linestyle="--", linewidth=1)
        # at least 5 % of the limit tall: float noise on a normalised goal is not a trend
        span = [g["limit"], *(p[1] for p in pts)]
        lo, hi = min(span), max(span)
        pad = max(0.05 * abs(g["limit"]), 0.5, hi - lo) / 2
        ax.set_ylim((lo + hi) / 2 - pad - (hi - lo) / 2, (lo + hi) / 2 + pad + (hi - lo) / 2)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(g["label"], fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylabel(g["unit"], fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_xticks(iterations if len(iterations) <= 12 else iterations[:: len(iterations) // 12])
    for ax in axes.ravel()[len(goals) :]:
        ax.axis("off")
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
