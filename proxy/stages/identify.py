"""Identify: who is calling. The configured identity sources (proxy/identity) —
API keys, JWTs, client certificates — tried in order, map the caller to an agent
id and verified claims; a failure is a 401 with a code the agent can act on.

`auth: none` trusts an `X-Agent-Id` header: for demos only, and Regate says so at
startup. Header names with '_' and header values that are not UTF-8 are refused
here, first, whatever the source.
"""

from __future__ import annotations

from typing import Any

from ..identity import IdentityError
from ..identity.apikeys import KeysFileError, load_keys
from ..pipeline import Call, Rejection

__all__ = ["Identify", "KeysFileError", "load_keys"]


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _challenge(exc: IdentityError) -> str:
    """RFC 6750 §3: no error code when no token came; else invalid_token with the message."""
    if exc.code == "unauthenticated":
        return 'Bearer realm="regate"'
    desc = exc.message.encode("ascii", "replace").decode()[:300].replace('"', "'").replace("\\", "/")
    return f'Bearer realm="regate", error="invalid_token", error_description="{desc}"'


class Identify:
    name = "identify"

    def __init__(self, authenticator: Any | None) -> None:
        # None: auth mode none (X-Agent-Id is trusted as sent).
        self.authenticator = authenticator

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
        if self.authenticator is None:
            agent = call.request.headers.get("X-Agent-Id")
            if not agent:
                return Rejection(401, "unauthenticated", "missing X-Agent-Id header (auth mode is none)")
            call.agent = agent
            return None
        try:
            call.agent, call.claims = await self.authenticator.identify(call.request)
        except IdentityError as exc:
            headers = None
            if exc.bearer and exc.status == 401:
                headers = {"WWW-Authenticate": _challenge(exc)}
            return Rejection(exc.status, exc.code, exc.message, retry_after=exc.retry_after, headers=headers)
        return None

    def leave(self, call: Call) -> None:
        pass
