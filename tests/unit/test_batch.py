"""zlink._batch, without sockets: batch sizing, forming, splitting, decoding, window accounting.

A :class:`MapPlan` is driven here the way ``Client._map`` drives it, with plain
:class:`concurrent.futures.Future` objects standing in for task futures (a
``tid`` attribute and, for results, ``_nbytes``) and a fake node that answers a
batch payload the way ``Node._execute_batch`` does.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zlink import _batch as B
from zlink import protocol as P
from zlink.errors import (
    RejectedError,
    RemoteError,
    RemoteProtocolError,
    TaskCancelled,
    TaskLost,
    TaskTimeout,
)
from zlink.protocol import Outcome

pytestmark = pytest.mark.timeout(60)

LIMIT = 16 * 1024 * 1024 - 4096  # what a client with the default message size passes


# --------------------------------------------------------------------------- helpers

_tids = itertools.count(1)


def fake_future() -> cf.Future[Any]:
    fut: cf.Future[Any] = cf.Future()
    fut.tid = next(_tids).to_bytes(16, "big")  # type: ignore[attr-defined]
    return fut


def calls_of(items: Iterable[Any], skill: str = "s") -> Iterator[tuple[str, tuple[Any, ...]]]:
    return ((skill, (x,)) for x in items)


def plan_for(
    items: Iterable[Any],
    *,
    window: int = 1000,
    ordered: bool = True,
    batch: int | None = None,
    timeout: float | None = None,
    limit: int = LIMIT,
    skill: str = "s",
) -> B.MapPlan:
    return B.MapPlan(calls_of(items, skill), window=window, ordered=ordered, batch=batch, timeout=timeout, limit=limit)


def submit(batches: list[B.Batch]) -> list[B.Batch]:
    """What Client._submit_batch does, minus the sending: a future per batch."""
    for b in batches:
        b.future = fake_future()
    return batches


def node_answer(b: B.Batch, fn: Callable[..., Any], *, seconds_per_item: float = 1e-6) -> None:
    """Answer a submitted batch as a node would (the payload is read before the client drops it)."""
    call = P.unpack_value(b.payload)
    if type(call) is list:  # batch=1: a plain task [args]
        value: Any = fn(b.skill, *call[0])
    else:
        items, _t = B.parse_batch(call)
        outs = [[B.ITEM_OK, fn(b.skill, *args)] for args in items]
        value = [seconds_per_item * len(items), outs]
    payload = P.pack_value(value)
    b.future._nbytes = len(payload)
    b.future.set_result(P.unpack_value(payload))


def square(_skill: str, x: int) -> int:
    return x * x


def batch_result(b: B.Batch, outs: list[list[Any]], seconds: float = 0.001, nbytes: int = 0) -> None:
    b.future._nbytes = nbytes
    b.future.set_result([seconds, outs])


# --------------------------------------------------------------------------- outcome_error


def test_outcome_error_maps_every_final_status() -> None:
    tid = bytes.fromhex("ab" * 16)
    err = B.outcome_error(Outcome.ERROR, ["ValueError", "bad x", "Traceback...", "node-a"], tid)
    assert isinstance(err, RemoteError)
    assert (err.remote_type, err.remote_message, err.remote_traceback, err.node) == (
        "ValueError", "bad x", "Traceback...", "node-a",
    )  # fmt: skip
    assert err.task_id == tid.hex()
    assert "node-a" in str(err)

    old = B.outcome_error(Outcome.ERROR, ["KeyError", "k", "tb"], tid)  # no node name
    assert isinstance(old, RemoteError) and old.node is None and old.remote_type == "KeyError"

    for unreadable in (None, 3, ["only-a-type"], {"a": 1}):
        e = B.outcome_error(Outcome.ERROR, unreadable, tid)
        assert isinstance(e, RemoteError) and e.remote_type == "UnknownError", unreadable

    t = B.outcome_error(Outcome.TIMEOUT, "over 2 s", tid)
    assert isinstance(t, TaskTimeout) and str(t) == "over 2 s" and t.task_id == tid.hex()
    assert str(B.outcome_error(Outcome.TIMEOUT, None, tid)) == "task timed out"
    lost = B.outcome_error(Outcome.LOST, b"not text", tid)
    assert isinstance(lost, TaskLost) and str(lost) == "task lost"
    c = B.outcome_error(Outcome.CANCELLED, "by the client", tid)
    assert isinstance(c, TaskCancelled) and str(c) == "by the client"
    r = B.outcome_error(Outcome.REJECTED, "no such skill", tid)
    assert isinstance(r, RejectedError) and r.code == "rejected" and "no such skill" in str(r)


# --------------------------------------------------------------------------- node side


def test_parse_batch_accepts_the_documented_payload() -> None:
    items, t = B.parse_batch({"batch": [[1], [2, 3], []], "t": None})
    assert items == [[1], [2, 3], []] and t is None
    assert B.parse_batch({"batch": [[1]]}) == ([[1]], None)  # "t" may be absent
    items, t = B.parse_batch({"batch": [[1]], "t": 2})
    assert t == 2.0 and type(t) is float
    assert B.parse_batch({"batch": [[1]], "t": 0.25})[1] == 0.25


@pytest.mark.parametrize(
    "call",
    [
        {},
        {"batch": None},
        {"batch": []},
        {"batch": [1, 2]},
        {"batch": [[1], (2,)]},
        {"batch": "xx"},
        {"batch": [[1]], "t": 0},
        {"batch": [[1]], "t": -1.0},
        {"batch": [[1]], "t": "1"},
        {"batch": [[1]], "t": True},
        {"batch": [[1]], "t": [1]},
    ],
)
def test_parse_batch_rejects_malformed_payloads(call: dict[Any, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        B.parse_batch(call)
    assert info.value.code == "bad-payload"


def test_pack_batch_result_roundtrips_and_isolates_an_unpackable_item() -> None:
    outs = [[B.ITEM_OK, 1], [B.ITEM_ERROR, ["ValueError", "m", "tb", "n"]], [B.ITEM_TIMEOUT, "slow"]]
    assert P.unpack_value(B.pack_batch_result(0.5, [list(o) for o in outs], lambda e: ["never"])) == [0.5, outs]

    seen: list[BaseException] = []

    def error_value(exc: BaseException) -> list[str]:
        seen.append(exc)
        return [type(exc).__name__, str(exc), "", "node-x"]

    mixed = [[B.ITEM_OK, "a"], [B.ITEM_OK, {1, 2}], [B.ITEM_OK, [1, object()]], [B.ITEM_OK, None]]
    seconds, back = P.unpack_value(B.pack_batch_result(0.25, mixed, error_value))
    assert seconds == 0.25
    assert back[0] == [B.ITEM_OK, "a"]
    assert back[3] == [B.ITEM_OK, None]
    for bad in (back[1], back[2]):
        assert bad[0] == B.ITEM_ERROR
        assert bad[1][0] == "TypeError" and "msgpack" in bad[1][1] and bad[1][3] == "node-x"
    assert len(seen) == 2 and all(isinstance(e, TypeError) for e in seen)


# --------------------------------------------------------------------------- Sizer


def test_sizer_starts_unmeasured_at_one_item() -> None:
    s = B.Sizer(1000, None)
    assert not s.measured and s.size() == 1
    assert s.cap == 250  # window // 4
    assert B.Sizer(100_000, None).cap == B.MAX_ITEMS
    assert B.Sizer(3, None).cap == 1 and B.Sizer(1, None).cap == 1


def test_sizer_grows_to_the_target_time_within_the_caps() -> None:
    s = B.Sizer(100_000, None)
    s.observe(1e-6 * 10, 10, 0)  # 1 us per item: as many as allowed
    assert s.measured and s.size() == B.MAX_ITEMS
    s = B.Sizer(100_000, None)
    s.observe(0.0, 5, 0)  # a zero time (a coarse clock) must not divide by zero
    assert s.size() == B.MAX_ITEMS
    s = B.Sizer(100_000, None)
    s.observe(0.001 * 4, 4, 0)  # 1 ms per item: 2 ms per batch -> 2 items
    assert s.size() == 2
    s = B.Sizer(100_000, None)
    s.observe(0.02, 1, 0)  # slower than the target: one item per task
    assert s.size() == 1
    s = B.Sizer(100_000, None)
    s.observe(-1.0, 1, 0)  # a negative time counts as zero
    assert s.per_item_s == 0.0 and s.size() == B.MAX_ITEMS
    s = B.Sizer(40, None)
    s.observe(1e-7, 1, 0)
    assert s.size() == 10  # window // 4


def test_sizer_caps_by_result_bytes() -> None:
    s = B.Sizer(100_000, None)
    s.observe(1e-6, 1, 10_000)  # 10 kB per item: about 1 MiB per batch
    assert s.size() == B.BATCH_BYTES // 10_000
    s = B.Sizer(100_000, None)
    s.observe(1e-6, 1, 4 * B.BATCH_BYTES)  # one item over the byte budget: still one
    assert s.size() == 1


def test_sizer_follows_new_measurements_smoothly() -> None:
    s = B.Sizer(100_000, None)
    s.observe(0.004, 4, 400)  # 1 ms, 100 B per item
    s.observe(0.0, 4, 0)
    assert s.per_item_s == pytest.approx(0.00075)
    assert s.per_item_bytes == pytest.approx(75.0)
    assert s.size() == 2  # 2 ms / 0.75 ms


def test_sizer_fixed_size_ignores_timing() -> None:
    s = B.Sizer(1000, 7)
    assert s.measured and s.size() == 7
    s.observe(10.0, 1, 10**9)
    assert s.size() == 7


# --------------------------------------------------------------------------- MapPlan: forming batches


def test_bad_window_or_batch_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        plan_for(range(3), window=0)
    for bad in (0, -1, B.MAX_ITEMS + 1):
        with pytest.raises(ValueError):
            plan_for(range(3), batch=bad)
    plan_for(range(3), batch=B.MAX_ITEMS)  # the largest allowed


def test_probe_phase_sends_single_items_then_waits_for_a_timing() -> None:
    plan = plan_for(range(10_000), window=1000)
    first = submit(plan.take())
    assert len(first) == B.PROBE
    assert all(len(b.calls) == 1 for b in first)
    assert [b.calls[0] for b in first] == [(i,) for i in range(B.PROBE)]
    # the probes use the batch payload, so the node reports its time per item
    assert P.unpack_value(first[0].payload) == {"batch": [[0]], "t": None}
    assert plan.outstanding == B.PROBE and not plan.exhausted
    assert plan.take() == []  # no timing yet: nothing more, even with room in the window

    # an item consumed from a failed probe gives no timing: still waiting
    first[0].future.set_exception(TaskLost("lost"))
    assert plan.decode(first[0]) == [(False, first[0].future.exception())]
    plan.consumed()
    assert plan.take() == []

    # the first timing (1 us per item) opens the window, with batches of window // 4
    node_answer(first[1], square, seconds_per_item=1e-6)
    assert plan.decode(first[1]) == [(True, 1)]
    plan.consumed()
    assert plan.sizer.measured
    room = 1000 - plan.outstanding
    grown = submit(plan.take())
    assert sum(len(b.calls) for b in grown) == room
    assert [len(b.calls) for b in grown] == [250, 250, room - 500]
    assert grown[0].calls[0] == (B.PROBE,)  # consecutive input items
    assert plan.outstanding == 1000


def test_probe_is_bounded_by_a_small_window() -> None:
    plan = plan_for(range(1000), window=10)
    first = plan.take()
    assert len(first) == 10 and all(len(b.calls) == 1 for b in first)


def test_batch_sizes_follow_the_measured_time_per_item() -> None:
    plan = plan_for(range(100_000), window=100_000)
    probes = submit(plan.take())
    node_answer(probes[0], square, seconds_per_item=0.0005)  # 0.5 ms: 4 items make 2 ms
    plan.decode(probes[0])
    plan.consumed()
    grown = plan.take()
    assert {len(b.calls) for b in grown[:-1]} == {4}


def test_window_bounds_batches_waits_for_room_for_a_whole_batch() -> None:
    plan = plan_for(range(100), window=40, batch=10)
    bs = submit(plan.take())
    assert [len(b.calls) for b in bs] == [10, 10, 10, 10]
    assert plan.outstanding == 40 and plan.take() == []
    node_answer(bs[0], square)
    plan.decode(bs[0])
    for k in range(9):  # 9 items consumed: room 9 < 10, nothing to send yet
        plan.consumed()
        assert plan.take() == [], k
    plan.consumed()
    more = plan.take()
    assert [len(b.calls) for b in more] == [10]
    assert more[0].calls[0] == (40,)


def test_fixed_batch_larger_than_the_window_sends_what_fits() -> None:
    plan = plan_for(range(20), window=5, batch=100)
    bs = submit(plan.take())
    assert [len(b.calls) for b in bs] == [5]
    assert plan.take() == []  # outstanding: waits
    node_answer(bs[0], square)
    plan.decode(bs[0])
    plan.consumed(5)
    assert [len(b.calls) for b in plan.take()] == [5]


def test_fixed_batch_payload_carries_the_per_item_timeout() -> None:
    plan = plan_for(range(10), batch=4, timeout=1.5)
    bs = plan.take()
    assert [len(b.calls) for b in bs] == [4, 4, 2]
    assert P.unpack_value(bs[0].payload) == {"batch": [[0], [1], [2], [3]], "t": 1.5}
    assert [plan.batch_timeout(b) for b in bs] == [6.0, 6.0, 3.0]
    one = plan_for(range(1), batch=4, timeout=1.5).take()[0]
    assert plan.batch_timeout(one) == 1.5
    assert plan_for(range(3), batch=2).batch_timeout(bs[0]) is None
    huge = plan_for(range(4), batch=4, timeout=1e9)
    assert huge.batch_timeout(huge.take()[0]) == 1e7


def test_batch_one_sends_plain_tasks() -> None:
    plan = plan_for(range(5), batch=1, timeout=2.0)
    bs = submit(plan.take())
    assert len(bs) == 5
    assert [P.unpack_value(b.payload) for b in bs] == [[[i]] for i in range(5)]
    assert all(plan.batch_timeout(b) == 2.0 for b in bs)
    bs[2].future.set_result({"any": "value"})  # a plain task's result is the item's result
    assert plan.decode(bs[2]) == [(True, {"any": "value"})]
    assert not plan.sizer.per_item_s  # nothing to measure


def test_multi_skill_calls_are_grouped_per_skill_and_read_in_input_order() -> None:
    skills = ["a", "b", "c"]
    calls = ((skills[i % 3], (i,)) for i in range(12))
    plan = B.MapPlan(calls, window=1000, ordered=True, batch=4, timeout=None, limit=LIMIT)
    bs = plan.take()
    assert sorted((b.skill, [c[0] for c in b.calls]) for b in bs) == [
        ("a", [0, 3, 6, 9]), ("b", [1, 4, 7, 10]), ("c", [2, 5, 8, 11]),
    ]  # fmt: skip
    order = []
    while (cell := plan.next_cell()) is not None:
        b, i = cell
        order.append((b.skill, b.calls[i][0]))
    assert order == [(skills[i % 3], i) for i in range(12)]


def test_a_partial_batch_per_skill_is_sent_at_the_end_of_a_take() -> None:
    calls = iter([("a", (1,)), ("a", (2,)), ("b", (3,)), ("a", (4,)), ("b", (5,))])
    plan = B.MapPlan(calls, window=1000, ordered=False, batch=2, timeout=None, limit=LIMIT)
    bs = plan.take()
    assert [(b.skill, b.calls) for b in bs] == [("a", [(1,), (2,)]), ("b", [(3,), (5,)]), ("a", [(4,)])]
    assert plan.exhausted and plan.outstanding == 5
    assert plan.next_cell() is None  # unordered: no cells


# --------------------------------------------------------------------------- MapPlan: splitting by size


@pytest.mark.parametrize("ordered", [True, False])
def test_a_payload_over_the_limit_is_split_in_halves(ordered: bool) -> None:
    items = ["x" * 100 for _ in range(16)]
    plan = B.MapPlan(
        ((("s", (f"{i}{s}",)) for i, s in enumerate(items))),
        window=1000, ordered=ordered, batch=16, timeout=None, limit=600,
    )  # fmt: skip
    bs = plan.take()
    assert all(len(b.payload) <= 600 for b in bs)
    assert [len(b.calls) for b in bs] == [4, 4, 4, 4]  # 16 -> 8 + 8 -> 4 + 4 + 4 + 4
    assert [c for b in bs for c in b.calls] == [(f"{i}{s}",) for i, s in enumerate(items)]
    if ordered:  # every cell points at its item after the splits
        got = []
        while (cell := plan.next_cell()) is not None:
            b, i = cell
            got.append(b.calls[i])
        assert got == [(f"{i}{s}",) for i, s in enumerate(items)]


def test_a_batch_over_the_batch_byte_budget_is_split_even_below_the_limit() -> None:
    blob = b"z" * (300 * 1024)
    plan = B.MapPlan((("s", (blob,)) for _ in range(8)), window=1000, ordered=False, batch=8, timeout=None, limit=LIMIT)
    bs = plan.take()
    assert all(len(b.payload) <= B.BATCH_BYTES for b in bs)
    assert sum(len(b.calls) for b in bs) == 8 and len(bs) > 1


@pytest.mark.parametrize("batch", [None, 1, 8])
def test_a_single_item_over_the_limit_is_rejected_as_too_large(batch: int | None) -> None:
    plan = B.MapPlan(
        iter([("s", ("small",)), ("s", ("y" * 2000,))]),
        window=1000, ordered=True, batch=batch, timeout=None, limit=1000,
    )  # fmt: skip
    with pytest.raises(RejectedError) as info:
        plan.take()
    assert info.value.code == "too-large"


# --------------------------------------------------------------------------- MapPlan: decoding


def test_decode_reads_ok_error_and_timeout_items() -> None:
    plan = plan_for(range(3), batch=3)
    (b,) = submit(plan.take())
    tid = b.future.tid
    batch_result(
        b,
        [[B.ITEM_OK, 0], [B.ITEM_ERROR, ["pkg.Boom", "item 1", "Traceback", "node-a"]], [B.ITEM_TIMEOUT, "over 1 s"]],
        seconds=0.003,
        nbytes=300,
    )
    outs = plan.decode(b)
    assert outs[0] == (True, 0)
    ok, err = outs[1]
    assert not ok and isinstance(err, RemoteError)
    assert (err.remote_type, err.remote_message, err.node, err.task_id) == ("pkg.Boom", "item 1", "node-a", tid.hex())
    ok, t = outs[2]
    assert not ok and isinstance(t, TaskTimeout) and str(t) == "over 1 s" and t.task_id == tid.hex()
    assert plan.decode(b) is outs  # decoded once
    assert b not in plan.live
    assert b.calls == []  # the arguments are dropped once decoded


def test_decode_measures_time_and_bytes_per_item() -> None:
    plan = plan_for(range(4))
    (b, *_rest) = submit(plan.take())
    batch_result(b, [[B.ITEM_OK, None]], seconds=0.0001, nbytes=50)
    plan.decode(b)
    assert plan.sizer.per_item_s == pytest.approx(0.0001)
    assert plan.sizer.per_item_bytes == pytest.approx(50)


def test_decode_of_a_failed_future_fails_every_item_with_its_error() -> None:
    plan = plan_for(range(5), batch=5)
    (b,) = submit(plan.take())
    boom = RemoteError("MemoryError", "whole batch", task_id=b.future.tid.hex())
    b.future.set_exception(boom)
    assert plan.decode(b) == [(False, boom)] * 5
    assert not plan.sizer.per_item_s


def test_decode_of_a_cancelled_future_is_task_cancelled_per_item() -> None:
    plan = plan_for(range(3), batch=3)
    (b,) = submit(plan.take())
    assert b.future.cancel()
    outs = plan.decode(b)
    assert len(outs) == 3
    assert all(not ok and isinstance(e, TaskCancelled) for ok, e in outs)


@pytest.mark.parametrize(
    "value",
    [
        "not a batch result",
        None,
        7,
        [0.001],
        [0.001, [[0, 1], [0, 2]], "extra"],
        [0.001, [[0, 1], [0, 2]]],  # two outcomes for three items
        [0.001, [[0, 1], [0, 2], [0, 3], [0, 4]]],  # four
        ["slow", [[0, 1], [0, 2], [0, 3]]],  # seconds not a number
        [0.001, "abc"],
        [0.001, [[0, 1], [0], [0, 3]]],  # an outcome without a value
        [0.001, [[0, 1], 5, [0, 3]]],
        {"seconds": 1, "outs": 2},
    ],
)
def test_decode_of_a_malformed_batch_result_fails_each_item_with_a_protocol_error(value: Any) -> None:
    plan = plan_for(range(3), batch=3)
    (b,) = submit(plan.take())
    b.future.set_result(value)
    outs = plan.decode(b)
    assert len(outs) == 3
    for ok, e in outs:
        assert not ok and isinstance(e, RemoteProtocolError) and e.code == "bad-payload"
        assert b.future.tid.hex() in str(e)
    assert plan.sizer.per_item_s is None  # no timing from garbage


# --------------------------------------------------------------------------- cancel and accounting


def test_cancel_all_cancels_only_what_is_still_live() -> None:
    plan = plan_for(range(30), batch=10)
    bs = submit(plan.take())
    node_answer(bs[0], square)
    plan.decode(bs[0])
    plan.cancel_all()
    assert plan.live == set()
    assert not bs[0].future.cancelled()
    assert bs[1].future.cancelled() and bs[2].future.cancelled()
    # a batch taken but not (yet) submitted has no future: skipped
    plan2 = plan_for(range(3), batch=3)
    plan2.take()
    plan2.cancel_all()
    assert plan2.live == set()


def test_window_accounting_outstanding_and_finished() -> None:
    plan = plan_for(range(4), window=4, batch=2)
    assert not plan.finished and plan.outstanding == 0
    bs = submit(plan.take())
    assert [b.calls for b in bs] == [[(0,), (1,)], [(2,), (3,)]]
    # the window is full: the input was not read past it, so it is not known to be over
    assert plan.outstanding == 4 and not plan.exhausted and not plan.finished
    for b in bs:
        node_answer(b, square)
    assert [plan.decode(b) for b in bs] == [[(True, 0), (True, 1)], [(True, 4), (True, 9)]]
    plan.consumed(3)
    assert plan.outstanding == 1 and not plan.finished
    assert plan.take() == []  # room 3 >= 2 but the input is over
    assert plan.exhausted and not plan.finished  # one item not consumed yet
    plan.consumed()
    assert plan.outstanding == 0 and plan.finished
    assert plan.take() == []


def test_consumed_items_make_room_only_in_whole_batches() -> None:
    plan = plan_for(range(100), window=8, batch=4)
    bs = submit(plan.take())
    assert [len(b.calls) for b in bs] == [4, 4] and plan.outstanding == 8
    node_answer(bs[0], square)
    plan.decode(bs[0])
    plan.consumed(3)
    assert plan.take() == [] and plan.outstanding == 5  # room 3 < 4
    plan.consumed()
    nxt = plan.take()
    assert [b.calls for b in nxt] == [[(8,), (9,), (10,), (11,)]] and plan.outstanding == 8


def test_empty_input_is_finished_after_one_take() -> None:
    plan = plan_for([])
    assert plan.take() == [] and plan.finished and plan.next_cell() is None


# --------------------------------------------------------------------------- the property


def drive(
    plan: B.MapPlan,
    rng: random.Random,
    fn: Callable[..., Any],
    per_item_s: float,
    max_items: int,
) -> list[Any]:
    """Run a plan the way Client._map does, resolving futures in a random order."""
    unresolved: list[B.Batch] = []
    out: list[Any] = []

    def refill() -> None:
        for b in submit(plan.take()):
            assert 1 <= len(b.calls) <= max_items
            assert len(b.payload) <= plan.limit
            assert plan.outstanding <= plan.window
            unresolved.append(b)

    def resolve_some() -> None:
        assert unresolved, "the plan waits for a batch that was never sent"
        b = unresolved.pop(rng.randrange(len(unresolved)))
        node_answer(b, fn, seconds_per_item=per_item_s)

    refill()
    if plan.ordered:
        while (cell := plan.next_cell()) is not None:
            b, i = cell
            while not b.future.done():
                resolve_some()
            ok, value = plan.decode(b)[i]
            assert ok
            plan.consumed()
            refill()
            out.append(value)
        assert plan.finished
    else:
        while not plan.finished:
            resolve_some()
            for b in [b for b in list(plan.live) if b.future.done()]:
                for ok, value in plan.decode(b):
                    assert ok
                    plan.consumed()
                    out.append(value)
                    refill()
    assert not unresolved
    assert plan.live == set()
    return out


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(0, 1500),
    window=st.integers(1, 1200),
    batch=st.one_of(st.none(), st.integers(1, 40), st.just(B.MAX_ITEMS)),
    ordered=st.booleans(),
    skills=st.integers(1, 3),
    per_item_s=st.sampled_from([0.0, 1e-6, 1e-4, 7e-4, 0.003]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_plan_yields_each_input_result_once(
    n: int, window: int, batch: int | None, ordered: bool, skills: int, per_item_s: float, seed: int
) -> None:
    names = [f"s{k}" for k in range(skills)]
    calls = ((names[i % skills], (i,)) for i in range(n))

    def fn(skill: str, x: int) -> list[Any]:
        return [skill, x * 3]

    plan = B.MapPlan(calls, window=window, ordered=ordered, batch=batch, timeout=None, limit=LIMIT)
    max_items = batch if batch is not None else max(1, min(B.MAX_ITEMS, window // 4))
    got = drive(plan, random.Random(seed), fn, per_item_s, max_items)
    want = [[names[i % skills], i * 3] for i in range(n)]
    if ordered:
        assert got == want
    else:
        assert Counter(map(tuple, got)) == Counter(map(tuple, want))


# --------------------------------------------------------------------------- results in parts, sizes per skill


def test_outcomes_sent_in_parts_are_assembled_in_order() -> None:
    plan = plan_for(range(300), batch=10)
    (b, *_rest) = submit(plan.take())
    b.add_part([0.001, [[B.ITEM_OK, 0], [B.ITEM_OK, 1], [B.ITEM_OK, 4]], 0])
    b.add_part([0.001, [[B.ITEM_OK, 9], [B.ITEM_OK, 16]], 3])
    b.add_part("garbage")  # ignored
    b.future.set_result([0.002, [[B.ITEM_OK, x * x] for x in range(5, 10)], 5])
    assert plan.decode(b) == [(True, x * x) for x in range(10)]


def test_a_missing_part_fails_every_item_of_the_batch() -> None:
    plan = plan_for(range(300), batch=10)
    (b, *_rest) = submit(plan.take())
    b.add_part([0.001, [[B.ITEM_OK, 0]], 0])  # items 1-4 never came
    b.future.set_result([0.002, [[B.ITEM_OK, x * x] for x in range(5, 10)], 5])
    outs = plan.decode(b)
    assert len(outs) == 10 and all(not ok and isinstance(e, RemoteProtocolError) for ok, e in outs)


def test_each_skill_gets_its_own_batch_size() -> None:
    calls = iter([(("slow" if i % 2 else "fast"), (i,)) for i in range(4000)])
    plan = B.MapPlan(calls, window=4000, ordered=True, batch=None, timeout=None, limit=LIMIT)
    probe = submit(plan.take())
    for b in probe:
        per_item = 0.01 if b.skill == "slow" else 1e-6
        batch_result(b, [[B.ITEM_OK, 0]] * len(b.calls), seconds=per_item * len(b.calls))
        plan.decode(b)
    plan.consumed(sum(len(b.outcomes or ()) for b in probe))
    sizes = {b.skill: len(b.calls) for b in submit(plan.take())}
    assert sizes["slow"] == 1  # 10 ms per item: one item per task
    assert sizes["fast"] > 100  # 1 us per item: large batches
