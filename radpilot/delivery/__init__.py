"""Deliverable plans: MLC models, step-and-shoot leaf sequencing and the delivered dose."""

from radpilot.delivery.mlc import DEFAULT_MLC, BeamGrid, MlcModel, load_mlc, shipped_mlcs
from radpilot.delivery.sequencing import (
    BeamSequence,
    Deliverable,
    Segment,
    SequencingSettings,
    deliver,
    protocol_fractions,
)

__all__ = [
    "DEFAULT_MLC",
    "BeamGrid",
    "BeamSequence",
    "Deliverable",
    "MlcModel",
    "Segment",
    "SequencingSettings",
    "deliver",
    "load_mlc",
    "protocol_fractions",
    "shipped_mlcs",
]
