"""Each room's state in Redis, with a lock per room: :class:`RedisRoomStore`.

Keys: the state, ``{prefix}:roomstate:{consult}``, stored as
``"{version} {json}"``; its lock, ``{prefix}:roomlock:{consult}``; the room
clock that hands out versions, ``{prefix}:roomclock``. Each change is also
published on :func:`state_channel`, so that the nodes' brokers can feed it
to their stores (see :meth:`signaling.redis.broker.RedisBroker.watch_rooms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from redis.asyncio import Redis

from signaling.ports import StateUnavailable
from signaling.redis.codec import (
    as_str,
    decode_room_state,
    encode_room_state,
    glob_escaped,
    versioned,
)
from signaling.redis.errors import UNREACHABLE, unavailable_on_error
from signaling.state import RoomState

__all__ = ["STATE_SUFFIX", "RedisRoomStore", "state_channel"]

_log = structlog.get_logger("videoconsult.signaling")

# A room's changes are published on {prefix}:room:{consult}:state, which the
# brokers' pattern subscription receives with the deliveries.
STATE_SUFFIX = ":state"


def state_channel(prefix: str, consult_id: uuid.UUID) -> str:
    """The channel on which the changes of ``consult_id``'s room are published."""
    return f"{prefix}:room:{consult_id}{STATE_SUFFIX}"


# Each saved room state is stored and published as "{version} {json}"; a
# dropped room is published as "{version} " (nothing after the space). The
# version comes from the room clock, {prefix}:roomclock: Redis's own time in
# microseconds, or one more than the last version handed out if that is
# later, so versions only grow, across rooms and across a Redis restart
# that lost every key, and each node can tell an older change from a newer.
_NEXT_VERSION = """
local function next_version(clock_key)
  local now = redis.call('TIME')
  local version = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local last = tonumber(redis.call('GET', clock_key) or '0')
  if last >= version then
    version = last + 1
  end
  local text = string.format('%.0f', version)
  redis.call('SET', clock_key, text)
  return text
end
"""

# KEYS: lock, state, clock. ARGV: token, state (JSON), state TTL (ms), channel.
# Saves the state, publishes it and releases the lock only while the lock is
# still ours: a holder whose lock ran out (it stalled past the lock's TTL,
# and another node may have changed the room since) saves nothing, and gets
# 0. Otherwise returns the version (a string).
_SAVE_AND_RELEASE = (
    _NEXT_VERSION
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local value = next_version(KEYS[3]) .. ' ' .. ARGV[2]
redis.call('SET', KEYS[2], value, 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], value)
return value
"""
)

# KEYS: lock, state, clock. ARGV: token, channel. Drops the room, publishes
# that, and releases the lock if it is still ours; returns the published
# value.
_FORGET_AND_RELEASE = (
    _NEXT_VERSION
    + """
redis.call('DEL', KEYS[2])
local value = next_version(KEYS[3]) .. ' '
redis.call('PUBLISH', ARGV[2], value)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return value
"""
)

# KEYS: lock. ARGV: token. Releases the lock only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Rooms remembered (see RedisRoomStore).
_CACHED_ROOMS = 10_000
# How long a remembered room answers peek before it is read again, even
# with no change heard: bounds what a change the feed never saw (a room
# that expired in Redis) can leave wrong.
_CACHE_FRESH_S = 5.0
_LOCK_POLL_MIN_S = 0.002
_LOCK_POLL_MAX_S = 0.05


@dataclass
class _Remembered:
    state: RoomState | None
    version: int
    # The feed's generation when this was read: changes are heard for it
    # only while the feed has not restarted since.
    generation: int
    # When (event loop time).
    at: float


class RedisRoomStore:
    """Each room's state as JSON under ``{prefix}:roomstate:{consult}``, with
    a lock per room, ``{prefix}:roomlock:{consult}``.

    Both expire: the state ``state_ttl`` after its last change, or that long
    after its ``keep_until`` (a consult booked ahead), so longer than a room
    lives (an invite's validity, a consult's maximum duration, the hour an
    ended room is kept); the lock ``lock_ttl_s`` after it was taken.
    A node that dies leaves nothing behind for longer than that.

    The lock is a token under ``SET NX PX``; saving the state and releasing
    the lock is one script that checks the token first, so a holder that
    stalled past the lock's expiry saves nothing (and gets
    :class:`StateUnavailable`) instead of overwriting a newer change.
    redis-py's ``Lock`` could take the lock but not save under it in one step.

    ``peek`` (each relayed message asks it) answers from memory when it can.
    The same script that saves a room publishes the new state, with a
    version, on ``{prefix}:room:{consult}:state``; a
    :class:`~signaling.redis.broker.RedisBroker` that
    :meth:`~signaling.redis.broker.RedisBroker.watch_rooms` this store feeds those changes to
    it, in the order Redis made them and before any delivery published
    after them. A remembered room answers while the feed has run without a
    break since it was read, and for at most a few seconds; otherwise peek
    reads Redis. Without a broker feeding it, every peek reads Redis.

    When Redis cannot be reached, ``peek`` answers from the last state this
    node saw of the room, so consults whose participants are both on this
    node keep relaying through an outage. Everything else raises
    :class:`StateUnavailable` then.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        state_ttl: timedelta,
        lock_ttl_s: float = 10.0,
        lock_wait_s: float = 5.0,
        fresh_s: float = _CACHE_FRESH_S,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._fresh_s = fresh_s
        self._clock_key = f"{prefix}:roomclock"
        self._state_ttl_ms = int(state_ttl.total_seconds() * 1000)
        self._lock_ttl_ms = int(lock_ttl_s * 1000)
        self._lock_wait_s = lock_wait_s
        self._save_and_release = client.register_script(_SAVE_AND_RELEASE)
        self._forget_and_release = client.register_script(_FORGET_AND_RELEASE)
        self._release = client.register_script(_RELEASE)
        self._seen: OrderedDict[uuid.UUID, _Remembered] = OrderedDict()
        self._fed = False
        self._generation = 0

    def state_key(self, consult_id: uuid.UUID) -> str:
        return f"{self._prefix}:roomstate:{consult_id}"

    def lock_key(self, consult_id: uuid.UUID) -> str:
        return f"{self._prefix}:roomlock:{consult_id}"

    def feed_restarted(self) -> None:
        """The feed of changes (re)started: changes may have been missed, so
        nothing remembered before answers ``peek`` until read again."""
        self._fed = True
        self._generation += 1

    def feed_stopped(self) -> None:
        """The feed of changes stopped: every ``peek`` reads Redis until it
        restarts (and answers from memory only when Redis cannot be reached)."""
        self._fed = False
        self._generation += 1

    def changed(self, consult_id: uuid.UUID, value: str) -> None:
        """A change to the room heard on the feed (a published value).

        Raises ValueError (or StateUnavailable) when it is unreadable."""
        version, encoded = versioned(value)
        state = self._decode(consult_id, encoded) if encoded else None
        self._remember(consult_id, state, version, self._generation)

    @asynccontextmanager
    async def locked(
        self, consult_id: uuid.UUID, *, create: bool = False
    ) -> AsyncIterator[RoomState | None]:
        lock_key, state_key = self.lock_key(consult_id), self.state_key(consult_id)
        token = secrets.token_hex(16)
        await self._acquire(lock_key, token)
        saved = False
        try:
            generation = self._generation
            with unavailable_on_error("reading a room"):
                raw = await self._client.get(state_key)
            if raw is None and not create:
                yield None
                return
            if raw is None:
                version, before, state = 0, None, RoomState()
            else:
                version, before = self._read(consult_id, raw)
                state = self._decode(consult_id, before)
            yield state
            encoded = encode_room_state(state)
            if encoded == before:
                # Unchanged (most blocks only look): nothing to write.
                self._remember(consult_id, state.copy(), version, generation)
                return
            with unavailable_on_error("saving a room"):
                value = await self._save_and_release(
                    keys=[lock_key, state_key, self._clock_key],
                    args=[
                        token,
                        encoded,
                        self._ttl_ms(state),
                        state_channel(self._prefix, consult_id),
                    ],
                )
            saved = value != 0
            if not saved:
                raise StateUnavailable("the room's lock ran out before its change was saved")
            version, _ = self._read(consult_id, value)
            self._remember(consult_id, state.copy(), version, generation)
        finally:
            if not saved:
                with contextlib.suppress(*UNREACHABLE):
                    await self._release(keys=[lock_key], args=[token])

    def _fresh(self, consult_id: uuid.UUID) -> _Remembered | None:
        """What this node saw of the room, while the feed of changes keeps it fresh."""
        seen = self._seen.get(consult_id)
        if (
            seen is not None
            and self._fed
            and seen.generation == self._generation
            and asyncio.get_running_loop().time() - seen.at < self._fresh_s
        ):
            return seen
        return None

    def peek_now(self, consult_id: uuid.UUID) -> RoomState | None:
        seen = self._fresh(consult_id)
        return None if seen is None else seen.state

    async def peek(self, consult_id: uuid.UUID) -> RoomState | None:
        seen = self._fresh(consult_id)
        if seen is not None:
            return seen.state
        generation, started = self._generation, asyncio.get_running_loop().time()
        try:
            raw = await self._client.get(self.state_key(consult_id))
        except UNREACHABLE as err:
            seen = self._seen.get(consult_id)
            if seen is None:
                raise StateUnavailable(
                    f"Redis is unreachable (reading a room): {type(err).__name__}"
                ) from err
            return seen.state
        if raw is None:
            return self._remember(consult_id, None, 0, generation, missing_since=started)
        version, encoded = self._read(consult_id, raw)
        return self._remember(consult_id, self._decode(consult_id, encoded), version, generation)

    async def forget(self, consult_id: uuid.UUID) -> None:
        # Under the room's lock: a change begun before would otherwise save
        # the room again right after it was dropped.
        lock_key, token = self.lock_key(consult_id), secrets.token_hex(16)
        await self._acquire(lock_key, token)
        try:
            generation = self._generation
            with unavailable_on_error("forgetting a room"):
                value = await self._forget_and_release(
                    keys=[lock_key, self.state_key(consult_id), self._clock_key],
                    args=[token, state_channel(self._prefix, consult_id)],
                )
            # Gone, at this version: a change heard late from before it loses.
            version, _ = self._read(consult_id, value)
            self._remember(consult_id, None, version, generation)
        except BaseException:
            with contextlib.suppress(*UNREACHABLE):
                await self._release(keys=[lock_key], args=[token])
            raise

    async def consult_ids(self) -> list[uuid.UUID]:
        found: list[uuid.UUID] = []
        start = len(self.state_key(uuid.UUID(int=0))) - 36
        with unavailable_on_error("listing rooms"):
            async for key in self._client.scan_iter(
                match=f"{glob_escaped(self._prefix)}:roomstate:*", count=500
            ):
                with contextlib.suppress(ValueError):
                    found.append(uuid.UUID(as_str(key)[start:]))
        return found

    def _ttl_ms(self, state: RoomState) -> int:
        if state.keep_until is None:
            return self._state_ttl_ms
        until_ms = (state.keep_until - datetime.now(UTC)).total_seconds() * 1000
        return self._state_ttl_ms + max(0, int(until_ms))

    async def _acquire(self, lock_key: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait_s
        poll_s = _LOCK_POLL_MIN_S
        while True:
            with unavailable_on_error("locking a room"):
                if await self._client.set(lock_key, token, nx=True, px=self._lock_ttl_ms):
                    return
            if loop.time() + poll_s > deadline:
                raise StateUnavailable(
                    f"a room stayed locked for {self._lock_wait_s:g} s (another node holds it)"
                )
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 2, _LOCK_POLL_MAX_S)

    def _read(self, consult_id: uuid.UUID, raw: str | bytes) -> tuple[int, str]:
        try:
            return versioned(raw)
        except (ValueError, UnicodeDecodeError) as err:
            _log.error("room state in Redis is unreadable", error=type(err).__name__)
            raise StateUnavailable("the room's state in Redis is unreadable") from err

    def _decode(self, consult_id: uuid.UUID, raw: str) -> RoomState:
        try:
            return decode_room_state(raw)
        except (ValueError, UnicodeDecodeError) as err:
            # Never written by this code; logged without the data (a display name).
            _log.error("room state in Redis is unreadable", error=type(err).__name__)
            raise StateUnavailable("the room's state in Redis is unreadable") from err

    def _remember(
        self,
        consult_id: uuid.UUID,
        state: RoomState | None,
        version: int,
        generation: int,
        *,
        missing_since: float | None = None,
    ) -> RoomState | None:
        """Keep ``state`` unless a newer version of the room is known; return
        whichever is newer, remembered from now (and so answering ``peek``
        for a while if ``generation`` is the feed's).

        Versions only grow, so they order changes heard on the feed and read
        from Redis alike. A room Redis did not have (it may have expired)
        has no version: ``missing_since`` is when the read began, and only a
        change heard after that is newer."""
        loop = asyncio.get_running_loop()
        seen = self._seen.get(consult_id)
        if seen is not None:
            if missing_since is None and seen.version > version:
                return seen.state
            if missing_since is not None and seen.at >= missing_since:
                return seen.state
            if seen.version == version:
                # The same version again: known current for the later feed.
                generation = max(generation, seen.generation)
        self._seen[consult_id] = _Remembered(state, version, generation, loop.time())
        self._seen.move_to_end(consult_id)
        while len(self._seen) > _CACHED_ROOMS:
            self._seen.popitem(last=False)
        return state
