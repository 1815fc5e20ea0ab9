"""Hypothesis drives the tool breaker's state machine against the reference in
test_breakers_circuit.check_sequence: no sequence of outcomes and clock steps lets an
open breaker forward more than its probe budget, or keeps it open past its cool-down; and
against a timing model of its own: every state ends exactly when its cool-down says."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.breakers import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Outcome, Refusal
from tests.test_breakers_circuit import ALL_OUTCOMES, OUTCOMES, PROPERTY_CFG, check_sequence

ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit")),
        st.tuples(st.just("end"), st.integers(0, 40), st.sampled_from(ALL_OUTCOMES)),
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.sampled_from([0.0, 0.001, 0.5, 1.0, 4.999, 5.0, 10.0, 29.9, 30.0, 100.0])),
        st.tuples(st.just("tick"), st.floats(0, 120, allow_nan=False)),
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_no_sequence_breaks_the_breaker(seq):
    check_sequence(seq)


# --- cool-downs in every state ------------------------------------------------------
# check_sequence asserts timing only while the breaker itself reports OPEN, so a breaker
# that half-opens early (a halved cool-down) passes it. This model keeps its own clock of
# when each state must end, from the transitions it saw and the config alone, and after
# every step asks the breaker for its state: open until exactly the cool-down (5, 10, 20,
# 40 s in a row), half-open until its probes resolve or the half-open timeout passes from
# the first probe, closed until failures open it; and what admit answers in each.

FAILURES = (Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECT_ERROR)


class TimingModel:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.state = CLOSED
        self.opens_in_row = 0
        self.open_until = 0.0
        self.deadline: float | None = None   # half-open timeout, from the first probe
        self.probes_out = 0
        self.probes_ok = 0

    def cooldown(self) -> float:
        c = self.cfg
        return min(c.max_cooldown_s, c.cooldown_s * c.cooldown_multiplier ** self.opens_in_row)

    def transition(self, _tool, frm, to, now, _reason) -> None:
        assert frm == self.state, f"the breaker went {frm}->{to}, the model was {self.state}"
        if to == HALF_OPEN:
            assert frm == OPEN and now >= self.open_until, \
                f"half-opened at {now}, before the cool-down ended at {self.open_until}"
        if to == OPEN:
            self.open_until = now + self.cooldown()
            self.opens_in_row += 1
        if to == CLOSED:
            self.opens_in_row = 0
        self.state = to
        self.deadline = None
        self.probes_out = self.probes_ok = 0

    def expected(self, now: float) -> str:
        if self.state == OPEN and now >= self.open_until:
            return HALF_OPEN
        if self.state == HALF_OPEN and self.deadline is not None and now >= self.deadline:
            return OPEN
        return self.state


def check_timing(ops, cfg=PROPERTY_CFG) -> None:
    # ("call", outcome): admit and end at once, so runs of failures (which open it) are common.
    ops = [step for op in ops for step in ([("admit",), ("end", -1, op[1])] if op[0] == "call" else [op])]
    model = TimingModel(cfg)
    b = CircuitBreaker("t", cfg, model.transition)
    now = 0.0
    live: list = []
    for op in ops:
        if op[0] == "tick":
            now += op[1]
        elif op[0] == "admit":
            state = model.state
            got = b.admit(now)
            if state == CLOSED:
                assert not isinstance(got, Refusal) and not got.probe, "a closed breaker refused"
            elif state == OPEN:
                assert isinstance(got, Refusal) and got.kind == "open", "an open breaker let a call through"
                assert got.retry_after_s == pytest.approx(model.open_until - now)
                assert b.retry_after_s(now) == pytest.approx(model.open_until - now)
            elif model.probes_out + model.probes_ok >= cfg.half_open_probes:
                assert isinstance(got, Refusal) and got.kind == "half_open_full"
            else:
                assert not isinstance(got, Refusal) and got.probe, "half-open refused a probe it had room for"
                model.probes_out += 1
                if model.deadline is None:
                    model.deadline = now + cfg.half_open_timeout_s
            if not isinstance(got, Refusal):
                live.append(got)
        elif live:
            t = live.pop(op[1] % len(live))
            current = t.probe and t.generation == b._generation and model.state == HALF_OPEN
            if op[0] == "release":
                t.release()
                if current:
                    model.probes_out -= 1
                    if model.probes_out == 0 and model.probes_ok == 0:
                        model.deadline = None
            else:
                outcome, status = OUTCOMES[op[2]]
                if current:  # before record: a failure re-opens (the listener resets the model)
                    model.probes_out -= 1
                    if outcome not in FAILURES:
                        model.probes_ok += 1
                t.record(now, outcome, status)
        want = model.expected(now)
        assert b.poll(now) == want, f"at t={now}: the breaker is {b.state}, the model says {want}"


FAILING = [k for k, (o, _) in OUTCOMES.items() if o in FAILURES]
timing_ops = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(FAILING)),
        st.tuples(st.just("call"), st.sampled_from(ALL_OUTCOMES)),
        st.tuples(st.just("admit")),
        st.tuples(st.just("end"), st.integers(0, 40), st.sampled_from(ALL_OUTCOMES)),
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.sampled_from([0.0, 0.001, 0.5, 1.0, 2.5, 2.6, 4.999, 5.0, 9.9, 10.0,
                                                    15.0, 19.9, 29.9, 30.0, 39.9, 100.0])),
        st.tuples(st.just("tick"), st.floats(0, 120, allow_nan=False)),
    ),
    max_size=150,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timing_ops)
def test_cool_downs_hold_in_every_state(seq):
    check_timing(seq)


def test_cool_downs_on_a_fixed_sequence():
    # Open (3 failures), wait out 5 s, a failed probe re-opens for 10 s, then 20 s.
    fail = next(k for k, (o, _) in OUTCOMES.items() if o == Outcome.SERVER_ERROR)
    seq = [("admit",), ("end", 0, fail)] * 3
    for cool in (5.0, 10.0, 20.0):
        seq += [("tick", cool * 0.5), ("admit",), ("tick", cool * 0.5 - 0.001), ("admit",),
                ("tick", 0.001), ("admit",), ("end", 0, fail)]
    check_timing(seq)
