"""Audit log throughput: records/s of AuditLog.append for fsync interval and always at 1, 16
and 256 concurrent writers, measured in one run on the same disk.

    python -m benchmarks.audit_bench [--seconds 2] [--dir PATH] [--json OUT]

Each cell runs its writers for --seconds against a fresh log in a temporary directory under
--dir (default: the system temp dir; point it at the disk the audit log will live on) and
reports records/s, append latency p50/p99, mean records per write (group commit) and CPU
microseconds per record (the cost the proxy's event loop pays, fsync thread included).
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
from pathlib import Path

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.audit import AuditLog  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="measured time per cell")
    ap.add_argument("--dir", default=None, help="where the temporary logs go (the disk under test)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    coro = run(args.seconds, directory=args.dir)
    results = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    where = args.dir or tempfile.gettempdir()
    print(f"audit log append throughput ({'uvloop' if uvloop else 'asyncio'}, {os.cpu_count()} CPUs, "
          f"logs under {where}, {args.seconds:g}s per cell)")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"audit_append": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
