"""Soak: Regate-full under a steady mixed workload for a long time, watching for leaks,
errors that should not happen, and calls that go unrecorded.

    python -m benchmarks.soak [--minutes 10] [--concurrency 16] [--out benchmarks/results]

A benchmark, not a test. Regate runs as `regate-full` (benchmarks/targets.py: API keys,
the shipped policy on the embedded engine, rate limits, breakers, audit log, metrics)
plus held approvals and an MCP route, in front of real tools: the flaky upstream
(tests/support/flaky_upstream.py) for HTTP tools, one lane failing half its calls, and
examples/mcp_server.py for MCP. Concurrent clients send a weighted mix:

    allowed      coder-7 GET /tools/search, small payments by analyst-2
    denied       a payment by coder-7 (no grant), a file outside analyst-2's root
    rate_limited coder-7's shell calls (the shell tool allows 2/s)
    failing      the `flaky` tool: 500 from the tool, then breaker/loop-guard answers
    approval     analyst-2 payments over 100, held until a simulated human (the admin
                 API) approves four in five and denies the fifth
    mcp          support-1 tools/call search_tickets (allowed) and delete_ticket (denied)
    refused      no API key, unknown tool

Reported (stdout, JSON and a PNG in --out): req/s over time per class, Regate's RSS over
time, answers by status and code, 5xx split into injected (the flaky tool) and
unexpected, then, after a clean SIGTERM: `regate audit verify`, and exactly one
decision record per call sent. Exit status 1 when any check fails: RSS growth after
warm-up of 10% or more, an unexpected 5xx or client error, audit verify failing, or a
record count that differs from the calls sent.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp
import orjson
import psutil
import yaml

from .servers import ROOT, Proc, free_port, start_regate
from .targets import full_sections

KEYS = {"coder-7": "soak-key-coder-7", "analyst-2": "soak-key-analyst-2", "support-1": "soak-key-support-1"}
ADMIN_TOKEN = "soak-admin-token"

# Limits for the soak: everything generous except the shell tool (2/s, as shipped), so
# its calls are the rate-limited class.
LIMITS = {
    "defaults": {"agent": {"rate": "100000/s", "burst": 100000}, "tool": {"rate": "100000/s", "burst": 100000},
                 "budget": {"units": 10 ** 12, "window": "1d"}},
    "tools": {"shell": {"rate": "2/s", "burst": 5}},
}


def _mcp(mid: int, tool: str, args: dict) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": mid, "method": "tools/call",
                         "params": {"name": tool, "arguments": args}})


# (class, weight, agent or None, method, path, body or None)
MIX = [
    ("allowed", 40, "coder-7", "GET", "/tools/search/q?i={i}", None),
    ("allowed", 5, "analyst-2", "POST", "/tools/payments/pay", b'{"amount": 20, "to": "acme"}'),
    ("denied", 5, "coder-7", "POST", "/tools/payments/pay", b'{"amount": 20, "to": "acme"}'),
    ("denied", 4, "analyst-2", "GET", "/tools/files/etc/shadow", None),
    ("rate_limited", 10, "coder-7", "POST", "/tools/shell/run", b'{"command": "ls -la"}'),
    ("failing", 10, "coder-7", "GET", "/tools/flaky/op?i={i}", None),
    ("approval", 1, "analyst-2", "POST", "/tools/payments/pay", b'{"amount": 500, "to": "acme"}'),
    ("mcp", 10, "support-1", "POST", "/tools/tickets/mcp", "search_tickets"),
    ("mcp", 2, "support-1", "POST", "/tools/tickets/mcp", "delete_ticket"),
    ("refused", 2, None, "GET", "/tools/search/q", None),
    ("refused", 2, "coder-7", "GET", "/tools/nosuch/x", None),
]


def bundle(run: Path) -> tuple[Path, Path, Path]:
    rego, data = run / "rego", run / "policies"
    shutil.copytree(ROOT / "rego", rego)
    shutil.copytree(ROOT / "policies", data)
    (data / "limits" / "data.yaml").write_text(yaml.safe_dump(LIMITS))
    tools = yaml.safe_load((data / "tools" / "data.yaml").read_text())
    tools["flaky"] = {"public": True, "methods": ["GET", "POST"]}
    (data / "tools" / "data.yaml").write_text(yaml.safe_dump(tools))
    keys = run / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"sha256": hashlib.sha256(k.encode()).hexdigest(), "agent": a}
                                             for a, k in KEYS.items()]}))
    return rego, data, keys


def regate_config(run: Path, port: int, admin_port: int, flaky: str, mcp: str) -> str:
    rego, data, keys = bundle(run)
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN},
        "http": {"shutdown_grace_s": 10},
        "tools": [
            {"name": "search", "upstream": f"{flaky}/t/search"},
            {"name": "shell", "upstream": f"{flaky}/t/shell"},
            {"name": "files", "upstream": f"{flaky}/t/files"},
            {"name": "payments", "upstream": f"{flaky}/t/payments"},
            {"name": "flaky", "upstream": f"{flaky}/t/flaky", "timeout_ms": 2000},
            {"name": "tickets", "upstream": mcp, "protocol": "mcp"},
        ],
        **full_sections(run, rego, data, keys),
        # Held approvals, kept only briefly once decided, so memory reaches its steady state early.
        "approvals": {"mode": "hold", "timeout_s": 30, "use_within_s": 30, "retain_s": 30},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.by_second: dict[int, Counter] = defaultdict(Counter)
        self.answers: Counter = Counter()  # (class, status, code)
        self.decision_ids: set[str] = set()
        self.client_errors: Counter = Counter()
        self.unexpected_5xx: list[str] = []
        self.rss: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []
        self.approvals = Counter()


def _code(status: int, body: bytes) -> str | None:
    if status < 300:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if isinstance(doc, dict) and "error" in doc and "jsonrpc" in doc:  # an MCP refusal
            data = doc["error"].get("data") or {}
            return data.get("code") if isinstance(data, dict) else str(doc["error"].get("code"))
        return None
    try:
        doc = orjson.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            data = err.get("data")
            if isinstance(data, dict) and "code" in data:
                return data["code"]
            return err.get("code") if isinstance(err.get("code"), str) else str(err.get("code"))
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return f"http_{status}"


async def client(base: str, tally: Tally, stop: asyncio.Event, t0: float, seed: int,
                 session: aiohttp.ClientSession) -> None:
    rnd = random.Random(seed)
    weights = [m[1] for m in MIX]
    i = 0
    while not stop.is_set():
        cls, _, agent, method, path, body = rnd.choices(MIX, weights)[0]
        i += 1
        headers = {"Content-Type": "application/json"}
        if agent is not None:
            headers["X-Api-Key"] = KEYS[agent]
        if cls == "mcp":
            args = {"query": "login"} if body == "search_tickets" else {"ticket_id": 101}
            body = _mcp(i, body, args)
            headers["Accept"] = "application/json, text/event-stream"
        tally.sent += 1
        try:
            async with session.request(method, base + path.format(i=f"{seed}-{i}"), data=body, headers=headers) as r:
                raw = await r.read()
                status = r.status
                did = r.headers.get("X-Regate-Decision-Id")
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            tally.client_errors[type(exc).__name__] += 1
            continue
        code = _code(status, raw)
        tally.answers[(cls, status, code)] += 1
        tally.by_second[int(time.monotonic() - t0)][cls] += 1
        if did:
            tally.decision_ids.add(did)
        else:
            tally.client_errors["no_decision_id"] += 1
        if status >= 500 and cls != "failing":
            tally.unexpected_5xx.append(f"{cls} {method} {path} -> {status} {code}")


async def approver(admin: str, tally: Tally, stop: asyncio.Event, session: aiohttp.ClientSession) -> None:
    """The human: approves four pending calls in five, denies the fifth."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    n = 0
    while not stop.is_set():
        try:
            async with session.get(f"{admin}/admin/approvals?state=pending", headers=headers) as r:
                pending = (await r.json()).get("approvals", []) if r.status == 200 else []
            for ap in pending:
                n += 1
                verb = "deny" if n % 5 == 0 else "approve"
                async with session.post(f"{admin}/admin/approvals/{ap['id']}/{verb}", headers=headers,
                                        json={"approver": "soak-operator", "comment": "soak"}) as r:
                    await r.read()
                    tally.approvals[f"{verb}:{r.status}"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            tally.approvals[f"error:{type(exc).__name__}"] += 1
        await asyncio.sleep(0.1)


async def sampler(pid: int, tally: Tally, stop: asyncio.Event, t0: float, every: float) -> None:
    proc = psutil.Process(pid)
    proc.cpu_percent()
    while not stop.is_set():
        try:
            tally.rss.append((time.monotonic() - t0, proc.memory_info().rss / 2 ** 20))
            tally.cpu.append((time.monotonic() - t0, proc.cpu_percent()))
        except psutil.Error:
            return
        await asyncio.sleep(every)


async def drive(base: str, admin: str, pid: int, seconds: float, concurrency: int, tally: Tally) -> float:
    stop = asyncio.Event()
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s, \
            aiohttp.ClientSession(timeout=timeout) as admin_session:
        clients = [asyncio.create_task(client(base, tally, stop, t0, k, s)) for k in range(concurrency)]
        # The human and the sampler outlive the clients: a call still held gets its answer.
        helpers_stop = asyncio.Event()
        helpers = [asyncio.create_task(approver(admin, tally, helpers_stop, admin_session)),
                   asyncio.create_task(sampler(pid, tally, helpers_stop, t0, 2.0))]
        last = 0
        while (elapsed := time.monotonic() - t0) < seconds:
            await asyncio.sleep(min(10.0, seconds - elapsed))
            now = int(time.monotonic() - t0)
            done = sum(sum(tally.by_second[s].values()) for s in range(last, now))
            rss = tally.rss[-1][1] if tally.rss else 0
            print(f"  t={now:4d}s  {done / max(1, now - last):7.0f} req/s  RSS {rss:6.1f} MiB  "
                  f"5xx(unexpected) {len(tally.unexpected_5xx)}  client errors {sum(tally.client_errors.values())}",
                  flush=True)
            last = now
        stop.set()
        await asyncio.gather(*clients)
        helpers_stop.set()
        await asyncio.gather(*helpers)
    return time.monotonic() - t0


def audit_check(audit_dir: Path, tally: Tally) -> dict:
    p = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", str(audit_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    from proxy.audit import list_segments

    decisions: Counter = Counter()
    for segs in list_segments(audit_dir).values():
        for _, seg in segs:
            for line in seg.read_bytes().splitlines():
                if line and b'"decision"' in line:
                    rec = orjson.loads(line)
                    if rec.get("kind") == "decision":
                        decisions[rec["decision_id"]] += 1
    answered = sum(tally.answers.values())
    return {
        "verify_rc": p.returncode,
        "verify": (p.stdout + p.stderr).strip().splitlines()[:3],
        "decision_records": sum(decisions.values()),
        "distinct_decision_ids": len(decisions),
        "calls_sent": tally.sent,
        "calls_answered": answered,
        "answered_without_record": len(tally.decision_ids - set(decisions)),
        "records_twice": sum(1 for n in decisions.values() if n > 1),
    }


def rss_growth(rss: list[tuple[float, float]], warmup_s: float, window_s: float = 30.0) -> dict:
    after = [(t, m) for t, m in rss if t >= warmup_s]
    if len(after) < 4:
        return {"baseline_mib": None, "final_mib": None, "growth": None}
    base = [m for t, m in after if t < warmup_s + window_s] or [after[0][1]]
    end_t = after[-1][0]
    final = [m for t, m in after if t > end_t - window_s]
    b, f = sorted(base)[len(base) // 2], sorted(final)[len(final) // 2]
    return {"baseline_mib": round(b, 1), "final_mib": round(f, 1), "growth": round((f - b) / b, 4),
            "peak_mib": round(max(m for _, m in rss), 1)}


def plot(path: Path, tally: Tally, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bucket = 10
    classes = sorted({c for counts in tally.by_second.values() for c in counts})
    xs = list(range(0, int(seconds) // bucket * bucket, bucket))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for cls in classes:
        ys = [sum(tally.by_second[s][cls] for s in range(x, x + bucket)) / bucket for x in xs]
        a1.plot(xs, ys, label=cls)
    total = [sum(sum(tally.by_second[s].values()) for s in range(x, x + bucket)) / bucket for x in xs]
    a1.plot(xs, total, label="total", color="black", linewidth=2)
    a1.set_ylabel("req/s (10 s buckets)")
    a1.legend(loc="upper right", fontsize=8, ncol=3)
    a1.set_title("Regate soak: throughput by class, and RSS")
    a2.plot([t for t, _ in tally.rss], [m for _, m in tally.rss], color="tab:red")
    a2.set_ylabel("Regate RSS (MiB)")
    a2.set_xlabel("seconds")
    a2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default: 20%%)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (audit log, logs)")
    args = ap.parse_args()
    seconds = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else max(10.0, seconds * 0.2)
    run = Path(tempfile.mkdtemp(prefix="regate-soak-"))
    procs: list[Proc] = []
    tally = Tally()
    try:
        flaky_port, mcp_port = free_port(), free_port()
        flaky = Proc("flaky", [sys.executable, str(ROOT / "tests/support/flaky_upstream.py"), str(flaky_port)],
                     run / "flaky.log", None)
        procs.append(flaky)
        flaky.wait_http(f"http://127.0.0.1:{flaky_port}/_flaky/info")
        mcp = Proc("mcp", [sys.executable, str(ROOT / "examples/mcp_server.py"), str(mcp_port), "--json",
                           "--stateless"], run / "mcp.log", None)
        procs.append(mcp)
        mcp.wait_http(f"http://127.0.0.1:{mcp_port}/health")
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{flaky_port}/_flaky/mode/flaky", method="POST",
                                     data=json.dumps({"mode": "ratio", "ratio": 0.5, "status": 500}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()
        port, admin_port = free_port(), free_port()
        config = regate_config(run, port, admin_port, f"http://127.0.0.1:{flaky_port}", f"http://127.0.0.1:{mcp_port}")
        regate, base, _ = start_regate("regate", run, None, config, port, admin_port)
        procs.append(regate)
        admin = f"http://127.0.0.1:{admin_port}"
        print(f"soak: {args.minutes:g} min, {args.concurrency} clients, Regate pid {regate.pid}, run dir {run}",
              flush=True)
        took = asyncio.run(drive(base, admin, regate.pid, seconds, args.concurrency, tally))
        t = time.monotonic()
        regate.stop()
        stop_s = time.monotonic() - t
        stop_rc = regate.proc.returncode
        audit = audit_check(run / "audit", tally)
    finally:
        for p in reversed(procs):
            p.stop()

    answered = sum(tally.answers.values())
    statuses = Counter()
    codes = Counter()
    injected_5xx = 0
    for (cls, status, code), n in tally.answers.items():
        statuses[status] += n
        codes[f"{cls}:{status}:{code}"] += n
        if status >= 500 and cls == "failing":
            injected_5xx += n
    full = int(took) // 10 * 10  # whole 10 s buckets only: the last partial one would read as a dip
    per_10s = [sum(sum(tally.by_second[s].values()) for s in range(x, x + 10)) / 10 for x in range(0, full, 10)]
    growth = rss_growth(tally.rss, warmup)
    checks = {
        "rss_growth_under_10pct": growth["growth"] is not None and growth["growth"] < 0.10,
        "no_unexpected_5xx": not tally.unexpected_5xx,
        "no_client_errors": not tally.client_errors,
        "audit_verifies": audit["verify_rc"] == 0,
        "one_decision_record_per_call": (audit["decision_records"] == audit["distinct_decision_ids"]
                                         == tally.sent == answered and audit["answered_without_record"] == 0),
        "clean_shutdown": stop_rc == 0,
    }
    result = {
        "minutes": args.minutes, "seconds": round(took, 1), "concurrency": args.concurrency,
        "calls_sent": tally.sent, "answered": answered, "req_per_s_mean": round(answered / took, 1),
        "req_per_s_10s": [round(x, 1) for x in per_10s],
        "req_per_s_min_10s": round(min(per_10s[1:] or per_10s), 1), "req_per_s_max_10s": round(max(per_10s), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "by_class_status_code": dict(sorted(codes.items())),
        "injected_5xx": injected_5xx, "unexpected_5xx": tally.unexpected_5xx[:20],
        "client_errors": dict(tally.client_errors), "approvals": dict(tally.approvals),
        "rss": growth, "rss_samples": [(round(t, 1), round(m, 1)) for t, m in tally.rss],
        "cpu_percent_mean": round(sum(c for _, c in tally.cpu) / max(1, len(tally.cpu)), 1),
        "shutdown_s": round(stop_s, 2), "audit": audit, "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(args.out / "soak.png", tally, took)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_samples", "req_per_s_10s",
                                                                     "by_class_status_code")}, indent=1))
    print("by class/status/code:")
    for k, v in sorted(codes.items()):
        print(f"  {k:50s} {v}")
    print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.png'}")
    if args.keep:
        print(f"run dir kept: {run}")
    else:
        shutil.rmtree(run, ignore_errors=True)
    ok = all(checks.values())
    print("SOAK", "PASSED" if ok else "FAILED", {k: v for k, v in checks.items() if not v})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
