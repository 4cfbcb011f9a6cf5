"""The engine's time share between serving steps and training slices."""

from __future__ import annotations

import time

import pytest

from loraserve.engine.timeshare import TimeShare


def test_side_work_takes_everything_while_nothing_is_served() -> None:
    share = TimeShare(0.3)
    share.add_side(100.0)
    assert share.side_due(serving_busy=False)


def test_while_serving_side_work_stays_within_its_share() -> None:
    share = TimeShare(0.3, half_life=1e9)  # no decay: plain sums
    assert share.side_due(serving_busy=True)  # nothing measured yet
    share.add_side(0.3)
    assert not share.side_due(serving_busy=True)  # 100% side so far
    share.add_serving(0.5)
    assert not share.side_due(serving_busy=True)  # 0.3 / 0.8 = 37.5% > 30%
    share.add_serving(0.25)
    assert share.side_due(serving_busy=True)  # 0.3 / 1.05 = 28.6% < 30%


def test_a_loop_of_slices_and_steps_converges_to_the_share() -> None:
    share = TimeShare(0.25, half_life=1e9)
    for _ in range(10_000):
        if share.side_due(serving_busy=True):
            share.add_side(0.02)  # one training slice
        else:
            share.add_serving(0.005)  # one serving step
    assert share.side_fraction == pytest.approx(0.25, abs=0.01)


def test_old_time_decays() -> None:
    share = TimeShare(0.5, half_life=1e-3)
    share.add_side(10.0)
    time.sleep(0.02)  # at least 20 half-lives
    share.add_serving(0.0)  # decays the sums to the present
    assert share.side < 10 * 2**-20


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_the_share_must_be_a_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="share must be in"):
        TimeShare(bad)
