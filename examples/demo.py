"""`make demo`: a demo tool, Regate in front of it, and a few real agent calls.

Prints each call's outcome (status, Regate's decision, the reasons), then keeps
Regate in the foreground until Ctrl-C, or exits with `--once`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CALLS = [
    # (agent key, method, path, JSON body, what it shows)
    ("demo-key-coder-7", "GET", "/tools/search/?q=rate+limits", None, "a granted call goes through"),
    ("demo-key-coder-7", "POST", "/tools/shell/run", {"command": "ls -la /workspace"}, "a harmless shell command"),
    ("demo-key-coder-7", "POST", "/tools/shell/run", {"command": "rm -rf /"}, "a destructive command is refused"),
    ("demo-key-coder-7", "GET", "/tools/files/workspace/notes.txt", None, "a file inside the workspace"),
    ("demo-key-coder-7", "GET", "/tools/files/etc/shadow", None, "a file outside the workspace"),
    ("demo-key-coder-7", "POST", "/tools/payments/transfer", {"amount": 10, "to": "acme"}, "a tool not granted"),
    ("demo-key-analyst-2", "POST", "/tools/payments/transfer", {"amount": 50, "to": "acme"}, "a small payment"),
    (None, "GET", "/tools/search/?q=x", None, "no API key"),
    ("demo-key-coder-7", "GET", "/tools/nosuch/x", None, "an unknown tool"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, what: str) -> None:
    for _ in range(400):
        if proc.poll() is not None:
            sys.exit(f"demo: {what} exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    sys.exit(f"demo: {what} did not come up at {url}")


def call(base: str, key: str | None, method: str, path: str, body: object) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if key:
        req.add_header("X-Api-Key", key)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", action="store_true", help="exit after the demo calls")
    args = ap.parse_args()

    tool_port = int(os.environ.get("DEMO_TOOL_PORT") or free_port())
    port = int(os.environ.get("REGATE_PORT") or free_port())
    admin_port = int(os.environ.get("REGATE_ADMIN_PORT") or free_port())
    env = dict(os.environ, DEMO_TOOL_PORT=str(tool_port), REGATE_PORT=str(port), REGATE_ADMIN_PORT=str(admin_port))
    tool = subprocess.Popen([sys.executable, str(HERE / "demo_tool.py"), str(tool_port)], env=env)
    regate = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(HERE / "regate.yaml"),
                               "--log-level", "warning"],
                              env=env, cwd=ROOT)
    try:
        wait(f"http://127.0.0.1:{tool_port}/health", tool, "demo tool")
        wait(f"http://127.0.0.1:{admin_port}/readyz", regate, "regate")
        base = f"http://127.0.0.1:{port}"
        print(f"\nRegate on {base} (admin http://127.0.0.1:{admin_port}) in front of the demo tool on :{tool_port}\n")
        for key, method, path, body, what in CALLS:
            status, headers, doc = call(base, key, method, path, body)
            who = {"demo-key-coder-7": "coder-7", "demo-key-analyst-2": "analyst-2"}.get(key, "(no key)")
            line = f"{status}  {who:10} {method:5} {path:28}"
            if isinstance(doc, dict) and "error" in doc:
                err = doc["error"]
                print(f"{line} DENIED  {err['code']}: {err['message']}")
                for reason in err.get("reasons") or []:
                    print(f"{'':52}- {reason}")
            else:
                print(f"{line} ALLOWED -> {json.dumps(doc)[:70]}")
            print(f"{'':52}({what}; decision {headers.get('X-Regate-Decision-Id')})")
        if args.once:
            return 0
        print(f"\nRegate keeps running: try  curl -H 'X-Api-Key: demo-key-coder-7' '{base}/tools/search/?q=hi'")
        print("Ctrl-C to stop.")
        regate.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in (regate, tool):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (regate, tool):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
