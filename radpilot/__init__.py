"""RadPilot: automated radiotherapy inverse planning.

The ``radpilot`` package is the planning core every service stands on: cases and the case store,
fluence map optimisation, DVH/metrics/protocol evaluation and dose images. It has no gRPC in it;
the services under ``services/`` wrap it.
"""

__version__ = "0.1.0"
