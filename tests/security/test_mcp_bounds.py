"""MCP routes against a hostile tool and hostile clients, for gaps that were open:

- a compressed answer Regate buffers (a batch's replies, a `tools/list` it
  filters, JSON or SSE) is inflated in bounded steps and counted inflated against
  `mcp.max_message_bytes`: a gzip bomb (100 MiB of zeros in ~100 KB) cannot grow
  Regate's memory;
- an answer streamed on to an agent that stops reading is cut off once a write
  has stalled for the tool's deadline, as the forwarder cuts any other answer;
- refusals of the HTTP request around a message (its body, headers) carry the
  JSON-RPC code of an invalid request, not the catch-all -32000;
- with the policy off, the MCP stage reads the body itself, within
  `http.body_timeout_s` as read_body would.

Regate is a real process; the tool is a small aiohttp server on a thread of the
test process that answers every POST with the bomb.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import web

from tests.conftest import AGENT_KEY
from tests.security.conftest import exchange, request
from tests.support.procs import RegateProcess, free_port

pytestmark = pytest.mark.timeout(60)

LIMIT = 1 << 20          # mcp.max_message_bytes of both routes
BOMB_SIZE = 100 << 20    # what the bomb inflates to
MAX_GROWTH = 32 << 20    # Regate's peak RSS may grow this much while a bomb crosses it
TIMEOUT_MS = 1500        # the tools' deadline: a write to the agent stalled this long is cut off
ACCEPT = "application/json, text/event-stream"

ALLOW_ALL = """
package regate

decision := {"allow": true, "reasons": []}
"""


class BombTool:
    """An MCP server that answers every POST to /<json|sse>/mcp with BOMB_SIZE
    zero bytes, gzip-compressed, as application/json or text/event-stream."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bomb = gzip.compress(bytes(BOMB_SIZE), 9)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bomb-tool", daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the bomb tool did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/{kind}/mcp", self._answer)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        kind = request.match_info["kind"]
        ctype = "text/event-stream" if kind.endswith("sse") else "application/json"
        body = self.bomb
        if kind.startswith("cut"):
            # A whole tools/list answer, gzipped, without the gzip trailer (CRC and size):
            # every byte of the JSON inflates, but the stream never ends.
            reply = orjson.dumps({"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "t", "inputSchema": {}}]}})
            body = gzip.compress(b"event: message\ndata: " + reply + b"\n\n" if kind.endswith("sse") else reply)[:-8]
        return web.Response(body=body, headers={"Content-Type": ctype, "Content-Encoding": "gzip"})

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def tool():
    t = BombTool()
    assert len(t.bomb) < LIMIT  # compressed, it is well within the limit
    yield t
    t.stop()


def _regate(tool: BombTool, keys_file: Path, tmp: Path, policy: bool) -> RegateProcess:
    (tmp / "rego").mkdir()
    (tmp / "data").mkdir()
    (tmp / "rego" / "policy.rego").write_text(ALLOW_ALL)
    route = {"protocol": "mcp", "mcp": {"max_message_bytes": LIMIT}, "timeout_ms": TIMEOUT_MS}
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")} if policy else {"engine": "off"},
        "tools": [
            {"name": "bomb-json", "upstream": f"{tool.url}/json", **route},
            {"name": "bomb-sse", "upstream": f"{tool.url}/sse", **route},
            {"name": "cut-json", "upstream": f"{tool.url}/cut-json", **route},
            {"name": "cut-sse", "upstream": f"{tool.url}/cut-sse", **route},
        ],
        "limits": {"enabled": False},
        # Every bomb is a failed call: no breaker may stand between the tests and the tool.
        "breakers": {"tool": {"enabled": False}, "agent": {"enabled": False}, "loop": {"enabled": False}},
        "http": {"body_timeout_s": 1.0},
    }
    return RegateProcess(cfg, tmp)


@pytest.fixture(scope="module")
def regate(tool, keys_file, tmp_path_factory):
    proc = _regate(tool, keys_file, tmp_path_factory.mktemp("gap-mcp"), policy=True)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def regate_no_policy(tool, keys_file, tmp_path_factory):
    """Policy and loop guard off: read_body leaves the body unread, the MCP stage reads it."""
    proc = _regate(tool, keys_file, tmp_path_factory.mktemp("gap-mcp-nopolicy"), policy=False)
    yield proc
    proc.stop()


class PeakRss:
    """Regate's peak resident memory over a block, from the kernel's high-water mark
    (VmHWM, reset on entry where the kernel allows): no sampling, no peak missed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def _hwm(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def __enter__(self) -> "PeakRss":
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # the high-water mark restarts from the current RSS
        except OSError:
            pass  # then an earlier peak counts as growth: a false alarm, never a masked one
        self.base = psutil.Process(self.pid).memory_info().rss
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = self._hwm() - self.base


def tools_call(mid: int) -> dict:
    return {"jsonrpc": "2.0", "id": mid, "method": "tools/call", "params": {"name": "anything", "arguments": {}}}


async def test_a_gzip_bomb_answering_a_batch_is_refused_with_jsonrpc_errors_in_bounded_memory(regate):
    headers = {"X-Api-Key": AGENT_KEY, "Content-Type": "application/json", "Accept": ACCEPT}
    with PeakRss(regate.pid) as peak:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{regate.url}/tools/bomb-json/mcp", data=orjson.dumps([tools_call(1), tools_call(2)]),
                              headers=headers, timeout=aiohttp.ClientTimeout(total=20)) as r:
                status, body = r.status, await r.read()
    assert peak.growth < MAX_GROWTH, f"Regate's RSS grew {peak.growth >> 20} MiB for a {len(body)}-byte answer"
    assert status == 200, body[:300]
    replies = orjson.loads(body)
    assert [m["id"] for m in replies] == [1, 2]
    for m in replies:
        err = m["error"]
        assert err["code"] == -32012 and err["data"]["code"] == "upstream_error", err
        assert f"more than {LIMIT} bytes" in err["message"], err


@pytest.mark.parametrize("route", ["bomb-json", "bomb-sse"])
async def test_a_gzip_bomb_answering_tools_list_streams_on_in_bounded_memory(regate, route):
    # Past max_message_bytes an answer is not held to be filtered: it streams on, inflated,
    # as an uncompressed one would; Regate inflates only what the agent's socket takes.
    headers = {"X-Api-Key": AGENT_KEY, "Content-Type": "application/json", "Accept": ACCEPT}
    listing = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
    got = 0
    with PeakRss(regate.pid) as peak:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(f"{regate.url}/tools/{route}/mcp", data=orjson.dumps(listing), headers=headers,
                              timeout=aiohttp.ClientTimeout(total=30)) as r:
                assert r.status == 200
                assert "Content-Encoding" not in r.headers
                async for chunk in r.content.iter_any():
                    assert not chunk.strip(b"\0"), chunk[:100]
                    got += len(chunk)
    assert got == BOMB_SIZE
    assert peak.growth < MAX_GROWTH, f"Regate's RSS grew {peak.growth >> 20} MiB streaming the bomb on"


@pytest.mark.parametrize("route", ["bomb-json", "bomb-sse"])
def test_an_agent_that_stops_reading_a_streamed_answer_is_cut_off(regate, route):
    listing = orjson.dumps({"jsonrpc": "2.0", "id": 8, "method": "tools/list"})
    with PeakRss(regate.pid) as peak, socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", regate.port))
        s.sendall(request("POST", f"/tools/{route}/mcp", body=listing, content_type="application/json",
                          headers=[("Accept", ACCEPT)]))
        time.sleep(TIMEOUT_MS / 1000 + 1.5)  # not reading, past the tool's deadline: Regate's writes stall
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    assert received < BOMB_SIZE // 4, f"{received} bytes: the stalled stream was never cut"
    assert peak.growth < MAX_GROWTH, f"Regate's RSS grew {peak.growth >> 20} MiB for one agent that does not read"


async def test_a_compressed_answer_that_stops_before_its_end_is_not_passed_on_as_whole(regate):
    # Regate removes Content-Encoding, so the agent could not see the missing gzip trailer.
    headers = {"X-Api-Key": AGENT_KEY, "Content-Type": "application/json", "Accept": ACCEPT}
    listing = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{regate.url}/tools/cut-json/mcp", data=listing, headers=headers) as r:
            doc = await r.json()
        err = doc["error"]  # read whole to be filtered: refused before the status line
        assert err["data"]["code"] == "upstream_error" and "before the end" in err["message"], err
        with pytest.raises(aiohttp.ClientPayloadError):  # streamed event by event: the stream is cut
            async with s.post(f"{regate.url}/tools/cut-sse/mcp", data=listing, headers=headers) as r:
                assert r.status == 200
                await r.read()


def _jsonrpc_error(resp, status: int, code: str) -> dict:
    """A refusal before any message was read: the rejection's status, a JSON-RPC error with id null."""
    assert resp.status == status, (resp.status, resp.body[:300])
    doc = orjson.loads(resp.body)
    assert doc["jsonrpc"] == "2.0" and doc["id"] is None and "result" not in doc, doc
    err = doc["error"]
    assert err["data"]["code"] == code and err["data"]["decision_id"] == resp.decision_id, err
    return err


MESSAGE = orjson.dumps(tools_call(3))


@pytest.mark.parametrize("data, status, code", [
    (request("POST", "/tools/bomb-json/mcp", body=MESSAGE, content_type="application/json",
             headers=[("Content-Encoding", "gzip")]), 415, "unsupported_content_encoding"),
    # The head and half the message, then nothing: cut at http.body_timeout_s.
    (request("POST", "/tools/bomb-json/mcp", content_type="application/json",
             headers=[("Content-Length", str(len(MESSAGE)))]) + MESSAGE[:20], 408, "body_timeout"),
], ids=["compressed-body", "body-never-ends"])
def test_http_level_refusals_on_mcp_routes_are_invalid_request_errors(regate, data, status, code):
    ex = exchange(regate.port, data, timeout=5)
    err = _jsonrpc_error(ex.first, status, code)
    assert err["code"] == -32600, err


def test_with_policy_off_a_body_that_never_ends_is_cut_at_the_body_timeout(regate_no_policy):
    data = request("POST", "/tools/bomb-json/mcp", content_type="application/json",
                   headers=[("Content-Length", str(len(MESSAGE)))]) + MESSAGE[:20]
    t0 = time.monotonic()
    ex = exchange(regate_no_policy.port, data, timeout=5)
    err = _jsonrpc_error(ex.first, 408, "body_timeout")
    assert err["code"] == -32600, err
    assert time.monotonic() - t0 < 1.0 + 1.5
