"""OrchestratorService: the public API, mapped onto the orchestrator core."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from typing import Any

import grpc

from radpilot.evaluation.protocol_check import GoalResult
from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc, types_pb2
from services.common.convert import goal_result_to_proto, record_to_proto
from services.orchestrator.core import Orchestrator

MAX_UPLOAD_BYTES = 2 << 30

STATES = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
KINDS = {
    "iteration_started": pb.EVENT_KIND_ITERATION_STARTED,
    "fmo_done": pb.EVENT_KIND_FMO_DONE,
    "evaluated": pb.EVENT_KIND_EVALUATED,
    "proposal": pb.EVENT_KIND_PROPOSAL,
    "finished": pb.EVENT_KIND_FINISHED,
    "failed": pb.EVENT_KIND_FAILED,
    "cancelled": pb.EVENT_KIND_CANCELLED,
    "sequenced": pb.EVENT_KIND_SEQUENCED,
}


def _fmo(d: dict[str, Any] | None) -> types_pb2.FmoStats | None:
    if not d:
        return None
    return types_pb2.FmoStats(
        **{k: v for k, v in d.items() if k in types_pb2.FmoStats.DESCRIPTOR.fields_by_name}
    )


def _terms(items: list[dict[str, Any]]) -> list[types_pb2.ObjectiveTerm]:
    return [types_pb2.ObjectiveTerm(**t) for t in items]


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, core: Orchestrator) -> None:
        self.core = core

    def CreateCase(
        self, request_iterator: Iterator[pb.CreateCaseRequest], context: grpc.ServicerContext
    ) -> pb.CreateCaseResponse:
        first = next(request_iterator, None)
        if first is None:
            raise ValueError("empty CreateCase stream: send a builtin name or a DICOM zip")
        if first.builtin:
            if first.dicom_zip_chunk or next(request_iterator, None) is not None:
                raise ValueError("send either a builtin case or a DICOM zip, not both")
            case_id, structures = self.core.create_case(first.builtin, dict(first.parameters))
            return pb.CreateCaseResponse(case_id=case_id, structures=structures)
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
            size = 0
            for msg in itertools.chain([first], request_iterator):
                if msg.builtin:
                    raise ValueError("send either a builtin case or a DICOM zip, not both")
                size += len(msg.dicom_zip_chunk)
                if size > MAX_UPLOAD_BYTES:
                    raise ValueError(
                        f"the DICOM upload exceeds {MAX_UPLOAD_BYTES >> 20} MiB; send the CT "
                        "series and RTSTRUCT only"
                    )
                spool.write(msg.dicom_zip_chunk)
            if size == 0:
                raise ValueError("nothing to create: name a builtin case or send a DICOM zip")
            spool.seek(0)
            case_id, structures, notes = self.core.create_case_from_dicom(
                spool, first.protocol_yaml
            )
        return pb.CreateCaseResponse(case_id=case_id, structures=structures, notes=notes)

    def StartPlanning(
        self, request: pb.StartPlanningRequest, context: grpc.ServicerContext
    ) -> pb.StartPlanningResponse:
        job_id = self.core.start(
            request.case_id,
            request.protocol_yaml,
            request.max_iterations,
            request.memory_length,
            request.agent,
            request.idempotency_key,
            request.physician_feedback,
            request.candidates,
        )
        return pb.StartPlanningResponse(job_id=job_id)

    def WatchPlanning(
        self, request: pb.WatchPlanningRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchPlanningResponse]:
        for seq, e in self.core.watch(request.job_id, request.from_sequence, context):
            yield pb.WatchPlanningResponse(
                sequence=seq,
                kind=KINDS.get(e["kind"], pb.EVENT_KIND_UNSPECIFIED),
                iteration=e.get("iteration", 0),
                fmo=_fmo(e.get("fmo")),
                goals=[goal_result_to_proto(GoalResult.from_dict(g)) for g in e.get("goals", [])],
                proposal=_terms(e.get("proposal", [])),
                message=e.get("message", ""),
                round=e.get("round", e.get("iteration", 0)),
                candidate=e.get("candidate", 0),
            )

    def GetPlanningJob(
        self, request: pb.GetPlanningJobRequest, context: grpc.ServicerContext
    ) -> pb.GetPlanningJobResponse:
        job = self.core.jobs.job(request.job_id)
        return pb.GetPlanningJobResponse(
            job_id=job.job_id,
            case_id=job.case_id,
            state=STATES[job.state],
            best_iteration=job.best_iteration,
            error=job.error,
            iterations=[record_to_proto(r) for r in self.core.jobs.iterations(job.job_id)],
        )

    def SubmitFeedback(
        self, request: pb.SubmitFeedbackRequest, context: grpc.ServicerContext
    ) -> pb.SubmitFeedbackResponse:
        return pb.SubmitFeedbackResponse(
            applies_from_iteration=self.core.submit_feedback(request.job_id, request.text)
        )

    def CancelPlanning(
        self, request: pb.CancelPlanningRequest, context: grpc.ServicerContext
    ) -> pb.CancelPlanningResponse:
        return pb.CancelPlanningResponse(state=STATES[self.core.cancel(request.job_id)])

    def ExportPlan(
        self, request: pb.ExportPlanRequest, context: grpc.ServicerContext
    ) -> pb.ExportPlanResponse:
        data, name = self.core.export(request.job_id)
        return pb.ExportPlanResponse(bundle=data, filename=name)

    def ListPlanningJobs(
        self, request: pb.ListPlanningJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListPlanningJobsResponse:
        return pb.ListPlanningJobsResponse(
            jobs=[
                pb.JobSummary(
                    job_id=job.job_id,
                    case_id=job.case_id,
                    state=STATES[job.state],
                    agent=job.agent,
                    protocol=name,
                    iterations=count,
                    best_iteration=job.best_iteration,
                    created=created,
                    updated=updated,
                )
                for job, name, count, created, updated in self.core.recent_jobs(request.limit)
            ]
        )

    def GetIterationView(
        self, request: pb.GetIterationViewRequest, context: grpc.ServicerContext
    ) -> pb.GetIterationViewResponse:
        if not request.job_id:
            raise ValueError("job_id is empty: name the job whose iteration to view")
        if request.iteration < 0:
            raise ValueError(f"iteration {request.iteration}: give 1 or more, or 0 for the best")
        v = self.core.iteration_view(request.job_id, request.iteration, request.slice)
        return pb.GetIterationViewResponse(
            iteration=v["iteration"],
            levels_gy=[float(x) for x in v["levels_gy"]],
            dvh=[
                pb.DvhCurve(structure=name, volume_pct=[float(x) for x in curve])
                for name, curve in v["dvh"].items()
            ],
            num_slices=v["num_slices"],
            start_slice=v["start_slice"],
            slice_png=v["slice_png"],
            slice_z_mm=v["slice_z_mm"],
            prescription_gy=v["prescription_gy"],
        )

    def ApprovePlan(
        self, request: pb.ApprovePlanRequest, context: grpc.ServicerContext
    ) -> pb.ApprovePlanResponse:
        if not request.job_id:
            raise ValueError("job_id is empty: name the finished job to approve")
        ref_id, protocol, count = self.core.approve(
            request.job_id, request.iteration, request.description
        )
        return pb.ApprovePlanResponse(reference_id=ref_id, protocol=protocol, references=count)
