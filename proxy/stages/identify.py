"""Identify: who is calling. An API key maps to an agent id (and claims).

Keys are stored as SHA-256 hex digests, never in clear, so the keys file can be
read by operators without handing out credentials. `auth: none` trusts an
`X-Agent-Id` header: for demos only, and Regate says so at startup.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from ..pipeline import Call, Rejection


class KeysFileError(Exception):
    pass


def load_keys(path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Read the keys file: `keys: [{sha256: <hex>, agent: <id>, claims: {...}}]`."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise KeysFileError(f"auth.keys: cannot read {path} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise KeysFileError(f"auth.keys: {path} is not valid YAML ({exc})") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"auth.keys: {path} must hold a list under 'keys'")
    table: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, e in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(e, dict):
            raise KeysFileError(f"{where}: must be a mapping with sha256 and agent")
        digest, agent = e.get("sha256"), e.get("agent")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise KeysFileError(f"{where}.sha256: must be 64 hex digits (sha256 of the key)")
        if not isinstance(agent, str) or not agent:
            raise KeysFileError(f"{where}.agent: required")
        claims = e.get("claims") or {}
        if not isinstance(claims, dict):
            raise KeysFileError(f"{where}.claims: must be a mapping")
        table[digest.lower()] = (agent, claims)
    return table


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Identify:
    name = "identify"

    def __init__(self, mode: str, header: str, keys: dict[str, tuple[str, dict[str, Any]]] | None) -> None:
        self.mode = mode
        self.header = header
        self.keys = keys or {}
        self._seen: dict[str, tuple[str, dict[str, Any]]] = {}

    async def enter(self, call: Call) -> Rejection | None:
        for name, value in call.request.raw_headers:
            if b"_" in name:
                # X_Api_Key and X-Api-Key are one header to some servers (CGI, WSGI, nginx's
                # underscores_in_headers) and two to others: refused, as Envoy advises at the edge.
                shown = name[:64].decode("latin-1")
                return Rejection(400, "bad_header", f"header names may not contain '_' ({shown!r}); use '-'")
            if not value.isascii() and not _is_utf8(value):
                # Legal bytes (obs-text), but the upstream client can only send text: the tool
                # would get the value with those bytes dropped, not the value that was judged.
                shown = name[:64].decode("latin-1")
                return Rejection(400, "bad_header", f"header {shown!r} is not valid UTF-8; send UTF-8 or ASCII")
        headers = call.request.headers
        if self.mode == "none":
            agent = headers.get("X-Agent-Id")
            if not agent:
                return Rejection(401, "unauthenticated", "missing X-Agent-Id header (auth mode is none)")
            call.agent = agent
            return None
        key = headers.get(self.header)
        if not key:
            return Rejection(401, "unauthenticated", f"missing API key: send it in the {self.header} header")
        found = self._seen.get(key)
        if found is None:
            digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
            # Lookup is by digest of the presented key, so no secret is ever
            # compared byte by byte against a stored secret.
            found = self.keys.get(digest)
            # Known keys are remembered (a handful per agent fleet), unknown ones
            # never: a flood of random keys cannot grow this table.
            if found is not None and len(self._seen) < 10_000:
                self._seen[key] = found
        if found is None:
            return Rejection(401, "unauthenticated", f"unknown API key in {self.header}")
        call.agent, call.claims = found
        return None

    def leave(self, call: Call) -> None:
        pass
