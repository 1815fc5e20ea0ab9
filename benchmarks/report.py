"""What a run tells: added latency against `direct`, the ratios the targets are
stated in, the printed table (and its Markdown twin for the README), and the
PNG.

Every ratio is between figures measured in the same run, never against numbers
from another day or machine.
"""

from __future__ import annotations

from pathlib import Path

# The targets of issue 5, as ratios within one run.
TARGET_RPS_VS_BARE = 0.80       # regate-full req/s ÷ bare req/s at 32 connections, at least
TARGET_ADDED_P50_VS_BARE = 1.5  # regate-full added p50 ÷ bare added p50 at 1 connection, at most
TARGET_ENGINE_P50_US = 30.0     # embedded engine p50 per decision at 100,000 agents, at most


def _cell(results: dict, target: str, conns: int) -> dict | None:
    t = results["targets"].get(target) or {}
    return (t.get("results") or {}).get(str(conns))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def finish(results: dict) -> None:
    """Add added-latency figures, the ratios and the verdicts to `results`."""
    direct1 = _cell(results, "direct", 1)
    for name, t in results["targets"].items():
        one = _cell(results, name, 1)
        if one is not None and direct1 is not None and name != "direct":
            t["added_p50_us"] = round(one["p50_us"] - direct1["p50_us"], 1)
            t["added_p99_us"] = round(one["p99_us"] - direct1["p99_us"], 1)

    def rps(name: str, c: int) -> float | None:
        cell = _cell(results, name, c)
        return cell["rps"] if cell else None

    def cpu(name: str, c: int) -> float | None:
        cell = _cell(results, name, c)
        return cell.get("cpu_us_per_req") if cell else None

    def added(name: str) -> float | None:
        return (results["targets"].get(name) or {}).get("added_p50_us")

    engine_p50 = None
    engines = results.get("engines") or {}
    for row in engines.get("results", []):
        if row.get("engine") == "embedded" and row.get("agents") == 100_000 and row.get("available"):
            engine_p50 = row.get("p50_us")
    ratios = {
        "full_rps_vs_bare_32": _ratio(rps("regate-full", 32), rps("bare", 32)),
        "full_added_p50_vs_bare_1": _ratio(added("regate-full"), added("bare")),
        "full_rps_vs_nginx_32": _ratio(rps("regate-full", 32), rps("nginx", 32)),
        "full_rps_vs_bare_256": _ratio(rps("regate-full", 256), rps("bare", 256)),
        "passthrough_rps_vs_bare_32": _ratio(rps("regate-passthrough", 32), rps("bare", 32)),
        "opa_rps_vs_full_32": _ratio(rps("regate-opa", 32), rps("regate-full", 32)),
        "redis_rps_vs_full_32": _ratio(rps("regate-full-redis", 32), rps("regate-full", 32)),
        "full_rps_vs_notrace_32": _ratio(rps("regate-full", 32), rps("regate-full-notrace", 32)),
        "full_rps_vs_again_32": _ratio(rps("regate-full", 32), rps("regate-full-again", 32)),
        "otel_rps_vs_full_32": _ratio(rps("regate-full-otel", 32), rps("regate-full", 32)),
        "w2_rps_vs_full_32": _ratio(rps("regate-full-w2", 32), rps("regate-full", 32)),
        # CPU per request barely moves when other processes share the machine:
        # bare's CPU/req ÷ full's is the req/s ratio one saturated core would give.
        "full_cpu_per_req_vs_bare_32": _ratio(cpu("regate-full", 32), cpu("bare", 32)),
        "bare_cpu_vs_full_cpu_32": _ratio(cpu("bare", 32), cpu("regate-full", 32)),
    }
    results["ratios"] = ratios

    def verdict(value: float | None, limit: float, at_least: bool) -> dict:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        return {"value": value, "limit": limit, "at_least" if at_least else "at_most": True, "met": met}

    results["targets_met"] = {
        "full_rps_vs_bare_32": verdict(ratios["full_rps_vs_bare_32"], TARGET_RPS_VS_BARE, True),
        "full_added_p50_vs_bare_1": verdict(ratios["full_added_p50_vs_bare_1"], TARGET_ADDED_P50_VS_BARE, False),
        "embedded_p50_us_100k": verdict(engine_p50, TARGET_ENGINE_P50_US, False),
    }


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


_COLUMNS = ("target", "p50@1 µs", "p99@1 µs", "added p50", "added p99", "req/s@1",
            "req/s@32", "p99@32 µs", "CPU µs/req@32", "req/s@256", "p99@256 µs", "errors")


def _rows(results: dict) -> list[list[str]]:
    rows = []
    for name, t in results["targets"].items():
        if not t.get("available"):
            rows.append([name] + ["-"] * (len(_COLUMNS) - 2) + ["unavailable"])
            continue
        res = t.get("results") or {}
        c1, c32, c256 = res.get("1"), res.get("32"), res.get("256")
        errors = sum(c["error_count"] for c in res.values())
        rows.append([
            name,
            _f(c1 and c1["p50_us"]), _f(c1 and c1["p99_us"]),
            _f(t.get("added_p50_us")), _f(t.get("added_p99_us")), _f(c1 and c1["rps"]),
            _f(c32 and c32["rps"]), _f(c32 and c32["p99_us"]), _f(c32 and c32.get("cpu_us_per_req")),
            _f(c256 and c256["rps"]), _f(c256 and c256["p99_us"]), str(errors),
        ])
    return rows


def _ratio_lines(results: dict) -> list[str]:
    r, met = results["ratios"], results["targets_met"]

    def mark(key: str) -> str:
        m = met[key]["met"]
        return "n/a" if m is None else ("met" if m else "MISSED")

    lines = [
        f"Regate-full req/s ÷ bare req/s (32 conns):          {_f(r['full_rps_vs_bare_32'], '{:.2f}'):>6}"
        f"   target ≥ {TARGET_RPS_VS_BARE:.2f}: {mark('full_rps_vs_bare_32')}",
        f"Regate-full added p50 ÷ bare added p50 (1 conn):    {_f(r['full_added_p50_vs_bare_1'], '{:.2f}'):>6}"
        f"   target ≤ {TARGET_ADDED_P50_VS_BARE:.2f}: {mark('full_added_p50_vs_bare_1')}",
        f"Regate-full req/s ÷ nginx req/s (32 conns):         {_f(r['full_rps_vs_nginx_32'], '{:.3f}'):>6}",
        f"Embedded engine p50 at 100,000 agents (µs):         "
        f"{_f(met['embedded_p50_us_100k']['value'], '{:.1f}'):>6}"
        f"   target ≤ {TARGET_ENGINE_P50_US:.0f}: {mark('embedded_p50_us_100k')}",
        f"bare CPU/req ÷ Regate-full CPU/req (32 conns):      {_f(r['bare_cpu_vs_full_cpu_32'], '{:.2f}'):>6}"
        f"   (the req/s ratio on an otherwise idle core)",
        f"Regate-full req/s ÷ bare req/s (256 conns):         {_f(r['full_rps_vs_bare_256'], '{:.2f}'):>6}",
        f"regate-passthrough req/s ÷ bare req/s (32 conns):   {_f(r['passthrough_rps_vs_bare_32'], '{:.2f}'):>6}",
        f"regate-opa req/s ÷ regate-full req/s (32 conns):    {_f(r['opa_rps_vs_full_32'], '{:.2f}'):>6}",
        f"regate-full-redis req/s ÷ regate-full (32 conns):   {_f(r['redis_rps_vs_full_32'], '{:.2f}'):>6}",
        f"regate-full ÷ regate-full-notrace req/s (32 conns): {_f(r['full_rps_vs_notrace_32'], '{:.2f}'):>6}",
        f"regate-full ÷ regate-full-again (the noise, A/A):   {_f(r['full_rps_vs_again_32'], '{:.2f}'):>6}",
        f"regate-full-otel req/s ÷ regate-full (32 conns):    {_f(r['otel_rps_vs_full_32'], '{:.2f}'):>6}",
        f"--workers 2 req/s ÷ regate-full req/s (32 conns):   {_f(r['w2_rps_vs_full_32'], '{:.2f}'):>6}",
    ]
    return lines


def _scaling_lines(results: dict) -> list[str]:
    lines = []
    data = results["scaling"]["data"]
    if data:
        lines.append("\nregate-full vs policy data size:")
        lines.append(f"  {'agents':>8} {'added p50 µs':>13} {'req/s@32':>10} {'CPU µs/req@32':>14} {'startup s':>10}")
        for p in data:
            if not p.get("available"):
                lines.append(f"  {p['agents']:>8,} unavailable: {p.get('reason', '').splitlines()[0][:80]}")
            else:
                lines.append(f"  {p['agents']:>8,} {p['added_p50_us']:>13,.0f} {p['rps_32']:>10,.0f} "
                             f"{_f(p.get('cpu_us_per_req_32')):>14} {p['startup_s']:>10.1f}")
    body = results["scaling"]["body"]
    if body:
        lines.append("\nPOST body size (added p50 µs at 1 conn / req/s at 32 conns):")
        names = [n for n in ("direct", "bare", "regate-full") if any(n in row for row in body)]
        lines.append(f"  {'bytes':>10} " + " ".join(f"{n:>24}" for n in names))
        for row in body:
            cells = []
            for n in names:
                c = row.get(n) or {}
                if "rps_32" not in c:
                    cells.append(f"{'unavailable':>24}")
                else:
                    cells.append(f"{_f(c.get('added_p50_us', 0.0)):>10} / {_f(c['rps_32']):>11}")
            lines.append(f"  {row['bytes']:>10,} " + " ".join(cells))
    engines = results.get("engines") or {}
    if engines.get("results"):
        lines.append("\npolicy engine micro-benchmark (shipped policy):")
        lines.append(f"  {'engine':>16} {'agents':>8} {'decisions/s':>12} {'p50 µs':>8} {'p99 µs':>8}")
        for row in engines["results"]:
            if row.get("available"):
                lines.append(f"  {row['engine']:>16} {row['agents']:>8,} {row['decisions_per_s']:>12,.0f} "
                             f"{row['p50_us']:>8.1f} {row['p99_us']:>8.1f}")
            else:
                lines.append(f"  {row['engine']:>16} {row['agents']:>8,} unavailable: "
                             f"{str(row.get('reason', '')).splitlines()[0][:70]}")
    elif engines.get("error"):
        lines.append(f"\nengine micro-benchmark failed: {engines['error'].splitlines()[-1][:200]}")
    return lines


def table(results: dict) -> str:
    rows = _rows(results)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [f"Regate benchmark ({results['mode']} mode, upstream {results.get('upstream')}, "
           f"{results['machine']['cpus']} CPUs: {results['layout']['note']})",
           fmt(_COLUMNS), fmt(["-" * w for w in widths])]
    out += [fmt(r) for r in rows]
    out.append("")
    out += _ratio_lines(results)
    out += _scaling_lines(results)
    for note in results.get("notes", []):
        out.append(f"NOTE: {note}")
    return "\n".join(out)


def markdown(results: dict) -> str:
    head = "| " + " | ".join(_COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(_COLUMNS))) + "|"
    body = ["| " + " | ".join(r) + " |" for r in _rows(results)]
    return "\n".join([head, sep, *body, "", "```", *_ratio_lines(results), *_scaling_lines(results), "```"])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    fig.suptitle(f"Regate benchmark — {results['mode']} mode, {results['started_at']}, "
                 f"{results['machine']['cpus']} CPUs, upstream {results.get('upstream')}", fontsize=12)
    live = [(n, t) for n, t in results["targets"].items() if t.get("available") and t.get("results")]

    ax = axes[0][0]
    names = [n for n, t in live if n != "direct" and "added_p50_us" in t]
    xs = range(len(names))
    p50 = [results["targets"][n]["added_p50_us"] for n in names]
    p99 = [results["targets"][n]["added_p99_us"] for n in names]
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="added p50")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="added p99")
    for x, v in zip(xs, p50):
        ax.annotate(f"{v:.0f}", (x - 0.2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("µs over direct")
    ax.set_title("added latency at 1 connection")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    names = [n for n, _ in live]
    xs = range(len(names))
    conns = [c for c in ("32", "256") if any(c in t["results"] for _, t in live)]
    width = 0.8 / max(1, len(conns))
    for i, c in enumerate(conns):
        vals = [t["results"].get(c, {}).get("rps", 0) for _, t in live]
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        ax.bar(pos, vals, width, label=f"{c} connections")
        for x, v in zip(pos, vals):
            ax.annotate(f"{v / 1000:.1f}k", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("req/s (log)")
    ax.set_title("throughput")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    rows = [r for r in (results.get("engines") or {}).get("results", []) if r.get("available")]
    if rows:
        labels = [f"{r['engine']} ({'100k' if r['agents'] >= 100_000 else r['agents']})" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["p50_us"] for r in rows], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r["p99_us"] for r in rows], 0.4, label="p99")
        for x, r in zip(xs, rows):
            ax.annotate(f"{r['p50_us']:.0f}", (x - 0.2, r["p50_us"]), ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, rotation=35, ha="right", fontsize=7)
        ax.axhline(TARGET_ENGINE_P50_US, color="grey", ls="--", lw=0.8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "engine micro-benchmark not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("µs per decision (log)")
    ax.set_title("policy engines, shipped policy (agents in data)")

    ax = axes[1][0]
    pts = [p for p in results["scaling"]["data"] if p.get("available")]
    if pts:
        xs = [p["agents"] for p in pts]
        ax.plot(xs, [p["added_p50_us"] for p in pts], "o-", color="C0", label="added p50 (1 conn)")
        ax.set_xscale("log")
        ax.set_xlabel("agents in policy data")
        ax.set_ylabel("added p50 µs", color="C0")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(xs, [p["rps_32"] for p in pts], "s--", color="C1", label="req/s (32 conns)")
        ax2.set_ylabel("req/s at 32", color="C1")
        ax2.set_ylim(bottom=0)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("regate-full vs policy data size")

    ax = axes[1][1]
    rows = results["scaling"]["body"]
    if rows:
        xs = [r["bytes"] for r in rows]
        ax2 = ax.twinx()
        for i, n in enumerate(("bare", "regate-full")):
            ys = [(r.get(n) or {}).get("added_p50_us") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{n} added p50 (1 conn)")
            ys = [(r.get(n) or {}).get("rps_32") for r in rows]
            if any(y is not None for y in ys):
                ax2.plot(xs, ys, "s--", color=f"C{i}", alpha=0.6, label=f"{n} req/s (32)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax2.set_yscale("log")
        ax.set_xlabel("POST body bytes (JSON)")
        ax.set_ylabel("added p50 µs (solid)")
        ax2.set_ylabel("req/s at 32 (dashed)")
        ax.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="lower left")
    else:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("request body size")

    ax = axes[1][2]
    ax.axis("off")
    ax.text(0, 1, "\n".join(_ratio_lines(results)), va="top", ha="left", family="monospace", fontsize=7.5,
            transform=ax.transAxes)
    ax.set_title("ratios within this run")

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(results: dict, out: Path) -> str:
    """latest.md (realistic workload first, then the cache-hit case), latest.png and
    workload.png; returns the text to print."""
    from . import realistic

    md, printed = [], []
    if results.get("realistic"):
        realistic.finish(results["realistic"])
        text = realistic.markdown(results["realistic"])
        md += ["## Realistic workload", "", text, ""]
        printed.append(text)
        realistic.plot(results["realistic"], out / "workload.png")
    if any("results" in t for t in results["targets"].values()):
        md += ["## Cache-hit case (one identical request)", "", markdown(results)]
        printed.append(table(results))
        plot(results, out / "latest.png")
    (out / "latest.md").write_text("\n".join(md) + "\n")
    return "\n\n".join(printed)


def main(argv: list[str] | None = None) -> int:
    """Re-render the table, the Markdown and the PNG from a results JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("json", nargs="?", default=str(Path(__file__).parent / "results/latest.json"))
    args = ap.parse_args(argv)
    path = Path(args.json)
    results = json.loads(path.read_text())
    finish(results)
    print(write_outputs(results, path.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
