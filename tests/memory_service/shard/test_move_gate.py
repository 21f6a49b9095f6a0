"""MoveGate: a checkpoint's pause waits for the migration round in progress, stops new rounds,
lapses after its lease, and tells whether it held."""
import threading
import time

import pytest

from memory_service.errors import FailedPrecondition
from memory_service.shard.move_gate import MoveGate


def test_pause_waits_for_the_round_in_progress_and_skips_new_ones():
    gate = MoveGate()
    in_round, release, paused = threading.Event(), threading.Event(), threading.Event()

    def migrator_round():
        with gate.round() as free:
            assert free
            in_round.set()
            release.wait(10)

    mover = threading.Thread(target=migrator_round)
    mover.start()
    in_round.wait(10)
    pauser = threading.Thread(target=lambda: (gate.pause(lease_s=60, timeout_s=10), paused.set()))
    pauser.start()
    time.sleep(0.2)
    assert not paused.is_set()  # the round still moves rows: the pause waits for it
    release.set()
    mover.join(10)
    pauser.join(10)
    assert paused.is_set() and gate.paused
    with gate.round() as free:
        assert not free  # no round while paused
    assert gate.resume()  # no round began since the pause
    with gate.round() as free:
        assert free


def test_pause_times_out_while_a_round_holds_on():
    gate = MoveGate()
    with gate.round():
        with pytest.raises(FailedPrecondition, match="still moving rows"):
            gate.pause(lease_s=60, timeout_s=0.05)


def test_a_lapsed_lease_lets_rounds_run_and_resume_says_the_pause_did_not_hold():
    gate = MoveGate()
    gate.pause(lease_s=0.05, timeout_s=1)
    time.sleep(0.1)
    assert not gate.paused
    with gate.round() as free:
        assert free
    assert not gate.resume()  # a round ran during the "pause": a save across it is not trusted
    gate.pause(lease_s=0.05, timeout_s=1)
    time.sleep(0.1)
    assert gate.resume()  # lapsed, but nothing moved meanwhile


def test_pause_checks_its_arguments():
    with pytest.raises(ValueError, match="lease"):
        MoveGate().pause(lease_s=0, timeout_s=1)
