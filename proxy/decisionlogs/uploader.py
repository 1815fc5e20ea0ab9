"""The decision logger: the request path's one call (`log`) and the task that
encodes, batches and uploads events the way OPA's decision_logs plugin does.

`POST <url><resource>` with `Content-Type: application/json` and
`Content-Encoding: gzip`, the body a JSON array of events. A 2xx answer means
delivered; anything else (an error status, a refused connection, a timeout)
puts the batch back and the next try waits an exponential backoff with
jitter. What happens on failure is decided here, in `_upload`: nothing on the
request path ever waits for the collector, and the buffer's byte bound
(buffer.py) decides what is lost when the collector stays away.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
import time
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from .buffer import ENTRY_OVERHEAD, EventBuffer
from .event import Entry, EventEncoder
from .mask import parse_rules

log = logging.getLogger("regate.decisionlogs")

_perf_ns = time.perf_counter_ns
_time_ns = time.time_ns

#: Entries encoded per slice before the uploader yields the event loop to calls.
ENCODE_SLICE = 256
#: Bodies past this size are gzipped on a thread (zlib releases the GIL).
GZIP_INLINE_MAX = 64 << 10


def backoff_s(retries: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number `retries` (1 = the first): base·2^(retries−1), capped at
    `max_s`, then jittered to 50–100 % so replicas that failed together do not retry together."""
    delay = min(max_s, base_s * (2 ** min(max(retries - 1, 0), 62)))
    return delay * (0.5 + 0.5 * rand())


def upload_due(now: float, last_flush: float, flush_s: float, retry_at: float, waiting: bool,
               full_batch: bool) -> str:
    """What the uploader sends now: "none", "full" (only full batches) or "all" (every
    waiting event, the last batch partial). Backing off after a failure sends nothing;
    a full batch goes at once; a partial one once flush_s has passed since the last flush."""
    if not waiting or now < retry_at:
        return "none"
    if now - last_flush >= flush_s:
        return "all"
    return "full" if full_batch else "none"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("regate")
    except Exception:  # noqa: BLE001 - running from a checkout that was never installed
        return "unknown"


def _shown_url(url: str) -> str:
    """The URL without user:password, for status and logs."""
    p = urlsplit(url)
    if p.username is None and p.password is None:
        return url
    host = p.hostname or ""
    return urlunsplit((p.scheme, host + (f":{p.port}" if p.port else ""), p.path, p.query, p.fragment))


class DecisionLogger:
    """OPA-format decision logs for one Regate process (one instance id per process)."""

    def __init__(self, cfg: Any, *, decision_path: str, engine_name: str,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self.url = cfg.url.rstrip("/") + cfg.resource
        self.instance_id = str(uuid.uuid4())
        labels = {"id": self.instance_id, "version": _version(), **cfg.labels}
        # The embedded engine evaluates in this process; with `opa` the time is a REST round trip.
        eval_timer = "timer_rego_query_eval_ns" if engine_name == "embedded" else "timer_regate_engine_ns"
        self.encoder = EventEncoder(path=decision_path.strip("/"), bundle=cfg.bundle, labels=labels,
                                    rules=parse_rules(cfg.mask), eval_timer=eval_timer)
        self.buffer = EventBuffer(cfg.buffer_max_bytes, cfg.batch_max_bytes)
        self.clock = clock
        self.rand = rand
        self.headers = {"Content-Type": "application/json", "Content-Encoding": "gzip", **cfg.headers}
        self.tick_s = min(cfg.flush_s, 0.25)
        self.logged = 0
        self.uploaded = 0       # events delivered (2xx)
        self.uploads = 0        # successful POSTs
        self.upload_errors = 0  # failed POSTs
        self.retries = 0        # consecutive failures
        self.last_error: str | None = None
        self.last_upload_at: float | None = None  # wall-clock seconds
        self._retry_at = 0.0
        self._last_flush = clock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._session: Any = None
        self._closing = False

    # -- the request path ---------------------------------------------------

    def log(self, call: Any, input_doc: Any, result: Any, started_ns: int, eval_started_ns: int,
            error: Any = None) -> None:
        """One decision the policy stage made: append references, nothing more."""
        now = _perf_ns()
        request = call.request
        buf = self.buffer
        buf.add(Entry(call.id, call.revision, input_doc, result, error, _time_ns(), now - started_ns,
                      now - eval_started_ns, request.remote, (call.body_size or 0) + ENTRY_OVERHEAD))
        self.logged += 1
        if buf.pending_bytes >= buf.batch_max_bytes and self._wake is not None:
            self._wake.set()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        import aiohttp

        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            auto_decompress=True, skip_auto_headers=("Accept-Encoding",))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="regate-decision-logs")

    async def close(self) -> None:
        """Stop the task, then one last try to deliver what is buffered (bounded by
        timeout_s); what still did not arrive is counted dropped (`shutdown`)."""
        self._closing = True
        if self._task is not None:
            if self._wake is not None:
                self._wake.set()
            try:
                await asyncio.wait_for(self._task, timeout=self.cfg.timeout_s + 1)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            except Exception:  # noqa: BLE001 - the task logged its own failure
                pass
            self._task = None
        if self._session is not None:
            try:
                deadline = self.clock() + self.cfg.timeout_s
                await self._encode_pending(everything=True)
                # Each pass sends one batch or gives up; at most one pass per batch buffered.
                for _ in range(len(self.buffer.encoded) + 1):
                    if not self.buffer.encoded or self.clock() >= deadline:
                        break
                    if not await self._upload():
                        break
            finally:
                lost = self.buffer.drop_all("shutdown")
                if lost:
                    log.warning("decision logs: %d events not delivered to %s at shutdown", lost,
                                _shown_url(self.url))
                await self._session.close()
                self._session = None

    # -- the task -----------------------------------------------------------

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self._closing:
            try:
                await asyncio.wait_for(wake.wait(), self.tick_s)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            if self._closing:
                break
            try:
                await self._step()
            except Exception:  # noqa: BLE001 - the logger must outlive any one bad event or batch
                log.exception("decision logs: uploader step failed")

    async def _step(self) -> None:
        await self._encode_pending()
        buf = self.buffer
        now = self.clock()
        due = upload_due(now, self._last_flush, self.cfg.flush_s, self._retry_at, bool(buf.encoded),
                         buf.full_batch_ready())
        if due == "none":
            if now - self._last_flush >= self.cfg.flush_s and now >= self._retry_at:
                self._last_flush = now  # nothing waiting: the next partial batch waits a full flush_s
            return
        # Bounded: each pass sends one batch (removed from the buffer) or stops.
        for _ in range(len(buf.encoded)):
            if self._closing or not buf.encoded or (due == "full" and not buf.full_batch_ready()):
                break
            if not await self._upload():
                return
            await self._encode_pending()
        if due == "all":
            self._last_flush = self.clock()

    async def _encode_pending(self, everything: bool = False) -> None:
        buf = self.buffer
        enc = self.encoder
        # Bounded: entries appended while this runs wait for the next step unless `everything`.
        for _ in range(len(buf.pending) // ENCODE_SLICE + 1):
            entries = buf.take_pending(ENCODE_SLICE)
            if not entries:
                return
            for e in entries:
                try:
                    data = enc.encode(e)
                except Exception as exc:  # noqa: BLE001 - e.g. an integer JSON cannot carry
                    buf.dropped["unencodable"] += 1
                    log.warning("decision logs: event for decision %s cannot be encoded: %s", e.decision_id, exc)
                    continue
                buf.add_encoded(data)
            if not everything:
                await asyncio.sleep(0)  # let calls run between slices

    async def _upload(self) -> bool:
        """Send the oldest batch. True when the collector took it."""
        buf = self.buffer
        batch = buf.take_batch()
        if not batch:
            return True
        body = buf.body(batch)
        try:
            if len(body) > GZIP_INLINE_MAX:
                data = await asyncio.to_thread(gzip.compress, body, 6)
            else:
                data = gzip.compress(body, 6)
            async with self._session.post(self.url, data=data, headers=self.headers) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise _Refused(f"HTTP {resp.status}")
        except (asyncio.CancelledError, KeyboardInterrupt):
            buf.requeue(batch)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure means the same: try again later
            buf.requeue(batch)
            self.upload_errors += 1
            self.retries += 1
            self.last_error = f"{exc.__class__.__name__}: {exc}" if not isinstance(exc, _Refused) else str(exc)
            delay = backoff_s(self.retries, self.cfg.backoff_min_s, self.cfg.backoff_max_s, self.rand)
            self._retry_at = self.clock() + delay
            if self.retries == 1 or self.retries % 20 == 0:
                log.warning("decision logs: upload to %s failed (%s), try %d; retrying in %.1fs",
                            _shown_url(self.url), self.last_error, self.retries, delay)
            return False
        buf.delivered()
        self.uploaded += len(batch)
        self.uploads += 1
        if self.retries:
            log.warning("decision logs: upload to %s works again after %d failed tries", _shown_url(self.url),
                        self.retries)
        self.retries = 0
        self._retry_at = 0.0
        self.last_upload_at = time.time()
        return True

    # -- what operators see -----------------------------------------------

    def status(self) -> dict[str, Any]:
        buf = self.buffer
        dropped = dict(buf.dropped)
        return {
            "enabled": True,
            "url": _shown_url(self.url),
            "instance_id": self.instance_id,
            "logged": self.logged,
            "uploaded": self.uploaded,
            "uploads": self.uploads,
            "upload_errors": self.upload_errors,
            "consecutive_failures": self.retries,
            "last_error": self.last_error,
            "last_upload_at": self.last_upload_at,
            "buffered_events": len(buf.encoded) + len(buf.pending),
            "buffered_bytes": buf.encoded_bytes + buf.pending_bytes,
            "in_flight_events": buf.in_flight,
            "buffer_max_bytes": buf.max_bytes,
            "dropped": dropped,
            "dropped_total": sum(dropped.values()),
        }


class _Refused(Exception):
    """The collector answered, but not with 2xx."""

