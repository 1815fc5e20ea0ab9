"""`make demo`: a demo tool, Regate in front of it, and a few real agent calls.

Prints each call's outcome (status, Regate's decision, the reasons), then keeps
Regate in the foreground until Ctrl-C, or exits with `--once`. `--engine opa`
(or ENGINE=opa, as `make demo ENGINE=opa` sets) starts a real OPA server with
the shipped bundle and has Regate ask it instead of the embedded engine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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
    ("demo-key-analyst-2", "POST", "/tools/payments/transfer", {"amount": 500, "to": "acme"},
     "a large payment waits for a human, who approves it"),
    ("demo-key-support-1", "POST", "/tools/tickets/mcp",
     {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
      "params": {"name": "search_tickets", "arguments": {"query": "login"}}}, "an MCP tool in the grant"),
    ("demo-key-support-1", "POST", "/tools/tickets/mcp",
     {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
      "params": {"name": "delete_ticket", "arguments": {"ticket_id": 101}}}, "an MCP tool outside the grant"),
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
        req.add_header("Accept", "application/json, text/event-stream")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def approve_when_pending(admin: str, token: str, stop: threading.Event) -> None:
    """The demo's human operator: approves the first pending call it sees, via the admin API."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    while not stop.is_set():
        req = urllib.request.Request(f"{admin}/admin/approvals?state=pending", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                pending = json.loads(r.read()).get("approvals", [])
        except (urllib.error.URLError, OSError):
            pending = []
        for ap in pending:
            body = json.dumps({"approver": "demo-operator", "comment": "looks right"}).encode()
            req = urllib.request.Request(f"{admin}/admin/approvals/{ap['id']}/approve", data=body,
                                         headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=5):
                pass
            print(f"{'':52}(operator approved {ap['id']}: {ap.get('reason', '')})")
            return
        stop.wait(0.2)


def start_opa(tmp: Path):
    """`opa run --server` with the shipped bundle (as `opa build` makes it) on a free port."""
    sys.path.insert(0, str(ROOT))
    from proxy.engines.bundle import load_bundle
    from tests.support.opa_server import OpaMissing, OpaServer, build_bundle, shipped_paths

    try:
        # The revision OPA reports is the one the embedded engine would: the same files.
        revision = load_bundle(ROOT / "rego", ROOT / "policies").revision
        tarball = build_bundle(shipped_paths(ROOT / "rego", ROOT / "policies"), tmp / "bundle.tar.gz", revision)
        return OpaServer(tarball, bundle=True).start()
    except OpaMissing as exc:
        sys.exit(f"demo: {exc}")


def opa_config(opa_url: str) -> Path:
    """examples/regate.yaml with `policy.engine: opa`, written beside it (its relative paths still hold)."""
    import yaml

    cfg = yaml.safe_load((HERE / "regate.yaml").read_text())
    cfg.setdefault("policy", {}).update({"engine": "opa", "opa": {"url": opa_url}})
    path = HERE / f".regate-opa-{os.getpid()}.yaml"
    path.write_text("# Generated by examples/demo.py --engine opa; removed when the demo ends.\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", action="store_true", help="exit after the demo calls")
    ap.add_argument("--engine", choices=("embedded", "opa"), default=os.environ.get("ENGINE") or "embedded",
                    help="the policy engine (default $ENGINE, else embedded)")
    args = ap.parse_args()

    tool_port = int(os.environ.get("DEMO_TOOL_PORT") or free_port())
    port = int(os.environ.get("REGATE_PORT") or free_port())
    admin_port = int(os.environ.get("REGATE_ADMIN_PORT") or free_port())
    mcp_port = int(os.environ.get("DEMO_MCP_PORT") or free_port())
    env = dict(os.environ, DEMO_TOOL_PORT=str(tool_port), REGATE_PORT=str(port), REGATE_ADMIN_PORT=str(admin_port),
               DEMO_MCP_PORT=str(mcp_port))
    opa = config = None
    if args.engine == "opa":
        import tempfile

        opa_tmp = tempfile.TemporaryDirectory(prefix="regate-demo-opa-")
        opa = start_opa(Path(opa_tmp.name))
        config = opa_config(opa.url)
    tool = subprocess.Popen([sys.executable, str(HERE / "demo_tool.py"), str(tool_port)], env=env)
    mcp_tool = subprocess.Popen([sys.executable, str(HERE / "mcp_server.py"), str(mcp_port), "--json", "--stateless"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    regate = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(config or HERE / "regate.yaml"),
                               "--log-level", "warning"],
                              env=env, cwd=ROOT)
    try:
        wait(f"http://127.0.0.1:{tool_port}/health", tool, "demo tool")
        wait(f"http://127.0.0.1:{mcp_port}/health", mcp_tool, "MCP server")
        wait(f"http://127.0.0.1:{admin_port}/readyz", regate, "regate")
        base = f"http://127.0.0.1:{port}"
        print(f"\nRegate on {base} (admin http://127.0.0.1:{admin_port}) in front of the demo tool on :{tool_port}")
        if opa is not None:
            print(f"policy engine: opa, asking the real OPA at {opa.url} (opa run --server, log {opa.log_path})")
        print()
        admin = f"http://127.0.0.1:{admin_port}"
        token = env.get("REGATE_ADMIN_TOKEN", "demo-admin-token")
        for key, method, path, body, what in CALLS:
            stop = threading.Event()
            if "human" in what:
                threading.Thread(target=approve_when_pending, args=(admin, token, stop), daemon=True).start()
            status, headers, doc = call(base, key, method, path, body)
            stop.set()
            who = {"demo-key-coder-7": "coder-7", "demo-key-analyst-2": "analyst-2",
                   "demo-key-support-1": "support-1"}.get(key, "(no key)")
            line = f"{status}  {who:10} {method:5} {path:28}"
            if isinstance(doc, dict) and "error" in doc:
                err = doc["error"]
                if "jsonrpc" in doc:  # an MCP refusal: a JSON-RPC error the client hands to the model
                    err = {"code": (err.get("data") or {}).get("code", err.get("code")), "message": err["message"],
                           "reasons": (err.get("data") or {}).get("reasons", [])}
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
        for p in (regate, tool, mcp_tool):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (regate, tool, mcp_tool):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if opa is not None:
            opa.close()
            opa_tmp.cleanup()
        if config is not None:
            config.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
