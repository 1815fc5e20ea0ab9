"""Test-side helpers for approvals: act as the agent and as the human, over
real sockets, and read what the audit log recorded."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import OTHER_KEY


async def agent_call(url: str, path: str, body: Any = None, *, key: str = OTHER_KEY, method: str = "POST",
                     headers: dict[str, str] | None = None, timeout: float = 20.0) -> tuple[int, dict, Any]:
    """One agent call: (status, headers, JSON body)."""
    async with aiohttp.ClientSession() as s:
        kwargs: dict[str, Any] = {"headers": {"X-Api-Key": key, **(headers or {})}}
        if body is not None:
            kwargs["data"] = json.dumps(body) if not isinstance(body, (bytes, str)) else body
            kwargs["headers"].setdefault("Content-Type", "application/json")
        async with s.request(method, url + path, timeout=aiohttp.ClientTimeout(total=timeout), **kwargs) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


async def admin(proc: Any, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        h = proc.admin_headers if headers is None else headers
        async with s.request(method, proc.admin_url + path, json=body, headers=h) as r:
            try:
                return r.status, await r.json(content_type=None)
            except ValueError:
                return r.status, await r.text()


async def wait_pending(proc: Any, *, agent: str | None = None, exclude: set[str] = frozenset(),
                       timeout: float = 8.0) -> dict:
    """The newest pending approval (of `agent`), once one appears on `proc`'s admin API."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = await admin(proc, "GET", "/admin/approvals?state=pending")
        assert status == 200, body
        for rec in body["approvals"]:
            if (agent is None or rec["agent"] == agent) and rec["id"] not in exclude:
                return rec
        await asyncio.sleep(0.05)
    raise TimeoutError("no pending approval appeared")


async def decide(proc: Any, approval_id: str, verb: str, approver: str = "alice", comment: str = "") -> tuple[int, Any]:
    return await admin(proc, "POST", f"/admin/approvals/{approval_id}/{verb}",
                       {"approver": approver, "comment": comment})


def audit_records(directory: Path) -> list[dict]:
    out = []
    for f in sorted(Path(directory).glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


async def wait_audit(directory: Path, pred, timeout: float = 5.0) -> list[dict]:
    """Audit records matching `pred`, once at least one has been written."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in audit_records(directory) if pred(r)]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)
