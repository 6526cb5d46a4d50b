"""The failed-authentication window that ``metaserve serve`` refuses addresses by
(:class:`metaserve.api.http_protocol.AuthFailures`): counted per address, refused from the
limit on until the window ends, forgotten after, bounded in the addresses it keeps."""

from metaserve.api.http_protocol import AuthFailures


def test_an_address_is_refused_from_its_limit_until_its_window_ends():
    failures = AuthFailures(limit=3, window_s=60.0)
    for _ in range(2):
        failures.record("10.0.0.1", now=100.0)
    assert failures.refused_for("10.0.0.1", now=101.0) == 0.0
    failures.record("10.0.0.1", now=102.0)
    assert failures.refused_for("10.0.0.1", now=110.0) == 50.0  # the window began at 100
    assert failures.refused_for("10.0.0.2", now=110.0) == 0.0
    assert failures.refused_for("10.0.0.1", now=160.0) == 0.0
    failures.record("10.0.0.1", now=161.0)  # a new window: one failure in it
    assert failures.refused_for("10.0.0.1", now=161.0) == 0.0


def test_a_limit_of_0_refuses_no_one():
    failures = AuthFailures(limit=0, window_s=60.0)
    for _ in range(100):
        failures.record("10.0.0.1", now=1.0)
    assert failures.refused_for("10.0.0.1", now=1.0) == 0.0


def test_the_addresses_kept_are_bounded():
    failures = AuthFailures(limit=1, window_s=60.0, max_addresses=100)
    for index in range(10_000):
        failures.record(f"10.0.{index // 256}.{index % 256}", now=float(index) / 1000)
    assert len(failures._windows) <= 100
    assert failures.refused_for("10.0.39.15", now=10.0) > 0  # the newest is still refused
