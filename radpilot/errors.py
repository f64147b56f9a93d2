"""Every domain error RadPilot raises, in one module.

The services map these to gRPC status codes in one place (``services/common/errors.py``); the CLI
maps them to exit codes. Library code raises them and never speaks gRPC.
"""

from __future__ import annotations


# -- bad input (INVALID_ARGUMENT) -----------------------------------------------------------
class CaseError(ValueError):
    """A case is malformed or a structure/beam reference does not exist."""


class ProtocolError(ValueError):
    """A protocol file or text is malformed; the message says which field to fix."""


class MetricError(ValueError):
    """A DVH metric name (D95, V20, mean, max, ...) is malformed or cannot be evaluated."""


class ObjectiveError(ValueError):
    """An objective term (structure, kind, dose, weight) is malformed."""


class HelperError(ValueError):
    """A helper structure definition (ring, minus) is malformed or names what a case lacks."""


class DeliveryError(ValueError):
    """An MLC model, sequencing setting or beam geometry that cannot give a deliverable plan."""


class WireError(ValueError):
    """An array message is malformed or too large."""


class DicomImportError(ValueError):
    """A DICOM folder or upload cannot be imported; the message names the file and the fault."""


class ReferencePlanError(ValueError):
    """A reference plan file is malformed."""


# -- missing things (NOT_FOUND) -------------------------------------------------------------
class CaseNotFoundError(KeyError):
    """A case or artefact is not in the case store."""


# -- the system is not ready for the request (FAILED_PRECONDITION) --------------------------
class FailedPreconditionError(RuntimeError):
    """The request is valid but the system is not in a state to serve it (say what to do first)."""


class AgentNotConfiguredError(FailedPreconditionError):
    """An agent needs something this process lacks (an LLM endpoint)."""


# -- the request clashes with what exists (ALREADY_EXISTS) -----------------------------------
class ConflictError(RuntimeError):
    """The request reuses an identifier (an idempotency key) for something different."""


# -- storage is full (RESOURCE_EXHAUSTED) or cannot be written (FAILED_PRECONDITION) ---------
class StorageFullError(RuntimeError):
    """The case store or job database has no space left; nothing was written."""


class StorageReadOnlyError(FailedPreconditionError):
    """The case store or job database cannot be written (read-only or no permission)."""


# -- a dependency is down (UNAVAILABLE) ----------------------------------------------------
class UnavailableError(RuntimeError):
    """A dependency (a service, a device) is down or overloaded; the caller may retry."""


class BackendUnavailableError(UnavailableError):
    """The requested compute backend (CuPy / a GPU) is not available in this process."""


# -- a planning job could not go on -------------------------------------------------------
class StepFailedError(RuntimeError):
    """One step of the outer loop failed for good (the message is what the job records)."""
