"""The master key ring: rotation re-wraps data keys without touching the files,
and retirement removes an old key only once nothing needs it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from audit import keyring
from audit.errors import Conflict, NotFound
from audit.keyring import key_id_of, key_usage, load_ring, retire, rotate
from audit.recordings import data_key_of, plaintext
from audit.schema import access_log, master_keys, recordings
from audit.sealing import SealError
from server.app_keys import DB_ENGINE, FILE_STORE, MASTER_KEY
from tests.support.cli import assert_one_clear_error, cli_env, run_cli
from tests.support.harness import Harness, new_consult, stored_recording


def root_of(harness: Harness) -> bytes:
    return harness.app[MASTER_KEY].key


async def read_back(harness: Harness, recording_id: uuid.UUID) -> bytes:
    async with harness.app[DB_ENGINE].connect() as conn:
        file_name, data_key = await data_key_of(conn, root_of(harness), recording_id)
    return b"".join(plaintext(harness.app[FILE_STORE], file_name, data_key, recording_id))


def file_hashes(harness: Harness) -> dict[str, str]:
    root = harness.app[FILE_STORE].root
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in root.iterdir()}


async def key_rows(harness: Harness) -> dict[uuid.UUID, tuple[str, bytes]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = await conn.execute(
            sa.select(recordings.c.id, recordings.c.key_id, recordings.c.wrapped_key)
        )
        return {row.id: (row.key_id, row.wrapped_key) for row in rows}


async def two_recordings(harness: Harness) -> dict[uuid.UUID, bytes]:
    setup = await new_consult(harness)
    media = {}
    for size in (200_000, 70_001):
        data = os.urandom(size)
        media[await stored_recording(harness, setup.consult_id, data)] = data
    return media


async def test_rotation_keeps_recordings_readable_and_leaves_their_files_alone(
    harness: Harness,
) -> None:
    engine, root = harness.app[DB_ENGINE], root_of(harness)
    media = await two_recordings(harness)
    before_files, before_keys = file_hashes(harness), await key_rows(harness)
    # Before any rotation the root key itself wraps the data keys.
    assert {key_id for key_id, _ in before_keys.values()} == {key_id_of(root)}

    first = await rotate(engine, root, now=harness.clock.now())
    assert first.rewrapped == {key_id_of(root): 2}
    after_first = await key_rows(harness)
    for recording_id, data in media.items():
        key_id, wrapped = after_first[recording_id]
        assert key_id == first.new_key_id
        assert wrapped != before_keys[recording_id][1]
        assert await read_back(harness, recording_id) == data
    assert file_hashes(harness) == before_files

    harness.clock.advance(60)
    second = await rotate(engine, root, now=harness.clock.now())
    assert second.new_key_id != first.new_key_id
    assert second.rewrapped == {first.new_key_id: 2}
    for recording_id, data in media.items():
        assert (await key_rows(harness))[recording_id][0] == second.new_key_id
        assert await read_back(harness, recording_id) == data
    assert file_hashes(harness) == before_files


async def test_rotation_moves_every_data_key_a_batch_at_a_time(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keyring, "REWRAP_BATCH", 2)
    setup = await new_consult(harness)
    media = {}
    for _ in range(5):
        data = os.urandom(1000)
        media[await stored_recording(harness, setup.consult_id, data)] = data
    rotation = await rotate(harness.app[DB_ENGINE], root_of(harness), now=harness.clock.now())
    assert rotation.rewrapped == {key_id_of(root_of(harness)): 5}
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await key_usage(conn, key_id_of(root_of(harness))) == {rotation.new_key_id: 5}
    for recording_id, data in media.items():
        assert await read_back(harness, recording_id) == data


async def test_a_new_recording_is_wrapped_by_the_current_key(harness: Harness) -> None:
    await two_recordings(harness)
    rotation = await rotate(harness.app[DB_ENGINE], root_of(harness), now=harness.clock.now())
    setup = await new_consult(harness, "second@praktijk-noord.example")
    data = os.urandom(5000)
    recording_id = await stored_recording(harness, setup.consult_id, data)
    assert (await key_rows(harness))[recording_id][0] == rotation.new_key_id
    assert await read_back(harness, recording_id) == data


async def test_retire_is_refused_for_the_root_the_current_key_and_a_key_in_use(
    harness: Harness,
) -> None:
    engine, root = harness.app[DB_ENGINE], root_of(harness)
    setup = await new_consult(harness)
    first = await rotate(engine, root, now=harness.clock.now())
    async with engine.connect() as conn:
        first_key = (await load_ring(conn, root)).get(first.new_key_id)
    harness.clock.advance(60)
    second = await rotate(engine, root, now=harness.clock.now())
    # A recording that started with the key loaded before the rotation.
    late = os.urandom(3000)
    late_id = await stored_recording(harness, setup.consult_id, late, wrapping=first_key)

    async with engine.begin() as conn:
        with pytest.raises(Conflict, match="configured root key"):
            await retire(conn, root, key_id_of(root))
        with pytest.raises(Conflict, match="current master key; rotate first"):
            await retire(conn, root, second.new_key_id)
        with pytest.raises(Conflict, match=f"{first.new_key_id} still wraps 1 data keys"):
            await retire(conn, root, first.new_key_id)
        with pytest.raises(NotFound, match="no master key 0123456789abcdef"):
            await retire(conn, root, "0123456789abcdef")
    async with engine.connect() as conn:
        ids = set((await conn.execute(sa.select(master_keys.c.id))).scalars())
    assert ids == {first.new_key_id, second.new_key_id}
    assert await read_back(harness, late_id) == late


async def test_after_rotate_and_retire_the_old_key_is_gone(harness: Harness) -> None:
    engine, root = harness.app[DB_ENGINE], root_of(harness)
    media = await two_recordings(harness)
    first = await rotate(engine, root, now=harness.clock.now())
    async with engine.connect() as conn:
        sealed_first = await conn.scalar(
            sa.select(master_keys.c.wrapped_key).where(master_keys.c.id == first.new_key_id)
        )
    harness.clock.advance(60)
    second = await rotate(engine, root, now=harness.clock.now())
    async with engine.begin() as conn:
        await retire(conn, root, first.new_key_id)
    async with engine.connect() as conn:
        ring = await load_ring(conn, root)
        assert set(ring.keys) == {key_id_of(root), second.new_key_id}
        rows = (await conn.execute(sa.select(master_keys))).all()
        assert [row.id for row in rows] == [second.new_key_id]
        assert sealed_first not in [row.wrapped_key for row in rows]
        assert await key_usage(conn, key_id_of(root)) == {second.new_key_id: 2}
        with pytest.raises(SealError, match=f"master key {first.new_key_id}"):
            ring.get(first.new_key_id)
    for recording_id, data in media.items():
        assert await read_back(harness, recording_id) == data


async def test_a_ring_key_sealed_under_another_root_does_not_load(harness: Harness) -> None:
    engine, root = harness.app[DB_ENGINE], root_of(harness)
    media = await two_recordings(harness)
    rotation = await rotate(engine, root, now=harness.clock.now())
    other_root = os.urandom(32)
    async with engine.connect() as conn:
        with pytest.raises(
            SealError, match=f"master key {rotation.new_key_id} of the ring does not open"
        ):
            await load_ring(conn, other_root)
        recording_id = next(iter(media))
        with pytest.raises(SealError, match="another root key"):
            await data_key_of(conn, other_root, recording_id)


async def installation_actions(harness: Harness) -> list[tuple[str, str | None, str, str]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = await conn.execute(
            sa.select(
                access_log.c.action,
                access_log.c.object_id,
                access_log.c.actor_role,
                access_log.c.client_type,
            )
            .where(access_log.c.chain == "installation")
            .order_by(access_log.c.seq)
        )
        return [tuple(row) for row in rows]


@pytest.mark.slow  # runs the command line in processes of its own
async def test_keys_commands_list_rotate_and_retire_and_are_logged(
    harness: Harness, data_dir: Path, database_url: str
) -> None:
    media = await two_recordings(harness)
    env = cli_env(data_dir, database_url=database_url)
    root_id = key_id_of(root_of(harness))

    async def cli(*args: str) -> tuple[int, str, str]:
        done = await asyncio.to_thread(run_cli, "keys", *args, env=env)
        return done.returncode, done.stdout, done.stderr

    code, out, _ = await cli("list")
    assert code == 0
    assert out.splitlines() == [f"{root_id}  root, current  2 data keys"]

    code, out, err = await cli("rotate")
    assert code == 0, err
    first_id = out.split()[2]
    assert f"master key {first_id} added" in out
    assert "re-wrapped 2 data keys; no file was touched" in out
    assert f"2 from the root key {root_id}" in out
    code, out, err = await cli("rotate")
    assert code == 0, err
    second_id = out.split()[2]
    assert f"retire it with `videoconsult keys retire {first_id}`" in out

    code, out, _ = await cli("list")
    assert out.splitlines() == [
        f"{root_id}  root           0 data keys",
        f"{first_id}  -              0 data keys",
        f"{second_id}  current        2 data keys",
    ]
    refused = await asyncio.to_thread(run_cli, "keys", "retire", second_id, env=env)
    assert refused.returncode == 1
    assert_one_clear_error(refused, f"{second_id} is the current master key; rotate first")
    refused = await asyncio.to_thread(run_cli, "keys", "retire", root_id, env=env)
    assert_one_clear_error(refused, "configured root key")

    code, out, err = await cli("retire", first_id)
    assert code == 0, err
    assert f"master key {first_id} retired" in out
    code, out, _ = await cli("list")
    assert first_id not in out
    for recording_id, data in media.items():
        assert await read_back(harness, recording_id) == data
    # Only the changes are recorded, the refusals (rules, not access) are not.
    assert await installation_actions(harness) == [
        ("keys.rotate", first_id, "operator", "cli"),
        ("keys.rotate", second_id, "operator", "cli"),
        ("keys.retire", first_id, "operator", "cli"),
    ]
