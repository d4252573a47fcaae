"""The master key ring wraps the keys of therapists' labels and practices'
appointment references as it does recordings': new ones under the current
key, moved by a rotation, and an old key retired only once none needs it,
so that a backup taken while a label lived opens with no key still kept."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from audit.consults import get_consult_and_label
from audit.direct import OnConnection
from audit.errors import Conflict
from audit.keyring import (
    LABEL_KEY_PURPOSE,
    add_ring_key,
    key_id_of,
    key_usage,
    load_ring,
    retire,
    rewrap_remaining,
    rotate,
)
from audit.labels import SealedLabel, read_labels, store_label
from audit.references import read_references, store_reference
from audit.schema import appointment_references, consult_labels
from audit.sealing import SealError, seal_under_own_key, unseal
from server.app_keys import DB_ENGINE, MASTER_KEY
from tests.support.harness import Harness, new_consult

LABEL = "Mevr. Boomklever, schouder"
REFERENCE = "AFS-2026-0042"


def root_of(harness: Harness) -> bytes:
    return harness.app[MASTER_KEY].key


async def key_ids(harness: Harness, consult_id: uuid.UUID) -> tuple[str | None, str | None]:
    """The key ids the consult's label row and reference row name."""
    async with harness.app[DB_ENGINE].connect() as conn:
        label = await conn.scalar(
            sa.select(consult_labels.c.key_id).where(consult_labels.c.consult_id == consult_id)
        )
        reference = await conn.scalar(
            sa.select(appointment_references.c.key_id).where(
                appointment_references.c.consult_id == consult_id
            )
        )
    return label, reference


async def both_open(harness: Harness, consult_id: uuid.UUID) -> None:
    """The label and the reference open on every read path: the API's list,
    the room's (one query with the consult), the webhooks'."""
    root = root_of(harness)
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await read_labels(conn, root, [consult_id]) == {consult_id: LABEL}
        _consult, sealed = await get_consult_and_label(OnConnection(conn), consult_id)
        assert sealed is not None
        assert sealed.open(root) == LABEL
        assert await read_references(conn, root, [consult_id]) == {consult_id: REFERENCE}


async def test_labels_and_references_move_to_the_new_key_and_the_old_retires_only_then(
    harness: Harness,
) -> None:
    engine, root = harness.app[DB_ENGINE], root_of(harness)
    key_a = (await rotate(engine, root, now=harness.clock.now())).new_key_id
    setup = await new_consult(harness, display_name=LABEL)  # sealed by the API
    consult_id = uuid.UUID(setup.consult_id)
    async with engine.begin() as conn:
        await store_reference(conn, root, consult_id, REFERENCE)
    assert await key_ids(harness, consult_id) == (key_a, key_a)
    await both_open(harness, consult_id)
    async with engine.connect() as conn:
        # Key A itself, as a copy of it (a memory dump) would have it.
        copy_of_a = (await load_ring(conn, root)).get(key_a)
        row_under_a = (
            await conn.execute(
                sa.select(consult_labels).where(consult_labels.c.consult_id == consult_id)
            )
        ).one()

    harness.clock.advance(60)
    async with engine.begin() as conn:
        key_b = (await add_ring_key(conn, root, now=harness.clock.now())).id
    async with engine.begin() as conn:
        with pytest.raises(Conflict, match=f"{key_a} still wraps 2 data keys"):
            await retire(conn, root, key_a)
    moved = await rewrap_remaining(engine, root)
    assert moved == {key_a: 2}
    assert await key_ids(harness, consult_id) == (key_b, key_b)
    async with engine.begin() as conn:
        assert await key_usage(conn, key_id_of(root)) == {key_b: 2}
        await retire(conn, root, key_a)
    await both_open(harness, consult_id)
    shown = await (await harness.client.get(f"/api/consults/{setup.consult_id}")).json()
    assert shown["consult"]["display_name"] == LABEL

    # A copy of key A opens nothing still kept: the label's key is wrapped by
    # B now. The row as it was (wrapped by A) does not open with the ring any more.
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(consult_labels).where(consult_labels.c.consult_id == consult_id)
            )
        ).one()
    assert row.sealed_label == row_under_a.sealed_label  # the ciphertext stays as it was
    with pytest.raises(SealError):
        unseal(copy_of_a.key, LABEL_KEY_PURPOSE, row.wrapped_key, bound_to=str(consult_id))
    as_it_was = SealedLabel(
        consult_id, row_under_a.wrapped_key, row_under_a.sealed_label, key_a, None
    )
    assert as_it_was.open(root) is None


async def test_a_label_and_a_reference_wrapped_by_the_root_before_the_ring_are_read_and_moved(
    harness: Harness,
) -> None:
    """Rows from before key_id (NULL): wrapped by the root key, as the code
    then sealed them (the purposes spelled out: that format is frozen)."""
    engine, root = harness.app[DB_ENGINE], root_of(harness)
    consult_id = uuid.UUID((await new_consult(harness)).consult_id)
    bound = str(consult_id)
    label_key, sealed_label = seal_under_own_key(
        root, "label-key", "consult-label", LABEL.encode(), bound_to=bound
    )
    reference_key, sealed_reference = seal_under_own_key(
        root,
        "appointment-reference-key",
        "appointment-reference",
        REFERENCE.encode(),
        bound_to=bound,
    )
    async with engine.begin() as conn:
        await conn.execute(
            consult_labels.insert().values(
                consult_id=consult_id, wrapped_key=label_key, sealed_label=sealed_label
            )
        )
        await conn.execute(
            appointment_references.insert().values(
                consult_id=consult_id, wrapped_key=reference_key, sealed_reference=sealed_reference
            )
        )
    assert await key_ids(harness, consult_id) == (None, None)
    await both_open(harness, consult_id)
    root_id = key_id_of(root)
    async with engine.connect() as conn:
        assert await key_usage(conn, root_id) == {root_id: 2}

    rotation = await rotate(engine, root, now=harness.clock.now())
    assert rotation.rewrapped == {root_id: 2}
    assert await key_ids(harness, consult_id) == (rotation.new_key_id, rotation.new_key_id)
    await both_open(harness, consult_id)
    async with engine.connect() as conn:
        assert await key_usage(conn, root_id) == {rotation.new_key_id: 2}


async def test_a_new_label_and_reference_are_wrapped_by_the_current_key(harness: Harness) -> None:
    engine, root = harness.app[DB_ENGINE], root_of(harness)
    setup = await new_consult(harness)  # made before any rotation
    consult_id = uuid.UUID(setup.consult_id)
    async with engine.begin() as conn:
        await store_label(conn, root, consult_id, LABEL)
        await store_reference(conn, root, consult_id, REFERENCE)
    assert await key_ids(harness, consult_id) == (key_id_of(root), key_id_of(root))
    await both_open(harness, consult_id)
