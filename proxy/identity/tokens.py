"""JWT bearer tokens: the `jwt` identity source and the verifier of each issuer.

The JOSE part (base64url, the signature over RS*/PS*/ES*/EdDSA) is PyJWT's; which
key and algorithm may verify a token, and what its claims must say, is decided
here, before PyJWT is asked: the algorithm must be one the issuer allows and the
key's type can verify (so `alg: none` and an HMAC algorithm on an RSA public key
never reach a verifier), and a header that names its own key (`jwk`, `jku`, `x5u`)
is refused, since keys come only from the configured JWKS. Claims are checked with
an injected clock. A verified token is remembered (bounded) until it expires or its
issuer's keys change, so an agent re-using its token pays for the signature once.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

import orjson

from .errors import IdentityError
from .jwks import JwksSource

# Three base64url parts (the signature may be empty: alg none, refused with its own code).
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_REFUSED_HEADERS = ("jku", "jwk", "x5u")
_CACHE_MAX = 10_000


def _bad(code: str, message: str) -> IdentityError:
    return IdentityError(code, message, bearer=True)


def _number(claims: dict[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad("token_claims", f"claim {name!r} must be a NumericDate (seconds since 1970), got {v!r}")
    return float(v)


class IssuerVerifier:
    """Checks tokens of one issuer: its keys, algorithms, audiences and claims."""

    def __init__(self, cfg: Any, jwks: JwksSource, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.issuer = cfg.issuer
        self.jwks = jwks
        self.clock = clock
        self.algorithms = frozenset(cfg.algorithms)
        self.audiences = frozenset(cfg.audiences)
        self.required = tuple(cfg.required_claims)
        self.leeway = cfg.leeway_s

    async def verify(self, token: str, header: dict[str, Any]) -> tuple[str, dict[str, Any], float | None]:
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise _bad("token_algorithm", f"alg {alg!r} is not accepted for issuer {self.issuer}; sign with one of "
                       f"{', '.join(sorted(self.algorithms))}")
        jwks = self.jwks
        if not jwks.usable():
            raise IdentityError("identity_unavailable", jwks.problem() or f"no keys for issuer {self.issuer}",
                                503, retry_after=5)
        kid = header.get("kid")
        key = self._key(kid, alg)
        if key is None and kid is not None and await jwks.refresh_for_unknown_kid():
            key = self._key(kid, alg)  # the issuer may have rotated its keys since the last fetch
        if key is None:
            if kid is None:
                raise _bad("token_unknown_kid", f"the token names no kid and no key of issuer {self.issuer} "
                           f"verifies {alg}; ask the issuer for a token with a kid")
            if not jwks.keys.candidates(kid):  # type: ignore[union-attr]
                raise _bad("token_unknown_kid", f"no key with kid {kid!r} in the JWKS of issuer {self.issuer}; "
                           "the token was signed by a key it does not publish (get a new token)")
            raise _bad("token_algorithm", f"key {kid!r} of issuer {self.issuer} cannot verify alg {alg}")
        claims = self._signed_claims(token, key)
        agent = self._check_claims(claims)
        return agent, claims, _number(claims, "exp")

    def _key(self, kid: str | None, alg: str) -> Any:
        found = [k[alg] for k in self.jwks.keys.candidates(kid) if alg in k]  # type: ignore[union-attr]
        # Without a kid a token may only be checked when one key can be meant.
        return found[0] if len(found) == 1 else None

    def _signed_claims(self, token: str, key: Any) -> dict[str, Any]:
        import jwt

        try:
            decoded = jwt.PyJWS().decode_complete(token, key=key, algorithms=[key.algorithm_name],
                                                  options={"enforce_minimum_key_length": True})
        except jwt.InvalidSignatureError:
            raise _bad("token_signature", f"the signature does not verify with the key of issuer {self.issuer}; "
                       "the token was altered or signed by someone else") from None
        except jwt.InvalidKeyError as exc:
            raise _bad("token_signature", f"issuer {self.issuer}'s key is refused: {exc}") from None
        except jwt.PyJWTError as exc:
            raise _bad("token_malformed", f"the token is not a well-formed JWS: {exc}") from None
        try:
            claims = orjson.loads(decoded["payload"])
        except orjson.JSONDecodeError:
            claims = None
        if not isinstance(claims, dict):
            raise _bad("token_malformed", "the token's payload is not a JSON object of claims")
        return claims

    def _check_claims(self, claims: dict[str, Any]) -> str:
        cfg = self.cfg
        iss = claims.get("iss")
        if iss != self.issuer:
            raise _bad("token_issuer", f"iss {iss!r} is not {self.issuer!r}; use a token from that issuer")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in self.audiences for a in auds):
            raise _bad("token_audience", f"aud {aud!r} is not for this Regate; request a token with audience "
                       f"{' or '.join(sorted(self.audiences))}")
        now = self.clock()
        leeway = self.leeway
        exp = _number(claims, "exp")
        if exp is not None and now > exp + leeway:
            raise _bad("token_expired", f"the token expired {now - exp:.0f}s ago; get a fresh token")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise _bad("token_not_yet_valid", f"the token is valid from {nbf - now:.0f}s from now (nbf); "
                       "check the clock of the issuer and of this host")
        iat = _number(claims, "iat")
        if iat is not None and now + leeway < iat:
            raise _bad("token_not_yet_valid", f"the token was issued {iat - now:.0f}s in the future (iat); "
                       "check the clock of the issuer and of this host")
        for name in self.required:
            if name not in claims:
                raise _bad("token_claim_missing", f"claim {name!r} is required for issuer {self.issuer}")
        if cfg.kubernetes:
            return self._service_account(claims)
        agent = claims.get(cfg.agent_claim)
        if not isinstance(agent, str) or not agent or len(agent) > 256:
            raise _bad("token_claim_missing", f"claim {cfg.agent_claim!r} (the agent id) is missing or not a "
                       "string of 1 to 256 characters")
        return agent

    def _service_account(self, claims: dict[str, Any]) -> str:
        k8s = claims.get("kubernetes.io")
        sa = k8s.get("serviceaccount") if isinstance(k8s, dict) else None
        ns = k8s.get("namespace") if isinstance(k8s, dict) else None
        name = sa.get("name") if isinstance(sa, dict) else None
        if not isinstance(ns, str) or not ns or not isinstance(name, str) or not name:
            raise _bad("token_claim_missing", "claim 'kubernetes.io' with namespace and serviceaccount.name is "
                       "required: send a projected service-account token")
        if claims.get("sub") != f"system:serviceaccount:{ns}:{name}":
            raise _bad("token_claims", "sub does not match kubernetes.io namespace and service account")
        return f"{ns}/{name}"


class JwtSource:
    """The `jwt` identity source: one bearer token, verified by the issuer that `iss` names."""

    name = "jwt"

    def __init__(self, cfg: Any, verifiers: list[IssuerVerifier], clock: Callable[[], float] = time.time) -> None:
        self.header = cfg.header
        self.headers = (cfg.header,)
        self.prefix = f"{cfg.scheme} " if cfg.scheme else ""
        self.scheme = cfg.scheme
        self.max_bytes = cfg.max_token_bytes
        self.verifiers = verifiers
        self.by_issuer = {v.issuer: v for v in verifiers}
        self.clock = clock
        # token -> (agent, claims, exp, nbf, verifier, keys they were verified with)
        self._cache: dict[str, tuple[str, dict[str, Any], float | None, Any, Any]] = {}

    def refuse_query(self, request: Any) -> None:
        """Whatever identifies the call: a token in the query string reaches the tool and the logs."""
        if "access_token" in request.query_string and "access_token" in request.query:
            raise _bad("token_in_query", f"a token in the query string (access_token) is refused: it would reach "
                       f"the tool and the logs; send it as {self.header}: {self.prefix}<token>")

    async def identify(self, request: Any) -> tuple[str, dict[str, Any]] | None:
        self.refuse_query(request)
        values = request.headers.getall(self.header, ())
        if not values:
            return None
        if len(values) > 1:
            raise _bad("credentials_ambiguous", f"{len(values)} {self.header} headers; send exactly one")
        token = self._token(values[0])
        hit = self._cache.get(token)
        if hit is not None:
            agent, claims, exp, verifier, keys = hit
            now = self.clock()
            if keys is verifier.jwks.keys and verifier.jwks.usable() and (exp is None or now <= exp + verifier.leeway):
                return agent, claims
            del self._cache[token]
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _bad("token_malformed", f"the token is not a JWT (base64url header.payload.signature): {exc}") from None
        for name in _REFUSED_HEADERS:
            if name in header:
                raise _bad("token_header", f"header {name!r} is refused: Regate takes keys only from the configured "
                           "JWKS, never from the token")
        if "crit" in header:
            raise _bad("token_header", f"critical header extensions {header['crit']!r} are not supported")
        verifier = self._verifier(token)
        agent, claims, exp = await verifier.verify(token, header)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (agent, claims, exp, verifier, verifier.jwks.keys)
        return agent, claims

    def _token(self, value: str) -> str:
        prefix = self.prefix
        if prefix:
            scheme, _, rest = value.partition(" ")
            if scheme != self.scheme:
                if scheme.lower() == self.scheme.lower():
                    raise _bad("bad_authorization_scheme", f"write the scheme as {self.scheme!r} exactly: "
                               f"{self.header}: {self.prefix}<token>")
                raise _bad("bad_authorization_scheme", f"{self.header} must be {self.prefix}<token>, got scheme "
                           f"{scheme[:20]!r}")
            value = rest
        if len(value) > self.max_bytes:
            raise _bad("token_too_large", f"the token is {len(value)} bytes, over auth.jwt.max_token_bytes "
                       f"({self.max_bytes})")
        if not _SHAPE.fullmatch(value):
            raise _bad("token_malformed", "the token is not a compact JWT: three base64url parts joined by '.', "
                       "no padding, no spaces")
        return value

    def _verifier(self, token: str) -> IssuerVerifier:
        if len(self.verifiers) == 1:
            return self.verifiers[0]  # iss is checked after the signature
        import jwt

        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as exc:
            raise _bad("token_malformed", f"the token's payload cannot be read: {exc}") from None
        verifier = self.by_issuer.get(iss) if isinstance(iss, str) else None
        if verifier is None:
            raise _bad("token_issuer", f"iss {iss!r} is not an accepted issuer ({', '.join(sorted(self.by_issuer))})")
        return verifier

    def problems(self) -> list[str]:
        return [p for v in self.verifiers if (p := v.jwks.problem()) is not None]

    def warnings(self) -> list[str]:
        return [w for v in self.verifiers if (w := v.jwks.warning()) is not None]
