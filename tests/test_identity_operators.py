"""Operator identities on the admin plane: named tokens with roles.

A viewer reads the inbox but cannot approve (403); an approver's approval is
recorded under the token's name, whatever the request body claims, in the audit
and in the inbox; reload and breaker resets need the operator role; the legacy
shared admin.token keeps full rights (and its approver name stays unverified)."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import AGENT_KEY
from tests.security.conftest import Witness, audit_records, exchange, request
from tests.support.procs import ADMIN_TOKEN, RegateProcess

TOKENS = {"viewer": "viewer-token-0123456789", "alice": "alice-token-0123456789", "olga": "olga-token-0123456789"}

POLICY = """package regate

import rego.v1

decision := {"allow": true, "approval": {"required": input.request.method == "POST", "reason": "a human checks"}}
"""


def admin(proc, method: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(proc.admin_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def witness():
    w = Witness()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def regate(witness, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("operators")
    (tmp / "rego").mkdir()
    (tmp / "data").mkdir()
    (tmp / "rego" / "policy.rego").write_text(POLICY)
    cfg = {
        "admin": {"tokens": [
            {"name": "vic", "token": TOKENS["viewer"], "roles": ["viewer"]},
            {"name": "alice", "sha256": hashlib.sha256(TOKENS["alice"].encode()).hexdigest(), "roles": ["approver"]},
            {"name": "olga", "token": TOKENS["olga"], "roles": ["operator"]},
        ]},
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
        "limits": {"enabled": False},
        "approvals": {"mode": "async"},
        "tools": [{"name": "pay", "upstream": witness.upstream("pay")}],
        "audit": {"dir": str(tmp / "audit"), "fsync": "never"},
    }
    proc = RegateProcess(cfg, tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


def propose(proc) -> str:
    resp = exchange(proc.port, request("POST", "/tools/pay/x", key=AGENT_KEY, body=b'{"amount": 5}',
                                       content_type="application/json")).first
    assert resp.status == 202, resp.body
    status, body = admin(proc, "GET", "/admin/approvals?state=pending", TOKENS["viewer"])
    assert status == 200
    return body["approvals"][0]["id"]


def test_a_viewer_reads_the_inbox_but_cannot_approve(regate):
    approval = propose(regate)
    status, body = admin(regate, "GET", f"/admin/approvals/{approval}", TOKENS["viewer"])
    assert status == 200 and body["approval"]["state"] == "pending"
    status, body = admin(regate, "POST", f"/admin/approvals/{approval}/approve", TOKENS["viewer"],
                         {"approver": "vic"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert "approver" in body["error"]["message"] and "vic" in body["error"]["message"]
    assert admin(regate, "GET", f"/admin/approvals/{approval}", TOKENS["viewer"])[1]["approval"]["state"] == "pending"


def test_the_approvers_verified_name_goes_into_the_audit_and_the_inbox(regate):
    approval = propose(regate)
    # The body names someone else: the token's name is what counts.
    status, body = admin(regate, "POST", f"/admin/approvals/{approval}/approve", TOKENS["alice"],
                         {"approver": "the-ceo", "comment": "invoice checked"})
    assert status == 200, body
    assert body["approval"]["approver"] == "alice" and body["approval"]["state"] == "approved"
    status, body = admin(regate, "GET", f"/admin/approvals/{approval}", TOKENS["viewer"])
    assert body["approval"]["approver"] == "alice"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        recs = [r for r in audit_records(regate.audit_dir)
                if r.get("kind") == "approval" and r.get("approval_id") == approval and r.get("event") == "approved"]
        if recs:
            break
        time.sleep(0.05)
    [rec] = recs
    assert rec["approver"] == "alice" and rec["approver_verified"] is True and rec["comment"] == "invoice checked"
    # A named approver needs no name in the body at all.
    other = propose(regate)
    assert admin(regate, "POST", f"/admin/approvals/{other}/deny", TOKENS["alice"], {})[0] == 200


def test_reload_and_breaker_resets_need_the_operator_role(regate):
    for who in ("viewer", "alice"):
        status, body = admin(regate, "POST", "/admin/reload", TOKENS[who])
        assert status == 403 and body["error"]["code"] == "forbidden", (who, body)
        status, _ = admin(regate, "POST", "/admin/breakers/pay/reset", TOKENS[who])
        assert status == 403
    status, body = admin(regate, "POST", "/admin/reload", TOKENS["olga"])
    assert status == 200 and body["reloaded"]
    # Operators read as viewers do.
    assert admin(regate, "GET", "/admin/approvals", TOKENS["olga"])[0] == 200
    # ...but an operator is not an approver.
    approval = propose(regate)
    assert admin(regate, "POST", f"/admin/approvals/{approval}/approve", TOKENS["olga"], {})[0] == 403


def test_unknown_tokens_are_401_and_whoami_says_who(regate):
    for token in (None, "nope", TOKENS["alice"] + "x"):
        status, body = admin(regate, "GET", "/admin/approvals", token)
        assert status == 401 and body["error"]["code"] == "unauthenticated"
    assert admin(regate, "GET", "/admin/whoami", TOKENS["alice"])[1] == {
        "name": "alice", "roles": ["approver", "viewer"], "verified": True}


def test_the_shared_admin_token_keeps_full_rights_and_its_approver_is_unverified(regate):
    approval = propose(regate)
    status, body = admin(regate, "POST", f"/admin/approvals/{approval}/approve", ADMIN_TOKEN, {})
    assert status == 400 and body["error"]["code"] == "approver_required"  # it names nobody
    status, body = admin(regate, "POST", f"/admin/approvals/{approval}/approve", ADMIN_TOKEN, {"approver": "bob"})
    assert status == 200 and body["approval"]["approver"] == "bob"
    time.sleep(0.3)
    [rec] = [r for r in audit_records(regate.audit_dir)
             if r.get("approval_id") == approval and r.get("event") == "approved"]
    assert rec["approver"] == "bob" and rec["approver_verified"] is False
    assert admin(regate, "POST", "/admin/reload", ADMIN_TOKEN)[0] == 200
    assert admin(regate, "GET", "/admin/whoami", ADMIN_TOKEN)[1]["verified"] is False


def test_admin_tokens_config_is_checked():
    from proxy.config import ConfigError, validate

    tool = {"name": "t", "upstream": "http://127.0.0.1:1"}
    for tokens, expected in (
        ([{"name": "a", "roles": ["viewer"]}], "exactly one of token or sha256"),
        ([{"name": "a", "token": "short", "roles": ["viewer"]}], "at least 16"),
        ([{"name": "a", "token": "x" * 16, "roles": ["root"]}], "roles"),
        ([{"name": "a", "token": "x" * 16, "roles": ["viewer"]}, {"name": "a", "token": "y" * 16, "roles": ["viewer"]}],
         "duplicate names"),
    ):
        with pytest.raises(ConfigError) as e:
            validate({"tools": [tool], "admin": {"tokens": tokens}})
        assert expected in str(e.value), (tokens, e.value)
