"""The parts behind the explain API: the trace ring, W3C trace context parsing,
linking reasons to the rules that made them, and OPA's explanation, asked of
the real OPA (`opa run --server`) over HTTP: which rule definitions its pretty
trace shows producing a value, at which file:row, and the same reasons linked
to the same rules as the embedded engine links them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from proxy.observability.explain import (
    OpaExplainer, _template, add_sources, link_reasons, opa_fired_rules, rule_text,
)
from proxy.observability.propagation import parse_traceparent
from proxy.observability.traces import ID, TraceRing
from tests.conftest import AGENT_KEY
from tests.support.opa_server import OpaMissing, OpaServer, opa_binary, shipped_paths
from tests.support.procs import RegateProcess


def test_ring_keeps_the_newest_and_finds_them_by_id():
    ring = TraceRing(3)
    for i in range(5):
        ring.add((f"id{i}",) + (None,) * 18)
    assert len(ring) == 3
    assert [e[ID] for e in ring.newest_first()] == ["id4", "id3", "id2"]
    assert ring.get("id1") is None and ring.get("id2")[ID] == "id2"


@pytest.mark.parametrize("value, expected", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00",
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 0)),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # zero trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # zero parent
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # forbidden version
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),  # v00 has no more fields
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)),  # a later version may add fields
    ("garbage", None), ("", None), (None, None),
])
def test_traceparent_parsing(value, expected):
    assert parse_traceparent(value) == expected


def test_sprintf_templates_link_reasons_to_rules():
    pat = _template("Agent '%s' may call the tool '%s' only with %s, not with '%s'.")
    assert pat.fullmatch("Agent 'a' may call the tool 'files' only with GET, not with 'PUT'.")
    assert not pat.fullmatch("Agent 'a' has no grant")
    assert _template("%s") is None and _template("shell") is None  # too little to be evidence
    assert _template("100%% sure: %d").fullmatch("100% sure: 7")
    rules = [{"rule": "data.r.deny", "location": "r.rego:9", "_patterns": [pat]},
             {"rule": "data.r.other", "location": "r.rego:20", "_patterns": []}]
    linked = link_reasons(["Agent 'x' may call the tool 'y' only with GET, not with 'POST'.", "unknown"], rules)
    assert linked == [
        {"reason": "Agent 'x' may call the tool 'y' only with GET, not with 'POST'.",
         "rules": [{"rule": "data.r.deny", "location": "r.rego:9"}]},
        {"reason": "unknown", "rules": []},
    ]


# --- the opa engine: OPA's own explanation -------------------------------------------

# A policy of the test's own (the shipped one changes under other work): two
# files, an incremental rule of which only one definition fires, an `else`, and
# `not` bodies whose text is a rule path (the trace enters them like rules).
REGATE_REGO = """package regate

decision := {"allow": count(deny) == 0, "reasons": deny}

deny contains msg if {
	input.tool.name == "shell"
	some msg in data.regate.shell.refusals
}
"""

SHELL_REGO = """package regate.shell

command := c if {
	c := input.request.body.command
	is_string(c)
}

harmless := {"ls", "pwd", "git status"}

refusals contains "The shell tool needs a string argument 'command'." if {
	not command
}

refusals contains msg if {
	command
	not command in harmless
	msg := sprintf("The command '%s' was refused: %s.", [command, why])
}

why := "it deletes files recursively" if {
	startswith(command, "rm -r")
} else := "it is not one of the harmless commands"
"""


def row(source: str, text: str) -> int:
    """The 1-based line of `source` that starts with `text` (exactly one)."""
    rows = [i for i, line in enumerate(source.splitlines(), 1) if line.startswith(text)]
    assert len(rows) == 1, (text, rows)
    return rows[0]


def shell_input(command) -> dict:
    return {"version": 1, "agent": {"id": "coder-7", "claims": {}},
            "tool": {"name": "shell", "route": "/tools/shell", "gpu": None},
            "request": {"method": "POST", "path": "/tools/shell/run", "query": {}, "headers": {},
                        "body": {"command": command}, "body_sha256": "", "size": 0},
            "mcp": None, "state": {}, "time_ns": 1}


@pytest.fixture(scope="module", autouse=True)
def real_opa() -> str:
    try:
        return opa_binary()
    except OpaMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("explain-bundle")
    (root / "rego").mkdir()
    (root / "policies").mkdir()
    (root / "rego" / "regate.rego").write_text(REGATE_REGO)
    (root / "rego" / "shell.rego").write_text(SHELL_REGO)
    return root / "rego", root / "policies"


@pytest.fixture(scope="module")
def opa(bundle):
    with OpaServer(*shipped_paths(*bundle)) as srv:
        yield srv


async def fired(opa: OpaServer, doc: dict) -> tuple[dict, set[tuple[str, str]]]:
    """OPA's decision, and the (rule, location) of each rule its pretty trace shows firing,
    the file names made whole from the sources OPA serves (its trace shortens long ones)."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{opa.url}/v1/data/regate/decision?explain=full&pretty=true", json={"input": doc}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        async with s.get(f"{opa.url}/v1/policies") as r:
            sources = {m["id"]: m["raw"] for m in (await r.json())["result"]}
    rules = opa_fired_rules(body["explanation"])
    add_sources(rules, sources)
    return body["result"], {(r["rule"], r["location"]) for r in rules}


async def test_real_opas_trace_gives_the_rules_that_fired_and_where(opa, bundle):
    shell = str(bundle[0] / "shell.rego")  # OPA names a file outside the checkout by its absolute path
    at = lambda text: f"{shell}:{row(SHELL_REGO, text)}"  # noqa: E731
    result, rules = await fired(opa, shell_input("rm -rf /"))
    assert result["reasons"] == ["The command 'rm -rf /' was refused: it deletes files recursively."]
    assert ("data.regate.shell.refusals", at("refusals contains msg if {")) in rules
    assert ("data.regate.shell.why", at("why := ")) in rules  # the first body
    assert ("data.regate.shell.command", at("command := c if {")) in rules
    assert ("data.regate.deny", f"{bundle[0] / 'regate.rego'}:{row(REGATE_REGO, 'deny contains msg if {')}") in rules
    # The definition that did not fire, and the `not command` body (entered as
    # `Enter data.regate.shell.command` at its own row), are not rules that fired.
    locations = {loc for _, loc in rules}
    assert at("refusals contains \"The shell") not in locations
    assert f"{shell}:{SHELL_REGO.splitlines().index(chr(9) + 'not command') + 1}" not in locations
    # An `else` is a definition of its own, at its own row.
    _, rules = await fired(opa, shell_input("cat x"))
    assert ("data.regate.shell.why", at("} else := ")) in rules
    assert ("data.regate.shell.why", at("why := ")) not in rules


def test_rule_text_is_one_definition():
    text = rule_text(SHELL_REGO, row(SHELL_REGO, "refusals contains msg if {"))
    assert text.startswith("refusals contains msg if {") and text.rstrip().endswith("}")
    assert "needs a string" not in text and "why :=" not in text
    assert rule_text(SHELL_REGO, row(SHELL_REGO, "why := ")).splitlines() == [
        'why := "it deletes files recursively" if {', "\tstartswith(command, \"rm -r\")"]


async def explain_through_regate(engine: str, bundle, keys_file, upstream, tmp: Path, opa_url: str | None = None):
    """A denied call through a Regate on `engine`; its explain document and `regate explain`'s text."""
    policy = {"engine": engine, "rego": str(bundle[0]), "data": str(bundle[1]), "timeout_ms": 2000}
    if opa_url:
        policy["opa"] = {"url": opa_url}
    cfg = {"auth": {"mode": "api_key", "keys": str(keys_file)}, "policy": policy,
           "tools": [{"name": "shell", "upstream": upstream}], "http": {"shutdown_grace_s": 1}}
    tmp.mkdir()
    proc = await asyncio.to_thread(RegateProcess, cfg, tmp)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proc.url + "/tools/shell/run", json={"command": "rm -rf /"},
                              headers={"X-Api-Key": AGENT_KEY}) as r:
                assert r.status == 403, await r.text()
                decision_id = r.headers["X-Regate-Decision-Id"]
            for _ in range(100):
                async with s.get(f"{proc.admin_url}/admin/decisions/{decision_id}", headers=proc.admin_headers) as r:
                    t = await r.json()
                if t["explain"].get("state") != "pending":
                    break
                await asyncio.sleep(0.05)
        shown = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy", "explain", decision_id, "--admin-url", proc.admin_url],
            capture_output=True, text=True, timeout=30,
            env={"REGATE_ADMIN_TOKEN": proc.admin_headers["Authorization"].split()[-1], "PATH": ""})
    finally:
        await asyncio.to_thread(proc.stop)
    assert shown.returncode == 0, shown.stderr
    return t["explain"], shown.stdout


async def test_opa_engine_explains_a_denial_as_the_embedded_engine_does(opa, bundle, keys_file, upstream, tmp_path):
    (ex, shown), (embedded, _) = await asyncio.gather(
        explain_through_regate("opa", bundle, keys_file, upstream, tmp_path / "opa", opa.url),
        explain_through_regate("embedded", bundle, keys_file, upstream, tmp_path / "embedded"))
    assert (ex["engine"], ex["state"]) == ("opa", "done"), ex
    refusal = f"{bundle[0] / 'shell.rego'}:{row(SHELL_REGO, 'refusals contains msg if {')}"
    reason = "The command 'rm -rf /' was refused: it deletes files recursively."
    assert ex["reasons"] == [{"reason": reason, "rules": [{"rule": "data.regate.shell.refusals", "location": refusal}]}]
    assert ex["reasons"] == embedded["reasons"]  # the same sentence, the same rule, the same file:row
    decision = f"{bundle[0] / 'regate.rego'}:{row(REGATE_REGO, 'decision := ')}"
    assert decision in [r["location"] for r in ex["rules"]]
    assert "GET /v1/policies" in ex["note"]
    # `regate explain` prints it for a human.
    assert f"from data.regate.shell.refusals at {refusal}" in shown, shown


# --authorization=basic: Data API queries allowed, the Policy API (module sources) not.
NO_POLICY_API = """package system.authz

default allow := false

allow if input.path[0] == "health"

allow if {
	input.path[0] == "v1"
	input.path[1] == "data"
}
"""


async def test_opa_that_will_not_show_its_sources_still_gives_rules_and_says_why(bundle, tmp_path):
    authz = tmp_path / "authz.rego"
    authz.write_text(NO_POLICY_API)
    with OpaServer(*shipped_paths(*bundle), authz, args=("--authorization=basic",)) as srv:
        engine = SimpleNamespace(url=srv.url, decision="regate/decision", revision=f"opa:{srv.url}")
        explainer = OpaExplainer("denied", None, engine)
        result: dict = {}
        reason = "The command 'rm -rf /' was refused: it deletes files recursively."
        try:
            await explainer._ask(shell_input("rm -rf /"), [reason], result)
        finally:
            await explainer.close()
    assert result["state"] == "done", result
    # The rule and its row; the file as OPA's trace writes it (a long path partly as "...").
    row_of_refusal = f"shell.rego:{row(SHELL_REGO, 'refusals contains msg if {')}"
    assert [r for r in result["rules"] if r["rule"] == "data.regate.shell.refusals"
            and r["location"].endswith(row_of_refusal)], result["rules"]
    assert result["reasons"] == [{"reason": reason, "rules": []}]
    assert "GET /v1/policies answered 401" in result["note"] and "not linked" in result["note"], result["note"]
