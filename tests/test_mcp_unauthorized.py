"""A 401 on an MCP route has the shape of the MCP authorization spec (issue 23):
`WWW-Authenticate: Bearer …` (RFC 6750), with `resource_metadata` (RFC 9728) when
the route configures one, so an MCP client knows to authenticate instead of
reporting a server fault. Plain HTTP routes keep their API-key 401. A real Regate."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.support.procs import RegateProcess

META = "https://regate.example/.well-known/oauth-protected-resource/tools/tickets"


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcp-401")
    (tmp / "rego").mkdir()
    (tmp / "rego" / "p.rego").write_text("package regate\nimport rego.v1\ndecision := {\"allow\": true}\n")
    (tmp / "data").mkdir()
    proc = RegateProcess({
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
        "tools": [
            {"name": "tickets", "upstream": upstream, "protocol": "mcp", "mcp": {"resource_metadata": META}},
            {"name": "notes", "upstream": upstream, "protocol": "mcp"},
            {"name": "search", "upstream": upstream},
        ],
    }, tmp)
    yield proc
    proc.stop()


def post(url: str, key: str | None) -> tuple[int, dict[str, str]]:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if key is not None:
        headers["X-Api-Key"] = key
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_401_on_an_mcp_route_names_its_resource_metadata(regate, key):
    status, headers = post(regate.url + "/tools/tickets/mcp", key)
    assert status == 401
    assert headers["WWW-Authenticate"] == f'Bearer realm="regate", resource_metadata="{META}"'


def test_a_401_on_an_mcp_route_without_metadata_is_still_a_bearer_challenge(regate):
    status, headers = post(regate.url + "/tools/notes", "wrong-key")
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="regate"'


def test_an_http_route_keeps_its_plain_401(regate):
    status, headers = post(regate.url + "/tools/search/x", "wrong-key")
    assert status == 401 and "WWW-Authenticate" not in headers
