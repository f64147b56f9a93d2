"""OptimizerService: protobuf in, core call, protobuf out. No physics here."""

from __future__ import annotations

import json

import grpc

from radpilot.delivery.mlc import DEFAULT_MLC, load_mlc
from radpilot.delivery.sequencing import SequencingSettings
from radpilot.loop.record import FmoStats
from radpilot.v1 import optimizer_pb2, optimizer_pb2_grpc, types_pb2
from radpilot.wire import from_ndarray, to_ndarray
from services.common.convert import fmo_stats_to_proto, helpers_from_proto, terms_from_proto
from services.optimizer.core import OptimizerCore


class OptimizerServicer(optimizer_pb2_grpc.OptimizerServiceServicer):
    def __init__(self, core: OptimizerCore, replica: str) -> None:
        self.core = core
        self.replica = replica

    def PrepareCase(
        self, request: optimizer_pb2.PrepareCaseRequest, context: grpc.ServicerContext
    ) -> optimizer_pb2.PrepareCaseResponse:
        if not request.case_id:
            raise ValueError("case_id is empty: create the case first and send its id")
        _, p = self.core.prepare(request.case_id)
        return optimizer_pb2.PrepareCaseResponse(
            case_id=p.case_id,
            rows=p.rows,
            beamlets=p.beamlets,
            nnz=p.nnz,
            backend=p.backend,
            seconds=p.seconds,
        )

    def Optimize(
        self, request: optimizer_pb2.OptimizeRequest, context: grpc.ServicerContext
    ) -> optimizer_pb2.OptimizeResponse:
        if not request.case_id:
            raise ValueError("case_id is empty: create the case first and send its id")
        warm = from_ndarray(request.warm_start) if request.HasField("warm_start") else None
        out = self.core.optimize(
            request.case_id,
            terms_from_proto(list(request.objectives)),
            request.normalize_to,
            warm,
            request.max_iterations,
            request.prescription_gy,
            request.coverage_pct,
            helpers_from_proto(list(request.helpers)),
        )
        return optimizer_pb2.OptimizeResponse(
            stats=fmo_stats_to_proto(FmoStats.from_json(out.result.stats())),
            fluence=to_ndarray(out.result.fluence),
            dose=types_pb2.ArtefactRef(
                case_id=request.case_id, path=out.dose_path, sha256=out.dose_sha256
            ),
            replica=self.replica,
            case_load_seconds=out.case_load_seconds,
        )

    def Sequence(
        self, request: optimizer_pb2.SequenceRequest, context: grpc.ServicerContext
    ) -> optimizer_pb2.SequenceResponse:
        if not request.case_id:
            raise ValueError("case_id is empty: create the case first and send its id")
        if not request.HasField("fluence"):
            raise ValueError("fluence is missing: send the plan's fluence as Optimize returned it")
        if request.fractions < 0:
            raise ValueError(f"fractions must be positive (0 = 2 Gy each), got {request.fractions}")
        settings = SequencingSettings(
            mlc=request.mlc or DEFAULT_MLC,
            levels=request.levels or 10,
            min_segment_mu=request.min_segment_mu,
            refit=request.refit,
            max_segments_per_beam=request.max_segments_per_beam,
            apertures=not request.keep_leaves,
        )
        load_mlc(settings.mlc)  # an unknown model: INVALID_ARGUMENT naming the shipped ones
        plan, fluence, path, sha = self.core.sequence(
            request.case_id,
            from_ndarray(request.fluence),
            settings,
            fractions=request.fractions,
            normalize_to=request.normalize_to,
            prescription_gy=request.prescription_gy,
            coverage_pct=request.coverage_pct,
            terms=terms_from_proto(list(request.objectives)) if request.objectives else None,
            helpers=helpers_from_proto(list(request.helpers)),
        )
        return optimizer_pb2.SequenceResponse(
            plan_json=json.dumps(plan),
            dose=types_pb2.ArtefactRef(case_id=request.case_id, path=path, sha256=sha),
            fluence=to_ndarray(fluence),
            replica=self.replica,
        )
