"""`regate approvals list|approve ID|deny ID`: the inbox for terminal people,
over the admin API (so it works against any replica, local or remote)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8081"


def add_parser(sub: Any) -> None:
    """Register `approvals` on the `regate` command's subparsers."""
    ap = sub.add_parser("approvals", help="list, approve and deny calls waiting for a human")
    ap.add_argument("--admin-url", default=os.environ.get("REGATE_ADMIN_URL", DEFAULT_URL),
                    help=f"Regate's admin address (env REGATE_ADMIN_URL, default {DEFAULT_URL})")
    ap.add_argument("--token", default=None, help="admin token (default: env REGATE_ADMIN_TOKEN)")
    asub = ap.add_subparsers(dest="approvals_command", required=True)
    ls = asub.add_parser("list", help="the approvals, newest first (pending ones by default)")
    ls.add_argument("--state", default="pending", help="pending | approved | denied | expired | withdrawn | used | all")
    ls.add_argument("--json", action="store_true", help="print the API's JSON")
    ls.set_defaults(func=cmd_list)
    for verb in ("approve", "deny"):
        p = asub.add_parser(verb, help=f"{verb} a pending call")
        p.add_argument("id")
        p.add_argument("-m", "--comment", default="", help="why (a denial's comment is shown to the agent)")
        p.add_argument("--approver", default=None, help="your name in the audit log (default: your login name)")
        p.set_defaults(func=cmd_decide, verb=verb)


def _request(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    token = args.token or os.environ.get("REGATE_ADMIN_TOKEN")
    if not token:
        print("regate approvals: no admin token: pass --token or set REGATE_ADMIN_TOKEN", file=sys.stderr)
        raise SystemExit(2)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(args.admin_url.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        return exc.code, payload
    except (urllib.error.URLError, OSError) as exc:
        print(f"regate approvals: cannot reach {args.admin_url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def _fail(status: int, payload: dict) -> int:
    err = payload.get("error") or {}
    print(f"regate approvals: {status} {err.get('code', '')}: {err.get('message', '')}".rstrip(": "), file=sys.stderr)
    return 1


def _left(rec: dict, now: float) -> str:
    if rec.get("state") != "pending":
        return rec.get("state", "")
    s = max(0, int(rec["expires"] - now))
    return f"{s // 60}m{s % 60:02d}s left"


def cmd_list(args: argparse.Namespace) -> int:
    status, payload = _request(args, "GET", "/admin/approvals?" + urllib.parse.urlencode({"state": args.state}))
    if status != 200:
        return _fail(status, payload)
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    now = payload.get("now", time.time())
    recs = payload.get("approvals", [])
    if not recs:
        print(f"no {args.state if args.state != 'all' else ''} approvals".replace("  ", " "))
        return 0
    for rec in recs:
        when = time.strftime("%H:%M:%S", time.localtime(rec["created"]))
        print(f"{rec['id']}  {when}  {_left(rec, now):>12}  {rec['agent']} -> {rec['tool']}  "
              f"{rec['method']} {rec['path']}")
        print(f"    {rec['reason']}")
        if rec.get("args") is not None:
            print("    args: " + json.dumps(rec["args"], sort_keys=True))
        elif rec.get("args_note"):
            print(f"    ({rec['args_note']})")
        if rec.get("approver"):
            print(f"    {rec['state']} by {rec['approver']}" + (f": {rec['comment']}" if rec.get("comment") else ""))
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from .approval import valid_id

    if not valid_id(args.id):
        print(f"regate approvals: {args.id!r} is not an approval id (apr_ and 24 hex digits)", file=sys.stderr)
        return 2
    approver = args.approver or os.environ.get("REGATE_APPROVER") or getpass.getuser()
    status, payload = _request(args, "POST", f"/admin/approvals/{args.id}/{args.verb}",
                               {"approver": approver, "comment": args.comment})
    if status != 200:
        return _fail(status, payload)
    rec = payload["approval"]
    print(f"{rec['id']} {rec['state']} by {rec['approver']}: {rec['agent']} -> {rec['tool']} "
          f"{rec['method']} {rec['path']}")
    return 0
