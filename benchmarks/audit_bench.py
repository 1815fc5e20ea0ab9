"""Audit log throughput, in one run on the same disk: (1) records/s of AuditLog.append for
fsync interval and always at 1, 16 and 256 concurrent writers; (2) the proxy's end-to-end
req/s with the audit log on versus off.

    python -m benchmarks.audit_bench [--seconds 2] [--dir PATH] [--json OUT]
                                     [--proxy-seconds 3] [--rounds 3] [--connections 32]
                                     [--proxy-fsync interval[,always]] [--variants full,passthrough]
                                     [--skip-append] [--skip-proxy]

(1) Each cell runs its writers for --seconds against a fresh log in a temporary directory under
--dir (default: the system temp dir; point it at the disk the audit log will live on) and
reports records/s, append latency p50/p99, mean records per write (group commit) and CPU
microseconds per record (the cost the proxy's event loop pays, fsync thread included).

(2) For each variant (`full`: API key, shipped policy on the embedded engine, limits, breakers,
metrics, as the suite's regate-full; `passthrough`: every optional stage off, so the audit log's
share is as large as it can be) one Regate with the audit log on (fsync per --proxy-fsync, 50 ms
interval, log under --dir) and one with `audit.enabled: false` run side by side, pinned to the
same core (benchmarks/targets.py layout). wrk (one thread, --connections) drives them in
alternating rounds, ABBA order so drift cancels; each round is --proxy-seconds after a warm-up.
The median req/s of the rounds gives the ratio on/off and the cost of the audit log; the
median CPU microseconds Regate spent per request (user + system, all threads, from /proc) gives
the same ratio in a form that holds when other work shares the core; and after each ABBA pair a
paired round loads both at once (two wrk processes), so both share the core and whatever else
the machine is doing at that moment: their req/s ratio is the audit log's cost with the
machine's noise cancelled. Report the paired ratio on a shared machine. Without
wrk an aiohttp closed-loop client stands in (it is slower than Regate: the ratio is still
meaningful, the absolute numbers are not). Afterwards each audit-on log is checked with
`verify` (result and record count in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.audit import AuditLog  # noqa: E402

if TYPE_CHECKING:
    from benchmarks import targets

WRITERS = (1, 16, 256)
MODES = ("interval", "always")


def sample_record(i: int = 0) -> dict:
    """A record the size and shape the pipeline writes for a forwarded call."""
    return {
        "kind": "decision", "ts": time.time(), "decision_id": f"01JD{i:022d}", "agent": "coder-7",
        "tool": "shell", "method": "POST", "path": "/tools/shell/run",
        "body_sha256": hashlib.sha256(b"{}").hexdigest(), "stage": "forward", "decision": "allow",
        "code": "ok", "reasons": [], "revision": "3f2a9c1", "added_us": 182, "upstream_status": None,
        "upstream_us": None,
    }


async def measure(directory: Path, fsync: str, writers: int, seconds: float) -> dict:
    log = AuditLog(directory, fsync=fsync, interval_ms=50)
    await log.start()
    stop = False
    count = 0
    lat: list[float] = []

    async def writer(w: int) -> None:
        nonlocal count
        rec = sample_record(w)
        perf = time.perf_counter
        while not stop:
            t = perf()
            await log.append(rec)
            lat.append(perf() - t)
            count += 1

    tasks = [asyncio.ensure_future(writer(w)) for w in range(writers)]
    await asyncio.sleep(min(0.2, seconds / 5))  # warm up
    count, lat[:] = 0, []
    batches0, fsyncs0 = log.stats["batches"], log.stats["fsyncs"]
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    stop = True
    n, elapsed, cpu = count, time.perf_counter() - t0, time.process_time() - cpu0
    batches = log.stats["batches"] - batches0
    fsyncs = log.stats["fsyncs"] - fsyncs0
    await asyncio.gather(*tasks)
    await log.close()
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else (lambda q: 0.0)
    return {
        "fsync": fsync, "writers": writers, "records": n, "seconds": round(elapsed, 3),
        "records_per_s": round(n / elapsed), "p50_us": round(pct(0.50), 1), "p99_us": round(pct(0.99), 1),
        "records_per_write": round(n / batches, 1) if batches else None, "fsyncs": fsyncs,
        "cpu_us_per_record": round(cpu / n * 1e6, 2) if n else None,
    }


async def run(seconds: float = 2.0, writers: tuple[int, ...] = WRITERS, modes: tuple[str, ...] = MODES,
              directory: str | None = None) -> list[dict]:
    """Every (mode, writers) cell, in one process and one run, on the same disk."""
    results = []
    for mode in modes:
        for w in writers:
            tmp = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=directory))
            try:
                results.append(await measure(tmp, mode, w, seconds))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return results


def table(results: list[dict]) -> str:
    head = f"{'fsync':<9}{'writers':>8}{'records/s':>12}{'p50 us':>10}{'p99 us':>10}{'rec/write':>11}{'fsyncs':>8}{'cpu us/rec':>12}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r['fsync']:<9}{r['writers']:>8}{r['records_per_s']:>12,}{r['p50_us']:>10}{r['p99_us']:>10}"
                    f"{r['records_per_write'] or '-':>11}{r['fsyncs']:>8}{r['cpu_us_per_record'] or '-':>12}")
    return "\n".join(rows)


# --------------------------------------------------------------- proxy end to end

PROXY_VARIANTS = ("full", "passthrough")


def _proxy_config(variant: str, audit: dict, *, upstream: str, run_dir: Path,
                  ctx: "targets.Context") -> tuple[str, int, int]:
    import yaml

    from benchmarks import servers, targets

    port, admin_port = servers.free_port(), servers.free_port()
    text = targets.regate_config("passthrough" if variant == "passthrough" else "full", port=port,
                                 admin_port=admin_port, upstream=upstream, run_dir=run_dir,
                                 rego=ctx.rego, data=ctx.data, keys=ctx.keys)
    cfg = yaml.safe_load(text)
    cfg["audit"] = audit
    return yaml.safe_dump(cfg, sort_keys=False), port, admin_port


async def _client_load(url: str, connections: int, seconds: float, headers: dict) -> dict:
    """Closed-loop aiohttp load (only when wrk is missing)."""
    import aiohttp

    done = errors = 0
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def one(s: "aiohttp.ClientSession") -> None:
        nonlocal done, errors
        perf = time.perf_counter
        while perf() < stop:
            t = perf()
            try:
                async with s.get(url, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1
                        lat.append(perf() - t)
                    else:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(one(s) for _ in range(connections)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6, 1)) if lat else (lambda q: 0.0)
    return {"rps": done / elapsed, "requests": done, "p50_us": pct(0.5), "p99_us": pct(0.99),
            "error_count": errors}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(url: str, connections: int, seconds: float, script: Path | None, cpus: str | None,
          pid: int | None = None) -> dict:
    """One round against one Regate; with ``pid``, also the CPU that Regate spent per request."""
    from benchmarks import loadgen, targets

    cpu0 = _cpu_s(pid) if pid is not None else None
    if script is not None:
        r = loadgen.run(url + targets.REQUEST_PATH, connections, seconds, script, cpus)
        out = {"rps": r.rps, "requests": r.requests, "p50_us": r.p50_us, "p99_us": r.p99_us,
               "error_count": r.error_count}
    else:
        out = asyncio.run(_client_load(url + targets.REQUEST_PATH, connections, seconds, targets.REQUEST_HEADERS))
    if pid is not None and out["requests"]:
        out["cpu_us_per_req"] = (_cpu_s(pid) - cpu0) * 1e6 / out["requests"]  # type: ignore[operator]
    time.sleep(0.2)  # let closed connections settle before the next run
    return out


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def run_proxy(seconds: float = 3.0, rounds: int = 3, connections: int = 32, directory: str | None = None,
              fsyncs: tuple[str, ...] = ("interval",), variants: tuple[str, ...] = PROXY_VARIANTS,
              log: Callable[[str], None] = print) -> list[dict]:
    """Regate's req/s with the audit log on vs off, per variant and fsync mode, alternating rounds."""
    from benchmarks import loadgen, servers, targets
    from proxy.audit_verify import verify

    tmp = Path(tempfile.mkdtemp(prefix="audit-bench-proxy-"))
    audit_root = Path(tempfile.mkdtemp(prefix="audit-bench-log-", dir=directory))
    layout = targets.layout_for(targets.cpu_count())
    procs: list = []
    results: list[dict] = []
    try:
        if servers.nginx_binary():
            up, upstream_url = servers.start_nginx_upstream("upstream", tmp, layout.upstream)
            upstream_kind = "nginx"
        else:
            up, upstream_url = servers.start_fallback_upstream("upstream", tmp, layout.upstream)
            upstream_kind = "aiohttp"
        procs.append(up)
        keys = targets.write_keys(tmp / "keys.yaml")
        rego, data = targets.bench_bundle(tmp / "bundle")
        ctx = targets.Context(tmp, layout, upstream_url, upstream_kind, keys, rego, data)
        script = None
        if loadgen.wrk_binary() is not None:
            script = loadgen.write_script(tmp / "wrk.lua", "GET", dict(targets.REQUEST_HEADERS))
        load_name = "wrk" if script is not None else "aiohttp client (no wrk)"
        log(f"proxy end to end: {load_name}, {connections} connections, {rounds} rounds x {seconds:g}s, "
            f"upstream {upstream_kind}; {layout.note}; audit logs under {audit_root}")
        for variant in variants:
            for fsync in fsyncs:
                started: dict[str, tuple] = {}
                for label in ("on", "off"):
                    name = f"regate-{variant}-audit-{label}-{fsync}"
                    run_dir = tmp / name
                    run_dir.mkdir()
                    audit_dir = audit_root / name
                    audit = ({"enabled": True, "dir": str(audit_dir), "fsync": fsync, "interval_ms": 50}
                             if label == "on" else {"enabled": False})
                    text, port, admin_port = _proxy_config(variant, audit, upstream=upstream_url,
                                                           run_dir=run_dir, ctx=ctx)
                    proc, url, _ = servers.start_regate(name, run_dir, layout.target, text, port, admin_port)
                    procs.append(proc)
                    started[label] = (proc, url, audit_dir)
                for label in ("on", "off"):  # warm-up: connections, pools, first records
                    _load(started[label][1], connections, 1.0, script, layout.load)
                per: dict[str, list[dict]] = {"on": [], "off": []}
                paired: list[float] = []
                for r in range(rounds):
                    order = ("on", "off") if r % 2 == 0 else ("off", "on")
                    for label in order:
                        per[label].append(_load(started[label][1], connections, seconds, script, layout.load,
                                                started[label][0].pid))
                    # Paired: both loaded at once on the same core, so whatever else the machine
                    # does hits both alike; their req/s ratio is their CPU-per-request ratio.
                    with ThreadPoolExecutor(2) as pool:
                        on_f, off_f = (pool.submit(_load, started[lb][1], connections, seconds, script, layout.load)
                                       for lb in ("on", "off"))
                        on_r, off_r = on_f.result(), off_f.result()
                    if off_r["rps"]:
                        paired.append(on_r["rps"] / off_r["rps"])
                for label in ("on", "off"):
                    started[label][0].stop()
                    procs.remove(started[label][0])
                on_rps = _median([x["rps"] for x in per["on"]])
                off_rps = _median([x["rps"] for x in per["off"]])
                on_cpu = _median([x.get("cpu_us_per_req", 0.0) for x in per["on"]])
                off_cpu = _median([x.get("cpu_us_per_req", 0.0) for x in per["off"]])
                check = verify(started["on"][2])
                served = sum(x["requests"] for x in per["on"])
                cell = {
                    "variant": variant, "fsync": fsync, "connections": connections, "rounds": rounds,
                    "seconds": seconds, "load": load_name,
                    "on_rps": round(on_rps, 1), "off_rps": round(off_rps, 1),
                    "ratio": round(on_rps / off_rps, 4) if off_rps else None,
                    "cost_pct": round((1 - on_rps / off_rps) * 100, 1) if off_rps else None,
                    "on_p50_us": _median([x["p50_us"] for x in per["on"]]),
                    "off_p50_us": _median([x["p50_us"] for x in per["off"]]),
                    "on_p99_us": _median([x["p99_us"] for x in per["on"]]),
                    "off_p99_us": _median([x["p99_us"] for x in per["off"]]),
                    # CPU per request: robust when other work shares the core (req/s is not).
                    # 1e6 / cpu_us_per_req is the req/s one fully used core would give.
                    "on_cpu_us_per_req": round(on_cpu, 1), "off_cpu_us_per_req": round(off_cpu, 1),
                    "cpu_ratio": round(off_cpu / on_cpu, 4) if on_cpu else None,
                    "cpu_cost_pct": round((1 - off_cpu / on_cpu) * 100, 1) if on_cpu else None,
                    "paired_ratio": round(_median(paired), 4) if paired else None,
                    "paired_cost_pct": round((1 - _median(paired)) * 100, 1) if paired else None,
                    "paired_rounds": [round(x, 3) for x in paired],
                    "errors": sum(x["error_count"] for x in per["on"] + per["off"]),
                    "on_rounds_rps": [round(x["rps"]) for x in per["on"]],
                    "off_rounds_rps": [round(x["rps"]) for x in per["off"]],
                    "audit_verify": "OK" if check.ok else f"FAIL {check.error}",
                    "audit_records": check.records, "measured_calls_on": served,
                }
                results.append(cell)
                log(f"  {variant:<12} fsync {fsync:<9} on {on_rps:>9,.0f} req/s  off {off_rps:>9,.0f} req/s  "
                    f"ratio {cell['ratio']}  ({cell['cost_pct']}% cost); CPU/req on {on_cpu:.0f} us off "
                    f"{off_cpu:.0f} us ({cell['cpu_cost_pct']}% cost); paired ratio {cell['paired_ratio']} "
                    f"({cell['paired_cost_pct']}% cost)  verify {cell['audit_verify']}")
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(audit_root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def proxy_table(results: list[dict]) -> str:
    head = (f"{'variant':<13}{'fsync':<10}{'on req/s':>10}{'off req/s':>11}{'on/off':>8}{'cost':>7}"
            f"{'cpu us/req on':>15}{'off':>6}{'cpu cost':>10}{'paired':>8}{'cost':>7}{'p50 on':>9}{'p50 off':>9}"
            f"{'errors':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r['variant']:<13}{r['fsync']:<10}{r['on_rps']:>10,.0f}{r['off_rps']:>11,.0f}"
                    f"{r['ratio']:>8.3f}{r['cost_pct']:>6.1f}%{r['on_cpu_us_per_req']:>15.0f}"
                    f"{r['off_cpu_us_per_req']:>6.0f}{r['cpu_cost_pct']:>9.1f}%{r['paired_ratio']:>8.3f}"
                    f"{r['paired_cost_pct']:>6.1f}%{r['on_p50_us']:>9.0f}"
                    f"{r['off_p50_us']:>9.0f}{r['errors']:>8}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="measured time per append cell")
    ap.add_argument("--dir", default=None, help="where the temporary logs go (the disk under test)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--proxy-seconds", type=float, default=3.0, help="measured time per proxy round")
    ap.add_argument("--rounds", type=int, default=3, help="proxy rounds per configuration (alternating)")
    ap.add_argument("--connections", type=int, default=32, help="proxy load connections")
    ap.add_argument("--proxy-fsync", default="interval", help="fsync modes for the proxy runs, comma-separated")
    ap.add_argument("--variants", default=",".join(PROXY_VARIANTS), help="proxy variants: full, passthrough")
    ap.add_argument("--skip-append", action="store_true", help="skip the AuditLog.append cells")
    ap.add_argument("--skip-proxy", action="store_true", help="skip the proxy end-to-end runs")
    args = ap.parse_args(argv)
    out: dict = {}
    if not args.skip_append:
        coro = run(args.seconds, directory=args.dir)
        results = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
        where = args.dir or tempfile.gettempdir()
        print(f"audit log append throughput ({'uvloop' if uvloop else 'asyncio'}, {os.cpu_count()} CPUs, "
              f"logs under {where}, {args.seconds:g}s per cell)")
        print(table(results))
        out["audit_append"] = results
    if not args.skip_proxy:
        fsyncs = tuple(m.strip() for m in args.proxy_fsync.split(",") if m.strip())
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        bad = [m for m in fsyncs if m not in ("interval", "always", "never")] + \
              [v for v in variants if v not in PROXY_VARIANTS]
        if bad:
            ap.error(f"unknown fsync mode or variant: {', '.join(bad)}")
        if out:
            print()
        proxy = run_proxy(args.proxy_seconds, args.rounds, args.connections, args.dir, fsyncs, variants)
        print("proxy end-to-end req/s, audit on vs off (median of alternating rounds, measured in one run)")
        print(proxy_table(proxy))
        out["proxy_audit_on_off"] = proxy
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
