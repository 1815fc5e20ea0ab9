"""The limits document: parsing (errors name the field) and per-call resolution."""

from __future__ import annotations

import pytest
import yaml

from proxy.limits import Budget, EffectiveLimits, LimitsError, Rate, compile_limits, resolve_limits

SAMPLE = """
defaults:
  agent: {rate: 20/s, burst: 40}
  tool: {rate: 5/s, burst: 10}
  budget: {units: 1000, window: 1d}
tools:
  shell: {rate: 1/s, burst: 2}
  search: {requests: 600, per: 1m}
agents:
  coder-7:
    agent: {rate: 50/s, burst: 100}
    budget: {units: 5000, window: 1d}
    tools:
      shell: {rate: 2/s, burst: 4}
  batch-runner:
    agent: unlimited
    budget: null
  reviewer:
    tools:
      shell: null
"""


@pytest.fixture(scope="module")
def table():
    return compile_limits(yaml.safe_load(SAMPLE))


@pytest.mark.parametrize("agent,tool,override,expected", [
    ("nobody", "anything", None, EffectiveLimits(Rate(20, 1, 40), Rate(5, 1, 10), Budget(1000, 86400))),
    ("nobody", "shell", None, EffectiveLimits(Rate(20, 1, 40), Rate(1, 1, 2), Budget(1000, 86400))),
    ("nobody", "search", None, EffectiveLimits(Rate(20, 1, 40), Rate(600, 60), Budget(1000, 86400))),
    ("coder-7", "shell", None, EffectiveLimits(Rate(50, 1, 100), Rate(2, 1, 4), Budget(5000, 86400))),
    ("coder-7", "search", None, EffectiveLimits(Rate(50, 1, 100), Rate(600, 60), Budget(5000, 86400))),
    ("batch-runner", "x", None, EffectiveLimits(None, Rate(5, 1, 10), None)),
    ("reviewer", "shell", None, EffectiveLimits(Rate(20, 1, 40), None, Budget(1000, 86400))),
    ("reviewer", None, None, EffectiveLimits(Rate(20, 1, 40), None, Budget(1000, 86400))),
    ("coder-7", "shell", {"tool": {"rate": "1/min", "burst": 1}},
     EffectiveLimits(Rate(50, 1, 100), Rate(1, 60, 1), Budget(5000, 86400))),
    ("coder-7", "shell", {"agent": None, "budget": {"units": 10, "window": "1h"}},
     EffectiveLimits(None, Rate(2, 1, 4), Budget(10, 3600))),
])
def test_resolve(table, agent, tool, override, expected):
    assert resolve_limits(table, agent, tool, override) == expected


def test_empty_document_means_no_limits():
    assert resolve_limits(compile_limits(None), "a", "t") == EffectiveLimits(None, None, None)


@pytest.mark.parametrize("doc,message", [
    ({"defaults": {"agent": "10 per s"}}, "limits.defaults.agent: want REQUESTS/PERIOD"),
    ({"defaults": {"agent": {"rate": "10/s", "burst": 0}}}, "limits.defaults.agent.burst: want a whole number"),
    ({"defaults": {"agent": {"rate": "10/fortnight"}}}, "limits.defaults.agent.rate: want REQUESTS/PERIOD"),
    ({"defaults": {"agent": {"rate": 10}}}, "limits.defaults.agent.rate: want REQUESTS/PERIOD"),
    ({"defaults": {"agent": {"rate": "10/s", "requests": 3}}}, "limits.defaults.agent: give either"),
    ({"defaults": {"agent": {"burst": 3}}}, "limits.defaults.agent: missing rate"),
    ({"defaults": {"agent": {"requests": 3, "per": "3x"}}}, "limits.defaults.agent.per: want a duration"),
    ({"defaults": {"budget": {"units": -1}}}, "limits.defaults.budget.units: want a number > 0"),
    ({"defaults": {"budget": {"window": "1d"}}}, "limits.defaults.budget.units: missing"),
    ({"defaults": {"budget": {"units": 5, "window": "0s"}}}, "limits.defaults.budget.window: want a duration"),
    ({"defaults": {"budgte": {}}}, "limits.defaults.budgte: unknown field"),
    ({"agents": {"coder-7": {"tools": {"shell": {"rate": "1/s", "brust": 2}}}}},
     "limits.agents.coder-7.tools.shell.brust: unknown field"),
    ({"agents": {"coder-7": {"budget": {"units": True}}}}, "limits.agents.coder-7.budget.units: want a number"),
    ({"agents": ["coder-7"]}, "limits.agents: want a mapping"),
    ({"tools": {"shell": {"rate": "0/s"}}}, "limits.tools.shell.rate: requests must be"),
    ({"tools": {"shell": "10/ms"}}, "limits.tools.shell: want REQUESTS/PERIOD"),
])
def test_errors_name_the_field(doc, message):
    with pytest.raises(LimitsError) as e:
        compile_limits(doc)
    assert str(e.value).startswith(message), str(e.value)


def test_bad_override_names_decision_field(table):
    with pytest.raises(LimitsError, match=r"^decision\.limits\.tool\.burst: "):
        resolve_limits(table, "coder-7", "shell", {"tool": {"rate": "1/s", "burst": "lots"}})
    with pytest.raises(LimitsError, match=r"^decision\.limits\.rate: unknown field"):
        resolve_limits(table, "coder-7", "shell", {"rate": "1/s"})


@pytest.mark.parametrize("spec,rate", [
    ("10/s", Rate(10, 1, 10)), ("10/sec", Rate(10, 1)), ("100/min", Rate(100, 60)),
    ("100/minute", Rate(100, 60)), ("5/10s", Rate(5, 10)), ("3/h", Rate(3, 3600)),
    ("1000/day", Rate(1000, 86400)), ("2/hrs", Rate(2, 3600)), ("2/mins", Rate(2, 60)), ("1000 / days", Rate(1000, 86400)), ("7/2m", Rate(7, 120)),
])
def test_rate_strings(spec, rate):
    assert Rate.parse(spec) == rate


def test_an_mcp_tool_key_falls_back_to_its_route_limits():
    table = compile_limits({"tools": {"tickets": "5/s", "tickets/add_comment": "1/s"},
                            "agents": {"a": {"tools": {"tickets": "7/s"}}}})
    assert resolve_limits(table, "b", "tickets/search").tool == Rate(5)
    assert resolve_limits(table, "b", "tickets/add_comment").tool == Rate(1)
    assert resolve_limits(table, "a", "tickets/search").tool == Rate(7)
