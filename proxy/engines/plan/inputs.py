"""Generated input documents for the differential checks (load time, tests, benchmark).

Shaped by Regate's input contract (agent, tool, request, mcp, state), with the
vocabulary taken from the bundle itself: agent ids and grants from ``data``,
tool names, command names, the strings the plan compares against. Most inputs
are well-formed calls; some carry odd types (numbers for strings, nulls, lists)
so that undefined and type-error paths are exercised too.
"""

from __future__ import annotations

import random
from typing import Any, Iterator


def _vocab(data: dict, strings: list[str]) -> dict[str, list]:
    agents = data.get("agents") if isinstance(data.get("agents"), dict) else {}
    tools = data.get("tools") if isinstance(data.get("tools"), dict) else {}
    tool_names = set(tools)
    methods = {"GET", "POST", "PUT", "DELETE", "PATCH", "get"}
    mcp_methods = {"tools/call", "tools/list", "initialize", "ping", "resources/read", "prompts/get",
                   "Tools/Call", "notifications/initialized"}
    mcp_tools = {"search_tickets", "add_comment", "watch_ticket", "delete_file", ""}
    for grant_set in agents.values():
        if isinstance(grant_set, dict) and isinstance(grant_set.get("tools"), dict):
            for tname, grant in grant_set["tools"].items():
                tool_names.add(tname)
                if isinstance(grant, dict):
                    for k in ("methods",):
                        methods.update(x for x in grant.get(k, []) if isinstance(x, str))
                    mcp_methods.update(x for x in grant.get("mcp_methods", []) if isinstance(x, str))
                    mcp_tools.update(x for x in grant.get("mcp_tools", []) if isinstance(x, str))
    words = ["ls", "-la", "src", "/workspace/a", "../etc", "a..b", "README.md", "-n", "10", "--stat",
             "/etc/passwd", "x%2e", "%2E", "-5", "rm", "/bin/ls", "HEAD", "--tb=short", "--maxfail=3", "-qv"]
    commands: list[str] = []
    shell = tools.get("shell") if isinstance(tools.get("shell"), dict) else {}
    if isinstance(shell.get("commands"), dict):
        commands += list(shell["commands"])
    if isinstance(shell.get("refused"), dict):
        commands += list(shell["refused"])[:10]
    short = [s for s in strings if len(s) < 24 and "\n" not in s]
    return {
        "agents": sorted(agents) + ["nobody", ""],
        "tools": sorted(tool_names) + ["unknown"],
        "methods": sorted(methods),
        "mcp_methods": sorted(mcp_methods),
        "mcp_tools": sorted(mcp_tools),
        "commands": commands or ["ls"],
        "words": words + short[:40],
    }


def _command(r: random.Random, v: dict) -> Any:
    k = r.random()
    if k < 0.05:
        return r.choice([None, 7, ["ls"], {"a": 1}, True])
    parts = [r.choice(v["commands"])]
    for _ in range(r.randrange(0, 4)):
        parts.append(r.choice(v["words"]))
    cmd = " ".join(parts)
    if k < 0.15:
        cmd = cmd + r.choice([" ", ";rm -rf /", "$(x)", "\t", "é", "  x", "|cat", "'q'", "\n"])
    elif k < 0.18:
        cmd = r.choice(["", " ", "ls  -la", " ls"])
    return cmd


def _args(r: random.Random, v: dict, tool: str) -> Any:
    k = r.random()
    if k < 0.04:
        return r.choice([None, [], "x", 3])
    a: dict = {}
    if tool == "shell" or r.random() < 0.2:
        a["command"] = _command(r, v)
    if tool == "files" or r.random() < 0.2:
        a["path"] = r.choice(["/workspace/a.txt", "/workspace/reports/q1.csv", "/etc/passwd", "/workspace/../x",
                              "/workspace/%2e%2e/x", "/workspace/a%2Eb", 7, None, "/workspace/"])
    if tool == "payments" or r.random() < 0.2:
        if r.random() < 0.9:
            a["amount"] = r.choice([0, 1, 50, 100, 101, 150, 4999, 5000, 5001, -3, 100.5, 7.25, 1e3,
                                    "100", None, True])
        if r.random() < 0.7:
            a["currency"] = r.choice(["USD", "EUR", "usd", 5, None, True])
    if tool == "tickets" or r.random() < 0.1:
        if r.random() < 0.8:
            a["text"] = r.choice(["hello", "x" * r.choice([10, 1999, 2000, 2001, 3000]), 5, None])
    if r.random() < 0.1:
        a[r.choice(["extra", "zz", "aa"])] = r.choice([1, "x", None])
    return a


def generate(data: dict, strings: list[str], n: int, seed: int = 0) -> Iterator[dict]:
    """``n`` input documents, deterministic for a seed."""
    r = random.Random(seed)
    v = _vocab(data, strings)
    for i in range(n):
        agent_id: Any = r.choice(v["agents"])
        if r.random() < 0.03:
            agent_id = r.choice([None, 7, ["x"]])
        tool = r.choice(v["tools"])
        mcp = None
        args = _args(r, v, tool)
        method = r.choice(v["methods"])
        body: Any = args if isinstance(args, dict) and r.random() < 0.5 else None
        request: dict = {"method": method, "path": f"/tools/{tool}/" + r.choice(["", "workspace/a.txt", "x/../y",
                                                                                  "workspace/%2e", "run"]),
                         "query": {}, "headers": {"content-type": "application/json"}, "body": body,
                         "size": r.randrange(0, 5000)}
        if r.random() < 0.8:
            request["arguments"] = args
        if r.random() < 0.35:
            mm = r.choice(v["mcp_methods"])
            mcp = {"method": mm if r.random() > 0.05 else None, "id": i}
            if mm == "tools/call":
                mcp["tool"] = r.choice(v["mcp_tools"])
                mcp["arguments"] = args
            if r.random() < 0.1:
                mcp["purpose"] = "tools/list"
            params = {"name": r.choice(v["mcp_tools"] + ["p1"]),
                      "uri": r.choice(["file:///workspace/a", "file:///x/../y", "file:///A%2E", 5])}
            request["body"] = {"jsonrpc": "2.0", "id": i, "method": mm, "params": params}
        route: Any = f"/tools/{tool}" if r.random() > 0.05 else None
        doc = {
            "version": 1,
            "agent": {"id": agent_id, "claims": {}} if r.random() > 0.02 else {},
            "tool": {"name": tool, "route": route, "gpu": None},
            "request": request,
            "mcp": mcp,
            "state": {"breaker": "closed", "recent_failures": 0, "budget_left": 40.0},
            "time_ns": 1767225600000000000 + i,
        }
        if r.random() < 0.01:
            doc["tool"]["name"] = r.choice([None, 3])
        yield doc
