"""The loop guard's notion of "the same call": a normalised feature set of a request body.

A body becomes a set of 64-bit features. JSON is walked, not re-encoded: each leaf
contributes features tagged with its key path, so key order and formatting do not
matter; array positions are not part of the path. A string leaf is
whitespace-normalised and cut into overlapping 4-character shingles (past 256
characters, into words), so one changed character in a long argument changes at most
four of its features, while a short argument changed at all is mostly new. A JSON-RPC
body is compared on its ``params`` alone, every feature tagged with the method and
(MCP ``tools/call``) tool name, so the envelope never makes two calls look alike.
Volatile parts are dropped: keys named in ``ignore_fields`` at any depth, the JSON-RPC
``id``, and values that are UUIDs or ISO-8601 timestamps become placeholders.
Non-JSON bodies are treated as one string; the query string is one more object.

Two calls are compared by the Jaccard similarity of their feature sets: exact for
sets up to ``SKETCH`` features, estimated from bottom-``SKETCH`` MinHash sketches
beyond that (standard error under 0.03 near 0.9 at 128). A stored failure keeps only
the sketch (a packed int64 array, at most 1 KiB), its size and a digest of the full set.

Python's ``hash`` is salted per process, which is fine: this state never leaves it.
The shingle loops run in C (``zip`` + ``map(hash, ...)``), about 120 ns a character here.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Mapping
from itertools import repeat
from typing import Any
from urllib.parse import parse_qsl

import orjson

SKETCH = 128         # bottom-k size: the stored sketch and the exact/estimate cut-over
SHINGLE = 4          # characters per shingle
SHINGLE_CHARS = 256  # a string is shingled up to here; past it, whitespace words
MAX_FEATURES = 8192  # NOTE: a body past this is compared on its first features only
MAX_TEXT_BYTES = 65536

_ROOT = hash("$")
_QUERY = hash("?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?")
_UUID_PH = hash("<uuid>")
_TIME_PH = hash("<timestamp>")


class Fingerprint:
    """The normalised features of one call's body (and query)."""

    __slots__ = ("digest", "size", "sketch")

    def __init__(self, features: set[int]) -> None:
        self.size = len(features)
        fs = frozenset(features)
        self.digest = hash(fs)
        self.sketch = fs if self.size <= SKETCH else frozenset(sorted(fs)[:SKETCH])

    def packed(self) -> array:
        """The sketch as it is stored with a failure: a sorted array of int64."""
        return array("q", sorted(self.sketch))


def fingerprint(body: Any, query: str = "", ignore: frozenset[str] = frozenset()) -> Fingerprint:
    """Features of ``body`` (parsed JSON, bytes, str or None) plus ``query``."""
    out: set[int] = set()
    if body is not None:
        if isinstance(body, (bytes, bytearray, memoryview)):
            body = _decode(bytes(body))
        elif isinstance(body, str):
            s = body.lstrip()
            if s[:1] in ("{", "["):
                try:
                    body = orjson.loads(body)
                except orjson.JSONDecodeError:
                    pass
        if isinstance(body, str):
            _text(out, _ROOT, body)
        elif isinstance(body, dict) and "jsonrpc" in body:
            _rpc(out, body, ignore)
        else:
            _walk(out, _ROOT, body, ignore)
    if query:
        for k, v in parse_qsl(query, keep_blank_values=True):
            if k not in ignore:
                _text(out, hash((_QUERY, k)), v)
    return Fingerprint(out)


def similarity(a: Fingerprint, size: int, digest: int, sketch: "array | frozenset") -> float:
    """Jaccard similarity of ``a`` and a stored fingerprint (its size, digest, sketch)."""
    if a.digest == digest and a.size == size:
        return 1.0
    if a.size <= SKETCH and size <= SKETCH:
        inter = len(a.sketch.intersection(sketch))
        union = a.size + size - inter
        return inter / union if union else 1.0
    # Bottom-k estimate: the k smallest of the union are the k smallest of the two
    # sketches' union, and each is in A (in B) exactly when it is in A's (B's) sketch.
    u = sorted(a.sketch.union(sketch))[:SKETCH]
    both = a.sketch.intersection(sketch)
    return sum(1 for x in u if x in both) / len(u)


def _decode(raw: bytes) -> Any:
    s = raw.lstrip()[:1]
    if s in (b"{", b"["):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    # NOTE: a huge non-JSON body is compared on its first 64 KiB.
    return raw[:MAX_TEXT_BYTES].decode("utf-8", "replace")


_NAMED = ("tools/call", "prompts/get")


def _rpc(out: set[int], body: dict, ignore: frozenset[str]) -> None:
    # A JSON-RPC envelope (version, id, method, the MCP tool name) is not an argument:
    # the method and tool name tag every feature, so two calls of different tools share
    # nothing, and the same tool's calls are compared on their arguments alone.
    method = body.get("method")
    params = body.get("params")
    name = None
    if isinstance(params, dict) and method in _NAMED:
        name = params.get("name")
        params = {k: v for k, v in params.items() if k != "name"}
    root = hash((_ROOT, "rpc", str(method), str(name)))
    _walk(out, root, params, ignore)
    for k, v in body.items():
        if k not in ("jsonrpc", "id", "method", "params") and k not in ignore:
            _walk(out, hash((root, k)), v, ignore)


def _walk(out: set[int], ph: int, node: Any, ignore: frozenset[str]) -> None:
    if len(out) >= MAX_FEATURES:
        return
    t = type(node)
    if t is str:
        _text(out, ph, node)
    elif t is dict:
        if not node:
            out.add(hash((ph, "{}")))
            return
        for k, v in node.items():
            if k not in ignore:  # volatile by name
                _walk(out, hash((ph, k)), v, ignore)
    elif t is list or t is tuple:
        child = hash((ph, "[]"))
        if not node:
            out.add(child)
        for v in node:
            _walk(out, child, v, ignore)
    elif t is int or t is float:
        out.add(hash((ph, "=", node)))
    elif isinstance(node, str):
        _text(out, ph, str(node))
    elif isinstance(node, Mapping):
        _walk(out, ph, dict(node), ignore)
    else:
        # None, booleans (kept apart from 0 and 1), anything else by its repr.
        out.add(hash((ph, "=", repr(node))))


def _text(out: set[int], ph: int, s: str) -> None:
    s = " ".join(s.split())  # whitespace-insensitive
    n = len(s)
    if n <= SHINGLE:
        out.add(hash((ph, s)))
        return
    if n in (32, 36) and _UUID.fullmatch(s):
        out.add(ph ^ _UUID_PH)
        return
    if 10 <= n <= 35 and s[0].isdigit() and _TIMESTAMP.fullmatch(s):
        out.add(ph ^ _TIME_PH)
        return
    # The loops run in C: zip builds (path, c1, c2, c3, c4) and hash() mixes it.
    head = s[:SHINGLE_CHARS] if n > SHINGLE_CHARS else s
    out.update(map(hash, zip(repeat(ph), head, head[1:], head[2:], head[3:])))
    if n > SHINGLE_CHARS:
        out.update(map(hash, zip(repeat(ph), s[SHINGLE_CHARS:].split(" "))))
