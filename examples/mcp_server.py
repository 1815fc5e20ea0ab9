"""A small real MCP server (the `mcp` Python SDK, Streamable HTTP) for the demo and the tests:
a ticket desk with four tools. Regate fronts it as a `protocol: mcp` route.

- `search_tickets(query)`   finds tickets (read-only)
- `add_comment(ticket_id, text)`  comments on a ticket
- `delete_ticket(ticket_id)`  deletes one (granted to nobody in the shipped policy)
- `watch_ticket(ticket_id, updates, interval_ms)`  streams progress notifications
  before its result, so the answer arrives as an SSE stream over time

Run: `python examples/mcp_server.py PORT [--json] [--stateless]` (serves /mcp;
`--json` answers with plain JSON instead of SSE streams, `--stateless` takes
calls without an initialize handshake, one request at a time, as the demo sends
them). Nothing here is persistent.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse

TICKETS = {
    101: {"id": 101, "title": "Login page times out", "status": "open", "comments": []},
    102: {"id": 102, "title": "Invoice PDF is blank", "status": "open", "comments": []},
    103: {"id": 103, "title": "Password reset email delayed", "status": "closed", "comments": []},
}

server = MCPServer("tickets", instructions="A ticket desk: search, comment, delete, watch.")


@server.tool()
def search_tickets(query: str) -> list[dict]:
    """Tickets whose title contains the query (case-insensitive)."""
    q = query.lower()
    return [t for t in TICKETS.values() if q in t["title"].lower()]


@server.tool()
def add_comment(ticket_id: int, text: str) -> dict:
    """Add a comment to a ticket."""
    ticket = TICKETS.get(ticket_id)
    if ticket is None:
        raise ValueError(f"no ticket {ticket_id}")
    ticket["comments"].append(text)
    return {"ticket": ticket_id, "comments": len(ticket["comments"])}


@server.tool()
def delete_ticket(ticket_id: int) -> str:
    """Delete a ticket for good."""
    TICKETS.pop(ticket_id, None)
    return f"deleted {ticket_id}"


@server.tool()
async def watch_ticket(ticket_id: int, ctx: Context, updates: int = 3, interval_ms: int = 200) -> str:
    """Report `updates` progress steps, `interval_ms` apart, then the ticket's status."""
    for i in range(updates):
        await ctx.report_progress(i + 1, updates, f"checked ticket {ticket_id} ({i + 1}/{updates})")
        await asyncio.sleep(interval_ms / 1000)
    ticket = TICKETS.get(ticket_id)
    return f"ticket {ticket_id}: {ticket['status'] if ticket else 'gone'}"


@server.custom_route("/health", methods=["GET"])
async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--json", action="store_true", help="answer with JSON bodies instead of SSE streams")
    ap.add_argument("--stateless", action="store_true", help="no sessions: every request stands alone")
    args = ap.parse_args()
    app = server.streamable_http_app(json_response=args.json, stateless_http=args.stateless, host=args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
