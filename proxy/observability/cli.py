"""`regate explain <decision id>`: one call's trace, for a human, from the admin API.

    regate explain 3fa9c1d2e400000017 --admin-url http://127.0.0.1:8081 [--token T | REGATE_ADMIN_TOKEN]
    regate explain --list [--agent A] [--tool T] [--outcome O] [--limit N]

Prints the stage table (verdict and time of each stage), the reasons, the rule
locations that produced them and the upstream's answer; `--json` prints the
API's document as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson


def add_parser(sub: Any) -> None:
    p = sub.add_parser("explain", help="explain a decision: its stages, reasons, rules and timings")
    p.add_argument("decision_id", nargs="?", help="the X-Regate-Decision-Id of the call")
    p.add_argument("--admin-url", default=os.environ.get("REGATE_ADMIN_URL", "http://127.0.0.1:8081"),
                   help="Regate's admin address (default: $REGATE_ADMIN_URL or http://127.0.0.1:8081)")
    p.add_argument("--token", default=None, help="admin token (default: $REGATE_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    p.add_argument("--list", action="store_true", help="list recent decisions instead")
    p.add_argument("--agent", default=None)
    p.add_argument("--tool", default=None)
    p.add_argument("--outcome", default=None, help="forwarded | rejected | denied | a rejection code")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_explain)


def _get(args: argparse.Namespace, path: str) -> tuple[int, Any]:
    token = args.token or os.environ.get("REGATE_ADMIN_TOKEN", "")
    req = urllib.request.Request(args.admin_url.rstrip("/") + path,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, orjson.loads(body)
        except orjson.JSONDecodeError:
            return exc.code, {"error": {"message": body.decode("utf-8", "replace")[:300]}}


def cmd_explain(args: argparse.Namespace) -> int:
    if args.list:
        q = {k: v for k, v in (("agent", args.agent), ("tool", args.tool), ("outcome", args.outcome),
                                ("limit", str(args.limit))) if v}
        path = "/admin/decisions?" + urllib.parse.urlencode(q)
    elif args.decision_id:
        path = "/admin/decisions/" + urllib.parse.quote(args.decision_id, safe="")
    else:
        print("regate explain: give a decision id (the X-Regate-Decision-Id header) or --list", file=sys.stderr)
        return 2
    try:
        status, doc = _get(args, path)
    except (urllib.error.URLError, OSError) as exc:
        print(f"regate explain: cannot reach the admin API at {args.admin_url}: {getattr(exc, 'reason', exc)}",
              file=sys.stderr)
        return 1
    if status != 200:
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        print(f"regate explain: {status} {err.get('code', '')}: {err.get('message', doc)}", file=sys.stderr)
        if status == 401:
            print("  pass --token or set REGATE_ADMIN_TOKEN (admin.token in regate.yaml)", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.list:
        sys.stdout.write(render_list(doc))
    else:
        sys.stdout.write(render(doc))
    return 0


def render_list(doc: dict) -> str:
    rows = [("DECISION ID", "AGENT", "TOOL", "OUTCOME", "STAGE", "STATUS", "ADDED")]
    for d in doc.get("decisions", []):
        rows.append((d["decision_id"], str(d.get("agent") or "-"), str(d.get("tool") or "-"), d["outcome"],
                     str(d.get("stage") or "-"), str(d["status"]), _us(d.get("added_us"))))
    return _table(rows)


def render(t: dict) -> str:
    out = []
    out.append(f"decision {t['decision_id']}  {t.get('time') or ''}")
    out.append(f"  agent {t.get('agent') or '-'}  tool {t.get('tool') or '-'}  {t.get('method') or ''} "
               f"{t.get('path') or ''}".rstrip())
    decision = f"  decision {t['decision']}" if t.get("decision") else ""
    out.append(f"  outcome {t.get('outcome')} at stage {t.get('stage')} (HTTP {t.get('status')}){decision}")
    out.append(f"  policy revision {t.get('revision') or '-'}")
    if t.get("trace_id"):
        out.append(f"  trace id {t['trace_id']}")
    if t.get("message"):
        out.append(f"  message: {t['message']}")
    stages = t.get("stages") or []
    if stages:
        out.append("")
        rows = [("STAGE", "VERDICT", "TIME")] + [(s["stage"], s["verdict"], _us(s["us"])) for s in stages]
        out.append(_table(rows, indent="  ").rstrip("\n"))
        total = t.get("total_us")
        if total is not None:
            out.append(f"  total {_us(total)}, added by Regate {_us(t.get('added_us'))}"
                       + (f", upstream {_us(t['upstream_us'])}" if t.get("upstream_us") is not None else ""))
    elif t.get("note"):
        out.append(f"  ({t['note']})")
    reasons = t.get("reasons") or []
    if reasons:
        out.append("")
        out.append("reasons:")
        explained = {r["reason"]: r["rules"] for r in ((t.get("explain") or {}).get("reasons") or [])}
        for r in reasons:
            out.append(f"  - {r}")
            for w in explained.get(r, []):
                out.append(f"      from {w['rule']} at {w['location']}")
    ex = t.get("explain")
    if ex:
        out.append("")
        if ex.get("error"):
            out.append(f"explain ({ex.get('engine')}): {ex['error']}")
        elif ex.get("state") == "pending":
            out.append(f"explain ({ex.get('engine')}): still waiting for the engine; ask again")
        else:
            rules = ex.get("rules") or []
            out.append(f"rules that fired ({ex.get('engine')}, {ex.get('method')}):")
            for r in rules:
                out.append(f"  {r['location']:<32} {r['rule']}")
            if not rules:
                out.append("  (none reported)")
    for k, v in (t.get("notes") or {}).items():
        out.append(f"note: {k} = {v}")
    return "\n".join(out) + "\n"


def _us(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v < 1000:
        return f"{v:.1f} µs"
    if v < 1_000_000:
        return f"{v / 1000:.2f} ms"
    return f"{v / 1_000_000:.2f} s"


def _table(rows: list[tuple], indent: str = "") -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "".join(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)
