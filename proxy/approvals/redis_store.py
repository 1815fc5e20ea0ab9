"""Approvals shared by every replica through Redis, with pub/sub to release a
call held on one replica when a human decides on another.

Layout (one hash tag, so every key sits in one Redis Cluster slot):
  {regate:apr}:<id>       HASH, the record; expires after timeout + use window + retention
  {regate:apr}:pending    ZSET id → expiry, the ones still waiting (and the cap on them)
  {regate:apr}:index      ZSET id → created, every record still kept, for listing
  {regate:apr}:events     channel: "<id> <state>" on every change

Every state change is one Lua script (the same rules as store.settle_record
and store.claim_record), so two replicas racing to decide, expire or use one
approval cannot both win. Pub/sub messages can be lost while a replica
reconnects; a held call therefore also re-reads its record now and then, and
the inbox refetches its list on reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .approval import FLOAT_FIELDS, INT_FIELDS, JSON_FIELDS
from .store import ApprovalEvents, ApprovalStoreError, ApprovalStoreFull, Binding

log = logging.getLogger("regate.approvals")

STORE_ERRORS = (RedisError, OSError, TimeoutError, EOFError)
PREFIX = "{regate:apr}"
PENDING = PREFIX + ":pending"
INDEX = PREFIX + ":index"
CHANNEL = PREFIX + ":events"

# KEYS: record, pending, index. ARGV: id, now, max_pending, keep_ms,
# index_cutoff, expires, created, channel, then the record's field/value pairs.
CREATE_LUA = """
if redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[2], '+inf') >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[5])
redis.call('PUBLISH', ARGV[8], ARGV[1] .. ' pending')
return 1
"""

# KEYS: record, pending. ARGV: id, to, now, approver, comment, channel.
SETTLE_LUA = """
local f = redis.call('HMGET', KEYS[1], 'state', 'expires')
if not f[1] then return {'missing', ''} end
if f[1] ~= 'pending' then return {'conflict', f[1]} end
local to = ARGV[2]
local outcome = 'ok'
if (to == 'approved' or to == 'denied') and tonumber(ARGV[3]) >= tonumber(f[2]) then
  to = 'expired'
  outcome = 'expired_now'
end
if to == 'approved' or to == 'denied' then
  redis.call('HSET', KEYS[1], 'state', to, 'decided_at', ARGV[3], 'approver', ARGV[4], 'comment', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'state', to, 'decided_at', ARGV[3])
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[6], ARGV[1] .. ' ' .. to)
return {outcome, to}
"""

# KEYS: record, pending. ARGV: id, now, used_by, check (0|1), agent, tool,
# target_sha256, body_sha256, use_within_s, channel.
CLAIM_LUA = """
local f = redis.call('HMGET', KEYS[1], 'state', 'agent', 'tool', 'target_sha256', 'body_sha256',
                     'expires', 'decided_at', 'mode')
local st = f[1]
if not st then return {'missing', ''} end
local now = tonumber(ARGV[2])
local check = ARGV[4] == '1'
if check and (f[8] ~= 'async' or f[2] ~= ARGV[5]) then return {'missing', ''} end
if st == 'pending' then
  if now >= tonumber(f[6]) then
    redis.call('HSET', KEYS[1], 'state', 'expired', 'decided_at', ARGV[2])
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('PUBLISH', ARGV[10], ARGV[1] .. ' expired')
    return {'expired_now', ''}
  end
  return {'pending', ''}
end
if st ~= 'approved' then return {st, ''} end
if check then
  local bad = {}
  if f[3] ~= ARGV[6] then table.insert(bad, 'tool') end
  if f[4] ~= ARGV[7] then table.insert(bad, 'method and path') end
  if f[5] ~= ARGV[8] then table.insert(bad, 'body') end
  if #bad > 0 then return {'mismatch', table.concat(bad, ',')} end
  if now > tonumber(f[7]) + tonumber(ARGV[9]) then return {'stale', ''} end
end
redis.call('HSET', KEYS[1], 'state', 'used', 'used_by', ARGV[3], 'used_at', ARGV[2])
redis.call('PUBLISH', ARGV[10], ARGV[1] .. ' used')
return {'ok', ''}
"""


def _encode(rec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in rec.items():
        if k in JSON_FIELDS:
            v = orjson.dumps(v).decode()
        elif v is None:
            v = ""
        elif isinstance(v, float):
            v = repr(v)
        out += [k, str(v)]
    return out


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        text = v.decode("utf-8", "replace")
        if key in JSON_FIELDS:
            rec[key] = orjson.loads(v) if v else None
        elif key in FLOAT_FIELDS:
            rec[key] = float(text) if text else None
        elif key in INT_FIELDS:
            rec[key] = int(text) if text else 0
        else:
            rec[key] = text
    return rec


def _key(approval_id: str) -> str:
    return f"{PREFIX}:{approval_id}"


class RedisApprovalStore:
    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 2.0, reconnect_s: float = 0.5) -> None:
        self.url = url
        self.events = ApprovalEvents()
        self.client: Redis = Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry_on_timeout=False,
            health_check_interval=30,
        )
        self._create = self.client.register_script(CREATE_LUA)
        self._settle = self.client.register_script(SETTLE_LUA)
        self._claim = self.client.register_script(CLAIM_LUA)
        self._reconnect_s = reconnect_s
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def start(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="regate-approvals-pubsub")
        # Waiting for the subscription means a decision published from now on is
        # heard; if Redis is down, start anyway (held calls re-read their record).
        try:
            await asyncio.wait_for(self._subscribed.wait(), 2.0)
        except TimeoutError:
            log.warning("approvals: not subscribed to %s yet; retrying in the background", CHANNEL)

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass
        self.events.close_listeners()
        await self.client.aclose()

    async def _listen(self) -> None:
        while not self._closed:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                # Events may have been missed while (re)connecting: tell the
                # inbox to refetch, and waiters re-read on their own.
                self.events.publish("*", "resync")
                while not self._closed:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    approval_id, _, state = msg["data"].decode("utf-8", "replace").partition(" ")
                    self.events.publish(approval_id, state)
            except asyncio.CancelledError:
                raise
            except STORE_ERRORS as exc:
                if self._subscribed.is_set():
                    log.warning("approvals: lost the Redis subscription (%s); reconnecting", exc)
                self._subscribed.clear()
                await asyncio.sleep(self._reconnect_s)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # the connection is already gone; nothing to release
                    pass

    async def create(self, rec: dict[str, Any], now: float, max_pending: int, keep_s: float) -> None:
        args = [rec["id"], repr(now), max_pending, int(keep_s * 1000), repr(now - keep_s),
                repr(rec["expires"]), repr(rec["created"]), CHANNEL, *_encode(rec)]
        try:
            ok = await self._create(keys=[_key(rec["id"]), PENDING, INDEX], args=args)
        except STORE_ERRORS as exc:
            raise ApprovalStoreError(f"Redis: {exc}") from None
        if not ok:
            raise ApprovalStoreFull(f"{max_pending} approvals are pending")

    async def get(self, approval_id: str) -> dict[str, Any] | None:
        try:
            raw = await self.client.hgetall(_key(approval_id))
        except STORE_ERRORS as exc:
            raise ApprovalStoreError(f"Redis: {exc}") from None
        return _decode(raw) if raw else None

    async def list(self, state: str | None, now: float, limit: int) -> list[dict[str, Any]]:
        try:
            if state == "pending":
                ids = await self.client.zrange(PENDING, 0, -1)
            else:
                ids = await self.client.zrevrange(INDEX, 0, max(limit * 4, 200) - 1)
            if not ids:
                return []
            pipe = self.client.pipeline(transaction=False)
            for approval_id in ids:
                pipe.hgetall(_key(approval_id.decode()))
            raws = await pipe.execute()
            gone = [i for i, raw in zip(ids, raws, strict=True) if not raw]
            if gone:
                # Records expired by TTL leave their index entries behind.
                await self.client.zrem(PENDING, *gone)
                await self.client.zrem(INDEX, *gone)
        except STORE_ERRORS as exc:
            raise ApprovalStoreError(f"Redis: {exc}") from None
        out = [_decode(raw) for raw in raws if raw]
        if state is not None:
            out = [r for r in out if r["state"] == state]
        out.sort(key=lambda r: r["created"], reverse=True)
        return out[:limit]

    async def settle(
        self, approval_id: str, to: str, now: float, approver: str = "", comment: str = ""
    ) -> tuple[str, str | None]:
        try:
            outcome, state = await self._settle(
                keys=[_key(approval_id), PENDING], args=[approval_id, to, repr(now), approver, comment, CHANNEL])
        except STORE_ERRORS as exc:
            raise ApprovalStoreError(f"Redis: {exc}") from None
        state = state.decode()
        return outcome.decode(), state or None

    async def claim(
        self, approval_id: str, used_by: str, now: float, binding: Binding | None = None
    ) -> tuple[str, str]:
        if binding is None:
            check = ["0", "", "", "", "", "0"]
        else:
            check = ["1", binding.agent, binding.tool, binding.target_sha256, binding.body_sha256,
                     repr(binding.use_within_s)]
        try:
            outcome, detail = await self._claim(
                keys=[_key(approval_id), PENDING], args=[approval_id, repr(now), used_by, *check, CHANNEL])
        except STORE_ERRORS as exc:
            raise ApprovalStoreError(f"Redis: {exc}") from None
        return outcome.decode(), detail.decode()
