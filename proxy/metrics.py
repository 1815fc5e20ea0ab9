"""Prometheus collectors: what every stage counts, in one registry per process.

Naming: every metric is `regate_<what>[_<unit>]` in base units (seconds, bytes),
counters end in `_total` (prometheus_client adds it), histograms cover
microseconds to minutes. Labels are bounded: an agent, tool or reason label
keeps at most `label_cap` distinct values and counts the rest as `other`
(`regate_label_values_folded_total` says when that happens), so 100,000
agents cannot grow the registry without bound.

Labelled children are cached in plain dicts, because `Counter.labels()` costs
several microseconds per call and the request path pays it on every call.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OTHER = "other"

# Regate's own added time: tens of microseconds when healthy, up to minutes when
# a call waits for a human or a GPU. The upstream's: a millisecond to the deadline.
ADDED_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 10.0, 60.0, 300.0)
UPSTREAM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0)
STORE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class LabelCap:
    """The first `limit` distinct values of one label pass; later ones become "other"."""

    __slots__ = ("name", "limit", "seen", "folded")

    def __init__(self, name: str, limit: int, folded: Any) -> None:
        self.name = name
        self.limit = limit
        self.seen: set[str] = set()
        self.folded = folded  # the regate_label_values_folded_total child for this label

    def fold(self, value: str) -> str:
        seen = self.seen
        if value in seen:
            return value
        if len(seen) < self.limit:
            seen.add(value)
            return value
        self.folded.inc()
        return OTHER


class Labelled:
    """A labelled collector whose `labels()` is cached and, for capped positions, bounded.

    Callers use it as the prometheus_client collector it wraps (`.labels(...).inc()`);
    the cache is keyed by the folded values, so it is bounded too.
    """

    __slots__ = ("collector", "caps", "_children")

    def __init__(self, collector: Any, caps: Iterable[tuple[int, LabelCap]] = ()) -> None:
        self.collector = collector
        self.caps = tuple(caps)
        self._children: dict[tuple, Any] = {}

    def labels(self, *values: Any, **named: Any) -> Any:
        if named:  # rare: keyword form, in the collector's label order
            values = tuple(named[n] for n in self.collector._labelnames)
        key = values
        for i, cap in self.caps:
            v = key[i]
            f = cap.fold(v)
            if f is not v:
                key = key[:i] + (f,) + key[i + 1:]
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.collector.labels(*key)
        return child

    def clear(self) -> None:
        self._children.clear()
        self.collector.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collector, name)


class Metrics:
    def __init__(self, label_cap: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.label_cap = label_cap
        self.folded = Counter(
            "regate_label_values_folded", "Label values counted as \"other\" because the label already has "
            "observability.label_cap distinct values, by label", ["label"], registry=r)
        agent = LabelCap("agent", label_cap, self.folded.labels("agent"))
        tool = LabelCap("tool", label_cap, self.folded.labels("tool"))
        reason = LabelCap("reason", label_cap, self.folded.labels("reason"))
        self.caps = {"agent": agent, "tool": tool, "reason": reason}
        self._tool_cap = tool

        self.calls = Counter(
            "regate_calls", "Calls by tool, outcome (forwarded, or the rejection code) and HTTP status",
            ["tool", "outcome", "status"], registry=r)
        self.rejections = Counter(
            "regate_rejections", "Calls ended by a stage, by stage and code", ["stage", "code"], registry=r)
        self.added = Histogram(
            "regate_added_seconds", "Time Regate itself added to a call (everything but the upstream)",
            ["tool"], buckets=ADDED_BUCKETS, registry=r)
        self.upstream = Histogram(
            "regate_upstream_seconds", "Upstream time from request sent to response complete",
            ["tool"], buckets=UPSTREAM_BUCKETS, registry=r)
        self.policy_errors = Labelled(Counter(
            "regate_policy_errors", "Engine errors, timeouts and malformed decisions, by tool and kind",
            ["tool", "kind"], registry=r), [(0, tool)])
        self.fail_open = Labelled(Counter(
            "regate_fail_open", "Calls let through although Regate could not decide (fail_open tools), by stage",
            ["tool", "stage"], registry=r), [(0, tool)])
        self.would_deny = Labelled(Counter(
            "regate_policy_would_deny", "Shadow-mode denials: calls the policy would have refused, by reason",
            ["tool", "reason"], registry=r), [(0, tool), (1, reason)])
        self.would_refuse = Labelled(Counter(
            "regate_would_refuse", "Calls a limit, budget, breaker or loop guard in warn mode would have refused "
            "(they ran), by stage, the code they would have got, and tool", ["stage", "code", "tool"],
            registry=r), [(2, tool)])
        self.audit_lost = Labelled(Counter(
            "regate_audit_lost", "Audit records that could not be written (the calls they describe did not run "
            "unrecorded: lost records are refusals' decisions or outcomes)", ["kind"], registry=r))
        self.rate_limited = Labelled(Counter(
            "regate_limit_rejections", "Calls refused by rate limits (kind=rate) or budgets (kind=budget), by agent",
            ["kind", "agent"], registry=r), [(1, agent)])
        self.limit_store_fallback = Labelled(Counter(
            "regate_limit_store_fallbacks", "Calls decided without the shared limits store, by part and "
            "on_store_error mode (local fallback, allow = failed open, deny = failed closed)", ["part", "mode"],
            registry=r))
        self.limit_store_latency = Labelled(Histogram(
            "regate_limit_store_seconds", "Round trip to the shared limits store", ["part"],
            buckets=STORE_BUCKETS, registry=r))
        self.breaker_transitions = Labelled(Counter(
            "regate_breaker_transitions", "Tool breaker state changes", ["tool", "from_state", "to_state"],
            registry=r), [(0, tool)])
        self.breaker_state = Labelled(Gauge(
            "regate_breaker_state", "Tool breaker state: 0 closed, 1 half-open, 2 open", ["tool"], registry=r),
            [(0, tool)])
        self.reloads = Labelled(Counter("regate_policy_reloads", "Bundle reloads by result", ["result"], registry=r))
        self.revision = Gauge("regate_policy_revision_info", "The policy bundle revision in force",
                              ["revision"], registry=r)
        import platform

        from .version import __version__

        Gauge("regate_build_info", "Regate's version and the Python it runs on (always 1)",
              ["version", "python"], registry=r).labels(__version__, platform.python_version()).set(1)
        self._calls: dict[tuple[str, str, int], Any] = {}
        self._rejections: dict[tuple[str, str], Any] = {}
        self._added: dict[str, Any] = {}
        self._upstream: dict[str, Any] = {}

    def count_call(self, tool: str, outcome: str, status: int, added_s: float, upstream_s: float | None) -> None:
        key = (tool, outcome, status)
        child = self._calls.get(key)
        if child is None:
            # Tools come from config (bounded); the cap guards the key space anyway.
            tool = self._tool_cap.fold(tool)
            child = self._calls[key] = self.calls.labels(tool, outcome, str(status))
        child.inc()
        h = self._added.get(tool)
        if h is None:
            h = self._added[tool] = self.added.labels(self._tool_cap.fold(tool))
        h.observe(added_s)
        if upstream_s is not None:
            u = self._upstream.get(tool)
            if u is None:
                u = self._upstream[tool] = self.upstream.labels(self._tool_cap.fold(tool))
            u.observe(upstream_s)

    def count_rejection(self, stage: str, code: str) -> None:
        key = (stage, code)
        child = self._rejections.get(key)
        if child is None:
            child = self._rejections[key] = self.rejections.labels(stage, code)
        child.inc()

    def set_revision(self, revision: str) -> None:
        self.revision.clear()
        self.revision.labels(revision).set(1)

    def watch_audit(self, audit: Any) -> None:
        """Expose the audit writer's queue and counters (read at scrape time, nothing per call)."""
        self.registry.register(AuditCollector(audit))

    def watch_decision_logs(self, logger: Any) -> None:
        """Expose the decision-log uploader's counters (read at scrape time, nothing per call)."""
        self.registry.register(DecisionLogsCollector(logger))

    def watch_bundle(self, service: Any) -> None:
        """Expose the bundle service's status (read at scrape time, nothing per call)."""
        self.registry.register(BundleCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BundleCollector:
    """The bundle service's numbers (proxy/bundles), read when Prometheus scrapes."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def describe(self) -> list:
        return []

    def collect(self):  # type: ignore[no-untyped-def]
        st = self.service.status()
        polls = CounterMetricFamily("regate_bundle_polls", "Polls of the bundle server by outcome (activated: "
                                    "a new bundle went into force; not_modified: 304; error: the server failed "
                                    "or its bundle was refused)", labels=["outcome"])
        for outcome, n in st["polls"].items():
            polls.add_metric([outcome], n)
        yield polls
        yield GaugeMetricFamily("regate_bundle_active", "1 when a policy bundle is in force, else 0 (calls "
                                "are refused)", value=1 if st["active"] else 0)
        yield GaugeMetricFamily("regate_bundle_consecutive_errors", "Failed polls since the last good one",
                                value=st["consecutive_errors"])
        for name, key, text in (
                ("regate_bundle_last_success_timestamp_seconds", "last_success",
                 "When the bundle server last answered with a good bundle or 304 (Unix time)"),
                ("regate_bundle_last_activation_timestamp_seconds", "last_activation",
                 "When the bundle in force went into force (Unix time)"),
                ("regate_bundle_last_error_timestamp_seconds", "last_error_at",
                 "When a poll last failed (Unix time)"),
                ("regate_bundle_last_request_timestamp_seconds", "last_request",
                 "When the bundle server was last asked (Unix time)")):
            if st[key] is not None:
                yield GaugeMetricFamily(name, text, value=st[key])
        info = GaugeMetricFamily("regate_bundle_info", "The bundle in force: its revision, where it came from "
                                 "(server or disk) and the URL (always 1)", labels=["revision", "source", "url"])
        if st["active"]:
            info.add_metric([str(st["revision"]), str(st["from"]), st["url"]], 1)
        yield info


class AuditCollector:
    """The audit log's own numbers, read from the writer when Prometheus scrapes."""

    def __init__(self, audit: Any) -> None:
        self.audit = audit

    def describe(self) -> list:
        return []

    def collect(self):  # type: ignore[no-untyped-def]
        a = self.audit
        stats = a.stats
        yield GaugeMetricFamily("regate_audit_pending_records",
                                "Audit records chained but not yet written to the file (the audit lag)",
                                value=a.pending)
        yield GaugeMetricFamily("regate_audit_healthy", "1 when the audit log can be written, else 0",
                                value=1 if a.healthy else 0)
        yield CounterMetricFamily("regate_audit_records", "Audit records written", value=stats["records"])
        yield CounterMetricFamily("regate_audit_written_bytes", "Bytes written to the audit log",
                                  value=stats["bytes"])
        yield CounterMetricFamily("regate_audit_fsyncs", "fsync calls on the audit log", value=stats["fsyncs"])
        yield CounterMetricFamily("regate_audit_write_errors", "Failed writes to the audit log",
                                  value=stats["write_errors"])


class DecisionLogsCollector:
    """The OPA-format decision logs' numbers (proxy/decisionlogs), read when Prometheus scrapes."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def describe(self) -> list:
        return []

    def collect(self):  # type: ignore[no-untyped-def]
        lg = self.logger
        buf = lg.buffer
        dropped = CounterMetricFamily("regate_decision_logs_dropped",
                                      "Decision-log events dropped before reaching the collector, by reason "
                                      "(buffer_full, too_large, unencodable, shutdown)", labels=["reason"])
        for reason, n in buf.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily("regate_decision_logs_events", "Decisions handed to the decision logs",
                                  value=lg.logged)
        yield CounterMetricFamily("regate_decision_logs_uploaded_events",
                                  "Decision-log events the collector accepted (2xx)", value=lg.uploaded)
        yield CounterMetricFamily("regate_decision_logs_upload_errors",
                                  "Failed decision-log uploads (error status, connection, timeout)",
                                  value=lg.upload_errors)
        yield GaugeMetricFamily("regate_decision_logs_buffered_bytes",
                                "Bytes of decision-log events waiting for upload",
                                value=buf.encoded_bytes + buf.pending_bytes)
        yield GaugeMetricFamily("regate_decision_logs_buffered_events", "Decision-log events waiting for upload",
                                value=len(buf.encoded) + len(buf.pending))
