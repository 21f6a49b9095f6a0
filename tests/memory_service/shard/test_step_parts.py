"""StepParts on its own: K workers' parts of one table step held until the step is complete, their
sum taken once, commits counted, and what a checkpoint stores put back into a fresh one."""
from __future__ import annotations

import time

import numpy as np
import pytest

from memory_service.errors import InvalidArgument, LimitReached, StepExpired
from memory_service.shard.step_parts import StepParts

WIDTH = 4


def part(seed: int, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, grads (n, WIDTH) float32)."""
    grads = np.random.default_rng(seed).standard_normal((len(ids), WIDTH)).astype(np.float32)
    return np.array(ids, np.int64), grads


def test_a_step_is_complete_once_every_contributor_sent_and_take_sums_the_parts():
    parts = StepParts()
    (a_ids, a), (b_ids, b) = part(0, [1, 3, 5]), part(1, [5, 7])
    parts.add_part("t", 2, "w0", 2, 0.1, a_ids, a)
    assert not parts.is_complete("t", 2)
    parts.add_part("t", 2, "w1", 2, 0.1, b_ids, b)
    assert parts.is_complete("t", 2) and not parts.is_complete("t", 3) and not parts.is_complete("u", 2)
    whole = parts.take("t", 2)
    assert whole.step == 2 and whole.lr == 0.1
    np.testing.assert_array_equal(whole.ids, [1, 3, 5, 7])  # distinct, sorted
    np.testing.assert_array_equal(whole.grads, np.stack([a[0], a[1], a[2] + b[0], b[1]]))  # id 5 summed
    assert parts.take("t", 2) is None and not parts.is_complete("t", 2)


def test_several_requests_of_one_client_count_as_one_contributor():
    parts = StepParts()
    for ids in ([0], [2]):  # rows moved under the client: its part came in two requests
        parts.check_part("t", 1, "w0", 2, None, is_whole=False)
        parts.add_part("t", 1, "w0", 2, None, *part(0, ids))
    assert not parts.is_complete("t", 1)
    with pytest.raises(InvalidArgument, match=r"table 't' step 1: client 'w0' already sent its part"):
        parts.check_part("t", 1, "w0", 2, None, is_whole=True)


@pytest.mark.parametrize("contributors, lr, message", [
    (3, 0.1, r"table 't' step 1: 3 contributors, but earlier parts said 2"),
    (2, 0.2, r"table 't' step 1: lr 0.2 differs from the earlier parts' 0.1"),
])
def test_a_part_that_disagrees_with_the_parts_held_is_refused(contributors, lr, message):
    parts = StepParts()
    parts.check_part("t", 1, "w0", 2, 0.1, is_whole=True)  # nothing held yet: anything goes
    parts.add_part("t", 1, "w0", 2, 0.1, *part(0, [0]))
    with pytest.raises(InvalidArgument, match=message):
        parts.check_part("t", 1, "w1", contributors, lr, is_whole=True)
    parts.check_part("t", 1, "w1", 2, 0.1, is_whole=True)
    parts.check_part("t", 2, "w1", contributors, lr, is_whole=True)  # another step: its own parts


def test_votes_count_distinct_clients_and_forget_ends_the_step():
    parts = StepParts()
    parts.add_part("t", 1, "w0", 2, None, *part(0, [0]))
    assert parts.vote("t", 1, "w0") == 1
    with pytest.raises(InvalidArgument, match=r"table 't' step 1: client 'w0' already committed"):
        parts.check_vote("t", 1, "w0")
    parts.check_vote("t", 1, "w1")
    assert parts.vote("t", 1, "w1") == 2
    parts.forget("t", 1)
    assert parts.take("t", 1) is None and list(parts.voters()) == []
    parts.check_vote("t", 1, "w0")  # its commits are forgotten too


def test_drop_table_forgets_that_table_only():
    parts = StepParts()
    for name in ("t", "u"):
        parts.add_part(name, 1, "w0", 2, None, *part(0, [0]))
        parts.vote(name, 1, "w0")
    parts.drop_table("t")
    assert [(n, s) for n, s, _ in parts.held()] == [("u", 1)]
    assert [(n, s, c) for n, s, c in parts.voters()] == [("u", 1, {"w0"})]


def test_what_held_and_voters_return_puts_a_fresh_one_in_the_same_state():
    parts, copy = StepParts(), StepParts()
    parts.add_part("t", 3, "w0", 3, 0.5, *part(0, [1, 2]))
    parts.add_part("t", 3, "w1", 3, 0.5, *part(1, [2, 4]))
    parts.vote("t", 3, "w0")
    for name, step, held in parts.held():
        copy.hold(name, step, held)
    for name, step, clients in parts.voters():
        for client in clients:
            copy.vote(name, step, client)
    with pytest.raises(InvalidArgument, match="already committed"):
        copy.check_vote("t", 3, "w0")
    for p in (parts, copy):
        p.add_part("t", 3, "w2", 3, 0.5, *part(2, [4]))
        assert p.is_complete("t", 3)
    a, b = parts.take("t", 3), copy.take("t", 3)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.grads, b.grads)


def test_bytes_held_are_counted_per_client_and_given_back_when_a_step_completes_or_expires():
    parts = StepParts(max_bytes=10_000, client_max_bytes=4_000, expiry_s=60.0)
    a, b = part(0, [1, 3, 5]), part(1, [5, 7])  # 3 * (8 + 16) = 72 and 48 bytes
    parts.add_part("t", 1, "w0", 2, None, *a)
    parts.add_part("t", 1, "w0", 2, None, *b)  # a second request of w0's part
    parts.add_part("t", 1, "w1", 2, None, *b)
    parts.add_part("t", 2, "w1", 2, None, *a)
    assert (parts.nbytes, parts.client_nbytes("w0"), parts.client_nbytes("w1"), len(parts)) == (240, 120, 120, 2)
    parts.take("t", 1)
    assert (parts.nbytes, parts.client_nbytes("w0"), parts.client_nbytes("w1"), len(parts)) == (72, 0, 72, 1)
    with pytest.raises(LimitReached, match="client 'w1'.*parts_client_max_bytes 4000"):
        parts.check_room("w1", 4_000 - 72 + 1, [("t", 3)])
    parts.check_room("w1", 4_000 - 72, [("t", 3)])
    assert parts.due(time.monotonic() + 59) == [] and parts.due(time.monotonic() + 61) == [("t", 2)]
    parts.expire_step("t", 2)
    assert (parts.nbytes, len(parts), parts.expired()) == (0, 0, [("t", 2)])
    with pytest.raises(StepExpired, match="table 't' step 2: its data-parallel parts expired"):
        parts.check_part("t", 2, "w0", 2, None, is_whole=True)
    with pytest.raises(StepExpired):
        parts.check_vote("t", 2, "w0")
    parts.drop_table("t")
    assert parts.expired() == []
