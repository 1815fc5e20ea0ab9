"""Adversarial tests of proxy.audit_verify over a corpus of logs written by the real AuditLog.

Each case copies a pristine log, mutates it the way an attacker (or a crash) would, and
asserts verify's diagnosis and the exact file and line it points at.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy import audit_verify as av
from proxy.audit import AuditLog, encode_line, fingerprint, keygen, line_hash, load_private_key, signed_bytes

T0 = 1_767_225_600.0
HB = 60.0
SLACK = 5.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(i: int) -> dict:
    deny = i % 4 == 0
    return {
        "kind": "decision", "decision_id": f"d-{i:04d}", "agent": f"agent-{i % 3}", "tool": "shell",
        "method": "POST", "path": f"/tools/shell/run/{i}",
        "body_sha256": hashlib.sha256(str(i).encode()).hexdigest(), "stage": "policy",
        "decision": "deny" if deny else "allow", "code": "policy_denied" if deny else "ok",
        "reasons": ["rm -rf is not allowed"] if deny else [], "revision": "rev-1", "added_us": 100 + i,
        "upstream_status": None if deny else 200, "upstream_us": None if deny else 1500 + i,
    }


@dataclass
class Corpus:
    root: Path
    trusted_pub: Path
    attacker: Ed25519PrivateKey
    end: float          # fake time when the signed log was closed
    crash_at: float     # fake time of the crash snapshot


async def _write(directory: Path, key, clock: FakeClock, *, n: int, seg_bytes: int = 64 << 20,
                 snapshot: tuple[int, Path] | None = None, close: bool = True) -> float:
    # 3 s between records for the first 30 (checkpoints by count, every 10), then 13 s
    # (checkpoints by heartbeat, every 5 records = 65 s >= 60 s).
    log = AuditLog(directory, signing_key=key, checkpoint_every=10, heartbeat_s=HB, fsync="never",
                   segment_max_bytes=seg_bytes, clock=clock)
    await log.start()
    crash_at = 0.0
    for i in range(n):
        clock.t += 3.0 if i < 30 else 13.0
        await log.append(record(i))
        if snapshot and i == snapshot[0]:
            await log.flush()
            shutil.copytree(directory, snapshot[1])  # the on-disk state of a crash right now
            crash_at = clock.t
    if close:
        clock.t += 1.0
        await log.close()
    return crash_at


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    priv, pub, _ = keygen(root / "trusted")
    attacker = Ed25519PrivateKey.generate()

    async def build() -> tuple[float, float]:
        clock = FakeClock()
        crash_at = await _write(root / "signed", priv, clock, n=60, snapshot=(40, root / "crashed"))
        end = clock.t
        await _write(root / "multi", priv, FakeClock(), n=60, seg_bytes=4096)
        await _write(root / "other", priv, FakeClock(T0 + 5), n=20)
        await _write(root / "unsigned", None, FakeClock(), n=30)
        return end, crash_at

    end, crash_at = asyncio.run(build())
    return Corpus(root, pub, attacker, end, crash_at)


# -------------------------------------------------------------------- mutations


SEG1 = "audit-w0-000001.jsonl"


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def parse(line: bytes) -> dict:
    return orjson.loads(line)


def reencode(d: dict) -> bytes:
    d = {k: v for k, v in d.items() if k != "hash"}
    canon, digest = line_hash(d)
    return encode_line(canon, digest)


def rechain(lines: list[bytes], start: int, *, resign: Ed25519PrivateKey | None = None,
            strip: bool = False, renumber: bool = False) -> list[bytes]:
    """What an attacker can do without the key: recompute seq, prev and hash from ``start`` on."""
    out = list(lines)
    prev = parse(out[start - 1]) if start > 0 else {"hash": "0" * 64, "seq": 0}
    for i in range(start, len(out)):
        d = parse(out[i])
        d.pop("hash")
        d["prev"] = prev["hash"]
        if renumber:
            d["seq"] = prev["seq"] + 1
        if d.get("kind") == "checkpoint" and (resign is not None or strip):
            if strip:
                d["key"] = d["pub"] = d["sig"] = None
            else:
                pub = resign.public_key()
                d["key"] = fingerprint(pub)
                d["pub"] = base64.b64encode(pub.public_bytes_raw()).decode()
                d["sig"] = base64.b64encode(resign.sign(signed_bytes(d))).decode()
        out[i] = reencode(d)
        prev = parse(out[i])
    return out


def idx(lines: list[bytes], pred: Callable[[dict], bool], nth: int = 0) -> int:
    hits = [i for i, ln in enumerate(lines) if pred(parse(ln))]
    return hits[nth]


def is_record(d: dict) -> bool:
    return d.get("kind") != "checkpoint"


def is_checkpoint(d: dict, reason: str | None = None) -> bool:
    return d.get("kind") == "checkpoint" and (reason is None or d.get("reason") == reason)


@dataclass
class Expect:
    diagnosis: str | None          # None: verify passes
    file: str | None = None
    line: int | None = None
    warning: str | None = None     # a warning diagnosis that must be present


def m_pristine(d: Path, c: Corpus) -> Expect:
    return Expect(None)


def m_edit_byte_record(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, lambda r: is_record(r) and r["decision"] == "deny", 2)
    ls[i] = ls[i].replace(b'"decision":"deny"', b'"decision":"dany"')
    p.write_bytes(b"".join(ls))
    return Expect(av.EDITED, SEG1, i + 1)


def m_edit_byte_hash(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, is_record, 7)
    pos = ls[i].rindex(b'"hash":"') + 12
    ls[i] = ls[i][:pos] + (b"0" if ls[i][pos:pos + 1] != b"0" else b"1") + ls[i][pos + 1:]
    p.write_bytes(b"".join(ls))
    return Expect(av.EDITED, SEG1, i + 1)


def m_edit_checkpoint_ts(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, lambda r: is_checkpoint(r, "heartbeat"), 1)
    ls[i] = ls[i].replace(b'"ts":17', b'"ts":18')
    p.write_bytes(b"".join(ls))
    return Expect(av.EDITED, SEG1, i + 1)


def m_edit_whitespace(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, is_record, 3)
    ls[i] = b"{ " + ls[i][1:]
    p.write_bytes(b"".join(ls))
    return Expect(av.EDITED, SEG1, i + 1)


def m_delete_record(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, is_record, 12)
    del ls[i]
    p.write_bytes(b"".join(ls))
    return Expect(av.DELETED, SEG1, i + 1)


def m_delete_checkpoint(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, lambda r: is_checkpoint(r, "count"), 2)
    del ls[i]
    p.write_bytes(b"".join(ls))
    return Expect(av.DELETED, SEG1, i + 1)


def m_delete_first_line(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    p.write_bytes(b"".join(ls[1:]))
    return Expect(av.DELETED, SEG1, 1)


def m_swap_adjacent(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, is_record, 20)
    ls[i], ls[i + 1] = ls[i + 1], ls[i]
    p.write_bytes(b"".join(ls))
    return Expect(av.REORDERED, SEG1, i + 1)


def m_swap_distant(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, is_record, 5)
    ls[i], ls[i + 6] = ls[i + 6], ls[i]
    p.write_bytes(b"".join(ls))
    return Expect(av.REORDERED, SEG1, i + 1)


def m_torn_tail(d: Path, c: Corpus) -> Expect:
    # A crash mid-write: the snapshot of a running writer, last line cut in half.
    shutil.rmtree(d)
    shutil.copytree(c.root / "crashed", d)
    p = d / SEG1
    data = p.read_bytes()
    last_start = data.rindex(b"\n", 0, len(data) - 1) + 1
    p.write_bytes(data[:last_start + (len(data) - last_start) // 2])
    n = data.count(b"\n")
    return Expect(None, SEG1, n, warning=av.TRUNCATED)


def m_crash_snapshot_is_open(d: Path, c: Corpus) -> Expect:
    shutil.rmtree(d)
    shutil.copytree(c.root / "crashed", d)
    return Expect(None, warning=av.OPEN)


def m_torn_mid_chain(d: Path, c: Corpus) -> Expect:
    shutil.rmtree(d)
    shutil.copytree(c.root / "multi", d)
    p = d / SEG1
    data = p.read_bytes()
    p.write_bytes(data[:-40])
    return Expect(av.DELETED, SEG1, data.count(b"\n"))


def m_delete_segment(d: Path, c: Corpus) -> Expect:
    shutil.rmtree(d)
    shutil.copytree(c.root / "multi", d)
    (d / "audit-w0-000002.jsonl").unlink()
    return Expect(av.DELETED, "audit-w0-000003.jsonl", 1)


def m_edit_in_later_segment(d: Path, c: Corpus) -> Expect:
    shutil.rmtree(d)
    shutil.copytree(c.root / "multi", d)
    p = d / "audit-w0-000003.jsonl"
    ls = lines_of(p)
    i = idx(ls, is_record, 1)
    ls[i] = ls[i].replace(b'"agent":"agent-', b'"agent":"agenT-')
    p.write_bytes(b"".join(ls))
    return Expect(av.EDITED, "audit-w0-000003.jsonl", i + 1)


def m_splice_insert(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    other = lines_of(c.root / "other" / SEG1)
    i = idx(ls, is_record, 15)
    ls[i:i] = other[4:6]
    p.write_bytes(b"".join(ls))
    return Expect(av.SPLICED, SEG1, i + 1)


def m_splice_replace(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    other = lines_of(c.root / "other" / SEG1)
    i = idx(ls, is_record, 9)
    ls[i] = other[i]  # same position, same seq, another chain
    p.write_bytes(b"".join(ls))
    return Expect(av.SPLICED, SEG1, i + 1)


def m_append_after_close(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    last = parse(ls[-1])
    fake = record(999) | {"decision": "allow", "seq": last["seq"] + 1, "prev": last["hash"],
                          "chain": last["chain"], "ts": last["ts"] + 1}
    ls.append(reencode(fake))
    p.write_bytes(b"".join(ls))
    return Expect(av.SPLICED, SEG1, len(ls))


def m_drop_tail_after_checkpoint(d: Path, c: Corpus) -> Expect:
    # The truncation attack: keep everything up to a genuine signed checkpoint K, drop the rest.
    p = d / SEG1
    ls = lines_of(p)
    ks = [i for i, ln in enumerate(ls) if is_checkpoint(parse(ln)) and parse(ln)["ts"] < c.end - 2 * HB]
    k = ks[-1]
    p.write_bytes(b"".join(ls[:k + 1]))
    return Expect(av.MISSING_CHECKPOINT, SEG1, k + 2)


def m_drop_tail_after_record(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, is_record, 30)
    p.write_bytes(b"".join(ls[:i + 1]))
    return Expect(av.MISSING_CHECKPOINT, SEG1, i + 2)


def m_drop_close_only(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    p.write_bytes(b"".join(ls[:-1]))
    return Expect(av.MISSING_CHECKPOINT, SEG1, len(ls))


def m_drop_close_only_soon(d: Path, c: Corpus) -> Expect:
    m_drop_close_only(d, c)
    return Expect(None, warning=av.OPEN)


def m_append_late_records_to_open_chain(d: Path, c: Corpus) -> Expect:
    # Someone extends a crashed chain with records dated after the heartbeat was due.
    shutil.rmtree(d)
    shutil.copytree(c.root / "crashed", d)
    p = d / SEG1
    ls = lines_of(p)
    last_cp = parse(ls[idx(ls, is_checkpoint, -1)])
    last = parse(ls[-1])
    fake = record(998) | {"seq": last["seq"] + 1, "prev": last["hash"], "chain": last["chain"],
                          "ts": last_cp["ts"] + HB + SLACK + 1}
    ls.append(reencode(fake))
    p.write_bytes(b"".join(ls))
    return Expect(av.MISSING_CHECKPOINT, SEG1, len(ls))


def m_too_many_records_after_checkpoint(d: Path, c: Corpus) -> Expect:
    # Records inserted and the chain re-numbered and re-hashed: only the every-N rule objects
    # before the next signature does.
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, lambda r: is_checkpoint(r, "count"), 1)
    ls[i + 1:i + 1] = [reencode(parse(ls[i + 1]) | {"decision_id": f"x{j}"}) for j in range(11)]
    p.write_bytes(b"".join(rechain(ls, i + 1, renumber=True)))
    return Expect(av.MISSING_CHECKPOINT, SEG1, i + 12)


def m_forge_checkpoint_other_key(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = lines_of(p)
    k = idx(ls, lambda r: is_checkpoint(r, "heartbeat"), 1)
    d_ = parse(ls[k])
    d_.pop("hash")
    pub = c.attacker.public_key()
    d_["key"] = fingerprint(pub)
    d_["pub"] = base64.b64encode(pub.public_bytes_raw()).decode()
    d_["sig"] = base64.b64encode(c.attacker.sign(signed_bytes(d_))).decode()
    ls[k] = reencode(d_)
    ls = rechain(ls, k + 1)
    p.write_bytes(b"".join(ls))
    return Expect(av.FORGED, SEG1, k + 1)


def m_rewrite_chain(d: Path, c: Corpus) -> Expect:
    # Flip a deny to allow and re-hash everything after it: every hash and link is valid.
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, lambda r: is_record(r) and r["decision"] == "deny", 4)
    r = parse(ls[i]) | {"decision": "allow", "code": "ok", "reasons": []}
    ls[i] = reencode(r)
    ls = rechain(ls, i + 1)
    p.write_bytes(b"".join(ls))
    k = next(j for j in range(i, len(ls)) if is_checkpoint(parse(ls[j])))
    return Expect(av.REWRITTEN, SEG1, k + 1)


def m_rewrite_and_resign(d: Path, c: Corpus) -> Expect:
    # The same, re-signed throughout with the attacker's own key: only a trusted key catches it.
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, lambda r: is_record(r) and r["decision"] == "deny", 4)
    ls[i] = reencode(parse(ls[i]) | {"decision": "allow"})
    ls = rechain(ls, 0, resign=c.attacker)
    p.write_bytes(b"".join(ls))
    return Expect(av.FORGED, SEG1, 1)


def m_strip_signatures(d: Path, c: Corpus) -> Expect:
    p = d / SEG1
    ls = rechain(lines_of(p), 0, strip=True)
    p.write_bytes(b"".join(ls))
    return Expect(av.FORGED, SEG1, 1)


def m_unsigned_pristine(d: Path, c: Corpus) -> Expect:
    shutil.rmtree(d)
    shutil.copytree(c.root / "unsigned", d)
    return Expect(None, warning=av.UNSIGNED)


def m_unsigned_edit(d: Path, c: Corpus) -> Expect:
    shutil.rmtree(d)
    shutil.copytree(c.root / "unsigned", d)
    p = d / SEG1
    ls = lines_of(p)
    i = idx(ls, is_record, 4)
    ls[i] = ls[i].replace(b'"tool":"shell"', b'"tool":"shelL"')
    p.write_bytes(b"".join(ls))
    return Expect(av.EDITED, SEG1, i + 1)


def m_unsigned_rewrite(d: Path, c: Corpus) -> Expect:
    # Known limit: without a signing key a rewrite with fresh hashes cannot be told apart.
    shutil.rmtree(d)
    shutil.copytree(c.root / "unsigned", d)
    m_rewrite_chain(d, c)
    return Expect(None, warning=av.UNSIGNED)


def m_rewrite_and_resign_unchecked(d: Path, c: Corpus) -> Expect:
    # Known limit: re-signed throughout with another key passes without --public-key.
    m_rewrite_and_resign(d, c)
    return Expect(None, warning=av.UNTRUSTED)


def m_other_worker_file(d: Path, c: Corpus) -> Expect:
    # A second worker's chain is checked on its own; copying worker 0's segment in as worker 1
    # is fine (it is a complete chain) but its checkpoints name worker 0.
    shutil.copy(d / SEG1, d / "audit-w1-000001.jsonl")
    return Expect(av.SPLICED, "audit-w1-000001.jsonl", 1)


TRUSTED = "trusted"
TOFU = "tofu"

# (mutation, key mode, verify at: "end" | "crash")
CASES = [
    (m_pristine, TRUSTED, "end"),
    (m_pristine, TOFU, "end"),
    (m_pristine, TRUSTED, "later"),
    (m_edit_byte_record, TRUSTED, "end"),
    (m_edit_byte_hash, TRUSTED, "end"),
    (m_edit_checkpoint_ts, TRUSTED, "end"),
    (m_edit_whitespace, TRUSTED, "end"),
    (m_delete_record, TRUSTED, "end"),
    (m_delete_checkpoint, TRUSTED, "end"),
    (m_delete_first_line, TRUSTED, "end"),
    (m_swap_adjacent, TRUSTED, "end"),
    (m_swap_distant, TRUSTED, "end"),
    (m_torn_tail, TRUSTED, "crash"),
    (m_crash_snapshot_is_open, TRUSTED, "crash"),
    (m_torn_mid_chain, TRUSTED, "end"),
    (m_delete_segment, TRUSTED, "end"),
    (m_edit_in_later_segment, TRUSTED, "end"),
    (m_splice_insert, TRUSTED, "end"),
    (m_splice_replace, TRUSTED, "end"),
    (m_append_after_close, TRUSTED, "end"),
    (m_drop_tail_after_checkpoint, TRUSTED, "end"),
    (m_drop_tail_after_record, TRUSTED, "end"),
    (m_drop_close_only_soon, TRUSTED, "end"),   # within the heartbeat window: not yet detectable
    (m_drop_close_only, TRUSTED, "later"),
    (m_append_late_records_to_open_chain, TRUSTED, "crash"),
    (m_too_many_records_after_checkpoint, TOFU, "end"),
    (m_forge_checkpoint_other_key, TRUSTED, "end"),
    (m_forge_checkpoint_other_key, TOFU, "end"),
    (m_rewrite_chain, TRUSTED, "end"),
    (m_rewrite_chain, TOFU, "end"),
    (m_rewrite_and_resign, TRUSTED, "end"),
    (m_strip_signatures, TRUSTED, "end"),
    (m_unsigned_pristine, None, "end"),
    (m_unsigned_edit, None, "end"),
    (m_unsigned_rewrite, None, "end"),
    (m_rewrite_and_resign_unchecked, TOFU, "end"),
    (m_other_worker_file, TRUSTED, "end"),
]


@pytest.mark.parametrize("mutate,keys,at", CASES,
                         ids=[f"{m.__name__[2:]}-{k}" for m, k, _ in CASES])
def test_verify_diagnoses(corpus: Corpus, tmp_path: Path, mutate, keys, at) -> None:
    d = tmp_path / "log"
    shutil.copytree(corpus.root / "signed", d)
    expect = mutate(d, corpus)
    now = {"end": corpus.end + 1, "later": corpus.end + 2 * HB, "crash": corpus.crash_at + 1}[at]
    pub = corpus.trusted_pub if keys == TRUSTED else None
    report = av.verify(d, pub, now=now, slack_s=SLACK)
    if expect.diagnosis is None:
        assert report.ok, report.format()
    else:
        assert not report.ok, report.format()
        err = report.error
        assert (err.diagnosis, err.file, err.line) == (expect.diagnosis, expect.file, expect.line), report.format()
    if expect.warning:
        hits = [w for w in report.warnings if w.diagnosis == expect.warning]
        assert hits, report.format()
        if expect.file:
            assert (hits[0].file, hits[0].line) == (expect.file, expect.line), report.format()


# ------------------------------------------------------------- heartbeat rule table


@pytest.mark.parametrize("dt,allow_open,ok,diag", [
    (1.0, False, True, av.OPEN),                              # writer just died / still running
    (HB + SLACK - 1, False, True, av.OPEN),
    (HB + SLACK + 1, False, False, av.MISSING_CHECKPOINT),    # no heartbeat when one was due
    (3600.0, False, False, av.MISSING_CHECKPOINT),
    (3600.0, True, True, av.MISSING_CHECKPOINT),              # known crash, no restart: a warning
])
def test_open_chain_end_rule(corpus: Corpus, dt, allow_open, ok, diag) -> None:
    d = corpus.root / "crashed"
    last_cp = max(parse(ln)["ts"] for ln in lines_of(d / SEG1) if is_checkpoint(parse(ln)))
    report = av.verify(d, corpus.trusted_pub, now=last_cp + dt, slack_s=SLACK, allow_open=allow_open)
    assert report.ok is ok, report.format()
    found = report.errors + report.warnings
    assert any(f.diagnosis == diag for f in found), report.format()


def test_closed_chain_passes_any_time_later(corpus: Corpus) -> None:
    report = av.verify(corpus.root / "signed", corpus.trusted_pub, now=corpus.end + 86400 * 365)
    assert report.ok, report.format()
    (c,) = report.chains
    assert c.closed and c.records == 60 and c.checkpoints >= 7 and c.first_seq == 1
    assert "OK" in report.format()


def test_wrong_trusted_key_is_forged(corpus: Corpus, tmp_path: Path) -> None:
    other_priv, other_pub, _ = keygen(tmp_path / "other")
    report = av.verify(corpus.root / "signed", other_pub, now=corpus.end)
    assert report.error.diagnosis == av.FORGED and report.error.line == 1


def test_empty_dir_is_an_error(tmp_path: Path) -> None:
    report = av.verify(tmp_path)
    assert not report.ok and report.error.diagnosis == av.NO_LOG


# --------------------------------------------------------------------- CLI entries


def test_cmd_keygen_and_verify(corpus: Corpus, tmp_path: Path, capsys) -> None:
    assert av.cmd_keygen(str(tmp_path / "k")) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    load_private_key(tmp_path / "k.key")
    assert av.cmd_keygen(str(tmp_path / "k")) == 1  # never overwrites a key
    capsys.readouterr()
    assert av.cmd_verify(str(corpus.root / "signed"), str(corpus.trusted_pub)) == 0
    assert capsys.readouterr().out.startswith("OK")
    bad = tmp_path / "bad"
    shutil.copytree(corpus.root / "signed", bad)
    m_delete_record(bad, corpus)
    assert av.cmd_verify(str(bad), str(corpus.trusted_pub)) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "deleted" in out and SEG1 in out
    assert av.cmd_verify(str(bad), str(tmp_path / "nope.pub")) == 2


# --------------------------------------------------------------------------- tail


def test_tail_filters_and_formats(corpus: Corpus) -> None:
    out = io.StringIO()
    n = av.tail(corpus.root / "signed", agent="agent-1", decision="deny", follow=False, out=out)
    lines = out.getvalue().splitlines()
    assert n == len(lines) > 0
    assert all("DENY" in ln and "agent-1 -> shell" in ln and "rm -rf" in ln for ln in lines)
    out = io.StringIO()
    av.tail(corpus.root / "signed", follow=False, out=out)
    text = out.getvalue()
    assert "checkpoint (open)" in text and "checkpoint (close)" in text and "upstream 200" in text


async def test_tail_follows_new_records(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync="never", heartbeat_s=None)
    await log.start()
    await log.append(record(1))
    out, stop = io.StringIO(), threading.Event()
    th = threading.Thread(target=av.tail, args=(tmp_path, None, "deny", True),
                          kwargs={"out": out, "poll_s": 0.02, "stop": stop})
    th.start()
    try:
        await asyncio.sleep(0.1)
        await log.append(record(8))   # deny
        await log.append(record(9))   # allow
        deadline = time.monotonic() + 3
        while "d-0008" not in out.getvalue() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        th.join()
        await log.close()
    text = out.getvalue()
    assert "d-0008" in text and "d-0009" not in text and "d-0001" not in text
