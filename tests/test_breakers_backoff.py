"""The agent x tool breaker, as tables of (time, agent, event) -> what the agent sees."""

from __future__ import annotations

from proxy.breakers import AgentBackoff, AgentBackoffConfig, Outcome

OUT = {
    "200": (Outcome.SUCCESS, 200),
    "400": (Outcome.CLIENT_ERROR, 400),
    "404": (Outcome.CLIENT_ERROR, 404),
    "422": (Outcome.CLIENT_ERROR, 422),
    "500": (Outcome.SERVER_ERROR, 500),
    "502": (Outcome.SERVER_ERROR, 502),
    "timeout": (Outcome.TIMEOUT, None),
}
PASS = "pass"


def run(steps, tool="search", **cfg) -> AgentBackoff:
    """Steps: (t, agent, outcome, expected): the agent calls at t; PASS means admitted
    (and then OUTCOME is recorded), a number is the refusal's retry_after_s."""
    g = AgentBackoff(AgentBackoffConfig(**cfg))
    for i, (t, agent, out, want) in enumerate(steps):
        agent, _, t_tool = agent.partition("@")
        r = g.check(agent, t_tool or tool, t)
        seen = PASS if r is None else round(r.retry_after_s, 6)
        assert seen == want, f"step {i} (t={t}, {agent} {out}): got {seen}, want {want}"
        if r is None:
            g.record(agent, t_tool or tool, t, *OUT[out], "invalid 'query'")
        else:
            assert r.status == 429 and r.code == "agent_backoff"
    return g


def test_three_invalid_calls_back_off_1s_then_2s_then_4s_capped():
    g = run([
        (0.0, "a", "400", PASS),
        (0.1, "a", "422", PASS),
        (0.2, "a", "404", PASS),           # 3rd in a row: 1s
        (0.2, "a", "400", 1.0),
        (0.7, "a", "400", 0.5),
        (1.2, "a", "400", PASS),           # 4th: 2s
        (1.2, "a", "400", 2.0),
        (3.2, "a", "400", PASS),           # 5th: 4s
        (7.2, "a", "400", PASS),           # 6th: 8s
        (15.2, "a", "400", PASS),          # 7th: 16s, capped at 10s
        (15.2, "a", "400", 10.0),
        (25.2, "a", "500", PASS),          # server errors and timeouts count too
        (25.2, "a", "400", 10.0),
    ], max_backoff_s=10.0)
    assert g.backoffs == 6 and g.rejected == 5


def test_other_agents_and_other_tools_are_unaffected():
    run([
        (0.0, "a", "400", PASS),
        (0.0, "a", "400", PASS),
        (0.0, "a", "400", PASS),
        (0.0, "a", "200", 1.0),
        (0.0, "b", "200", PASS),           # another agent, same tool
        (0.0, "a@files", "200", PASS),     # the same agent, another tool
        (0.5, "b", "400", PASS),
        (0.5, "a", "200", 0.5),
    ])


def test_a_success_forgets_the_failures():
    g = run([
        (0.0, "a", "400", PASS),
        (0.0, "a", "400", PASS),
        (0.0, "a", "200", PASS),
        (0.0, "a", "400", PASS),
        (0.0, "a", "400", PASS),
        (0.0, "a", "200", PASS),           # never three in a row
    ])
    assert len(g) == 0                      # a success leaves nothing in memory


def test_after_a_back_off_one_success_resets_to_the_first_step():
    run([
        *[(0.0, "a", "400", PASS) for _ in range(3)],
        (1.0, "a", "400", PASS),           # 2s
        (3.0, "a", "200", PASS),
        *[(3.0, "a", "400", PASS) for _ in range(3)],
        (3.0, "a", "400", 1.0),            # back to 1s
    ])


def test_failures_of_calls_already_in_flight_do_not_lengthen_a_back_off():
    g = AgentBackoff(AgentBackoffConfig())
    for _ in range(3):
        g.record("a", "t", 0.0, Outcome.CLIENT_ERROR, 400)
    for _ in range(5):  # five more parallel calls come back failed during the back-off
        g.record("a", "t", 0.5, Outcome.CLIENT_ERROR, 400)
    r = g.check("a", "t", 0.5)
    assert r is not None and r.retry_after_s == 0.5
    assert g.failures("a", "t") == 3


def test_the_message_quotes_the_last_error_and_says_what_to_do():
    g = AgentBackoff(AgentBackoffConfig())
    for _ in range(3):
        g.record("a", "search", 0.0, Outcome.CLIENT_ERROR, 422, "'limit' must be at most 50")
    r = g.check("a", "search", 0.25)
    assert r.retry_after == 1
    assert "last 3 calls to tool 'search' failed" in r.message
    assert "422 'limit' must be at most 50" in r.message and "change the request" in r.message


def test_memory_is_bounded_over_many_pairs():
    g = AgentBackoff(AgentBackoffConfig(max_entries=1000, idle_ttl_s=60.0))
    for i in range(20_000):
        g.record(f"agent-{i}", "t", i * 0.001, Outcome.CLIENT_ERROR, 400)
    assert len(g) <= 1000
    assert g.evicted >= 19_000
    # The most recent ones are the ones kept.
    assert g.failures("agent-19999", "t") == 1 and g.failures("agent-0", "t") == 0


def test_idle_pairs_expire():
    g = AgentBackoff(AgentBackoffConfig(idle_ttl_s=60.0))
    for i in range(100):
        g.record(f"a{i}", "t", 0.0, Outcome.CLIENT_ERROR, 400)
    g.record("late", "t", 59.0, Outcome.CLIENT_ERROR, 400)
    assert len(g) == 101
    g.record("later", "t", 61.0, Outcome.CLIENT_ERROR, 400)
    assert len(g) == 2 and g.expired == 100


def test_a_blocked_pair_is_not_expired_before_its_back_off_ends():
    g = AgentBackoff(AgentBackoffConfig(idle_ttl_s=5.0, max_backoff_s=60.0, backoff_s=30.0))
    for _ in range(3):
        g.record("a", "t", 0.0, Outcome.CLIENT_ERROR, 400)
    g.record("b", "t", 10.0, Outcome.CLIENT_ERROR, 400)
    assert g.check("a", "t", 10.0) is not None


def test_an_agent_failing_for_days_keeps_the_capped_back_off():
    g = AgentBackoff(AgentBackoffConfig(backoff_multiplier=10.0, max_backoff_s=60.0))
    now = 0.0
    for _ in range(5000):
        g.record("a", "t", now, Outcome.CLIENT_ERROR, 400)
        now += 61.0
    g.record("a", "t", now, Outcome.CLIENT_ERROR, 400)
    assert g.check("a", "t", now).retry_after_s == 60.0
