"""The approval state machine, as tables of (time, step) → outcome, run against
both stores: in memory and in a real redis-server (the Lua scripts must apply
exactly the rules of store.settle_record / store.claim_record). Plus masking,
and the races that only a shared store has."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from proxy.approvals.approval import MASK, admin_view, agent_view, mask, new_id, valid_id
from proxy.approvals.redis_store import RedisApprovalStore
from proxy.approvals.store import ApprovalStoreError, ApprovalStoreFull, Binding, MemoryApprovalStore

from tests.support.redis_server import RedisServer

TIMEOUT = 10.0
USE_WITHIN = 5.0
KEEP = 100.0


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        s = MemoryApprovalStore()
    else:
        srv = request.getfixturevalue("redis_server")
        client = Redis.from_url(srv.url)
        await client.flushdb()
        await client.aclose()
        s = RedisApprovalStore(srv.url)
    await s.start()
    yield s
    await s.close()


def record(mode="async", agent="analyst-2", created=0.0, **kw) -> dict:
    rec = {
        "id": new_id(), "state": "pending", "mode": mode, "agent": agent, "tool": "payments", "method": "POST",
        "path": "/tools/payments/pay", "query": {}, "target_sha256": "t" * 64, "body_sha256": "b" * 64,
        "body_size": 12, "args": {"amount": 250, "list": []}, "args_note": "", "reason": "big",
        "decision_id": "d1", "revision": "sha256:x", "created": created, "expires": created + TIMEOUT,
        "decided_at": None, "approver": "", "comment": "", "used_by": "", "used_at": None,
    }
    rec.update(kw)
    return rec


GOOD = Binding("analyst-2", "payments", "t" * 64, "b" * 64, USE_WITHIN)

# (mode, [(time, step, expected outcome, expected state afterwards)])
# steps: approve, deny, expire, withdraw, claim (hold: no binding), redeem (binding GOOD),
# redeem:<field>=<value> (a binding differing in one field)
TABLES = {
    "approve, then use once": ("async", [
        (1, "approve", ("ok", "approved"), "approved"),
        (2, "deny", ("conflict", "approved"), "approved"),
        (3, "redeem", ("ok", ""), "used"),
        (3.1, "redeem", ("used", ""), "used"),
    ]),
    "a decision after the deadline expires the approval": ("async", [
        (10, "approve", ("expired_now", "expired"), "expired"),
        (11, "redeem", ("expired", ""), "expired"),
    ]),
    "re-sent while pending, then after the deadline": ("async", [
        (1, "redeem", ("pending", ""), "pending"),
        (11, "redeem", ("expired_now", ""), "expired"),
        (12, "redeem", ("expired", ""), "expired"),
        (12, "expire", ("conflict", "expired"), "expired"),
    ]),
    "withdrawn before anyone decided": ("hold", [
        (1, "withdraw", ("ok", "withdrawn"), "withdrawn"),
        (2, "approve", ("conflict", "withdrawn"), "withdrawn"),
        (2, "claim", ("withdrawn", ""), "withdrawn"),
    ]),
    "denied": ("async", [
        (1, "deny", ("ok", "denied"), "denied"),
        (2, "redeem", ("denied", ""), "denied"),
    ]),
    "a changed call may not use the approval": ("async", [
        (1, "approve", ("ok", "approved"), "approved"),
        (2, "redeem:body_sha256=c", ("mismatch", "body"), "approved"),
        (2, "redeem:target_sha256=c", ("mismatch", "method and path"), "approved"),
        (2, "redeem:tool=shell", ("mismatch", "tool"), "approved"),
        (2, "redeem:agent=coder-7", ("missing", ""), "approved"),
        (5.9, "redeem", ("ok", ""), "used"),
    ]),
    "an approval not used in time goes stale": ("async", [
        (1, "approve", ("ok", "approved"), "approved"),
        (6.5, "redeem", ("stale", ""), "approved"),
    ]),
    "hold approvals cannot be redeemed by a re-send": ("hold", [
        (1, "approve", ("ok", "approved"), "approved"),
        (2, "redeem", ("missing", ""), "approved"),
        (2, "claim", ("ok", ""), "used"),
        (2, "claim", ("used", ""), "used"),
    ]),
    "the holder's timeout": ("hold", [
        (10, "expire", ("ok", "expired"), "expired"),
        (10, "approve", ("conflict", "expired"), "expired"),
    ]),
}


async def apply(store, rec_id: str, t: float, step: str):
    if step in ("approve", "deny"):
        return await store.settle(rec_id, "approved" if step == "approve" else "denied", t, "alice", "why")
    if step in ("expire", "withdraw"):
        return await store.settle(rec_id, "expired" if step == "expire" else "withdrawn", t)
    if step == "claim":
        return await store.claim(rec_id, "d2", t)
    binding = GOOD
    if ":" in step:
        field, value = step.split(":", 1)[1].split("=")
        binding = Binding(**{**{k: getattr(GOOD, k) for k in Binding.__slots__}, field: value})
    return await store.claim(rec_id, "d2", t, binding)


@pytest.mark.parametrize("name", list(TABLES))
async def test_state_machine(store, name):
    mode, steps = TABLES[name]
    rec = record(mode=mode)
    await store.create(rec, 0.0, 10, KEEP)
    for t, step, expected, state in steps:
        got = await apply(store, rec["id"], t, step)
        got = (got[0], got[1] or "")
        assert got == expected, (name, t, step)
        assert (await store.get(rec["id"]))["state"] == state, (name, t, step)


async def test_unknown_ids_are_missing(store):
    assert await store.settle(new_id(), "approved", 1, "a", "") == ("missing", None)
    assert (await store.claim(new_id(), "d", 1, GOOD))[0] == "missing"
    assert await store.get(new_id()) is None


async def test_record_round_trips_and_keeps_the_decision(store):
    rec = record()
    await store.create(rec, 0.0, 10, KEEP)
    assert await store.get(rec["id"]) == rec
    await store.settle(rec["id"], "approved", 1.5, "alice", "ok ✓")
    got = await store.get(rec["id"])
    assert (got["state"], got["approver"], got["comment"], got["decided_at"]) == ("approved", "alice", "ok ✓", 1.5)
    await store.claim(rec["id"], "d9", 2.0, GOOD)
    got = await store.get(rec["id"])
    assert (got["used_by"], got["used_at"]) == ("d9", 2.0)


async def test_max_pending_counts_only_live_approvals(store):
    a, b = record(created=0.0), record(created=1.0)
    await store.create(a, 0.0, 2, KEEP)
    await store.create(b, 1.0, 2, KEEP)
    with pytest.raises(ApprovalStoreFull):
        await store.create(record(created=2.0), 2.0, 2, KEEP)
    await store.settle(a["id"], "denied", 3.0, "bob", "")
    await store.create(record(created=3.0), 3.0, 2, KEEP)
    # At t=12, b has expired (nobody said so yet): it no longer counts.
    await store.create(record(created=12.0), 12.0, 2, KEEP)


async def test_list_is_newest_first_and_filters_by_state(store):
    recs = [record(created=float(i)) for i in range(3)]
    for r in recs:
        await store.create(r, r["created"], 10, KEEP)
    await store.settle(recs[1]["id"], "denied", 3.0, "bob", "")
    pending = await store.list("pending", 4.0, 10)
    assert [r["id"] for r in pending] == [recs[2]["id"], recs[0]["id"]]
    everything = await store.list(None, 4.0, 10)
    assert [r["id"] for r in everything] == [recs[2]["id"], recs[1]["id"], recs[0]["id"]]


async def test_a_decision_reaches_the_waiter(store):
    rec = record()
    await store.create(rec, 0.0, 10, KEEP)
    fut = store.events.waiter(rec["id"])
    q = store.events.listen()
    await store.settle(rec["id"], "approved", 1.0, "alice", "")
    assert await asyncio.wait_for(fut, 2) == "approved"
    seen = []
    while not q.empty() or not seen:
        seen.append(await asyncio.wait_for(q.get(), 2))
    assert (rec["id"], "approved") in seen


async def test_racing_replicas_decide_exactly_once(redis_server):
    """Two replicas (two clients), forty concurrent decisions on one approval: one wins."""
    a, b = RedisApprovalStore(redis_server.url), RedisApprovalStore(redis_server.url)
    await a.start()
    await b.start()
    try:
        rec = record()
        await a.create(rec, 0.0, 10, KEEP)
        steps = [s.settle(rec["id"], verb, 1.0, f"{s is a}-{i}", "") for i in range(20)
                 for s, verb in ((a, "approved"), (b, "denied"))]
        outcomes = await asyncio.gather(*steps)
        assert sum(1 for o, _ in outcomes if o == "ok") == 1
        await a.settle(rec["id"], "approved", 1.0)  # and the record is already decided
        await a.create(rec2 := record(), 0.0, 10, KEEP)
        await b.settle(rec2["id"], "approved", 1.0, "alice", "")
        claims = await asyncio.gather(*[s.claim(rec2["id"], f"d{i}", 2.0, GOOD) for i in range(10) for s in (a, b)])
        assert sum(1 for o, _ in claims if o == "ok") == 1
    finally:
        await a.close()
        await b.close()


async def test_redis_down_is_a_store_error_not_a_hang():
    s = RedisApprovalStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    try:
        with pytest.raises(ApprovalStoreError):
            await s.create(record(), 0.0, 10, KEEP)
        with pytest.raises(ApprovalStoreError):
            await s.get(new_id())
    finally:
        await s.close()


def test_mask_is_recursive_and_case_insensitive():
    doc = {"Account": "DE1", "nested": {"token": "t", "keep": [{"account": 1}, {"ok": 2}]}, "n": 1}
    assert mask(doc, frozenset({"account", "token"})) == {
        "Account": MASK, "nested": {"token": MASK, "keep": [{"account": MASK}, {"ok": 2}]}, "n": 1}
    assert mask(doc, frozenset()) is doc


def test_views_say_what_each_reader_may_know():
    rec = record(state="denied", approver="alice", comment="no", decided_at=2.0)
    agent = agent_view(rec, 3.0, "/_regate/approvals/x")
    assert agent["comment"] == "no" and "approver" not in agent and "args" not in agent
    assert admin_view(record(), 11.0)["state"] == "expired"
    assert admin_view(record(), 4.0)["time_left_s"] == 6.0
    assert valid_id(new_id()) and not valid_id("apr_../../x") and not valid_id("apr_" + "0" * 23)
