"""The breakers: section of regate.yaml: defaults, overrides, and errors that name the field."""

from __future__ import annotations

import pytest
import yaml

from proxy.breakers import build, parse
from proxy.breakers.config import AgentBackoffConfig, LoopGuardConfig, ToolBreakerConfig

EXAMPLE = """
breakers:
  tool:
    consecutive_failures: 5
    failure_ratio: 0.5
    min_calls: 20
    window_s: 30
    cooldown_s: 5
    cooldown_multiplier: 2
    max_cooldown_s: 120
    half_open_probes: 1
    half_open_timeout_s: 60
  agent:
    consecutive_failures: 3
    backoff_s: 1
    backoff_multiplier: 2
    max_backoff_s: 60
    idle_ttl_s: 600
    max_entries: 10000
  loop:
    repeats: 2
    window_s: 60
    similarity: 0.8
    ignore_fields: [request_id, requestId, nonce, timestamp, idempotency_key, idempotencyKey, trace_id,
                    traceId, traceparent, span_id, correlation_id, correlationId, _meta]
    ignore_statuses: [408, 425, 429, 502, 503, 504]
    history: 16
    max_entries: 1024
  overrides:
    search:
      tool: {consecutive_failures: 3, cooldown_s: 2}
      loop: {repeats: 5}
    shell:
      loop: {enabled: false}
"""


def test_empty_mapping_gives_the_documented_defaults():
    c = parse({})
    assert c.tool == ToolBreakerConfig() and c.agent == AgentBackoffConfig() and c.loop == LoopGuardConfig()
    assert parse(None) == c


def test_the_readme_example_spells_the_defaults_and_overrides_merge_over_them():
    raw = yaml.safe_load(EXAMPLE)["breakers"]
    c = parse(raw, tools=["search", "shell", "files"])
    assert c.tool == ToolBreakerConfig() and c.agent == AgentBackoffConfig() and c.loop == LoopGuardConfig()
    s = c.tool_config("search")
    assert (s.consecutive_failures, s.cooldown_s, s.failure_ratio) == (3, 2.0, 0.5)
    assert c.loop_config("search").repeats == 5 and c.loop_config("search").window_s == 60.0
    assert c.loop_config("shell").enabled is False and c.loop_config("files").enabled is True
    assert c.tool_config("files") is c.tool


@pytest.mark.parametrize("raw,error", [
    ({"tool": {"failure_ratio": 1.5}}, "breakers.tool.failure_ratio: must be between 0 and 1 (got 1.5)"),
    ({"tool": {"failure_ratio": "half"}}, "breakers.tool.failure_ratio: must be a number (got 'half')"),
    ({"tool": {"min_calls": 2.5}}, "breakers.tool.min_calls: must be a whole number (got 2.5)"),
    ({"tool": {"half_open_probes": 0}}, "breakers.tool.half_open_probes: must be at least 1 (got 0)"),
    ({"tool": {"cooldown_s": 0}}, "breakers.tool.cooldown_s: must be greater than 0 (got 0.0)"),
    ({"tool": {"cooldown_s": 10, "max_cooldown_s": 5}},
     "breakers.tool.max_cooldown_s: must be at least cooldown_s (10), got 5"),
    ({"tool": {"enabled": "yes"}}, "breakers.tool.enabled: must be true or false (got 'yes')"),
    ({"tool": {"consecutive_failure": 5}}, "breakers.tool.consecutive_failure: unknown key (known: enabled,"),
    ({"agent": {"backoff_multiplier": 0.5}}, "breakers.agent.backoff_multiplier: must be at least 1 (got 0.5)"),
    ({"loop": {"ignore_statuses": [404, 200]}},
     "breakers.loop.ignore_statuses: must be HTTP error statuses 400-599 (got 200)"),
    ({"loop": {"ignore_fields": "id"}}, "breakers.loop.ignore_fields: must be a list of strings (got 'id')"),
    ({"loop": {"repeats": 20}}, "breakers.loop.history: must be at least repeats (20), got 16"),
    ({"tool": 5}, "breakers.tool: must be a mapping of settings (got int)"),
    ({"tools": {}}, "breakers.tools: unknown key (known: mode, tool, agent, loop, overrides, agents)"),
    ({"overrides": {"search": {"agent": {"max_entries": 5}}}},
     "breakers.overrides.search.agent.max_entries: bounds memory for all tools; set it under breakers.agent"),
    ({"overrides": {"search": {"tool": {"failure_ratio": -1}}}},
     "breakers.overrides.search.tool.failure_ratio: must be between 0 and 1 (got -1.0)"),
    ({"overrides": {"serch": {}}}, "breakers.overrides.serch: no tool named 'serch' (tools: search, shell)"),
    ({"overrides": {"search": {"breaker": {}}}}, "breakers.overrides.search.breaker: unknown key"),
])
def test_every_error_names_its_field(raw, error):
    with pytest.raises(ValueError) as e:
        build(raw, tools=["search", "shell"])
    assert error in str(e.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as e:
        parse({"tool": {"failure_ratio": 2, "window_s": -1}, "loop": {"similarity": 0}})
    lines = str(e.value).splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "breakers.tool.failure_ratio", "breakers.tool.window_s", "breakers.loop.similarity"]
