"""The bundle service: a policy bundle pulled from an HTTP bundle server, as OPA pulls one.

``policy.bundle.service`` names the bundle's URL. Regate polls it the way OPA's
bundle plugin does: ``GET <url>`` with ``If-None-Match: <etag of the bundle in
force>``; ``304`` means nothing changed; ``200`` brings a tarball made by
``opa build``, which is verified (``.signatures.json`` against the configured
key, when there is one), unpacked and compiled beside the serving bundle, then
swapped in with one reference (``EmbeddedEngine.install``: a call is judged by
the old bundle or the new one, never by neither). After a successful poll the
next one waits a random time between ``poll_min_s`` and ``poll_max_s``; after a
failure, an exponential backoff from 100 ms (x1.6, ±20 % jitter) up to
``poll_max_s`` (``next_delay``, OPA's ``util.DefaultBackoff``).

Failure is decided in one place, ``_poll_failed``: whatever went wrong (the
server down or answering 5xx, a bundle that does not verify or compile), the
bundle in force keeps serving and the error is reported (``status()``,
``/readyz`` warnings, ``/metrics``). Each bundle that went into force is kept on
disk (``persist_dir``) with its ETag, so a restart serves the last good bundle
before the server answers (``load``, the engine's source). A Regate that has
never had a bundle refuses every call (``policy_error``) and is not ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from ..engines.bundle import (MAX_BUNDLE_BYTES, Bundle, BundleError, BundleSource, NoBundleYet, SigningKey,
                              read_bundle_tarball)

log = logging.getLogger("regate.bundle")

#: OPA's minimum retry delay, and its backoff's factor and jitter.
MIN_RETRY_DELAY_S = 0.1
BACKOFF_FACTOR = 1.6
BACKOFF_JITTER = 0.2

PERSISTED = "bundle.tar.gz"
PERSISTED_META = "bundle.json"


def next_delay(ok: bool, errors: int, min_s: float, max_s: float, rand: float) -> float:
    """Seconds until the next poll: after a success a uniform wait in [min_s, max_s]
    (``rand`` in [0, 1)); after the ``errors``-th failure in a row, 100 ms grown by
    1.6 per failure, capped at max_s, then ±20 % jitter."""
    if ok:
        return min_s + (max_s - min_s) * rand
    if errors <= 0:
        return 0.0
    delay = MIN_RETRY_DELAY_S
    n = errors
    while delay < max_s and n > 0:
        delay *= BACKOFF_FACTOR
        n -= 1
    delay = min(delay, max_s)
    delay *= 1 + BACKOFF_JITTER * (rand * 2 - 1)
    return max(delay, 0.0)


class BundleFetchError(Exception):
    """The server did not hand over a bundle (down, timed out, answered an error)."""


class BundleService(BundleSource):
    """Polls one bundle URL and installs what it serves into an engine (``attach``)."""

    def __init__(self, url: str, *, poll_min_s: float = 60.0, poll_max_s: float = 120.0,
                 headers: dict[str, str] | None = None, timeout_s: float = 30.0,
                 signing: SigningKey | None = None, persist_dir: str | os.PathLike[str] | None = None,
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random) -> None:
        self.url = url
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.signing = signing
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        self.clock = clock
        self.rand = rand
        self.engine: Any = None
        self.on_install: list[Callable[[str], None]] = []
        # What status() reports.
        self.etag: str | None = None
        self.revision: str | None = None
        self.active_from: str | None = None      # "server" or "disk"
        self.last_request: float | None = None
        self.last_success: float | None = None   # the server answered with a good bundle or 304
        self.last_activation: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.consecutive_errors = 0
        self.persist_error: str | None = None
        self._pending: tuple[str, str | None] = ("server", None)  # (from, etag) of the bundle being installed
        # A kept bundle that cannot be used must not stop Regate starting: the server may have a good one.
        self.required = False
        self.polls = {"activated": 0, "not_modified": 0, "error": 0}
        self._session: Any = None
        self._task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None

    def __str__(self) -> str:
        return self.url

    # --- the engine's source: the last good bundle on disk -------------------

    def load(self, *, include_tests: bool = False) -> Bundle:
        """The last good bundle kept on disk (blocking; the engine runs it in a thread).

        NoBundleYet when there is none (or it no longer verifies): the engine then
        starts without a bundle and waits for the server.
        """
        path = self.persist_dir / PERSISTED if self.persist_dir is not None else None
        if path is None or not path.is_file():
            raise NoBundleYet(self._no_bundle_text())
        try:
            raw = path.read_bytes()
            bundle = read_bundle_tarball(raw, str(path), signing=self.signing, include_tests=include_tests)
        except (OSError, BundleError) as exc:
            problem = "; ".join(getattr(exc, "problems", None) or [str(exc)])
            log.error("bundle: the last good bundle kept in %s cannot be used (%s)", path, problem)
            raise NoBundleYet(f"{self._no_bundle_text()} (the kept bundle {path} cannot be used: {problem})") from None
        try:
            meta = orjson.loads((self.persist_dir / PERSISTED_META).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            meta = {}
        # Recorded when the engine puts it in force (_activated), not before: it may refuse it.
        self._pending = ("disk", meta.get("etag") if isinstance(meta.get("etag"), str) else None)
        log.info("bundle: the last good bundle kept in %s (revision %s) serves until %s answers",
                 path, bundle.revision, self.url)
        return bundle

    def _no_bundle_text(self) -> str:
        text = f"no policy bundle yet: the bundle service {self.url} has not delivered one"
        if self.last_error:
            text += f" (last error: {self.last_error})"
        return text

    # --- lifecycle --------------------------------------------------------------

    def attach(self, engine: Any) -> None:
        """The engine whose bundle this service keeps current (``engine.install``)."""
        self.engine = engine
        engine.bundle_hooks.append(self._activated)

    def _activated(self, bundle: Bundle) -> Callable[[], None]:
        """Bundle hook: what the status says once a bundle (from disk or the server) is in force."""
        source, etag = self._pending

        def commit() -> None:
            self.revision = bundle.revision
            self.active_from = source
            self.etag = etag
            self.last_activation = self.clock()
        return commit

    async def start(self) -> None:
        import aiohttp

        if self._task is not None:
            return
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="regate-bundle-service")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            ok = await self._poll_guarded()
            delay = next_delay(ok, self.consecutive_errors, self.poll_min_s, self.poll_max_s, self.rand())
            assert self._wake is not None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _poll_guarded(self) -> bool:
        try:
            await self.poll()
            return True
        except (BundleFetchError, BundleError):
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad poll must not end the polling
            log.exception("bundle: unexpected error polling %s", self.url)
            self._poll_failed(f"{exc.__class__.__name__}: {exc}")
            return False

    # --- one poll -----------------------------------------------------------------

    async def poll(self) -> bool:
        """Ask the server once; True when a new bundle went into force. Raises
        BundleFetchError / BundleError (recorded in the status) when it failed."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                fetched = await self._fetch()
                if fetched is None:  # 304: the bundle in force is the current one
                    self.polls["not_modified"] += 1
                    self._poll_ok()
                    return False
                raw, etag = fetched
                bundle = await asyncio.to_thread(read_bundle_tarball, raw, self.url, signing=self.signing)
                current = self.engine.bundle
                if current is not None and (current.digest, current.revision) == (bundle.digest, bundle.revision):
                    # The same bundle again (a server without ETags): nothing to swap, the
                    # decision cache and the worker processes stay as they are.
                    self.etag = etag
                    self.polls["not_modified"] += 1
                    self._poll_ok()
                    return False
                self._pending = ("server", etag)
                revision = self.engine.install(bundle)  # compiled aside, swapped in one step
            except BundleFetchError as exc:
                self._poll_failed(str(exc))
                raise
            except BundleError as exc:
                self._poll_failed("the bundle was refused: " + "; ".join(exc.problems))
                raise
            self.polls["activated"] += 1
            self._poll_ok()
            log.info("bundle: revision %s from %s is in force", revision, self.url)
            for callback in self.on_install:
                callback(revision)
            await asyncio.to_thread(self._persist, raw, etag, revision)
            return True

    async def poll_now(self) -> str:
        """``POST /admin/reload`` with a bundle service: poll at once; the revision in force."""
        try:
            await self.poll()
        except BundleFetchError as exc:
            raise BundleError([f"bundle service: {exc}"]) from None
        return self.engine.revision

    async def _fetch(self) -> tuple[bytes, str | None] | None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        headers = dict(self.headers)
        if self.etag and self.engine is not None and self.engine.bundle is not None:
            headers["If-None-Match"] = self.etag
        self.last_request = self.clock()
        try:
            async with self._session.get(self.url, headers=headers) as resp:
                if resp.status == 304:
                    return None
                if resp.status != 200:
                    body = (await resp.content.read(200)).decode(errors="replace").strip()
                    raise BundleFetchError(f"GET {self.url} answered {resp.status} {resp.reason or ''}".rstrip()
                                           + (f": {body}" if body else ""))
                if (resp.content_length or 0) > MAX_BUNDLE_BYTES:
                    raise BundleFetchError(f"GET {self.url}: the bundle is {resp.content_length} bytes, over "
                                           f"the limit of {MAX_BUNDLE_BYTES}")
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_BUNDLE_BYTES:
                        raise BundleFetchError(f"GET {self.url}: the bundle is over {MAX_BUNDLE_BYTES} bytes")
                    chunks.append(chunk)
                return b"".join(chunks), resp.headers.get("ETag")
        except TimeoutError:
            raise BundleFetchError(f"GET {self.url}: no bundle within {self.timeout_s:g} s "
                                   "(policy.bundle.service.timeout_s)") from None
        except aiohttp.ClientError as exc:
            raise BundleFetchError(f"GET {self.url}: {exc.__class__.__name__}: {exc}") from None
        except OSError as exc:
            raise BundleFetchError(f"GET {self.url}: {exc.__class__.__name__}: {exc}") from None

    def _poll_ok(self) -> None:
        self.last_success = self.clock()
        self.consecutive_errors = 0

    def _poll_failed(self, message: str) -> None:
        # NOTE: the one place a failed poll is decided: the bundle in force (if any)
        # keeps serving; a Regate without one keeps refusing calls, now saying why.
        self.polls["error"] += 1
        self.consecutive_errors += 1
        self.last_error = message
        self.last_error_at = self.clock()
        if self.engine is not None and self.engine.bundle is None:
            self.engine.unloaded_reason = self._no_bundle_text()
        if self.consecutive_errors == 1 or self.consecutive_errors % 10 == 0:
            log.warning("bundle: %s; %s", message,
                        f"still serving revision {self.revision}" if self.revision else "no bundle in force yet")

    def _persist(self, raw: bytes, etag: str | None, revision: str) -> None:
        if self.persist_dir is None:
            return
        try:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            # Write aside, then rename: a crash (or another worker writing too)
            # never leaves half a bundle where a restart will read it.
            for name, content in ((PERSISTED, raw),
                                  (PERSISTED_META, orjson.dumps({"etag": etag, "revision": revision,
                                                                 "url": self.url, "saved": self.clock()}))):
                tmp = self.persist_dir / f".{name}.{os.getpid()}.tmp"
                tmp.write_bytes(content)
                os.replace(tmp, self.persist_dir / name)
            self.persist_error = None
        except OSError as exc:
            # NOTE: lossy by design: the bundle serves anyway; only a restart before
            # the server answers again would lack it. Reported in the status.
            self.persist_error = f"cannot keep the bundle in {self.persist_dir}: {exc.strerror or exc}"
            log.warning("bundle: %s", self.persist_error)

    # --- what /readyz, /admin/status and /metrics show ----------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "revision": self.revision,
            "active": self.engine is not None and self.engine.bundle is not None,
            "from": self.active_from,
            "etag": self.etag,
            "last_request": self.last_request,
            "last_success": self.last_success,
            "last_activation": self.last_activation,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "consecutive_errors": self.consecutive_errors,
            "polls": dict(self.polls),
            "persist_dir": str(self.persist_dir) if self.persist_dir is not None else None,
            "persist_error": self.persist_error,
        }

    def problems(self) -> list[str]:
        """Why this Regate is not ready: it has no bundle to judge calls with."""
        if self.engine is not None and self.engine.bundle is None:
            return [f"bundle: {self._no_bundle_text()}"]
        return []

    def warnings(self) -> list[str]:
        """Ready, but: the server's last answer was a failure (the last good bundle serves)."""
        out = []
        if self.last_error and (self.last_success is None or (self.last_error_at or 0) > self.last_success) \
                and not self.problems():
            out.append(f"bundle: {self.last_error}; serving revision {self.revision} "
                       f"(from {self.active_from})")
        if self.persist_error:
            out.append(f"bundle: {self.persist_error}")
        return out
