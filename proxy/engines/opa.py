"""The ``opa`` engine: decisions from an OPA server over its REST Data API.

``POST /v1/data/<decision path>`` with ``{"input": ...}`` (and ``QUERY_PARAMS``)
through opa-python-client's ``AsyncOpaClient``, on one long-lived session
(keep-alive, one connection pool). The client's own retries are off: retrying
is Regate's decision, never a library's behind its back. Each call is bounded
by ``policy.timeout_ms``, enforced here: a slow, down or failing OPA is an
``EngineError`` within that time, and the policy stage fails closed (or open,
where a tool says so).

The revision is what OPA itself reports for the bundles it serves (the
``.manifest`` revision of each ``--bundle`` / bundle-server bundle): read from
``data.system.bundles`` at start and on reload, and followed from every
decision's ``provenance``, so a bundle OPA activates on its own shows up
without a Regate reload. An OPA loaded from plain files has no revision;
Regate then says ``opa:<url>`` rather than guess from its local copy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from opa_client import AsyncOpaClient
from opa_client.errors import PolicyNotFoundError

from . import EngineTimeout
from .bundle import BundleError
from .decision import Decision, DecisionError, EngineError, parse_decision

#: On every decision query. ``provenance``: the bundle revisions that made the
#: decision. ``strict-builtin-errors``: a built-in function that fails (a bad
#: regex, to_number of garbage) is an error, as in the embedded engine; OPA's
#: default makes that expression undefined, and a ``deny`` rule that errors
#: would silently not fire, turning the error into an allow.
QUERY_PARAMS = {"provenance": "true", "strict-builtin-errors": "true"}


class OpaEngine:
    name = "opa"

    def __init__(self, url: str, decision: str = "regate/decision", *, timeout_ms: int = 50,
                 token: str | None = None, rego_dir: str | Path | None = None,
                 data_dir: str | Path | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"policy.opa.url: not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self.decision = decision.strip("/")
        self.timeout_ms = timeout_ms
        self._timeout_s = timeout_ms / 1000
        # What OPA was loaded with is OPA's business; the local dirs are kept
        # for callers that show them, never used as the revision.
        self.rego_dir = Path(rego_dir) if rego_dir is not None else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._no_revision = f"opa:{self.url}"
        self.revision = self._no_revision
        base = parts.path.strip("/")
        self._client = AsyncOpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8181),
            # The client builds <scheme><host>:<port>/<version>: an OPA behind a
            # path prefix is reached by putting the prefix before "v1".
            version=f"{base}/v1" if base else "v1",
            ssl=parts.scheme == "https",
            token=token,
            retries=0,
            timeout=self._timeout_s,
        )
        self._started = False

    def _revision_of(self, revisions: dict[str, str]) -> str:
        revisions = {name: rev for name, rev in revisions.items() if isinstance(rev, str) and rev}
        if not revisions:
            return self._no_revision
        if len(revisions) == 1:
            return next(iter(revisions.values()))
        return ",".join(f"{name}={rev}" for name, rev in sorted(revisions.items()))

    async def _ask_revision(self) -> str:
        """The revision of the bundles OPA serves now, from ``data.system.bundles``."""
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._client.get_data("system/bundles")
        except TimeoutError:
            raise EngineError(f"OPA at {self.url} did not say its bundle revision within {self.timeout_ms} ms") from None
        except (aiohttp.ClientError, OSError, ValueError, PolicyNotFoundError) as exc:
            raise EngineError(f"cannot ask OPA at {self.url} for its bundle revision: "
                              f"{exc.__class__.__name__}: {exc}") from None
        bundles = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(bundles, dict):
            return self._no_revision
        return self._revision_of({name: (b.get("manifest") or {}).get("revision")
                                  for name, b in bundles.items() if isinstance(b, dict)})

    async def start(self) -> None:
        if not self._started:
            await self._client.__aenter__()  # opens the one long-lived session
            self._started = True
            try:
                self.revision = await self._ask_revision()
            except EngineError:
                # NOTE: an OPA that is not up yet must not stop Regate from starting
                # (its calls fail closed meanwhile); the first decision's provenance
                # then brings the revision.
                pass

    async def evaluate(self, input: dict) -> Decision:  # noqa: A002
        if not self._started:
            raise EngineError("the opa engine has not been started")
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._client.query_rule(input, self.decision, query_params=QUERY_PARAMS)
        except TimeoutError:
            raise EngineTimeout(f"OPA at {self.url} did not answer within {self.timeout_ms} ms") from None
        except aiohttp.ClientResponseError as exc:
            raise EngineError(f"OPA at {self.url} answered {exc.status} {exc.message}".rstrip()) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"cannot reach OPA at {self.url}: {exc.__class__.__name__}: {exc}") from None
        except ValueError as exc:  # a body that is not JSON
            raise EngineError(f"OPA at {self.url} sent an unreadable answer: {exc}") from None
        if not isinstance(answer, dict):
            raise EngineError(f"OPA at {self.url} sent an unreadable answer (not a JSON object)")
        provenance = answer.get("provenance")
        if isinstance(provenance, dict):
            self._follow(provenance)
        if "result" not in answer:
            raise DecisionError(f"decision is undefined: OPA has no value for data.{self.decision.replace('/', '.')} "
                                "for this input")
        return parse_decision(answer["result"], from_json=True)

    def _follow(self, provenance: dict) -> None:
        bundles = provenance.get("bundles")
        if not isinstance(bundles, dict):
            self.revision = self._no_revision
        else:
            self.revision = self._revision_of({name: b.get("revision") for name, b in bundles.items()
                                               if isinstance(b, dict)})

    async def reload(self) -> str:
        # OPA loads its own bundles; a reload asks it which revision it serves.
        # Failing to ask keeps the old revision (BundleError, as a broken bundle).
        try:
            self.revision = await self._ask_revision()
        except EngineError as exc:
            raise BundleError([str(exc)]) from None
        return self.revision

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._client.close_connection()
