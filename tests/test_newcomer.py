"""A newcomer's first hour, scripted (issue 23 "Done means"): in an empty directory,
write a config, keys and a policy as the README says, then run the real CLI —
`config check`, `policy test`, `serve`, an allowed and a denied call, `audit tail`,
`audit verify` — and read every line it prints for the surprises the issue found:
a revision printed as "unloaded", raw pydantic or Python text, tracebacks,
"Unclosed client session", policy internals shown to the agent, `None -> None`,
a `Server: Python/… aiohttp/…` header."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.procs import ROOT, free_port, wait_http

ALICE, BOB = "alice-secret-key", "bob-secret-key"
POLICY = """package regate
import rego.v1

default decision := {"allow": false, "reasons": ["only the notes team may call notes"]}

decision := {"allow": true} if input.agent.id in data.team.members
"""
POLICY_TESTS = """package regate_test
import rego.v1

test_alice_may if data.regate.decision.allow with input as {"agent": {"id": "alice"}}

test_bob_may_not if not data.regate.decision.allow with input as {"agent": {"id": "bob"}}
"""
# Words that mean a surprise, wherever they appear in what the CLI prints.
SURPRISES = ("Traceback", "Unclosed", "unloaded", "Input should be", "None -> None", "None", "aiohttp",
             "Python/", "cannot listen")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def no_surprises(text: str) -> None:
    for word in SURPRISES:
        assert word not in text, f"{word!r} in:\n{text}"


def call(url: str, key: str) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, headers={"X-Api-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_a_newcomers_first_session(tmp_path, upstream):
    port, admin_port = free_port(), free_port()
    (tmp_path / "regate.yaml").write_text(f"""listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin_port}
  token: newcomer-admin-token
auth:
  mode: api_key
  keys: keys.yaml
tools:
  - name: notes
    upstream: {upstream}
policy:
  rego: rego/
  data: policies/
audit:
  dir: audit/
""")
    keys = "keys:\n" + "".join(f"  - sha256: {hashlib.sha256(k.encode()).hexdigest()}\n    agent: {a}\n"
                               for k, a in ((ALICE, "alice"), (BOB, "bob")))
    (tmp_path / "keys.yaml").write_text(keys)
    (tmp_path / "rego").mkdir()
    (tmp_path / "rego" / "notes.rego").write_text(POLICY)
    (tmp_path / "rego" / "notes_test.rego").write_text(POLICY_TESTS)
    (tmp_path / "policies" / "team").mkdir(parents=True)
    (tmp_path / "policies" / "team" / "data.yaml").write_text("members: [alice]\n")

    # 1. config check: one line, the revision of the compiled bundle.
    r = cli("config", "check", "-c", "regate.yaml", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    (line,) = r.stdout.splitlines()
    assert re.fullmatch(r"config OK: 1 tools, engine embedded, policy revision sha256:[0-9a-f]{12}", line), line
    revision = line.rsplit(" ", 1)[1]

    # 2. policy test, reading the policy section of the config.
    r = cli("policy", "test", "-c", "regate.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("notes_test.rego:")
    assert re.fullmatch(r"data\.regate_test\.test_alice_may: PASS \(\d+\.\dms\)", lines[1]), lines
    assert re.fullmatch(r"data\.regate_test\.test_bob_may_not: PASS \(\d+\.\dms\)", lines[2]), lines
    assert lines[-1] == "PASS: 2/2"
    no_surprises(r.stdout + r.stderr)

    # 3. serve, one allowed call and one denied.
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", "regate.yaml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_http(f"http://127.0.0.1:{admin_port}/healthz", proc)
        status, headers, body = call(f"http://127.0.0.1:{port}/tools/notes/today", ALICE)
        assert status == 200 and body["method"] == "GET"
        assert headers["X-Regate-Policy-Revision"] == revision
        allowed_id = headers["X-Regate-Decision-Id"]
        status, headers, body = call(f"http://127.0.0.1:{port}/tools/notes/today", BOB)
        assert status == 403 and headers["Server"] == "regate", headers
        assert body["error"]["code"] == "policy_denied"
        assert body["error"]["reasons"] == ["only the notes team may call notes"]
        denied_id = body["error"]["decision_id"]
        status, headers, body = call(f"http://127.0.0.1:{port}/tools/notes/today", "not-a-key")
        assert status == 401 and headers["Server"] == "regate"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    no_surprises(out)
    serving = [ln for ln in out.splitlines() if "serving" in ln]
    assert len(serving) == 1 and f"policy revision {revision}" in serving[0], out

    # 4. audit tail: who called what, what was decided; the unauthenticated call said as such.
    r = cli("audit", "tail", "audit/", "--no-follow", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    no_surprises(r.stdout)
    calls = [ln for ln in r.stdout.splitlines() if "checkpoint" not in ln]
    assert len(calls) == 4, r.stdout
    assert "ALLOW" in calls[0] and "alice -> notes GET /tools/notes/today" in calls[0] and allowed_id in calls[0]
    assert "OUTCOME" in calls[1] and "upstream 200" in calls[1] and allowed_id in calls[1]
    assert "DENY" in calls[2] and "bob -> notes GET /tools/notes/today" in calls[2] and denied_id in calls[2]
    assert "code=policy_denied" in calls[2] and "reasons: only the notes team may call notes" in calls[2]
    assert "DENY" in calls[3] and "(unauthenticated) -> (no tool)" in calls[3] and "code=unauthenticated" in calls[3]

    # 5. audit verify: the chain is whole and closed.
    r = cli("audit", "verify", "audit/", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    no_surprises(r.stdout + r.stderr)
    assert r.stdout.strip(), "verify says nothing"
