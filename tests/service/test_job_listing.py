"""The job list: sorts with keyset pages, filters, folded sweep trials, latest metrics, the
list stream's changes; on SQLite and PostgreSQL (the sort expressions differ)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from metaserve.service import job_listing, job_store
from metaserve.service.exceptions import InvalidCursor, InvalidListQuery
from metaserve.service.orm import Job, JobStatus, Sweep, utcnow
from tests.helpers import submit_to_store as submit

pytestmark = pytest.mark.dialects


def _all_pages(session, owner, **query) -> tuple[list[str], int]:  # noqa: ANN001
    ids, cursor = [], None
    while True:
        with session.begin():
            listing = job_listing.list_jobs(session=session, owner=owner, limit=2, cursor=cursor,
                                            **query)
        ids += [job.id for job in listing.jobs]
        cursor = listing.next_cursor
        if cursor is None:
            return ids, listing.total


def _set(session, job_id: str, **values) -> None:  # noqa: ANN001
    with session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(**values)
                        .execution_options(synchronize_session=False))


def test_default_list_is_newest_first_by_id_cursor_and_filters_status(session, alice, bob):
    ids = [submit(session, alice).id for _ in range(5)]
    submit(session, bob)
    assert _all_pages(session, alice) == (ids[::-1], 5)
    assert _all_pages(session, alice, order="asc") == (ids, 5)
    with session.begin():
        job_store.request_cancel(session=session, job_id=ids[1], owner=alice)
    assert _all_pages(session, alice, statuses=["cancelled"]) == ([ids[1]], 1)
    assert _all_pages(session, alice, statuses=["cancelled", "queued"])[1] == 5


def test_sort_by_latest_metric_pages_by_keyset_and_puts_jobs_without_it_last(session, alice):
    ids = [submit(session, alice).id for _ in range(5)]
    losses = {ids[0]: 0.5, ids[1]: 0.1, ids[2]: 0.5, ids[3]: None}  # ids[4]: never logged
    with session.begin():
        for job_id, loss in losses.items():
            if loss is not None:  # an earlier step's value is not the latest
                job_store.add_metrics(session=session, job_id=job_id,
                                      rows=[(1, "val/loss", 9.0), (2, "val/loss", loss)])
        job_store.add_metrics(session=session, job_id=ids[3], rows=[(1, "train/loss", 1.0)])
    assert _all_pages(session, alice, sort="metric:val/loss", order="asc") == (
        [ids[1], ids[0], ids[2], ids[3], ids[4]], 5)  # ties and the missing by id
    assert _all_pages(session, alice, sort="metric:val/loss", order="desc") == (
        [ids[2], ids[0], ids[1], ids[4], ids[3]], 5)
    with session.begin():
        listing = job_listing.list_jobs(session=session, owner=alice, sort="metric:val/loss",
                                        order="asc", limit=1)
    assert listing.latest_metrics == {ids[1]: {"val/loss": 0.1}}
    with session.begin():
        assert job_listing.latest_metrics(session=session, job_ids=[ids[3], ids[4]]) == {
            ids[3]: {"train/loss": 1.0}, ids[4]: {}}


def test_sort_by_spec_parameter_name_and_duration(session, alice):
    rates = [0.3, 0.001, 0.1]
    ids = [submit(session, alice, algorithm={"name": "maml", "inner_lr": rate}).id
           for rate in rates]
    reptile = submit(session, alice, algorithm={"name": "reptile"}, name="a-reptile").id
    by_rate = [ids[1], reptile, ids[2], ids[0]]  # reptile's inner_lr: 0.01 by default
    assert _all_pages(session, alice, sort="param:algorithm.inner_lr", order="asc") == (
        by_rate, 4)
    assert _all_pages(session, alice, sort="param:algorithm.inner_lr", order="desc")[0] == (
        by_rate[::-1])
    assert _all_pages(session, alice, sort="param:algorithm.first_order", order="desc")[0] == (
        ids[::-1] + [reptile])  # reptile has no first_order: last
    assert _all_pages(session, alice, sort="name", order="asc")[0][0] == reptile
    start = utcnow() - timedelta(hours=1)
    for job_id, minutes in zip(ids, (5, 30, 1)):
        _set(session, job_id, started_at=start, finished_at=start + timedelta(minutes=minutes))
    assert _all_pages(session, alice, sort="duration", order="desc") == (
        [ids[1], ids[0], ids[2], reptile], 4)
    assert _all_pages(session, alice, algorithm="reptile") == ([reptile], 1)
    assert _all_pages(session, alice, family="sine")[1] == 4
    assert _all_pages(session, alice, family="omniglot") == ([], 0)


def test_sweep_trials_fold_under_their_driver_with_a_trial_count(session, alice):
    driver, plain = submit(session, alice).id, submit(session, alice).id
    trials = [submit(session, alice).id for _ in range(3)]
    with session.begin():
        session.add(Sweep(id="sw_" + "0" * 26, owner_id=alice.id, name="s", config={},
                          config_hash="0" * 64, driver_job_id=driver))
    for trial in trials:
        _set(session, trial, sweep_id="sw_" + "0" * 26)
    assert _all_pages(session, alice) == ([plain, driver], 2)
    assert _all_pages(session, alice, trials="only") == (trials[::-1], 3)
    assert _all_pages(session, alice, trials="show")[1] == 5
    assert _all_pages(session, alice, sweep_id="sw_" + "0" * 26) == (trials[::-1], 3)
    with session.begin():
        listing = job_listing.list_jobs(session=session, owner=alice)
    assert listing.driven_sweeps == {driver: ("sw_" + "0" * 26, 3)}


def test_bad_sort_order_status_or_cursor_is_refused_naming_it(session, alice):
    submit(session, alice), submit(session, alice)
    for query, field in (({"sort": "colour"}, "sort"), ({"sort": "param:a..b"}, "sort"),
                         ({"sort": "metric:"}, "sort"), ({"order": "up"}, "order"),
                         ({"trials": "hide"}, "trials")):
        with pytest.raises(InvalidListQuery) as raised, session.begin():
            job_listing.list_jobs(session=session, owner=alice, **query)
        assert raised.value.field == field
    with pytest.raises(InvalidListQuery) as raised:
        job_listing.parse_statuses(["queued,paused"])
    assert raised.value.field == "status"
    with session.begin():
        by_name = job_listing.list_jobs(session=session, owner=alice, sort="name", limit=1)
    for query in ({"sort": "name", "order": "asc"}, {"sort": "status"}, {}):
        with pytest.raises(InvalidCursor), session.begin():
            job_listing.list_jobs(session=session, owner=alice, cursor=by_name.next_cursor,
                                  **query)
    with pytest.raises(InvalidCursor), session.begin():
        job_listing.list_jobs(session=session, owner=alice, sort="name", cursor="garbage!")
    with pytest.raises(InvalidCursor), session.begin():
        job_listing.list_jobs(session=session, owner=alice, cursor="not a cursor!")


def test_changed_jobs_follow_updates_in_order(session, alice):
    first, second = submit(session, alice).id, submit(session, alice).id
    with session.begin():
        [newest] = job_listing.changed_jobs(session=session, owner=alice, after=None, newest=1)
        mark = (newest.updated_at, newest.id)
        assert [job.id for job in job_listing.changed_jobs(session=session, owner=alice,
                                                           after=None)] == [first, second]
        assert job_listing.changed_jobs(session=session, owner=alice, after=mark) == []
    with session.begin():
        job_store.request_cancel(session=session, job_id=first, owner=alice)
    with session.begin():
        changed = job_listing.changed_jobs(session=session, owner=alice, after=mark)
    assert [(job.id, job.status) for job in changed] == [(first, JobStatus.CANCELLED.value)]
