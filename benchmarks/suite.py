"""The benchmark run: start the upstream and the targets, drive them with wrk in
alternating rounds, draw the scaling curves, run the engine micro-benchmark,
and hand everything to `report` for the JSON, the PNG and the table.

Rounds alternate targets (and rotate their order each round) so that drift on
the machine — a noisy neighbour, thermal state — lands on every target alike;
each cell's figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import loadgen, realistic, report, servers, workload
from .targets import (BENCH_AGENT, BENCH_KEY, REQUEST_HEADERS, REQUEST_PATH, TARGETS, Context, Running, bench_bundle,
                      cpu_count, layout_for, start_regate, write_keys)

ROOT = servers.ROOT
DATA_SIZES = (10, 1_000, 100_000)
BODY_SIZES = (100, 10_000, 1_000_000)

MODES = {
    # duration/warmup/scaling in seconds per wrk run
    "quick": {"duration": 2.0, "warmup": 1.0, "rounds": 1, "scaling_duration": 1.0, "agents": 1_000,
              "rates": "200"},
    "full": {"duration": 5.0, "warmup": 3.0, "rounds": 3, "scaling_duration": 5.0, "agents": 10_000,
             "rates": "200,500"},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smoke(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
          patience_s: float = 15.0) -> None:
    """Requests through the target until one answers 200: a target that never does is
    misconfigured, not slow. Patience covers first-call costs (OPA prepares its
    query on the first evaluation, which can outlast policy.timeout_ms)."""
    deadline = time.monotonic() + patience_s
    while True:
        req = urllib.request.Request(url, data=body, method=method, headers={**REQUEST_HEADERS, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status == 200:
                    return
                status, text = r.status, r.read()[:500]
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read()[:500]
        if time.monotonic() > deadline:
            raise servers.StartError(f"{method} {url} answered {status}: {text.decode(errors='replace')}")
        time.sleep(0.5)


def cpu_times() -> list[int] | None:
    """The machine-wide `cpu` line of /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_share(before: list[int] | None, after: list[int] | None) -> dict:
    if not before or not after:
        return {}
    d = [a - b for a, b in zip(after, before)]
    total = sum(d[:8]) or 1
    return {"busy_pct": round(100 * (total - d[3] - d[4]) / total, 1), "steal_pct": round(100 * d[7] / total, 1)}


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def json_body(size: int) -> bytes:
    head, tail = b'{"query":"', b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def _median_cell(rounds: list[loadgen.WrkResult]) -> dict:
    med = lambda attr: round(statistics.median(getattr(r, attr) for r in rounds), 1)  # noqa: E731
    cpu = [r.cpu_us_per_req for r in rounds if r.cpu_us_per_req is not None]
    errors: dict[str, int] = {}
    for r in rounds:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {
        "rps": med("rps"), "p50_us": med("p50_us"), "p90_us": med("p90_us"), "p99_us": med("p99_us"),
        "p99.9_us": med("p999_us"), "mean_us": med("mean_us"), "requests": sum(r.requests for r in rounds),
        "cpu_us_per_req": round(statistics.median(cpu), 1) if cpu else None,
        "errors": errors, "error_count": sum(errors.values()), "rounds": [r.as_dict() for r in rounds],
    }


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "quick" if args.quick else "full"
        m = MODES[self.mode]
        self.duration = args.duration if args.duration is not None else m["duration"]
        self.warmup = args.warmup if args.warmup is not None else m["warmup"]
        self.rounds = args.rounds if args.rounds is not None else m["rounds"]
        self.scaling_duration = args.duration if args.duration is not None else m["scaling_duration"]
        self.conns = [int(c) for c in args.conns.split(",")]
        self.log = log
        self.cases = {"both": ("realistic", "cache-hit")}.get(args.workload, (args.workload,))
        self.agents = args.agents if args.agents is not None else m["agents"]
        self.rates = [float(r) for r in (args.rates or m["rates"]).split(",") if r]
        self.wl_conns = [int(c) for c in args.wl_conns.split(",")]
        names = [n.strip() for n in args.targets.split(",") if n.strip()] if args.targets else list(TARGETS)
        unknown = [n for n in names if n not in TARGETS]
        if unknown:
            raise SystemExit(f"unknown target(s): {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
        # Added latency is measured against direct: it always runs.
        self.names = ["direct"] + [n for n in names if n != "direct"]
        self.layout = layout_for(cpu_count())
        self.tmp = Path(tempfile.mkdtemp(prefix="regate-bench-"))
        self.running: dict[str, Running] = {}
        self.procs: list[servers.Proc] = []
        self.results: dict = {"targets": {}, "scaling": {"data": [], "body": []}, "engines": None, "notes": []}
        self.scripts: dict[str, Path] = {}

    # -- helpers -------------------------------------------------------------

    def script(self, key: str, method: str = "GET", body: bytes | None = None) -> Path:
        if key not in self.scripts:
            body_file = None
            headers = dict(REQUEST_HEADERS)
            if body is not None:
                body_file = self.tmp / f"body-{key}.json"
                body_file.write_bytes(body)
                headers["Content-Type"] = "application/json"
            self.scripts[key] = loadgen.write_script(self.tmp / f"wrk-{key}.lua", method, headers, body_file)
        return self.scripts[key]

    def wrk(self, url: str, conns: int, duration: float, script: Path,
            running: Running | None = None) -> loadgen.WrkResult:
        pids = [p.pid for p in running.procs] if running is not None else []
        before = servers.cpu_seconds(pids) if pids else None
        result = loadgen.run(url + REQUEST_PATH, conns, duration, script, self.layout.load)
        after = servers.cpu_seconds(pids) if pids else None
        if before is not None and after is not None and result.requests:
            result.cpu_us_per_req = round((after - before) * 1e6 / result.requests, 1)
        time.sleep(0.2)  # let closed connections settle before the next run
        return result

    def start(self, name: str) -> Running | None:
        entry = self.results["targets"].setdefault(name, {"description": TARGETS[name].description})
        log(f"starting {name}")
        try:
            running = TARGETS[name].start(self.ctx)
        except Exception as exc:  # a target that cannot start is reported, the run goes on
            entry.update(available=False, reason=str(exc))
            log(f"  {name} unavailable: {str(exc).splitlines()[0]}")
            return None
        try:
            smoke(running.url + REQUEST_PATH)
        except Exception as exc:
            running.stop()
            entry.update(available=False, reason=str(exc))
            log(f"  {name} unavailable: {exc}")
            return None
        entry.update(available=True, url=running.url, startup_s=round(running.startup_s, 2), **running.info)
        policy = (running.info.get("policy") or {})
        wanted = ((running.info.get("config") or {}).get("policy") or {}).get("engine")
        if wanted and wanted != "off" and policy.get("engine") != wanted:
            note = (f"{name}: config asks for engine {wanted!r} but Regate reports {policy.get('engine')!r}: "
                    "the policy is not really evaluated in this run")
            self.results["notes"].append(note)
            log(f"  NOTE {note}")
        self.running[name] = running
        return running

    # -- phases --------------------------------------------------------------

    def setup(self) -> None:
        if loadgen.wrk_binary() is None:
            raise SystemExit("wrk is not installed: run `make bench` (it installs wrk and nginx), "
                             "or apt-get install wrk nginx")
        kind = "nginx" if servers.nginx_binary() else "aiohttp-fallback"
        if kind != "nginx":
            self.results["notes"].append("nginx missing: upstream and direct are the aiohttp fallback "
                                         "(benchmarks/fallback_upstream.py); nginx target unavailable")
        log(f"temp dir {self.tmp}; layout: {self.layout.note}; upstream: {kind}")
        if kind == "nginx":
            proc, url = servers.start_nginx_upstream("upstream", self.tmp, self.layout.upstream)
        else:
            proc, url = servers.start_fallback_upstream("upstream", self.tmp, self.layout.upstream)
        self.procs.append(proc)
        tools: list[dict] = []
        if "realistic" in self.cases:
            # The workload's agents, keys, limits and routes, beside the cache-hit case's coder-7 and echo.
            log(f"generating the realistic workload: {self.args.requests:,} calls, {self.agents:,} agents")
            self.wl = workload.generate(self.tmp / "workload", self.agents, self.args.requests)
            keys = workload.write_keys(self.tmp / "keys.yaml", self.agents, ((BENCH_KEY, BENCH_AGENT),))
            rego, data = workload.bundle(self.tmp / "bundle", self.agents)
            tools = workload.tool_routes(url)
        else:
            keys = write_keys(self.tmp / "keys.yaml")
            rego, data = bench_bundle(self.tmp / "bundle")
        self.ctx = Context(self.tmp, self.layout, url, kind, keys, rego, data, tools)
        self.results["upstream"] = kind

    def main_rounds(self) -> None:
        # Started side by side: each waits on its own readiness, and Regate's
        # start-up (imports, policy compile) dominates a run's set-up time.
        from concurrent.futures import ThreadPoolExecutor

        for name in self.names:  # the table's order, whatever order they come up in
            self.results["targets"][name] = {"description": TARGETS[name].description}
        with ThreadPoolExecutor(len(self.names)) as pool:
            list(pool.map(self.start, self.names))
        live = [n for n in self.names if n in self.running]
        if "realistic" in self.cases:
            self.results["realistic"] = realistic.Phase(self, self.wl, self.rates, self.wl_conns).run()
        if "cache-hit" not in self.cases:
            return
        script = self.script("get")
        warm_conns = max(self.conns)
        for name in live:
            log(f"warm-up {name} ({self.warmup:g}s at {warm_conns} connections)")
            self.wrk(self.running[name].url, warm_conns, self.warmup, script)
        cells: dict[str, dict[int, list[loadgen.WrkResult]]] = {n: {c: [] for c in self.conns} for n in live}
        for rnd in range(self.rounds):
            order = live[rnd % len(live):] + live[:rnd % len(live)]
            for conns in self.conns:
                for name in order:
                    r = self.wrk(self.running[name].url, conns, self.duration, script, self.running[name])
                    cells[name][conns].append(r)
                    log(f"round {rnd + 1}/{self.rounds} {name:>20} c={conns:<3} {r.rps:>9.0f} req/s "
                        f"p50 {r.p50_us:>7.0f}us p99 {r.p99_us:>7.0f}us errors {r.error_count}")
        for name in live:
            self.results["targets"][name]["results"] = {str(c): _median_cell(cells[name][c]) for c in self.conns}

    def data_scaling(self) -> None:
        direct = self.running.get("direct")
        if direct is None:
            return
        script = self.script("get")
        base = self.wrk(direct.url, 1, self.scaling_duration, script)
        for agents in DATA_SIZES:
            log(f"data scaling: regate-full with {agents:,} agents")
            rego, data = bench_bundle(self.tmp / f"bundle-{agents}", agents)
            point: dict = {"agents": agents}
            try:
                running = start_regate(self.ctx, f"regate-full-{agents}", "full", rego=rego, data=data)
                smoke(running.url + REQUEST_PATH)
            except Exception as exc:
                point.update(available=False, reason=str(exc))
                self.results["scaling"]["data"].append(point)
                log(f"  unavailable: {str(exc).splitlines()[0]}")
                continue
            try:
                if self.mode == "full":
                    self.wrk(running.url, 32, 1.0, script)  # warm-up
                # The 32-connection run first: in quick mode it is the warm-up too.
                many = self.wrk(running.url, 32, self.scaling_duration, script, running)
                one = self.wrk(running.url, 1, self.scaling_duration, script, running)
            finally:
                running.stop()
            point.update(available=True, startup_s=round(running.startup_s, 2), policy=running.info.get("policy"),
                         direct_p50_us=base.p50_us, p50_us=one.p50_us, p99_us=one.p99_us,
                         added_p50_us=round(one.p50_us - base.p50_us, 1), rps_32=round(many.rps, 1),
                         p99_us_32=many.p99_us, cpu_us_per_req_32=many.cpu_us_per_req,
                         errors=one.error_count + many.error_count)
            self.results["scaling"]["data"].append(point)
            log(f"  added p50 {point['added_p50_us']}us, {point['rps_32']} req/s at 32, startup {point['startup_s']}s")

    def body_scaling(self) -> None:
        names = [n for n in ("direct", "bare", "regate-full") if n in self.running]
        if "direct" not in names:
            return
        for size in BODY_SIZES:
            body = json_body(size)
            script = self.script(f"post-{size}", "POST", body)
            row: dict = {"bytes": size}
            for name in names:
                url = self.running[name].url
                try:
                    smoke(url + REQUEST_PATH, "POST", body, {"Content-Type": "application/json"})
                except Exception as exc:
                    row[name] = {"available": False, "reason": str(exc)}
                    continue
                if self.mode == "full":
                    self.wrk(url, 1, 1.0, script)  # warm-up at this size
                many = self.wrk(url, 32, self.scaling_duration, script, self.running[name])
                one = self.wrk(url, 1, self.scaling_duration, script, self.running[name])
                row[name] = {"p50_us": one.p50_us, "p99_us": one.p99_us, "rps_1": round(one.rps, 1),
                             "rps_32": round(many.rps, 1), "p99_us_32": many.p99_us,
                             "cpu_us_per_req_32": many.cpu_us_per_req,
                             "errors": one.error_count + many.error_count}
            for name in names:
                if name != "direct" and "p50_us" in row.get(name, {}) and "p50_us" in row.get("direct", {}):
                    row[name]["added_p50_us"] = round(row[name]["p50_us"] - row["direct"]["p50_us"], 1)
            self.results["scaling"]["body"].append(row)
            log(f"body {size:,} B: " + ", ".join(
                f"{n} {row[n].get('rps_32', '-')} req/s" for n in names if isinstance(row.get(n), dict)))

    def engines(self) -> None:
        out = self.tmp / "engines.json"
        cmd = [sys.executable, "-m", "benchmarks.engine_bench", "--json", str(out)]
        if self.mode == "quick":
            cmd.append("--quick")
        if self.layout.aux:
            cmd += ["--server-cpus", self.layout.aux]
        log("engine micro-benchmark")
        proc = subprocess.run(servers.pinned(cmd, self.layout.target), cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0 or not out.exists():
            self.results["engines"] = {"error": f"engine_bench exited {proc.returncode}: {proc.stderr[-2000:]}"}
            return
        self.results["engines"] = json.loads(out.read_text())

    def stop_all(self) -> None:
        for running in self.running.values():
            running.stop()
        self.running.clear()
        for p in self.procs:
            p.stop()
        self.procs.clear()

    def machine(self) -> dict:
        def version(cmd: list[str]) -> str:
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
                return (p.stdout + p.stderr).strip().splitlines()[0]
            except Exception:
                return "unknown"

        cpu = "unknown"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        import aiohttp
        import uvloop

        commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "proxy"], capture_output=True,
                               text=True).stdout.strip()
        return {
            "cpu": cpu, "cpus": cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "aiohttp": aiohttp.__version__, "uvloop": uvloop.__version__,
            "wrk": version(["wrk", "-v"]) if loadgen.wrk_binary() else None,
            "nginx": version([servers.nginx_binary(), "-v"]) if servers.nginx_binary() else None,
            "git_commit": commit + ("+dirty" if dirty else ""),
        }

    def run(self) -> int:
        t0 = time.monotonic()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        load_before, cpu_before = load_average(), cpu_times()
        if load_before and load_before[0] > 0.5:
            self.results["notes"].append(
                f"the machine was busy before the run (load average {load_before[0]:.2f}): other processes "
                "compete with the targets, so absolute figures are low and noisy; ratios within the run hold better")
        try:
            self.setup()
            self.main_rounds()
            if not self.args.no_scaling:
                self.data_scaling()
                self.body_scaling()
        finally:
            self.stop_all()
        if not self.args.no_engines:
            self.engines()
        machine = self.machine()
        # What else the machine did meanwhile: busy includes the benchmark itself;
        # steal is CPU time the hypervisor gave to other guests.
        machine.update(load_average_before=load_before, load_average_after=load_average(),
                       cpu_during_run=cpu_share(cpu_before, cpu_times()))
        self.results.update(
            schema=1, mode=self.mode, started_at=started, wall_s=round(time.monotonic() - t0, 1),
            machine=machine, layout=self.layout.as_dict(),
            settings={"duration_s": self.duration, "warmup_s": self.warmup, "rounds": self.rounds,
                      "connections": self.conns, "scaling_duration_s": self.scaling_duration,
                      "request": f"GET {REQUEST_PATH}", "wrk": "1 thread, closed loop",
                      "cases": list(self.cases), "cache_hit": "the `targets` section: one identical request "
                      f"(GET {REQUEST_PATH}) over and over, so every decision is a cache hit",
                      "realistic": {"agents": self.agents, "requests": self.args.requests, "rates": self.rates,
                                    "connections": self.wl_conns,
                                    "closed_loop": "wrk, 1 thread, Lua request() cycling the pre-generated pool",
                                    "open_loop": "python -m benchmarks.workload drive: asyncio+uvloop on raw "
                                                 "sockets, 1-2 processes x 64 connections, latency from the "
                                                 "scheduled send time"}},
        )
        report.finish(self.results)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest.json").write_text(json.dumps(self.results, indent=2) + "\n")
        print(report.write_outputs(self.results, out))
        written = [p.name for p in (out / "latest.json", out / "latest.md", out / "latest.png", out / "workload.png")
                   if p.exists()]
        print(f"\nwrote {', '.join(written)} in {out} in {self.results['wall_s']:.0f}s")
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"kept {self.tmp}")
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="Regate's benchmark suite (issue 5).")
    ap.add_argument("--quick", action="store_true", help="short runs, one round (under 2 minutes)")
    ap.add_argument("--targets", help=f"comma-separated subset of: {', '.join(TARGETS)} (direct always runs)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (whole seconds; default 5, quick 2)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per target (default 3, quick 1)")
    ap.add_argument("--rounds", type=int, help="rounds over all targets (default 3, quick 1)")
    ap.add_argument("--conns", default="1,32,256", help="wrk connection counts (default 1,32,256)")
    ap.add_argument("--workload", choices=("both", "realistic", "cache-hit"), default="both",
                    help="realistic: distinct calls (benchmarks/workload.py); cache-hit: one identical request; "
                         "both (default): realistic first")
    ap.add_argument("--agents", type=int, help="agents in the realistic workload (default 10,000; quick 1,000)")
    ap.add_argument("--requests", type=int, default=10_000,
                    help="distinct calls in the pool, cycled (default 10,000: more than the decision cache holds)")
    ap.add_argument("--rates", help="open-loop rates, calls/s, comma-separated (default 200,500; quick 200)")
    ap.add_argument("--wl-conns", default="1,32", help="closed-loop connection counts for the realistic workload")
    ap.add_argument("--no-scaling", action="store_true", help="skip the data-size and body-size curves")
    ap.add_argument("--no-engines", action="store_true", help="skip the engine micro-benchmark")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="where latest.{json,png,md} go")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, audit)")
    args = ap.parse_args(argv)
    suite = Suite(args)
    try:
        return suite.run()
    except KeyboardInterrupt:
        suite.stop_all()
        return 130
