"""The realistic-workload phase of a run (`benchmarks/workload.py` makes the calls):
every live target, closed loop (wrk cycling the pool) at 1 and 32 connections and
open loop (the Python client) at fixed rates, in rounds whose target order rotates,
with CPU per call for the target and for the upstream separately. Then the table,
the ratios (A/A control included) and the PNG.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import loadgen, servers, workload

# The targets' socket errors only: a 403/429/202 is the workload's answer, not an error.
SOCKET_ERRORS = ("connect", "read", "write", "timeout")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Phase:
    def __init__(self, suite, wl: workload.Workload, rates: list[float], conns: list[int]) -> None:
        self.suite = suite
        self.wl = wl
        self.rates = rates
        self.conns = conns
        self.script = workload.write_wrk_script(suite.tmp / "wrk-workload.lua", wl.pool)
        self.upstream_pids = [p.pid for p in suite.procs[:1]]

    def _measure(self, name: str, fn) -> dict:
        running = self.suite.running[name]
        target_pids = [p.pid for p in running.procs]
        t_before = servers.cpu_seconds(target_pids)
        u_before = servers.cpu_seconds(self.upstream_pids)
        c_before = _children_cpu()
        cell = fn(running)
        t_after = servers.cpu_seconds(target_pids)
        u_after = servers.cpu_seconds(self.upstream_pids)
        client = _children_cpu() - c_before
        n = cell.get("requests") or 0
        # The open-loop client reports its sending loop's CPU itself (start-up excluded).
        loop_cpu = cell.pop("client_cpu_us_per_req", None)
        per = lambda a, b: round((b - a) * 1e6 / n, 1) if n and a is not None and b is not None else None  # noqa: E731
        cell["cpu_us_per_req"] = per(t_before, t_after)
        cell["upstream_cpu_us_per_req"] = per(u_before, u_after)
        cell["client_cpu_us_per_req"] = loop_cpu if loop_cpu is not None else (
            round(client * 1e6 / n, 1) if n else None)
        time.sleep(0.2)
        return cell

    def closed(self, name: str, conns: int, duration: float) -> dict:
        def go(running) -> dict:
            r = loadgen.run(running.url + "/", conns, duration, self.script, self.suite.layout.load)
            d = r.as_dict()
            d["errors"] = {k: r.errors.get(k, 0) for k in SOCKET_ERRORS}
            d["error_count"] = sum(d["errors"].values())
            d["non_2xx"] = r.errors.get("status", 0)
            return d
        return self._measure(name, go)

    def open(self, name: str, rate: float, duration: float) -> dict:
        def go(running) -> dict:
            port = running.url.rsplit(":", 1)[1]
            procs = 2 if rate >= 400 else 1
            cmd = [sys.executable, "-m", "benchmarks.workload", "drive", "--pool", str(self.wl.pool),
                   "--port", port, "--rate", str(rate), "--duration", str(duration), "--procs", str(procs),
                   "--conns", "64"]
            p = subprocess.run(servers.pinned(cmd, self.suite.layout.load), cwd=servers.ROOT, capture_output=True,
                               text=True, timeout=duration + 120)
            for line in p.stdout.splitlines():
                if line.startswith("OPENLOOP_JSON "):
                    return json.loads(line[len("OPENLOOP_JSON "):])
            raise RuntimeError(f"open-loop client failed ({p.returncode}): {p.stderr[-1000:]}")
        return self._measure(name, go)

    def run(self) -> dict:
        s = self.suite
        live = [n for n in s.names if n in s.running]
        out: dict = {"workload": self.wl.meta, "connections": self.conns, "rates": self.rates, "targets": {}}
        for name in live:
            s.log(f"realistic warm-up {name} ({s.warmup:g}s at 32 connections)")
            self.closed(name, 32, s.warmup)
        cells: dict = {n: {"closed": {c: [] for c in self.conns}, "open": {r: [] for r in self.rates}} for n in live}
        for rnd in range(s.rounds):
            order = live[rnd % len(live):] + live[:rnd % len(live)]
            for conns in self.conns:
                for name in order:
                    r = self.closed(name, conns, s.duration)
                    cells[name]["closed"][conns].append(r)
                    s.log(f"realistic {rnd + 1}/{s.rounds} {name:>20} c={conns:<3} {r['rps']:>8.0f} req/s "
                          f"p50 {r['p50_us']:>7.0f}us p99 {r['p99_us']:>7.0f}us cpu {r['cpu_us_per_req']}us/call "
                          f"statuses {r.get('statuses')}")
            for rate in self.rates:
                for name in order:
                    r = self.open(name, rate, s.duration)
                    cells[name]["open"][rate].append(r)
                    s.log(f"realistic {rnd + 1}/{s.rounds} {name:>20} open {rate:g}/s: {r['rps']:>7.0f} req/s "
                          f"p50 {r['p50_us']:>7.0f}us p99 {r['p99_us']:>7.0f}us p99.9 {r['p99.9_us']:>7.0f}us "
                          f"cpu {r['cpu_us_per_req']}us/call")
        for name in live:
            out["targets"][name] = {
                "closed": {str(c): _median(cells[name]["closed"][c]) for c in self.conns},
                "open": {f"{r:g}": _median(cells[name]["open"][r]) for r in self.rates},
            }
        finish(out)
        return out


def _median(rounds: list[dict]) -> dict:
    keys = ("rps", "p50_us", "p90_us", "p99_us", "p99.9_us", "cpu_us_per_req", "upstream_cpu_us_per_req",
            "client_cpu_us_per_req")
    cell: dict = {}
    for k in keys:
        vals = [r[k] for r in rounds if r.get(k) is not None]
        cell[k] = round(statistics.median(vals), 1) if vals else None
    cell["requests"] = sum(r.get("requests", 0) for r in rounds)
    statuses: dict[str, int] = {}
    for r in rounds:
        for k, v in (r.get("statuses") or {}).items():
            statuses[k] = statuses.get(k, 0) + v
    cell["statuses"] = statuses
    cell["error_count"] = sum(r.get("error_count", 0) for r in rounds)
    if "scheduled" in rounds[0]:
        cell["scheduled"] = sum(r["scheduled"] for r in rounds)
    cell["rounds"] = rounds
    return cell


def _get(out: dict, name: str, kind: str, key: str, field: str):
    return (((out["targets"].get(name) or {}).get(kind) or {}).get(key) or {}).get(field)


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def finish(out: dict) -> None:
    """Added latency against direct (same workload, same loop), and the ratios."""
    for name, t in out["targets"].items():
        for kind in ("closed", "open"):
            for key, cell in t[kind].items():
                base = _get(out, "direct", kind, key, "p50_us")
                if name != "direct" and base is not None:
                    for p in ("p50_us", "p99_us", "p99.9_us"):
                        d = _get(out, "direct", kind, key, p)
                        if cell.get(p) is not None and d is not None:
                            cell["added_" + p] = round(cell[p] - d, 1)
    r = {}
    for n in ("regate-full", "regate-passthrough", "regate-opa", "regate-full-w2"):
        r[f"{n}_cpu_vs_bare_32"] = _ratio(_get(out, n, "closed", "32", "cpu_us_per_req"),
                                          _get(out, "bare", "closed", "32", "cpu_us_per_req"))
        r[f"{n}_rps_vs_bare_32"] = _ratio(_get(out, n, "closed", "32", "rps"), _get(out, "bare", "closed", "32", "rps"))
    r["aa_full_vs_again_cpu_32"] = _ratio(_get(out, "regate-full", "closed", "32", "cpu_us_per_req"),
                                          _get(out, "regate-full-again", "closed", "32", "cpu_us_per_req"))
    r["aa_full_vs_again_rps_32"] = _ratio(_get(out, "regate-full", "closed", "32", "rps"),
                                          _get(out, "regate-full-again", "closed", "32", "rps"))
    r["client_cpu_us_per_req_wrk_32"] = _get(out, "bare", "closed", "32", "client_cpu_us_per_req")
    rate = f"{out['rates'][0]:g}" if out["rates"] else None
    r["client_cpu_us_per_req_python_open"] = _get(out, "bare", "open", rate, "client_cpu_us_per_req") if rate else None
    out["ratios"] = {k: v for k, v in r.items() if v is not None}


def _f(v, fmt="{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(out: dict) -> str:
    rates = [f"{r:g}" for r in out["rates"]]
    head = ["target", "added p50@1 µs", "added p99@1", "added p99.9@1", "req/s@32", "p99@32 µs",
            "CPU µs/call@32", "upstream CPU µs/call@32"]
    for r in rates:
        head += [f"open {r}/s: req/s", "added p50", "added p99", "added p99.9"]
    head.append("statuses (closed, all rounds)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 2) + "---|"]
    for name, t in out["targets"].items():
        one, many = t["closed"].get("1", {}), t["closed"].get("32", {})
        row = [name, _f(one.get("added_p50_us")), _f(one.get("added_p99_us")), _f(one.get("added_p99.9_us")),
               _f(many.get("rps")), _f(many.get("p99_us")), _f(many.get("cpu_us_per_req")),
               _f(many.get("upstream_cpu_us_per_req"))]
        for r in rates:
            c = t["open"].get(r, {})
            row += [_f(c.get("rps")), _f(c.get("added_p50_us")), _f(c.get("added_p99_us")),
                    _f(c.get("added_p99.9_us"))]
        st: dict[str, int] = {}
        for c in t["closed"].values():
            for k, v in c.get("statuses", {}).items():
                st[k] = st.get(k, 0) + v
        total = sum(st.values()) or 1
        row.append(" ".join(f"{k}:{100 * v / total:.0f}%" for k, v in sorted(st.items())))
        lines.append("| " + " | ".join(row) + " |")
    w = out["workload"]
    exp = w.get("expected_statuses_with_policy", {})
    tot = sum(exp.values()) or 1
    lines += ["", f"Workload: {w['requests']:,} distinct calls from {w['agents']:,} agents ({w['flooders']:,} "
              f"rate-limited flooders), cycled; classes {w['classes']}; bodies {w['bodies']['min']:,}–"
              f"{w['bodies']['max']:,} B (median {w['bodies']['median']:,}, mean {w['bodies']['mean']:,}). "
              "Expected statuses with a policy: "
              + " ".join(f"{k}:{100 * v / tot:.0f}%" for k, v in sorted(exp.items()))
              + " (MCP refusals are JSON-RPC errors in a 200); bare, nginx, direct and passthrough "
              "answer 200 to all; `--workers 2` answers approval-needing calls 503 (approvals need the "
              "Redis store there)."]
    ra = out.get("ratios", {})
    if ra:
        lines += ["", "| ratio (realistic workload, same run) | value |", "|---|---:|"]
        for k, v in ra.items():
            lines.append(f"| {k} | {v} |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in out["targets"] if n != "direct"]
    cpu = [out["targets"][n]["closed"].get("32", {}).get("cpu_us_per_req") or 0 for n in names]
    added = [out["targets"][n]["closed"].get("1", {}).get("added_p50_us") or 0 for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh(names, cpu, color="#4477aa")
    axes[0].set_xlabel("CPU µs per call (32 connections)")
    axes[1].barh(names, added, color="#cc6677")
    axes[1].set_xlabel("added p50 µs (1 connection)")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle(f"Realistic workload: {out['workload']['requests']:,} distinct calls, "
                 f"{out['workload']['agents']:,} agents")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
