"""The metrics review: one naming scheme, base units, bounded labels.

Every collector a fully configured Regate registers is held to the scheme
(`regate_` names, `_total` counters, `_seconds`/`_bytes` histograms, no
MiB/percent/millisecond units), every agent/tool/reason label is capped, and
the cap holds with 10,000 distinct agents, in-process and over real sockets.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import yaml

from proxy import config as config_mod
from proxy.app import Regate
from proxy.metrics import ADDED_BUCKETS, OTHER, UPSTREAM_BUCKETS, Labelled, Metrics
from tests.support.procs import ROOT, RegateProcess, start_upstream

NAME = re.compile(r"^regate_[a-z][a-z0-9_]*$")
NOT_BASE_UNITS = re.compile(r"_(mb|mib|kb|ms|us|milliseconds|microseconds|percent|minutes|hours)(_|$)")
CAPPED_LABELS = {"agent", "tool", "reason"}


def _agent_values(text: str, metric: str) -> set[str]:
    return set(re.findall(rf'^{metric}\{{[^}}]*agent="([^"]*)"', text, re.M))


def test_label_cap_holds_with_10000_distinct_agents():
    m = Metrics(label_cap=1000)
    for i in range(10_000):
        m.rate_limited.labels("rate", f"agent-{i:05d}").inc()
    m.rate_limited.labels("rate", "agent-00001").inc()  # a known agent keeps its own series
    text = m.render().decode()
    agents = _agent_values(text, "regate_limit_rejections_total")
    assert len(agents) == 1001 and OTHER in agents
    assert 'regate_limit_rejections_total{agent="other",kind="rate"} 9000.0' in text
    assert 'regate_limit_rejections_total{agent="agent-00001",kind="rate"} 2.0' in text
    assert 'regate_label_values_folded_total{label="agent"} 9000.0' in text
    assert len(m.rate_limited._children) == 1001  # the label cache is bounded too


def test_shadow_deny_reasons_are_capped_too():
    m = Metrics(label_cap=10)
    for i in range(50):
        m.would_deny.labels("shell", f"Agent 'a{i}' has no grant").inc()
    text = m.render().decode()
    assert len(re.findall(r"^regate_policy_would_deny_total\{", text, re.M)) == 11
    assert 'regate_label_values_folded_total{label="reason"} 40.0' in text


async def test_every_collector_follows_the_naming_scheme(tmp_path):
    cfg = config_mod.validate({
        "auth": {"mode": "none"},
        "policy": {"engine": "off"},
        "tools": [{"name": "gen", "upstream": "http://127.0.0.1:9", "gpu": {"memory_mb": 100}}],
        "gpu": {"source": "static", "static": [{"memory_mb": 8000}]},
        "audit": {"dir": str(tmp_path / "audit")},
    })
    app = Regate(cfg)
    await app.start()
    try:
        families = list(app.metrics.registry.collect())
    finally:
        await app.close()
    names = {f.name for f in families}
    # The parts the dashboard reads are all there.
    assert {"regate_calls", "regate_rejections", "regate_added_seconds", "regate_upstream_seconds",
            "regate_breaker_state", "regate_limit_rejections", "regate_gpu_queue_depth",
            "regate_audit_pending_records", "regate_label_values_folded",
            "regate_gpu_memory_free_bytes"} <= names
    for f in families:
        assert NAME.match(f.name), f.name
        assert not NOT_BASE_UNITS.search(f.name), f"{f.name}: use base units (seconds, bytes, ratio)"
        if f.type == "counter":
            assert not f.name.endswith("_total"), f"{f.name}: prometheus_client adds _total"
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        if f.type == "histogram":
            assert f.name.endswith(("_seconds", "_bytes")), f.name
    # Histogram buckets reach from tens of microseconds to minutes.
    assert ADDED_BUCKETS[0] <= 0.0001 and ADDED_BUCKETS[-1] >= 60
    assert UPSTREAM_BUCKETS[0] <= 0.001 and UPSTREAM_BUCKETS[-1] >= 60
    # Every agent/tool/reason label goes through a cap.
    m = app.metrics
    for attr, value in vars(m).items():
        collector = value.collector if isinstance(value, Labelled) else value
        labels = set(getattr(collector, "_labelnames", ()))
        if not labels & CAPPED_LABELS or attr in ("calls", "added", "upstream"):  # count_call folds tools
            continue
        assert isinstance(value, Labelled), attr
        capped = {collector._labelnames[i] for i, _ in value.caps}
        assert labels & CAPPED_LABELS <= capped, attr


async def test_label_cap_over_real_sockets_with_10000_agents(tmp_path):
    upstream, upstream_url = start_upstream()
    data = tmp_path / "policies"
    (data / "limits").mkdir(parents=True)
    # Half a unit of budget, calls cost 1: every agent is refused on its first call.
    (data / "limits" / "data.yaml").write_text(yaml.safe_dump({"defaults": {"budget": {"units": 0.5}}}))
    cfg = {
        "auth": {"mode": "none"},
        "policy": {"engine": "off", "data": str(data)},
        "tools": [{"name": "echo", "upstream": upstream_url}],
        "audit": {"enabled": False},
        "observability": {"label_cap": 100, "traces": 500},
        "http": {"shutdown_grace_s": 1},
    }
    proc = await asyncio.to_thread(RegateProcess, cfg, tmp_path)
    try:
        statuses: dict[int, int] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as s:
            async def one(i: int) -> None:
                async with s.get(f"{proc.url}/tools/echo/x", headers={"X-Agent-Id": f"agent-{i:05d}"}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

            for start in range(0, 10_000, 1000):
                await asyncio.gather(*(one(i) for i in range(start, start + 1000)))
            async with s.get(proc.admin_url + "/metrics") as r:
                text = await r.text()
        assert statuses == {429: 10_000}
        agents = _agent_values(text, "regate_limit_rejections_total")
        assert len(agents) == 101 and OTHER in agents
        assert 'regate_limit_rejections_total{agent="other",kind="budget"} 9900.0' in text
        assert 'regate_label_values_folded_total{label="agent"} 9900.0' in text
        assert 'regate_calls_total{outcome="budget_exhausted",status="429",tool="echo"} 10000.0' in text
    finally:
        await asyncio.to_thread(proc.stop)
        upstream.stop()


def test_grafana_dashboard_reads_only_metrics_regate_exports(tmp_path):
    import json

    from proxy.approvals.stage import ApprovalMetrics
    from proxy.gpu.collector import GpuCollector
    from proxy.metrics import AuditCollector

    dash = json.loads((ROOT / "examples" / "grafana" / "regate-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    used = {re.sub(r"_(bucket|total|count|sum)$", "", n) for e in exprs for n in re.findall(r"\bregate_[a-z0-9_]+", e)}

    m = Metrics()
    ApprovalMetrics(m.registry)
    exported = {f.name for f in m.registry.collect()}
    exported |= {f.name for f in AuditCollector(_FakeAudit()).collect()}
    exported |= {f.name for f in GpuCollector(_gpu_controller()).collect()}
    assert used <= exported, used - exported
    assert {"regate_calls", "regate_added_seconds", "regate_breaker_state", "regate_limit_rejections",
            "regate_gpu_queue_depth", "regate_audit_pending_records", "regate_approvals_held"} <= used


class _FakeAudit:
    pending = 0
    healthy = True
    stats = {"records": 0, "bytes": 0, "fsyncs": 0, "write_errors": 0}


def _gpu_controller():
    from proxy.gpu import AdmissionConfig, AdmissionController
    from proxy.gpu.static import StaticView

    return AdmissionController(StaticView([{"memory_mb": 8000}]), AdmissionConfig())
