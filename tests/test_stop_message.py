"""Ctrl-C during `rmt train` says when the current step will end (from the step times so far) and what happens then."""

import logging
import signal
import time

from rmt.trainer import _StopFlag, stop_message


def test_stop_message_by_hand():
    msg = stop_message([10.0, 20.0], 5.0)  # mean 15 s, 5 s run: about 10 s left
    assert msg.startswith("interrupt received: the current step should end in about 10 s (a step takes 15 s on average here)")
    assert "checkpoint is saved" in msg and "Ctrl-C again" in msg
    # the mean of the last ten steps only: 1 step of 1000 s long ago does not count
    assert "in about 3 s (a step takes 4 s" in stop_message([1000.0] + [4.0] * 10, 1.0)
    assert "in about 2 min 00 s (a step takes 3 min 00 s" in stop_message([180.0], 60.0)
    assert "has run 30 s, longer than the 15 s a step takes on average here" in stop_message([15.0], 30.0)
    assert "the first step has run 7 s and no step has finished yet" in stop_message([], 7.0)
    assert stop_message([3.0], None).startswith("interrupt received: then a checkpoint is saved")


def test_ctrl_c_logs_the_estimate(caplog):
    flag = _StopFlag()
    flag.step_times = [40.0, 44.0]
    flag.step_started = time.perf_counter() - 12.0
    with caplog.at_level(logging.WARNING, logger="rmt.trainer"):
        flag._handler(signal.SIGINT, None)
    assert flag.requested and flag.signum == signal.SIGINT
    assert "should end in about 30 s (a step takes 42 s on average here)" in caplog.text
