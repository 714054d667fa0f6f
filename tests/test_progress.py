"""Progress lines for logs nobody watches live (expansion.progress)."""

from __future__ import annotations

import logging

import pytest

from expansion.progress import ProgressLog, duration


@pytest.mark.parametrize(
    "seconds, text", [(4.25, "4.2 s"), (42, "42 s"), (185, "3 min 05 s"), (3725, "1 h 02 min"), (-1, "0.0 s")]
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_lines_are_throttled_but_the_first_and_last_always_come(caplog):
    now = [0.0]
    progress = ProgressLog("fit", 100, "steps", logging.getLogger("t"), every=30, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="t"):
        for step in range(1, 101):
            now[0] = step * 1.0  # one step per second
            progress.update(step, f"loss {1 / step:.3f}")
    lines = [r.getMessage() for r in caplog.records]
    # step 1, then every 30 s (31, 61, 91), then the last
    assert [line.split(":")[1].split("/")[0].strip() for line in lines] == ["1", "31", "61", "91", "100"]
    assert lines[1] == "fit: 31/100 steps (31%), loss 0.032, 1.0 steps/s, 31 s, ETA 1 min 09 s"
    assert lines[-1] == "fit: 100/100 steps (100%), loss 0.010, 1.0 steps/s, 1 min 40 s (done)"
