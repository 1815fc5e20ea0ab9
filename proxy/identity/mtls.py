"""Client certificates as identities: the `mtls` source.

The handshake has already checked the certificate (it chains to `tls.client_ca`
and is within its validity); what is left is whose it is. A SPIFFE X.509-SVID
carries exactly one URI SAN, `spiffe://<trust domain>/<path>`: its trust domain
must be one of `auth.mtls.trust_domains`, and `auth.mtls.agents` (or `unmapped`)
turns the ID into an agent id. A certificate without a SPIFFE ID is looked up by
`CN=<common name>`. Anything else is refused with 401.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import IdentityError

_SPIFFE = re.compile(r"spiffe://([a-z0-9._-]+)(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*)")


def peer_certificate(request: Any) -> dict[str, Any] | None:
    """The verified peer certificate of the request's connection, or None (no TLS, no certificate)."""
    transport = request.transport
    if transport is None:
        return None
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    cert = sslobj.getpeercert()
    return cert or None


def spiffe_ids(cert: dict[str, Any]) -> list[str]:
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI" and v.lower().startswith("spiffe:")]


def common_name(cert: dict[str, Any]) -> str | None:
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


class MtlsSource:
    name = "mtls"
    headers: tuple[str, ...] = ()

    def __init__(self, cfg: Any) -> None:
        self.trust_domains = frozenset(cfg.trust_domains)
        self.agents = dict(cfg.agents)
        self.unmapped = cfg.unmapped

    async def identify(self, request: Any) -> tuple[str, dict[str, Any]] | None:
        cert = peer_certificate(request)
        if cert is None:
            return None
        return self.identity(cert)

    def identity(self, cert: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        ids = spiffe_ids(cert)
        if len(ids) > 1:
            raise IdentityError("certificate_refused", f"the client certificate carries {len(ids)} SPIFFE IDs; "
                                "an X.509-SVID has exactly one")
        if ids:
            sid = ids[0]
            m = _SPIFFE.fullmatch(sid)
            if m is None:
                raise IdentityError("certificate_refused", f"{sid[:200]!r} is not a valid SPIFFE ID")
            domain, path = m.group(1), m.group(2)
            if domain not in self.trust_domains:
                raise IdentityError("spiffe_trust_domain", f"SPIFFE ID {sid} is from trust domain {domain!r}; "
                                    f"this Regate accepts {', '.join(sorted(self.trust_domains)) or 'none'}")
            agent = self.agents.get(sid)
            if agent is None:
                if self.unmapped == "path":
                    agent = path.lstrip("/")
                elif self.unmapped == "id":
                    agent = sid
                else:
                    raise IdentityError("spiffe_unmapped", f"SPIFFE ID {sid} is not mapped to an agent "
                                        "(auth.mtls.agents)")
            return agent, {"spiffe_id": sid, "trust_domain": domain}
        cn = common_name(cert)
        agent = self.agents.get(f"CN={cn}") if cn is not None else None
        if agent is None:
            raise IdentityError("certificate_unmapped", f"the client certificate (CN={cn}) has no SPIFFE ID and its "
                                "CN is not mapped to an agent (auth.mtls.agents: {\"CN=<name>\": <agent>})")
        return agent, {"subject_cn": cn}
