"""Decision traces and the explain API over real sockets: a denied call's trace
names the policy stage, its reasons, the revision and the rule behind each
reason; a rate-limited call's trace ends at the limiter; `regate explain`
prints it for a human; older decisions come back from the audit log; the
decision log writes JSON lines joined on the decision id."""

from __future__ import annotations

import shutil
import subprocess
import sys

import aiohttp
import orjson
import pytest
import yaml

from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.procs import ADMIN_TOKEN, ROOT, RegateProcess
from tests.support.rego_lines import rule_line

pytestmark = pytest.mark.asyncio(loop_scope="module")

RM = {"command": "rm -rf /"}


def _bundle(tmp) -> tuple[str, str]:
    data = tmp / "policies"
    shutil.copytree(ROOT / "policies", data)
    limits = yaml.safe_load((data / "limits" / "data.yaml").read_text())
    # analyst-2 gets one call a minute: its second call is rate limited.
    limits.setdefault("agents", {}).setdefault("analyst-2", {})["agent"] = {"rate": "1/min", "burst": 1}
    (data / "limits" / "data.yaml").write_text(yaml.safe_dump(limits))
    return str(ROOT / "rego"), str(data)


@pytest.fixture(scope="module")
def regate(keys_file, upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs-traces")
    rego, data = _bundle(tmp)
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": rego, "data": data},
        "tools": [{"name": "shell", "upstream": upstream}, {"name": "echo", "upstream": upstream}],
        "http": {"shutdown_grace_s": 1},
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()


async def call(url: str, path: str, key: str, body=None, headers=None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body if body is not None else {},
                          headers={"X-Api-Key": key, **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


async def admin_get(proc, path: str, headers=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(proc.admin_url + path, headers=proc.admin_headers if headers is None else headers) as r:
            return r.status, await r.json(content_type=None)


async def test_denied_call_trace_names_policy_reasons_revision_and_rule(regate):
    status, headers, body = await call(regate.url, "/tools/shell/run", AGENT_KEY, RM)
    assert status == 403
    decision_id = headers["X-Regate-Decision-Id"]
    # The agent reads code, message, reasons and the id: nothing of the trace.
    assert set(body["error"]) == {"code", "message", "decision_id", "reasons"}

    status, t = await admin_get(regate, f"/admin/decisions/{decision_id}")
    assert status == 200
    assert t["decision_id"] == decision_id and t["source"] == "trace"
    assert (t["stage"], t["outcome"], t["status"], t["decision"]) == ("policy", "policy_denied", 403, "deny")
    assert t["revision"] == headers["X-Regate-Policy-Revision"] and t["revision"].startswith("sha256:")
    assert t["reasons"] == body["error"]["reasons"] and "rm -rf /" in t["reasons"][0]
    stages = [s["stage"] for s in t["stages"]]
    assert stages[0] == "identify" and stages[-1] == "policy" and "ratelimit" in stages
    assert t["stages"][-1]["verdict"] == "policy_denied"
    assert all(s["verdict"] == "continue" for s in t["stages"][:-1])
    assert all(s["us"] >= 0 for s in t["stages"])
    assert t["upstream"] is None and t["agent"] == "coder-7" and t["tool"] == "shell"
    # The rule that produced the reason, located in the bundle (regorus coverage).
    ex = t["explain"]
    assert ex["engine"] == "embedded" and ex["method"] == "coverage"
    [linked] = ex["reasons"]
    assert linked["reason"] == t["reasons"][0]
    refusal = rule_line("rego/tools/shell.rego", "refusals contains msg if {", "is not a command the shell tool runs")
    where = f"rego/tools/shell.rego:{refusal}"
    assert {"rule": "data.regate.tools.shell.refusals", "location": where} in linked["rules"]
    assert ex["input"]["request"]["body"] == RM

    # `regate explain` prints the same for a human.
    out = subprocess.run([sys.executable, "-m", "proxy", "explain", decision_id, "--admin-url", regate.admin_url],
                         capture_output=True, text=True, env={"REGATE_ADMIN_TOKEN": ADMIN_TOKEN, "PATH": ""},
                         cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"decision {decision_id}" in text and "outcome policy_denied at stage policy (HTTP 403)" in text
    assert t["revision"] in text and "STAGE" in text and "VERDICT" in text
    assert f"from data.regate.tools.shell.refusals at {where}" in text
    assert "rm -rf /" in text


async def test_rate_limited_call_trace_ends_at_the_limiter(regate):
    first, _, _ = await call(regate.url, "/tools/echo/x", OTHER_KEY)
    status, headers, body = await call(regate.url, "/tools/echo/x", OTHER_KEY)
    assert (first, status) == (200, 429) and body["error"]["code"] == "rate_limited"
    _, t = await admin_get(regate, f"/admin/decisions/{headers['X-Regate-Decision-Id']}")
    assert (t["stage"], t["outcome"], t["status"]) == ("ratelimit", "rate_limited", 429)
    assert t["stages"][-1] == {**t["stages"][-1], "stage": "ratelimit", "verdict": "rate_limited"}
    assert "policy" not in [s["stage"] for s in t["stages"]]  # it ended there: no decision was asked for
    assert t["decision"] is None and t["explain"] is None and t["upstream"] is None
    assert t["revision"].startswith("sha256:")  # the bundle in force, though the policy never ran


async def test_forwarded_call_trace_and_listing(regate):
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    status, headers, _ = await call(regate.url, "/tools/echo/ok", AGENT_KEY, headers={"traceparent": tp})
    assert status == 200
    decision_id = headers["X-Regate-Decision-Id"]
    _, t = await admin_get(regate, f"/admin/decisions/{decision_id}")
    assert (t["stage"], t["outcome"], t["decision"]) == ("forward", "forwarded", "allow")
    assert [s["stage"] for s in t["stages"]][-2:] == ["audit", "forward"]
    assert t["stages"][-1]["verdict"] == "upstream 200" and t["upstream"]["status"] == 200
    assert t["trace_id"] == "0af7651916cd43dd8448eb211c80319c"  # tracing off: the agent's trace, named
    assert t["explain"] is None  # explain: denied (the default) leaves allowed calls alone

    _, listing = await admin_get(regate, "/admin/decisions?agent=coder-7&limit=2")
    assert [d["decision_id"] for d in listing["decisions"]][0] == decision_id
    assert len(listing["decisions"]) == 2 and all(d["agent"] == "coder-7" for d in listing["decisions"])
    _, denied = await admin_get(regate, "/admin/decisions?outcome=policy_denied&tool=shell")
    assert denied["decisions"] and all(d["outcome"] == "policy_denied" for d in denied["decisions"])
    _, limited = await admin_get(regate, "/admin/decisions?outcome=rejected&agent=analyst-2")
    assert [d["outcome"] for d in limited["decisions"]] == ["rate_limited"]


async def test_explain_api_needs_the_token_and_knows_unknown_ids(regate):
    status, _ = await admin_get(regate, "/admin/decisions/abc", headers={})
    assert status == 401
    status, body = await admin_get(regate, "/admin/decisions/00000000000000000000")
    assert status == 404 and body["error"]["code"] == "unknown_decision"
    status, body = await admin_get(regate, "/admin/decisions/not%20an%20id")
    assert status == 400
    out = subprocess.run([sys.executable, "-m", "proxy", "explain", "abc", "--admin-url", regate.admin_url,
                          "--token", "wrong"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 1 and "401" in out.stderr and "REGATE_ADMIN_TOKEN" in out.stderr


async def test_traces_off_explain_falls_back_to_the_audit_log_and_logs_are_json(keys_file, upstream,
                                                                                 tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs-audit")
    rego, data = _bundle(tmp)
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": rego, "data": data},
        "tools": [{"name": "shell", "upstream": upstream}, {"name": "echo", "upstream": upstream}],
        "http": {"shutdown_grace_s": 1},
        "observability": {"traces": 0, "log_format": "json"},
    }
    proc = RegateProcess(cfg, tmp, extra_args=("--log-level", "debug"))
    try:
        _, denied_h, _ = await call(proc.url, "/tools/shell/run", AGENT_KEY, RM)
        _, ok_h, _ = await call(proc.url, "/tools/echo/y", AGENT_KEY)
        denied_id, ok_id = denied_h["X-Regate-Decision-Id"], ok_h["X-Regate-Decision-Id"]
        status, t = await admin_get(proc, f"/admin/decisions/{denied_id}")
        assert status == 200 and t["source"] == "audit"
        assert (t["stage"], t["decision"], t["revision"]) == ("policy", "deny", denied_h["X-Regate-Policy-Revision"])
        assert "rm -rf /" in t["reasons"][0]
        status, t = await admin_get(proc, f"/admin/decisions/{ok_id}")
        assert status == 200 and t["decision"] == "allow" and t["upstream"]["status"] == 200
        status, _ = await admin_get(proc, "/admin/decisions")
        assert status == 404  # no ring to list
    finally:
        proc.stop()
    lines = [orjson.loads(ln) for ln in proc.output().splitlines() if ln.startswith("{")]
    by_id = {ln.get("decision_id"): ln for ln in lines if ln.get("logger") == "regate.decisions"}
    refused, forwarded = by_id[denied_id], by_id[ok_id]
    assert refused["level"] == "info" and refused["outcome"] == "policy_denied" and refused["stage"] == "policy"
    assert refused["agent"] == "coder-7" and "rm -rf /" in refused["reasons"][0] and refused["revision"]
    assert forwarded["level"] == "debug" and forwarded["outcome"] == "forwarded" and forwarded["status"] == 200
    # Every line of the process is JSON, the startup lines included.
    assert any(ln.get("logger") == "regate" and "serving" in ln["message"] for ln in lines)
