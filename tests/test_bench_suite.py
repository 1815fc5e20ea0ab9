"""The benchmark suite itself works: a short quick-mode run over three targets
produces the JSON, the PNG and the table, with numbers that make sense.

This checks the suite, not Regate's speed: benchmarks measure, tests check
behaviour. It needs wrk (and uses nginx when present), which `make test`
installs; it runs the suite as `python -m benchmarks`, the way `make bench` does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import orjson

from benchmarks import loadgen, workload

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("direct", "bare", "regate-passthrough", "regate-full")


def test_wrk_output_is_read_from_the_lua_line_and_from_the_text():
    lua = ('WRK_JSON {"requests":1000,"duration_us":2000000,"bytes":5,"errors":{"connect":0,"read":1,"write":0,'
           '"status":2,"timeout":0},"latency_us":{"min":10.0,"mean":20.5,"max":900.0,"stdev":3.0,"p50":19.0,'
           '"p75":22.0,"p90":30.0,"p99":80.0,"p99.9":400.0}}')
    r = loadgen.parse_output("Running 2s test\n" + lua + "\n", 32)
    assert (r.requests, r.rps, r.p50_us, r.p999_us, r.error_count) == (1000, 500.0, 19.0, 400.0, 3)

    text = """Running 2s test @ http://127.0.0.1:1/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   210.50us   40.00us   3.10ms   90.00%
  Latency Distribution
     50%  200.00us
     75%  220.00us
     90%  250.00us
     99%    1.20ms
  9000 requests in 2.00s, 1.00MB read
  Non-2xx or 3xx responses: 4
Requests/sec:   4500.00
Transfer/sec:    500.00KB
"""
    r = loadgen.parse_output(text, 32)
    assert (r.requests, r.rps, r.p50_us, r.p99_us, r.errors["status"]) == (9000, 4500.0, 200.0, 1200.0, 4)


def test_workload_pool_is_distinct_valid_requests_in_the_stated_mix(tmp_path):
    w = workload.generate(tmp_path, agents=20, requests=2000)
    pool = workload.read_pool(w.pool)
    assert len(pool) == 2000 and len(set(pool)) == 2000  # every call distinct
    for cls, share in workload.CLASS_MIX.items():
        assert abs(w.meta["classes"][cls] / 2000 - share) < 0.04, (cls, w.meta["classes"])
    tools = set()
    for raw in pool:
        head, body = raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        method, path, version = lines[0].split(" ")
        assert version == "HTTP/1.1" and path.startswith("/tools/")
        tools.add(path.split("/")[2])
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers["X-Api-Key"].startswith("wl-key-")
        if body:  # JSON only as application/json, length exact, valid UTF-8 JSON
            assert headers["Content-Type"] == "application/json"
            assert int(headers["Content-Length"]) == len(body)
            orjson.loads(body)
            assert method in ("POST", "PUT")
        else:
            assert method == "GET" and "Content-Length" not in headers
    assert tools == {"search", "shell", "files", "payments", "tickets"}
    assert 100_000 >= w.meta["bodies"]["max"] > 10_000


@pytest.mark.timeout(150)
def test_quick_run_writes_json_png_and_table(tmp_path):
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: `make test` installs it (scripts/ensure-debs.sh wrk:wrk nginx:nginx)")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--duration", "1", "--warmup", "1",
           "--targets", ",".join(TARGETS), "--no-scaling", "--no-engines", "--out", str(tmp_path),
           "--agents", "20", "--requests", "500", "--rates", "50"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["mode"] == "quick"
    assert results["upstream"] in ("nginx", "aiohttp-fallback")
    for name in TARGETS:
        target = results["targets"][name]
        assert target["available"], target.get("reason")
        for conns in ("1", "32", "256"):
            cell = target["results"][conns]
            assert cell["rps"] > 0 and cell["requests"] > 0, (name, conns, cell)
            assert cell["error_count"] == 0, (name, conns, cell["errors"])
            assert 0 < cell["p50_us"] <= cell["p90_us"] <= cell["p99_us"] <= cell["p99.9_us"], (name, conns, cell)
    # A proxy hop costs something: the added latency is measured against direct.
    assert results["targets"]["bare"]["added_p50_us"] > 0
    assert results["ratios"]["passthrough_rps_vs_bare_32"] > 0

    # The realistic workload: pass-throughs answer 200 to every call; the policy
    # target answers the mix (allowed, denied, rate-limited, approval-needing).
    real = results["realistic"]["targets"]
    for name in TARGETS:
        for conns in ("1", "32"):
            cell = real[name]["closed"][conns]
            assert cell["requests"] > 0 and cell["error_count"] == 0, (name, conns, cell)
            assert cell["cpu_us_per_req"] > 0, (name, conns, cell)
        opened = real[name]["open"]["50"]
        assert opened["requests"] == opened["scheduled"] > 0 and opened["error_count"] == 0, (name, opened)
        statuses = set(real[name]["closed"]["32"]["statuses"])
        assert statuses == ({"200", "202", "403", "429"} if name == "regate-full" else {"200"}), (name, statuses)
    assert "Realistic workload" in (tmp_path / "latest.md").read_text()

    png = (tmp_path / "latest.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    table = proc.stdout
    for name in TARGETS:
        assert name in table
    assert "req/s@32" in table and "added p50" in table
    assert "Regate-full req/s ÷ bare req/s" in table
    md = (tmp_path / "latest.md").read_text()
    assert md.startswith("## Realistic workload\n\n| target") and "## Cache-hit case" in md
