"""Regate's own answers say `Server: regate`, not `Python/3.11 aiohttp/x.y` (issue 23):
refusals on the data plane, the admin plane. A tool's answer keeps the tool's own
Server header. Also what the README promises for `auth.mode: none`: the agent's
X-Agent-Id reaches the tool (it is the only identity there is). A real Regate."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.support.procs import RegateProcess

POLICY = "package regate\nimport rego.v1\ndefault decision := {\"allow\": false}\n" \
         "decision := {\"allow\": true} if input.request.method == \"GET\"\n"


@pytest.fixture(scope="module")
def regate(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server-header")
    (tmp / "rego").mkdir()
    (tmp / "rego" / "p.rego").write_text(POLICY)
    (tmp / "data").mkdir()
    proc = RegateProcess({"auth": {"mode": "none"},
                          "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
                          "tools": [{"name": "echo", "upstream": upstream}]}, tmp)
    yield proc
    proc.stop()


def fetch(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.parametrize("path, method, headers, status", [
    ("/tools/echo/x", "GET", {}, 401),                       # no X-Agent-Id
    ("/nowhere", "GET", {"X-Agent-Id": "a"}, 404),
    ("/tools/echo/x", "DELETE", {"X-Agent-Id": "a"}, 403),
])
def test_regates_own_refusals_say_server_regate(regate, path, method, headers, status):
    got, h, _ = fetch(regate.url + path, method, headers)
    assert got == status
    assert h.get("Server") == "regate", h


def test_the_admin_plane_says_server_regate(regate):
    status, h, _ = fetch(regate.admin_url + "/healthz")
    assert status == 200 and h.get("Server") == "regate", h


def test_auth_none_forwards_x_agent_id_to_the_tool(regate):
    status, _, body = fetch(regate.url + "/tools/echo/x", headers={"X-Agent-Id": "coder-7"})
    assert status == 200
    assert json.loads(body)["headers"].get("X-Agent-Id") == "coder-7"
