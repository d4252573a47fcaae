"""The admission storm: many patients arriving within seconds, each admitted at once.

Every therapist's socket is open (and read) before the storm. Then every
patient, within ``spread_s`` seconds: asks for a ticket, opens its socket
with it and waits in the waiting room; its therapist admits it on
``patient-waiting``; on ``peer-joined`` the therapist sends its first offer
at once, as a browser does, and the patient answers it. Every socket is read
from the moment it opens, as a browser reads (and answers pings).

Measured per patient: ticket request to ``admitted`` (ours; PeerJS has no
waiting room: socket opened to ``OPEN``), failures (a step that errs or
times out), and the first offer and its answer that never arrived (lost).

With ``at_once``, at most that many patients are on their way in at a time
(issue 19's outside generator opened 200 at a time): a patient whose
arrival time has come waits for one of them to be admitted (or to fail)
before it asks for its ticket. Its wait for that slot is the generator's,
not the server's: it is reported (``slot_wait_p99_ms``) and not counted in
the latency, which starts at the ticket request as without a limit.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from _common import HOST, collector_paused
from _signaling_processes import proc_cpu_s, proc_peak_rss
from _signaling_servers import OursServer, PeerJSServer, Server
from _signaling_wire import Pair

__all__ = ["storm_run", "storms"]


class Inbox:
    """One socket, read from the moment it opens until it closes: its frames by type."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: deque[dict[str, Any]] = deque()
        self.closed_with: int | None = None
        self._arrived = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            if frame.type is aiohttp.WSMsgType.TEXT:
                self.frames.append(orjson.loads(frame.data))
                self._arrived.set()
        self.closed_with = self.ws.close_code
        self._arrived.set()

    async def expect(self, kind: str, timeout_s: float) -> dict[str, Any]:
        """The first frame of type ``kind`` (frames of other types before it are kept)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for frame in self.frames:
                if frame.get("type") == kind:
                    self.frames.remove(frame)
                    return frame
            if self.closed_with is not None:
                raise RuntimeError(f"closed ({self.closed_with}) before {kind}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} in {timeout_s:g} s")
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), left)


# Ours, per admitted patient: seconds spent getting the ticket, opening the
# socket, to welcome, to the therapist's patient-waiting, to peer-joined.
STEPS = ("ticket", "upgrade", "welcome", "patient_waiting", "peer_joined")
steps: list[list[float]] = []
# Seconds each patient waited for a slot (``at_once``) after its arrival.
slot_waits: list[float] = []


class _Slots:
    """At most ``at_once`` patients on their way in at a time (0: no limit)."""

    def __init__(self, at_once: int) -> None:
        self._gate = asyncio.Semaphore(at_once) if at_once > 0 else None

    async def __aenter__(self) -> None:
        if self._gate is not None:
            asked = time.monotonic()
            await self._gate.acquire()
            slot_waits.append(time.monotonic() - asked)

    async def __aexit__(self, *_exc: object) -> None:
        if self._gate is not None:
            self._gate.release()


@dataclass
class _Arrivals:
    """The CPU the server and this generator used while the patients arrived,
    and how long that took: a generator near a whole core of CPU per second
    of it is itself the limit, and the latencies measure it too."""

    pid: int
    server_cpu_s: float
    generator_cpu_s: float
    wall_s: float

    @classmethod
    def begin(cls, pid: int) -> _Arrivals:
        return cls(pid, proc_cpu_s(pid), time.process_time(), time.monotonic())

    def end(self) -> _Arrivals:
        return _Arrivals(
            self.pid,
            proc_cpu_s(self.pid) - self.server_cpu_s,
            time.process_time() - self.generator_cpu_s,
            time.monotonic() - self.wall_s,
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _ours(
    server: OursServer,
    session: aiohttp.ClientSession,
    n: int,
    spread_s: float,
    timeout_s: float,
    before_arrivals: Callable[[int], None] | None,
    slots: _Slots,
) -> tuple[list[float], list[str], int, list[Inbox], _Arrivals]:
    consults = await server.prepare(session, n, 32)
    inboxes: list[Inbox] = []
    therapists: list[Inbox] = []
    gate = asyncio.Semaphore(32)

    async def therapist(consult_id: str) -> Inbox:
        async with gate:
            inbox = Inbox(await server.open_therapist(session, consult_id))
            await inbox.expect("welcome", timeout_s)
            return inbox

    therapists = list(await asyncio.gather(*(therapist(c) for c, _ in consults)))
    inboxes.extend(therapists)
    offer = server.codec.offer(Pair(0, []), 0, time.monotonic_ns())
    answer = server.codec.answer(Pair(0, []), 1, time.monotonic_ns())
    waits: list[float] = []
    steps.clear()
    failures: list[str] = []
    lost = 0

    async def patient(index: int, invite: str) -> None:
        await asyncio.sleep(random.uniform(0, spread_s))
        async with slots:
            me = await admitted(index, invite)
        if me is not None:
            await first_offer(therapists[index], me)

    async def admitted(index: int, invite: str) -> Inbox | None:
        doctor = therapists[index]
        t0 = time.monotonic()
        at: list[float] = []
        try:
            status, body, _ = await server._post(
                session, f"/api/invites/{invite}/ticket", {"consent": True}
            )
            if status != 200:
                raise RuntimeError(f"ticket: {status} {body}")
            at.append(time.monotonic())
            ws = await session.ws_connect(
                f"ws://{HOST}:{server.port}/ws?ticket={body['ticket']}", headers=server._headers
            )
        except Exception as err:
            failures.append(f"ticket/socket: {err!r}"[:200])
            return None
        me = Inbox(ws)
        inboxes.append(me)
        try:
            at.append(time.monotonic())
            await me.expect("welcome", timeout_s)
            at.append(time.monotonic())
            await doctor.expect("patient-waiting", timeout_s)
            at.append(time.monotonic())
            await doctor.ws.send_str('{"v":1,"type":"admit"}')
            await doctor.expect("peer-joined", timeout_s)
            at.append(time.monotonic())
            # The first offer, the moment the therapist's page hears of the patient.
            await doctor.ws.send_str(offer)
            await me.expect("admitted", timeout_s)
            waits.append(time.monotonic() - t0)
            steps.append([b - a for a, b in zip([t0, *at], at, strict=False)])
        except Exception as err:
            failures.append(f"admission: {err!r}"[:200])
            return None
        return me

    async def first_offer(doctor: Inbox, me: Inbox) -> None:
        nonlocal lost
        try:
            await me.expect("offer", timeout_s)
        except Exception:
            lost += 2  # the offer, and so its answer
            return
        await me.ws.send_str(answer)
        try:
            await doctor.expect("answer", timeout_s)
        except Exception:
            lost += 1

    with collector_paused():
        arrivals = _Arrivals.begin(server.pid)
        if before_arrivals is not None:
            before_arrivals(server.pid)
        await asyncio.gather(*(patient(i, inv) for i, (_c, inv) in enumerate(consults)))
        return waits, failures, lost, inboxes, arrivals.end()


async def _peerjs(
    server: PeerJSServer,
    session: aiohttp.ClientSession,
    n: int,
    spread_s: float,
    timeout_s: float,
    slots: _Slots,
) -> tuple[list[float], list[str], int, list[Inbox], _Arrivals]:
    inboxes: list[Inbox] = []
    ids = [(f"t{i}", f"p{i}") for i in range(n)]
    url = f"ws://{HOST}:{server.port}/peerjs?key=peerjs"
    gate = asyncio.Semaphore(32)

    async def open_peer(peer_id: str) -> Inbox:
        inbox = Inbox(await session.ws_connect(f"{url}&id={peer_id}&token=t{peer_id}"))
        inboxes.append(inbox)
        await inbox.expect("OPEN", timeout_s)
        return inbox

    async def first(peer_id: str) -> Inbox:
        async with gate:
            return await open_peer(peer_id)

    firsts = list(await asyncio.gather(*(first(t) for t, _ in ids)))
    codec = server.codec
    waits: list[float] = []
    failures: list[str] = []
    lost = 0

    async def second(index: int) -> None:
        nonlocal lost
        await asyncio.sleep(random.uniform(0, spread_s))
        pair = Pair(index, [], ids[index])
        async with slots:
            t0 = time.monotonic()
            try:
                me = await open_peer(ids[index][1])
                waits.append(time.monotonic() - t0)
            except Exception as err:
                failures.append(f"socket: {err!r}"[:200])
                return
        await firsts[index].ws.send_str(codec.offer(pair, 0, time.monotonic_ns()))
        try:
            await me.expect("OFFER", timeout_s)
        except Exception:
            lost += 2
            return
        await me.ws.send_str(codec.answer(pair, 1, time.monotonic_ns()))
        try:
            await firsts[index].expect("ANSWER", timeout_s)
        except Exception:
            lost += 1

    with collector_paused():
        arrivals = _Arrivals.begin(server.pid)
        await asyncio.gather(*(second(i) for i in range(n)))
        return waits, failures, lost, inboxes, arrivals.end()


async def storm_run(
    server: Server,
    n: int,
    *,
    spread_s: float,
    at_once: int = 0,
    timeout_s: float = 30.0,
    before_arrivals: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One storm of ``n`` arrivals on a fresh ``server``, at most ``at_once``
    on their way in at a time (0: no limit); ``before_arrivals`` is called
    with ours's process id as the arrivals begin (to profile them)."""
    inboxes: list[Inbox] = []
    slot_waits.clear()
    slots = _Slots(at_once)
    try:
        await server.start()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        ) as session:
            started = time.monotonic()
            if isinstance(server, OursServer):
                run = _ours(server, session, n, spread_s, timeout_s, before_arrivals, slots)
            else:
                assert isinstance(server, PeerJSServer)
                run = _peerjs(server, session, n, spread_s, timeout_s, slots)
            waits, failures, lost, inboxes, arrivals = await run
            elapsed = time.monotonic() - started
            peak = proc_peak_rss(server.pid)
            server.stop()
    finally:
        for inbox in inboxes:
            inbox.task.cancel()
        await server.cleanup()
    step_p50 = (
        {
            name: round(_percentile([s[k] for s in steps], 0.5) * 1000, 1)
            for k, name in enumerate(STEPS)
        }
        if steps and isinstance(server, OursServer)
        else {}
    )
    return {
        "server": server.name,
        "steps_p50_ms": step_p50,
        "arrivals": n,
        "spread_s": spread_s,
        "at_once": at_once,
        "admitted": len(waits),
        "failures": len(failures),
        "failure_samples": failures[:5],
        "lost": lost,
        "p50_ms": round(_percentile(waits, 0.50) * 1000, 1),
        "p99_ms": round(_percentile(waits, 0.99) * 1000, 1),
        "max_ms": round(max(waits, default=float("nan")) * 1000, 1),
        # With at_once: how long arrivals waited for a slot (not in the above).
        "slot_wait_p99_ms": round(_percentile(slot_waits, 0.99) * 1000, 1) if at_once else 0.0,
        # The server's CPU during the arrivals only (not the setup before them).
        "server_cpu_s": round(arrivals.server_cpu_s, 2),
        # The generator's CPU meanwhile, and the arrivals' wall time (from the
        # first patient's start to the last one's answer or failure).
        "generator_cpu_s": round(arrivals.generator_cpu_s, 2),
        "arrivals_wall_s": round(arrivals.wall_s, 2),
        "elapsed_s": round(elapsed, 1),
        "server_peak_rss_mb": round(peak / 2**20, 1),
    }


def _profiling(
    profile: Callable[[int], Callable[[], None]], finish: list[Callable[[], None]]
) -> Callable[[int], None]:
    def started(pid: int) -> None:
        finish.append(profile(pid))

    return started


async def storms(
    args: Any,
    make: Callable[[str], Server],
    results: dict[str, Any],
    over_budget: Callable[[str], bool],
    save: Callable[[], None],
    profile: Callable[[int], Callable[[], None]] | None = None,
) -> None:
    """``args.runs`` storms of ``args.storm`` arrivals on each server, alternating.

    ``profile``: starts a profiler on our process as the arrivals of the first
    run begin, and returns what waits for it and reports."""
    for rep in range(args.runs):
        for name in args.servers:
            what = f"{name} storm={args.storm} run={rep + 1}"
            if over_budget(what):
                continue
            print(f"bench: {what} ...", flush=True)
            finish: list[Callable[[], None]] = []
            started = None
            if profile is not None and rep == 0 and name == "ours":
                started = _profiling(profile, finish)

            try:
                run = await asyncio.wait_for(
                    storm_run(
                        make(name),
                        args.storm,
                        spread_s=args.storm_spread,
                        at_once=args.storm_at_once,
                        before_arrivals=started,
                    ),
                    timeout=args.run_timeout,
                )
                for report in finish:
                    await asyncio.to_thread(report)
            except Exception as err:
                print(f"bench: {what} failed: {err!r}", flush=True)
                results["skipped"].append(f"{what}: failed: {err!r}")
                save()
                continue
            run["run"] = rep + 1
            results.setdefault("storms", []).append(run)
            save()
            print(
                "bench:   admitted {admitted}, p50 {p50_ms} ms, p99 {p99_ms} ms, max {max_ms} ms, "
                "slot wait p99 {slot_wait_p99_ms} ms, failures {failures}, lost {lost}, "
                "server CPU {server_cpu_s} s, "
                "generator CPU {generator_cpu_s} s in {arrivals_wall_s} s, "
                "peak RSS {server_peak_rss_mb} MB {failure_samples} {steps_p50_ms}".format(**run),
                flush=True,
            )
