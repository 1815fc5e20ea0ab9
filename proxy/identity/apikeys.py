"""API keys: a file of SHA-256 digests mapped to agent ids, looked up by the digest
of the presented key.

Keys are stored as SHA-256 hex digests, never in clear, so the keys file can be
read by operators without handing out credentials. Reload builds the new table
whole and swaps it with the lookup cache in one step: a key removed from the file
stops working on the next call.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from .errors import CredentialsError, IdentityError

Entry = tuple[str, dict[str, Any]]


class KeysFileError(CredentialsError):
    pass


def load_keys(path: Path) -> dict[str, Entry]:
    """Read the keys file: `keys: [{sha256: <hex>, agent: <id>, claims: {...}}]`."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise KeysFileError(f"auth.keys: cannot read {path} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise KeysFileError(f"auth.keys: {path} is not valid YAML ({exc})") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"auth.keys: {path} must hold a list under 'keys'")
    table: dict[str, Entry] = {}
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


class ApiKeySource:
    """The `api_key` identity source: the key in one header (the first, if sent twice)."""

    name = "api_key"

    def __init__(self, header: str, path: Path | None, table: dict[str, Entry] | None = None) -> None:
        self.header = header
        self.headers = (header,)
        self.path = path
        self.table: dict[str, Entry] = table if table is not None else (load_keys(path) if path else {})
        self._seen: dict[str, Entry] = {}

    def prepare(self) -> dict[str, Entry] | None:
        return load_keys(self.path) if self.path is not None else None

    def commit(self, table: dict[str, Entry] | None) -> str | None:
        if table is None:
            return None
        # One step, no await: no call sees the new table with the old cache.
        self.table, self._seen = table, {}
        return f"{len(table)} API keys from {self.path}"

    async def identify(self, request: Any) -> Entry | None:
        return self.lookup(request.headers.get(self.header))

    def lookup(self, key: str | None) -> Entry | None:
        if not key:
            return None
        found = self._seen.get(key)
        if found is None:
            # Lookup is by digest of the presented key, so no secret is ever
            # compared byte by byte against a stored secret.
            found = self.table.get(hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest())
            if found is None:
                raise IdentityError("unauthenticated", f"unknown API key in {self.header}")
            # Known keys are remembered (a handful per agent fleet), unknown ones
            # never: a flood of random keys cannot grow this table.
            if len(self._seen) < 10_000:
                self._seen[key] = found
        return found
