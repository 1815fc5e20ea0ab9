"""Reading audit chains back: ``verify`` (tamper evidence), ``tail`` (watching), ``keygen``.

``verify`` walks every segment of every worker's chain in order and checks each line's hash
and canonical form, each ``prev`` link, sequence continuity, the chain id, checkpoint
signatures against the trusted key, and the heartbeat rules below. It reports OK with counts,
or the first bad line of each chain with one diagnosis:

- ``edited``: a line's bytes do not hash to its ``hash`` (or are not canonical), or a line was
  replaced so the next ``prev`` does not match.
- ``deleted``: a sequence gap (lines or whole segments missing).
- ``reordered``: a line whose seq is behind, or whose missing predecessor appears later.
- ``spliced``: a line from another chain (other chain id or worker), or anything after a
  closing checkpoint other than the next run's opening checkpoint.
- ``forged checkpoint``: unsigned while a key is required, signed by a key that is not the
  trusted one, or (no trusted key given) by a key other than the one this chain started with.
- ``rewritten chain``: hashes and links all hold but a checkpoint's signature does not: the
  lines before it were rewritten with fresh hashes (only the key holder can re-sign).
- ``missing checkpoint``: see the heartbeat rules.
- ``truncated``: a torn last line (a crash mid-write). A warning, not tampering: the writer
  cuts it off on restart, keeping the bytes in ``<segment>.torn``, and its caller was never
  answered. A torn line anywhere but the end of the chain is an error (``deleted``).

Heartbeat rules. The writer chains a checkpoint before any record that would come more than
``heartbeat_s`` after the previous checkpoint, after every ``every`` records, and on its
heartbeat timer when idle; a clean shutdown ends with a ``close`` checkpoint. So:
(A) a record whose ``ts`` is more than heartbeat_s + slack after the checkpoint before it, or
the ``every``+1-th record after a checkpoint, is a missing checkpoint (someone appended
records the writer did not write); (B) a chain that does not end with a ``close`` checkpoint
whose last checkpoint is more than heartbeat_s + slack older than ``now`` is a missing
checkpoint: its tail was dropped, or the writer died and never restarted (a writer that
restarts continues the chain with an ``open`` checkpoint marked ``crashed``, which is fine).
Dropping the tail after checkpoint K is therefore caught once ``now`` is past K + T + slack.
What no rule can catch: a tail dropped back to an earlier *clean* close (a run that ended
there), or records appended within T of the last checkpoint of a chain that is still open;
ship checkpoints off the machine to close those. ``allow_open`` turns (B) into a warning for
a chain known to have crashed without a restart.

Keys: with ``public_key`` every checkpoint must be signed by it. Without, a signed chain is
checked against the public key embedded in its first checkpoint (trust on first use): a
careless rewrite is caught, a chain re-signed throughout with another key is not. An unsigned
chain (no signing key configured) gets hash, link, sequence and heartbeat checks only; a
rewrite of the whole chain with fresh hashes cannot be detected, and verify says so.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit import (
    CHECKPOINT_REASONS,
    GENESIS,
    encode_line,
    fingerprint,
    keygen,
    line_hash,
    list_segments,
    load_public_key,
    signed_bytes,
)

EDITED = "edited"
DELETED = "deleted"
REORDERED = "reordered"
TRUNCATED = "truncated"
SPLICED = "spliced"
FORGED = "forged checkpoint"
REWRITTEN = "rewritten chain"
MISSING_CHECKPOINT = "missing checkpoint"
NO_LOG = "no log"
# Warnings only.
OPEN = "open"
CRASHED = "crashed"
UNSIGNED = "unsigned"
UNTRUSTED = "no trusted key"
KEY_CHANGED = "key changed"
LATE_HEARTBEAT = "late heartbeat"
NO_HEARTBEAT = "no heartbeat"
OUTAGE = "outage"

_CHAIN_RE = re.compile(rb'"chain":"([^"]*)"')


@dataclass
class Finding:
    diagnosis: str
    detail: str
    file: str | None = None
    line: int | None = None
    worker: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file and self.line else (f"{self.file}: " if self.file else "")
        return f"{where}{self.diagnosis}: {self.detail}"


@dataclass
class ChainSummary:
    worker: int
    chain: str | None = None
    segments: list[int] = field(default_factory=list)
    lines: int = 0
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_ts: float | None = None
    last_ts: float | None = None
    closed: bool = False
    keys: list[str] = field(default_factory=list)
    torn: bool = False


@dataclass
class Report:
    directory: str
    chains: list[ChainSummary] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def error(self) -> Finding | None:
        return self.errors[0] if self.errors else None

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)

    @property
    def checkpoints(self) -> int:
        return sum(c.checkpoints for c in self.chains)

    def format(self) -> str:
        head = "OK" if self.ok else "FAIL"
        segs = sum(len(c.segments) for c in self.chains)
        out = [f"{head}  {self.directory}: {len(self.chains)} chain(s), {segs} segment(s), "
               f"{self.records:,} records, {self.checkpoints:,} checkpoints"]
        for c in self.chains:
            span = f"seq {c.first_seq}-{c.last_seq}" if c.first_seq is not None else "empty"
            when = f"{_iso(c.first_ts)} .. {_iso(c.last_ts)}" if c.first_ts is not None else ""
            keys = f"signed by {', '.join(c.keys)}" if c.keys else "unsigned"
            state = "closed" if c.closed else "open"
            out.append(f"  w{c.worker}  chain {c.chain}  segments {_ranges(c.segments)}  {span}  "
                       f"{when}  {keys}  {state}")
        for f in self.errors:
            out.append(f"error: {f}")
        for f in self.warnings:
            out.append(f"warning: {f}")
        return "\n".join(out)


def _ranges(nums: Sequence[int]) -> str:
    if not nums:
        return "-"
    return f"{nums[0]}" if len(nums) == 1 else f"{nums[0]}-{nums[-1]}"


def _iso(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return str(ts)
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):
        return str(ts)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Bad(Exception):
    def __init__(self, diagnosis: str, detail: str) -> None:
        self.diagnosis, self.detail = diagnosis, detail


class _ChainCheck:
    """One worker's chain, walked line by line; stops at the first bad line."""

    def __init__(self, worker: int, segments: list[tuple[int, Path]], trusted: dict[str, Ed25519PublicKey] | None,
                 now: float, slack_s: float | None, allow_open: bool) -> None:
        self.worker = worker
        self.segments = segments
        self.trusted = trusted
        self.now = now
        self.slack_s = slack_s
        self.allow_open = allow_open
        self.summary = ChainSummary(worker=worker, segments=[i for i, _ in segments])
        self.warnings: list[Finding] = []
        self.error: Finding | None = None
        self.chain_id: str | None = None
        self.expected = 1
        self.head = GENESIS
        self.since_cp = 0
        self.last_cp: dict | None = None
        self.last_cp_at: tuple[str, int] | None = None
        self.tofu_key: str | None = None
        self.closed = False
        self.unsigned_warned = False

    def slack(self, hb: float) -> float:
        return self.slack_s if self.slack_s is not None else max(5.0, 0.25 * hb)


    def run(self) -> None:
        try:
            self._walk()
        except _Bad as b:  # pragma: no cover - every _Bad is caught per line
            self.error = Finding(b.diagnosis, b.detail, worker=self.worker)

    def _walk(self) -> None:
        if not self.segments:
            return
        self.chain_id = self._majority_chain(self.segments[0][1])
        prev_index = 0
        last_file, last_line = self.segments[0][1].name, 0
        for pos, (index, path) in enumerate(self.segments):
            name = path.name
            if index != prev_index + 1:
                what = (f"segments {prev_index + 1}-{index - 1} are missing" if index - 1 > prev_index + 1
                        else f"segment {prev_index + 1} is missing")
                if prev_index == 0:
                    what = f"the chain's first segments are missing (it starts at segment {index})"
                self.error = Finding(DELETED, what, name, 1, self.worker)
                return
            prev_index = index
            data = path.read_bytes()
            lines = data.split(b"\n")
            rest = lines.pop()
            for lineno, raw in enumerate(lines, 1):
                try:
                    self._line(raw, pos, lineno)
                except _Bad as b:
                    self.error = Finding(b.diagnosis, b.detail, name, lineno, self.worker)
                    return
            last_file, last_line = name, len(lines)
            if rest:
                if pos == len(self.segments) - 1:
                    self.summary.torn = True
                    self.warnings.append(Finding(
                        TRUNCATED, f"torn tail (crash): the last line is incomplete ({len(rest)} bytes, no "
                        "newline); it was never acknowledged and is not tampering", name, len(lines) + 1, self.worker))
                else:
                    self.error = Finding(
                        DELETED, f"the segment ends mid-line ({len(rest)} bytes) but the chain continues in "
                        f"{self.segments[pos + 1][1].name}: bytes were cut out", name, len(lines) + 1, self.worker)
                    return
        self._end(last_file, last_line)

    @staticmethod
    def _majority_chain(path: Path) -> str | None:
        with open(path, "rb") as f:
            ids = Counter(_CHAIN_RE.findall(f.read()))
        return ids.most_common(1)[0][0].decode(errors="replace") if ids else None

    # ------------------------------------------------------------------ one line

    def _line(self, raw: bytes, pos: int, lineno: int) -> None:
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Bad(EDITED, "the line is not valid JSON (bytes were changed)")
        if not isinstance(d, dict) or not isinstance(d.get("hash"), str):
            raise _Bad(EDITED, "the line has no hash (bytes were changed)")
        digest = d.pop("hash")
        try:
            canon, expect = line_hash(d)
        except TypeError:
            raise _Bad(EDITED, "the line holds values a writer cannot produce")
        if expect != digest:
            raise _Bad(EDITED, "the line's content does not match its hash (it was modified)")
        if encode_line(canon, digest)[:-1] != raw:
            raise _Bad(EDITED, "the line is not in canonical form (bytes were added or changed)")
        seq, prev, chain = d.get("seq"), d.get("prev"), d.get("chain")
        if type(seq) is not int or not isinstance(prev, str) or not isinstance(chain, str):
            raise _Bad(SPLICED, "the line is not a Regate audit line (no seq/prev/chain)")
        if chain != self.chain_id:
            raise _Bad(SPLICED, f"the line belongs to another chain ({chain}; this chain is {self.chain_id})")
        if seq != self.expected or prev != self.head:
            self._broken_link(d, seq, prev, pos, lineno)
        is_cp = d.get("kind") == "checkpoint"
        if self.expected == 1 and not (is_cp and d.get("reason") == "open"):
            raise _Bad(SPLICED, "the chain does not begin with an opening checkpoint")
        if self.closed and not (is_cp and d.get("reason") == "open"):
            raise _Bad(SPLICED, f"a line after the closing checkpoint at {self.last_cp_at[0]}:{self.last_cp_at[1]} "  # type: ignore[index]
                       "(after close the writer only ever writes the next run's opening checkpoint)")
        if is_cp:
            self._checkpoint(d, pos, lineno)
        else:
            self._record(d)
        s = self.summary
        if s.first_seq is None:
            s.first_seq = seq
            s.chain = chain
        s.last_seq = seq
        s.lines += 1
        ts = d.get("ts")
        if _is_num(ts):
            if s.first_ts is None:
                s.first_ts = ts
            s.last_ts = ts if s.last_ts is None else max(s.last_ts, ts)
        self.expected = seq + 1
        self.head = digest

    def _broken_link(self, d: dict, seq: int, prev: str, pos: int, lineno: int) -> None:
        prev_line = f"line {lineno - 1}" if lineno > 1 else "the previous segment's last line"
        if seq == self.expected:
            raise _Bad(EDITED, f"prev does not match the hash of {prev_line}: one of the two lines was "
                       "replaced by a line with a re-computed hash")
        if prev == self.head:
            raise _Bad(EDITED, f"seq is {seq}, expected {self.expected}, yet the link holds: the seq was rewritten")
        if seq < self.expected:
            raise _Bad(REORDERED, f"seq {seq} comes after seq {self.expected - 1}: lines were moved")
        found = self._find_ahead(self.expected, pos, lineno)
        if found:
            raise _Bad(REORDERED, f"seq {seq} comes where seq {self.expected} belongs, and seq {self.expected} "
                       f"appears later ({found}): lines were moved")
        missing = f"seq {self.expected}" if seq == self.expected + 1 else f"seq {self.expected}-{seq - 1}"
        raise _Bad(DELETED, f"{missing} missing before this line: lines were deleted")

    def _find_ahead(self, want: int, pos: int, lineno: int) -> str | None:
        for p in range(pos, len(self.segments)):
            path = self.segments[p][1]
            lines = path.read_bytes().split(b"\n")
            start = lineno if p == pos else 0
            for i in range(start, len(lines)):
                try:
                    d = orjson.loads(lines[i])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(d, dict) and d.get("seq") == want and d.get("chain") == self.chain_id:
                    return f"{path.name}:{i + 1}"
        return None

    # --------------------------------------------------------- records, checkpoints

    def _record(self, d: dict) -> None:
        cp = self.last_cp
        assert cp is not None  # the first line is an opening checkpoint
        self.since_cp += 1
        every = cp.get("every")
        if type(every) is int and self.since_cp > every:
            raise _Bad(MISSING_CHECKPOINT, f"{self.since_cp} records since the checkpoint at {self._cp_at()}; the "
                       f"writer checkpoints every {every}: records were appended by something other than the writer")
        hb, ts, cts = cp.get("heartbeat_s"), d.get("ts"), cp.get("ts")
        if type(ts) is float and type(hb) is float and type(cts) is float:
            if ts - cts > hb + self.slack(hb):
                raise _Bad(MISSING_CHECKPOINT, f"no checkpoint in the {ts - cts:.1f}s before this record "
                           f"(heartbeat every {hb:g}s, last checkpoint at {self._cp_at()}): checkpoints were "
                           "removed or records were appended by something other than the writer")
        elif _is_num(hb) and _is_num(ts) and _is_num(cts) and ts - cts > hb + self.slack(hb):
            raise _Bad(MISSING_CHECKPOINT, f"no checkpoint in the {ts - cts:.1f}s before this record (heartbeat "
                       f"every {hb:g}s, last checkpoint at {self._cp_at()}): checkpoints were removed or records "
                       "were appended by something other than the writer")
        self.summary.records += 1

    def _cp_at(self) -> str:
        return f"{self.last_cp_at[0]}:{self.last_cp_at[1]}" if self.last_cp_at else "?"

    def _checkpoint(self, d: dict, pos: int, lineno: int) -> None:
        name = self.segments[pos][1].name
        reason = d.get("reason")
        if d.get("worker") != self.worker:
            raise _Bad(SPLICED, f"a checkpoint of worker {d.get('worker')} in worker {self.worker}'s chain")
        self._signature(d, reason)
        if reason not in CHECKPOINT_REASONS or not _is_num(d.get("ts")):
            raise _Bad(EDITED, "the checkpoint's reason or ts is not one the writer writes")
        # An opening checkpoint restarts the count (the new process does not know how many
        # records followed the last checkpoint of a run that crashed).
        if d.get("count") != d["seq"] - 1 or (reason != "open" and d.get("records") != self.since_cp):
            raise _Bad(EDITED, f"the checkpoint counts {d.get('records')} records since the previous "
                       f"checkpoint, the chain has {self.since_cp}")
        prev = self.last_cp
        if prev is not None and reason not in ("open", "recover"):
            hb = prev.get("heartbeat_s")
            gap = d["ts"] - prev.get("ts", d["ts"])
            if _is_num(hb) and gap > hb + self.slack(hb):
                self.warnings.append(Finding(LATE_HEARTBEAT, f"{gap:.1f}s between checkpoints (heartbeat "
                                             f"{hb:g}s): the writer's event loop was stalled", name, lineno, self.worker))
        if reason == "open" and d.get("crashed"):
            self.warnings.append(Finding(CRASHED, "the writer restarted here after a run that did not close "
                                         f"(crash or kill; {d.get('torn_bytes', 0)} torn bytes cut)", name, lineno, self.worker))
        if reason == "recover":
            self.warnings.append(Finding(OUTAGE, f"the log could not be written for "
                                         f"{d.get('outage_s')}s ({d.get('error')}): {d.get('refused')} appends refused, "
                                         f"{d.get('lost')} chained records not written",
                                         name, lineno, self.worker))
        self.last_cp = d
        self.last_cp_at = (name, lineno)
        self.since_cp = 0
        self.closed = reason == "close"
        self.summary.checkpoints += 1

    def _signature(self, d: dict, reason: Any) -> None:
        key, pub, sig = d.get("key"), d.get("pub"), d.get("sig")
        if self.trusted is not None:
            if sig is None or key is None:
                raise _Bad(FORGED, "the checkpoint is unsigned but a public key was given")
            k = self.trusted.get(key)
            if k is None:
                raise _Bad(FORGED, f"signed by key {key}, not by the trusted key {', '.join(self.trusted)}")
        else:
            if sig is None:
                if self.tofu_key is not None:
                    if reason != "open":
                        raise _Bad(FORGED, f"an unsigned checkpoint in a chain signed by {self.tofu_key}")
                    self.warnings.append(Finding(KEY_CHANGED, "signing stopped at this restart", worker=self.worker))
                    self.tofu_key = None
                return
            try:
                k = Ed25519PublicKey.from_public_bytes(base64.b64decode(pub, validate=True))
            except (TypeError, ValueError, binascii.Error):
                raise _Bad(FORGED, "the checkpoint's public key is not an Ed25519 key")
            if fingerprint(k) != key:
                raise _Bad(FORGED, "the checkpoint's public key does not match its key fingerprint")
            if self.tofu_key is not None and key != self.tofu_key:
                if reason != "open":
                    raise _Bad(FORGED, f"signed by key {key}, but this chain's checkpoints are signed by "
                               f"{self.tofu_key}")
                self.warnings.append(Finding(KEY_CHANGED, f"signing key changed at a restart to {key}", worker=self.worker))
            self.tofu_key = key
        try:
            k.verify(base64.b64decode(sig, validate=True), signed_bytes(d))
        except (InvalidSignature, TypeError, ValueError, binascii.Error):
            since = (f"after the checkpoint at {self.last_cp_at[0]}:{self.last_cp_at[1]}" if self.last_cp_at
                     else "from the start")
            raise _Bad(REWRITTEN, f"hashes and links are valid but the checkpoint's signature does not match: "
                       f"the lines {since} up to here were rewritten with fresh hashes, or this checkpoint was forged")
        if key not in self.summary.keys:
            self.summary.keys.append(key)

    # ------------------------------------------------------------------ the end

    def _end(self, last_file: str, last_line: int) -> None:
        s = self.summary
        s.closed = self.closed
        if self.last_cp is None:
            return
        if self.trusted is None and not s.keys:
            self.warnings.append(Finding(UNSIGNED, "checkpoints are unsigned (no audit signing key): hashes, links, "
                                         "sequence and heartbeats are checked, but a rewrite of the whole chain "
                                         "with fresh hashes cannot be detected", worker=self.worker))
        elif self.trusted is None:
            self.warnings.append(Finding(UNTRUSTED, "no public key given: signatures were checked against the key "
                                         "the chain itself names (pass --public-key to catch a chain re-signed "
                                         "with another key)", worker=self.worker))
        if self.closed:
            return
        cp = self.last_cp
        hb, cts = cp.get("heartbeat_s"), cp.get("ts")
        at = f"{self.last_cp_at[0]}:{self.last_cp_at[1]}"  # type: ignore[index]
        if not _is_num(hb):
            self.warnings.append(Finding(NO_HEARTBEAT, "the chain is open and heartbeats are disabled: a dropped "
                                         "tail cannot be detected", last_file, last_line + 1, self.worker))
            return
        age = self.now - cts
        if age > hb + self.slack(hb):
            f = Finding(MISSING_CHECKPOINT, f"the chain ends here without a closing checkpoint and its last "
                        f"checkpoint ({at}, {_iso(cts)}) is {age:.1f}s old, past the {hb:g}s heartbeat + "
                        f"{self.slack(hb):g}s slack: lines after it were dropped, or the writer stopped without "
                        "closing and never restarted", last_file, last_line + 1, self.worker)
            if self.allow_open:
                self.warnings.append(f)
            else:
                self.error = f
        else:
            self.warnings.append(Finding(OPEN, f"the chain is open (last checkpoint {age:.1f}s ago): the writer "
                                         "is running or stopped within the last heartbeat", last_file,
                                         last_line + 1, self.worker))


def _trusted_keys(public_key: Any) -> dict[str, Ed25519PublicKey] | None:
    if public_key is None:
        return None
    sources = public_key if isinstance(public_key, (list, tuple)) else [public_key]
    keys = [load_public_key(s) for s in sources]
    return {fingerprint(k): k for k in keys}


def verify(directory: str | os.PathLike, public_key_pem: Any = None, *, now: float | None = None,
           slack_s: float | None = None, allow_open: bool = False) -> Report:
    """Check every worker chain in ``directory``. ``public_key_pem``: a PEM path, PEM bytes, a
    key, or a list of them (trusted signers). ``now`` (default: the current time) dates the
    end-of-chain heartbeat rule; ``slack_s`` defaults to max(5 s, heartbeat/4)."""
    trusted = _trusted_keys(public_key_pem)
    now = time.time() if now is None else now
    report = Report(directory=str(directory))
    chains = list_segments(directory)
    if not chains:
        report.errors.append(Finding(NO_LOG, f"no audit segments (audit-w<N>-<index>.jsonl) in {directory}"))
        return report
    for worker in sorted(chains):
        check = _ChainCheck(worker, chains[worker], trusted, now, slack_s, allow_open)
        check.run()
        report.chains.append(check.summary)
        report.warnings.extend(check.warnings)
        if check.error is not None:
            report.errors.append(check.error)
    return report


# ---------------------------------------------------------------------------- tail


def format_record(d: dict, worker: int | None = None) -> str:
    """One line a person can read."""
    w = f"w{worker} " if worker is not None else ""
    head = f"{_iso(d.get('ts'))} {w}#{d.get('seq')}"
    if d.get("kind") == "checkpoint":
        signed = f"signed {d['key'][:12]}" if d.get("key") else "unsigned"
        return f"{head} -- checkpoint ({d.get('reason')}) count={d.get('count')} {signed}"
    kind = d.get("kind")
    verdict = (d.get("decision") or kind or "record").upper() if kind != "outcome" else "OUTCOME"
    # A call refused before identify or route has no agent or tool: say so, not "None".
    agent = d.get("agent") or "(unauthenticated)"
    tool = d.get("tool") or "(no tool)"
    parts = [head, f"{verdict:<8}", f"{agent} -> {tool}", f"{d.get('method') or ''} {d.get('path') or ''}".strip()]
    if kind == "approval":
        # proposed / approved / denied / withdrawn / executed ..., and who decided.
        parts.append(f"{d.get('event') or '?'} {d.get('approval_id') or ''}".strip())
        if d.get("approver"):
            verified = "" if d.get("approver_verified", True) else " (unverified)"
            parts.append(f"by {d['approver']}{verified}")
        if d.get("comment"):
            parts.append(f"comment: {d['comment']}")
        if d.get("reason"):
            parts.append(f"reason: {d['reason']}")
    if d.get("stage"):
        parts.append(f"[{d['stage']}]")
    if d.get("code"):
        parts.append(f"code={d['code']}")
    reasons = d.get("reasons")
    if reasons:
        parts.append("reasons: " + "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else str(reasons))
    if _is_num(d.get("added_us")):
        parts.append(f"added {d['added_us']}us")
    if d.get("upstream_status") is not None:
        up = f"upstream {d['upstream_status']}"
        if _is_num(d.get("upstream_us")):
            up += f" in {d['upstream_us'] / 1000:.1f}ms"
        parts.append(up)
    if d.get("decision_id"):
        parts.append(f"id={d['decision_id']}")
    return " ".join(parts)


def _matches(d: dict, agent: str | None, decision: str | None) -> bool:
    if agent is None and decision is None:
        return True
    if d.get("kind") == "checkpoint":
        return False
    return (agent is None or d.get("agent") == agent) and (decision is None or d.get("decision") == decision)


def _parse_lines(data: bytes) -> Iterator[dict]:
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(d, dict):
            yield d


def _ts_key(item: tuple[int, dict]) -> float:
    ts = item[1].get("ts")
    return ts if _is_num(ts) else 0.0


def tail(directory: str | os.PathLike, agent: str | None = None, decision: str | None = None,
         follow: bool = True, *, last: int | None = None, out: IO[str] | None = None, poll_s: float = 0.25,
         stop: threading.Event | None = None) -> int:
    """Print records (optionally only one agent's / one decision's) as they arrive.

    Not following: every matching record, workers merged by time. Following: the last
    ``last`` (default 10) matching records of each worker's current segment, then new ones
    as they are written, until ``stop`` is set or Ctrl-C. Returns the number printed."""
    out = out or sys.stdout
    printed = 0
    offsets: dict[Path, int] = {}
    partial: dict[Path, bytes] = {}
    # An outcome record carries only what is new; who and what come from its
    # decision record (bounded: the most recent decisions only).
    decided: dict[str, dict] = {}

    def emit(items: Iterable[tuple[int, dict]]) -> None:
        nonlocal printed
        for worker, d in items:
            kind = d.get("kind")
            if kind == "decision" and d.get("decision_id"):
                decided[d["decision_id"]] = {k: d.get(k) for k in ("agent", "tool", "method", "path", "decision")}
                if len(decided) > 100_000:
                    decided.pop(next(iter(decided)))
            elif kind == "outcome" and d.get("decision_id") in decided:
                d = {**decided[d["decision_id"]], **d}
            if _matches(d, agent, decision):
                out.write(format_record(d, worker) + "\n")
                printed += 1
        out.flush()

    segs = list_segments(directory)
    if not follow:
        per_worker = []
        for worker, files in sorted(segs.items()):
            per_worker.append(((worker, d) for _, p in files for d in _parse_lines(p.read_bytes())))
        emit(heapq.merge(*per_worker, key=_ts_key))
        return printed
    n = 10 if last is None else last
    recent: list[tuple[int, dict]] = []
    for worker, files in sorted(segs.items()):
        for _, p in files:
            offsets[p] = p.stat().st_size
        data = files[-1][1].read_bytes()
        cut = data.rfind(b"\n") + 1
        offsets[files[-1][1]] = cut
        mine = [(worker, d) for d in _parse_lines(data[:cut]) if _matches(d, agent, decision)]
        recent.extend(mine[-n:] if n else [])
    recent.sort(key=_ts_key)
    emit(recent)
    try:
        while stop is None or not stop.is_set():
            for worker, files in sorted(list_segments(directory).items()):
                for _, p in files:
                    off = offsets.get(p, 0)
                    try:
                        size = p.stat().st_size
                    except FileNotFoundError:
                        continue
                    if size < off:  # cut back (torn tail removed on restart)
                        off, partial[p] = size, b""
                    if size == off:
                        continue
                    with open(p, "rb") as f:
                        f.seek(off)
                        data = partial.pop(p, b"") + f.read(size - off)
                    offsets[p] = size
                    cut = data.rfind(b"\n") + 1
                    partial[p] = data[cut:]
                    emit((worker, d) for d in _parse_lines(data[:cut]))
            if stop is not None:
                stop.wait(poll_s)
            else:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    return printed


# ------------------------------------------------------------------ CLI entries


def cmd_verify(directory: str, public_key: str | None = None, *, now: float | None = None,
               allow_open: bool = False, slack_s: float | None = None) -> int:
    """``regate audit verify DIR [--public-key PEM]``: 0 when every chain verifies, 1 when not, 2 on bad input."""
    try:
        report = verify(directory, public_key, now=now, slack_s=slack_s, allow_open=allow_open)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def cmd_keygen(path: str) -> int:
    """``regate audit keygen PATH``: writes PATH.key (private, 0600) and PATH.pub."""
    try:
        priv, pub, fp = keygen(path)
    except (FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {priv} (private: set audit.signing_key to it, keep it secret)\n"
          f"wrote {pub} (public: give it to `regate audit verify --public-key`)\n"
          f"fingerprint {fp}")
    return 0


def cmd_tail(directory: str, agent: str | None = None, decision: str | None = None, follow: bool = True) -> int:
    """``regate audit tail DIR [--agent A] [--decision D] [--no-follow]``."""
    if not os.path.isdir(directory):
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return 2
    tail(directory, agent, decision, follow)
    return 0
