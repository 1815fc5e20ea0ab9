"""Regate's own retries, bounded so that Regate can never amplify a storm.

Regate retries a call itself only when it is safe and cheap to: an idempotent method
(GET, HEAD, PUT, DELETE, OPTIONS) that failed to connect (the upstream never saw it),
at most once, after a jittered pause, and only while retries stay within
``ratio`` of the calls seen over a rolling ``window_s`` (as Finagle's and Envoy's retry
budgets). With ``ratio: 0.1`` the upstream sees at most 10% more calls than agents sent.
``now`` is the caller's clock; ``rng`` is injectable for the jitter.
"""

from __future__ import annotations

import random
from typing import Callable

from .outcome import CONNECT_ERROR, Outcome

IDEMPOTENT = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS"))
_BUCKETS = 10


class RetryBudget:
    __slots__ = ("ratio", "window_s", "base_delay_s", "_rng", "_bucket_s", "_calls", "_retries", "_head",
                 "_window_calls", "_window_retries", "retried", "denied")

    def __init__(self, ratio: float = 0.1, window_s: float = 10.0, base_delay_s: float = 0.05,
                 rng: Callable[[], float] = random.random) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.base_delay_s = base_delay_s
        self._rng = rng
        self._bucket_s = window_s / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._head = 0
        self._window_calls = 0
        self._window_retries = 0
        # Metrics.
        self.retried = 0   # retries granted
        self.denied = 0    # retries that were safe but over budget

    @staticmethod
    def safe(method: str, outcome: Outcome, attempt: int = 0) -> bool:
        """A retry is safe: idempotent method, the upstream never got the call, first retry."""
        return attempt == 0 and outcome == CONNECT_ERROR and method in IDEMPOTENT

    def deposit(self, now: float) -> None:
        """An agent's call was forwarded (first attempts only)."""
        pos = self._roll(now)
        self._calls[pos] += 1
        self._window_calls += 1

    def withdraw(self, now: float) -> float | None:
        """Ask to retry: the jittered delay in seconds before retrying, or None when over budget."""
        pos = self._roll(now)
        if self._window_retries + 1 > self.ratio * self._window_calls:
            self.denied += 1
            return None
        self._retries[pos] += 1
        self._window_retries += 1
        self.retried += 1
        # Full jitter in [base/2, base): never zero, so a retry never lands in the same instant.
        return self.base_delay_s * (0.5 + 0.5 * self._rng())

    def _roll(self, now: float) -> int:
        idx = int(now / self._bucket_s)
        if idx > self._head:
            if idx - self._head >= _BUCKETS:
                for i in range(_BUCKETS):
                    self._calls[i] = self._retries[i] = 0
                self._window_calls = self._window_retries = 0
            else:
                for i in range(self._head + 1, idx + 1):
                    p = i % _BUCKETS
                    self._window_calls -= self._calls[p]
                    self._window_retries -= self._retries[p]
                    self._calls[p] = self._retries[p] = 0
            self._head = idx
        return self._head % _BUCKETS
