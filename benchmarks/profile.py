"""Where a target spends its CPU under load: py-spy samples it while wrk drives it.

Starts the upstream and one target pinned as in the suite, warms it up, then
runs wrk at a fixed connection count while `py-spy record` samples the target
(on-CPU only; native frames off). Writes the collapsed stacks (open them in
speedscope, or flamegraph.pl for an SVG) and prints the functions with the most inclusive and self time, with
Regate's own code (proxy/) listed apart.

Run: python -m benchmarks.profile [--target regate-full] [--conns 32] [--seconds 15] [--out DIR]
Needs py-spy (`.venv/bin/pip install py-spy`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from . import loadgen, servers
from .targets import (REQUEST_HEADERS, REQUEST_PATH, TARGETS, Context, bench_bundle, cpu_count, layout_for,
                      write_keys)

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(raw: str) -> tuple[str, str]:
    m = _FRAME.match(raw.strip())
    if not m:
        return raw.strip(), ""
    return m.group("func"), m.group("file")


def analyse(collapsed: Path, top: int = 25, cpu_us_per_req: float | None = None) -> str:
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        seen = set()
        modules = set()
        for f in frames:
            func, file = _frame(f)
            short = _short(file)
            key = f"{func} ({short})"
            if key not in seen:
                inclusive[key] += n
                seen.add(key)
            if short.startswith("proxy/") and not short.endswith(("__main__.py", "cli.py")):
                modules.add(short)
        for m in modules:
            by_module[m] += n
        if frames:
            func, file = _frame(frames[-1])
            self_time[f"{func} ({_short(file)})"] += n
    if total == 0:
        return "no samples"
    if cpu_us_per_req:
        # A function's share of the samples times the CPU each request cost:
        # roughly the µs of CPU it adds to every request.
        pct = lambda n: f"{100 * n / total:5.1f}% {cpu_us_per_req * n / total:6.1f}µs/req"  # noqa: E731
    else:
        pct = lambda n: f"{100 * n / total:5.1f}%"  # noqa: E731
    # Coroutines resumed by the event loop are sampled without the frames
    # above them (uvloop's loop is C), so inclusive time is counted per
    # function and per module, not from the process entry point down.
    out = [f"{total} samples (on-CPU)", "", "inclusive time by Regate module (a sample counts once per module):"]
    out += [f"  {pct(n)}  {k}" for k, n in by_module.most_common()]
    out += ["", "top inclusive, Regate's code (proxy/):"]
    out += [f"  {pct(n)}  {k}" for k, n in inclusive.most_common() if "proxy/" in k][:top]
    out += ["", "top self time, anywhere:"]
    out += [f"  {pct(n)}  {k}" for k, n in self_time.most_common(top)]
    out += ["", "top inclusive, anywhere:"]
    out += [f"  {pct(n)}  {k}" for k, n in inclusive.most_common(top)]
    return "\n".join(out)


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="regate-full", choices=[t for t in TARGETS if t not in ("direct", "nginx")])
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="sample C frames too (uvloop, llhttp, regorus)")
    ap.add_argument("--out", default=None, help="where profile.collapsed / profile.txt go (default: a temp dir)")
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="regate-profile-"))
    out = Path(args.out) if args.out else tmp
    out.mkdir(parents=True, exist_ok=True)
    layout = layout_for(cpu_count())
    upstream, url = servers.start_nginx_upstream("upstream", tmp, layout.upstream)
    running = None
    try:
        rego, data = bench_bundle(tmp / "bundle")
        ctx = Context(tmp, layout, url, "nginx", write_keys(tmp / "keys.yaml"), rego, data)
        running = TARGETS[args.target].start(ctx)
        script = loadgen.write_script(tmp / "get.lua", "GET", REQUEST_HEADERS)
        loadgen.run(running.url + REQUEST_PATH, args.conns, 3, script, layout.load)  # warm-up
        pid = running.procs[0].pid
        if args.target == "regate-full-w2":
            print("note: profiling the supervisor's first worker only", file=sys.stderr)
            kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            pid = int(kids[0])
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            r=loadgen.run(running.url + REQUEST_PATH, args.conns, args.seconds + 2, script, layout.load)))
        load.start()
        time.sleep(1)
        collapsed = out / "profile.collapsed"
        cpu0 = servers.cpu_seconds([pid])
        # --nonblocking reads the target without pausing it (less skew); native
        # unwinding needs the target paused, so --native samples blocking.
        spy_cmd = [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration", str(args.seconds),
                   "--format", "raw", "--output", str(collapsed), *(["--native"] if args.native else ["--nonblocking"])]
        spied = subprocess.run(spy_cmd, capture_output=True, text=True)
        if spied.returncode != 0:
            raise SystemExit(f"py-spy failed: {spied.stderr.strip()[-1000:]}")
        cpu1 = servers.cpu_seconds([pid])
        load.join()
        r = result.get("r")
        cpu_per_req = None
        if r and cpu0 is not None and cpu1 is not None:
            # wrk ran a little longer than py-spy: scale its request count to the sampled window.
            sampled_requests = r.rps * args.seconds
            cpu_per_req = (cpu1 - cpu0) * 1e6 / sampled_requests if sampled_requests else None
        header = (f"{args.target} at {args.conns} connections: {r.rps:,.0f} req/s, p50 {r.p50_us:.0f}us, "
                  f"CPU {cpu_per_req or 0:.0f}µs/req (while sampled at {args.rate}/s)" if r else args.target)
        text = header + "\n" + analyse(collapsed, cpu_us_per_req=cpu_per_req)
        (out / "profile.txt").write_text(text + "\n")
        print(text)
        print(f"\nwrote {out / 'profile.txt'}, {collapsed}")
    finally:
        if running is not None:
            running.stop()
        upstream.stop()
        if out != tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
