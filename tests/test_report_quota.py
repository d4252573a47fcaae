"""The report quota's bookkeeping: what it keeps, and for how long."""

from __future__ import annotations

import uuid

from signaling.report_quota import IDLE_FORGET_S, SWEEP_EVERY_S, Quota, ReportQuota, Verdict


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_consult_ended_on_another_node_is_forgotten_once_idle_for_a_day() -> None:
    """A consult that ends on this node is forgotten at once; one that ended
    elsewhere (several nodes) used to stay counted here until a restart."""
    ticks = Ticks()
    quota = ReportQuota(per_consult=Quota(entries=2, bytes=1024), clock=ticks)
    elsewhere, busy = uuid.uuid4(), uuid.uuid4()
    assert quota.take(elsewhere, "c1", 10) is Verdict.KEEP
    quota.forget_connection("c1")  # its socket closed when it ended on the other node
    assert quota.tracked_consults == 1

    ticks.now += IDLE_FORGET_S - 1
    assert quota.take(busy, "c2", 10) is Verdict.KEEP
    assert quota.tracked_consults == 2  # not a day yet
    ticks.now += SWEEP_EVERY_S  # the next look through, at most this much later
    assert quota.take(busy, "c2", 10) is Verdict.KEEP
    assert quota.tracked_consults == 1  # idle for a day: gone
    # A consult in use keeps its count: a third report is over its quota.
    assert quota.take(busy, "c3", 10) is Verdict.FIRST_DROP
    assert quota.take(elsewhere, "c4", 10) is Verdict.KEEP  # counted afresh


def test_an_active_consult_keeps_its_quota_across_reconnects() -> None:
    ticks = Ticks()
    quota = ReportQuota(per_consult=Quota(entries=3, bytes=1024), clock=ticks)
    consult = uuid.uuid4()
    for connection in ("a", "b", "c"):
        assert quota.take(consult, connection, 10) is Verdict.KEEP
        quota.forget_connection(connection)
        ticks.now += IDLE_FORGET_S / 2
    assert quota.take(consult, "d", 10) is Verdict.FIRST_DROP
