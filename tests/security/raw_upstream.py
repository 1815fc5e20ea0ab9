"""A tool that misbehaves at the byte level, for the fault tests.

Run as `python tests/security/raw_upstream.py PORT`. It reads one request head
and answers by the last path segment:

    ok            a valid 200 JSON response
    reset-body    Content-Length 1000, 100 bytes, then a TCP reset
    reset-stream  chunked, two chunks, then a TCP reset (after the status line went out)
    garbage       bytes that are not HTTP, then close
    bad-header    a status line, then a header with a NUL byte in it
    huge-header   a 64 KiB header line
    hangup        close without a byte
    split-brain   two Content-Length headers that disagree

`GET /_count` answers {"<behaviour>": connections served, ...}.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys

COUNTS: dict[str, int] = {}

OK_BODY = b'{"ok":true}'


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close() sends RST, not FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        writer.close()
        return
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    path = line.split(" ")[1] if " " in line else "/"
    what = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if what == "_count":
        body = json.dumps(COUNTS).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()
        return
    COUNTS[what] = COUNTS.get(what, 0) + 1
    # Drain a declared body so the client is not blocked sending it.
    for h in head.split(b"\r\n"):
        if h.lower().startswith(b"content-length:"):
            await reader.readexactly(int(h.split(b":", 1)[1]))
    if what == "reset-body":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.05)
        _reset(writer)
    elif what == "reset-stream":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nfirst\r\n6\r\nsecond\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        _reset(writer)
    elif what == "garbage":
        writer.write(b"\x00\x01\x02 this is not HTTP at all \xff\xfe\r\n\r\n")
        await writer.drain()
        writer.close()
    elif what == "bad-header":
        writer.write(b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
    elif what == "huge-header":
        writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 65536 + b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
    elif what == "hangup":
        writer.close()
    elif what == "split-brain":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 12\r\n\r\nokHTTP/1.1 2")
        await writer.drain()
        writer.close()
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(OK_BODY) + OK_BODY)
        await writer.drain()
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=256)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
