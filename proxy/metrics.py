"""Prometheus collectors: what every stage counts, in one registry per process.

Labelled children are cached in plain dicts, because `Counter.labels()` costs
several microseconds per call and the request path pays it on every call.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Regate's own added time is sub-millisecond when healthy; the upstream's is
# anything from a millisecond to the deadline.
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
_UPSTREAM_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "regate_requests", "Calls by tool, outcome (forwarded or the rejection code) and HTTP status",
            ["tool", "outcome", "status"], registry=r)
        self.rejections = Counter(
            "regate_rejections", "Calls ended by a stage, by stage and code", ["stage", "code"], registry=r)
        self.added = Histogram(
            "regate_added_seconds", "Time Regate itself added to a call (excluding the upstream)",
            ["tool"], buckets=_ADDED_BUCKETS, registry=r)
        self.upstream = Histogram(
            "regate_upstream_seconds", "Upstream time from request sent to response complete",
            ["tool"], buckets=_UPSTREAM_BUCKETS, registry=r)
        self.policy_errors = Counter(
            "regate_policy_errors", "Engine errors, timeouts and malformed decisions, by tool and kind",
            ["tool", "kind"], registry=r)
        self.fail_open = Counter(
            "regate_fail_open", "Calls let through although Regate could not decide (fail_open tools), by stage",
            ["tool", "stage"], registry=r)
        self.would_deny = Counter(
            "regate_policy_would_deny", "Shadow-mode denials: calls the policy would have refused",
            ["tool", "reason"], registry=r)
        self.audit_lost = Counter(
            "regate_audit_lost", "Audit records that could not be written (the calls they describe did not run "
            "unrecorded: lost records are refusals' decisions or outcomes)", ["kind"], registry=r)
        self.rate_limited = Counter(
            "regate_limit_rejections", "Calls refused by rate limits (kind=rate) or budgets (kind=budget), by agent",
            ["kind", "agent"], registry=r)
        self.limit_store_fallback = Counter(
            "regate_limit_store_fallbacks", "Calls decided without the shared limits store, by part and "
            "on_store_error mode (local fallback, allow = failed open, deny = failed closed)", ["part", "mode"],
            registry=r)
        self.limit_store_latency = Histogram(
            "regate_limit_store_seconds", "Round trip to the shared limits store", ["part"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05), registry=r)
        self.breaker_transitions = Counter(
            "regate_breaker_transitions", "Tool breaker state changes", ["tool", "from_state", "to_state"], registry=r)
        self.breaker_state = Gauge(
            "regate_breaker_state", "Tool breaker state: 0 closed, 1 half-open, 2 open", ["tool"], registry=r)
        self.reloads = Counter("regate_policy_reloads", "Bundle reloads by result", ["result"], registry=r)
        self.revision = Gauge("regate_policy_revision_info", "The policy bundle revision in force",
                              ["revision"], registry=r)
        self._requests: dict[tuple[str, str, int], object] = {}
        self._rejections: dict[tuple[str, str], object] = {}
        self._added: dict[str, object] = {}
        self._upstream: dict[str, object] = {}

    def count_call(self, tool: str, outcome: str, status: int, added_s: float, upstream_s: float | None) -> None:
        key = (tool, outcome, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(tool, outcome, str(status))
        child.inc()
        h = self._added.get(tool)
        if h is None:
            h = self._added[tool] = self.added.labels(tool)
        h.observe(added_s)
        if upstream_s is not None:
            u = self._upstream.get(tool)
            if u is None:
                u = self._upstream[tool] = self.upstream.labels(tool)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
