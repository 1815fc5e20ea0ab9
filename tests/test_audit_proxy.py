"""The audit log through the proxy: Regate as a real process, a real upstream that
remembers every decision id it received, a real client, and `regate audit verify`
run as the CLI. SIGKILL under load, a full disk, signed checkpoints, and what a
record carries (and never carries)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.audit import list_segments
from tests.conftest import AGENT_KEY
from tests.support import recording_upstream
from tests.support.procs import ROOT, RegateProcess

AGENT = {"X-Agent-Id": "coder-7"}  # auth: none (engine off) configs
ERROR_KEYS = {"code", "message", "decision_id", "reasons"}


# ----------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def rec_upstream():
    proc, url = recording_upstream.start()
    yield url
    proc.stop(signal.SIGKILL)  # it may still hold deliberately slow calls; it keeps no state worth a drain


def config(upstream: str, audit_dir: Path, **audit) -> dict:
    return {
        "auth": {"mode": "none"},
        "policy": {"engine": "off"},
        "http": {"shutdown_grace_s": 2},
        "tools": [{"name": "search", "upstream": upstream, "timeout_ms": 60000}],
        "audit": {"dir": str(audit_dir), "fsync": "interval", "interval_ms": 50, **audit},
    }


def cli(*args: str, timeout: float = 60) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "proxy", "audit", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def read_log(directory: Path) -> tuple[list[dict], bytes, int]:
    """(every complete line of chain w0 in order, the raw bytes of all segments, torn bytes at the end)."""
    segs = list_segments(directory).get(0, [])
    assert segs, f"no audit segments in {directory}: {sorted(os.listdir(directory))}"
    raw = b"".join(p.read_bytes() for _, p in segs)
    torn = 0
    body = raw
    if body and not body.endswith(b"\n"):
        cut = body.rfind(b"\n") + 1
        torn, body = len(body) - cut, body[:cut]
    return [orjson.loads(line) for line in body.splitlines() if line], raw, torn


def allow_ids(lines: list[dict]) -> list[str]:
    return [d["decision_id"] for d in lines if d.get("kind") == "decision" and d.get("decision") == "allow"]


async def seen(session: aiohttp.ClientSession, upstream: str) -> dict:
    async with session.get(f"{upstream}/_seen") as r:
        return await r.json()


async def reset(session: aiohttp.ClientSession, upstream: str) -> None:
    async with session.post(f"{upstream}/_reset") as r:
        assert r.status == 200


async def get(session: aiohttp.ClientSession, url: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    async with session.get(url, headers=headers or AGENT) as r:
        return r.status, dict(r.headers), orjson.loads(await r.read())


def assert_error_shape(status: int, headers: dict, body: dict, code: str) -> None:
    assert status == 503, (status, body)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["decision_id"] == headers["X-Regate-Decision-Id"], (err, headers)
    assert isinstance(err["reasons"], list), err
    assert headers.get("Retry-After") == "1", headers


# ------------------------------------------------------------------- 1. SIGKILL


async def test_sigkill_under_load_keeps_an_allow_record_for_every_call_the_upstream_received(rec_upstream, tmp_path):
    """32 concurrent clients plus 8 calls held open at the upstream; SIGKILL. Every call the
    upstream received, answered or still in flight, must have its write-ahead allow record."""
    audit_dir = tmp_path / "audit"
    regate = RegateProcess(config(rec_upstream, audit_dir), tmp_path)
    ok: dict[str, str] = {}  # tag -> decision id of each 200 the client saw
    mismatched: list[tuple[str, str, str]] = []
    pre_kill_failures: list[str] = []
    killed = asyncio.Event()
    stop = asyncio.Event()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await reset(s, rec_upstream)

        async def worker(i: int) -> None:
            n = 0
            while not stop.is_set():
                tag = f"w{i}-{n}"
                n += 1
                try:
                    async with s.get(f"{regate.url}/tools/search/q?tag={tag}", headers=AGENT) as r:
                        body = await r.read()
                        if r.status != 200:
                            pre_kill_failures.append(f"{tag}: HTTP {r.status} {body[:200]!r}")
                            continue
                        did = r.headers["X-Regate-Decision-Id"]
                        if orjson.loads(body)["decision_id"] != did:
                            mismatched.append((tag, did, body.decode()))
                        ok[tag] = did
                except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
                    if killed.is_set():
                        return
                    pre_kill_failures.append(f"{tag}: {e!r}")

        async def slow(k: int) -> None:
            # Held 30 s at the upstream: still in flight when Regate dies, never answered.
            try:
                async with s.get(f"{regate.url}/tools/search/slow?tag=slow-{k}&sleep=30", headers=AGENT) as r:
                    pre_kill_failures.append(f"slow-{k} was answered: HTTP {r.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
                pass

        t0 = time.monotonic()
        workers = [asyncio.create_task(worker(i)) for i in range(32)]
        await asyncio.sleep(1.0)
        slows = [asyncio.create_task(slow(k)) for k in range(8)]
        deadline = time.monotonic() + 10
        while True:
            tags = set((await seen(s, rec_upstream))["tags"])
            if all(f"slow-{k}" in tags for k in range(8)):
                break
            assert time.monotonic() < deadline, "the 8 slow calls never reached the upstream"
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
        assert not pre_kill_failures, pre_kill_failures[:5]
        os.kill(regate.pid, signal.SIGKILL)
        killed.set()
        stop.set()
        regate.proc.wait(10)
        await asyncio.wait_for(asyncio.gather(*workers, *slows), 15)
        await asyncio.sleep(0.2)  # let the upstream finish reading anything already sent to it
        up = await seen(s, rec_upstream)

    assert not mismatched, mismatched[:3]
    assert not pre_kill_failures, pre_kill_failures[:5]
    assert len(ok) >= 200, f"only {len(ok)} calls answered in ~2 s: the load did not happen"
    assert None not in up["ids"], "a call reached the upstream without X-Regate-Decision-Id"

    rc, out = cli("verify", str(audit_dir), "--allow-open")
    assert rc == 0, out
    assert out.startswith("OK"), out

    lines, _, torn = read_log(audit_dir)
    allowed = allow_ids(lines)
    allowed_set = set(allowed)
    assert len(allowed) == len(allowed_set), "an allow record was written twice"
    # The client's view: every 200 it saw has its allow record.
    missing_ok = [t for t, did in ok.items() if did not in allowed_set]
    assert not missing_ok, f"{len(missing_ok)} answered calls have no allow record, e.g. {missing_ok[:3]}"
    # The upstream's view, which includes calls in flight at the kill that the client never saw answered.
    upstream_ids = set(up["ids"])
    assert len(upstream_ids) == up["calls"], "the upstream saw a decision id twice"
    missing_up = upstream_ids - allowed_set
    assert not missing_up, f"{len(missing_up)} calls reached the upstream unrecorded, e.g. {sorted(missing_up)[:3]}"
    assert len(allowed) >= up["calls"], (len(allowed), up["calls"])
    unanswered = upstream_ids - set(ok.values())
    slow_ids = {did for did, tag in zip(up["ids"], up["tags"]) if tag and tag.startswith("slow-")}
    assert len(slow_ids) == 8 and slow_ids <= unanswered <= allowed_set

    # Regate comes back on the same directory: the chain continues (marked crashed), and after a
    # clean stop it verifies without --allow-open.
    chain = lines[0]["chain"]
    regate = RegateProcess(config(rec_upstream, audit_dir), tmp_path)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, _, _ = await get(s, f"{regate.url}/tools/search/again")
            assert status == 200
    assert regate.stop(signal.SIGTERM) == 0
    rc, out = cli("verify", str(audit_dir))
    assert rc == 0, out
    after, _, torn_after = read_log(audit_dir)
    assert torn_after == 0
    reopen = [d for d in after if d.get("kind") == "checkpoint" and d.get("reason") == "open"][-1]
    assert reopen["chain"] == chain and reopen["resumed"] is True and reopen["crashed"] is True, reopen
    assert reopen["torn_bytes"] == torn
    print(f"\nSIGKILL under load: {len(ok)} calls answered, {up['calls']} received upstream "
          f"({len(unanswered)} in flight, unanswered), {len(allowed)} allow records, torn tail {torn} bytes")


# ----------------------------------------------------------------- 2. disk full


def _mount_tmpfs(mnt: Path, size: str) -> None:
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"the disk-full test needs a small tmpfs and could not mount one at {mnt} "
                    f"(needs root or CAP_SYS_ADMIN): `mount -t tmpfs` exited {p.returncode}: "
                    f"{(p.stderr or p.stdout).strip()}")


def _umount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> int:
    written = 0
    block = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(block) or 0
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return written


async def test_disk_full_refuses_calls_with_503_and_recovers_by_itself(rec_upstream, tmp_path):
    mnt = tmp_path / "auditfs"
    _mount_tmpfs(mnt, "256k")
    regate = None
    try:
        audit_dir = mnt / "audit"
        regate = RegateProcess(config(rec_upstream, audit_dir), tmp_path)
        ready = f"{regate.admin_url}/readyz"
        async with aiohttp.ClientSession() as s:
            await reset(s, rec_upstream)
            for _ in range(5):
                assert (await get(s, f"{regate.url}/tools/search/before"))[0] == 200
            filler = mnt / "filler"
            _fill(filler)

            # The segment's last page may still hold a few records; then every call is refused.
            refused: list[str] = []
            for i in range(300):
                status, headers, body = await get(s, f"{regate.url}/tools/search/filling?tag=f{i}")
                if status != 200:
                    assert_error_shape(status, headers, body, "audit_unavailable")
                    refused.append(body["error"]["decision_id"])
                    break
            assert refused, "300 calls after the disk filled all went through: the audit log never failed"
            base = (await seen(s, rec_upstream))["calls"]

            results = await asyncio.gather(*(get(s, f"{regate.url}/tools/search/full?tag=x{i}") for i in range(24)))
            for status, headers, body in results:
                assert_error_shape(status, headers, body, "audit_unavailable")
                assert any("No space left" in r or "ENOSPC" in r for r in body["error"]["reasons"]), body
                refused.append(body["error"]["decision_id"])
            assert (await seen(s, rec_upstream))["calls"] == base, "a call reached the upstream while refusing"

            async with s.get(ready) as r:
                rz = await r.json()
                assert r.status == 503, rz
            assert rz["ready"] is False
            assert any(p.startswith("audit:") and "No space left" in p for p in rz["problems"]), rz

            # Space returns: Regate recovers by itself, no restart, no operator action.
            filler.unlink()
            t_free = time.monotonic()
            while True:
                status, _, body = await get(s, f"{regate.url}/tools/search/after")
                if status == 200:
                    break
                assert body["error"]["code"] == "audit_unavailable", body
                assert time.monotonic() - t_free < 5, "not recovered 5 s after space returned"
                await asyncio.sleep(0.1)
            recovered_s = time.monotonic() - t_free
            for _ in range(10):
                assert (await get(s, f"{regate.url}/tools/search/after"))[0] == 200
            async with s.get(ready) as r:
                assert r.status == 200, await r.text()
            up = await seen(s, rec_upstream)
        assert regate.stop(signal.SIGTERM) == 0

        rc, out = cli("verify", str(audit_dir))
        assert rc == 0, out
        lines, _, torn = read_log(audit_dir)
        assert torn == 0
        allowed = set(allow_ids(lines))
        missing = set(up["ids"]) - allowed
        assert not missing, f"calls reached the upstream without an allow record: {sorted(missing)[:3]}"
        # A refused call's allow record was rolled back, never left behind as if it had run.
        assert not allowed & set(refused)
        recover = [d for d in lines if d.get("kind") == "checkpoint" and d.get("reason") == "recover"]
        assert recover, "no recover checkpoint after the outage"
        assert recover[0]["refused"] >= len(refused) and "No space left" in recover[0]["error"], recover[0]
        print(f"\ndisk full: {len(refused)} calls refused with 503, recovered {recovered_s:.2f} s after space "
              f"returned, {up['calls']} calls forwarded, all recorded; recover checkpoint: refused "
              f"{recover[0]['refused']}, lost {recover[0]['lost']}, outage {recover[0]['outage_s']} s")
    finally:
        if regate is not None:
            regate.stop(signal.SIGKILL)
        _umount(mnt)


# --------------------------------------------------------- 3. signed checkpoints


async def test_signed_checkpoints_verify_with_the_right_key_and_fail_with_another(rec_upstream, tmp_path):
    rc, out = cli("keygen", str(tmp_path / "signer"))
    assert rc == 0, out
    fp = out.split("fingerprint")[-1].split()[0]
    rc, out = cli("keygen", str(tmp_path / "other"))
    assert rc == 0, out
    other_fp = out.split("fingerprint")[-1].split()[0]
    audit_dir = tmp_path / "audit"
    regate = RegateProcess(config(rec_upstream, audit_dir, signing_key=str(tmp_path / "signer.key"),
                                  checkpoint_every=10), tmp_path)
    async with aiohttp.ClientSession() as s:
        for i in range(25):
            assert (await get(s, f"{regate.url}/tools/search/signed?tag=s{i}"))[0] == 200
    assert regate.stop(signal.SIGTERM) == 0

    lines, _, _ = read_log(audit_dir)
    cps = [d for d in lines if d.get("kind") == "checkpoint"]
    assert {"open", "count", "close"} <= {d["reason"] for d in cps}, [d["reason"] for d in cps]
    assert all(d["key"] == fp and d["sig"] for d in cps), cps

    rc, out = cli("verify", str(audit_dir), "--public-key", str(tmp_path / "signer.pub"))
    assert rc == 0, out
    assert out.startswith("OK") and f"signed by {fp}" in out, out

    rc, out = cli("verify", str(audit_dir), "--public-key", str(tmp_path / "other.pub"))
    assert rc == 1, out
    assert out.startswith("FAIL") and "forged checkpoint" in out, out
    assert fp in out and other_fp in out, out  # names the key that signed and the key that was trusted


# ----------------------------------------------------- 4. what a record carries


async def test_records_carry_the_listed_fields_and_never_the_body_or_the_key(upstream, keys_file, tmp_path):
    audit_dir = tmp_path / "audit"
    tools = [{"name": n, "upstream": upstream} for n in ("search", "shell")]
    regate = RegateProcess({
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
        "tools": tools,
        "audit": {"dir": str(audit_dir)},
    }, tmp_path)
    marker = f"BODY-MARKER-{uuid.uuid4().hex}"
    key = {"X-Api-Key": AGENT_KEY}
    allowed_body = orjson.dumps({"query": marker})
    denied_body = orjson.dumps({"command": "rm -rf /", "note": marker})
    t0 = time.time()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{regate.url}/tools/search/q?tag=rec", data=allowed_body,
                          headers={**key, "Content-Type": "application/json"}) as r:
            assert r.status == 200
            allow_id, revision = r.headers["X-Regate-Decision-Id"], r.headers["X-Regate-Policy-Revision"]
        async with s.post(f"{regate.url}/tools/shell/run", data=denied_body,
                          headers={**key, "Content-Type": "application/json"}) as r:
            assert r.status == 403
            deny_id = r.headers["X-Regate-Decision-Id"]
        async with s.get(f"{regate.url}/tools/search/q") as r:  # no key
            assert r.status == 401
            unauth_id = r.headers["X-Regate-Decision-Id"]
        async with s.get(f"{regate.url}/nowhere", headers=key) as r:
            assert r.status == 404
            route_id = r.headers["X-Regate-Decision-Id"]
    assert regate.stop(signal.SIGTERM) == 0
    t1 = time.time()

    lines, raw, _ = read_log(audit_dir)
    by_id: dict[str, list[dict]] = {}
    for d in lines:
        if d.get("kind") != "checkpoint":
            by_id.setdefault(d["decision_id"], []).append(d)
    seqs = [d["seq"] for d in lines]
    assert seqs == list(range(1, len(lines) + 1))

    # Forwarded: the write-ahead decision record, then its outcome, linked by decision id.
    dec, out = by_id[allow_id]
    assert (dec["kind"], out["kind"]) == ("decision", "outcome") and dec["seq"] < out["seq"]
    for d in (dec, out):
        assert isinstance(d["seq"], int) and t0 - 1 <= d["ts"] <= t1 + 1
        assert isinstance(d["added_us"], int) and d["added_us"] >= 0
        assert d["body_sha256"] == hashlib.sha256(allowed_body).hexdigest()
    # The decision record says who asked for what and why; the outcome only adds what is new.
    assert (dec["agent"], dec["tool"], dec["method"], dec["path"]) == ("coder-7", "search", "POST", "/tools/search/q")
    assert (dec["stage"], dec["decision"], dec["reasons"]) == ("forward", "allow", [])
    assert dec["revision"] == revision and revision.startswith("sha256:")
    assert "agent" not in out and "reasons" not in out
    assert out["upstream_status"] == 200 and out["status"] == 200
    assert isinstance(out["upstream_us"], int) and out["upstream_us"] > 0

    # Ended by a stage: exactly one record, with the stage and the reasons.
    (deny,) = by_id[deny_id]
    assert (deny["kind"], deny["stage"], deny["decision"], deny["code"]) == ("decision", "policy", "deny",
                                                                             "policy_denied")
    assert any("recursive deletion" in r for r in deny["reasons"]), deny
    assert deny["body_sha256"] == hashlib.sha256(denied_body).hexdigest() and deny["revision"] == revision
    assert (deny["agent"], deny["tool"], deny["method"], deny["path"]) == ("coder-7", "shell", "POST",
                                                                           "/tools/shell/run")
    (unauth,) = by_id[unauth_id]
    assert (unauth["stage"], unauth["decision"], unauth["code"], unauth["agent"]) == ("identify", "deny",
                                                                                      "unauthenticated", None)
    (route,) = by_id[route_id]
    assert (route["stage"], route["decision"], route["code"], route["agent"], route["path"]) == (
        "route", "deny", "unknown_tool", "coder-7", "/nowhere")

    # Never the body, never the credential (nor its hash, which is what the keys file stores).
    assert marker.encode() not in raw
    assert AGENT_KEY.encode() not in raw
    assert hashlib.sha256(AGENT_KEY.encode()).hexdigest().encode() not in raw
    assert b"X-Api-Key" not in raw and b"x-api-key" not in raw
