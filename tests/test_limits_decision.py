"""The decision's `limits`: a policy tightens one call's limits, end to end.

Regate as a real process, once with the memory store and once with a real
redis-server, a policy written by the test that returns `limits` for some calls
(chosen by tool and by the `mode` query argument), and limits/data.yaml data that
every call passes first. The decision's limits are one more check on keys of
their own: calls without them never count there, and a looser decision cannot
lift the data's limit.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
import redis.asyncio
import yaml

from proxy.limits import Budget, MemoryBudgets, MemoryRateLimiter, Rate
from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.approvals import wait_audit
from tests.support.procs import RegateProcess
from tests.test_limits_proxy import fetch, get, items, redis_server  # noqa: F401 (a fixture)
from tests.test_policy_e2e import write_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

POLICY = """
package regate

default mode := ""

mode := input.request.query.mode[0]

decision := {"allow": true, "limits": {"tool": {"rate": "1/min", "burst": 2}}} if {
	mode == "expensive"
} else := {"allow": true, "limits": {"tool": "1000/s", "agent": "unlimited"}} if {
	mode == "generous"
} else := {"allow": true, "cost": 1, "limits": {"budget": {"units": 2, "window": "1h"}}} if {
	mode == "budgeted"
} else := {"allow": true, "limits": {"tool": {"rate": "1/s", "burst": "lots"}}} if {
	mode == "broken"
} else := {"allow": true}
"""

LIMITS = {
    "defaults": {"agent": None, "tool": {"rate": "10/h", "burst": 10}, "budget": None},
    "tools": {"wide": {"rate": "1/h", "burst": 2}},
}

TOOLS = ("search", "wide", "billing", "broken", "watch")


@pytest.fixture(scope="module")
def regates(upstream, keys_file, tmp_path_factory, redis_server):  # noqa: F811
    tmp = tmp_path_factory.mktemp("declimits")
    rego, data = write_bundle(tmp, POLICY, {"limits/data.yaml": yaml.safe_dump(LIMITS)})
    tools = [{"name": n, "upstream": upstream, "timeout_ms": 5000} for n in TOOLS]
    tools[-1]["policy_mode"] = "shadow"
    tools.append({"name": "dead", "upstream": "http://127.0.0.1:9", "timeout_ms": 2000})  # nothing listens
    stores = {"memory": {}, "redis": {"store": "redis", "redis_url": redis_server.url, "timeout_ms": 500,
                                      "on_store_error": "deny"}}

    def one(name: str) -> RegateProcess:
        (tmp / name).mkdir()
        cfg = {"auth": {"mode": "api_key", "keys": str(keys_file)},
               "policy": {"rego": str(rego), "data": str(data)},
               "tools": tools, "limits": stores[name]}
        return RegateProcess(cfg, tmp / name)

    with ThreadPoolExecutor(len(stores)) as pool:  # start both at once
        procs = dict(zip(stores, pool.map(one, stores)))
    yield procs
    for p in procs.values():
        p.stop()


STORES = pytest.mark.parametrize("store", ["memory", "redis"])


async def calls(proc: RegateProcess, path: str, n: int, key: str = AGENT_KEY) -> list:
    async with aiohttp.ClientSession() as s:
        return [await get(s, proc.url + path, key) for _ in range(n)]


@STORES
async def test_tighter_decision_limit_refuses_at_its_rate_while_other_calls_pass(regates, store):
    proc = regates[store]
    # Calls without decision limits: the data's 10/h (burst 10) only.
    cheap = await calls(proc, "/tools/search/q", 4)
    assert [a.status for a in cheap] == [200] * 4
    assert "decision-tool" not in cheap[-1].headers["RateLimit"]

    # The policy gives mode=expensive 1/min, burst 2, on keys of their own: the four
    # calls above did not count there, so exactly two pass.
    first, second, third = await calls(proc, "/tools/search/q?mode=expensive", 3)
    assert [first.status, second.status, third.status] == [200, 200, 429]
    assert items(first.headers["RateLimit-Policy"]) == {"tool": {"q": 10, "w": 3600},
                                                        "decision-tool": {"q": 1, "w": 60}}
    assert items(first.headers["RateLimit"])["decision-tool"]["r"] == 1
    assert third.code == "rate_limited"
    assert "the policy's limit" in third.error["message"] and "'search'" in third.error["message"]
    assert 58 <= int(third.headers["Retry-After"]) <= 60
    limited = items(third.headers["RateLimit"])
    assert limited["decision-tool"] == {"r": 0, "t": int(third.headers["Retry-After"])}
    # Each call counted once against the data's key (4 + 3 of 10), not twice.
    assert limited["tool"]["r"] == 3

    # Other calls to the same tool still pass, at the data's rate.
    after = await calls(proc, "/tools/search/q?mode=other", 1)
    assert after[0].status == 200 and items(after[0].headers["RateLimit"])["tool"]["r"] == 2


@STORES
async def test_looser_decision_limit_cannot_lift_the_data_limit(regates, store):
    answers = await calls(regates[store], "/tools/wide/q?mode=generous", 3)
    assert [a.status for a in answers] == [200, 200, 429]
    refused = answers[-1]
    assert refused.code == "rate_limited" and "the policy's" not in refused.error["message"]
    assert items(refused.headers["RateLimit"])["tool"]["r"] == 0
    assert int(refused.headers["Retry-After"]) > 1000  # 1/h: the data's limit, not 1000/s


@STORES
async def test_decision_budget_is_its_own_account(regates, store):
    answers = await calls(regates[store], "/tools/billing/q?mode=budgeted", 3)
    assert [a.status for a in answers] == [200, 200, 429]
    assert items(answers[0].headers["RateLimit-Policy"])["decision-budget"] == {"q": 2, "w": 3600}
    refused = answers[-1]
    assert refused.code == "budget_exhausted" and "the policy gives this call a budget" in refused.error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    assert items(refused.headers["RateLimit"])["decision-budget"]["r"] == 0
    # Calls without the decision's budget are not charged to it.
    assert (await calls(regates[store], "/tools/billing/q", 1))[0].status == 200


@STORES
async def test_a_call_that_never_ran_gets_its_decision_budget_back(regates, store):
    # Budget 2, cost 1: without refunds the third call would be budget_exhausted. (Another
    # agent than the other tests': a decision budget is the agent's, across tools.)
    answers = await calls(regates[store], "/tools/dead/q?mode=budgeted", 3, OTHER_KEY)
    assert [(a.status, a.code) for a in answers] == [(502, "upstream_unreachable")] * 3


@STORES
async def test_malformed_decision_limits_are_a_policy_error(regates, store):
    (answer,) = await calls(regates[store], "/tools/broken/q?mode=broken", 1)
    assert answer.status == 403 and answer.code == "policy_error"
    # The agent is not shown the policy's internals; the audit record (the operator's) is (issue 23).
    assert answer.error["reasons"] == [] and answer.error["decision_id"] in answer.error["message"]
    (record,) = await wait_audit(regates[store].config_path.parent / "audit",
                                 lambda r: r.get("decision_id") == answer.error["decision_id"])
    assert any("decision.limits.tool.burst: " in r for r in record["reasons"]), record


@STORES
async def test_shadow_mode_counts_what_the_decision_limits_would_refuse(regates, store):
    proc = regates[store]
    answers = await calls(proc, "/tools/watch/q?mode=expensive", 3)
    assert [a.status for a in answers] == [200, 200, 200]
    # Watching changes nothing the agent sees: no decision-* RateLimit items to slow it down.
    assert not any("decision-" in a.headers.get("RateLimit", "") + a.headers.get("RateLimit-Policy", "")
                   for a in answers), [a.headers.get("RateLimit") for a in answers]
    _, metrics = await fetch(f"{proc.admin_url}/metrics")
    m = re.search(r'^regate_policy_would_deny_total\{(?=[^}]*tool="watch")(?=[^}]*reason="decision limits: '
                  r'rate_limited")[^}]*\} (\S+)$', metrics, re.M)
    assert m and float(m.group(1)) == 1.0, metrics[:2000]


async def test_redis_keeps_the_decision_keys_apart(regates, redis_server):  # noqa: F811
    await calls(regates["redis"], "/tools/search/q?mode=expensive", 1)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        keys = {k.decode() for k in await client.keys("regate:*")}
    finally:
        await client.aclose()
    assert {"regate:rl:{coder-7}:search", "regate:rl:decision:{coder-7}:search"} <= keys, keys


async def test_scoped_keys_never_share_cells_with_unscoped_ones():
    limiter = MemoryRateLimiter(clock=lambda: 100.0)
    one = Rate(1, 60)
    assert (await limiter.acquire("a", "t", one, one)).allowed
    assert (await limiter.acquire("a", "t", one, one, scope="decision")).allowed
    assert not (await limiter.acquire("a", "t", one, one)).allowed
    assert not (await limiter.acquire("a", "t", one, one, scope="decision")).allowed
    # An agent whose name is the scope does not collide with the scoped keys either.
    assert (await limiter.acquire("decision", "a", one, one)).allowed

    budgets = MemoryBudgets(clock=lambda: 100.0)
    b = Budget(1, 3600)
    assert (await budgets.charge("a", b, 1)).allowed
    assert (await budgets.charge("a", b, 1, scope="decision")).allowed
    assert not (await budgets.charge("a", b, 1, scope="decision")).allowed
    await budgets.spend("a", b, -1, scope="decision")  # a refund goes back to the same account
    assert (await budgets.charge("a", b, 1, scope="decision")).allowed
    assert not (await budgets.charge("a", b, 1)).allowed

