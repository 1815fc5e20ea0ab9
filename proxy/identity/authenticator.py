"""The data plane's identity sources, tried in order, and their reloadable material.

Each source looks for its own credential (an API key header, a bearer token, a
client certificate). The first one that finds one decides: a credential that does
not verify is refused, never passed on to the next source, so a bad token cannot
fall back to a weaker check. No credential for any source: 401 naming what is
accepted. `prepare_reload` reads every file and checks it; `commit_reload` swaps
them all in one step, so a reload either installs the whole new set or none.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .apikeys import ApiKeySource
from .errors import CredentialsError, IdentityError


class Authenticator:
    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources
        self.names = tuple(s.name for s in sources)
        self.credential_headers = tuple(h for s in sources for h in s.headers)
        self.missing_message = _missing_message(sources)
        # Checks that hold whichever source identifies the call (a JWT in the query string).
        self.refusals = tuple(s.refuse_query for s in sources if hasattr(s, "refuse_query"))

    async def identify(self, request: Any) -> tuple[str, dict[str, Any]]:
        for refuse in self.refusals:
            refuse(request)
        for source in self.sources:
            found = await source.identify(request)
            if found is not None:
                return found
        raise IdentityError("unauthenticated", self.missing_message,
                            bearer=any(s.name == "jwt" for s in self.sources))

    async def start(self) -> None:
        for s in self.sources:
            if s.name == "jwt":
                for v in s.verifiers:
                    await v.jwks.start()

    async def close(self) -> None:
        for s in self.sources:
            if s.name == "jwt":
                for v in s.verifiers:
                    await v.jwks.close()

    def _reloadable(self) -> list[Any]:
        out: list[Any] = []
        for s in self.sources:
            if s.name == "api_key":
                out.append(s)
            elif s.name == "jwt":
                out += [v.jwks for v in s.verifiers if v.jwks.file is not None]
        return out

    def prepare_reload(self) -> list[tuple[Any, Any]]:
        """Every credential file, read and checked; raises CredentialsError naming each bad one."""
        staged, errors = [], []
        for part in self._reloadable():
            try:
                staged.append((part, part.prepare()))
            except CredentialsError as exc:
                errors.append(str(exc))
        if errors:
            raise CredentialsError("\n".join(errors))
        return staged

    @staticmethod
    def commit_reload(staged: list[tuple[Any, Any]]) -> list[str]:
        return [line for part, new in staged if (line := part.commit(new)) is not None]

    def problems(self) -> list[str]:
        return [p for s in self.sources if s.name == "jwt" for p in s.problems()]

    def warnings(self) -> list[str]:
        return [w for s in self.sources if s.name == "jwt" for w in s.warnings()]


def _missing_message(sources: list[Any]) -> str:
    ways = []
    for s in sources:
        if s.name == "api_key":
            ways.append(f"an API key in the {s.header} header")
        elif s.name == "jwt":
            ways.append(f"a JWT as {s.header}: {s.prefix}<token>")
        elif s.name == "mtls":
            ways.append("a client certificate")
    if len(sources) == 1 and sources[0].name == "api_key":
        return f"missing API key: send it in the {sources[0].header} header"
    return "no credentials: send " + ", or ".join(ways)


def build_authenticator(auth: Any, resolve: Callable[[str], Path], *, clock: Callable[[], float] = time.time,
                        monotonic: Callable[[], float] = time.monotonic) -> Authenticator:
    """The sources `auth` names, in order; raises CredentialsError for a file that cannot be used."""
    sources: list[Any] = []
    for name in auth.source_names:
        if name == "api_key":
            sources.append(ApiKeySource(auth.header, resolve(auth.keys)))
        elif name == "jwt":
            from .jwks import JwksSource
            from .tokens import IssuerVerifier, JwtSource

            verifiers = [IssuerVerifier(i, JwksSource(i.jwks, i.issuer, resolve, clock=monotonic), clock=clock)
                         for i in auth.jwt.issuers]
            sources.append(JwtSource(auth.jwt, verifiers, clock=clock))
        elif name == "mtls":
            from .mtls import MtlsSource

            sources.append(MtlsSource(auth.mtls))
    return Authenticator(sources)
