"""The loop guard: refuse a call that already failed, the same or nearly so, again and again.

Retry amplification is an agent re-sending a failed call, each time slightly
different and still invalid. Per agent x tool the guard keeps a short history of
failures (time, method, path, body fingerprint, quotable error). A call whose
method and path match, and whose body is at least ``similarity`` alike (Jaccard
over normalised shingles, see ``fingerprint``) to ``repeats`` failures within
``window_s``, is refused with 429 ``retry_loop``, the upstream's last error
quoted, and ``Retry-After`` at the moment the oldest of those failures leaves the
window. A success of a matching call wipes the failures it matches.

The guard follows drift. An agent stuck on a failing call edits it a little each
time; compared only with the failures, its edits drift out of range after a few
steps and one more failing call reaches the tool. So a refused call is kept as an
*echo* of the failures it was refused for: a call near an echo is refused too,
until the same moment the first refusal lifts (an echo never extends it, so
``Retry-After`` stays true however hard the agent hammers). Only a call that is
different from the failures and from everything refused since gets through.
Echoes are kept apart from the failures (at most ``history`` of them, so they never
push a failure out), are not failures (``recent_failures`` does not count them), and
go when a success wipes the failures they stand on.

Only failures that say "this call is wrong" are loop material: 4xx and 5xx
answers except the statuses that invite a retry of the same call (408, 425, 429,
502, 503, 504 by default: the tool breaker and rate limits own those), never
timeouts or connect errors. Every failure still counts in ``recent_failures``,
the policy input's ``state.recent_failures``.

Cost: ``check`` is one dict lookup for an agent with no recent failures on the
tool; the body is fingerprinted only when at least ``repeats`` loop failures on the
same method and path are in the window, and on the failure path of ``record``.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Any, Callable

from .config import LoopGuardConfig
from .fingerprint import Fingerprint, fingerprint as _fingerprint_of, similarity
from .outcome import CLIENT_ERROR, SERVER_ERROR, SUCCESS, Outcome, Refusal, describe, forget, seconds

_SWEEP_EVERY_S = 1.0


class _Failure:
    """A failed call, or an echo: a refused call, standing for the failures it was
    refused for (`basis`; `echo` says how many times the call had failed), and
    expiring with them (`t` is the time its refusal is anchored to, not its own)."""

    __slots__ = ("t", "method", "path", "loops", "size", "digest", "sketch", "error", "echo", "basis")

    def __init__(self, t: float, method: str, path: str, error: str, fp: Fingerprint | None,
                 echo: int = 0, basis: tuple["_Failure", ...] = ()) -> None:
        self.t = t
        self.method = method
        self.path = path
        self.error = error
        self.echo = echo
        self.basis = basis
        self.loops = fp is not None
        if fp is not None:
            self.size = fp.size
            self.digest = fp.digest
            self.sketch: array | None = fp.packed()
        else:
            self.size = self.digest = 0
            self.sketch = None


class _History:
    __slots__ = ("failures", "echoes", "last_seen", "config", "ignore")

    def __init__(self, config: LoopGuardConfig) -> None:
        self.failures: list[_Failure] = []
        self.echoes: list[_Failure] = []
        self.last_seen = 0.0
        self.config = config
        self.ignore = frozenset(config.ignore_fields)


class LoopGuard:
    __slots__ = ("_config_for", "_pairs", "_next_sweep", "_max_entries",
                 "rejected_exact", "rejected_near", "evicted", "expired", "fingerprints")

    def __init__(self, config_for: Callable[[str], LoopGuardConfig] | LoopGuardConfig | None = None) -> None:
        if config_for is None or isinstance(config_for, LoopGuardConfig):
            fixed = config_for or LoopGuardConfig()
            config_for = lambda _tool: fixed  # noqa: E731
        self._config_for = config_for
        self._max_entries = config_for("").max_entries
        self._pairs: OrderedDict[tuple[str, str], _History] = OrderedDict()
        self._next_sweep = 0.0
        # Metrics.
        self.rejected_exact = 0   # refused: identical to the earlier failures
        self.rejected_near = 0    # refused: near-identical
        self.evicted = 0
        self.expired = 0
        self.fingerprints = 0     # bodies fingerprinted (the guard's only real cost)

    @property
    def rejected(self) -> int:
        return self.rejected_exact + self.rejected_near

    def check(self, agent: str, tool: str, method: str, path: str, body: Any, now: float,
              query: str = "") -> Refusal | None:
        return self.inspect(agent, tool, method, path, body, now, query)[0]

    def inspect(self, agent: str, tool: str, method: str, path: str, body: Any, now: float,
                query: str = "") -> tuple[Refusal | None, Fingerprint | None]:
        """``check``, also returning the body's fingerprint when it had to compute one,
        for ``record(..., fingerprint=)`` to reuse."""
        h = self._pairs.get((agent, tool))
        if h is None:
            return None, None
        cfg = h.config
        since = now - cfg.window_s
        cands = [f for f in h.failures if f.loops and f.t > since and f.path == path and f.method == method]
        echo_cands = [e for e in h.echoes if e.t > since and e.path == path and e.method == method] \
            if h.echoes else cands[:0]
        repeats = cfg.repeats
        if len(cands) < repeats and not echo_cands:
            return None, None
        fp = self._fingerprint(body, query, h)
        failed = self._alike(fp, cands, cfg.similarity)
        echoes = self._alike(fp, echo_cands, cfg.similarity) if echo_cands else echo_cands
        # The refusal lifts when only repeats-1 of the failures are left in the window
        # (they are kept in time order) and every echo it matches has lifted: the latest
        # of those moments, with the failures that set it.
        anchor = -1.0
        basis: tuple[_Failure, ...] = ()
        if len(failed) >= repeats:
            basis = tuple(failed[len(failed) - repeats:])
            anchor = basis[0].t
        for e in echoes:
            if e.t > anchor:
                anchor, basis = e.t, e.basis
        if not basis:
            return None, fp
        same = failed + echoes
        times = max(len(failed), max((e.echo for e in echoes), default=0))
        exact = all(fp.digest == f.digest and fp.size == f.size for f in same)
        if exact:
            self.rejected_exact += 1
        else:
            self.rejected_near += 1
        if not any(fp.digest == f.digest and fp.size == f.size for f in same):
            self._add_echo(h, _Failure(anchor, method, path, same[-1].error, fp, times, basis), since)
        wait = anchor + cfg.window_s - now
        alike = "identical" if exact else "near-identical"
        return Refusal(
            429, "retry_loop", "exact" if exact else "near",
            f"this call ({method} {path}) has failed {times} times in the last {cfg.window_s:g}s with "
            f"{alike} arguments (last error: {same[-1].error}); change the arguments or stop retrying. "
            f"The same call is refused for {seconds(wait)}.",
            wait,
        ), fp

    @staticmethod
    def _alike(fp: Fingerprint, failures: list[_Failure], floor: float) -> list[_Failure]:
        out = []
        n = fp.size
        for f in failures:
            # Jaccard is at most min/max of the sizes: skip the set work when that is short.
            if (f.size if f.size < n else n) < floor * (n if f.size < n else f.size):
                continue
            if similarity(fp, f.size, f.digest, f.sketch) >= floor:
                out.append(f)
        return out

    def record(self, agent: str, tool: str, method: str, path: str, body: Any, now: float,
               outcome: Outcome, status: int | None = None, error: str = "", query: str = "",
               fingerprint: Fingerprint | None = None) -> None:
        """After the upstream answered. ``fingerprint``: what ``inspect`` returned for
        this call, if anything (saves computing it again)."""
        key = (agent, tool)
        pairs = self._pairs
        h = pairs.get(key)
        if outcome == SUCCESS:
            if h is None:
                return
            mine = [f for f in h.failures if f.loops and f.path == path and f.method == method]
            if not mine:
                return
            fp = fingerprint or self._fingerprint(body, query, h)
            gone = {id(f) for f in self._alike(fp, mine, h.config.similarity)}
            if gone:
                h.failures = [f for f in h.failures if id(f) not in gone]
                if h.echoes:  # an echo goes with the failures it stands on
                    h.echoes = [e for e in h.echoes if not any(id(b) in gone for b in e.basis)]
            return
        if h is None:
            h = pairs[key] = _History(self._config_for(tool))
        else:
            pairs.move_to_end(key)
        cfg = h.config
        h.last_seen = now
        loops = (outcome == CLIENT_ERROR or outcome == SERVER_ERROR) and status not in cfg.ignore_statuses
        fp = (fingerprint or self._fingerprint(body, query, h)) if loops else None
        self._append(h, _Failure(now, method, path, describe(outcome, status, error), fp), now)
        if len(pairs) > self._max_entries or now >= self._next_sweep:
            self._sweep(now)

    @staticmethod
    def _append(h: _History, entry: _Failure, now: float) -> None:
        """Keep the failure `entry`, within the window and at most `history` failures."""
        failures = h.failures
        cfg = h.config
        since = now - cfg.window_s
        if failures and (failures[0].t <= since or len(failures) >= cfg.history):
            failures = [f for f in failures if f.t > since][-(cfg.history - 1):] if cfg.history > 1 else []
            h.failures = failures
        failures.append(entry)

    @staticmethod
    def _add_echo(h: _History, echo: _Failure, since: float) -> None:
        """Keep `echo`: live ones only, at most `history` echoes (the oldest go first)."""
        cap = h.config.history
        echoes = [e for e in h.echoes if e.t > since]
        if len(echoes) >= cap:
            echoes = echoes[len(echoes) - cap + 1:] if cap > 1 else []
        echoes.append(echo)
        h.echoes = echoes

    def recent_failures(self, agent: str, tool: str, now: float) -> int:
        """Failures of this agent on this tool within the window (any kind)."""
        h = self._pairs.get((agent, tool))
        if h is None:
            return 0
        since = now - h.config.window_s
        return sum(1 for f in h.failures if f.t > since)

    def reset(self, agent: str | None = None, tool: str | None = None) -> int:
        return forget(self._pairs, agent, tool)

    def __len__(self) -> int:
        return len(self._pairs)

    def snapshot(self, now: float) -> list[dict]:
        out = []
        for (agent, tool), h in self._pairs.items():
            since = now - h.config.window_s
            live = [f for f in h.failures if f.t > since]
            if live:
                out.append({"agent": agent, "tool": tool, "recent_failures": len(live),
                            "last_error": live[-1].error,
                            "calls": sorted({f"{f.method} {f.path}" for f in live})})
        return out

    def _fingerprint(self, body: Any, query: str, h: _History) -> Fingerprint:
        self.fingerprints += 1
        return _fingerprint_of(body, query, h.ignore)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_EVERY_S
        pairs = self._pairs
        while pairs:
            key, h = next(iter(pairs.items()))
            if now - h.last_seen >= h.config.window_s:
                del pairs[key]  # every failure it holds is out of the window
                self.expired += 1
            else:
                break
        while len(pairs) > self._max_entries:
            # NOTE: fails open: the least recently failing pair's history is forgotten,
            # so a flood of agent ids cannot take memory.
            pairs.popitem(last=False)
            self.evicted += 1
