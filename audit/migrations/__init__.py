"""The Alembic migrations that make the schema of ``audit/schema.py``.

A revision in ``versions/`` is frozen in time: it imports nothing of the
project (not ``audit.schema``, not the domain code) and carries copies of
what it needs, so that what a fresh install runs never changes.
``tests/test_database.py`` fails on a revision that imports the project, and
runs them all with today's domain code out of reach.
"""
