"""GPU admission against a scripted GPU view (the real NVML cannot run here): admit up to
capacity, queue by priority, shed at the deadline or when the queue is full, per-agent
caps, headroom, the visibility rule, and no leaked reservation whatever way a call ends.

Most tests are tables of (time, event, what changed). Events:
  call NAME MB [dev=N] [prio=N] [agent=X] [deadline=T]   submit a call
  release NAME | withdraw NAME | expire
  reading DEV free=MB [util=P]                            a new sample, taken at that time
What changed lists every call whose state moved, as NAME:STATE, STATE one of
gpuN (admitted on device N), queued, withdrawn, released, shed:REASON/RETRY_AFTER.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy.gpu import (
    AdmissionConfig, AdmissionController, DeviceReading, GpuCollector, GpuView, Shed, StaticView, Ticket,
)


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ScriptedView:
    """A measured view whose readings the test writes, behind the GpuView interface."""

    source = "scripted"

    def __init__(self, clock: FakeClock, devices: dict[int, int]) -> None:
        self.clock = clock
        self._readings = {
            i: DeviceReading(i, f"gpu{i}", total, total, 0, 0.0, clock()) for i, total in devices.items()
        }
        self._listeners = []

    @property
    def status(self) -> str:
        return "scripted"

    def devices(self):
        return tuple(self._readings[i] for i in sorted(self._readings))

    def add_listener(self, listener) -> None:
        self._listeners.append(listener)

    def describe(self):
        return {"source": self.source}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def publish(self, index: int, free_mb: int, util: float | None = 0.0) -> None:
        old = self._readings[index]
        self._readings[index] = DeviceReading(index, old.name, old.total_mb, free_mb, old.total_mb - free_mb,
                                              util, self.clock())
        for listener in self._listeners:
            listener()


def describe(w) -> str:
    if w.outcome is None:
        return "queued" if w.queued else "withdrawn"
    if isinstance(w.outcome, Ticket):
        return "released" if w.outcome.released else f"gpu{w.outcome.device}"
    retry = "-" if w.outcome.retry_after is None else f"{w.outcome.retry_after:g}"
    return f"shed:{w.outcome.reason}/{retry}"


def play(table, *, devices=None, measured=False, **config):
    """Run a table; returns the controller for further checks."""
    clock = FakeClock()
    devices = devices or {0: 8000}
    if measured:
        view = ScriptedView(clock, devices)
    else:
        view = StaticView([{"memory_mb": devices[i]} for i in sorted(devices)])
    cfg = AdmissionConfig(**{"queue_wait_s": 10.0, "settle_s": 0.0, **config})
    ctl = AdmissionController(view, cfg, clock)
    calls = {}
    for row, (t, event, expected) in enumerate(table):
        clock.t = t
        before = {name: describe(w) for name, w in calls.items()}
        op, *args = event.split()
        if op == "call":
            name, mb, *opts = args
            kw = dict(o.split("=") for o in opts)
            calls[name] = ctl.submit(
                int(mb),
                device=int(kw["dev"]) if "dev" in kw else None,
                priority=int(kw.get("prio", 0)),
                agent=kw.get("agent"),
                deadline=float(kw["deadline"]) if "deadline" in kw else None,
            )
        elif op == "release":
            calls[args[0]].outcome.release()
        elif op == "withdraw":
            ctl.withdraw(calls[args[0]])
        elif op == "expire":
            ctl.expire()
        elif op == "reading":
            kw = dict(o.split("=") for o in args[1:])
            util = kw.get("util", "0")
            view.publish(int(args[0]), int(kw["free"]), None if util == "none" else float(util))
        else:
            raise AssertionError(f"unknown event {event!r}")
        after = {name: describe(w) for name, w in calls.items()}
        changed = " ".join(sorted(f"{n}:{s}" for n, s in after.items() if before.get(n) != s))
        expected = " ".join(sorted(expected.split()))
        assert changed == expected, f"row {row} ({t}, {event!r}): got {changed!r}, want {expected!r}"
    return ctl


def test_burst_larger_than_capacity_is_admitted_up_to_capacity_then_in_priority_order():
    ctl = play([
        (0.0, "call a 3000",              "a:gpu0"),
        (0.0, "call b 3000",              "b:gpu0"),
        (0.0, "call c 3000 prio=0",       "c:queued"),
        (0.0, "call d 3000 prio=5",       "d:queued"),
        (0.0, "call e 3000 prio=5",       "e:queued"),
        (0.0, "call f 3000 prio=9",       "f:queued"),
        (1.0, "release a",                "a:released f:gpu0"),
        (2.0, "release b",                "b:released d:gpu0"),
        (3.0, "release f",                "f:released e:gpu0"),
        (4.0, "release d",                "d:released c:gpu0"),
        (5.0, "release e",                "e:released"),
        (6.0, "release c",                "c:released"),
    ])
    assert ctl.reserved() == {} and ctl.admitted == 6 and ctl.released == 6


def test_fifo_within_a_priority_and_no_overtaking_on_a_device():
    play([
        (0.0, "call a 6000",              "a:gpu0"),
        (0.1, "call big 5000",            "big:queued"),
        # 2000 MiB is free, but the small call would overtake the big one waiting for device 0.
        (0.2, "call small 1000",          "small:queued"),
        (0.3, "call small2 1000",         "small2:queued"),
        (1.0, "release a",                "a:released big:gpu0 small:gpu0 small2:gpu0"),
    ])


def test_a_waiter_for_one_device_does_not_block_calls_for_another():
    play([
        (0.0, "call a 8000 dev=0",        "a:gpu0"),
        (0.1, "call b 4000 dev=0",        "b:queued"),
        (0.2, "call c 4000",              "c:gpu1"),       # any device: device 1 is free of waiters
        (0.3, "call d 4000 dev=1",        "d:gpu1"),
        (0.4, "call e 1000 dev=1",        "e:queued"),
        (1.0, "release c",                "c:released e:gpu1"),
        (2.0, "release a",                "a:released b:gpu0"),
    ], devices={0: 8000, 1: 8000})


def test_a_call_for_any_device_blocks_all_devices_while_it_waits():
    play([
        (0.0, "call a 6000 dev=0",        "a:gpu0"),
        (0.0, "call b 6000 dev=1",        "b:gpu1"),
        (0.1, "call any 4000",            "any:queued"),
        (0.2, "call small 1000 dev=1",    "small:queued"),
        (1.0, "release b",                "b:released any:gpu1 small:gpu1"),
    ], devices={0: 8000, 1: 8000})


def test_best_fit_picks_the_device_left_with_the_least_room():
    play([
        (0.0, "call a 5000 dev=1",        "a:gpu1"),       # device 1: 3000 left; device 0: 8000
        (0.1, "call b 2000",              "b:gpu1"),       # fits both; leaves 1000 on 1 vs 6000 on 0
        (0.2, "call c 2000",              "c:gpu0"),
        (0.3, "call d 7000",              "d:queued"),     # 6000 left on 0, 1000 on 1
    ], devices={0: 8000, 1: 8000})


def test_visibility_rule_reservations_count_until_a_reading_sampled_after_settle_shows_them():
    play([
        (0.0, "reading 0 free=8000",      ""),
        (0.1, "call a 3000",              "a:gpu0"),       # admitted after the reading: not visible
        (0.2, "call b 6000",              "b:queued"),     # 8000 - 3000 = 5000 < 6000
        # The upstream has allocated, but this sample began 0.4 s after admission (< settle 1 s):
        # a is counted twice (5000 - 3000 = 2000), erring towards waiting.
        (0.5, "reading 0 free=5000",      ""),
        (1.2, "reading 0 free=5000",      ""),             # visible now: 5000 free for real
        (1.3, "call c 5000",              "c:queued"),     # b waits ahead of it on device 0
        (1.4, "release a",                "a:released"),   # still measured as used until the next reading
        (1.5, "reading 0 free=8000",      "b:gpu0"),       # freed; a new reading wakes the waiters
        (1.6, "reading 0 free=8000",      ""),             # b not visible yet: 8000 - 6000 = 2000 < 5000
        (2.6, "reading 0 free=2000",      ""),
        (2.7, "release b",                "b:released"),
        (2.8, "reading 0 free=8000",      "c:gpu0"),
    ], measured=True, settle_s=1.0)


def test_a_reservation_sampled_after_with_no_settle_is_visible_at_once():
    play([
        (0.1, "call a 3000",              "a:gpu0"),
        (0.1, "reading 0 free=5000",      ""),             # sampled at the admission instant: visible
        (0.2, "call b 5000",              "b:gpu0"),
    ], measured=True, settle_s=0.0)


def test_measured_free_memory_counts_other_processes():
    play([
        (0.0, "reading 0 free=2000",      ""),             # someone else holds 6000 MiB
        (0.1, "call a 3000",              "a:queued"),
        (0.5, "reading 0 free=7000",      "a:gpu0"),
    ], measured=True)


def test_utilisation_ceiling():
    play([
        (0.0, "reading 0 free=8000 util=97", ""),
        (0.1, "call a 1000",                 "a:queued"),
        (0.3, "reading 0 free=8000 util=95", "a:gpu0"),    # at the ceiling is allowed
        (0.5, "reading 0 free=8000 util=none", ""),
        (0.6, "call b 1000",                 "b:gpu0"),    # unknown utilisation: memory alone decides
    ], measured=True, ceiling_util_percent=95)


def test_deadline_sheds_with_retry_after_from_the_queue_bound_when_nothing_completed():
    play([
        (0.0, "call a 8000",              "a:gpu0"),
        (0.0, "call b 1000",              "b:queued"),
        (0.0, "call c 1000 deadline=1.0", "c:queued"),     # the call's own deadline is earlier
        (0.9, "expire",                   ""),
        (1.0, "expire",                   "c:shed:deadline/2"),
        (2.0, "expire",                   "b:shed:deadline/2"),
        (2.0, "release a",                "a:released"),
    ], queue_wait_s=2.0)


def test_retry_after_is_estimated_from_recent_completion_rates():
    ctl = play([
        (0.0, "call a 2000",              "a:gpu0"),
        (0.0, "call b 2000",              "b:gpu0"),
        (0.0, "call c 2000",              "c:gpu0"),
        (0.0, "call d 2000",              "d:gpu0"),
        (0.0, "call w1 8000 prio=1",      "w1:queued"),
        (0.0, "call w2 8000",             "w2:queued"),
        (1.0, "release a",                "a:released"),
        (2.0, "release b",                "b:released"),
        # 2 completions in the 2 s since the first: 1 per s. w3 would come after
        # w1 and w2: (2 + 1) / 1 = 3 s.
        (3.0, "call w3 8000",             "w3:shed:queue_full/3"),
        (3.0, "call w4 8000 prio=1",      "w2:shed:queue_full/3 w4:queued"),
    ], queue_max=2, queue_wait_s=30.0, retry_after_max_s=60.0)
    assert ctl.retry_after(1, 3.0) == pytest.approx(3.0)     # w1, w4 ahead
    assert ctl.retry_after(2, 3.5) == pytest.approx(1.25)    # only itself: 1 / (2 / 2.5)
    assert ctl.retry_after(2, 13.0) == pytest.approx(6.0)    # the rate decays when nothing completes
    assert ctl.retry_after(0, 1000.0) == 60.0                # clamped


def test_queue_full_sheds_the_lowest_priority_newest_waiter():
    play([
        (0.0, "call a 8000",              "a:gpu0"),
        (0.1, "call b 1000",              "b:queued"),
        (0.2, "call c 1000",              "c:queued"),
        (0.3, "call d 1000",              "d:shed:queue_full/5"),    # same priority: the newcomer goes
        (0.4, "call e 1000 prio=3",       "c:shed:queue_full/5 e:queued"),  # a higher one evicts the newest lowest
        (0.5, "call f 1000 prio=3",       "b:shed:queue_full/5 f:queued"),
        (0.6, "call g 1000 prio=3",       "g:shed:queue_full/5"),
        (1.0, "release a",                "a:released e:gpu0 f:gpu0"),
    ], queue_max=2, queue_wait_s=5.0)


def test_no_queue_sheds_what_does_not_fit_now():
    play([
        (0.0, "call a 8000",              "a:gpu0"),
        (0.1, "call b 1000",              "b:shed:queue_full/1"),
    ], queue_max=0, queue_wait_s=1.0)


def test_per_agent_concurrency_cap_holds_without_blocking_other_agents():
    play([
        (0.0, "call a1 1000 agent=a",     "a1:gpu0"),
        (0.0, "call a2 1000 agent=a",     "a2:gpu0"),
        (0.0, "call a3 1000 agent=a",     "a3:queued"),
        (0.1, "call b1 1000 agent=b",     "b1:gpu0"),     # a3 waits on its agent, not on memory
        (0.2, "release b1",               "b1:released"),
        (0.3, "release a1",               "a1:released a3:gpu0"),
    ], max_concurrent_per_agent=2)


def test_per_agent_queue_cap_keeps_one_agent_from_filling_the_queue():
    play([
        (0.0, "call x 8000 agent=z",      "x:gpu0"),
        (0.1, "call a1 1000 agent=a",     "a1:queued"),
        (0.1, "call a2 1000 agent=a",     "a2:queued"),
        (0.1, "call a3 1000 agent=a",     "a3:shed:agent_queue_full/3"),
        (0.2, "call b1 1000 agent=b",     "b1:queued"),
        (0.3, "withdraw a1",              "a1:withdrawn"),  # the client went: the cap frees up
        (0.4, "call a4 1000 agent=a",     "a4:queued"),
    ], max_queued_per_agent=2, queue_wait_s=3.0)


def test_reserved_headroom_is_only_for_high_priorities():
    play([
        (0.0, "call a 5000",              "a:gpu0"),
        (0.1, "call low 2000 prio=9",     "low:queued"),   # 3000 free, 2000 of it is headroom
        (0.2, "call high 2000 prio=10",   "high:gpu0"),
        (0.3, "release a",                "a:released low:gpu0"),
        (0.4, "call huge 7000",           "huge:shed:too_large/-"),   # 7000 + 2000 headroom > 8000
        (0.5, "call huge2 7000 prio=10",  "huge2:queued"),
    ], headroom_mb=2000, headroom_min_priority=10)


def test_impossible_demands_are_shed_at_once_without_retry_after():
    ctl = play([
        (0.0, "call big 9000",            "big:shed:too_large/-"),
        (0.0, "call nodev 10 dev=3",      "nodev:shed:no_device/-"),
        (0.0, "call ok 8000 dev=0",       "ok:gpu0"),
    ])
    assert ctl.check_demand(9000) and "can never be admitted" in ctl.check_demand(9000)
    assert "devices: 0" in ctl.check_demand(10, device=3)
    assert ctl.check_demand(8000, device=0) is None
    empty = AdmissionController(StaticView([]), AdmissionConfig())
    w = empty.submit(10)
    assert isinstance(w.outcome, Shed) and w.outcome.reason == "no_device"
    assert "no GPU available" in w.outcome.message


def test_withdrawing_a_waiter_unblocks_those_behind_it():
    play([
        (0.0, "call a 6000",              "a:gpu0"),
        (0.1, "call big 4000",            "big:queued"),
        (0.2, "call small 1000",          "small:queued"),
        (0.3, "withdraw big",             "big:withdrawn small:gpu0"),
        (0.4, "release a",                "a:released"),
    ])


def test_release_is_idempotent_and_context_managers_release_on_error():
    ctl = AdmissionController(StaticView([{"memory_mb": 1000}]), AdmissionConfig())
    t = ctl.submit(1000).outcome
    t.release()
    t.release()
    assert ctl.released == 1 and ctl.reserved() == {}
    with pytest.raises(RuntimeError):
        with ctl.submit(1000).outcome:
            raise RuntimeError("upstream failed")
    assert ctl.reserved() == {} and ctl.released == 2


def test_state_for_policy_and_admin_is_kept_current():
    clock = FakeClock()
    view = ScriptedView(clock, {0: 8000})
    ctl = AdmissionController(view, AdmissionConfig(settle_s=1.0), clock)
    assert ctl.policy_state()["devices"][0]["available_mb"] == 8000
    clock.t = 0.1
    t = ctl.submit(3000, agent="a").outcome
    ctl.submit(6000, priority=2)
    state = ctl.policy_state()
    assert state == {"source": "scripted", "queued": 1, "in_flight": 1,
                     "devices": [{"index": 0, "available_mb": 5000, "total_mb": 8000, "util_percent": 0.0}]}
    assert ctl.policy_state() is state          # cached until something changes
    snap = ctl.snapshot()
    assert snap["devices"][0]["reserved_mb"] == 3000 and snap["devices"][0]["not_yet_visible_mb"] == 3000
    assert snap["queue"]["by_priority"] == {"2": 1} and snap["agents"]["active"] == {"a": 1}
    t.release()
    assert ctl.policy_state()["in_flight"] == 1  # the waiter took its place
    assert ctl.policy_state()["queued"] == 0


def test_collector_exposes_devices_queue_and_counts():
    from prometheus_client import CollectorRegistry, generate_latest

    clock = FakeClock()
    ctl = AdmissionController(ScriptedView(clock, {0: 8000}), AdmissionConfig(queue_max=1), clock)
    ctl.submit(6000)
    ctl.submit(4000, priority=3)
    ctl.submit(4000, priority=1)
    registry = CollectorRegistry()
    registry.register(GpuCollector(ctl))
    text = generate_latest(registry).decode()
    assert 'regate_gpu_memory_free_bytes{device="0",name="gpu0"} 8.388608e+09' in text  # 8000 MiB
    assert 'regate_gpu_reserved_bytes{device="0"} 6.291456e+09' in text  # 6000 MiB
    assert 'regate_gpu_queue_depth{priority="3"} 1.0' in text
    assert 'regate_gpu_shed_total{reason="queue_full"} 1.0' in text
    assert 'regate_gpu_admitted_total{waited="no"} 1.0' in text
    assert 'regate_gpu_wait_seconds_count{outcome="admitted"} 1.0' in text


def test_config_from_the_gpu_section():
    cfg = AdmissionConfig.from_section({
        "ceiling_util_percent": 80, "settle_ms": 500,
        "queue": {"max": 8, "wait_ms": 2500},
        "per_agent": {"max_concurrent": 2, "max_queued": 3},
        "headroom": {"memory_mb": 1024, "min_priority": 7},
    })
    assert cfg == AdmissionConfig(ceiling_util_percent=80.0, queue_max=8, queue_wait_s=2.5, settle_s=0.5,
                                  max_concurrent_per_agent=2, max_queued_per_agent=3,
                                  headroom_mb=1024, headroom_min_priority=7)
    assert AdmissionConfig.from_section(None) == AdmissionConfig()
    with pytest.raises(ValueError, match="ceiling_util_percent"):
        AdmissionConfig(ceiling_util_percent=120)


def test_scripted_view_implements_the_interface():
    assert isinstance(ScriptedView(FakeClock(), {0: 1}), GpuView)
    assert isinstance(StaticView([]), GpuView)


# -- concurrency, on a real event loop ---------------------------------------


async def test_burst_of_async_calls_runs_within_capacity_in_priority_order():
    ctl = AdmissionController(StaticView([{"memory_mb": 4000}]), AdmissionConfig(queue_max=100, queue_wait_s=5))
    started: list[int] = []
    held = 0
    peak = 0
    go = asyncio.Event()

    async def call(i: int, priority: int) -> None:
        nonlocal held, peak
        outcome = await ctl.acquire(1000, priority=priority)
        assert isinstance(outcome, Ticket)
        async with outcome:
            started.append(i)
            held += 1
            peak = max(peak, held)
            await go.wait()
            await asyncio.sleep(0)
            held -= 1

    priorities = [0, 0, 0, 0, 1, 5, 1, 5, 0, 9]
    tasks = []
    for i, p in enumerate(priorities):
        tasks.append(asyncio.create_task(call(i, p)))
        await asyncio.sleep(0)  # arrive in order
    await asyncio.sleep(0)
    assert ctl.queue_depths() == {0: 1, 1: 2, 5: 2, 9: 1}
    go.set()
    await asyncio.gather(*tasks)
    assert peak == 4
    # The first four fit at once; the rest by priority (higher first), FIFO within one.
    assert started == [0, 1, 2, 3, 9, 5, 7, 4, 6, 8]
    assert ctl.reserved() == {}


async def test_a_disconnecting_waiter_leaves_the_queue_at_once():
    ctl = AdmissionController(StaticView([{"memory_mb": 1000}]), AdmissionConfig(queue_wait_s=5))
    first = await ctl.acquire(1000)
    big = asyncio.create_task(ctl.acquire(1000, priority=5))
    small = asyncio.create_task(ctl.acquire(1000))
    await asyncio.sleep(0)
    assert ctl.queue_depths() == {5: 1, 0: 1}
    big.cancel()  # aiohttp cancels the handler task when the client goes
    with pytest.raises(asyncio.CancelledError):
        await big
    assert ctl.queue_depths() == {0: 1}
    first.release()
    assert isinstance(await small, Ticket)
    (await small).release()
    assert ctl.reserved() == {} and ctl.queue_depths() == {}


async def test_admission_racing_a_disconnect_leaks_nothing():
    ctl = AdmissionController(StaticView([{"memory_mb": 1000}]), AdmissionConfig(queue_wait_s=5))
    first = await ctl.acquire(1000)
    waiter = asyncio.create_task(ctl.acquire(1000))
    await asyncio.sleep(0)
    first.release()          # admits the waiter: its future is resolved ...
    waiter.cancel()          # ... but the client is gone before the task resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ctl.reserved() == {} and ctl.released == 2

    # And the other order: cancelled first, then a release that would have admitted it.
    first = await ctl.acquire(1000)
    waiter = asyncio.create_task(ctl.acquire(1000))
    await asyncio.sleep(0)
    waiter.cancel()
    first.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ctl.reserved() == {} and ctl.queue_depths() == {}


async def test_async_deadline_sheds_with_retry_after():
    ctl = AdmissionController(StaticView([{"memory_mb": 1000}]), AdmissionConfig(queue_wait_s=0.05))
    held = await ctl.acquire(1000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    outcome = await ctl.acquire(500)
    assert isinstance(outcome, Shed) and outcome.reason == "deadline"
    assert 0.04 <= loop.time() - t0 < 1.0
    assert outcome.retry_after == 1.0  # no completions yet: the wait bound, clamped to the minimum
    assert "did not fit" in outcome.message
    held.release()


async def test_ten_thousand_mixed_calls_leak_no_reservation():
    capacity = 16_000
    ctl = AdmissionController(
        StaticView([{"memory_mb": capacity // 2}, {"memory_mb": capacity // 2}]),
        AdmissionConfig(queue_max=200, queue_wait_s=0.5, max_concurrent_per_agent=20, max_queued_per_agent=60),
    )
    rng = random.Random(8)
    peak = {0: 0, 1: 0}
    counts = {"ok": 0, "error": 0, "shed": 0, "cancel_waiting": 0, "cancel_holding": 0}

    async def call(kind: str, mb: int, device, priority: int, agent: str) -> None:
        outcome = await ctl.acquire(mb, device=device, priority=priority, agent=agent)
        if isinstance(outcome, Shed):
            counts["shed"] += 1
            return
        counts["ok"] += kind == "ok"
        try:
            for d, (_, reserved_mb) in ctl.reserved().items():
                peak[d] = max(peak[d], reserved_mb)
            await asyncio.sleep(0)
            if kind == "error":
                raise ConnectionResetError("upstream went away")
            if kind == "cancel_holding":
                await asyncio.sleep(10)  # cancelled from outside, mid-response
        finally:
            outcome.release()

    tasks = []
    for i in range(10_000):
        kind = rng.choice(["ok", "ok", "ok", "error", "cancel_waiting", "cancel_holding"])
        task = asyncio.create_task(call(kind, rng.choice([500, 1000, 2000, 4000]), rng.choice([None, None, 0, 1]),
                                        rng.randint(0, 3), f"agent{rng.randint(0, 9)}"))
        tasks.append((kind, task))
        if kind.startswith("cancel"):
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.002), task.cancel)
        if i % 10 == 0:
            await asyncio.sleep(0)
    for kind, task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            counts[kind] += 1
        except ConnectionResetError:
            counts["error"] += 1
    assert ctl.reserved() == {}
    assert ctl.queue_depths() == {}
    assert ctl._agent_active == {} and ctl._agent_queued == {}
    assert ctl.admitted == ctl.released
    assert max(peak.values()) <= capacity // 2
    # A real mix: admitted, shed, failed and cancelled both while waiting and while holding.
    assert ctl.admitted > 3000 and counts["shed"] > 1000 and counts["error"] > 500
    assert counts["cancel_waiting"] > 200 and counts["cancel_holding"] > 500


async def test_close_sheds_every_waiter_and_leaves_tickets_valid():
    ctl = AdmissionController(StaticView([{"memory_mb": 1000}]), AdmissionConfig(queue_wait_s=5))
    held = await ctl.acquire(1000)
    waiting = asyncio.create_task(ctl.acquire(1000))
    await asyncio.sleep(0)
    ctl.close()
    outcome = await waiting
    assert isinstance(outcome, Shed) and outcome.reason == "shutdown"
    held.release()
    assert ctl.reserved() == {} and ctl.shed["shutdown"] == 1
