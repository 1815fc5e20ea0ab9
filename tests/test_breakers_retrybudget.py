"""Regate's own retries: safe ones only, and never more than the budget."""

from __future__ import annotations

from proxy.breakers import Outcome
from proxy.breakers.retrybudget import RetryBudget


def test_only_a_first_connect_error_on_an_idempotent_method_is_safe():
    assert RetryBudget.safe("GET", Outcome.CONNECT_ERROR)
    assert RetryBudget.safe("PUT", Outcome.CONNECT_ERROR)
    assert not RetryBudget.safe("POST", Outcome.CONNECT_ERROR)
    assert not RetryBudget.safe("GET", Outcome.TIMEOUT)        # the upstream may have acted on it
    assert not RetryBudget.safe("GET", Outcome.SERVER_ERROR)
    assert not RetryBudget.safe("GET", Outcome.CONNECT_ERROR, attempt=1)


def test_retries_stay_within_ten_percent_of_calls_over_the_window():
    b = RetryBudget(ratio=0.1, window_s=10.0, base_delay_s=0.1, rng=lambda: 0.5)
    steps = [  # (t, deposits, retries asked) -> retries granted
        (0.0, 5, 1, 0),      # 5 calls: 1 retry would be 20%
        (1.0, 5, 3, 1),      # 10 calls: one retry
        (2.0, 20, 5, 2),     # 30 calls: three in all
        (12.5, 0, 1, 0),     # the calls of t<=2 left the window, and with them the budget
        (13.0, 10, 2, 1),
    ]
    for t, calls, asked, want in steps:
        for _ in range(calls):
            b.deposit(t)
        got = [b.withdraw(t) for _ in range(asked)]
        granted = [d for d in got if d is not None]
        assert len(granted) == want, (t, got)
        assert all(abs(d - 0.075) < 1e-9 for d in granted)
    assert b.retried == 4 and b.denied == 8
