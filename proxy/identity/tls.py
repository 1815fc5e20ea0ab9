"""TLS contexts: the two listeners' (reloadable) and each https upstream's.

A listener's context is built once and handed to its server; on reload a new
context is built from the files and checked whole, then installed by the
listener context's SNI callback, which every handshake passes through (with or
without SNI): new handshakes use the new certificate, key and client CA, and
connections already open keep theirs. A file that does not load leaves the old
context in place. Minimum version TLS 1.2, Python's default (modern) ciphers.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Callable

from .errors import CredentialsError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(cfg: Any, resolve: Callable[[str], Path], where: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    cert, key = resolve(cfg.cert), resolve(cfg.key)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"{where}.cert/key: cannot load {cert} with {key} ({exc})") from None
    if cfg.client_ca:
        ca = resolve(cfg.client_ca)
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"{where}.client_ca: cannot load {ca} ({exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.client_auth == "require" else ssl.CERT_OPTIONAL
    return ctx


class ListenerTls:
    """One listener's TLS: `context` goes to the server; `prepare`/`commit` rotate its material."""

    def __init__(self, cfg: Any, resolve: Callable[[str], Path], where: str) -> None:
        self.cfg = cfg
        self.resolve = resolve
        self.where = where
        self.context = server_context(cfg, resolve, where)
        self.current = self.context
        self.context.sni_callback = self._pick

    def _pick(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not ctx:
            # NOTE: the verify mode is the listening context's (fixed at start); the
            # certificate, key and CA store come from the newest context.
            sslobj.context = current
        return None

    def prepare(self) -> ssl.SSLContext:
        return server_context(self.cfg, self.resolve, self.where)

    def commit(self, ctx: ssl.SSLContext) -> str:
        ctx.sni_callback = self._pick
        self.current = ctx
        return f"{self.where}: {self.resolve(self.cfg.cert)}"


class _NamedContext(ssl.SSLContext):
    """A client context that checks (and sends as SNI) a fixed name, whatever host the URL names."""

    server_name: str | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):  # type: ignore[override]
        return super().wrap_bio(incoming, outgoing, server_side, self.server_name or server_hostname, session)

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, suppress_ragged_eofs=True,  # type: ignore[override]
                    server_hostname=None, session=None):
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                   self.server_name or server_hostname, session)


def client_context(cfg: Any, where: str) -> ssl.SSLContext:
    """The context an upstream is reached with (tools[].tls); paths are absolute by now."""
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.server_name = cfg.server_name
    try:
        if cfg.ca:
            ctx.load_verify_locations(cafile=cfg.ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if cfg.cert:
            ctx.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"{where}: cannot load its TLS files ({exc})") from None
    if not cfg.verify:
        # NOTE: verify: false is the operator's explicit choice (a test upstream); the
        # connection is encrypted but the upstream is not authenticated.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
