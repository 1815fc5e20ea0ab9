"""Operators of the admin plane: named bearer tokens with roles.

`viewer` reads (dashboards, approvals, decisions, metrics behind /admin); `approver`
also approves and denies; `operator` also reloads and resets breakers. Approver and
operator include viewer. The legacy `admin.token` is one shared full-rights token:
whoever holds it is `admin`, and an approval's approver name then comes from the
request (unverified, and the audit says so).
"""

from __future__ import annotations

import hashlib
from typing import Any

ALL_ROLES = frozenset({"viewer", "approver", "operator"})


class Operator:
    __slots__ = ("name", "roles", "verified")

    def __init__(self, name: str, roles: frozenset[str], verified: bool) -> None:
        self.name = name
        self.roles = roles
        # False for the shared admin.token: the name says nothing about the person.
        self.verified = verified

    def may(self, role: str) -> bool:
        return role in self.roles


def required_role(method: str, path: str) -> str:
    """The role an admin request needs."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return "viewer"
    if path.startswith("/admin/approvals/") and path.endswith(("/approve", "/deny")):
        return "approver"
    return "operator"


class OperatorTokens:
    def __init__(self, admin: Any) -> None:
        self.by_digest: dict[str, Operator] = {}
        if admin.token:
            self.by_digest[_digest(admin.token)] = Operator("admin", ALL_ROLES, verified=False)
        for t in admin.tokens:
            roles = set(t.roles) | {"viewer"}
            digest = t.sha256.lower() if t.sha256 else _digest(t.token)
            self.by_digest[digest] = Operator(t.name, frozenset(roles), verified=True)

    @property
    def enabled(self) -> bool:
        return bool(self.by_digest)

    def lookup(self, authorization: str | None) -> Operator | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        # By digest of the presented token: no stored secret is compared byte by byte.
        return self.by_digest.get(_digest(authorization[7:]))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


# Where the admin middleware leaves the verified operator on the request.
try:
    from aiohttp import web as _web

    OPERATOR_KEY: Any = _web.RequestKey("regate.operator", Operator)
except AttributeError:  # aiohttp before 3.13: plain keys
    OPERATOR_KEY = "regate.operator"
