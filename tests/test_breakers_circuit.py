"""The tool breaker, as tables of (time, event) -> what the caller sees."""

from __future__ import annotations

import random

import pytest

from proxy.breakers import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Outcome, Refusal, Ticket, ToolBreakerConfig

OUTCOMES = {
    "200": (Outcome.SUCCESS, 200),
    "201": (Outcome.SUCCESS, 201),
    "400": (Outcome.CLIENT_ERROR, 400),
    "404": (Outcome.CLIENT_ERROR, 404),
    "429": (Outcome.CLIENT_ERROR, 429),
    "500": (Outcome.SERVER_ERROR, 500),
    "502": (Outcome.SERVER_ERROR, 502),
    "503": (Outcome.SERVER_ERROR, 503),
    "timeout": (Outcome.TIMEOUT, None),
    "connect": (Outcome.CONNECT_ERROR, None),
}

PASS, PROBE = "pass", "probe"


def refused(retry_after_s: float, kind: str = "open") -> tuple:
    return ("refused", kind, retry_after_s)


def run(steps, **cfg):
    """Steps: (t, action, arg, expected).

    call OUTCOME     admit at t, and if admitted record OUTCOME at t; expect pass/probe/refused(...)
    admit NAME       admit and hold the ticket as NAME; expect pass/probe/refused(...)
    end (NAME, OUT)  record the held ticket NAME; expect the state after
    release NAME     the held call ended without an outcome; expect the state after
    state None       expect the state at t
    """
    b = CircuitBreaker("search", ToolBreakerConfig(**cfg))
    held: dict[str, Ticket] = {}
    for i, (t, action, arg, want) in enumerate(steps):
        where = f"step {i} (t={t}, {action} {arg})"
        if action in ("call", "admit"):
            got = b.admit(t)
            if isinstance(got, Refusal):
                assert got.code == "tool_unavailable" and got.status == 503, where
                seen = ("refused", got.kind, round(got.retry_after_s, 6))
            else:
                seen = PROBE if got.probe else PASS
                if action == "call":
                    got.record(t, *OUTCOMES[arg])
                else:
                    held[arg] = got
            assert seen == want, f"{where}: got {seen}, want {want}"
        elif action == "end":
            name, out = arg
            held[name].record(t, *OUTCOMES[out])
            assert b.poll(t) == want, f"{where}: state {b.state}, want {want}"
        elif action == "release":
            held[arg].release()
            assert b.poll(t) == want, f"{where}: state {b.state}, want {want}"
        elif action == "state":
            assert b.poll(t) == want, f"{where}: state {b.state}, want {want}"
        else:
            raise AssertionError(f"bad step {action}")
    return b


def test_five_consecutive_502s_refuse_the_sixth_call_for_the_cool_down():
    b = run([
        (0.0, "call", "502", PASS),
        (1.0, "call", "502", PASS),
        (2.0, "call", "502", PASS),
        (3.0, "call", "502", PASS),
        (4.0, "call", "502", PASS),          # the 5th failure opens it
        (4.0, "call", "200", refused(5.0)),
        (6.5, "call", "200", refused(2.5)),
        (8.999, "state", None, OPEN),
    ])
    assert b.rejected_open == 2
    assert b.transitions == {(CLOSED, OPEN): 1}


def test_4xx_never_open_the_tool_breaker():
    steps = [(float(i), "call", code, PASS) for i, code in enumerate(["404", "400", "429"] * 20)]
    b = run(steps + [(60.0, "state", None, CLOSED)])
    assert b.transitions == {}


def test_a_success_or_a_4xx_breaks_a_run_of_failures():
    run([
        *[(float(i), "call", "502", PASS) for i in range(4)],
        (4.0, "call", "200", PASS),
        *[(5.0 + i, "call", "503", PASS) for i in range(4)],
        (9.0, "call", "404", PASS),          # the tool answered: it is up
        *[(10.0 + i, "call", "500", PASS) for i in range(4)],
        (14.0, "state", None, CLOSED),
        (14.0, "call", "timeout", PASS),     # 5 in a row now
        (14.0, "call", "200", refused(5.0)),
    ])


@pytest.mark.parametrize("failure", ["timeout", "connect", "500", "503"])
def test_timeouts_connect_errors_and_5xx_all_count(failure):
    run([*[(0.0, "call", failure, PASS) for _ in range(5)], (0.0, "call", "200", refused(5.0))])


def test_failure_ratio_over_the_window_once_min_calls_are_seen():
    cfg = dict(consecutive_failures=0, failure_ratio=0.5, min_calls=20, window_s=10.0)
    calls = [(i * 0.25, "call", "502" if i % 2 else "200", PASS) for i in range(19)]  # 9 of 19 failed
    run([*calls, (4.75, "state", None, CLOSED),
         (4.75, "call", "502", PASS),                       # 10 of 20: at the ratio
         (4.75, "call", "200", refused(5.0))], **cfg)


def test_failure_ratio_below_min_calls_never_opens():
    cfg = dict(consecutive_failures=0, failure_ratio=0.5, min_calls=20, window_s=10.0)
    run([*[(0.1 * i, "call", "502", PASS) for i in range(19)], (2.0, "state", None, CLOSED)], **cfg)


def test_old_failures_roll_out_of_the_window():
    cfg = dict(consecutive_failures=0, failure_ratio=0.5, min_calls=20, window_s=10.0)
    run([
        *[(0.0, "call", "502", PASS) for _ in range(15)],   # 15 failures, not enough calls
        *[(11.0, "call", "200", PASS) for _ in range(10)],  # the failures rolled out
        *[(11.5, "call", "502", PASS) for _ in range(9)],   # 9 of 19
        (11.5, "call", "200", PASS),                        # 9 of 20: under the ratio
        (11.5, "state", None, CLOSED),
        (11.5, "call", "502", PASS),                        # 10 of 21: under
        (11.5, "call", "502", PASS),                        # 11 of 22: at 0.5
        (11.5, "call", "200", refused(5.0)),
    ], **cfg)


def test_half_open_after_the_cool_down_then_a_probe_success_closes_it():
    b = run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],
        (4.9, "call", "200", refused(0.1)),
        (5.0, "admit", "p", PROBE),                  # the cool-down is over: one test call
        (5.0, "state", None, HALF_OPEN),
        (5.1, "call", "200", refused(5.0, "half_open_full")),
        (5.2, "call", "200", refused(5.0, "half_open_full")),
        (5.3, "end", ("p", "200"), CLOSED),
        (5.3, "call", "200", PASS),
    ])
    assert b.rejected_half_open == 2
    assert b.transitions == {(CLOSED, OPEN): 1, (OPEN, HALF_OPEN): 1, (HALF_OPEN, CLOSED): 1}


def test_a_4xx_probe_counts_as_the_tool_being_up():
    run([*[(0.0, "call", "502", PASS) for _ in range(5)], (5.0, "call", "404", PROBE), (5.0, "state", None, CLOSED)])


def test_each_reopen_doubles_the_cool_down_up_to_the_cap():
    run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],     # open 5s
        (5.0, "call", "502", PROBE),                         # probe fails: open 10s
        (5.0, "call", "200", refused(10.0)),
        (15.0, "call", "timeout", PROBE),                    # open 20s
        (15.0, "call", "200", refused(20.0)),
        (35.0, "call", "connect", PROBE),                    # 40s, capped at 30s
        (35.0, "call", "200", refused(30.0)),
        (65.0, "call", "502", PROBE),
        (65.0, "call", "200", refused(30.0)),
    ], max_cooldown_s=30.0)


def test_closing_resets_the_cool_down_growth():
    run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],     # 5s
        (5.0, "call", "502", PROBE),                         # 10s
        (15.0, "call", "200", PROBE),                        # closed
        *[(16.0, "call", "502", PASS) for _ in range(5)],
        (16.0, "call", "200", refused(5.0)),                 # back to 5s
    ])


def test_a_probe_that_never_reports_reopens_at_the_half_open_timeout():
    run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],
        (5.0, "admit", "hung", PROBE),
        (30.0, "call", "200", refused(5.0, "half_open_full")),
        (64.9, "state", None, HALF_OPEN),
        (65.0, "state", None, OPEN),                        # 60s without closing: a re-open
        (65.0, "call", "200", refused(10.0)),
        (70.0, "end", ("hung", "200"), OPEN),               # too late to count
        (75.0, "call", "200", PROBE),
        (75.0, "state", None, CLOSED),
    ])


def test_a_released_probe_gives_its_slot_back():
    b = run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],
        (5.0, "admit", "gone", PROBE),
        (5.5, "release", "gone", HALF_OPEN),                # the client hung up
        (5.5, "admit", "next", PROBE),
        (6.0, "end", ("next", "200"), CLOSED),
    ])
    assert b.abandoned_probes == 1


def test_release_after_record_is_a_no_op():
    b = run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],
        (5.0, "admit", "p", PROBE),
        (5.1, "end", ("p", "502"), OPEN),
        (5.1, "release", "p", OPEN),
        (5.1, "call", "200", refused(10.0)),
    ])
    assert b.abandoned_probes == 0


def test_a_probe_budget_of_three_needs_three_successes():
    cfg = dict(half_open_probes=3)
    run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],
        (5.0, "admit", "a", PROBE),
        (5.0, "admit", "b", PROBE),
        (5.0, "admit", "c", PROBE),
        (5.0, "admit", "d", refused(5.0, "half_open_full")),
        (5.1, "end", ("a", "200"), HALF_OPEN),
        (5.1, "admit", "e", refused(5.0, "half_open_full")),  # a success keeps its slot
        (5.2, "end", ("b", "200"), HALF_OPEN),
        (5.3, "end", ("c", "200"), CLOSED),
    ], **cfg)
    run([
        *[(0.0, "call", "502", PASS) for _ in range(5)],
        (5.0, "admit", "a", PROBE),
        (5.0, "admit", "b", PROBE),
        (5.1, "end", ("a", "200"), HALF_OPEN),
        (5.2, "end", ("b", "503"), OPEN),
        (5.2, "call", "200", refused(10.0)),
    ], **cfg)


def test_stragglers_of_the_storm_do_not_decide_anything():
    run([
        (0.0, "admit", "s1", PASS),
        (0.0, "admit", "s2", PASS),
        (0.0, "admit", "s3", PASS),
        *[(0.0, "call", "502", PASS) for _ in range(5)],     # open
        (1.0, "end", ("s1", "200"), OPEN),                   # a late success does not close it
        (5.0, "admit", "p", PROBE),
        (5.1, "end", ("s2", "200"), HALF_OPEN),              # nor one during half-open
        (5.2, "end", ("s3", "502"), HALF_OPEN),              # nor does a late failure re-open it
        (5.3, "end", ("p", "200"), CLOSED),
    ])


def test_refusal_words_a_model_can_act_on():
    b = CircuitBreaker("search", ToolBreakerConfig())
    for _ in range(5):
        b.admit(0.0).record(0.0, Outcome.SERVER_ERROR, 502, "bad gateway")
    r = b.admit(1.0)
    assert isinstance(r, Refusal)
    assert r.retry_after == 4
    assert "'search'" in r.message and "5 failures in a row" in r.message and "502 bad gateway" in r.message
    assert "4s" in r.message


def test_reset_closes_and_the_listener_sees_every_transition():
    seen = []
    b = CircuitBreaker("search", ToolBreakerConfig(), lambda *a: seen.append(a[1:4]))
    for _ in range(5):
        b.admit(0.0).record(0.0, Outcome.TIMEOUT)
    b.reset(1.0)
    assert b.state == CLOSED and isinstance(b.admit(1.0), Ticket)
    assert seen == [(CLOSED, OPEN, 0.0), (OPEN, CLOSED, 1.0)]
    snap = b.snapshot(1.0)
    assert snap["state"] == "closed" and snap["transitions"] == {"closed->open": 1, "open->closed": 1}


# --- the state machine against a reference, over random sequences ----------------

PROPERTY_CFG = ToolBreakerConfig(consecutive_failures=3, failure_ratio=0.5, min_calls=6, window_s=10.0,
                                 cooldown_s=5.0, cooldown_multiplier=2.0, max_cooldown_s=40.0,
                                 half_open_probes=2, half_open_timeout_s=30.0)
ALL_OUTCOMES = list(OUTCOMES)


def check_sequence(ops, cfg: ToolBreakerConfig = PROPERTY_CFG) -> None:
    """No sequence lets an open breaker forward a call before its cool-down, or more than
    the probe budget per half-open episode; none keeps it open past the cool-down; the
    budget's worth of probe successes always closes it."""
    opens_in_row = 0
    open_until: float | None = None
    log = []

    def listen(_tool, frm, to, now, _reason):
        nonlocal opens_in_row, open_until
        log.append((frm, to, now))
        if to == OPEN:
            open_until = now + min(cfg.max_cooldown_s, cfg.cooldown_s * cfg.cooldown_multiplier ** opens_in_row)
            opens_in_row += 1
        elif to == CLOSED:
            opens_in_row = 0

    b = CircuitBreaker("t", cfg, listen)
    now = 0.0
    live: list[Ticket] = []
    forwarded: dict[int, int] = {}   # half-open generation -> probes admitted and not released
    successes: dict[int, int] = {}
    for op in ops:
        if op[0] == "tick":
            now += op[1]
            continue
        if op[0] == "admit":
            state = b.poll(now)
            got = b.admit(now)
            if state == OPEN and now < open_until:
                assert isinstance(got, Refusal) and got.kind == "open"
                assert got.retry_after_s == pytest.approx(open_until - now)
            if isinstance(got, Refusal):
                assert got.kind != "open" or now < open_until, "kept open past its cool-down"
                continue
            assert got.probe == (b.state == HALF_OPEN)
            if got.probe:
                forwarded[got.generation] = forwarded.get(got.generation, 0) + 1
                assert forwarded[got.generation] <= cfg.half_open_probes, "forwarded past the probe budget"
            live.append(got)
            continue
        if not live:
            continue
        t = live.pop(op[1] % len(live))
        if op[0] == "release":
            current = t.generation == b._generation and b.state == HALF_OPEN
            t.release()
            if t.probe and current:
                forwarded[t.generation] -= 1
            continue
        outcome, status = OUTCOMES[op[2]]
        b.poll(now)
        counted = t.probe and t.generation == b._generation and b.state == HALF_OPEN
        t.record(now, outcome, status)
        if counted and outcome not in (Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECT_ERROR):
            successes[t.generation] = successes.get(t.generation, 0) + 1
            if successes[t.generation] == cfg.half_open_probes:
                assert b.state == CLOSED, "probe successes did not close it"
    for frm, to, _ in log:
        assert (frm, to) in {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}


def random_ops(rng: random.Random, n: int) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            ops.append(("admit",))
        elif r < 0.75:
            ops.append(("end", rng.randrange(50), rng.choice(ALL_OUTCOMES)))
        elif r < 0.85:
            ops.append(("release", rng.randrange(50)))
        else:
            ops.append(("tick", rng.choice([0.0, 0.5, 1.0, 4.9, 5.0, 10.0, 31.0, 80.0])))
    return ops


def test_state_machine_against_the_reference_on_seeded_random_sequences():
    rng = random.Random(7)
    for _ in range(400):
        check_sequence(random_ops(rng, 200))


def test_a_breaker_flapping_for_days_keeps_the_capped_cool_down():
    b = CircuitBreaker("t", ToolBreakerConfig(consecutive_failures=1, cooldown_multiplier=10.0, max_cooldown_s=60.0))
    now = 0.0
    b.admit(now).record(now, Outcome.SERVER_ERROR, 500)
    for _ in range(5000):  # every probe fails: 5000 re-opens in a row
        now += 60.0
        b.admit(now).record(now, Outcome.TIMEOUT)
    r = b.admit(now)
    assert isinstance(r, Refusal) and r.retry_after_s == 60.0
