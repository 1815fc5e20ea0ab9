"""The three guards together, as the breaker stage uses them: Breakers.admit / Admission.record."""

from __future__ import annotations

import random

import orjson

from proxy.breakers import CLOSED, HALF_OPEN, OPEN, Admission, Outcome, Refusal, build

BODY = {"query": "SELECT name FROM users WHERE signup > '2026-01-01' ORDER BY name LIMIT 50"}


def call(b, t, agent="a", tool="search", body=BODY, status=None, outcome=None, method="POST", path="/run"):
    """Admit, then record status/outcome (if any); return the admission or the refusal."""
    r = b.admit(agent, tool, method, path, body, t)
    if isinstance(r, Admission) and (status is not None or outcome is not None):
        r.record(t, status, outcome, error="boom")
    return r


def codes(rs):
    return [r.code if isinstance(r, Refusal) else "pass" for r in rs]


def test_a_404_does_not_open_the_tool_breaker_but_counts_for_the_agent():
    b = build({"loop": {"enabled": False}})
    got = [call(b, 0.1 * i, status=404) for i in range(4)]
    assert codes(got) == ["pass", "pass", "pass", "agent_backoff"]
    assert got[3].status == 429 and got[3].retry_after == 1
    assert b.state("search", 1.0) == CLOSED
    assert isinstance(call(b, 0.5, agent="b"), Admission)


def test_one_agent_hammering_with_invalid_calls_backs_off_while_another_passes():
    b = build({})
    rng = random.Random(1)
    hammer, other = [], []
    for i in range(60):
        t = float(i)
        body = {"query": BODY["query"] + rng.choice(" .;"), "request_id": i}  # small edits, new ids
        hammer.append(call(b, t, agent="bad", body=body, status=400))
        other.append(call(b, t + 0.5, agent="good", body={"query": f"q{i}"}, status=200))
    assert all(isinstance(r, Admission) for r in other)
    passed = sum(isinstance(r, Admission) for r in hammer)
    assert passed <= 5, codes(hammer)
    assert "retry_loop" in codes(hammer)
    assert b.state("search", 60.0) == CLOSED


def test_an_open_tool_breaker_refuses_every_agent_and_names_the_tool():
    b = build({"agent": {"consecutive_failures": 10}})
    for i in range(5):
        call(b, 0.0, agent=f"a{i}", status=502)
    r = call(b, 1.0, agent="fresh")
    assert isinstance(r, Refusal) and r.code == "tool_unavailable" and r.status == 503
    assert r.retry_after == 4 and "'search'" in r.message
    assert b.rejections == {"tool_unavailable": 1, "agent_backoff": 0, "retry_loop": 0}


def test_a_sick_tool_is_reported_before_the_agents_own_back_off():
    b = build({"loop": {"enabled": False}})
    rs = [call(b, float(i) * 3, status=503) for i in range(5)]   # 3 s apart: each back-off has ended
    assert codes(rs) == ["pass"] * 5
    r = call(b, 12.5)
    assert r.code == "tool_unavailable"


def test_the_admission_carries_the_policy_inputs_state():
    b = build({"tool": {"consecutive_failures": 2}, "agent": {"consecutive_failures": 10}})
    a = call(b, 0.0)
    assert (a.breaker_state, a.recent_failures, a.probe) == (CLOSED, 0, False)
    call(b, 0.0, status=500)
    call(b, 0.0, outcome=Outcome.TIMEOUT)
    probe = call(b, 5.0)
    assert (probe.breaker_state, probe.recent_failures, probe.probe) == (HALF_OPEN, 2, True)


def test_a_probe_refused_by_a_later_stage_is_released_and_the_next_call_probes():
    b = build({"tool": {"consecutive_failures": 1}})
    call(b, 0.0, outcome=Outcome.CONNECT_ERROR)
    p = call(b, 5.0)
    assert p.probe and call(b, 5.0, agent="b").code == "tool_unavailable"
    p.release()                                   # e.g. policy said no
    p.release()                                   # idempotent
    q = call(b, 5.1, agent="b")
    assert q.probe
    q.record(5.2, 200)
    q.release()                                   # a no-op after record
    assert b.state("search", 5.2) == CLOSED


def test_overrides_apply_to_their_tool_only():
    b = build({"overrides": {"flaky": {"tool": {"consecutive_failures": 2}, "loop": {"enabled": False},
                                       "agent": {"enabled": False}}}}, tools=["search", "flaky"])
    for _ in range(2):
        call(b, 0.0, tool="flaky", status=502)
        call(b, 0.0, tool="search", agent=f"x{_}", status=502)
    assert b.state("flaky", 0.0) == OPEN and b.state("search", 0.0) == CLOSED
    assert b.tools.get("flaky").snapshot(0.0)["reason"] == "2 failures in a row"
    b.reset("flaky", 0.0)
    for i in range(6):                            # neither the agent nor the loop guard is on for flaky
        assert isinstance(call(b, 0.1 * i, tool="flaky", status=400), Admission)


def test_a_disabled_tool_breaker_forwards_and_changes_nothing():
    b = build({"tool": {"enabled": False}, "agent": {"enabled": False}, "loop": {"enabled": False}})
    assert b.agents is None and b.loops is None
    for i in range(50):
        assert isinstance(call(b, 0.0, status=502), Admission)
    assert b.state("search", 0.0) == CLOSED


def test_reset_forgets_breaker_back_off_and_loops_of_the_tool():
    b = build({})
    for _ in range(5):
        call(b, 0.0, status=400)
    assert isinstance(call(b, 0.0), Refusal)
    assert b.reset("search", 0.0)
    assert isinstance(call(b, 0.0), Admission)


def test_snapshot_is_json_and_transitions_reach_the_listener():
    seen = []
    b = build({}, on_transition=lambda tool, frm, to, now, why: seen.append((tool, frm, to, why)))
    for i in range(5):
        call(b, 0.0, agent=f"a{i}", status=502)
    snap = orjson.loads(orjson.dumps(b.snapshot(1.0)))
    assert snap["tools"][0]["state"] == "open" and snap["tools"][0]["retry_after_s"] == 4.0
    assert seen == [("search", "closed", "open", "5 failures in a row")]


def test_a_retry_storm_is_cut_at_least_fivefold_while_good_calls_all_pass():
    """20 agents for 60 simulated seconds, one call a second each: 30% of them are stuck
    re-sending an invalid call with small random edits (ignoring Retry-After); the rest
    make valid calls. Count what reaches the tool with and without the guards."""

    def simulate(guarded: bool) -> tuple[int, int, int]:
        b = build({})
        rng = random.Random(42)
        upstream_bad = upstream_good = refused_good = 0
        for second in range(60):
            for agent in range(20):
                t = second + agent / 20
                stuck = agent < 6
                if stuck:
                    q = BODY["query"][: 20 + rng.randrange(5)] + rng.choice(["", " ", "  "]) + BODY["query"][25:]
                    body = {"query": q, "request_id": rng.random()}
                else:
                    body = {"query": f"valid {agent} {second}"}
                if guarded:
                    r = b.admit(f"agent-{agent}", "db", "POST", "/query", body, t)
                    if isinstance(r, Refusal):
                        refused_good += not stuck
                        continue
                    r.record(t, 400 if stuck else 200, error="syntax error near 'signup'")
                if stuck:
                    upstream_bad += 1
                else:
                    upstream_good += 1
        return upstream_bad, upstream_good, refused_good

    bad_off, good_off, _ = simulate(False)
    bad_on, good_on, refused_good = simulate(True)
    assert bad_off / bad_on >= 5, (bad_off, bad_on)
    assert good_on == good_off and refused_good == 0
