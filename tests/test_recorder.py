"""proxy.recorder against a real AuditLog that cannot write: a fail_open tool runs unrecorded
and is counted (regate_fail_open_total{stage="audit"}); any other tool is refused with 503;
a refusal that cannot be recorded is counted as lost."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request

from proxy.audit import AuditLog
from proxy.config import Tool
from proxy.metrics import Metrics
from proxy.pipeline import Call, Rejection
from proxy.recorder import AuditRecorder


def call_to(tool: Tool) -> Call:
    call = Call(make_mocked_request("POST", f"/tools/{tool.name}/run"))
    call.agent = "coder-7"
    call.tool = tool
    call.tool_key = tool.name
    call.ended_by = "policy"
    return call


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def down_recorder(tmp_path) -> tuple[AuditRecorder, Metrics, AuditLog]:
    log = AuditLog(tmp_path / "audit", heartbeat_s=None)
    await log.start()
    await log.close()  # a closed log refuses every append: AuditUnavailable
    assert not log.healthy
    metrics = Metrics()
    return AuditRecorder(log, metrics), metrics, log


async def test_a_fail_open_tool_runs_unrecorded_and_is_counted(tmp_path):
    recorder, metrics, _ = await down_recorder(tmp_path)
    tool = Tool(name="open", prefix="/tools/open", upstream="http://127.0.0.1:9", fail_open=True)
    for i in range(3):
        call = call_to(tool)
        assert await recorder.before_forward(call) is None  # it runs
        assert not call.extra.get("audited")
        assert sample(metrics, "regate_fail_open_total", tool="open", stage="audit") == i + 1
    recorder.after_call(call, 200, 1000)  # no decision record: no outcome either
    assert sample(metrics, "regate_audit_lost_total", kind="outcome") == 0


async def test_a_tool_that_is_not_fail_open_is_refused_and_nothing_counts_as_fail_open(tmp_path):
    recorder, metrics, _ = await down_recorder(tmp_path)
    tool = Tool(name="shell", prefix="/tools/shell", upstream="http://127.0.0.1:9")
    call = call_to(tool)
    rejection = await recorder.before_forward(call)
    assert isinstance(rejection, Rejection) and rejection.status == 503 and rejection.code == "audit_unavailable"
    assert sample(metrics, "regate_fail_open_total", tool="shell", stage="audit") == 0
    call.rejection = rejection
    await recorder.record_rejection(call)
    assert sample(metrics, "regate_audit_lost_total", kind="decision") == 1
