"""Dose images: valid PNGs of the expected size, colour bar in Gy, crops for each structure."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from radpilot.case import Case
from radpilot.dosimetry import dvh_levels
from radpilot.evaluation import images
from radpilot.evaluation.metrics import PlanDose

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(case: Case) -> PlanDose:
    dose = np.full(case.row_voxels.size, 5.0, dtype=np.float32)
    dose[case.rows_of("PTV")] = 50.0
    return PlanDose(case, dose)


def test_plane_images_are_pngs_with_a_colour_bar(analytic_case: Case) -> None:
    cube = _plan(analytic_case).cube()
    figs = images.plane_figures(analytic_case, cube)
    assert set(figs) == {"axial", "sagittal", "coronal"}
    for fig in figs.values():
        labels = [ax.get_ylabel() for ax in fig.axes]
        assert images.COLOURBAR_LABEL in labels  # the colour bar axis
    pngs = images.plane_images(analytic_case, cube)
    for data in pngs.values():
        assert data.startswith(PNG_MAGIC)
        img = Image.open(io.BytesIO(data))
        assert img.size == (600, 500)


def test_structure_crops_and_dvh_plot(analytic_case: Case) -> None:
    plan = _plan(analytic_case)
    crops = images.structure_crops(analytic_case, plan.cube())
    assert set(crops) == {"PTV", "Core"}  # external and derived structures are not cropped
    for data in crops.values():  # three panels side by side: axial, sagittal, coronal
        assert Image.open(io.BytesIO(data)).size == (int(images.CROP_FIG_WIDTH_IN * 100), 500)
    levels = dvh_levels(55.0, 1.0)
    png = images.dvh_plot(levels, plan.dvh_curves(levels))
    assert png.startswith(PNG_MAGIC)


def test_dvh_table_text(analytic_case: Case) -> None:
    table = _plan(analytic_case).dvh_table(step_gy=10.0)
    text = table.to_text()
    assert text.splitlines()[0].startswith("dose_Gy | PTV | Core")
    j = table.structures.index("PTV")
    assert table.volume_pct[0, j] == 100.0 and table.volume_pct[-1, j] == 0.0
