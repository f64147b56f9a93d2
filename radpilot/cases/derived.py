"""Structures derived from the delineated ones, as a planner would draw them for optimisation."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt

from radpilot.case import NORMAL_TISSUE, Grid, Structure, StructureKind


def expand(mask: np.ndarray, grid: Grid, margin_mm: float) -> np.ndarray:
    """Isotropic expansion of a boolean ``[z, y, x]`` mask by ``margin_mm``."""
    if margin_mm <= 0:
        return mask.copy()
    return distance_transform_edt(~mask, sampling=grid.spacing_mm) <= margin_mm


def with_normal_tissue(
    structures: list[Structure], grid: Grid, margin_mm: float = 10.0
) -> list[Structure]:
    """Add ``NormalTissue``: the external contour minus every target expanded by ``margin_mm``.

    Spillage objectives go on this structure so that they never pull on target voxels or on
    the dose fall-off just outside them.
    """
    external = next((s for s in structures if s.kind is StructureKind.EXTERNAL), None)
    targets = [s for s in structures if s.kind is StructureKind.TARGET]
    if external is None or not targets:
        return structures
    target_mask = np.zeros(grid.num_voxels, dtype=bool)
    for t in targets:
        target_mask[t.voxel_indices] = True
    keep_out = expand(target_mask.reshape(grid.shape), grid, margin_mm).ravel()
    nt = external.voxel_indices[~keep_out[external.voxel_indices]]
    return [*structures, Structure(NORMAL_TISSUE, StructureKind.OAR, nt)]
