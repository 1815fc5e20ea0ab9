"""The audit log's writing side: one hash chain per process, group commit, fail closed.

``AuditLog`` chains every record synchronously on the event loop (seq, prev, hash) into a
buffer; one writer task writes each buffer with one ``write`` call (group commit), fsyncs
per policy off the loop, and only then resolves the callers (``always``) or resolves them
as soon as the bytes reached the OS (``interval``, ``never``). When the file cannot be
written the affected records raise ``AuditUnavailable``, the chain is rolled back to the
last record that reached the file, and the writer probes until writing works again.
Checkpoints (signed with Ed25519 when a key is configured) are chained at start, every N
records, every T seconds even when idle (heartbeat), after an outage and at clean close.
The on-disk format defined here is what ``proxy.audit_verify`` checks.

Format: one JSON object per line, keys sorted, ``"hash"`` last. Every line carries
``seq`` (1, 2, 3... over the whole chain, checkpoints included), ``prev`` (the previous
line's hash; 64 zeros for the first), ``chain`` (random id of this chain) and ``hash`` =
SHA-256(type byte || orjson(line without hash, sorted keys)), type byte 0x00 for a record
and 0x01 for a checkpoint (``"kind": "checkpoint"``). A checkpoint adds ``worker``, ``ts``,
``reason`` (open|count|heartbeat|recover|close|manual), ``count`` (lines before it),
``records`` (records since the previous checkpoint), ``heartbeat_s``, ``every``, ``key``
(public-key fingerprint), ``pub`` (raw public key, base64) and ``sig`` = Ed25519 over
SIGNATURE_CONTEXT || orjson(checkpoint without sig and hash, sorted keys).
Segments are ``audit-w<worker>-<index:06d>.jsonl``; the first line of a segment chains to
the last line of the previous one.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import hashlib
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
RECORD_TYPE = b"\x00"
CHECKPOINT_TYPE = b"\x01"
SIGNATURE_CONTEXT = b"regate-audit-checkpoint-v1\x00"
SEGMENT_RE = re.compile(r"^audit-w(\d+)-(\d{6,})\.jsonl$")
FSYNC_MODES = ("always", "interval", "never")
CHECKPOINT_REASONS = ("open", "count", "heartbeat", "recover", "close", "manual")

_SORT = orjson.OPT_SORT_KEYS
_sha256 = hashlib.sha256
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)

# Indirection so a test can wrap the real fsync (to make it slow), never replace it.
_fsync = os.fsync


class AuditUnavailable(Exception):
    """The audit log cannot record right now: the call must not go ahead (503)."""

    code = "audit_unavailable"


class AuditLogCorrupt(Exception):
    """The existing chain in the audit dir cannot be continued safely."""


class AuditLogInUse(Exception):
    """Another live process is writing this worker's chain."""


# ---------------------------------------------------------------------------- format


def segment_name(worker: int, index: int) -> str:
    return f"audit-w{worker}-{index:06d}.jsonl"


def list_segments(directory: str | os.PathLike) -> dict[int, list[tuple[int, Path]]]:
    """Segments in ``directory`` by worker, each list sorted by segment index."""
    out: dict[int, list[tuple[int, Path]]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            out.setdefault(int(m.group(1)), []).append((int(m.group(2)), Path(directory) / name))
    for segs in out.values():
        segs.sort()
    return out


def line_hash(fields: dict) -> tuple[bytes, str]:
    """(canonical bytes, hash) of a line's fields (without ``hash``)."""
    canon = orjson.dumps(fields, option=_SORT)
    kind = CHECKPOINT_TYPE if fields.get("kind") == "checkpoint" else RECORD_TYPE
    return canon, _sha256(kind + canon).hexdigest()


def encode_line(canon: bytes, digest: str) -> bytes:
    """The on-disk line (with newline) for canonical bytes and their hash."""
    return canon[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


def signed_bytes(checkpoint: dict) -> bytes:
    """What a checkpoint's signature covers: everything but ``sig`` and ``hash``."""
    body = {k: v for k, v in checkpoint.items() if k not in ("sig", "hash")}
    return SIGNATURE_CONTEXT + orjson.dumps(body, option=_SORT)


# ------------------------------------------------------------------------------ keys


def _read_pem(source: str | bytes | os.PathLike) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode()
    return Path(source).read_bytes()


def load_private_key(source: str | bytes | os.PathLike | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM path or PEM bytes."""
    if isinstance(source, Ed25519PrivateKey):
        return source
    try:
        key = serialization.load_pem_private_key(_read_pem(source), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"audit signing key {source!r}: cannot load a PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"audit signing key {source!r}: not an Ed25519 key (make one with `regate audit keygen`)")
    return key


def load_public_key(source: str | bytes | os.PathLike | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM path or PEM bytes (a private key PEM also works)."""
    if isinstance(source, Ed25519PublicKey):
        return source
    try:
        pem = _read_pem(source)
    except OSError as e:
        raise ValueError(f"audit public key {source!r}: {e.strerror or e}") from e
    try:
        key: Any = serialization.load_pem_public_key(pem)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(pem, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise ValueError(f"audit public key {source!r}: not a PEM key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"audit public key {source!r}: not an Ed25519 key")
    return key


def raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short name of a key as written in checkpoints: SHA-256 of the raw public key, 32 hex."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return hashlib.sha256(raw_public_bytes(key)).hexdigest()[:32]


def keygen(out_prefix: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write ``<prefix>.key`` (private, 0600) and ``<prefix>.pub``; returns them and the fingerprint."""
    priv_path, pub_path = Path(f"{out_prefix}.key"), Path(f"{out_prefix}.pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} already exists: refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    if priv_path.parent:
        priv_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub)
    return priv_path, pub_path, fingerprint(key)


# ---------------------------------------------------------------------- the writer


def _last_line(path: Path) -> tuple[bytes | None, int, bytes]:
    """(last complete line, length up to and including its newline, torn bytes after it)."""
    size = path.stat().st_size
    chunk = 1 << 16
    with open(path, "rb") as f:
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            data = f.read(size - start)
            nl = data.rfind(b"\n")
            if nl == -1 and start > 0:
                chunk *= 4
                continue
            if nl == -1:
                return None, 0, data
            before = data.rfind(b"\n", 0, nl)
            if before == -1 and start > 0:
                chunk *= 4
                continue
            return data[before + 1:nl], start + nl + 1, data[nl + 1:]


def _describe(e: OSError, path: Path | None) -> str:
    name = errno.errorcode.get(e.errno or 0, "error")
    return f"audit log write failed: {e.strerror or e} ({name}) on {path}"


class AuditLog:
    """The per-process audit chain. ``await append(record)`` returns once the record reached the OS.

    Records are dicts of JSON-native values (str, int, float, bool, None, lists, dicts with
    str keys) so that re-encoding them in ``verify`` gives the same bytes. ``seq``, ``prev``,
    ``chain`` and ``hash`` are set here; ``ts`` (seconds since the epoch, as time.time()) is
    filled in when absent. The caller's dict is copied, never changed.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        worker: int = 0,
        fsync: str = "interval",
        interval_ms: float = 50,
        segment_max_bytes: int = 64 << 20,
        checkpoint_every: int = 10_000,
        heartbeat_s: float | None = 60.0,
        signing_key: str | bytes | os.PathLike | Ed25519PrivateKey | None = None,
        max_pending: int = 65_536,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"audit.fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        if interval_ms <= 0:
            raise ValueError(f"audit.interval_ms must be > 0, got {interval_ms!r}")
        if segment_max_bytes < 1024:
            raise ValueError(f"audit.segment_max_bytes must be >= 1024, got {segment_max_bytes!r}")
        if checkpoint_every < 1:
            raise ValueError(f"audit.checkpoint_every must be >= 1, got {checkpoint_every!r}")
        if heartbeat_s is not None and heartbeat_s <= 0:
            raise ValueError(f"audit.heartbeat_s must be > 0 (or null to disable), got {heartbeat_s!r}")
        if worker < 0:
            raise ValueError(f"audit worker index must be >= 0, got {worker!r}")
        self.dir = Path(directory)
        self.worker = worker
        self.fsync = fsync
        self.interval_s = interval_ms / 1000.0
        self.segment_max_bytes = segment_max_bytes
        self.checkpoint_every = checkpoint_every
        self.heartbeat_s = heartbeat_s
        self.max_pending = max_pending
        self.retry_s = retry_s
        self._clock = clock
        self._hb = heartbeat_s if heartbeat_s is not None else float("inf")
        self._key = load_private_key(signing_key) if signing_key is not None else None
        if self._key is not None:
            pub = self._key.public_key()
            self.key_fingerprint: str | None = fingerprint(pub)
            self._pub_b64: str | None = base64.b64encode(raw_public_bytes(pub)).decode()
        else:
            self.key_fingerprint = self._pub_b64 = None

        # Chain state, advanced synchronously by _chain_*; _good is its value after the
        # last line that reached the file, so a failed batch can be undone.
        self._chain_id = ""
        self._seq = 0
        self._head = GENESIS
        self._last_cp_ts = 0.0
        self._since_cp = 0
        self._good: tuple = (0, GENESIS, 0.0, 0)

        self._buf = bytearray()
        self._futs: list[asyncio.Future] = []
        self._buf_lines = 0
        self._buf_records = 0
        self._buf_cps = 0

        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._seg_index = 1
        self._offset = 0  # bytes of the current segment known to be good
        self._need_truncate = False

        self._healthy = False
        self._reason: str | None = "audit log not started"
        self._opened = False
        self._open_extra: dict = {}
        self._outage_since: float | None = None
        self._outage_lost = 0
        self._outage_refused = 0
        self._started = False
        self._closing = False
        self._closed = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._waiter: asyncio.Future | None = None
        self._space: asyncio.Event | None = None
        self._dirty = False
        self._dirty_waiter: asyncio.Future | None = None
        self._last_sync = 0.0
        self._tasks: list[asyncio.Task] = []
        self.stats = {"records": 0, "checkpoints": 0, "batches": 0, "bytes": 0, "fsyncs": 0,
                      "write_errors": 0, "lost": 0, "refused": 0, "recoveries": 0}

    @classmethod
    def from_config(cls, section: Any, *, worker: int = 0, base_dir: str | os.PathLike = ".",
                    **overrides: Any) -> "AuditLog":
        """Build from the ``audit:`` config section; relative paths resolve against ``base_dir``."""
        def path(p: Any) -> Any:
            return p if p is None or os.path.isabs(p) else os.path.join(base_dir, p)
        kw: dict[str, Any] = {"worker": worker, "fsync": getattr(section, "fsync", "interval"),
                              "interval_ms": getattr(section, "interval_ms", 50)}
        for name in ("segment_max_bytes", "checkpoint_every", "heartbeat_s", "max_pending", "retry_s"):
            if getattr(section, name, None) is not None:
                kw[name] = getattr(section, name)
        if getattr(section, "signing_key", None):
            kw["signing_key"] = path(section.signing_key)
        kw.update(overrides)
        return cls(path(getattr(section, "dir", "audit/")), **kw)

    # ------------------------------------------------------------------ public state

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def reason(self) -> str | None:
        """Why the log is not healthy (for /readyz), None when it is."""
        return self._reason

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def head(self) -> str:
        return self._head

    @property
    def chain_id(self) -> str:
        return self._chain_id

    @property
    def segment_path(self) -> Path:
        return self.dir / segment_name(self.worker, self._seg_index)

    @property
    def pending(self) -> int:
        return self._buf_lines

    # ------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Continue this worker's chain in ``dir`` (or begin one) and write the opening checkpoint.

        Raises AuditLogCorrupt when the last complete line of the chain is unreadable,
        AuditLogInUse when another process holds this worker's chain, and OSError when the
        directory or segment cannot be created. A failure to write the
        opening checkpoint does not raise: the log starts unhealthy and keeps retrying.
        """
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._resume()
            self._fd = os.open(self.segment_path, _OPEN_FLAGS, 0o640)
        except BaseException:
            os.close(self._lock_fd)  # type: ignore[arg-type]
            self._lock_fd = None
            raise
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"audit-w{self.worker}")
        if self.fsync != "never":
            self._executor.submit(_fsync_dir, self.dir)
        self._started = True
        self._reason = "audit log starting"
        self._last_sync = time.monotonic()
        await self._recover()
        self._tasks = [self._loop.create_task(self._run(), name="audit-writer")]
        if self.heartbeat_s is not None:
            self._tasks.append(self._loop.create_task(self._heartbeat(), name="audit-heartbeat"))
        if self.fsync == "interval":
            self._tasks.append(self._loop.create_task(self._sync_loop(), name="audit-fsync"))

    async def close(self) -> None:
        """Write everything pending and a closing checkpoint, fsync (unless ``never``), close."""
        if not self._started or self._closed:
            return
        self._closing = True
        if self._healthy:
            self._chain_checkpoint("close")
        if self._space is not None:
            self._space.set()
        self._wake()
        writer, others = self._tasks[0], self._tasks[1:]
        for t in others:
            t.cancel()
        await asyncio.gather(writer, *others, return_exceptions=True)
        fd, self._fd = self._fd, None
        assert self._loop is not None and self._executor is not None
        if fd is not None:
            try:
                await self._loop.run_in_executor(self._executor, _sync_close, fd, self.fsync != "never")
            except OSError:
                pass  # NOTE: nothing left to fail closed for; the chain on disk is what verify sees.
        self._executor.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._closed = True
        self._healthy = False
        self._reason = "audit log closed"

    # ------------------------------------------------------------------ the hot path

    async def append(self, record: dict) -> int:
        """Chain ``record`` and return its seq once it has been written to the file (reached the OS;
        also fsynced when fsync is ``always``). Raises AuditUnavailable when it cannot be."""
        if self._closing or not self._healthy:
            raise self._refuse()
        if self._buf_lines >= self.max_pending:
            await self._wait_space()
        seq = self._chain_record(record)
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._futs.append(fut)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        await fut
        return seq

    def append_nowait(self, record: dict) -> int:
        """Chain ``record`` without waiting for the write (for outcome records). Raises
        AuditUnavailable at once when the log is down or the queue is full; a later write
        failure drops it (counted in stats["lost"] and in the recovery checkpoint)."""
        if self._closing or not self._healthy:
            raise self._refuse()
        if self._buf_lines >= self.max_pending:
            self.stats["refused"] += 1
            raise AuditUnavailable(f"audit queue full ({self.max_pending} records pending)")
        seq = self._chain_record(record)
        self._wake()
        return seq

    async def flush(self) -> None:
        """Chain any checkpoint that is due, then wait until everything chained so far is written."""
        if not self._healthy:
            raise AuditUnavailable(self._reason or "audit log is closed")
        self.tick()
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._futs.append(fut)
        self._wake()
        await fut

    async def checkpoint(self, reason: str = "manual") -> int:
        """Chain a checkpoint now and wait for it to be written; returns its seq."""
        if self._closing or not self._healthy:
            raise AuditUnavailable(self._reason or "audit log is closing")
        seq = self._chain_checkpoint(reason)
        await self.flush()
        return seq

    def _refuse(self) -> AuditUnavailable:
        self.stats["refused"] += 1
        self._outage_refused += 1
        return AuditUnavailable(self._reason or "audit log is closing")

    def tick(self) -> None:
        """Chain a heartbeat checkpoint if one is due by the clock (the heartbeat task calls this)."""
        if self._healthy and not self._closing and self._clock() - self._last_cp_ts >= self._hb:
            self._chain_checkpoint("heartbeat")
            self._wake()

    # --------------------------------------------------------------------- chaining

    def _chain_record(self, record: dict) -> int:
        rec = dict(record)
        rec.pop("hash", None)
        if rec.get("kind") == "checkpoint":
            raise ValueError("audit record kind 'checkpoint' is reserved for the writer")
        # A checkpoint that is due goes in before this record, so every record lies within
        # heartbeat_s of the checkpoint before it (verify relies on that), and no more than
        # checkpoint_every records follow a checkpoint.
        now = self._clock()
        if self._since_cp >= self.checkpoint_every:
            self._chain_checkpoint("count")
        elif now - self._last_cp_ts >= self._hb:
            self._chain_checkpoint("heartbeat")
        ts = rec.get("ts")
        if ts is None:
            rec["ts"] = now
        elif (type(ts) is not float and type(ts) is not int) or not -1e8 < ts - now < 1e8:
            # verify compares ts with checkpoint times: a ts in ms, ns or from a monotonic
            # clock would read as a missing checkpoint (or hide one).
            raise ValueError(f"audit record ts must be seconds since the epoch (time.time()), got {ts!r}")
        seq = self._seq + 1
        rec["seq"] = seq
        rec["prev"] = self._head
        rec["chain"] = self._chain_id
        canon = orjson.dumps(rec, option=_SORT)  # TypeError for a non-JSON value: nothing chained
        digest = _sha256(RECORD_TYPE + canon).hexdigest()
        buf = self._buf
        buf += canon
        buf[-1] = 44  # ','
        buf += b'"hash":"'
        buf += digest.encode()
        buf += b'"}\n'
        self._seq = seq
        self._head = digest
        self._since_cp += 1
        self._buf_lines += 1
        self._buf_records += 1
        return seq

    def _chain_checkpoint(self, reason: str, **extra: Any) -> int:
        ts = self._clock()
        seq = self._seq + 1
        cp: dict[str, Any] = {
            "kind": "checkpoint", "seq": seq, "prev": self._head, "chain": self._chain_id,
            "worker": self.worker, "ts": ts, "reason": reason, "count": seq - 1,
            "records": self._since_cp, "heartbeat_s": self.heartbeat_s, "every": self.checkpoint_every,
            "key": self.key_fingerprint, "pub": self._pub_b64,
        }
        cp.update(extra)
        cp["sig"] = None
        if self._key is not None:
            cp["sig"] = base64.b64encode(self._key.sign(signed_bytes(cp))).decode()
        canon, digest = line_hash(cp)
        self._buf += encode_line(canon, digest)
        self._seq = seq
        self._head = digest
        self._last_cp_ts = ts
        self._since_cp = 0
        self._buf_lines += 1
        self._buf_cps += 1
        return seq

    def _snapshot(self) -> tuple:
        return (self._seq, self._head, self._last_cp_ts, self._since_cp)

    def _restore(self, snap: tuple) -> None:
        self._seq, self._head, self._last_cp_ts, self._since_cp = snap

    def _take(self) -> tuple[bytearray, list, int, int]:
        buf, futs, nrec, ncp = self._buf, self._futs, self._buf_records, self._buf_cps
        self._buf, self._futs = bytearray(), []
        self._buf_lines = self._buf_records = self._buf_cps = 0
        if self._space is not None:
            self._space.set()
        return buf, futs, nrec, ncp

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_space(self) -> None:
        while self._buf_lines >= self.max_pending:
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            await self._space.wait()
            if self._closing or not self._healthy:
                raise AuditUnavailable(self._reason or "audit log is closing")

    # -------------------------------------------------------------- resume / files

    def _lock(self) -> None:
        # Two writers on one chain would interleave lines and fork it: one per worker index.
        path = self.dir / f".audit-w{self.worker}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditLogInUse(f"{path}: another process is writing audit chain w{self.worker}; "
                                "give each worker its own index") from None
        self._lock_fd = fd

    def _resume(self) -> None:
        """Find where this worker's chain ends and continue it; a torn last line is cut off."""
        segs = list_segments(self.dir).get(self.worker, [])
        self._chain_id = secrets.token_hex(8)
        self._open_extra = {"resumed": False}
        if not segs:
            return
        self._seg_index = segs[-1][0]
        torn_total = 0
        for _, path in reversed(segs):
            line, good_len, torn = _last_line(path)
            if torn:
                # A line without its newline was being written when the process died; its
                # caller was never answered, so dropping it loses no acknowledged call. The
                # bytes are kept beside the segment for inspection.
                with open(f"{path}.torn", "ab") as f:
                    f.write(torn)
                os.truncate(path, good_len)
                torn_total += len(torn)
            if line is None:
                continue
            try:
                d = orjson.loads(line)
                digest = d.pop("hash")
                _, expect = line_hash(d)
                ok = digest == expect and isinstance(d.get("seq"), int) and isinstance(d.get("chain"), str)
            except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise AuditLogCorrupt(
                    f"{path}: the last line of audit chain w{self.worker} is not a valid record; "
                    f"run `regate audit verify {self.dir}` and move this worker's segments aside "
                    "to start a new chain")
            self._chain_id, self._seq, self._head = d["chain"], d["seq"], digest
            closed = d.get("kind") == "checkpoint" and d.get("reason") == "close"
            self._open_extra = {"resumed": True, "crashed": not closed, "torn_bytes": torn_total}
            break
        self._offset = self.segment_path.stat().st_size
        self._good = self._snapshot()

    def _maybe_rotate(self, incoming: int) -> None:
        if self._offset == 0 or self._offset + incoming <= self.segment_max_bytes:
            return
        path = self.dir / segment_name(self.worker, self._seg_index + 1)
        fd = os.open(path, _OPEN_FLAGS, 0o640)
        old, self._fd = self._fd, fd
        self._seg_index += 1
        self._offset = 0
        assert self._loop is not None and self._executor is not None
        fut = self._loop.run_in_executor(self._executor, _sync_close, old, self.fsync != "never")
        fut.add_done_callback(self._after_rotate_close)
        if self.fsync != "never":
            self._executor.submit(_fsync_dir, self.dir)

    def _after_rotate_close(self, fut: asyncio.Future) -> None:
        e = None if fut.cancelled() else fut.exception()
        if isinstance(e, OSError) and self._healthy:
            self._fail(e)

    def _write(self, buf: bytearray) -> None:
        """Write ``buf`` whole at the end of the segment, or leave the file as it was and raise."""
        if self._need_truncate:
            os.ftruncate(self._fd, self._offset)  # type: ignore[arg-type]
            self._need_truncate = False
        self._maybe_rotate(len(buf))
        view = memoryview(buf)
        done = 0
        try:
            while done < len(buf):
                n = os.write(self._fd, view[done:])  # type: ignore[arg-type]
                if n <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                done += n
        except OSError:
            if done:
                # A short write left part of a line: cut back to the last complete line so
                # the next record chains onto what is really in the file.
                try:
                    os.ftruncate(self._fd, self._offset)  # type: ignore[arg-type]
                except OSError:
                    self._need_truncate = True
            raise
        finally:
            view.release()
        self._offset += done

    # ---------------------------------------------------------------------- failure

    def _fail(self, e: OSError | str, futs: Iterable[asyncio.Future] = (), lost: int = 0) -> None:
        """Go unhealthy: fail ``futs`` and everything pending, undo the chain to the last good line."""
        reason = e if isinstance(e, str) else _describe(e, self.segment_path)
        self._healthy = False
        self._reason = reason
        self.stats["write_errors"] += 1
        if self._outage_since is None:
            self._outage_since = self._clock()
        _, pending, nrec, _ = self._take()
        lost += nrec
        self._outage_lost += lost
        self.stats["lost"] += lost
        self._restore(self._good)
        for f in (*futs, *pending):
            if not f.done():
                self._outage_refused += 1
                self.stats["refused"] += 1
                f.set_exception(AuditUnavailable(reason))
        self._wake()  # the writer may be idle: it must start probing

    async def _recover(self) -> None:
        """Probe by writing a checkpoint ("open" the first time, then "recover")."""
        if self._opened:
            # lost: chained but never written (their waiting callers were refused, outcome
            # records from append_nowait are gone); refused: appends answered AuditUnavailable.
            extra = {"outage_s": round(self._clock() - (self._outage_since or self._clock()), 6),
                     "lost": self._outage_lost, "refused": self._outage_refused, "error": self._reason}
            self._chain_checkpoint("recover", **extra)
        else:
            self._chain_checkpoint("open", **self._open_extra)
        buf, _, _, ncp = self._take()
        try:
            self._write(buf)
        except OSError as e:
            self._restore(self._good)
            self._reason = _describe(e, self.segment_path)
            self.stats["write_errors"] += 1
            return
        self._good = self._snapshot()
        self.stats["checkpoints"] += ncp
        self.stats["bytes"] += len(buf)
        if self.fsync != "never":
            try:
                await self._loop.run_in_executor(self._executor, _fsync, self._fd)  # type: ignore[union-attr]
                self.stats["fsyncs"] += 1
            except OSError as e:
                self._reason = _describe(e, self.segment_path)
                return
        if self._opened:
            self.stats["recoveries"] += 1
        self._opened = True
        self._healthy = True
        self._reason = None
        self._outage_since = None
        self._outage_lost = 0
        self._outage_refused = 0

    # ------------------------------------------------------------------------ tasks

    async def _run(self) -> None:
        """The writer: one write per batch of whatever was chained since the last one."""
        loop = self._loop
        assert loop is not None
        while True:
            if not self._healthy:
                if self._closing:
                    return
                await self._pause(self.retry_s)
                if self._closing:
                    return
                await self._recover()
                continue
            if not self._buf and not self._futs:
                if self._closing:
                    return
                self._waiter = loop.create_future()
                await self._waiter
                self._waiter = None
                continue
            await self._commit()

    async def _commit(self) -> None:
        buf, futs, nrec, ncp = self._take()
        if buf:
            try:
                self._write(buf)
            except OSError as e:
                self._fail(e, futs, nrec)
                return
            self._good = self._snapshot()
            st = self.stats
            st["records"] += nrec
            st["checkpoints"] += ncp
            st["batches"] += 1
            st["bytes"] += len(buf)
            if self.fsync == "always":
                try:
                    await self._loop.run_in_executor(self._executor, _fsync, self._fd)  # type: ignore[union-attr]
                    st["fsyncs"] += 1
                except OSError as e:
                    # The batch is in the file but maybe not on disk: its callers are refused.
                    self._fail(e, futs)
                    return
            elif self.fsync == "interval" and not self._dirty:
                self._dirty = True
                w = self._dirty_waiter
                if w is not None and not w.done():
                    w.set_result(None)
        for f in futs:
            if not f.done():
                f.set_result(None)

    async def _pause(self, seconds: float) -> None:
        loop = self._loop
        assert loop is not None
        self._waiter = loop.create_future()
        handle = loop.call_later(seconds, self._wake)
        try:
            await self._waiter
        finally:
            handle.cancel()
            self._waiter = None

    async def _heartbeat(self) -> None:
        while True:
            if self._healthy:
                self.tick()
                delay = self._last_cp_ts + self._hb - self._clock()
            else:
                delay = self.retry_s
            await asyncio.sleep(min(max(delay, 0.005), self._hb))

    async def _sync_loop(self) -> None:
        """fsync ``interval``: at most once per interval, only when something was written."""
        loop = self._loop
        assert loop is not None
        while True:
            if not self._dirty:
                self._dirty_waiter = loop.create_future()
                await self._dirty_waiter
                self._dirty_waiter = None
            delay = self._last_sync + self.interval_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._dirty = False
            fd = self._fd
            if fd is None:
                return
            try:
                await loop.run_in_executor(self._executor, _fsync, fd)
                self.stats["fsyncs"] += 1
            except OSError as e:
                if self._healthy:
                    self._fail(e)
            self._last_sync = time.monotonic()


def _sync_close(fd: int, sync: bool) -> None:
    try:
        if sync:
            _fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # The directory entry of a new segment must be durable too, not only its bytes.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # NOTE: some filesystems refuse fsync on a directory; the data fsync still happens.
    finally:
        os.close(fd)
