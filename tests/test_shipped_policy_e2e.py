"""The shipped policy through a running Regate: what an agent meets.

Regate as a real process with the shipped Rego and data, in front of the demo
tool (examples/demo_tool.py: shell and payments) and a JSON-RPC MCP server
(tests/support/jsonrpc_upstream.py, which remembers what reached it). The
only change to the shipped data: the shell and payments rates of
policies/limits/data.yaml (2/s and 10/min, bursts of 5 and 3) are lifted, so that
the calls here can be made in a row, and it is the policy's running total,
not a rate, that refuses the eleventh payment.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
import time

import aiohttp
import pytest
import yaml

from tests.support.procs import ROOT, Process, RegateProcess, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEYS = {"coder-7": "e2e-key-coder-7", "analyst-2": "e2e-key-analyst-2", "support-1": "e2e-key-support-1"}
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def servers():
    tool_port, rpc_port = free_port(), free_port()
    tool = Process([sys.executable, str(ROOT / "examples/demo_tool.py"), str(tool_port)],
                   f"http://127.0.0.1:{tool_port}/health")
    rpc = Process([sys.executable, str(ROOT / "tests/support/jsonrpc_upstream.py"), str(rpc_port)],
                  f"http://127.0.0.1:{rpc_port}/_seen")
    yield f"http://127.0.0.1:{tool_port}", f"http://127.0.0.1:{rpc_port}"
    tool.stop()
    rpc.stop()


@pytest.fixture(scope="module")
def regate(servers, tmp_path_factory):
    tool, rpc = servers
    tmp = tmp_path_factory.mktemp("shipped-e2e")
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"sha256": hashlib.sha256(k.encode()).hexdigest(), "agent": a} for a, k in KEYS.items()]}))
    data = tmp / "policies"
    shutil.copytree(ROOT / "policies", data)
    limits = yaml.safe_load((data / "limits" / "data.yaml").read_text())
    limits["tools"]["payments"] = limits["tools"]["shell"] = {"rate": "100/s", "burst": 100}
    (data / "limits" / "data.yaml").write_text(yaml.safe_dump(limits))
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys)},
        "tools": [
            {"name": "shell", "upstream": f"{tool}/shell", "timeout_ms": 5000},
            {"name": "payments", "upstream": f"{tool}/payments", "timeout_ms": 5000},
            {"name": "tickets", "upstream": rpc, "protocol": "mcp"},
        ],
        "policy": {"rego": str(ROOT / "rego"), "data": str(data)},
        "approvals": {"mode": "async"},
        "http": {"shutdown_grace_s": 1},
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()


async def post(url: str, agent: str, body: object) -> tuple[int, dict, object]:
    headers = {"X-Api-Key": KEYS[agent], "Accept": ACCEPT}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body, headers=headers) as r:
            return r.status, dict(r.headers), (await r.json() if r.content_length != 0 else None)


async def seen(servers) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{servers[1]}/_seen") as r:
            return await r.json()


# --- shell -------------------------------------------------------------------

async def test_an_allowed_command_runs_as_its_words(regate):
    status, _, body = await post(f"{regate.url}/tools/shell/run", "coder-7", {"command": "ls -la /workspace"})
    assert status == 200, body
    # The demo tool runs the argv, without a shell: the words the policy judged.
    assert body["would_run"] == ["ls", "-la", "/workspace"]


@pytest.mark.parametrize("command", ["ls\nrm -rf /", "\\rm -rf /", "r''m -rf /", "$(echo rm) -rf /",
                                     "env rm -rf /", "sh -c 'rm -rf /'", "find / -delete", "cat /etc/passwd"])
async def test_evasions_are_refused_with_reasons(regate, command):
    status, _, body = await post(f"{regate.url}/tools/shell/run", "coder-7", {"command": command})
    assert status == 403 and body["error"]["code"] == "policy_denied"
    assert body["error"]["reasons"] and all(r.startswith(f"The command '{command}' was refused: ")
                                            for r in body["error"]["reasons"])


# --- payments ----------------------------------------------------------------

async def test_the_eleventh_payment_of_100_in_an_hour_is_refused(regate):
    # The window is a fixed hour (budgets are epoch-aligned): not across its end.
    left = 3600 - time.time() % 3600
    if left < 30:
        await asyncio.sleep(left + 1)
    url = f"{regate.url}/tools/payments/pay"
    # Refused payments never count against the window.
    status, _, body = await post(url, "analyst-2", {"amount": 99, "currency": "BTC", "to": "x"})
    assert status == 403 and body["error"]["code"] == "policy_denied"
    assert body["error"]["reasons"] == [
        "A payment in the currency 'BTC' was refused: agent 'analyst-2' may pay only in USD "
        "(a payment without 'currency' is in USD)."]
    for i in range(10):
        status, headers, body = await post(url, "analyst-2", {"amount": 100, "currency": "USD", "to": f"v{i}"})
        assert status == 200, (i, body)
        assert body["would_pay"] == 100
        assert '"decision-budget";q=1000;w=3600' in headers["RateLimit-Policy"]
    status, headers, body = await post(url, "analyst-2", {"amount": 100, "to": "v10"})
    assert status == 429, body
    err = body["error"]
    assert err["code"] == "budget_exhausted"
    assert "a budget of 1000 units per 3600 s; 0 are left in this window and this call costs 100" in err["message"]
    assert int(headers["Retry-After"]) >= 1
    # Any amount: the window is spent.
    status, _, body = await post(url, "analyst-2", {"amount": 1, "to": "v11"})
    assert status == 429 and body["error"]["code"] == "budget_exhausted"


async def test_a_payment_above_the_approval_threshold_waits_for_a_human(regate):
    status, headers, body = await post(f"{regate.url}/tools/payments/pay", "analyst-2", {"amount": 250, "to": "x"})
    assert status == 202 and body["error"]["code"] == "approval_pending", body
    assert headers["X-Regate-Approval"].startswith("apr_")
    assert "A payment of 250 USD is above the 100 USD" in body["error"]["reasons"][0]


# --- MCP ---------------------------------------------------------------------

def rpc(mid, method, **params):
    return {"jsonrpc": "2.0", "id": mid, "method": method, "params": params}


async def test_mcp_methods_outside_the_grant_never_reach_the_server(regate, servers):
    url = f"{regate.url}/tools/tickets/mcp"
    before = (await seen(servers))["posts"]
    for mid, method, params in [(1, "resources/read", {"uri": "file:///etc/passwd"}),
                                (2, "prompts/get", {"name": "x"}),
                                (3, "Tools/Call", {"name": "search_tickets", "arguments": {}})]:
        status, _, body = await post(url, "support-1", rpc(mid, method, **params))
        assert status == 200 and body["id"] == mid, body
        err = body["error"]
        assert err["code"] == -32001 and err["data"]["code"] == "policy_denied"
        assert err["data"]["reasons"] == [
            f"Agent 'support-1' may not send the MCP method '{method}' to 'tickets' (methods are matched exactly "
            "as spelled); it may send: initialize, notifications/initialized, server/discover, ping, tools/list, "
            "tools/call, notifications/cancelled."]
    assert (await seen(servers))["posts"] == before

    # In a batch each message is judged alone: the ping goes through, the read does not.
    status, _, body = await post(url, "support-1", [rpc(4, "ping"), rpc(5, "resources/read", uri="file:///x")])
    assert status == 200 and [m["id"] for m in body] == [4, 5]
    assert body[0]["result"] == {} and body[1]["error"]["data"]["code"] == "policy_denied"
    got = await seen(servers)
    assert got["posts"] == before + 1 and got["bodies"][-1] == [rpc(4, "ping")]


async def test_mcp_granted_methods_pass(regate):
    url = f"{regate.url}/tools/tickets/mcp"
    status, _, body = await post(url, "support-1", rpc(6, "ping"))
    assert status == 200 and body == {"jsonrpc": "2.0", "id": 6, "result": {}}
    status, _, body = await post(url, "support-1", rpc(7, "tools/list"))
    # jsonrpc_upstream's tools are not support-1's: the list comes back filtered to none.
    assert status == 200 and body["result"]["tools"] == []
