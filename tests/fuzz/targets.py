"""Fuzz targets over the code that reads what agents (and tools) send: each takes
bytes, runs the real code, and checks properties that must hold for every input.
A target raises on a bug (an exception from Regate's code, or a broken property);
an input Regate refuses cleanly is not a bug.

    route          raw request path -> Route (the tool reached must be the tool judged,
                   under every way an upstream may decode and normalise the path)
    json           request body -> ReadBody's parse_json, differential against the
                   stdlib parser (what policy reads is what any tool reads)
    policy_input   header lines, query, body -> PolicyStage.input_document -> the
                   shipped Rego in the embedded engine (no credentials, always JSON,
                   a strict decision or a clean error)
    mcp            JSON-RPC body -> proxy.mcp.parse_message (never raises, sane views)
    sse            a byte stream -> proxy.mcp.SseReader (chunking never changes the events)

The seed corpus lives in tests/fuzz/corpus/<target>/; plain pytest replays it, and
every input a fuzz run breaks on is saved there (REGATE_FUZZ_SAVE=1, as `make fuzz` sets).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import os
import posixpath
import unicodedata
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import mcp
from proxy.config import validate
from proxy.engines.decision import DecisionError, EngineError
from proxy.pipeline import Call
from proxy.stages.body import parse_json
from proxy.stages.route import Route

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"

TOOLS = [
    {"name": "search", "upstream": "http://127.0.0.1:9/s"},
    {"name": "shell", "upstream": "http://127.0.0.1:9/sh"},
    {"name": "files", "upstream": "http://127.0.0.1:9/f"},
    {"name": "payments", "upstream": "http://127.0.0.1:9/p"},
    {"name": "nested", "prefix": "/tools/search/deep", "upstream": "http://127.0.0.1:9/n"},
]
CFG = validate({"tools": TOOLS, "auth": {"mode": "api_key", "keys": "k.yaml"},
                "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")}})


class FakeRequest:
    """What the stages read of an aiohttp request, built from fuzz input."""

    def __init__(self, raw_path: str, headers: list[tuple[str, str]] | None = None, method: str = "GET",
                 body: bytes = b"") -> None:
        self.raw_path = raw_path
        self.method = method
        path, _, self.query_string = raw_path.partition("?")
        path = path.partition("#")[0]
        self.path = URL.build(path=path, encoded=True).path  # as aiohttp's parser builds it
        self.headers = CIMultiDictProxy(CIMultiDict(headers or []))
        self.raw_headers = tuple((k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                                 for k, v in headers or [])
        self.content_length = len(body) if body else None
        self.body_exists = bool(body)


def _run(coro: Any) -> Any:
    loop = _loop()
    return loop.run_until_complete(coro)


_LOOP: list[asyncio.AbstractEventLoop] = []


def _loop() -> asyncio.AbstractEventLoop:
    if not _LOOP:
        _LOOP.append(asyncio.new_event_loop())
    return _LOOP[0]


# --------------------------------------------------------------------- route

_ROUTE = Route(CFG.tools)


def _wire_target(raw: str) -> bool:
    """Whether aiohttp's parser lets this request target through (visible ASCII only)."""
    return all("!" <= c <= "~" for c in raw)


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _norm(p: str) -> str:
    out = posixpath.normpath(p) if p else "/"
    return "/" + out.lstrip("/") if out != "." else "/"


def upstream_views(path: str) -> dict[str, str]:
    """How servers behind Regate may read the path it forwards (relative to the route)."""
    once = unquote(path, errors="surrogateescape")
    twice = unquote(once, errors="surrogateescape")
    views = {
        "decoded": once,
        "decoded_twice": twice,
        "backslash": once.replace("\\", "/"),
        "path_params": "/".join(seg.split(";", 1)[0] for seg in once.split("/")),
        "nfkc": unicodedata.normalize("NFKC", once.encode("utf-8", "surrogateescape").decode("utf-8", "replace")),
    }
    return {k: _norm(v) for k, v in views.items()}


def target_route(data: bytes) -> None:
    raw = data.decode("utf-8", "surrogateescape")
    if not raw.startswith("/"):
        raw = "/" + raw
    if not _wire_target(raw):
        return  # the HTTP parser refuses it before any stage runs
    call = Call(FakeRequest(raw, [("Host", "regate.test")]))  # type: ignore[arg-type]
    rejection = _run(_ROUTE.enter(call))
    if rejection is not None:
        assert rejection.status in (400, 404), rejection
        return
    tool = call.tool
    path = raw.split("?", 1)[0]
    prefix = tool.prefix
    assert _inside(path, prefix), (path, prefix)
    # No longer prefix that would have matched: the most specific route wins.
    for other in CFG.tools:
        if other.prefix and len(other.prefix) > len(prefix):
            assert not _inside(path, other.prefix), (path, prefix, other.prefix)
    rest = call.upstream_path
    assert (prefix.rstrip("/") + rest.split("?", 1)[0]) == path or (path == prefix and rest.startswith("/")), \
        (path, prefix, rest)
    # Whatever the upstream makes of the path, it stays in the judged route.
    for name, view in upstream_views(path).items():
        assert _inside(view, prefix), f"{name}: {path!r} reads as {view!r}, outside {prefix!r}"


# --------------------------------------------------------------------- json

def _no_dup_pairs(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Duplicate(keys)
    return dict(pairs)


class _Duplicate(Exception):
    pass


_HUGE = 2 ** 63


def _has_huge(v: Any) -> bool:
    if isinstance(v, dict):
        return any(_has_huge(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_huge(x) for x in v)
    if isinstance(v, float):
        return abs(v) >= _HUGE
    if isinstance(v, int) and not isinstance(v, bool):
        # The README's bound: integers within +-(2**63-1), which every parser reads exactly.
        return not (-(2 ** 63 - 1) <= v <= 2 ** 63 - 1)
    return False


def _depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


def target_json(data: bytes) -> None:
    doc, problem = parse_json(data)
    try:
        text = data.decode("utf-8")
        ref: Any = json.loads(text, object_pairs_hook=_no_dup_pairs)
        ref_problem = "huge" if _has_huge(ref) else None
    except _Duplicate:
        ref, ref_problem = None, "duplicate"
    except (ValueError, RecursionError):
        ref, ref_problem = None, "invalid"
    if problem is None:
        # Accepted: the stdlib reads the same document, without duplicates or huge numbers.
        assert ref_problem is None, (ref_problem, data[:200])
        assert doc == ref, (doc, ref)
        assert _depth(doc) <= 64
        assert orjson.loads(orjson.dumps(doc)) == doc  # policy engines get it re-encoded
    elif "repeats a key" in problem:
        assert ref_problem == "duplicate", (problem, ref_problem, data[:200])
    elif "nests deeper" in problem:
        assert ref_problem is not None or _depth(ref) > 64, (problem, data[:200])
    elif "number outside" in problem:
        assert ref_problem in ("huge", "duplicate", "invalid"), (problem, ref_problem, data[:200])
    else:
        assert problem.startswith("request body is not valid UTF-8 JSON"), problem


# --------------------------------------------------------------------- policy input

_POLICY: list[Any] = []


def _policy() -> Any:
    if not _POLICY:
        from proxy.engines import build_engine
        from proxy.metrics import Metrics
        from proxy.stages.policy import PolicyStage

        engine = build_engine(CFG)
        _run(engine.start())
        _POLICY.append(PolicyStage(CFG, engine, Metrics()))
    return _POLICY[0]


SECRETS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")


def target_policy_input(data: bytes) -> None:
    """data: 'METHOD path?query' line, header lines 'Name: value', a blank line, a JSON body."""
    head, _, body = data.partition(b"\n\n")
    lines = head.decode("utf-8", "surrogateescape").split("\n")
    method, _, target = lines[0].partition(" ")
    headers = []
    for ln in lines[1:]:
        name, sep, value = ln.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    tool = CFG.tools[len(data) % 4]
    raw_target = f"{tool.prefix}/{target.lstrip('/')}"
    if not _wire_target(raw_target):
        return  # the HTTP parser refuses it before any stage runs
    req = FakeRequest(raw_target, headers, method or "GET", body)
    call = Call(req)  # type: ignore[arg-type]
    call.agent = "coder-7" if len(data) % 3 else "analyst-2"
    call.tool = tool
    call.tool_key = tool.name
    if body:
        call.body = body
        call.body_size = len(body)
        call.body_sha256 = hashlib.sha256(body).hexdigest()
        call.body_json, problem = parse_json(body)
        if problem is not None:
            return  # ReadBody refuses it before the policy sees it
    stage = _policy()
    doc = stage.input_document(call)
    # Never a credential; header names as policy expects them.
    for name in doc["request"]["headers"]:
        assert name == name.lower(), name
        assert name not in SECRETS, name
    for k, vs in doc["request"]["query"].items():
        assert isinstance(k, str) and all(isinstance(v, str) for v in vs)
    try:
        orjson.dumps(doc)
    except TypeError:
        # Only a header value that is not UTF-8 (obs-text) can do this; the engine
        # must then fail closed (EngineError: policy_error) or not need that field.
        assert any("\udc80" <= c <= "\udcff" for _, v in headers for c in v), doc
    try:
        decision = stage.engine.compiled.decide(doc)
    except (DecisionError, EngineError):
        return  # refused with policy_error: fail closed
    assert decision.allow is True or decision.allow is False
    assert all(isinstance(r, str) for r in decision.reasons or [])


# --------------------------------------------------------------------- mcp

def target_mcp(data: bytes) -> None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    messages = obj if isinstance(obj, list) else [obj]
    for raw in messages:
        m = mcp.parse_message(raw, 128)
        assert m.kind in (mcp.REQUEST, mcp.NOTIFICATION, mcp.RESPONSE, mcp.INVALID), m.kind
        if m.kind is mcp.INVALID:
            code, text = m.problem
            assert code in mcp.JSONRPC_CODES and text, m.problem
            err = mcp.error_object(m.id if m.has_id else None, mcp.jsonrpc_code(code), text)
            orjson.dumps(err)
            continue
        if m.method == "tools/call":
            assert isinstance(m.tool, str) and mcp.name_problem(m.tool, 128) is None
            assert m.arguments is None or isinstance(m.arguments, dict)
        orjson.dumps(m.policy_view())
        mcp.id_key(m.id)
    if isinstance(obj, str):
        mcp.decode_header_value(obj)


# --------------------------------------------------------------------- sse

def _events(chunks: list[bytes]) -> tuple[list[tuple[bytes, bytes | None]], bytes]:
    r = mcp.SseReader()
    out: list[tuple[bytes, bytes | None]] = []
    for c in chunks:
        out += [(e.raw, e.data) for e in r.feed(c)]
    out += [(e.raw, e.data) for e in r.feed(b"", final=True)]
    return out, r.take_pending()


def target_sse(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 7 + 1
    stream = data[1:]
    whole = _events([stream])
    pieces = _events([stream[i:i + step] for i in range(0, len(stream), step)])
    assert whole == pieces, (step, stream[:200])
    for raw, payload in whole[0]:
        assert raw in stream
        if payload is not None:
            for e in [mcp.SseEvent(raw, [ln for ln in raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
                                         if ln])]:
                e.with_data(b"{}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "route": target_route,
    "json": target_json,
    "policy_input": target_policy_input,
    "mcp": target_mcp,
    "sse": target_sse,
}


_LAST_FAILURE: dict[str, bytes] = {}


def _save_failures() -> None:
    # Hypothesis replays the shrunk, minimal failing input last: that is the one kept.
    for target, data in _LAST_FAILURE.items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        (d / f"crash-{hashlib.sha256(data).hexdigest()[:12]}").write_bytes(data)


def run(target: str, data: bytes) -> None:
    """Run a target; when REGATE_FUZZ_SAVE is set, the input that breaks it joins the corpus."""
    try:
        TARGETS[target](data)
    except Exception:
        if os.environ.get("REGATE_FUZZ_SAVE"):
            if not _LAST_FAILURE:
                atexit.register(_save_failures)
            _LAST_FAILURE[target] = data
        raise
