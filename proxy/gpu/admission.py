"""GPU admission: which GPU-bound calls run now, which wait, and which are shed.

A call declares its demand (MiB, optionally a device, a priority, its agent).
It is admitted onto a device when

    reading.free_mb − (reservations on that device not yet visible in the reading)
        ≥ demand (+ the reserved headroom, for a priority below headroom_min_priority)

and the device's utilisation is at most the ceiling. Admission creates a
``Ticket``: the reservation, held until the call ends; ``release()`` is
idempotent, so every way out of a call (response done, upstream error, client
disconnect) may call it.

Visibility rule. A reading sampled at ``s`` already shows a reservation admitted
at ``a`` only if ``s ≥ a + settle_s``: the call had ``settle_s`` to reach the
upstream and allocate before the sample began. Until then its memory is
subtracted from the reading's free memory; afterwards the reading speaks for it.
During the settle window a call's memory may be counted twice (once measured,
once reserved): that errs towards waiting, never towards OOM. A declared
(static) reading has no sample time and never shows anything, so there every
reservation counts against the declared capacity. A released reservation stops
counting at once; the memory it freed shows in the next reading. A call whose
upstream allocates later than ``settle_s`` after admission (or grows slowly) can
be over-admitted: raise ``settle_s`` for such tools.

Queueing. A call that cannot be placed waits, ordered by priority (higher
first), FIFO within a priority, until its deadline (``queue_wait_s``, or the
call's own earlier deadline). No overtaking on a device: a waiter that does not
fit blocks the devices it may use (its device, or all of them for "any") for
every waiter behind it, so a large call is not starved by a stream of small
ones; waiters for other devices still pass. A waiter held back only by its
agent's concurrency cap blocks nothing. Waiters are re-examined when a
reservation is released, when a new reading arrives, and when a call arrives.
A full queue sheds its lowest-priority, newest waiter (which may be the call
that just arrived). Best fit among the devices a call may use: the one left
with the least free memory after placing it, so large holes stay for large calls.

Retry-After. Completions per second over the last 32 releases (the window
ends now, so the rate decays when nothing completes) give the time until the
shed call's turn would come: (waiters of its priority or higher + 1) / rate,
clamped to [retry_after_min_s, retry_after_max_s]. With no completion history
yet, the queue wait bound.

Time is the injected ``clock`` (seconds, monotonic). Not thread-safe: one
controller lives on one event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import insort
from collections import deque
from dataclasses import dataclass
from itertools import count
from typing import Any, Callable, Mapping, Sequence

from .view import DeviceReading, GpuView

Clock = Callable[[], float]

# Shed reasons (the label of the shed counter).
QUEUE_FULL = "queue_full"
DEADLINE = "deadline"
AGENT_QUEUE_FULL = "agent_queue_full"
TOO_LARGE = "too_large"
NO_DEVICE = "no_device"
SHUTDOWN = "shutdown"
SHED_REASONS = (QUEUE_FULL, DEADLINE, AGENT_QUEUE_FULL, TOO_LARGE, NO_DEVICE, SHUTDOWN)

# Buckets of the admission wait histogram, seconds.
WAIT_BUCKETS = (0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_COMPLETIONS_KEPT = 32


def _get(section: Any, name: str, default: Any = None) -> Any:
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(name, default)
    return getattr(section, name, default)


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    ceiling_util_percent: float = 95.0
    # Waiting calls, all agents together; 0: never wait, shed what does not fit now.
    queue_max: int = 64
    queue_wait_s: float = 10.0
    settle_s: float = 1.0
    # 0: no cap.
    max_concurrent_per_agent: int = 0
    max_queued_per_agent: int = 0
    # MiB on every device that only calls of priority >= headroom_min_priority may use.
    headroom_mb: int = 0
    headroom_min_priority: int = 10
    retry_after_min_s: float = 1.0
    retry_after_max_s: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.ceiling_util_percent <= 100:
            problems.append(f"ceiling_util_percent must be between 0 and 100 (got {self.ceiling_util_percent})")
        for name in ("queue_max", "max_concurrent_per_agent", "max_queued_per_agent", "headroom_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be a whole number >= 0 (got {v!r})")
        if not self.queue_wait_s > 0:
            problems.append(f"queue_wait_s must be > 0 (got {self.queue_wait_s})")
        if not self.settle_s >= 0:
            problems.append(f"settle_s must be >= 0 (got {self.settle_s})")
        if not 0 < self.retry_after_min_s <= self.retry_after_max_s:
            problems.append("retry_after_min_s must be > 0 and <= retry_after_max_s")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_section(cls, gpu: Any) -> "AdmissionConfig":
        """From the ``gpu:`` section of regate.yaml (a pydantic model or a mapping)."""
        queue, per_agent, headroom = _get(gpu, "queue"), _get(gpu, "per_agent"), _get(gpu, "headroom")
        d = cls()
        return cls(
            ceiling_util_percent=float(_get(gpu, "ceiling_util_percent", d.ceiling_util_percent)),
            queue_max=int(_get(queue, "max", d.queue_max)),
            queue_wait_s=_get(queue, "wait_ms", d.queue_wait_s * 1000) / 1000,
            settle_s=_get(gpu, "settle_ms", d.settle_s * 1000) / 1000,
            max_concurrent_per_agent=int(_get(per_agent, "max_concurrent", 0)),
            max_queued_per_agent=int(_get(per_agent, "max_queued", 0)),
            headroom_mb=int(_get(headroom, "memory_mb", 0)),
            headroom_min_priority=int(_get(headroom, "min_priority", d.headroom_min_priority)),
        )


class Shed:
    """A call refused: ``reason`` (one of SHED_REASONS), a message for the agent, and
    ``retry_after`` in seconds (None when retrying cannot help)."""

    __slots__ = ("reason", "message", "retry_after")

    def __init__(self, reason: str, message: str, retry_after: float | None) -> None:
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"Shed({self.reason!r}, retry_after={self.retry_after!r})"


class Ticket:
    """An admitted call's reservation. ``release()`` ends it; calling it again does nothing.
    Also a context manager (sync and async) that releases on exit, whatever happened."""

    __slots__ = ("controller", "device", "memory_mb", "agent", "priority", "admitted_at", "waited_s", "released")

    def __init__(self, controller: "AdmissionController", device: int, memory_mb: int,
                 agent: str | None, priority: int, admitted_at: float, waited_s: float) -> None:
        self.controller = controller
        self.device = device
        self.memory_mb = memory_mb
        self.agent = agent
        self.priority = priority
        self.admitted_at = admitted_at
        self.waited_s = waited_s
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.controller._release(self)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    async def __aenter__(self) -> "Ticket":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"Ticket(device={self.device}, memory_mb={self.memory_mb}, priority={self.priority}, {state})"


class Waiter:
    """One call's request for admission. ``outcome`` is None while it waits, then a
    Ticket or a Shed. The sync API (``submit``) hands this back as is."""

    __slots__ = ("seq", "memory_mb", "device", "priority", "agent", "enqueued_at", "deadline",
                 "outcome", "future", "timer", "queued")

    def __init__(self, seq: int, memory_mb: int, device: int | None, priority: int,
                 agent: str | None, now: float, deadline: float) -> None:
        self.seq = seq
        self.memory_mb = memory_mb
        self.device = device
        self.priority = priority
        self.agent = agent
        self.enqueued_at = now
        self.deadline = deadline
        self.outcome: Ticket | Shed | None = None
        self.future: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.queued = False

    @property
    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)

    def __repr__(self) -> str:
        return f"Waiter(#{self.seq}, {self.memory_mb} MiB, device={self.device}, priority={self.priority}, {self.outcome!r})"


class AdmissionController:
    def __init__(self, view: GpuView, config: AdmissionConfig | None = None, clock: Clock = time.monotonic) -> None:
        self.view = view
        self.config = config or AdmissionConfig()
        self._clock = clock
        self._seq = count(1)
        # Waiting calls, sorted by (-priority, arrival).
        self._queue: list[Waiter] = []
        self._tickets: dict[int, set[Ticket]] = {}
        self._reserved_mb: dict[int, int] = {}
        self._agent_active: dict[str, int] = {}
        self._agent_queued: dict[str, int] = {}
        self._completions: deque[float] = deque(maxlen=_COMPLETIONS_KEPT)
        self._state_cache: dict[str, Any] | None = None
        # Counters, read by the collector and /admin/gpu.
        self.admitted = 0
        self.admitted_after_wait = 0
        self.released = 0
        self.shed: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)
        self.wait_admitted = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_shed = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_admitted_sum = 0.0
        self.wait_shed_sum = 0.0
        view.add_listener(self._on_reading)

    # -- the async API (the pipeline stage) ---------------------------------

    async def acquire(self, memory_mb: int, *, device: int | None = None, priority: int = 0,
                      agent: str | None = None, deadline: float | None = None) -> Ticket | Shed:
        """Wait for admission; a Ticket to release when the call ends, or a Shed.
        ``deadline``: the call's own deadline on this controller's clock, if it has one.
        Cancelling the awaiting task (client disconnect) leaves the queue at once."""
        w = self.submit(memory_mb, device=device, priority=priority, agent=agent, deadline=deadline)
        if w.outcome is not None:
            return w.outcome
        loop = asyncio.get_running_loop()
        w.future = loop.create_future()
        w.timer = loop.call_later(max(0.0, w.deadline - self._clock()), self._on_deadline, w)
        try:
            await w.future
        except asyncio.CancelledError:
            self.withdraw(w)
            raise
        assert w.outcome is not None
        return w.outcome

    # -- the sync API (also what the tables in the tests drive) --------------

    def submit(self, memory_mb: int, *, device: int | None = None, priority: int = 0,
               agent: str | None = None, deadline: float | None = None) -> Waiter:
        """Decide now if possible; otherwise the returned Waiter is queued and its
        ``outcome`` is filled in later (by a release, a reading, or ``expire()``)."""
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 0:
            raise ValueError(f"memory_mb must be a whole number of MiB >= 0, got {memory_mb!r}")
        cfg = self.config
        now = self._clock()
        bound = now + cfg.queue_wait_s
        w = Waiter(next(self._seq), memory_mb, device, priority, agent, now,
                   bound if deadline is None else min(bound, deadline))
        readings = {r.index: r for r in self.view.devices()}
        impossible = self._impossible(w, readings)
        if impossible is not None:
            self._shed(w, impossible, None, now)
            return w
        if not self._queue and not self._agent_capped(w):
            device_index = self._place(w, self._candidates(w, readings), self._available(readings, now), readings)
            if device_index is not None:
                self._admit(w, device_index, now)
                return w
        if cfg.queue_max == 0:
            self._shed(w, QUEUE_FULL, self._message(QUEUE_FULL, w), now)
            return w
        if agent is not None and cfg.max_queued_per_agent and self._agent_queued.get(agent, 0) >= cfg.max_queued_per_agent:
            self._shed(w, AGENT_QUEUE_FULL, self._message(AGENT_QUEUE_FULL, w), now)
            return w
        if w.deadline <= now:
            self._shed(w, DEADLINE, self._message(DEADLINE, w), now)
            return w
        others_waiting = bool(self._queue)
        self._enqueue(w)
        if others_waiting:
            # A newcomer may go ahead of lower priorities, or onto a device nobody waits for.
            self._dispatch()
        if len(self._queue) > cfg.queue_max:
            # The lowest priority, newest arrival leaves: possibly the newcomer itself.
            victim = self._queue[-1]
            self._shed(victim, QUEUE_FULL, self._message(QUEUE_FULL, victim), now)
        return w

    def withdraw(self, w: Waiter) -> None:
        """The caller has gone (client disconnect): leave the queue, or give back
        the reservation if admission raced the disconnect."""
        if w.queued:
            self._dequeue(w)
            self._changed()
            # It may have blocked devices for the waiters behind it.
            self._dispatch()
        elif isinstance(w.outcome, Ticket):
            w.outcome.release()

    def expire(self) -> None:
        """Shed every waiter whose deadline has passed (the async path has timers for this)."""
        now = self._clock()
        for w in [w for w in self._queue if w.deadline <= now]:
            self._shed(w, DEADLINE, self._message(DEADLINE, w), now)
        self._dispatch()

    def close(self) -> None:
        """Shed every waiter (shutdown); tickets stay valid until released."""
        now = self._clock()
        for w in list(self._queue):
            self._shed(w, SHUTDOWN, "Regate is shutting down; retry against another replica", now)

    def check_demand(self, memory_mb: int, device: int | None = None, priority: int = 0) -> str | None:
        """Why a declared demand can never be admitted on these devices, or None (for startup checks)."""
        w = Waiter(0, memory_mb, device, priority, None, 0.0, 0.0)
        reason = self._impossible(w, {r.index: r for r in self.view.devices()})
        return None if reason is None else self._message(reason, w)

    # -- the state, as JSON ---------------------------------------------------

    def policy_state(self) -> dict[str, Any]:
        """``state.gpu`` of the policy input; cached until something changes."""
        state = self._state_cache
        if state is None:
            now = self._clock()
            readings = self.view.devices()
            available = self._available({r.index: r for r in readings}, now)
            state = self._state_cache = {
                "source": self.view.source,
                "queued": len(self._queue),
                "in_flight": sum(len(t) for t in self._tickets.values()),
                "devices": [
                    {"index": r.index, "available_mb": available[r.index], "total_mb": r.total_mb,
                     "util_percent": r.util_percent}
                    for r in readings
                ],
            }
        return state

    def snapshot(self) -> dict[str, Any]:
        """Everything, for GET /admin/gpu."""
        now = self._clock()
        readings = self.view.devices()
        available = self._available({r.index: r for r in readings}, now)
        devices = []
        for r in readings:
            d = r.as_dict()
            tickets = self._tickets.get(r.index, ())
            d.update(
                age_s=None if r.sampled_at is None else round(now - r.sampled_at, 3),
                reserved_mb=self._reserved_mb.get(r.index, 0),
                reservations=len(tickets),
                not_yet_visible_mb=sum(t.memory_mb for t in tickets if not self._visible(t, r)),
                available_mb=available[r.index],
            )
            devices.append(d)
        by_priority: dict[str, int] = {}
        for w in self._queue:
            by_priority[str(w.priority)] = by_priority.get(str(w.priority), 0) + 1
        rate = self.completion_rate(now)
        return {
            "view": self.view.describe(),
            "devices": devices,
            "queue": {"depth": len(self._queue), "by_priority": by_priority,
                      "max": self.config.queue_max, "wait_ms": self.config.queue_wait_s * 1000},
            "in_flight": sum(len(t) for t in self._tickets.values()),
            "agents": {"active": dict(self._agent_active), "queued": dict(self._agent_queued)},
            "admitted": self.admitted,
            "admitted_after_wait": self.admitted_after_wait,
            "released": self.released,
            "shed": dict(self.shed),
            "completions_per_s": None if rate is None else round(rate, 3),
            "config": {
                "ceiling_util_percent": self.config.ceiling_util_percent,
                "settle_ms": self.config.settle_s * 1000,
                "headroom_mb": self.config.headroom_mb,
                "headroom_min_priority": self.config.headroom_min_priority,
                "max_concurrent_per_agent": self.config.max_concurrent_per_agent,
                "max_queued_per_agent": self.config.max_queued_per_agent,
            },
        }

    def queue_depths(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in self._queue:
            out[w.priority] = out.get(w.priority, 0) + 1
        return out

    def reserved(self) -> dict[int, tuple[int, int]]:
        """device → (reservations, reserved MiB), for the collector and the tests."""
        return {d: (len(t), self._reserved_mb.get(d, 0)) for d, t in self._tickets.items()}

    def completion_rate(self, now: float | None = None) -> float | None:
        c = self._completions
        now = self._clock() if now is None else now
        if len(c) < 2 or now <= c[0]:
            return None
        return len(c) / (now - c[0])

    def retry_after(self, priority: int, now: float | None = None) -> float:
        """Seconds until a call of this priority would likely get its turn."""
        cfg = self.config
        ahead = sum(1 for w in self._queue if w.priority >= priority)
        rate = self.completion_rate(now)
        estimate = cfg.queue_wait_s if rate is None else (ahead + 1) / rate
        return min(cfg.retry_after_max_s, max(cfg.retry_after_min_s, estimate))

    # -- internals ------------------------------------------------------------

    def _visible(self, t: Ticket, r: DeviceReading) -> bool:
        return r.sampled_at is not None and r.sampled_at >= t.admitted_at + self.config.settle_s

    def _available(self, readings: Mapping[int, DeviceReading], now: float) -> dict[int, int]:
        """device → MiB free for admission: the reading's free memory less the
        reservations it cannot show yet."""
        out = {}
        for index, r in readings.items():
            pending = 0
            for t in self._tickets.get(index, ()):
                if not self._visible(t, r):
                    pending += t.memory_mb
            out[index] = r.free_mb - pending
        return out

    def _need(self, w: Waiter) -> int:
        cfg = self.config
        return w.memory_mb + (cfg.headroom_mb if w.priority < cfg.headroom_min_priority else 0)

    def _candidates(self, w: Waiter, readings: Mapping[int, DeviceReading]) -> Sequence[int]:
        return (w.device,) if w.device is not None else tuple(readings)

    def _impossible(self, w: Waiter, readings: Mapping[int, DeviceReading]) -> str | None:
        if not readings:
            return NO_DEVICE
        if w.device is not None and w.device not in readings:
            return NO_DEVICE
        need = self._need(w)
        if all(readings[i].total_mb < need for i in self._candidates(w, readings)):
            return TOO_LARGE
        return None

    def _agent_capped(self, w: Waiter) -> bool:
        cap = self.config.max_concurrent_per_agent
        return bool(cap) and w.agent is not None and self._agent_active.get(w.agent, 0) >= cap

    def _place(self, w: Waiter, candidates: Sequence[int], available: Mapping[int, int],
               readings: Mapping[int, DeviceReading]) -> int | None:
        """Best fit: the device left with the least room; ties to the less busy, then lower index."""
        ceiling = self.config.ceiling_util_percent
        need = self._need(w)
        best: tuple[int, float, int] | None = None
        for index in candidates:
            r = readings[index]
            # NOTE: a device that cannot report utilisation (util None) is admitted on
            # memory alone: the ceiling cannot be checked there, only memory can.
            if r.util_percent is not None and r.util_percent > ceiling:
                continue
            room = available[index] - need
            if room < 0:
                continue
            key = (room, r.util_percent or 0.0, index)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def _dispatch(self) -> None:
        """Admit waiters in order while they fit; shed those past their deadline."""
        if not self._queue:
            return
        now = self._clock()
        for w in [w for w in self._queue if w.deadline <= now]:
            self._shed(w, DEADLINE, self._message(DEADLINE, w), now)
        if not self._queue:
            return
        readings = {r.index: r for r in self.view.devices()}
        available = self._available(readings, now)
        blocked: set[int] = set()
        for w in list(self._queue):
            if len(blocked) >= len(readings):
                break
            if self._agent_capped(w):
                continue
            candidates = self._candidates(w, readings)
            device_index = self._place(w, [i for i in candidates if i not in blocked], available, readings)
            if device_index is None:
                blocked.update(candidates)
                continue
            if self._admit(w, device_index, now):
                available[device_index] -= w.memory_mb

    def _enqueue(self, w: Waiter) -> None:
        insort(self._queue, w, key=lambda x: x.order)
        w.queued = True
        if w.agent is not None:
            self._agent_queued[w.agent] = self._agent_queued.get(w.agent, 0) + 1
        self._changed()

    def _dequeue(self, w: Waiter) -> None:
        self._queue.remove(w)
        w.queued = False
        if w.agent is not None:
            n = self._agent_queued[w.agent] - 1
            if n:
                self._agent_queued[w.agent] = n
            else:
                del self._agent_queued[w.agent]
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None

    def _admit(self, w: Waiter, device: int, now: float) -> bool:
        if w.queued:
            self._dequeue(w)
        if w.future is not None and w.future.done():
            # Its caller was cancelled and has not withdrawn yet: it will not use the GPU.
            self._changed()
            return False
        waited = now - w.enqueued_at
        ticket = Ticket(self, device, w.memory_mb, w.agent, w.priority, now, waited)
        self._tickets.setdefault(device, set()).add(ticket)
        self._reserved_mb[device] = self._reserved_mb.get(device, 0) + w.memory_mb
        if w.agent is not None:
            self._agent_active[w.agent] = self._agent_active.get(w.agent, 0) + 1
        self.admitted += 1
        if waited > 0:
            self.admitted_after_wait += 1
        self._observe(self.wait_admitted, waited)
        self.wait_admitted_sum += waited
        w.outcome = ticket
        self._changed()
        if w.future is not None:
            w.future.set_result(None)
        return True

    def _shed(self, w: Waiter, reason: str, message: str | None, now: float) -> None:
        retry_after = None
        if reason in (QUEUE_FULL, DEADLINE, AGENT_QUEUE_FULL):
            if w.queued:
                self._dequeue(w)
            retry_after = self.retry_after(w.priority, now)
        elif w.queued:
            self._dequeue(w)
        waited = now - w.enqueued_at
        self.shed[reason] += 1
        self._observe(self.wait_shed, waited)
        self.wait_shed_sum += waited
        w.outcome = Shed(reason, message or self._message(reason, w), retry_after)
        self._changed()
        if w.future is not None and not w.future.done():
            w.future.set_result(None)

    def _release(self, t: Ticket) -> None:
        t.released = True
        now = self._clock()
        tickets = self._tickets.get(t.device)
        if tickets is not None:
            tickets.discard(t)
            if not tickets:
                del self._tickets[t.device]
        left = self._reserved_mb.get(t.device, 0) - t.memory_mb
        if left > 0:
            self._reserved_mb[t.device] = left
        else:
            self._reserved_mb.pop(t.device, None)
        if t.agent is not None:
            n = self._agent_active.get(t.agent, 0) - 1
            if n > 0:
                self._agent_active[t.agent] = n
            else:
                self._agent_active.pop(t.agent, None)
        self.released += 1
        self._completions.append(now)
        self._changed()
        self._dispatch()

    def _on_reading(self) -> None:
        self._changed()
        self._dispatch()

    def _on_deadline(self, w: Waiter) -> None:
        w.timer = None
        if not w.queued:
            return
        now = self._clock()
        if now >= w.deadline:
            self._shed(w, DEADLINE, self._message(DEADLINE, w), now)
            self._dispatch()
        else:  # the loop's timer ran ahead of the controller's clock
            w.timer = asyncio.get_running_loop().call_later(w.deadline - now, self._on_deadline, w)

    def _changed(self) -> None:
        self._state_cache = None

    @staticmethod
    def _observe(buckets: list[int], value: float) -> None:
        for i, bound in enumerate(WAIT_BUCKETS):
            if value <= bound:
                buckets[i] += 1
                return
        buckets[-1] += 1

    def _message(self, reason: str, w: Waiter) -> str:
        cfg = self.config
        where = f"GPU {w.device}" if w.device is not None else "any GPU"
        if reason == QUEUE_FULL:
            return (f"GPU saturated: {w.memory_mb} MiB does not fit on {where} now and the GPU queue is full "
                    f"({cfg.queue_max} waiting); retry after the Retry-After delay")
        if reason == DEADLINE:
            return (f"GPU saturated: {w.memory_mb} MiB did not fit on {where} within the wait bound "
                    f"({math.ceil((w.deadline - w.enqueued_at) * 1000)} ms); retry after the Retry-After delay")
        if reason == AGENT_QUEUE_FULL:
            return (f"GPU saturated: agent {w.agent} already has {cfg.max_queued_per_agent} calls waiting "
                    "for the GPU (gpu.per_agent.max_queued); wait for them before sending more")
        if reason == NO_DEVICE:
            if not self.view.devices():
                return f"no GPU available to Regate ({self.view.status}); this call needs {w.memory_mb} MiB"
            present = ", ".join(str(r.index) for r in self.view.devices())
            return f"GPU {w.device} does not exist here (devices: {present}); fix the tool's gpu.device"
        if reason == TOO_LARGE:
            largest = max((r.total_mb for r in self.view.devices()
                           if w.device is None or r.index == w.device), default=0)
            extra = ""
            if w.priority < cfg.headroom_min_priority and cfg.headroom_mb:
                extra = f" (plus {cfg.headroom_mb} MiB headroom reserved for priority >= {cfg.headroom_min_priority})"
            return (f"GPU demand of {w.memory_mb} MiB{extra} exceeds {where}'s {largest} MiB: it can never be "
                    "admitted; lower gpu.memory_mb")
        return f"GPU call shed ({reason})"
