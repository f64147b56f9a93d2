"""The evaluator service over real gRPC, fed by the optimizer service: rules, images, errors."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.rules import Decision, evaluate_rules
from radpilot.protocol import load_protocol, load_protocol_text
from radpilot.v1 import (
    evaluator_pb2,
    evaluator_pb2_grpc,
    optimizer_pb2,
    optimizer_pb2_grpc,
    types_pb2,
)
from services.common.convert import helpers_to_proto
from services.evaluator.config import EvaluatorConfig
from services.evaluator.server import serve as serve_evaluator
from services.optimizer.config import OptimizerConfig
from services.optimizer.server import serve as serve_optimizer
from tests.paths import REPO_ROOT, with_safety, without_ring

PROTOCOLS = REPO_ROOT / "protocols"
EASIER_FILE = "tg119_cshape_easier.yaml"
EASIER = (PROTOCOLS / EASIER_FILE).read_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    store = CaseStore(tmp_path_factory.mktemp("eval-store"))
    case = load_builtin("analytic-cshape", store, spacing_mm=8.0)
    opt = serve_optimizer(
        OptimizerConfig(address="127.0.0.1:0", case_store=str(store.root), replica="o1")
    )
    ev = serve_evaluator(EvaluatorConfig(address="127.0.0.1:0", case_store=str(store.root)))
    ch_o = grpc.insecure_channel(f"127.0.0.1:{opt.port}")
    ch_e = grpc.insecure_channel(f"127.0.0.1:{ev.port}")
    protocol = load_protocol_text(EASIER)
    terms = [types_pb2.ObjectiveTerm(**t.to_dict()) for t in protocol.objectives]
    optimized = optimizer_pb2_grpc.OptimizerServiceStub(ch_o).Optimize(
        optimizer_pb2.OptimizeRequest(
            case_id=case.case_id,
            objectives=terms,
            helpers=helpers_to_proto(list(protocol.all_helpers)),  # the protocol's ring
        ),
        timeout=60,
    )
    try:
        yield {
            "store": store,
            "case": case,
            "dose": optimized.dose,
            "stub": evaluator_pb2_grpc.EvaluatorServiceStub(ch_e),
            "optimizer": optimizer_pb2_grpc.OptimizerServiceStub(ch_o),
        }
    finally:
        ch_o.close()
        ch_e.close()
        opt.stop(1.0)
        ev.stop(1.0)


def test_rules_evaluation_with_images(cluster: dict) -> None:
    req = evaluator_pb2.EvaluateRequest(
        case_id=cluster["case"].case_id,
        dose=cluster["dose"],
        protocol_yaml=EASIER,
        include_images=True,
    )
    resp = cluster["stub"].Evaluate(req, timeout=60)
    assert resp.decision in (
        evaluator_pb2.DECISION_MEETS_PROTOCOL,
        evaluator_pb2.DECISION_NEEDS_IMPROVEMENT,
    )
    assert len(resp.goals) == 5  # the protocol's 3 and the implicit hot-spot goals
    assert (resp.decision == evaluator_pb2.DECISION_MEETS_PROTOCOL) == all(
        g.passed for g in resp.goals
    )
    ptv_d95 = next(g for g in resp.goals if g.goal.structure == "PTV" and g.goal.metric == "D95")
    assert ptv_d95.achieved == pytest.approx(50.0, abs=1e-3) and ptv_d95.passed
    assert any(f.startswith("spillage:") for f in resp.findings)
    assert len(resp.dvh.volume_pct) == len(resp.dvh.levels_gy) * len(resp.dvh.structures)
    assert {"axial", "sagittal", "coronal", "dvh", "crop_PTV"} <= set(resp.images)
    png = cluster["store"].get_bytes(resp.images["axial"].path, resp.images["axial"].sha256)
    assert png.startswith(b"\x89PNG")


def test_safety_goals_are_checked_over_the_wire_and_a_term_on_their_region_optimises(
    cluster: dict,
) -> None:
    # the evaluator checks the implicit hot-spot goals and says where the global maximum is
    safe = with_safety(EASIER, "{outside_targets_max_pct: 101}")
    resp = cluster["stub"].Evaluate(
        evaluator_pb2.EvaluateRequest(
            case_id=cluster["case"].case_id, dose=cluster["dose"], protocol_yaml=safe
        ),
        timeout=60,
    )
    outside = next(g for g in resp.goals if g.goal.structure == "OutsideTargets")
    assert outside.goal.metric == "max" and outside.goal.limit == pytest.approx(50.5)
    assert outside.goal.hard and outside.goal.priority == 2
    dose = cluster["store"].get_artefact(cluster["dose"].path)
    hottest = PlanDose(cluster["case"], dose).hottest_outside_targets()
    assert hottest is not None and outside.achieved == pytest.approx(hottest[0], abs=1e-4)
    assert outside.passed == (hottest[0] <= 50.5)
    assert any(f.startswith("global maximum: ") and " at x " in f for f in resp.findings)
    # the optimizer builds the OutsideTargets region from the definition the request carries;
    # a term there lowers the hot spot beside the C (the protocol without its ring term, which
    # keeps that spot down already)
    protocol = load_protocol_text(with_safety(without_ring(EASIER_FILE), "on"))
    region = protocol.helper("OutsideTargets")
    assert region is not None

    def hottest_outside(extra: list) -> float:
        terms = [types_pb2.ObjectiveTerm(**t.to_dict()) for t in protocol.objectives] + extra
        optimized = cluster["optimizer"].Optimize(
            optimizer_pb2.OptimizeRequest(
                case_id=cluster["case"].case_id,
                objectives=terms,
                helpers=helpers_to_proto([region]),
                normalize_to="PTV",
            ),
            timeout=60,
        )
        dose = cluster["store"].get_artefact(optimized.dose.path)
        hot = PlanDose(cluster["case"], dose).hottest_outside_targets()
        assert hot is not None
        return hot[0]

    term = types_pb2.ObjectiveTerm(
        structure="OutsideTargets", kind="squared_overdose", dose_gy=50.5, weight=500.0
    )
    assert hottest_outside([term]) < hottest_outside([])


def test_rules_decision_is_the_guardrail(cluster: dict) -> None:
    case = cluster["case"]
    dose = cluster["store"].get_artefact(cluster["dose"].path)
    ev = evaluate_rules(PlanDose(case, dose), load_protocol(PROTOCOLS / "tg119_cshape_harder.yaml"))
    if not ev.check.all_passed:
        assert ev.decision is Decision.NEEDS_IMPROVEMENT
    hot = dose * 1.3  # scaled plan: coverage still met, hot spots everywhere
    ev_hot = evaluate_rules(PlanDose(case, hot), load_protocol_text(EASIER))
    assert ev_hot.decision is Decision.NEEDS_IMPROVEMENT
    assert any(f.startswith("hot spot:") for f in ev_hot.findings)


def test_bad_requests(cluster: dict) -> None:
    stub, case_id, dose = cluster["stub"], cluster["case"].case_id, cluster["dose"]

    def code(req: evaluator_pb2.EvaluateRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(req, timeout=30)
        return info.value.code(), info.value.details()

    E = evaluator_pb2.EvaluateRequest
    expectations = [
        (
            E(case_id=case_id, dose=dose, protocol_yaml=EASIER, agent="oracle"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown evaluator agent",
        ),
        (
            E(case_id=case_id, dose=dose, protocol_yaml=EASIER, agent="llm"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not configured",
        ),
        (
            E(case_id=case_id, dose=dose, protocol_yaml="name: [oops"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not valid YAML",
        ),
        (
            E(case_id=case_id, dose=dose, protocol_yaml=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "protocol_yaml is empty",
        ),
        (
            E(
                case_id=case_id,
                dose=dose,
                protocol_yaml=EASIER.replace("structure: Core", "structure: Rectum"),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Rectum",
        ),
        (
            E(
                case_id=case_id,
                dose=types_pb2.ArtefactRef(path="artefacts/x/none.npy"),
                protocol_yaml=EASIER,
            ),
            grpc.StatusCode.NOT_FOUND,
            "not in the store",
        ),
        (
            E(
                case_id=case_id,
                dose=types_pb2.ArtefactRef(path=dose.path, sha256="0" * 64),
                protocol_yaml=EASIER,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hash",
        ),
        (
            E(case_id="missing", dose=dose, protocol_yaml=EASIER),
            grpc.StatusCode.NOT_FOUND,
            "missing",
        ),
    ]
    for req, want, text in expectations:
        got, details = code(req)
        assert got == want, (req.agent, details)
        assert text in details, details
