"""Which of the agent's request headers reach the tool, and which the policy sees.

A tool behind Regate may trust a header as a statement about the caller (who it
is, where it came from) or about the request (its real method or URL). Only
Regate can make such statements, so the agent's own are dropped before the call
is judged and forwarded; the policy is shown exactly the headers the tool will
get, less the values of credentials (README "Headers a tool receives").
"""

from __future__ import annotations

# Hop-by-hop (RFC 9110 §7.6.1): meaningful for one connection only.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})

# Rebuilt by Regate on every forwarded call (Host from the route, Content-Length from
# the body, X-Forwarded-For/Proto/Host from the connection), never copied. `Expect`
# is Regate's to answer: a tool is never asked for a 100 Continue.
REBUILT = frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                     "expect"})

# What a tool, or a proxy or framework in front of it, may take as the caller's
# identity or address (oauth2-proxy, Apache's Remote-User, nginx's X-Real-IP, CDNs),
# or as the request's true method or URL (method override; IIS/Symfony rewrites).
# A tool can opt back into any of these with `pass_headers`.
IDENTITY_HEADERS = frozenset({
    "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "cf-connecting-ip", "x-cluster-client-ip",
    "x-forwarded-server", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-uri",
    "remote-user", "x-remote-user", "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username",
    "x-forwarded-groups", "x-forwarded-access-token", "x-auth-request-user", "x-auth-request-email",
    "x-auth-request-groups", "x-auth-request-access-token",
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-method",
    "x-original-url", "x-original-uri", "x-rewrite-url",
})

# Forwarded to the tool (its own credentials) but never shown to the policy: secrets do
# not belong in policy input, logs or traces.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})


def dropped_for(pass_headers: list[str] | tuple[str, ...], regate_own: tuple[str, ...] = ()) -> frozenset[str]:
    """Lower-case names of the agent's headers a tool never receives: hop-by-hop, rebuilt,
    identity headers the tool did not opt into, and Regate's own credentials (`regate_own`)."""
    return (HOP_BY_HOP | REBUILT | (IDENTITY_HEADERS - set(pass_headers))
            | {h.lower() for h in regate_own})


def is_regate_own(low: str) -> bool:
    # X-Regate-* is Regate's to say: an agent's own (a forged approval, decision id or
    # agent header) never reaches a tool.
    return low.startswith("x-regate-")
