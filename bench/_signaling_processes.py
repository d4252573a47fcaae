"""The processes and services the signaling benchmark uses: the servers it starts
(all killed on the way out), PostgreSQL and Redis on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from _common import (
    HOST,
    ROOT,
    pg_execute,
    proc_status_kb,
)

# --------------------------------------------------------------------------
# Processes: every server this benchmark starts is killed on the way out.
# --------------------------------------------------------------------------


class Processes:
    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], *, env: dict[str, str], log: Path, pipes: bool = False
    ) -> subprocess.Popen[bytes]:
        """``argv`` in its own process group, its output into ``log``; with
        ``pipes``, its stdin and stdout are pipes (only stderr goes to ``log``)."""
        with log.open("ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - our own commands
                argv,
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE if pipes else out,
                stderr=out if pipes else subprocess.STDOUT,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                start_new_session=True,  # its own process group, killed as one
            )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, grace_s: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._running):
            try:
                self.stop(proc, grace_s=2.0)
            except Exception as err:
                print(f"bench: could not stop pid {proc.pid}: {err}", file=sys.stderr)


PROCESSES = Processes()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, proc: subprocess.Popen[bytes], *, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status < 500:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"server did not answer {url} within {timeout_s} s")


def proc_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def proc_rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def proc_peak_rss(pid: int) -> int:
    """VmHWM: the kernel's own high-water mark of the process's resident memory."""
    return proc_status_kb("VmHWM", pid) * 1024


async def pg_admin(server: str, statement: str) -> None:
    """One statement on the PostgreSQL server's maintenance database (loopback only)."""
    user, _, hostport = server.partition("@")
    host, _, port = hostport.partition(":")
    if host not in (HOST, "localhost"):
        raise RuntimeError(f"the benchmark only uses a PostgreSQL server on {HOST}")
    await pg_execute(f"postgresql://{user}@{host}:{int(port or 5432)}/postgres", statement)


def loopback_redis(url: str) -> str:
    """``url`` if it names a Redis server on loopback; the benchmark talks to no other."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "redis" or parsed.hostname not in (HOST, "localhost"):
        raise ValueError(f"the benchmark only uses a Redis server on {HOST}, not {url!r}")
    return url


# The Redis server the benchmark's nodes use: its URL, and its process id
# when it runs on this host and can be read (for its CPU time).
REDIS_SERVER: dict[str, Any] = {}


async def find_redis(url: str) -> None:
    """Note ``url`` and its server's process; raises when Redis does not answer."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    REDIS_SERVER.update(url=url, version=str(info.get("redis_version", "?")), pid=None)
    pid = int(info.get("process_id", 0))
    with contextlib.suppress(psutil.Error):
        if pid and "redis" in psutil.Process(pid).name():
            psutil.Process(pid).cpu_times()  # readable?
            REDIS_SERVER["pid"] = pid


def redis_cpu_s() -> float | None:
    pid = REDIS_SERVER.get("pid")
    if pid is None:
        return None
    try:
        return proc_cpu_s(pid)
    except psutil.Error:
        return None


async def redis_connected_clients() -> int | None:
    """Connections to the Redis server now (all of its clients, not only ours)."""
    if "url" not in REDIS_SERVER:
        return None
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_SERVER["url"], socket_connect_timeout=5, socket_timeout=5)
    try:
        return int((await client.info("clients"))["connected_clients"])
    except Exception:
        return None
    finally:
        await client.aclose()


async def redis_delete_prefix(url: str, prefix: str) -> int:
    """Delete the keys ``{prefix}:*`` (one run's), never anything else; returns how many."""
    from redis.asyncio import Redis

    if not re.fullmatch(r"vc-bench-[0-9a-f]{12}", prefix):
        raise ValueError(f"not a benchmark run's key prefix: {prefix!r}")
    client = Redis.from_url(loopback_redis(url), socket_connect_timeout=5, socket_timeout=10)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await client.delete(*batch)
                batch.clear()
        if batch:
            deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted
