"""An issuer's signing keys: a JWKS from a file, a URL or OIDC discovery, kept fresh.

A URL is fetched at start and refreshed in the background as its `Cache-Control:
max-age` says, within `refresh_min_s`..`refresh_max_s`. A token naming a `kid`
the cached set lacks triggers one refresh, at most every `unknown_kid_interval_s`
however many such tokens arrive (concurrent ones share it), so a flood of invented
kids cannot hammer the issuer. When the URL stops answering, the cached keys keep
working until `stale_after_s` after the last good fetch; then this issuer's tokens
are refused and `problem()` says why (/readyz). Only asymmetric public keys are
taken: an `oct` (HMAC) key or a private key in a JWKS is skipped, so a token can
never be checked with a shared secret (key confusion).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from .errors import CredentialsError

log = logging.getLogger("regate.identity")

# Which algorithms each kind of public key can verify.
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_BY_CURVE = {"P-256": ("ES256",), "P-384": ("ES384",), "P-521": ("ES512",), "Ed25519": ("EdDSA",),
             "Ed448": ("EdDSA",)}
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.I)
_NO_CACHE = re.compile(r"(?:^|[,\s])(no-store|no-cache)(?:$|[,\s=])", re.I)


def _algorithms_for(jwk: dict[str, Any]) -> tuple[str, ...]:
    kty = jwk.get("kty")
    if kty == "RSA":
        algs = _RSA
    elif kty in ("EC", "OKP"):
        algs = _BY_CURVE.get(jwk.get("crv"), ())
    else:
        return ()  # oct (HMAC) and anything unknown: never a verification key here
    alg = jwk.get("alg")
    if alg is not None:
        return (alg,) if alg in algs else ()
    return algs


class KeySet:
    """Parsed keys: kid -> {alg -> PyJWK}; keys without a kid are kept apart."""

    __slots__ = ("by_kid", "unnamed", "count", "digest")

    def __init__(self, by_kid: dict[str, dict[str, Any]], unnamed: list[dict[str, Any]], digest: bytes) -> None:
        self.by_kid = by_kid
        self.unnamed = unnamed
        self.count = len(by_kid) + len(unnamed)
        self.digest = digest

    def candidates(self, kid: str | None) -> list[dict[str, Any]]:
        if kid is not None:
            found = self.by_kid.get(kid)
            return [found] if found is not None else []
        return [*self.by_kid.values(), *self.unnamed]


def parse_jwks(doc: Any, where: str) -> KeySet:
    """A JWK Set document -> KeySet; CredentialsError when it holds no usable key."""
    from jwt import PyJWK
    from jwt.exceptions import PyJWTError

    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise CredentialsError(f"{where}: not a JWK Set (want a JSON object with a 'keys' list)")
    by_kid: dict[str, dict[str, Any]] = {}
    unnamed: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        label = f"keys[{i}]" + (f" (kid {jwk.get('kid')!r})" if isinstance(jwk, dict) and "kid" in jwk else "")
        if not isinstance(jwk, dict):
            skipped.append(f"{label}: not an object")
            continue
        if jwk.get("use") not in (None, "sig"):
            continue  # an encryption key: not for signatures
        if "d" in jwk or "k" in jwk:
            skipped.append(f"{label}: holds secret or private key material; publish public keys only")
            continue
        algs = _algorithms_for(jwk)
        if not algs:
            skipped.append(f"{label}: kty {jwk.get('kty')!r} / alg {jwk.get('alg')!r} is not an asymmetric "
                           "signing key Regate accepts")
            continue
        keys: dict[str, Any] = {}
        for alg in algs:
            try:
                keys[alg] = PyJWK(jwk, algorithm=alg)
            except (PyJWTError, ValueError, TypeError, KeyError) as exc:
                skipped.append(f"{label}: {exc}")
                break
        else:
            kid = jwk.get("kid")
            if isinstance(kid, str):
                by_kid.setdefault(kid, keys)
            else:
                unnamed.append(keys)
    if not by_kid and not unnamed:
        raise CredentialsError(f"{where}: no usable signing key" + (f" ({'; '.join(skipped)})" if skipped else ""))
    if skipped:
        log.warning("%s: keys skipped: %s", where, "; ".join(skipped))
    return KeySet(by_kid, unnamed, orjson.dumps(doc["keys"], option=orjson.OPT_SORT_KEYS))


def max_age_of(cache_control: str | None) -> float | None:
    if not cache_control or _NO_CACHE.search(cache_control):
        return None if not cache_control else 0.0
    m = _MAX_AGE.search(cache_control)
    return float(m.group(1)) if m else None


class JwksSource:
    """The signing keys of one issuer, and where they stand."""

    def __init__(self, cfg: Any, issuer: str, resolve: Callable[[str], Path],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.issuer = issuer
        self.resolve = resolve
        self.clock = clock
        self.file = resolve(cfg.file) if cfg.file else None
        self.where = f"auth.jwt issuer {issuer}: JWKS " + (str(self.file) if self.file else (cfg.url or "(discovery)"))
        self.keys: KeySet | None = None
        self.fetched_at: float | None = None
        self.error: str | None = None
        self.url: str | None = cfg.url
        self.fetches = 0
        self._session: Any = None
        self._task: asyncio.Task | None = None
        self._inflight: asyncio.Future | None = None
        self._forced_at = float("-inf")
        self._next_s = cfg.refresh_max_s

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self.file is not None:
            self.commit(self.prepare())
            return
        import aiohttp

        ssl_ctx: Any = True
        if self.cfg.ca:
            try:
                ssl_ctx = ssl.create_default_context(cafile=str(self.resolve(self.cfg.ca)))
            except (OSError, ssl.SSLError) as exc:
                raise CredentialsError(f"{self.where}: jwks.ca: cannot load {self.cfg.ca} ({exc})") from None
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=4),
                                              trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        # NOTE: an issuer that is down at start does not stop Regate: its tokens are
        # refused (503) and /readyz reports it until a fetch succeeds.
        await self.refresh()
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._session is not None:
            await self._session.close()

    # -- file: reload -------------------------------------------------------------

    def prepare(self) -> KeySet | None:
        """Read the JWKS file (reload); None for a URL, whose refresh is its own."""
        if self.file is None:
            return None
        try:
            doc = orjson.loads(self.file.read_bytes())
        except OSError as exc:
            raise CredentialsError(f"{self.where}: cannot read ({exc.strerror})") from None
        except orjson.JSONDecodeError as exc:
            raise CredentialsError(f"{self.where}: not JSON ({exc})") from None
        return parse_jwks(doc, self.where)

    def commit(self, keys: KeySet | None) -> str | None:
        if keys is None:
            return None
        self._install(keys)
        return f"{keys.count} keys from {self.file}"

    def _install(self, keys: KeySet) -> None:
        # The same keys keep the same object, so tokens verified with them stay cached.
        if self.keys is None or self.keys.digest != keys.digest:
            self.keys = keys
        self.fetched_at = self.clock()
        self.error = None

    # -- state ---------------------------------------------------------------------

    def usable(self, now: float | None = None) -> bool:
        if self.keys is None:
            return False
        if self.file is not None:
            return True
        now = self.clock() if now is None else now
        return now - self.fetched_at <= self.cfg.stale_after_s  # type: ignore[operator]

    def problem(self, now: float | None = None) -> str | None:
        """Why this issuer's tokens are refused now, or None."""
        now = self.clock() if now is None else now
        if self.keys is None:
            return f"{self.where}: no signing keys yet ({self.error or 'not fetched'}); its tokens are refused"
        if not self.usable(now):
            return (f"{self.where}: keys last fetched {now - self.fetched_at:.0f}s ago, past stale_after_s "
                    f"{self.cfg.stale_after_s:g} ({self.error or 'no fetch since'}); its tokens are refused")
        return None

    def warning(self, now: float | None = None) -> str | None:
        """A failing refresh that has not yet made the keys stale."""
        if self.error is None or self.problem(now) is not None:
            return None
        now = self.clock() if now is None else now
        left = self.cfg.stale_after_s - (now - self.fetched_at)  # type: ignore[operator]
        return f"{self.where}: refresh failing ({self.error}); cached keys used for {left:.0f}s more"

    # -- fetching ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._next_s)
            try:
                await self.refresh()
            except Exception:  # a bug must not end the refreshing for good
                log.exception("%s: refresh failed", self.where)
                self._next_s = self.cfg.refresh_min_s

    async def refresh(self) -> None:
        """Fetch now, or join the fetch already in flight."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
            self._inflight.add_done_callback(self._done)
        await asyncio.shield(self._inflight)

    def _done(self, fut: asyncio.Future) -> None:
        self._inflight = None

    async def refresh_for_unknown_kid(self) -> bool:
        """One refresh for a kid the cache lacks, if none happened in the interval; True if one ran."""
        if self.file is not None:
            return False
        if self._inflight is None:
            now = self.clock()
            if now - self._forced_at < self.cfg.unknown_kid_interval_s:
                return False
            self._forced_at = now
        await self.refresh()
        return True

    async def _refresh(self) -> None:
        cfg = self.cfg
        self.fetches += 1
        try:
            if self.url is None:
                self.url = await self._discover()
            doc, cache_control = await self._get_json(self.url)
            keys = parse_jwks(doc, self.where)
        except CredentialsError as exc:
            if self.error is None:
                log.warning("%s", exc)
            self.error = str(exc).removeprefix(self.where + ": ")
            self._next_s = cfg.refresh_min_s
            return
        changed = self.keys is not None and self.keys.digest != keys.digest
        self._install(keys)
        if changed:
            log.info("%s: keys changed (%d keys)", self.where, keys.count)
        age = max_age_of(cache_control)
        self._next_s = min(max(age if age is not None else cfg.refresh_max_s, cfg.refresh_min_s), cfg.refresh_max_s)

    async def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc, _ = await self._get_json(url)
        if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
            got = doc.get("issuer") if isinstance(doc, dict) else None
            raise CredentialsError(f"{self.where}: {url} names issuer {got!r}, not {self.issuer!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise CredentialsError(f"{self.where}: {url} has no http(s) jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        import aiohttp

        cfg = self.cfg
        headers = {"Accept": "application/json"}
        if cfg.token_file:
            try:
                headers["Authorization"] = "Bearer " + self.resolve(cfg.token_file).read_text().strip()
            except OSError as exc:
                raise CredentialsError(f"{self.where}: jwks.token_file: {exc.strerror}") from None
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as r:
                if r.status != 200:
                    raise CredentialsError(f"{self.where}: GET {url} answered HTTP {r.status}")
                body = await r.content.read(cfg.max_bytes + 1)
                cache_control = r.headers.get("Cache-Control")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"{self.where}: GET {url} failed ({type(exc).__name__}: {exc})") from None
        if len(body) > cfg.max_bytes:
            raise CredentialsError(f"{self.where}: {url} is over jwks.max_bytes ({cfg.max_bytes})")
        try:
            return orjson.loads(body), cache_control
        except orjson.JSONDecodeError as exc:
            raise CredentialsError(f"{self.where}: {url} is not JSON ({exc})") from None
