"""The shipped example bundle (rego/ + policies/) does what its comments say,
through the embedded engine's serving path, at 100,000 agents too."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import orjson
import pytest
import yaml
from opa_bindings import OpaEngine

from proxy.engines.bundle import load_bundle
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


@pytest.fixture(scope="module")
def engine():
    eng = EmbeddedEngine(ROOT / "rego", ROOT / "policies")
    eng.load()
    return eng


def decide(engine, doc):
    return engine.compiled.decide(doc)


def test_demo_agents_and_public_tools(engine):
    assert decide(engine, call("coder-7", "shell", "POST", "/tools/shell/run", {"command": "pytest -q"})).allow
    assert decide(engine, call("analyst-2", "search", "POST", "/tools/search/", {"q": "revenue"})).allow
    assert decide(engine, call("anyone", "echo", "GET", "/tools/echo/hi")).allow
    d = decide(engine, call("analyst-2", "shell", "POST", "/tools/shell/run", {"command": "ls"}))
    assert not d.allow
    assert d.reasons == ["Agent 'analyst-2' has no grant for the tool 'shell'. "
                         "An operator can add one under 'analyst-2' in policies/agents.yaml."]


@pytest.mark.parametrize("command", [
    "rm -rf /", "rm -fr ~/", "rm -r -f /var", "sudo rm --recursive /etc", "mkfs.ext4 /dev/sda1",
    "dd if=/dev/urandom of=/dev/sda", "echo x > /dev/sda", "shutdown -h now", "reboot", ":(){ :|:& };:",
    "chmod -R 777 /", "cd /tmp && rm -r -f build", "find . | xargs rm -rf",
])
def test_shell_refuses_destructive_commands(engine, command):
    d = decide(engine, call("coder-7", "shell", "POST", "/tools/shell/run", {"command": command}))
    assert not d.allow
    assert d.reasons and d.reasons[0].startswith(f"The command '{command}' was refused: it looks like")


@pytest.mark.parametrize("command", ["ls -la", "rm build.log", "git rm -r --cached x", "grep -rn shutdown docs/",
                                     "python -m pytest -q", "df -h /dev/sda1"])
def test_shell_allows_ordinary_commands(engine, command):
    d = decide(engine, call("coder-7", "shell", "POST", "/tools/shell/run", {"command": command}))
    assert d.allow, d.reasons


def test_files_confined_to_the_workspace(engine):
    ok = decide(engine, call("coder-7", "files", "GET", "/tools/files/workspace/notes.md"))
    assert ok.allow
    for path in ("/tools/files/etc/passwd", "/tools/files/workspace/../etc/passwd",
                 "/tools/files/workspace/%2e%2e/secrets", "/tools/files/workspacex/a"):
        d = decide(engine, call("coder-7", "files", "GET", path))
        assert not d.allow, path
    mcp = {"method": "tools/call", "tool": "read_file", "arguments": {"path": "/root/.ssh/id_rsa"}}
    d = decide(engine, call("coder-7", "files", "GET", "/tools/files/mcp", mcp=mcp))
    assert d.reasons == ["The path '/root/.ssh/id_rsa' is outside '/workspace/'; "
                         "agent 'coder-7' may only touch files under '/workspace/'."]


def test_payments_approval_threshold_and_limit(engine):
    small = decide(engine, call("analyst-2", "payments", "POST", "/tools/payments/pay", {"amount": 99}))
    assert small.allow and not small.approval_required and small.cost == 5
    big = decide(engine, call("analyst-2", "payments", "POST", "/tools/payments/pay", {"amount": 250}))
    assert big.allow and big.approval_required
    assert big.approval_reason == ("A payment of 250 USD is above the 100 USD that agent 'analyst-2' "
                                   "may pay without a human approval.")
    huge = decide(engine, call("analyst-2", "payments", "POST", "/tools/payments/pay", {"amount": 6000}))
    assert not huge.allow and "above the limit of 5000 USD" in huge.reasons[0]


def test_headers_timeout_and_cost(engine):
    d = decide(engine, call("coder-7", "shell", "POST", "/tools/shell/run", {"command": "ls"}))
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
    data.mkdir()
    shutil.copy(ROOT / "policies" / "tools.yaml", data)
    agents = yaml.safe_load((ROOT / "policies" / "agents.yaml").read_text())
    for i in range(100_000):
        agents[f"agent-{i:06d}"] = {"tools": {"shell": {"methods": ["POST"]}, "files": {"methods": ["GET"]}}}
    (data / "agents.json").write_bytes(orjson.dumps(agents))
    big = EmbeddedEngine(ROOT / "rego", data)
    big.load()
    assert big.revision != engine.revision
    for doc in (call("coder-7", "shell", "POST", "/tools/shell/run", {"command": "rm -rf /"}),
                call("analyst-2", "payments", "POST", "/tools/payments/pay", {"amount": 250})):
        assert decide(big, doc).to_dict() == decide(engine, doc).to_dict()
    assert decide(big, call("agent-099999", "shell", "POST", "/tools/shell/run", {"command": "ls"})).allow
    assert not decide(big, call("agent-099999", "shell", "GET", "/tools/shell/run", {"command": "ls"})).allow
    assert not decide(big, call("agent-100000", "shell", "POST", "/tools/shell/run", {"command": "ls"})).allow


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
    assert len(tests) >= 20
    failed = [path for _, path, _ in tests if opa.eval_document(path[len("data."):], None) is not True]
    opa.close()
    assert failed == []
