"""The ``opa`` engine: decisions from an OPA server over its REST Data API.

``POST /v1/data/<decision path>`` with ``{"input": ...}`` through
opa-python-client's ``AsyncOpaClient``, on one long-lived session (keep-alive,
one connection pool). The client's own retries are off: retrying is Regate's
decision, never a library's behind its back. Each call is bounded by
``policy.timeout_ms``, enforced here: a slow, down or failing OPA is an
``EngineError`` within that time, and the policy stage fails closed (or open,
where a tool says so).

The revision is the content hash of the local bundle (rego + data dirs, the
same hash the embedded engine reports) when those directories exist, since
they are normally what the OPA server was loaded with; else ``opa:<url>``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from opa_client import AsyncOpaClient

from .bundle import load_bundle
from .decision import Decision, DecisionError, EngineError, parse_decision


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
        self.rego_dir = Path(rego_dir) if rego_dir is not None else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.revision = f"opa:{self.url}"
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

    def _local_revision(self) -> str:
        if self.rego_dir is not None and self.rego_dir.is_dir():
            data_dir = self.data_dir if self.data_dir is not None and self.data_dir.is_dir() else None
            return load_bundle(self.rego_dir, data_dir).revision
        return f"opa:{self.url}"

    async def start(self) -> None:
        if not self._started:
            self.revision = await asyncio.to_thread(self._local_revision)
            await self._client.__aenter__()  # opens the one long-lived session
            self._started = True

    async def evaluate(self, input: dict) -> Decision:  # noqa: A002
        if not self._started:
            raise EngineError("the opa engine has not been started")
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._client.query_rule(input, self.decision)
        except TimeoutError:
            raise EngineError(f"OPA at {self.url} did not answer within {self.timeout_ms} ms") from None
        except aiohttp.ClientResponseError as exc:
            raise EngineError(f"OPA at {self.url} answered {exc.status} {exc.message}".rstrip()) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"cannot reach OPA at {self.url}: {exc.__class__.__name__}: {exc}") from None
        except ValueError as exc:  # a body that is not JSON
            raise EngineError(f"OPA at {self.url} sent an unreadable answer: {exc}") from None
        if not isinstance(answer, dict):
            raise EngineError(f"OPA at {self.url} sent an unreadable answer (not a JSON object)")
        if "result" not in answer:
            raise DecisionError(f"decision is undefined: OPA has no value for data.{self.decision.replace('/', '.')} "
                                "for this input")
        return parse_decision(answer["result"], from_json=True)

    async def reload(self) -> str:
        # OPA reloads its own bundles; Regate re-reads the local copy so the
        # revision it stamps on decisions follows the files. BundleError keeps
        # the old revision.
        self.revision = await asyncio.to_thread(self._local_revision)
        return self.revision

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._client.close_connection()
