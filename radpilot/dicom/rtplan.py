"""RT Plan export of a sequenced plan, and reading one back to the fluence it delivers.

One beam per field, step-and-shoot: each segment is a pair of control points with the same jaw
and leaf positions, the cumulative meterset rising by the segment's MU (per fraction) between
them. Beam limiting devices: ASYMX and ASYMY jaws and an MLCX whose LeafPositionBoundaries are
the MLC model's. Positions are in the beam limiting device frame at collimator 0: leaves travel
along X (the beam's-eye-view ``x`` of the case's beamlets), leaf pairs stack along Y (``z``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from radpilot.case import Case
from radpilot.delivery.sequencing import Segment, segments_from_json
from radpilot.dicom.write import RTPLAN_STORAGE, RTSTRUCT_STORAGE, SeriesUIDs, _base, _save
from radpilot.errors import DeliveryError


def _ds(**kw: Any) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def _positions(seg: Segment) -> Sequence:
    return Sequence(
        [
            _ds(RTBeamLimitingDeviceType="ASYMX", LeafJawPositions=[*map(_mm, seg.jaw_x_mm)]),
            _ds(RTBeamLimitingDeviceType="ASYMY", LeafJawPositions=[*map(_mm, seg.jaw_y_mm)]),
            _ds(
                RTBeamLimitingDeviceType="MLCX",
                LeafJawPositions=[_mm(v) for v in [*seg.left_mm, *seg.right_mm]],
            ),
        ]
    )


def _mm(v: float) -> str:
    return f"{float(v):.2f}"


def _beam(
    number: int,
    beam: dict[str, Any],
    mlc: dict[str, Any],
    iso_xyz: list[str],
    segments: list[Segment],
) -> Dataset:
    mus = [float(s["mu"]) for s in beam["segments"]]
    total = float(sum(mus))
    devices = Sequence(
        [
            _ds(RTBeamLimitingDeviceType="ASYMX", NumberOfLeafJawPairs=1),
            _ds(RTBeamLimitingDeviceType="ASYMY", NumberOfLeafJawPairs=1),
            _ds(
                RTBeamLimitingDeviceType="MLCX",
                NumberOfLeafJawPairs=len(mlc["leaf_boundaries_mm"]) - 1,
                LeafPositionBoundaries=[_mm(v) for v in mlc["leaf_boundaries_mm"]],
            ),
        ]
    )
    cps = []
    cumulative = 0.0
    for k, (seg, mu) in enumerate(zip(segments, mus, strict=True)):
        start = _ds(ControlPointIndex=2 * k, CumulativeMetersetWeight=f"{cumulative:.4f}")
        start.BeamLimitingDevicePositionSequence = _positions(seg)
        if k == 0:
            start.NominalBeamEnergy = f"{float(mlc['energy_mv']):g}"
            start.GantryAngle = f"{float(beam['gantry_deg']) % 360:g}"
            start.GantryRotationDirection = "NONE"
            start.BeamLimitingDeviceAngle = "0"
            start.BeamLimitingDeviceRotationDirection = "NONE"
            start.PatientSupportAngle = f"{float(beam['couch_deg']) % 360:g}"
            start.PatientSupportRotationDirection = "NONE"
            start.TableTopEccentricAngle = "0"
            start.TableTopEccentricRotationDirection = "NONE"
            start.TableTopVerticalPosition = ""
            start.TableTopLongitudinalPosition = ""
            start.TableTopLateralPosition = ""
            start.IsocenterPosition = iso_xyz
        cumulative += mu
        stop = _ds(ControlPointIndex=2 * k + 1, CumulativeMetersetWeight=f"{cumulative:.4f}")
        cps += [start, stop]
    return _ds(
        BeamNumber=number,
        BeamName=f"F{number}_G{float(beam['gantry_deg']) % 360:g}"[:16],
        BeamDescription=f"gantry {float(beam['gantry_deg']) % 360:g} deg, step-and-shoot",
        BeamType="DYNAMIC",
        RadiationType="PHOTON",
        TreatmentMachineName=str(mlc["machine"])[:16],
        PrimaryDosimeterUnit="MU",
        SourceAxisDistance="1000",
        BeamLimitingDeviceSequence=devices,
        TreatmentDeliveryType="TREATMENT",
        NumberOfWedges=0,
        NumberOfCompensators=0,
        NumberOfBoli=0,
        NumberOfBlocks=0,
        FinalCumulativeMetersetWeight=f"{total:.4f}",
        NumberOfControlPoints=len(cps),
        ControlPointSequence=Sequence(cps),
        ReferencedPatientSetupNumber=1,
    )


def write_rtplan(
    case: Case,
    delivered: dict[str, Any],
    folder: Path,
    uids: SeriesUIDs,
    *,
    target: str,
    prescription_gy: float,
    label: str,
    rtstruct_uid: str = "",
) -> tuple[Path, str]:
    """``RTPLAN.dcm`` for a sequenced plan (``Deliverable.to_json``); returns its path and SOP
    Instance UID (the RTDOSE references it)."""
    summary = delivered["summary"]
    mlc = summary["mlc"]
    beams = [b for b in delivered["beams"] if b["segments"]]
    if not beams:
        raise DeliveryError("the sequenced plan has no segment to export")
    fractions = int(summary["fractions"])
    sop = str(generate_uid())
    ds = Dataset()
    _base(ds, RTPLAN_STORAGE, sop, uids, case)
    ds.Modality = "RTPLAN"
    ds.SeriesInstanceUID = str(generate_uid())
    ds.SeriesNumber = 4
    ds.InstanceNumber = 1
    ds.RTPlanLabel = label[:16] or "RadPilot"
    ds.RTPlanName = label[:64]
    ds.RTPlanDate = ""
    ds.RTPlanTime = ""
    ds.RTPlanGeometry = "PATIENT"
    ds.ApprovalStatus = "UNAPPROVED"
    if rtstruct_uid:
        ds.ReferencedStructureSetSequence = Sequence(
            [_ds(ReferencedSOPClassUID=RTSTRUCT_STORAGE, ReferencedSOPInstanceUID=rtstruct_uid)]
        )
    ds.DoseReferenceSequence = Sequence(
        [
            _ds(
                DoseReferenceNumber=1,
                DoseReferenceStructureType="SITE",
                DoseReferenceDescription=target[:64],
                DoseReferenceType="TARGET",
                TargetPrescriptionDose=f"{prescription_gy:g}",
            )
        ]
    )
    ds.PatientSetupSequence = Sequence(
        [_ds(PatientSetupNumber=1, PatientPosition="HFS", SetupTechnique="ISOCENTRIC")]
    )
    z, y, x = case.isocenter_mm
    iso = [_mm(x), _mm(y), _mm(z)]
    beam_items = []
    for i, b in enumerate(beams, start=1):
        beam_items.append(_beam(i, b, mlc, iso, segments_from_json(b)))
    ds.BeamSequence = Sequence(beam_items)
    ds.FractionGroupSequence = Sequence(
        [
            _ds(
                FractionGroupNumber=1,
                NumberOfFractionsPlanned=fractions,
                NumberOfBeams=len(beams),
                NumberOfBrachyApplicationSetups=0,
                ReferencedBeamSequence=Sequence(
                    [
                        _ds(
                            ReferencedBeamNumber=i,
                            BeamMeterset=f"{sum(float(s['mu']) for s in b['segments']):.4f}",
                        )
                        for i, b in enumerate(beams, start=1)
                    ]
                ),
            )
        ]
    )
    return _save(ds, folder / "RTPLAN.dcm"), sop


def read_rtplan(path: str | Path) -> tuple[list[float], list[list[tuple[float, Segment]]]]:
    """An RT Plan's boundaries-independent content: per beam (in beam order) each segment's MU
    (per fraction) and aperture, from its control point pairs."""
    ds = pydicom.dcmread(str(path))
    gantries: list[float] = []
    beams: list[list[tuple[float, Segment]]] = []
    for beam in ds.BeamSequence:
        gantries.append(float(beam.ControlPointSequence[0].GantryAngle))
        segs: list[tuple[float, Segment]] = []
        cps = list(beam.ControlPointSequence)
        current: dict[str, list[float]] = {}
        for a, b in zip(cps[0::2], cps[1::2], strict=True):
            for item in getattr(a, "BeamLimitingDevicePositionSequence", []):
                current[item.RTBeamLimitingDeviceType] = [float(v) for v in item.LeafJawPositions]
            mu = float(b.CumulativeMetersetWeight) - float(a.CumulativeMetersetWeight)
            leaves = np.asarray(current["MLCX"])
            half = leaves.size // 2
            segs.append(
                (
                    mu,
                    Segment(
                        0.0,
                        leaves[:half],
                        leaves[half:],
                        (current["ASYMX"][0], current["ASYMX"][1]),
                        (current["ASYMY"][0], current["ASYMY"][1]),
                    ),
                )
            )
        beams.append(segs)
    return gantries, beams
