"""``videoconsult serve``: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from config import Settings
from server.cli.base import CliError, serving_file

if TYPE_CHECKING:
    from aiohttp import web


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the server (applies database migrations first)",
        description="Run the server. Pending database migrations are applied at start.",
    )
    parser.add_argument("--host", type=_host, help="address to listen on (setting server.host)")
    parser.add_argument("--port", type=_port, help="port to listen on (setting server.port)")
    parser.set_defaults(run=run)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 1 and 65535")
    return port


def _host(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the host must not be empty")
    return text.strip()


LISTEN_BACKLOG = 4096


def run(settings: Settings, args: argparse.Namespace) -> int:
    server = settings.server.model_copy(
        update={
            "host": args.host or settings.server.host,
            "port": args.port or settings.server.port,
        }
    )
    settings = settings.model_copy(update={"server": server})
    url_host = f"[{server.host}]" if ":" in server.host else server.host
    url = f"http://{url_host}:{server.port}/"
    # The web app's imports (aiohttp, a fifth of a second), for this command only.
    from aiohttp import web

    from server.app import create_app
    from server.request_log import RequestLogger

    app = create_app(settings)
    app.on_startup.append(_settle_garbage_collector)
    serving = serving_file(settings.data_dir)
    try:
        web.run_app(
            app,
            loop=_event_loop(),
            host=server.host,
            port=server.port,
            access_log_class=RequestLogger,
            shutdown_timeout=server.shutdown_timeout_s,
            # aiohttp closes a connection that has not sent a whole request
            # this long after it opened or after its last answer: the bound on
            # the time for headers (slowloris), and on idle keep-alive.
            keepalive_timeout=server.request_timeout_s,
            # Connections not yet accepted: a waiting room filling within
            # seconds (2,000 patients, issue 19) overflowed aiohttp's default
            # of 128 and had connections reset; the kernel caps it at somaxconn.
            backlog=LISTEN_BACKLOG,
            print=lambda _banner: _announce(url, serving, settings.data_dir),
        )
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise CliError(
                f"port {server.port} on {server.host} is already in use: stop the other "
                "server or choose another port with --port"
            ) from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise CliError(f"cannot listen on {server.host}: no such local address") from None
        if err.errno == errno.EACCES:
            raise CliError(
                f"not allowed to listen on port {server.port}: pick one above 1023"
            ) from None
        raise CliError(f"cannot listen on {server.host}:{server.port}: {err.strerror}") from None
    finally:
        _forget(serving)
    return 0


def _forget(serving: Path) -> None:
    """Remove ``serving`` if this process wrote it: a second serve on the same
    data directory, refused its port, must not remove the running one's."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads(serving.read_text()).get("pid") == os.getpid():
            serving.unlink()


# Allocations between young-generation collections (CPython's default: 700).
# Almost everything a request or a relayed message allocates is freed by
# reference counting; the cycle collector running every 700 allocations cost
# about a tenth of the server's CPU under signaling load (docs/benchmarks.md).
GC_GEN0_THRESHOLD = 20_000


async def _settle_garbage_collector(_app: web.Application) -> None:
    """After start-up: the modules and settings loaded so far live as long as
    the process, so the cycle collector need not walk them again; collect
    young objects less often."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _announce(url: str, serving: Path, data_dir: Path) -> None:
    # For the links other commands print (server/cli/base.py, public_origin).
    # Unwritable: links then name the configured port, and say so.
    with contextlib.suppress(OSError):
        serving.write_text(json.dumps({"origin": url.rstrip("/"), "pid": os.getpid()}))
    # Plain stdout, not the log: this line is for the person at the terminal.
    print(f"data directory: {data_dir}", file=sys.stdout)
    print(f"videoconsult is running: open {url} (Ctrl+C stops it)", flush=True, file=sys.stdout)


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (it is, on Linux): the same asyncio, faster."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
