"""A patient's way in on the embedded SQLite runs in a thread of its own
(audit/sqlite_direct.py): writes of one turn share one transaction, yet each
fails alone; they take their turn with the engine's writers; a caller that
goes spares the others; and none of it goes through SQLAlchemy's asyncio
layer, whose statement cost five times as much (issue 19's storm on SQLite:
10 ms of the server's CPU per admission before)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from audit import create_engine
from audit.direct import Prepared, SingleStatements
from audit.invite_use import open_invite_by_hash
from audit.migrate import upgrade
from audit.schema import consults, invites
from audit.sealing import token_hash
from server.app_keys import DB_ENGINE, DB_STATEMENTS
from tests.support.harness import Harness, new_consult

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

# An invite moved to another consult: refused when that consult does not exist.
_MOVE_INVITE = Prepared(
    invites.update()
    .where(invites.c.token_hash == sa.bindparam("invite_hash"))
    .values(consult_id=sa.bindparam("consult_id", type_=invites.c.consult_id.type))
)


@ON_SQLITE
async def test_a_write_that_fails_in_a_shared_transaction_fails_alone(harness: Harness) -> None:
    single = harness.app[DB_STATEMENTS]
    assert single.threaded
    first = await new_consult(harness, "a@praktijk-noord.example")
    second = await new_consult(harness, "b@praktijk-noord.example")
    first_hash, second_hash = token_hash(first.invite_token), token_hash(second.invite_token)
    async with single.autocommit() as db:
        outcomes = await asyncio.gather(
            # To a consult that does not exist: the foreign key refuses it.
            db.execute(_MOVE_INVITE, {"invite_hash": first_hash, "consult_id": uuid.uuid4()}),
            db.execute(
                _MOVE_INVITE,
                {"invite_hash": second_hash, "consult_id": uuid.UUID(first.consult_id)},
            ),
            return_exceptions=True,
        )
    assert isinstance(outcomes[0], sa.exc.IntegrityError), outcomes
    assert outcomes[1] is None
    async with harness.app[DB_ENGINE].connect() as conn:
        owners = dict(
            (await conn.execute(sa.select(invites.c.token_hash, invites.c.consult_id))).all()
        )
    assert owners[first_hash] == uuid.UUID(first.consult_id)  # unchanged
    assert owners[second_hash] == uuid.UUID(first.consult_id)  # moved, committed


async def test_its_writes_take_turns_with_the_engines_writers(tmp_path: Path) -> None:
    """Each side holds the write lock in turn; SQLite's own busy timeout
    (0.2 s here) is far shorter than the whole, and nobody is locked out."""
    engine = create_engine(
        make_url(f"sqlite+aiosqlite:///{tmp_path / 'turns.db'}"), connect_timeout_s=0.2
    )
    single = await SingleStatements.open(engine, connect_timeout_s=0.2)
    try:
        await upgrade(engine)
        consult_id = uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(
                consults.insert().values(
                    id=consult_id,
                    therapist_id=None,
                    created_at=datetime.now(UTC),
                    status="created",
                )
            )
        touch = Prepared(
            consults.update()
            .where(consults.c.id == sa.bindparam("consult_id"))
            .values(status=sa.bindparam("status", type_=consults.c.status.type))
        )

        async def engine_writer() -> None:
            async with engine.begin() as conn:
                await conn.execute(consults.update().values(status="created"))
                await asyncio.sleep(0.05)  # the loop busy elsewhere, the lock held

        async def thread_writer() -> None:
            async with single.autocommit() as db:
                await db.execute(touch, {"consult_id": consult_id, "status": "created"})

        async def thread_writer_later() -> None:
            await asyncio.sleep(0.01)
            await thread_writer()

        outcomes = await asyncio.gather(
            *(engine_writer() for _ in range(8)),
            *(thread_writer_later() for _ in range(8)),
            return_exceptions=True,
        )
        assert [o for o in outcomes if o is not None] == []
    finally:
        await single.close()
        await engine.dispose()


@ON_SQLITE
async def test_a_caller_that_goes_spares_the_others_of_its_batch(harness: Harness) -> None:
    single = harness.app[DB_STATEMENTS]
    setup = await new_consult(harness)
    invite_hash = token_hash(setup.invite_token)
    now = harness.clock.now()
    async with single.reading() as db:
        gone = asyncio.create_task(open_invite_by_hash(db, invite_hash, now=now))
        kept = asyncio.create_task(open_invite_by_hash(db, invite_hash, now=now))
        await asyncio.sleep(0)
        gone.cancel()
        assert (await kept).token_hash == invite_hash
    assert gone.cancelled()
    # The thread serves the next one as before.
    async with single.reading() as db:
        assert (await open_invite_by_hash(db, invite_hash, now=now)).token_hash == invite_hash
