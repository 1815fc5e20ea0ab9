"""The shipped example bundle (rego/ + policies/) does what its comments say,
through the embedded engine's serving path, at 100,000 agents too, and real OPA
(opa-golib-python-bindings, in-process) decides every case here the same way.

The shell tool is an allowlist of plain commands, the payments tool is judged
by currency, amount and a running total, and an MCP grant lists the JSON-RPC
methods an agent may send. The evasions below are the ones a blocklist let
through; each must be refused, with a reason that names the command."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import orjson
import pytest
import yaml
from opa_bindings import OpaEngine

from proxy.engines.bundle import load_bundle
from proxy.engines.decision import parse_decision
from proxy.engines.embedded import EmbeddedEngine
from proxy.policytool import _test_rules

ROOT = Path(__file__).resolve().parents[1]


def call(agent, tool, method, path, body=None, mcp=None):
    return {
        "version": 1,
        "agent": {"id": agent, "claims": {"sub": agent}},
        "tool": {"name": tool, "route": f"/tools/{tool}", "gpu": None},
        "request": {"method": method, "path": path, "query": {}, "headers": {"x-agent-id": agent},
                    "body": body, "body_sha256": "", "size": 0},
        "mcp": mcp,
        "state": {"breaker": "closed", "recent_failures": 0, "budget_left": 40.0},
        "time_ns": 1767225600000000000,
    }


def shell(command, agent="coder-7"):
    return call(agent, "shell", "POST", "/tools/shell/run", {"command": command})


def pay(body, agent="analyst-2"):
    return call(agent, "payments", "POST", "/tools/payments/pay", body)


def rpc(method, params=None, agent="support-1", tool_name=None):
    """A JSON-RPC message on the tickets MCP route, as the MCP stage hands it to the policy."""
    msg = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
    mcp = {"method": method, "id": 1, "tool": tool_name, "arguments": (params or {}).get("arguments"),
           "purpose": None}
    return call(agent, "tickets", "POST", "/tools/tickets/mcp", msg, mcp=mcp)


@pytest.fixture(scope="module")
def engine():
    eng = EmbeddedEngine(ROOT / "rego", ROOT / "policies")
    eng.load()
    return eng


@pytest.fixture(scope="module")
def opa():
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    eng = OpaEngine()
    for module in bundle.modules:
        eng.add_policy(module.name, module.source)
    eng.add_data(bundle.data)
    yield eng
    eng.close()


def decide(engine, doc):
    return engine.compiled.decide(doc)


def both(engine, opa, doc):
    """The embedded engine's decision, after checking that real OPA's is the same."""
    ours = decide(engine, doc)
    theirs = parse_decision(opa.eval_document("regate.decision", doc))
    assert ours.to_dict() == theirs.to_dict(), doc
    return ours


def test_demo_agents_and_public_tools(engine):
    assert decide(engine, shell("pytest -q")).allow
    assert decide(engine, call("analyst-2", "search", "POST", "/tools/search/", {"q": "revenue"})).allow
    assert decide(engine, call("anyone", "echo", "GET", "/tools/echo/hi")).allow
    d = decide(engine, shell("ls", agent="analyst-2"))
    assert not d.allow
    assert d.reasons == ["Agent 'analyst-2' has no grant for the tool 'shell'. "
                         "An operator can add one under 'analyst-2' in policies/agents/data.yaml."]


# --- shell -------------------------------------------------------------------

# Each got past the blocklist this allowlist replaces (issue 18).
EVASIONS = [
    "ls\nrm -rf /", "ls \\\nrm -rf /", "ls\rrm -rf /", "rm\t-rf /",
    "/bin/rm -rf /", "\\rm -rf /", "'rm' -rf /", '"rm" -rf /', "r''m -rf /", 'r""m -rf /',
    "$(echo rm) -rf /", "`echo rm` -rf /", "x=rm;$x -rf /", "x=rm; $x -rf /", "rm${IFS}-rf${IFS}/",
    "sh -c 'rm -rf /'", "bash -c rm", "sh -c rm", "eval rm -rf /", "echo cm0gLXJmIC8= | base64 -d | sh",
    "env rm -rf /", "nice rm -rf /", "timeout 10 rm -rf /", "exec rm -rf /", "command rm -rf /",
    "sudo -u root rm -rf /", "find / | xargs rm -rf", "xargs rm -rf", "find / -delete", "rm --recur /",
    "mke2fs /dev/sda1", "shred -u /dev/sda", "tee /dev/sda", "echo x | tee /dev/sda", "systemctl poweroff",
    "kill -9 1", "bomb(){ bomb|bomb& };bomb", "chmod -R a+rwx /", "truncate -s 0 /etc/passwd",
    "mv /etc /tmp/etc", "ls;rm -rf /", "ls && rm -rf /", "ls || rm -rf /", "ls & rm -rf /", "(rm -rf /)",
    "{ rm -rf /; }", "rm -rf /*", "rm -rf ~", "ls > /dev/sda", "dd if=/dev/zero of=/dev/sda",
    "python -c 'import os'", "python3 -c x", "perl -e x", "busybox rm -rf /", "git -c alias.x=!rm x",
    "git diff --output=/workspace/x", "cat /etc/shadow", "cat /workspace/../etc/shadow", "ls\u00a0-la",
    "ls\u2028rm", "ls -la # rm", "FOO=1 ls",
]


@pytest.mark.parametrize("command", EVASIONS)
def test_shell_refuses_every_known_evasion(engine, opa, command):
    d = both(engine, opa, shell(command))
    assert not d.allow
    assert d.reasons and all(r.startswith(f"The command '{command}' was refused: ") for r in d.reasons), d.reasons


@pytest.mark.parametrize("command, reason", [
    ("rm -rf /", "The command 'rm -rf /' was refused: 'rm' is not a command the shell tool runs (rm deletes files, "
                 "recursive deletion included; delete one file through the files tool, or ask a human). It runs: "
                 "cat, echo, git diff, git log, git show, git status, grep, head, ls, pwd, pytest, python -m pytest, "
                 "tail, wc."),
    ("ls;rm", "The command 'ls;rm' was refused: it contains the character ';'. The shell tool runs one plain "
              "command per call: words of ASCII letters, digits and _ . / = : , @ % + - separated by single spaces, "
              "with no quotes, escapes, variables, substitutions, globs, redirections, pipes or command separators."),
    ("cat /etc/passwd", "The command 'cat /etc/passwd' was refused: 'cat' does not take the argument '/etc/passwd'. "
                        "Usage: cat [-n] PATH ... (a PATH is relative, or absolute under /workspace, and never "
                        "contains '..')."),
    ("git push", "The command 'git push' was refused: 'git push' is not a command the shell tool runs. It runs: "
                 "cat, echo, git diff, git log, git show, git status, grep, head, ls, pwd, pytest, python -m pytest, "
                 "tail, wc."),
])
def test_shell_reasons_say_what_was_refused_and_what_is_allowed(engine, opa, command, reason):
    assert both(engine, opa, shell(command)).reasons == [reason]


@pytest.mark.parametrize("command", [
    "ls -la", "ls -la /workspace", "grep -rn shutdown docs/", "python -m pytest -q", "pytest -x tests/test_a.py",
    "git status", "git log --oneline -n 5", "git diff --stat", "git show HEAD", "cat -n src/app.py",
    "head -n 5 /workspace/x", "tail -20 build.log", "wc -l a b", "echo done", "pwd",
])
def test_shell_allows_listed_commands(engine, opa, command):
    d = both(engine, opa, shell(command))
    assert d.allow, d.reasons


@pytest.mark.parametrize("command, fragment", [
    ("rm build.log", "'rm' is not a command"),          # harmless, but rm is not listed
    ("git rm -r --cached x", "'git rm' is not a command"),
    ("df -h /dev/sda1", "'df' is not a command"),
    ("ls /", "'ls' does not take the argument '/'"),
    ("tail -f app.log", "'tail' does not take the argument '-f'"),
    ("git log main..HEAD", "it contains '..'"),
])
def test_shell_refuses_what_it_does_not_list(engine, opa, command, fragment):
    d = both(engine, opa, shell(command))
    assert not d.allow and any(fragment in r for r in d.reasons), d.reasons


def test_shell_needs_a_string_command(engine, opa):
    for body in ({"cmd": "ls"}, {"command": ["ls"]}, {"command": 1}, None, ["ls"]):
        d = both(engine, opa, call("coder-7", "shell", "POST", "/tools/shell/run", body))
        assert d.reasons == ["The shell tool needs a string argument 'command'."], body


def test_shell_command_keys_are_plain_words_and_patterns_use_ascii_classes():
    # The policy's guarantees rest on these: a key is plain words (so it can name
    # a command at all), and no pattern uses a class whose meaning differs between
    # regorus (Unicode) and OPA (ASCII).
    shell_data = yaml.safe_load((ROOT / "policies" / "tools" / "data.yaml").read_text())["shell"]
    for key, entry in shell_data["commands"].items():
        assert re.fullmatch(r"[A-Za-z0-9_.=:,@%+-]+( [A-Za-z0-9_.=:,@%+-]+)*", key), key
        assert "/" not in key.split(" ")[0], key
        assert not re.search(r"\\[swdbSWDB]", entry.get("args", "")), key
    assert not re.search(r"\\[swdbSWDB]", shell_data["path"])
    for path in (ROOT / "rego").rglob("*.rego"):
        if path.name.endswith("_test.rego"):
            continue
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        assert not re.search(r"\\{1,2}[swdbSWDB]", code), path


# --- files -------------------------------------------------------------------

def test_files_confined_to_the_workspace(engine):
    ok = decide(engine, call("coder-7", "files", "GET", "/tools/files/workspace/notes.md"))
    assert ok.allow
    for path in ("/tools/files/etc/passwd", "/tools/files/workspace/../etc/passwd",
                 "/tools/files/workspace/%2e%2e/secrets", "/tools/files/workspacex/a"):
        d = decide(engine, call("coder-7", "files", "GET", path))
        assert not d.allow, path
    # Over MCP the path is the tools/call's argument. coder-7's files grant lists no MCP
    # methods, so the call is refused for that as well.
    mcp = {"method": "tools/call", "tool": "read_file", "arguments": {"path": "/root/.ssh/id_rsa"}}
    d = decide(engine, call("coder-7", "files", "GET", "/tools/files/mcp", mcp=mcp))
    assert "The path '/root/.ssh/id_rsa' is outside '/workspace/'; " \
           "agent 'coder-7' may only touch files under '/workspace/'." in d.reasons
    assert any("may not send the MCP method 'tools/call' to 'files'" in r for r in d.reasons), d.reasons


# --- payments ----------------------------------------------------------------

def test_payments_approval_threshold_and_limit(engine, opa):
    small = both(engine, opa, pay({"amount": 99}))
    assert small.allow and not small.approval_required
    big = both(engine, opa, pay({"amount": 250}))
    assert big.allow and big.approval_required
    assert big.approval_reason == ("A payment of 250 USD is above the 100 USD that agent 'analyst-2' "
                                   "may pay without a human approval.")
    huge = both(engine, opa, pay({"amount": 6000}))
    assert not huge.allow and "above the limit of 5000 USD" in huge.reasons[0]


@pytest.mark.parametrize("currency", ["BTC", "usd", "EUR", "", None, 1, ["USD"]])
def test_payments_refuse_a_currency_the_grant_does_not_list(engine, opa, currency):
    d = both(engine, opa, pay({"amount": 99, "currency": currency}))
    assert not d.allow
    assert any("was refused: agent 'analyst-2' may pay only in USD (a payment without 'currency' is in USD)" in r
               for r in d.reasons), d.reasons


def test_payments_without_a_currency_are_in_the_tools_currency(engine, opa):
    assert both(engine, opa, pay({"amount": 99})).allow
    assert both(engine, opa, pay({"amount": 99, "currency": "USD"})).allow


def test_payments_cost_their_amount_and_unattended_ones_spend_the_window(engine, opa):
    # The window itself is enforced by Regate: tests/test_shipped_policy_e2e.py.
    d = both(engine, opa, pay({"amount": 100}))
    assert d.cost == 100 and d.limits == {"budget": {"units": 1000, "window": "1h"}}
    assert d.limit_checks is not None and d.limit_checks[2].units == 1000 and d.limit_checks[2].window_s == 3600
    d = both(engine, opa, pay({"amount": 12.5}))
    assert d.cost == 12.5 and d.limits is not None
    approved = both(engine, opa, pay({"amount": 250}))
    assert approved.cost == 250 and approved.limits is None  # a human approves it: not unattended
    refused = both(engine, opa, pay({"amount": "100"}))
    assert not refused.allow and refused.cost == 5 and refused.limits is None


# --- MCP ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["initialize", "notifications/initialized", "server/discover", "ping",
                                    "tools/list", "notifications/cancelled"])
def test_mcp_methods_the_grant_lists(engine, opa, method):
    assert both(engine, opa, rpc(method)).allow


@pytest.mark.parametrize("method", ["resources/read", "resources/list", "resources/templates/list",
                                    "prompts/get", "prompts/list", "Tools/Call", "TOOLS/LIST", "tools/call ",
                                    "completion/complete", "logging/setLevel", "sampling/createMessage"])
def test_mcp_methods_the_grant_does_not_list_are_refused_by_name(engine, opa, method):
    d = both(engine, opa, rpc(method, {"uri": "file:///etc/passwd", "name": "x"}))
    assert d.reasons == [
        f"Agent 'support-1' may not send the MCP method '{method}' to 'tickets' (methods are matched exactly as "
        "spelled); it may send: initialize, notifications/initialized, server/discover, ping, tools/list, "
        "tools/call, notifications/cancelled."]


def test_mcp_tools_call_still_checks_mcp_tools(engine, opa):
    ok = rpc("tools/call", {"name": "search_tickets", "arguments": {"query": "x"}}, tool_name="search_tickets")
    assert both(engine, opa, ok).allow
    no = rpc("tools/call", {"name": "delete_ticket", "arguments": {}}, tool_name="delete_ticket")
    assert both(engine, opa, no).reasons == [
        "Agent 'support-1' may not call the MCP tool 'delete_ticket' on 'tickets'; "
        "it may call: search_tickets, add_comment, watch_ticket."]


def test_mcp_get_and_delete_carry_no_method_and_follow_the_http_grant(engine, opa):
    none = {"method": None, "id": None, "tool": None, "arguments": None, "purpose": None}
    assert both(engine, opa, call("support-1", "tickets", "GET", "/tools/tickets/mcp", mcp=none)).allow
    assert both(engine, opa, call("support-1", "tickets", "DELETE", "/tools/tickets/mcp", mcp=none)).allow
    assert not both(engine, opa, call("support-1", "tickets", "PATCH", "/tools/tickets/mcp", mcp=none)).allow


# --- the shape of the policy ------------------------------------------------

def test_headers_timeout_and_cost(engine):
    d = decide(engine, shell("ls"))
    assert d.headers_set == {"X-Regate-Agent": "coder-7"}
    assert d.headers_remove == ["X-Agent-Id"]
    assert d.timeout_ms == 10000  # the grant's, lower than the tool's 30000
    assert decide(engine, call("coder-7", "search", "GET", "/tools/search/q")).cost == 1


def test_agents_are_looked_up_by_id_never_iterated():
    # A decision must not cost more with more agents: every use of data.agents
    # in the shipped policy is an object lookup by the caller's id.
    for path in (ROOT / "rego").rglob("*.rego"):
        if path.name.endswith("_test.rego"):
            continue
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        for m in re.finditer(r"data\.agents\b(.{0,20})", code):
            assert m.group(1).startswith("[input.agent.id]"), f"{path}: {m.group(0)}"


def test_decisions_with_100k_agents(tmp_path, engine):
    data = tmp_path / "policies"
    shutil.copytree(ROOT / "policies" / "tools", data / "tools")
    agents = yaml.safe_load((ROOT / "policies" / "agents" / "data.yaml").read_text())
    for i in range(100_000):
        agents[f"agent-{i:06d}"] = {"tools": {"shell": {"methods": ["POST"]}, "files": {"methods": ["GET"]}}}
    (data / "agents").mkdir()
    (data / "agents" / "data.json").write_bytes(orjson.dumps(agents))
    big = EmbeddedEngine(ROOT / "rego", data)
    big.load()
    assert big.revision != engine.revision
    for doc in (shell("rm -rf /"), pay({"amount": 250}), pay({"amount": 50}), rpc("Tools/Call")):
        assert decide(big, doc).to_dict() == decide(engine, doc).to_dict()
    assert decide(big, shell("ls", agent="agent-099999")).allow
    assert not decide(big, call("agent-099999", "shell", "GET", "/tools/shell/run", {"command": "ls"})).allow
    assert not decide(big, shell("ls", agent="agent-100000")).allow


def test_the_rego_tests_also_pass_under_real_opa():
    # Users can run `opa test rego/ policies/` on the same files.
    bundle = load_bundle(ROOT / "rego", ROOT / "policies", include_tests=True)
    import regorus

    parser = regorus.Engine()
    opa = OpaEngine()
    for module in bundle.modules:
        parser.add_policy(module.name, module.source)
        opa.add_policy(module.name, module.source)
    opa.add_data(bundle.data)
    tests = _test_rules(parser.get_ast_as_json())
    assert len(tests) >= 55
    failed = [path for _, path, _ in tests if opa.eval_document(path[len("data."):], None) is not True]
    opa.close()
    assert failed == []
