"""Import a patient: one CT series and one RTSTRUCT from a folder, validated, de-identified.

RadPilot checks the files itself — that the folder holds DICOM, a single axial CT series without
missing, duplicate or unevenly spaced slices, and one structure set that references that series
and its frame of reference, with non-empty contours for every structure the protocol uses — and
then lets pyRadPlan's DICOM importer read the CT and rasterise the contours. Structure kinds come
from the ROIs' interpreted types (PTV/CTV/GTV: target, EXTERNAL: external, anything else: organ at
risk), and the protocol's ``structures:`` mapping renames ROIs or overrides their kind. Beams,
bixel size, dose grid and isocentre come from the protocol's ``beams:`` (isocentre: the targets'
centroid unless given); the dose influence matrix is pyRadPlan's.

Only what planning needs is kept: HU, structure masks, the grid, and the study, series and
frame-of-reference UIDs (so an exported RTDOSE lines up with the hospital's CT). No patient name,
id, birth date, study date, description or other free text enters the case, its id, the logs or
anything derived from it. Every failure is a ``DicomImportError`` saying what to fix, raised before
anything is stored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radpilot.case import DERIVED, Case, StructureKind
from radpilot.case_store import CaseStore
from radpilot.contours import AxisGrid, by_slice, contour_volume_cc, rasterise
from radpilot.errors import DicomImportError
from radpilot.protocol import Protocol, ProtocolError

log = logging.getLogger(__name__)
TARGET_TYPES = {"PTV", "CTV", "GTV"}
EXTERNAL_TYPES = {"EXTERNAL"}
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
MAX_FILES = 5000
IMPORTER_VERSION = 3  # 3: RadPilot rasterises the contours (voxel fractions, holes, overlaps)


@dataclass
class RoiInfo:
    number: int
    name: str
    interpreted_type: str
    contours: int  # closed contours with at least 3 points


@dataclass
class DicomScan:
    ct_files: list[Path]  # sorted inferior to superior
    rtstruct: Path
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    slice_spacing_mm: float
    rois: dict[str, RoiInfo] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)


def _read_headers(folder: Path) -> list[tuple[Path, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        raise DicomImportError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if len(files) > MAX_FILES:
        raise DicomImportError(f"{folder} holds {len(files)} files; at most {MAX_FILES} are read")
    out = []
    for p in files:
        try:
            out.append((p, pydicom.dcmread(p, stop_before_pixels=True)))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
    if not out:
        raise DicomImportError(
            f"no DICOM file found in {folder.name or folder} ({len(files)} file(s) read): give "
            "the folder with the CT series and its RTSTRUCT"
        )
    return out


def _ct_series(headers: list[tuple[Path, Any]]) -> dict[str, list[tuple[Path, Any]]]:
    series: dict[str, list[tuple[Path, Any]]] = {}
    for p, ds in headers:
        if getattr(ds, "Modality", "") == "CT":
            series.setdefault(str(ds.SeriesInstanceUID), []).append((p, ds))
    return series


def _referenced_series(rs: Any) -> tuple[set[str], set[str]]:
    """(series UIDs, frame-of-reference UIDs) an RTSTRUCT refers to."""
    series, frames = set(), set()
    for fr in getattr(rs, "ReferencedFrameOfReferenceSequence", []):
        frames.add(str(getattr(fr, "FrameOfReferenceUID", "")))
        for st in getattr(fr, "RTReferencedStudySequence", []):
            for se in getattr(st, "RTReferencedSeriesSequence", []):
                series.add(str(getattr(se, "SeriesInstanceUID", "")))
    for roi in getattr(rs, "StructureSetROISequence", []):
        if getattr(roi, "ReferencedFrameOfReferenceUID", None):
            frames.add(str(roi.ReferencedFrameOfReferenceUID))
    return series - {""}, frames - {""}


def _short(uid: str) -> str:
    return "…" + uid[-12:]


MAX_MATRIX = 4096  # rows or columns of a CT slice


def check_pixels(p: Path) -> None:
    """One CT slice's pixel data is complete and its rescale usable; DicomImportError names the
    file otherwise (before any of it reaches the importer)."""
    import pydicom

    try:
        ds = pydicom.dcmread(p)
        pixel_bytes = ds.get("PixelData")
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise DicomImportError(
            f"CT slice {p.name} cannot be read ({type(exc).__name__}): export the series again"
        ) from None
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    bits = int(getattr(ds, "BitsAllocated", 0) or 0)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if not (0 < rows <= MAX_MATRIX and 0 < cols <= MAX_MATRIX):
        raise DicomImportError(
            f"CT slice {p.name} is {rows} x {cols} pixels; 1..{MAX_MATRIX} rows and columns"
        )
    if bits not in (8, 16, 32) or samples != 1:
        raise DicomImportError(
            f"CT slice {p.name} has BitsAllocated {bits} and SamplesPerPixel {samples}: a CT "
            "slice is greyscale (1 sample) of 8, 16 or 32 bits"
        )
    if pixel_bytes is None:
        raise DicomImportError(f"CT slice {p.name} has no PixelData")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        expected = rows * cols * (bits // 8) * samples * frames
        if len(pixel_bytes) < expected:
            raise DicomImportError(
                f"CT slice {p.name}: PixelData holds {len(pixel_bytes)} bytes, Rows x Columns x "
                f"BitsAllocated/8 = {expected}: the file is truncated or corrupt; export it again"
            )
    for tag, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = getattr(ds, tag, default)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or (tag == "RescaleSlope" and value == 0):
            raise DicomImportError(
                f"CT slice {p.name} has {tag} {raw!r}: it must be a finite number"
                + (" other than 0" if tag == "RescaleSlope" else "")
            )


def _check_slices(files: list[tuple[Path, Any]]) -> tuple[list[Path], float]:
    first = files[0][1]
    for p, _ in files:
        check_pixels(p)
    for p, ds in files:
        iop = np.array([float(v) for v in getattr(ds, "ImageOrientationPatient", [])])
        if iop.shape != (6,) or not np.allclose(iop, AXIAL, atol=1e-3):
            raise DicomImportError(
                f"unsupported orientation {list(np.round(iop, 3))} in CT slice {p.name}: "
                "RadPilot plans on axial CT slices with ImageOrientationPatient [1,0,0,0,1,0] "
                "(head-first or feet-first supine, not tilted)"
            )
        for attr in ("Rows", "Columns", "PixelSpacing"):
            if getattr(ds, attr, None) != getattr(first, attr, None):
                raise DicomImportError(
                    f"CT slice {p.name} has a different {attr} from the rest of the series; "
                    "give one consistent CT series"
                )
        if getattr(ds, "ImagePositionPatient", None) is None:
            raise DicomImportError(f"CT slice {p.name} has no ImagePositionPatient")
    zs = np.array([float(ds.ImagePositionPatient[2]) for _, ds in files])
    order = np.argsort(zs)
    zs = zs[order]
    if len(zs) < 2:
        raise DicomImportError("the CT series has a single slice; a 3-D series is needed")
    gaps = np.diff(zs)
    dup = np.where(gaps < 1e-3)[0]
    if dup.size:
        raise DicomImportError(
            f"duplicate CT slices at z = {zs[dup[0]]:.2f} mm ({dup.size + 1} files share a "
            "position): remove the duplicates"
        )
    step = float(np.median(gaps))
    missing = np.where(gaps > 1.5 * step)[0]
    if missing.size:
        k = int(missing[0])
        raise DicomImportError(
            f"missing CT slice(s) between z = {zs[k]:.2f} and {zs[k + 1]:.2f} mm (spacing "
            f"{step:.2f} mm elsewhere): send the complete series"
        )
    if float(np.max(np.abs(gaps - step))) > max(0.01 * step, 0.01):
        raise DicomImportError(
            f"uneven CT slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm): RadPilot needs "
            "equally spaced slices; resample the series"
        )
    xy = {
        (round(float(ds.ImagePositionPatient[0]), 2), round(float(ds.ImagePositionPatient[1]), 2))
        for _, ds in files
    }
    if len(xy) > 1:
        raise DicomImportError("CT slices are not aligned in x/y (ImagePositionPatient varies)")
    return [files[i][0] for i in order], step


def _rois(rs: Any) -> dict[str, RoiInfo]:
    names = {int(r.ROINumber): str(r.ROIName) for r in getattr(rs, "StructureSetROISequence", [])}
    types = {
        int(o.ReferencedROINumber): str(getattr(o, "RTROIInterpretedType", "") or "").upper()
        for o in getattr(rs, "RTROIObservationsSequence", [])
    }
    counts: Counter[int] = Counter()
    for rc in getattr(rs, "ROIContourSequence", []):
        for c in getattr(rc, "ContourSequence", []):
            if int(getattr(c, "NumberOfContourPoints", 0) or 0) >= 3:
                counts[int(rc.ReferencedROINumber)] += 1
    out: dict[str, RoiInfo] = {}
    for number, name in names.items():
        if name in out:
            raise DicomImportError(f"two ROIs are named {name!r}; ROI names must be unique")
        out[name] = RoiInfo(number, name, types.get(number, ""), counts[number])
    return out


def scan_folder(folder: str | Path) -> DicomScan:
    """Find and check the CT series and RTSTRUCT in ``folder`` (recursively)."""
    folder = Path(folder)
    headers = _read_headers(folder)
    modalities = Counter(str(getattr(ds, "Modality", "?")) for _, ds in headers)
    series = _ct_series(headers)
    structs = [(p, ds) for p, ds in headers if getattr(ds, "Modality", "") == "RTSTRUCT"]
    if not series:
        others = sorted(m for m in modalities if m not in ("RTSTRUCT", "RTDOSE", "RTPLAN"))
        if others:
            raise DicomImportError(
                f"unsupported modality {', '.join(others)}: RadPilot plans on a CT series "
                "(Modality CT); no CT images were found"
            )
        raise DicomImportError("no CT series found: send the planning CT with the RTSTRUCT")
    if not structs:
        raise DicomImportError("no RTSTRUCT found: send the structure set with the CT series")
    referencing = []
    for p, rs in structs:
        ser, _ = _referenced_series(rs)
        referencing.append((p, rs, ser & set(series)))
    matched = [(p, rs) for p, rs, hit in referencing if hit]
    if not matched:
        refs = sorted({s for _, rs in structs for s in _referenced_series(rs)[0]})
        raise DicomImportError(
            "the RTSTRUCT references CT series "
            + (", ".join(_short(s) for s in refs) if refs else "(none)")
            + f", not the CT series here ({', '.join(_short(s) for s in series)}): send the CT "
            "series the structures were drawn on"
        )
    if len(matched) > 1:
        raise DicomImportError(
            f"{len(matched)} structure sets reference the CT series; keep only the one to plan on"
        )
    rs_path, rs = matched[0]
    series_uid = next(iter(_referenced_series(rs)[0] & set(series)))
    ct = series[series_uid]
    ct_frames = {str(getattr(ds, "FrameOfReferenceUID", "")) for _, ds in ct}
    if len(ct_frames) != 1:
        raise DicomImportError("the CT slices do not share one FrameOfReferenceUID")
    frame = ct_frames.pop()
    _, rs_frames = _referenced_series(rs)
    if rs_frames and frame not in rs_frames:
        raise DicomImportError(
            f"the RTSTRUCT's frame of reference ({', '.join(_short(f) for f in rs_frames)}) is "
            f"not the CT's ({_short(frame)}): the structures belong to another image set"
        )
    ct_files, step = _check_slices(ct)
    scan = DicomScan(
        ct_files=ct_files,
        rtstruct=rs_path,
        study_uid=str(getattr(ct[0][1], "StudyInstanceUID", "")),
        series_uid=series_uid,
        frame_of_reference_uid=frame,
        slice_spacing_mm=step,
        rois=_rois(rs),
    )
    for m, n in modalities.items():
        if m not in ("CT", "RTSTRUCT"):
            scan.ignored[m] += n
    if len(series) > 1:
        scan.ignored["CT (other series)"] += sum(
            len(v) for k, v in series.items() if k != series_uid
        )
    return scan


def _kind_of(roi: RoiInfo, mapping: Any) -> StructureKind:
    if mapping is not None and mapping.kind:
        return StructureKind(mapping.kind)
    t = roi.interpreted_type
    if t in TARGET_TYPES:
        return StructureKind.TARGET
    if t in EXTERNAL_TYPES:
        return StructureKind.EXTERNAL
    if not t:  # no interpreted type: judge by the name, as most TPSs name them
        low = roi.name.lower()
        if any(k in low for k in ("ptv", "ctv", "gtv")):
            return StructureKind.TARGET
        if any(k in low for k in ("body", "external", "skin", "outline")):
            return StructureKind.EXTERNAL
    return StructureKind.OAR


def plan_structures(scan: DicomScan, protocol: Protocol) -> dict[str, tuple[str, StructureKind]]:
    """ROI name -> (RadPilot name, kind) for the ROIs the plan uses; checks the protocol fits."""
    used = protocol.used_structures - set(DERIVED)  # RadPilot derives these itself
    names: dict[str, tuple[str, StructureKind]] = {}
    for roi in scan.rois.values():
        m = protocol.structure_map.get(roi.name)
        new = m.name if m is not None and m.name else roi.name
        names[roi.name] = (new, _kind_of(roi, m))
    by_new = {v[0]: k for k, v in names.items()}
    unknown_map = sorted(set(protocol.structure_map) - set(scan.rois))
    if unknown_map:
        raise ProtocolError(
            f"protocol {protocol.name!r} maps ROI(s) {unknown_map} that the RTSTRUCT lacks; "
            f"it has {sorted(scan.rois)}"
        )
    missing = sorted(used - set(by_new))
    if missing:
        raise ProtocolError(
            f"protocol {protocol.name!r} names structure(s) {missing} that the RTSTRUCT lacks; "
            f"it has {sorted(scan.rois)} — add a 'structures:' mapping to the protocol"
        )
    empty = sorted(by_new[n] for n in used if scan.rois[by_new[n]].contours == 0)
    if empty:
        raise DicomImportError(
            f"ROI(s) {empty} have no closed contour with 3 or more points (empty or degenerate "
            "contours): redraw them or leave them out of the protocol"
        )
    if names[by_new[protocol.target]][1] is not StructureKind.TARGET:
        raise ProtocolError(
            f"the protocol's target {protocol.target!r} is not a target in the RTSTRUCT "
            f"(interpreted type {scan.rois[by_new[protocol.target]].interpreted_type or 'none'}): "
            "set kind: target for it under 'structures:'"
        )
    keep = {roi: v for roi, v in names.items() if v[0] in used or v[1] is StructureKind.EXTERNAL}
    externals = [v[0] for v in keep.values() if v[1] is StructureKind.EXTERNAL]
    if len(externals) > 1:
        raise DicomImportError(
            f"several external contours {sorted(externals)}: mark all but one as oar under "
            "'structures:'"
        )
    return keep


def case_id_for(ct: Any, structures: list[Any], beams: Any, prescription_gy: float) -> str:
    """A content id from what was imported (HU cube and its geometry, structure masks and kinds)
    and how it is planned (beams, prescription): no identifiers, no second read of the files."""
    import SimpleITK

    h = hashlib.sha256()
    h.update(f"importer-{IMPORTER_VERSION}".encode())
    image = ct.cube_hu
    h.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    h.update(np.ascontiguousarray(SimpleITK.GetArrayFromImage(image)).tobytes())
    for s in structures:
        h.update(f"{s.name}:{s.kind.value}".encode())
        h.update(np.ascontiguousarray(s.ct_fraction()).tobytes())
    h.update(repr((beams, prescription_gy)).encode())
    return "dicom-" + h.hexdigest()[:16]


def _sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def import_dicom(
    folder: str | Path, protocol: Protocol, store: CaseStore | None = None
) -> tuple[Case, list[str]]:
    """The case and import notes. Raises DicomImportError / ProtocolError. With a ``store``
    that already holds this content (same images, contours, beams), the stored case is returned
    instead of computing its dose influence again; otherwise the case is not stored here."""
    from radpilot.cases.engine import BeamSetup, build_contoured_case, pyradplan

    scan = scan_folder(folder)
    keep = plan_structures(scan, protocol)
    notes = [f"ignored {n} {m} file(s)" for m, n in sorted(scan.ignored.items())]
    notes += [f"ROI {r} not used by the protocol" for r in sorted(set(scan.rois) - set(keep))]
    pyradplan()
    from pyRadPlan.io.dicom import DicomImporter

    with tempfile.TemporaryDirectory(prefix="radpilot-dicom-") as tmp:
        for k, p in enumerate(scan.ct_files):  # only the chosen series
            os.symlink(p.resolve(), Path(tmp) / f"ct{k:05d}.dcm")
        try:
            ct = DicomImporter(tmp).load_ct()
        except Exception as exc:  # pyRadPlan's own complaint, without paths or identifiers
            raise DicomImportError(f"the DICOM importer could not read the CT: {exc}") from None
    structures, volume_notes = contour_structures(scan, keep, ct)
    notes += volume_notes
    b = protocol.beams
    gantry = b.gantry_deg if b else tuple(40.0 * k for k in range(9))
    beams = BeamSetup(
        gantry_deg=gantry,
        couch_deg=b.couch_deg if b else (),
        bixel_mm=b.bixel_mm if b else 5.0,
        dose_grid_mm=b.dose_grid_mm if b else 5.0,
        isocenter_xyz_mm=b.isocenter_mm if b else None,
    )
    if not b:
        notes.append("no beams in the protocol: 9 coplanar fields 40 degrees apart")
    case_id = case_id_for(ct, structures, beams, protocol.prescription_gy)
    if store is not None and case_id in store:
        return store.load(case_id), [*notes, "already imported: the stored case is used"]
    case = build_contoured_case(
        "dicom",
        ct,
        structures,
        beams,
        protocol.prescription_gy,
        {
            "builder": "dicom",
            "source": "imported CT + RTSTRUCT; pyRadPlan 0.5.0 photon pencil-beam",
            "dicom": {
                "study_uid": scan.study_uid,
                "series_uid": scan.series_uid,
                "frame_of_reference_uid": scan.frame_of_reference_uid,
                "rtstruct_uid": _sop_uid(scan.rtstruct),
                "slices": len(scan.ct_files),
                "slice_spacing_mm": scan.slice_spacing_mm,
            },
            "roi_map": {roi: [n, k.value] for roi, (n, k) in keep.items()},
            "import_notes": notes,
        },
    )
    case.case_id = case_id
    return case, notes


VOLUME_WARNING = 0.02  # rasterised vs contour volume


def _contours_by_roi(rs: Any) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {}
    for rc in getattr(rs, "ROIContourSequence", []):
        polys = out.setdefault(int(rc.ReferencedROINumber), [])
        for c in getattr(rc, "ContourSequence", []):
            kind = str(getattr(c, "ContourGeometricType", "CLOSED_PLANAR") or "CLOSED_PLANAR")
            data = np.asarray([float(v) for v in getattr(c, "ContourData", [])], dtype=np.float64)
            if kind != "CLOSED_PLANAR" or data.size < 9 or data.size % 3:
                continue
            polys.append(data.reshape(-1, 3))
    return out


def contour_structures(
    scan: DicomScan, keep: dict[str, tuple[str, StructureKind]], ct: Any
) -> tuple[list[Any], list[str]]:
    """The protocol's ROIs rasterised by RadPilot on the CT grid (voxel fractions, holes by the
    even-odd rule, overlaps kept), and a note per ROI comparing the rasterised volume with the
    contours' own volume (a warning beyond 2 %)."""
    from radpilot.cases.engine import MaskedStructure

    img = ct.cube_hu
    direction = np.asarray(img.GetDirection(), dtype=float)
    if direction.size != 9 or not np.allclose(direction.reshape(3, 3), np.eye(3), atol=1e-6):
        raise DicomImportError("the CT is not axial with identity orientation; reslice it first")
    ox, oy, oz = (float(v) for v in img.GetOrigin())
    sx, sy, sz = (float(v) for v in img.GetSpacing())
    nx, ny, nz = (int(v) for v in img.GetSize()[:3])
    axes = (AxisGrid(oz, sz, nz), AxisGrid(oy, sy, ny), AxisGrid(ox, sx, nx))
    import pydicom

    rs = pydicom.dcmread(scan.rtstruct, stop_before_pixels=True)
    contours = _contours_by_roi(rs)
    voxel_cc = sx * sy * sz / 1000.0
    structures, notes = [], []
    for roi, (name, kind) in keep.items():
        slices = by_slice(contours.get(scan.rois[roi].number, []), axes[0], roi)
        fraction = rasterise(slices, axes)
        if not (fraction >= 0.5).any():
            raise DicomImportError(
                f"ROI {roi!r} covers no CT voxel (degenerate or outside the image): redraw it"
            )
        raster_cc = float(fraction.sum(dtype=np.float64)) * voxel_cc
        contour_cc = contour_volume_cc(slices, sz)
        diff = (raster_cc - contour_cc) / contour_cc if contour_cc > 0 else 0.0
        note = (
            f"{name}: {raster_cc:.2f} cc on the CT grid, {contour_cc:.2f} cc by its contours "
            f"({100 * diff:+.1f} %)"
        )
        if abs(diff) > VOLUME_WARNING:
            note = "WARNING " + note + ": check the contours (self-intersections, stray points)"
        notes.append(note)
        structures.append(
            MaskedStructure(
                name,
                kind,
                fraction >= 0.5,
                fraction=fraction,
                extra={"contour_cc": round(contour_cc, 3)},
            )
        )
    return structures, notes
