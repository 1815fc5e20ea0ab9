"""Known-answer vectors for the audit format, as Certificate Transparency ships its own.

The reference below is written from the format description in proxy/audit.py's docstring,
not from its code: canonical JSON by the standard library, SHA-256 over a 0x00 (record) or
0x01 (checkpoint) type byte and the canonical bytes, ``prev`` = the previous line's hash
(64 zeros first), and an Ed25519 signature over ``regate-audit-checkpoint-v1\\0`` and the
checkpoint without ``sig`` and ``hash``. The key is RFC 8032's first test key, so every
signature is deterministic, and the digests of the three-line chain are pinned as hex: the
writer must produce these bytes, the verifier must accept them, and a chain hashed without
the type byte must be refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proxy import audit as audit_mod
from proxy import audit_verify as av
from proxy.audit import AuditLog, line_hash

# RFC 8032 section 7.1, TEST 1.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUB = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG_EMPTY = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
KEY = Ed25519PrivateKey.from_private_bytes(RFC_SEED)

CHAIN = "00112233aabbccdd"
T0 = 1_767_225_600.0
HB = 60.0
RECORD = {"kind": "decision", "decision_id": "d-0001", "agent": "coder-7", "tool": "shell",
          "decision": "allow", "reasons": [], "upstream_status": 200, "ts": T0 + 0.25}

# The pinned answers (computed once by the reference below, checked in).
KEY_FP = "21fe31dfa154a261626bf854046fd227"  # SHA-256(raw public key)[:32 hex]
OPEN_HASH = "9e184363cd0d8c2bc9cd38b815e765d75176900de31adcf3e3832d01f12f4d2b"
RECORD_HASH = "caa10f5bcaa3c81916bc574162bb84ae6d42c5bae1818b75bef3dd539e889fca"
CLOSE_HASH = "656b4d1b01bc37367bc8313c4cf9c4b589acc33f0bca900c3d1ddb856d76ae06"
OPEN_SIG = "I7PQtDp6L/zwCGrtZAbKyu4q2sqznUEOFjB+j8EHQ7wEvqNhJL/35ooASm8gA7ze/BDDUh7NSWxf+2h0ut67Dw=="


# ------------------------------------------------------------------ the reference


def canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def ref_hash(fields: dict, type_byte: bytes | None = None) -> str:
    if type_byte is None:
        type_byte = b"\x01" if fields.get("kind") == "checkpoint" else b"\x00"
    return hashlib.sha256(type_byte + canonical(fields)).hexdigest()


def ref_line(fields: dict, digest: str) -> bytes:
    return canonical(fields)[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


def ref_sign(cp: dict) -> str:
    body = {k: v for k, v in cp.items() if k not in ("sig", "hash")}
    return base64.b64encode(KEY.sign(b"regate-audit-checkpoint-v1\x00" + canonical(body))).decode()


def ref_checkpoint(seq: int, prev: str, ts: float, reason: str, records: int, **extra) -> dict:
    raw_pub = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    cp = {"kind": "checkpoint", "seq": seq, "prev": prev, "chain": CHAIN, "worker": 0, "ts": ts,
          "reason": reason, "count": seq - 1, "records": records, "heartbeat_s": HB, "every": 10_000,
          "key": hashlib.sha256(raw_pub).hexdigest()[:32], "pub": base64.b64encode(raw_pub).decode(), **extra}
    cp["sig"] = None
    cp["sig"] = ref_sign(cp)
    return cp


def ref_chain(records: list[dict], *, close_ts: float | None, type_bytes: tuple[bytes, bytes] | None = None,
              open_ts: float = T0) -> tuple[list[dict], list[str], bytes]:
    """(lines' fields, their hashes, the segment's bytes) of a chain: open, records, close."""
    def digest(fields: dict) -> str:
        if type_bytes is None:
            return ref_hash(fields)
        return ref_hash(fields, type_bytes[1] if fields["kind"] == "checkpoint" else type_bytes[0])

    lines, hashes = [], []
    prev = "0" * 64
    fields = ref_checkpoint(1, prev, open_ts, "open", 0, resumed=False)
    lines.append(fields)
    hashes.append(prev := digest(fields))
    for rec in records:
        fields = {**rec, "seq": len(lines) + 1, "prev": prev, "chain": CHAIN}
        lines.append(fields)
        hashes.append(prev := digest(fields))
    if close_ts is not None:
        fields = ref_checkpoint(len(lines) + 1, prev, close_ts, "close", len(records))
        lines.append(fields)
        hashes.append(digest(fields))
    return lines, hashes, b"".join(ref_line(f, h) for f, h in zip(lines, hashes))


def write_chain(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "audit-w0-000001.jsonl").write_bytes(data)
    return directory


# ------------------------------------------------------------------ the vectors


def test_the_reference_key_is_rfc8032_test_1():
    assert KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == RFC_PUB
    assert KEY.sign(b"") == RFC_SIG_EMPTY


def test_the_reference_reproduces_the_pinned_vectors():
    lines, hashes, _ = ref_chain([RECORD], close_ts=T0 + 1.0)
    assert lines[0]["key"] == KEY_FP
    assert hashes == [OPEN_HASH, RECORD_HASH, CLOSE_HASH]
    assert lines[0]["sig"] == OPEN_SIG
    assert [f["prev"] for f in lines] == ["0" * 64, OPEN_HASH, RECORD_HASH]  # the links


def test_line_hash_gives_the_known_answers():
    lines, _, _ = ref_chain([RECORD], close_ts=T0 + 1.0)
    assert [line_hash(f)[1] for f in lines] == [OPEN_HASH, RECORD_HASH, CLOSE_HASH]
    assert audit_mod.signed_bytes(lines[0]).startswith(b"regate-audit-checkpoint-v1\x00")
    # The type byte separates the domains: the same fields hash differently as record and checkpoint.
    assert ref_hash(lines[1], b"\x00") != ref_hash(lines[1], b"\x01")


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_the_writer_writes_the_known_answer_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_mod.secrets, "token_hex", lambda n=None: CHAIN)
    clock = FakeClock(T0)
    log = AuditLog(tmp_path, fsync="never", heartbeat_s=HB, signing_key=KEY, clock=clock)
    await log.start()
    await log.append(dict(RECORD))
    clock.t = T0 + 1.0
    await log.close()
    _, hashes, expect = ref_chain([RECORD], close_ts=T0 + 1.0)
    written = (tmp_path / "audit-w0-000001.jsonl").read_bytes()
    assert written == expect, f"\nwritten:  {written!r}\nexpected: {expect!r}"
    assert hashes == [OPEN_HASH, RECORD_HASH, CLOSE_HASH]


def test_verify_accepts_the_reference_chain(tmp_path):
    _, _, data = ref_chain([RECORD], close_ts=T0 + 1.0)
    report = av.verify(write_chain(tmp_path, data), KEY.public_key(), now=T0 + 10)
    assert report.ok and report.records == 1 and report.checkpoints == 2, report.format()


@pytest.mark.parametrize("type_bytes", [(b"", b""), (b"\x00", b"\x00"), (b"\x01", b"\x01"), (b"\x01", b"\x00")],
                         ids=["no type byte", "both 0x00", "both 0x01", "swapped"])
def test_verify_refuses_a_chain_without_domain_separation(tmp_path, type_bytes):
    _, _, data = ref_chain([RECORD], close_ts=T0 + 1.0, type_bytes=type_bytes)
    report = av.verify(write_chain(tmp_path, data), KEY.public_key(), now=T0 + 10)
    assert not report.ok and report.error.diagnosis == av.EDITED, report.format()


def test_verify_refuses_a_bad_signature(tmp_path):
    lines, _, _ = ref_chain([RECORD], close_ts=T0 + 1.0)
    lines[2]["sig"] = lines[0]["sig"]  # a valid signature, over other bytes
    data, prev = b"", "0" * 64
    for f in lines:
        f["prev"] = prev
        data += ref_line(f, prev := ref_hash(f))
    report = av.verify(write_chain(tmp_path, data), KEY.public_key(), now=T0 + 10)
    assert not report.ok and report.error.diagnosis == av.REWRITTEN, report.format()


# ------------------------------------------------- verify at the DEFAULT slack
# The verifier's default slack is max(5 s, heartbeat/4): 15 s at a 60 s heartbeat. No slack_s
# is passed here, so raising (or lowering) the default turns these red.


@pytest.mark.parametrize("late, ok", [(HB + 14.0, True), (HB + 16.0, False), (HB + 40.0, False)])
def test_a_late_record_at_the_default_slack(tmp_path, late, ok):
    _, _, data = ref_chain([{**RECORD, "ts": T0 + late}], close_ts=T0 + late + 0.5)
    report = av.verify(write_chain(tmp_path, data), KEY.public_key(), now=T0 + late + 1)
    assert report.ok is ok, report.format()
    if not ok:
        assert report.error.diagnosis == av.MISSING_CHECKPOINT


@pytest.mark.parametrize("age, ok", [(HB + 14.0, True), (HB + 16.0, False), (HB + 100.0, False)])
def test_a_dropped_tail_at_the_default_slack(tmp_path, age, ok):
    _, _, data = ref_chain([RECORD], close_ts=None)  # open chain: the tail after the record is gone
    report = av.verify(write_chain(tmp_path, data), KEY.public_key(), now=T0 + age)
    assert report.ok is ok, report.format()
    if not ok:
        assert report.error.diagnosis == av.MISSING_CHECKPOINT


def test_the_default_slack_is_five_seconds_at_short_heartbeats(tmp_path):
    # heartbeat_s 1.0: slack max(5, 0.25) = 5 s.
    global HB
    saved, HB = HB, 1.0
    try:
        _, _, late = ref_chain([{**RECORD, "ts": T0 + 1.0 + 5.5}], close_ts=T0 + 7.0)
        _, _, fine = ref_chain([{**RECORD, "ts": T0 + 1.0 + 4.5}], close_ts=T0 + 6.0)
    finally:
        HB = saved
    assert not av.verify(write_chain(tmp_path / "late", late), KEY.public_key(), now=T0 + 8).ok
    assert av.verify(write_chain(tmp_path / "fine", fine), KEY.public_key(), now=T0 + 8).ok
