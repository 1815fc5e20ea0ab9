"""The loop guard: exact and near-identical failing retries are refused; different calls pass."""

from __future__ import annotations

import random
import string

import orjson
import pytest

from proxy.breakers import LoopGuard, LoopGuardConfig, Outcome, error_summary, fingerprint, similarity
from proxy.breakers.config import DEFAULT_IGNORE_FIELDS

IGNORE = frozenset(DEFAULT_IGNORE_FIELDS)
LONG = ("Write a Python function that parses the CSV file at data/users.csv, drops rows with missing "
        "emails, and returns the count of unique domains sorted by frequency.")
PASS = "pass"
OUT = {
    "200": (Outcome.SUCCESS, 200),
    "400": (Outcome.CLIENT_ERROR, 400),
    "404": (Outcome.CLIENT_ERROR, 404),
    "422": (Outcome.CLIENT_ERROR, 422),
    "500": (Outcome.SERVER_ERROR, 500),
    "503": (Outcome.SERVER_ERROR, 503),
    "429": (Outcome.CLIENT_ERROR, 429),
    "timeout": (Outcome.TIMEOUT, None),
}


def sim(a, b) -> float:
    fa, fb = fingerprint(a, "", IGNORE), fingerprint(b, "", IGNORE)
    return similarity(fa, fb.size, fb.digest, fb.packed())


def same_features(a, b) -> bool:
    return fingerprint(a, "", IGNORE).digest == fingerprint(b, "", IGNORE).digest


# The tables below are written for a guard that refuses after three failures, so a
# table can show both "still passes" and "now refused"; the shipped default (two)
# has its own test.
M3 = {"repeats": 3}


def run(steps, **cfg) -> LoopGuard:
    """Steps: (t, call, outcome, expected). call = (agent, method, path, body) or a body
    alone (agent a, POST /run); expected PASS, or ("refused", kind, retry_after_s)."""
    g = LoopGuard(LoopGuardConfig(**{**M3, **cfg}))
    for i, (t, call, out, want) in enumerate(steps):
        agent, method, path, body = call if isinstance(call, tuple) else ("a", "POST", "/run", call)
        r = g.check(agent, "search", method, path, body, t)
        seen = PASS if r is None else ("refused", r.kind, round(r.retry_after_s, 6))
        assert seen == want, f"step {i} (t={t}, {agent} {method} {path} {out}): got {seen}, want {want}"
        if r is None:
            g.record(agent, "search", method, path, body, t, *OUT[out], "'query' must not be empty")
        else:
            assert r.status == 429 and r.code == "retry_loop"
    return g


def test_an_exact_repeat_is_refused_after_three_failures_until_the_first_leaves_the_window():
    body = {"query": "", "limit": 10}
    g = run([
        (0.0, body, "400", PASS),
        (10.0, body, "400", PASS),
        (20.0, body, "400", PASS),
        (21.0, body, "400", ("refused", "exact", 39.0)),
        (59.9, body, "400", ("refused", "exact", 0.1)),
        (60.0, body, "400", PASS),          # the t=0 failure left the 60s window; this fails again
        (60.5, body, "400", ("refused", "exact", 9.5)),
    ])
    assert g.rejected_exact == 3


def test_by_default_a_call_that_failed_twice_is_refused_the_third_time():
    g = LoopGuard(LoopGuardConfig())
    body = {"q": LONG, "request_id": "r-1"}
    for t in (0.0, 1.0):
        assert g.check("a", "search", "POST", "/run", body, t) is None
        g.record("a", "search", "POST", "/run", body, t, Outcome.CLIENT_ERROR, 400, "no such table")
    near = {"q": LONG[:40] + "X" + LONG[41:], "request_id": "r-3"}
    r = g.check("a", "search", "POST", "/run", near, 2.0)
    assert r is not None and r.code == "retry_loop" and "has failed 2 times" in r.message
    assert g.check("a", "search", "POST", "/run", {"q": "a different question"}, 2.0) is None


def test_the_refusal_quotes_the_last_error_and_says_what_to_do():
    g = LoopGuard(LoopGuardConfig(**M3))
    for t in (0.0, 1.0, 2.0):
        g.record("a", "search", "POST", "/run", {"q": ""}, t, Outcome.CLIENT_ERROR, 400, "'q' must not be empty")
    r = g.check("a", "search", "POST", "/run", {"q": ""}, 3.0)
    assert r.retry_after == 57
    assert r.message == (
        "this call (POST /run) has failed 3 times in the last 60s with identical arguments "
        "(last error: 400 'q' must not be empty); change the arguments or stop retrying. "
        "The same call is refused for 57s."
    )


@pytest.mark.parametrize("name,first,retry", [
    ("changed request id", {"request_id": "r-1", "q": LONG}, {"request_id": "r-2", "q": LONG}),
    ("changed JSON-RPC id",
     {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "run", "arguments": {"q": LONG}}},
     {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "run", "arguments": {"q": LONG}}}),
    ("changed MCP _meta", {"params": {"_meta": {"progressToken": 1}, "q": "x"}},
     {"params": {"_meta": {"progressToken": 2}, "q": "x"}}),
    ("a fresh uuid", {"op": "sync", "ref": "123e4567-e89b-12d3-a456-426614174000"},
     {"op": "sync", "ref": "9b2f1c3a-0000-4d3e-8f00-1234567890ab"}),
    ("a fresh timestamp", {"op": "sync", "sent": "2026-03-01T10:00:00Z"},
     {"op": "sync", "sent": "2026-03-01T10:00:07.250+01:00"}),
    ("changed whitespace", {"q": LONG}, {"q": "  " + LONG.replace(" ", "   \n") + "\t"}),
    ("reordered keys", {"q": LONG, "limit": 10, "lang": "en"}, {"lang": "en", "limit": 10, "q": LONG}),
    ("one changed character in a long argument", {"q": LONG}, {"q": LONG[:40] + "X" + LONG[41:]}),
    ("one inserted character in a long argument", {"q": LONG}, {"q": LONG[:40] + "X" + LONG[40:]}),
    ("reformatted raw JSON", orjson.dumps({"q": LONG, "n": 1}), b'{\n  "n": 1,\n  "q": ' + orjson.dumps(LONG) + b"\n}"),
    ("plain text with changed spacing", b"SELECT * FROM users WHERE id = 5", b"SELECT *  FROM users\nWHERE id = 5 "),
    ("one changed line in a long program", {"code": "\n".join(f"x{i} = f({i}, 'abc')" for i in range(200))},
     {"code": "\n".join(f"x{i} = f({i}, 'abd')" if i == 150 else f"x{i} = f({i}, 'abc')" for i in range(200))}),
])
def test_repeats_and_near_repeats_are_stopped(name, first, retry):
    run([
        (0.0, first, "400", PASS),
        (1.0, first, "400", PASS),
        (2.0, first, "422", PASS),
        (3.0, retry, "400", ("refused", "exact" if same_features(first, retry) else "near", 57.0)),
    ])


@pytest.mark.parametrize("name,first,other", [
    ("a different short argument", {"q": "weather in Paris"}, {"q": "weather in London"}),
    ("a different number", {"a": 1, "b": 2}, {"a": 1, "b": 3}),
    ("one changed character in a short argument", {"city": "Paris"}, {"city": "Parix"}),
    ("a different path argument", {"path": "/tmp/a.txt"}, {"path": "/home/user/notes.md"}),
    ("a different request", {"q": LONG}, {"q": "Summarise the quarterly revenue report and list the three "
                                                "biggest cost drivers with figures."}),
    ("another MCP tool with the same arguments",
     {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "rm", "arguments": {"path": LONG}}},
     {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "cat", "arguments": {"path": LONG}}}),
    ("a different MCP tool argument",
     {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "rm", "arguments": {"path": "/a"}}},
     {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "rm", "arguments": {"path": "/b/c"}}}),
    ("an added field", {"q": "x"}, {"q": "x", "limit": 5}),
    ("a null instead of false", {"q": "x", "f": False}, {"q": "x", "f": None}),
])
def test_a_genuinely_different_call_goes_through(name, first, other):
    run([
        (0.0, first, "400", PASS),
        (1.0, first, "400", PASS),
        (2.0, first, "400", PASS),
        (3.0, first, "400", ("refused", "exact", 57.0)),
        (3.0, other, "400", PASS),
    ])


def test_the_same_body_on_another_path_method_or_by_another_agent_goes_through():
    body = {"q": ""}
    run([
        *[(float(i), body, "400", PASS) for i in range(3)],
        (3.0, ("a", "POST", "/run", body), "400", ("refused", "exact", 57.0)),
        (3.0, ("a", "POST", "/other", body), "400", PASS),
        (3.0, ("a", "PUT", "/run", body), "400", PASS),
        (3.0, ("b", "POST", "/run", body), "400", PASS),
    ])


def test_statuses_that_invite_a_retry_and_timeouts_are_not_loops_but_are_recent_failures():
    body = {"q": "x"}
    g = run([
        *[(float(i), body, "503", PASS) for i in range(5)],
        *[(5.0 + i, body, "429", PASS) for i in range(5)],
        *[(10.0 + i, body, "timeout", PASS) for i in range(5)],
        (15.0, body, "200", PASS),
    ])
    assert g.recent_failures("a", "search", 15.0) == 15
    assert g.recent_failures("a", "search", 60.5) == 14      # the t=0 one left the window
    assert g.recent_failures("b", "search", 15.0) == 0


def test_500s_are_loop_material():
    body = {"q": "crashes the tool"}
    run([*[(float(i), body, "500", PASS) for i in range(3)], (3.0, body, "500", ("refused", "exact", 57.0))])


def test_a_success_of_the_same_call_wipes_its_failures():
    body = {"q": LONG}
    run([
        (0.0, body, "400", PASS),
        (1.0, body, "400", PASS),
        (2.0, {"q": LONG + " please"}, "200", PASS),   # near-same call succeeded: not a loop
        (3.0, body, "400", PASS),
        (4.0, body, "400", PASS),
        (5.0, body, "400", PASS),
        (6.0, body, "400", ("refused", "exact", 57.0)),
    ])


def test_near_misses_count_towards_the_same_loop():
    edits = [LONG[:20] + c + LONG[21:] for c in "XYZW"]
    run([
        (0.0, {"q": edits[0]}, "400", PASS),
        (1.0, {"q": edits[1]}, "400", PASS),
        (2.0, {"q": edits[2]}, "400", PASS),
        (3.0, {"q": edits[3]}, "400", ("refused", "near", 57.0)),
    ])


def drift(steps: int, seed: int = 7) -> list[str]:
    """An agent's edits of a failing argument: each one character away from the last."""
    rng = random.Random(seed)
    out = [LONG]
    for _ in range(steps):
        q = out[-1]
        pos = rng.randrange(len(q))
        out.append(q[:pos] + rng.choice(string.ascii_lowercase) + q[pos + 1:])
    return out


def test_the_guard_follows_an_agent_editing_its_way_past_the_failures():
    v = drift(14)
    # By the end the edits are far from both calls that failed: compared with the
    # failures alone, the last ones would reach the tool again.
    assert sim({"q": v[-1]}, {"q": v[0]}) < 0.8 and sim({"q": v[-1]}, {"q": v[1]}) < 0.8
    g = run([
        (0.0, {"q": v[0]}, "400", PASS),
        (1.0, {"q": v[1]}, "400", PASS),
        *[(1.0 + i, {"q": v[i]}, "400", ("refused", "near", 59.0 - i)) for i in range(2, len(v))],
        # A genuinely different call goes through, and the chain lifts when the failures
        # it stands on leave the window: hammering does not extend it.
        (20.0, {"q": "weather in Paris tomorrow"}, "200", PASS),
        (59.9, {"q": v[-1] + "?"}, "400", ("refused", "near", 0.1)),
        (60.0, {"q": v[-1] + "?"}, "400", PASS),
    ], repeats=2)
    assert g.rejected_near == len(v) - 1
    # Echoes are not failures: the policy's state.recent_failures counts what reached the tool.
    assert g.recent_failures("a", "search", 60.5) == 2  # the ones at t=1 and t=60


def test_an_echo_says_how_many_times_the_call_really_failed():
    v = drift(8)
    g = LoopGuard(LoopGuardConfig(repeats=2))
    for t, q in ((0.0, v[0]), (1.0, v[1])):
        g.record("a", "search", "POST", "/run", {"q": q}, t, Outcome.CLIENT_ERROR, 400, "no such table")
    for t, q in enumerate(v[2:], start=2):
        r = g.check("a", "search", "POST", "/run", {"q": q}, float(t))
        assert r is not None and "has failed 2 times" in r.message and "no such table" in r.message


def test_hammering_one_call_never_pushes_out_the_failures_of_another():
    v = drift(200, seed=3)
    g = LoopGuard(LoopGuardConfig(repeats=2, history=8))
    other = {"path": "/etc/passwd"}
    for t in (0.0, 0.1):
        g.record("a", "search", "POST", "/other", other, t, Outcome.CLIENT_ERROR, 403, "denied")
    for t, q in ((0.2, v[0]), (0.5, v[1])):
        g.record("a", "search", "POST", "/run", {"q": q}, t, Outcome.CLIENT_ERROR, 400, "bad")
    for i, q in enumerate(v[2:]):
        assert g.check("a", "search", "POST", "/run", {"q": q}, 1.0 + i * 0.01) is not None
    h = g._pairs[("a", "search")]
    assert len(h.failures) == 4 and len(h.echoes) <= 8  # memory stays bounded
    # The other call's failures are all still there: still refused, still counted.
    assert g.check("a", "search", "POST", "/other", other, 3.0) is not None
    assert g.recent_failures("a", "search", 3.0) == 4


def test_a_success_that_wipes_the_failures_takes_their_echoes_with_it():
    v = drift(6, seed=5)
    g = LoopGuard(LoopGuardConfig(repeats=2))
    for t, q in ((0.0, v[0]), (1.0, v[1])):
        g.record("a", "search", "POST", "/run", {"q": q}, t, Outcome.CLIENT_ERROR, 400, "bad")
    for t, q in enumerate(v[2:5], start=2):
        assert g.check("a", "search", "POST", "/run", {"q": q}, float(t)) is not None
    # The tool was fixed: the same call now succeeds (sent through another guard, say).
    g.record("a", "search", "POST", "/run", {"q": v[1]}, 5.0, Outcome.SUCCESS, 200)
    assert g.check("a", "search", "POST", "/run", {"q": v[5]}, 6.0) is None


def test_retry_after_is_when_the_refused_call_passes_again():
    """Failures of drifting calls at random times, the agent jumping back to earlier
    variants, refusals in between: every refusal's Retry-After is exactly when that
    same call would next pass (nothing new failing meanwhile)."""
    import copy

    for seed in range(100):
        rng = random.Random(seed)
        v = drift(40, seed=seed)
        g = LoopGuard(LoopGuardConfig(repeats=rng.choice((2, 3)), window_s=10.0))
        t = 0.0
        for i in range(60):
            body = {"q": v[min(len(v) - 1, max(0, i // 2 + rng.randint(-3, 1)))]}
            t += rng.uniform(0.05, 2.0)
            r = g.check("a", "search", "POST", "/run", body, t)
            if r is None:
                g.record("a", "search", "POST", "/run", body, t, Outcome.CLIENT_ERROR, 400, f"bad {i}")
                continue
            later = copy.deepcopy(g)
            lift = t + r.retry_after_s
            assert later.check("a", "search", "POST", "/run", body, lift - 1e-6) is not None, (seed, i)
            assert later.check("a", "search", "POST", "/run", body, lift + 1e-6) is None, (seed, i, r.message)


def test_query_strings_are_part_of_the_call():
    g = LoopGuard(LoopGuardConfig(**M3))
    for t in (0.0, 1.0, 2.0):
        g.record("a", "s", "GET", "/search", None, t, Outcome.CLIENT_ERROR, 400, query="q=&limit=10&request_id=1")
    assert g.check("a", "s", "GET", "/search", None, 3.0, query="limit=10&q=&request_id=2") is not None
    assert g.check("a", "s", "GET", "/search", None, 3.0, query="q=cats&limit=10") is None


def test_repeats_and_similarity_are_configurable():
    body = {"q": LONG}
    near = {"q": LONG[:40] + "X" + LONG[41:]}
    run([(0.0, body, "400", PASS), (1.0, body, "400", ("refused", "exact", 59.0))], repeats=1)
    run([*[(float(i), body, "400", PASS) for i in range(3)], (3.0, near, "400", PASS)], similarity=1.0)


def test_volatile_fields_are_configurable():
    a, b = {"q": "x", "session": "s1"}, {"q": "x", "session": "s2"}
    run([*[(float(i), a, "400", PASS) for i in range(3)], (3.0, b, "400", PASS)])
    run([*[(float(i), a, "400", PASS) for i in range(3)], (3.0, b, "400", ("refused", "exact", 57.0))],
        ignore_fields=("session",))


def test_no_fingerprint_is_computed_for_an_agent_without_recent_failures():
    g = LoopGuard(LoopGuardConfig(**M3))
    for i in range(1000):
        assert g.check(f"a{i % 7}", "s", "POST", "/run", {"q": LONG}, float(i)) is None
        g.record(f"a{i % 7}", "s", "POST", "/run", {"q": LONG}, float(i), Outcome.SUCCESS, 200)
    assert g.fingerprints == 0 and len(g) == 0


def test_memory_is_bounded():
    g = LoopGuard(LoopGuardConfig(max_entries=500, history=4, repeats=3))
    for i in range(5000):
        for k in range(10):
            g.record(f"agent-{i}", "s", "POST", "/run", {"k": k}, i * 0.001, Outcome.CLIENT_ERROR, 400)
    assert len(g) <= 500 and g.evicted >= 4500
    assert all(len(h.failures) <= 4 for h in g._pairs.values())
    g.record("late", "s", "POST", "/run", {}, 1000.0, Outcome.CLIENT_ERROR, 400)
    assert len(g) == 1  # everything else was idle for a full window


# --- property-ish checks of the near-duplicate measure -------------------------------

def _random_text(rng: random.Random, n: int) -> str:
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(n)]
    return " ".join(words)


def _edit(rng: random.Random, s: str) -> str:
    i = rng.randrange(len(s))
    c = rng.choice(string.ascii_letters + string.digits + "._-/")
    return rng.choice([s[:i] + c + s[i + 1:], s[:i] + c + s[i:], s[:i] + s[i + 1:]])


def test_one_edit_in_a_long_argument_stays_near_and_unrelated_arguments_do_not():
    rng = random.Random(11)
    floor = LoopGuardConfig().similarity
    for _ in range(300):
        base = _random_text(rng, rng.randint(15, 120))  # about 90 to 700 characters
        extra = {"limit": rng.randint(1, 50), "lang": rng.choice(["en", "de"])}
        a = {"q": base, **extra}
        assert sim(a, {**extra, "q": _edit(rng, base)}) >= floor
        assert sim(a, {"q": _random_text(rng, rng.randint(15, 120)), **extra}) < 0.5


def test_json_formatting_key_order_and_request_ids_never_matter():
    rng = random.Random(5)
    for _ in range(200):
        doc = {f"k{j}": rng.choice([rng.randint(0, 9), _random_text(rng, 3), [1, 2], {"x": "y"}, None, True])
               for j in range(rng.randint(1, 8))}
        shuffled = dict(rng.sample(list(doc.items()), len(doc)))
        a = orjson.dumps({**doc, "request_id": rng.random()})
        b = orjson.dumps({"request_id": rng.random(), **shuffled}, option=orjson.OPT_INDENT_2)
        assert sim(a, b) == 1.0
        assert fingerprint(a, "", IGNORE).digest == fingerprint(b, "", IGNORE).digest


def test_the_similarity_estimate_is_close_to_exact_jaccard_on_large_bodies():
    rng = random.Random(3)
    for _ in range(50):
        words = [f"w{rng.randrange(10**9)}" for _ in range(600)]
        changed = list(words)
        k = rng.randint(0, 200)
        for j in rng.sample(range(600), k):
            changed[j] = f"z{rng.randrange(10**9)}"
        a = {f"f{j}": w for j, w in enumerate(words)}
        b = {f"f{j}": w for j, w in enumerate(changed)}
        true = (600 - k) / (600 + k)
        assert abs(sim(a, b) - true) < 0.2


def test_error_summary_finds_the_message():
    assert error_summary(b'{"error": {"code": 400, "message": "bad  \\n query"}}') == "bad query"
    assert error_summary({"detail": [{"msg": "field required"}]}) == "field required"
    assert error_summary(b'{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"Invalid params"}}') == "Invalid params"
    assert error_summary(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert error_summary("x" * 500).endswith("…") and len(error_summary("x" * 500)) == 200
