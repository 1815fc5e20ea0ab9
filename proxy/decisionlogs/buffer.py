"""The bounded buffer of decision-log events and how it is cut into batches.

Two stages, one byte bound. `pending` holds entries as the policy stage
appended them (references, counted at an estimated size); `encoded` holds
event JSON waiting for upload (counted at its real size). Their sum never
exceeds `max_bytes`: past it the oldest events go first, encoded ones before
pending ones, each counted in `dropped`. The batch being uploaded is out of
both; when its upload fails it is put back at the front and the bound applied
again, so every event either arrives once or is counted dropped once.

A batch is the JSON array body `[e1,e2,...]`, at most `batch_max_bytes`
long before gzip. An event longer than that alone can never be sent and is
dropped (`too_large`), as OPA drops one over its upload limit.
"""

from __future__ import annotations

from collections import deque
from typing import Any

#: Bytes counted for an entry beyond its request body: headers, decision, labels, framing.
ENTRY_OVERHEAD = 1024

DROP_REASONS = ("buffer_full", "too_large", "unencodable", "shutdown")


class EventBuffer:
    __slots__ = ("max_bytes", "batch_max_bytes", "pending", "pending_bytes", "encoded", "encoded_bytes",
                 "dropped", "in_flight")

    def __init__(self, max_bytes: int, batch_max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.batch_max_bytes = batch_max_bytes
        self.pending: deque[Any] = deque()
        self.pending_bytes = 0
        self.encoded: deque[bytes] = deque()
        self.encoded_bytes = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.in_flight = 0  # events in the batch being uploaded

    # -- the request path: O(1) amortised, no encoding --------------------

    def add(self, entry: Any) -> None:
        """`entry.est` is its estimated size; the oldest events make room."""
        self.pending.append(entry)
        self.pending_bytes += entry.est
        if self.pending_bytes + self.encoded_bytes > self.max_bytes:
            self._shed()

    def _shed(self) -> None:
        # Each pass removes one event, so this ends within len(encoded) + len(pending) passes.
        encoded, pending = self.encoded, self.pending
        while self.pending_bytes + self.encoded_bytes > self.max_bytes and encoded:
            self.encoded_bytes -= len(encoded.popleft())
            self.dropped["buffer_full"] += 1
        while self.pending_bytes + self.encoded_bytes > self.max_bytes and len(pending) > 1:
            self.pending_bytes -= pending.popleft().est
            self.dropped["buffer_full"] += 1

    # -- the uploader ------------------------------------------------------

    def take_pending(self, limit: int) -> list[Any]:
        """Up to `limit` of the oldest pending entries, for encoding (they leave the bound
        until `add_encoded` counts them again at their real size)."""
        out = []
        pending = self.pending
        for _ in range(min(limit, len(pending))):
            e = pending.popleft()
            self.pending_bytes -= e.est
            out.append(e)
        return out

    def add_encoded(self, data: bytes) -> None:
        if len(data) + 2 > self.batch_max_bytes or len(data) > self.max_bytes:
            self.dropped["too_large"] += 1
            return
        self.encoded.append(data)
        self.encoded_bytes += len(data)
        if self.pending_bytes + self.encoded_bytes > self.max_bytes:
            self._shed()

    def full_batch_ready(self) -> bool:
        """Whether the waiting events fill at least one batch."""
        return self.encoded_bytes + len(self.encoded) + 1 >= self.batch_max_bytes

    def take_batch(self) -> list[bytes]:
        """The oldest events whose JSON array fits `batch_max_bytes`, removed from the buffer."""
        encoded = self.encoded
        batch: list[bytes] = []
        size = 1  # "["; each event adds its length and one "," or the closing "]"
        limit = self.batch_max_bytes
        while encoded and size + len(encoded[0]) + 1 <= limit:
            data = encoded.popleft()
            size += len(data) + 1
            self.encoded_bytes -= len(data)
            batch.append(data)
        self.in_flight = len(batch)
        return batch

    def delivered(self) -> None:
        self.in_flight = 0

    def requeue(self, batch: list[bytes]) -> None:
        """A batch whose upload failed goes back in front; the bound then drops the oldest."""
        self.in_flight = 0
        self.encoded.extendleft(reversed(batch))
        self.encoded_bytes += sum(len(b) for b in batch)
        if self.pending_bytes + self.encoded_bytes > self.max_bytes:
            self._shed()

    def drop_all(self, reason: str) -> int:
        n = len(self.encoded) + len(self.pending)
        self.encoded.clear()
        self.pending.clear()
        self.encoded_bytes = self.pending_bytes = 0
        self.dropped[reason] += n
        return n

    @staticmethod
    def body(batch: list[bytes]) -> bytes:
        return b"[" + b",".join(batch) + b"]"
