"""The soak's consults: each one's life from creation to its end, and what
every life adds to the tally (messages sent and received by direction, with
sequence numbers, so a lost, doubled or reordered message is seen exactly).

A *slot* runs one consult's life after another until the soak's deadline:

1. the therapist creates the consult (``POST /api/consults``) and opens its
   socket (``welcome``: waiting); the patient takes a ticket with the invite
   and opens theirs (``welcome``); the therapist gets ``patient-waiting``,
   sends ``admit`` and gets ``peer-joined``, the patient ``admitted``;
2. negotiations, a pause before each: the therapist sends an offer and
   trickle candidates, the patient, on the offer, an answer and as many
   candidates; a negotiation is complete when every message of it arrived;
3. sometimes a drop in the middle, as a laptop lid or a network change
   makes it: the patient's or the therapist's socket goes without ``bye``
   (half of the drops a clean close, half a cut TCP connection), the other
   gets ``peer-reconnecting``; a relayed message sent to the absent one then
   must be refused with ``peer_absent`` (a *probe*: refused, never lost); the
   one who dropped comes back within the grace period (patient: a new
   ticket), gets ``welcome`` (active, peer present), the other
   ``peer-rejoined``, and the therapist makes a new offer (ICE restart);
4. more negotiations, then the leave: the therapist's ``end`` (both get
   ``consult-ended`` and the server closes both sockets with 4004), or both
   ``bye`` (the patient first: the therapist gets ``peer-left``; the
   therapist's ``bye`` then ends the consult, ``both_left``), or the patient
   drops for good and the therapist says ``bye`` (the consult ends by
   itself when the patient's grace period runs out, 30 s later, with nobody
   connected).

Nothing is ever sent to a participant who is away, except the probes, and
no socket goes before the last negotiation's messages all arrived: every
relayed message sent must arrive, once and in order. What did not arrive by
the end of its life is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from _signaling_wire import ANSWER_SDP, CANDIDATE_BODY, OFFER_SDP, _json_inner

THERAPIST, PATIENT = 0, 1
ROLES = ("therapist", "patient")
# The relayed messages' types, as they come back with the sender added.
RELAYED = frozenset({"offer", "answer", "candidate"})
CLOSED = "closed"  # the pseudo message a participant's queue gets when its socket closed


# --------------------------------------------------------------------------
# Frames with a sequence number and a send time.
# --------------------------------------------------------------------------


class SeqCodec:
    """Offers, answers and candidates of docs/protocol.md that carry their
    direction's sequence number and the sender's monotonic clock: a trailing
    ``a=x-seq:<n> <ns>`` SDP line, or an ``x-seq <n>.<ns>`` candidate extension
    (relayed as sent: the server does not parse candidates)."""

    def __init__(self) -> None:
        self._offer = '{"v":1,"type":"offer","sdp":"' + _json_inner(OFFER_SDP) + "a=x-seq:"
        self._answer = '{"v":1,"type":"answer","sdp":"' + _json_inner(ANSWER_SDP) + "a=x-seq:"
        self._sdp_end = '\\r\\n"}'
        self._cand = '{"v":1,"type":"candidate","candidate":"' + CANDIDATE_BODY + " x-seq "
        self._cand_end = '","sdpMid":"0","sdpMLineIndex":0}'

    def offer(self, seq: int) -> str:
        return f"{self._offer}{seq} {time.monotonic_ns()}{self._sdp_end}"

    def answer(self, seq: int) -> str:
        return f"{self._answer}{seq} {time.monotonic_ns()}{self._sdp_end}"

    def candidate(self, seq: int) -> str:
        return f"{self._cand}{seq}.{time.monotonic_ns()}{self._cand_end}"

    @staticmethod
    def decode(message: dict[str, Any]) -> tuple[int, int]:
        """(sequence number, send time) of a relayed message."""
        if message["type"] == "candidate":
            seq, _, ts = message["candidate"].rpartition(" ")[2].partition(".")
            return int(seq), int(ts)
        sdp: str = message["sdp"]
        at = sdp.rfind("a=x-seq:")
        seq, _, ts = sdp[at + 8 : sdp.index("\r", at)].partition(" ")
        return int(seq), int(ts)


CODEC = SeqCodec()


# --------------------------------------------------------------------------
# The tally of all lives.
# --------------------------------------------------------------------------


@dataclass
class Tally:
    lives_started: int = 0
    lives_completed: int = 0
    lives_failed: int = 0
    failure_samples: list[str] = field(default_factory=list)
    # What the lives did: "drop_patient", "leave_end", ... (see Mix).
    scenarios: Counter[str] = field(default_factory=Counter)
    sockets_opened: int = 0
    negotiations: int = 0
    # By direction: [therapist → patient, patient → therapist].
    sent: list[int] = field(default_factory=lambda: [0, 0])
    received: list[int] = field(default_factory=lambda: [0, 0])
    # Received with another sequence number than the next one expected.
    out_of_order: int = 0
    probes_sent: int = 0
    probes_refused: int = 0
    # ``error`` messages other than the probes' ``peer_absent``.
    unexpected_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))

    def fail(self, what: str) -> None:
        self.lives_failed += 1
        if len(self.failure_samples) < 20:
            self.failure_samples.append(what[:400])

    @property
    def lost(self) -> int:
        return sum(self.sent) - sum(self.received)


class LifeFailed(Exception):
    """A life did not go as the protocol says (the message says how)."""


# --------------------------------------------------------------------------
# One consult's life.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """How the lives go: probabilities and times (seconds)."""

    negotiations: tuple[int, int] = (2, 4)  # before a drop, and after it: each in this range
    pause_s: tuple[float, float] = (30.0, 60.0)  # before each negotiation
    drop_patient: float = 0.25
    drop_therapist: float = 0.15
    away_s: tuple[float, float] = (0.5, 5.0)  # how long a dropped participant stays away
    leave_end: float = 0.5
    leave_bye: float = 0.35  # the rest: the patient drops for good, the therapist says bye
    candidates: int = 8
    step_timeout_s: float = 20.0  # for each expected message


class Participant:
    """One side's socket of the current life; every frame is read at once by
    its own task (an unread socket does not answer the server's pings)."""

    def __init__(self, life: Life, side: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.life = life
        self.side = side
        self.ws = ws
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if frame.type is aiohttp.WSMsgType.TEXT:
                    await self.life.on_message(self, orjson.loads(frame.data))
        finally:
            self.queue.put_nowait({"type": CLOSED, "code": self.ws.close_code})

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next message for the lifecycle; it must be ``kind`` with ``fields``."""
        try:
            message = await asyncio.wait_for(self.queue.get(), self.life.mix.step_timeout_s)
        except TimeoutError:
            raise LifeFailed(f"{ROLES[self.side]}: no {kind} within the time-out") from None
        if message.get("type") != kind or any(message.get(k) != v for k, v in fields.items()):
            raise LifeFailed(f"{ROLES[self.side]}: expected {kind} {fields}, got {message}")
        return message

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def close(self) -> None:
        """Close the socket (a clean close), and wait for the reader."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 10)
        await self.finish()

    def cut(self) -> None:
        """Cut the TCP connection under the socket, as a lost network does: no close frame."""
        sock = self.ws.get_extra_info("socket")
        if sock is None:
            return
        # The loop's own socket object may not shut down (uvloop's does not):
        # a second descriptor of the same connection does.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.shutdown(socket.SHUT_RDWR)

    async def finish(self) -> None:
        """Wait for the reader to end (the socket closed), then drop it."""
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), 15)
        except TimeoutError:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader
            raise LifeFailed(f"{ROLES[self.side]}: the socket did not close") from None


# Opens a socket: the therapist's (a consult id) or the patient's (an invite).
Opener = Callable[[str], Awaitable[aiohttp.ClientWebSocketResponse]]


class Life:
    """One consult from its creation to its end."""

    def __init__(self, tally: Tally, mix: Mix, rng: random.Random, *, deadline: float) -> None:
        self.tally = tally
        self.mix = mix
        self.rng = rng
        # Past it (monotonic), the life skips its remaining pauses and
        # negotiations and goes on to its leave.
        self.deadline = deadline
        self.sent = [0, 0]  # by sending side
        self.got = [0, 0]  # by sending side: what the other side received
        self.probes_open = [0, 0]  # probes sent by this side, not yet refused
        self.round_done: asyncio.Future[None] | None = None
        self.round_target = (0, 0)
        self.people: list[Participant | None] = [None, None]

    # -- the wire ----------------------------------------------------------

    async def _send_relayed(self, who: Participant, sdp: Callable[[int], str]) -> None:
        side = who.side
        frames = []
        for k in range(1 + self.mix.candidates):
            self.sent[side] += 1
            frames.append((sdp if k == 0 else CODEC.candidate)(self.sent[side]))
        for text in frames:
            await who.send(text)
        self.tally.sent[side] += len(frames)

    async def on_message(self, who: Participant, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in RELAYED:
            sender = 1 - who.side
            seq, ts = CODEC.decode(message)
            self.tally.latencies_ns.append(time.monotonic_ns() - ts)
            self.tally.received[sender] += 1
            if seq != self.got[sender] + 1:
                self.tally.out_of_order += 1
            self.got[sender] = max(self.got[sender], seq)
            if kind == "offer" and who.side == PATIENT:
                await self._send_relayed(who, CODEC.answer)
            self._check_round()
            return
        if kind == "error":
            if message.get("code") == "peer_absent" and self.probes_open[who.side] > 0:
                self.probes_open[who.side] -= 1
                self.tally.probes_refused += 1
                return
            self.tally.unexpected_errors += 1
            if len(self.tally.error_samples) < 20:
                self.tally.error_samples.append(str(message)[:300])
        who.queue.put_nowait(message)

    def _check_round(self) -> None:
        done = self.round_done
        if (
            done is not None
            and not done.done()
            and self.got[THERAPIST] >= self.round_target[THERAPIST]
            and self.got[PATIENT] >= self.round_target[PATIENT]
        ):
            done.set_result(None)

    async def negotiate(self) -> None:
        """The therapist offers; complete when every message of both sides arrived."""
        therapist = self.people[THERAPIST]
        assert therapist is not None
        per_side = 1 + self.mix.candidates
        self.round_target = (self.sent[THERAPIST] + per_side, self.sent[PATIENT] + per_side)
        self.round_done = asyncio.get_running_loop().create_future()
        await self._send_relayed(therapist, CODEC.offer)
        try:
            await asyncio.wait_for(self.round_done, self.mix.step_timeout_s)
        except TimeoutError:
            raise LifeFailed(
                f"negotiation incomplete: sent {self.sent}, received {self.got}"
            ) from None
        self.tally.negotiations += 1

    async def probe(self, who: Participant) -> None:
        """A candidate to the absent peer: must come back refused with peer_absent."""
        self.probes_open[who.side] += 1
        self.tally.probes_sent += 1
        await who.send(CODEC.candidate(0))

    # -- the life ----------------------------------------------------------

    def _join(self, side: int, ws: aiohttp.ClientWebSocketResponse) -> Participant:
        self.tally.sockets_opened += 1
        who = Participant(self, side, ws)
        self.people[side] = who
        return who

    async def _negotiations(self) -> None:
        for _ in range(self.rng.randint(*self.mix.negotiations)):
            pause = min(self.rng.uniform(*self.mix.pause_s), self.deadline - time.monotonic())
            if pause <= 0:
                return
            await asyncio.sleep(pause)
            await self.negotiate()

    async def run(
        self,
        create: Callable[[], Awaitable[tuple[str, str]]],
        open_therapist: Opener,
        open_patient: Opener,
        reopen_therapist: Opener,
        reopen_patient: Opener,
    ) -> None:
        """The whole life; raises :class:`LifeFailed` when it goes otherwise.

        ``reopen_*`` open the socket of a participant coming back after a
        drop: they must not wait behind new consults, or the grace period
        runs out.
        """
        mix, rng, scenarios = self.mix, self.rng, self.tally.scenarios
        consult_id, invite = await create()
        therapist = self._join(THERAPIST, await open_therapist(consult_id))
        await therapist.expect("welcome", state="waiting", peer_present=False)
        patient = self._join(PATIENT, await open_patient(invite))
        await patient.expect("welcome", state="waiting", peer_present=True)
        await therapist.expect("patient-waiting")
        await therapist.send('{"v":1,"type":"admit"}')
        await therapist.expect("peer-joined", role="patient")
        await patient.expect("admitted")
        await self._negotiations()

        draw = rng.random()
        if draw < mix.drop_patient + mix.drop_therapist:
            side = PATIENT if draw < mix.drop_patient else THERAPIST
            scenarios["drop_" + ROLES[side]] += 1
            therapist, patient = await self._drop_and_return(
                side, consult_id, invite, reopen_therapist, reopen_patient
            )
            await self.negotiate()  # the therapist's new offer (ICE restart)
            await self._negotiations()

        draw = rng.random()
        if draw < mix.leave_end:
            scenarios["leave_end"] += 1
            await therapist.send('{"v":1,"type":"end"}')
            for who in (therapist, patient):
                await who.expect("consult-ended", reason="ended_by_therapist")
                await who.expect(CLOSED, code=4004)
        elif draw < mix.leave_end + mix.leave_bye:
            scenarios["leave_bye"] += 1
            await patient.send('{"v":1,"type":"bye"}')
            await therapist.expect("peer-left", role="patient")
            await patient.close()
            await therapist.send('{"v":1,"type":"bye"}')
            await therapist.expect("consult-ended", reason="both_left")
            await therapist.expect(CLOSED, code=4004)
        else:
            scenarios["leave_drop"] += 1
            await self._drop(patient)
            await therapist.expect("peer-reconnecting", role="patient")
            await therapist.send('{"v":1,"type":"bye"}')
            await therapist.close()
        for who in (therapist, patient):
            await who.finish()
        self.check_complete()

    async def _drop(self, who: Participant) -> None:
        """The socket goes without ``bye``: a clean close or a cut connection."""
        if self.rng.random() < 0.5:
            await who.close()
        else:
            who.cut()
            await who.finish()

    async def _drop_and_return(
        self,
        side: int,
        consult_id: str,
        invite: str,
        open_therapist: Opener,
        open_patient: Opener,
    ) -> tuple[Participant, Participant]:
        gone, stays = self.people[side], self.people[1 - side]
        assert gone is not None
        assert stays is not None
        await self._drop(gone)
        await stays.expect("peer-reconnecting", role=ROLES[side])
        await self.probe(stays)
        await asyncio.sleep(self.rng.uniform(*self.mix.away_s))
        ws = await (open_patient(invite) if side == PATIENT else open_therapist(consult_id))
        back = self._join(side, ws)
        await back.expect("welcome", state="active", peer_present=True)
        await stays.expect("peer-rejoined", role=ROLES[side])
        if self.probes_open[stays.side]:
            raise LifeFailed(f"{ROLES[stays.side]}: the probe was not refused")
        pair = (back, stays) if side == THERAPIST else (stays, back)
        return pair[0], pair[1]

    def check_complete(self) -> None:
        for side in (THERAPIST, PATIENT):
            if self.got[side] != self.sent[side]:
                raise LifeFailed(
                    f"{ROLES[side]} sent {self.sent[side]} messages, {self.got[side]} arrived"
                )
            if self.probes_open[side]:
                raise LifeFailed(f"{ROLES[side]}: a probe was neither refused nor relayed")

    async def abandon(self) -> None:
        """After a failure: close whatever is still open."""
        for who in self.people:
            if who is not None and not who.reader.done():
                with contextlib.suppress(Exception):
                    await who.close()
