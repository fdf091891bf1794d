"""Per-key limits in the broker's scheduler: the task quota and the submission rate.

Pure: :class:`zlink.scheduler.Scheduler` is driven with a fake clock (plain
floats), fake peers and opaque payloads, in the style of test_scheduler.py
(its small helpers are copied here so the two files stay independent).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zlink import protocol as P
from zlink.protocol import Outcome
from zlink.scheduler import RATE_HEADROOM, Heartbeat, Identity, PeerMessage, Scheduler, SchedulerConfig, Send, Tick

EPOCH = b"epoch-42"
HB = 1.0
LIVENESS = 3
GRACE = HB * LIVENESS + 2 * HB  # a restarted broker holds resubmissions this long (node timeout + 2 beats)


def config(**kw: Any) -> SchedulerConfig:
    # rate_headroom 1.0: the exact token bucket (the default headroom has its own test)
    base: dict[str, Any] = {
        "heartbeat_interval": HB, "liveness": LIVENESS, "max_message_size": 1 << 20, "rate_headroom": 1.0,
    }  # fmt: skip
    return SchedulerConfig(**{**base, **kw})


class Payload:
    """An opaque payload frame: the scheduler must only carry it along."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        object.__setattr__(self, "label", label)

    def __repr__(self) -> str:
        return f"<Payload {self.label}>"

    def _touched(self, *_: Any) -> Any:
        raise AssertionError(f"the scheduler looked inside payload {self.label!r}")

    __eq__ = __hash__ = __bool__ = __len__ = __iter__ = __bytes__ = _touched  # type: ignore[assignment]


class Out(list[Send]):
    def results(self, route: bytes) -> list[tuple[P.ResultItem, Any]]:
        out: list[tuple[P.ResultItem, Any]] = []
        for s in self:
            if s.route == route and type(s.msg) is P.Result:
                out.extend(zip(s.msg.results, s.frames, strict=True))
        return out

    def rejected(self, route: bytes) -> dict[bytes, str]:
        """tid -> reason of every REJECTED outcome sent to ``route``."""
        return {i.tid: P.unpack_value(f) for i, f in self.results(route) if i.status == Outcome.REJECTED}

    def dispatched(self, route: bytes) -> list[bytes]:
        return [i.tid for s in self if s.route == route and type(s.msg) is P.Dispatch for i in s.msg.tasks]


class Sim:
    """A scheduler, a fake clock and shorthands for what peers send."""

    def __init__(self, cfg: SchedulerConfig, now: float = 0.0) -> None:
        self.s = Scheduler(epoch=EPOCH, config=cfg, now=now)
        self.now = now
        self._tids = itertools.count(1)

    def __call__(self, event: Any, now: float | None = None) -> Out:
        if now is not None:
            assert now >= self.now, "the fake clock only moves forward"
            self.now = now
        out = Out(self.s.handle(event, self.now))
        for send in out:  # all of it must survive the wire
            assert P.decode(P.encode(send.msg), len(send.frames)) == send.msg
        return out

    def hello(self, route: bytes, hat: str, key: str, **kw: Any) -> Out:
        msg = P.Hello(name="", role=hat, session=b"session-" + route, **kw)
        return self(PeerMessage(route, msg, identity=Identity(key, "name-" + key, hat)))

    def client(self, route: bytes, key: str | None = None) -> Out:
        return self.hello(route, "client", key or "key-" + route.decode())

    def node(self, route: bytes, slots: int = 1, skills: Iterable[str] = ("echo",)) -> Out:
        return self.hello(route, "node", "key-" + route.decode(), skills={s: {} for s in skills}, slots=slots)

    def submit(
        self, route: bytes, n: int = 1, *, resubmit: bool = False, timeout: float | None = None,
        now: float | None = None, tids: list[bytes] | None = None, skill: str = "echo",
    ) -> tuple[Out, list[bytes]]:  # fmt: skip
        tids = tids if tids is not None else [b"t%d" % next(self._tids) for _ in range(n)]
        specs = tuple(P.TaskSpec(t, skill, timeout) for t in tids)
        frames = [Payload(t.decode()) for t in tids]
        return self(PeerMessage(route, P.Submit(tasks=specs, resubmit=resubmit), frames), now), tids

    def result(self, route: bytes, tid: bytes, attempt: int = 1, now: float | None = None) -> Out:
        item = P.ResultItem(tid, attempt, Outcome.OK)
        return self(PeerMessage(route, P.Result(results=(item,)), [Payload("r-" + tid.decode())]), now)

    def cancel(self, route: bytes, *tids: bytes) -> Out:
        return self(PeerMessage(route, P.Cancel(tids=tids), []))

    def bye(self, route: bytes) -> Out:
        return self(PeerMessage(route, P.Bye(reason="done"), []))

    def tick(self, now: float) -> Out:
        return self(Tick(), now)

    def beat(self, route: bytes, now: float) -> Out:
        msg = P.Heartbeat(session=b"session-" + route, epoch=EPOCH)
        return self(Heartbeat("key-" + route.decode(), msg), now)


QUOTA = "quota: "
RATE = "rate limit: "


def accepted(out: Out, route: bytes, tids: list[bytes]) -> list[bytes]:
    refused = out.rejected(route)
    return [t for t in tids if t not in refused]


# --------------------------------------------------------------------------- quota


def test_the_quota_counts_all_sessions_of_one_key_together() -> None:
    sim = Sim(config(max_tasks_per_client=3, max_submit_rate=0))
    sim.client(b"a1", key="alice")
    sim.client(b"a2", key="alice")  # a second session of the same key
    sim.client(b"b1", key="bob")
    out, t1 = sim.submit(b"a1", 2)
    assert out.rejected(b"a1") == {}
    out, t2 = sim.submit(b"a2", 2)
    assert list(out.rejected(b"a2")) == [t2[1]]
    assert out.rejected(b"a1") == {}  # the refusal goes to the session that asked
    assert sim.s.key_tasks == {"alice": 3}
    # a third session of alice gets nothing either; bob has his own quota
    sim.client(b"a3", key="alice")
    out, t3 = sim.submit(b"a3", 1)
    assert list(out.rejected(b"a3")) == t3
    out, tb = sim.submit(b"b1", 3)
    assert out.rejected(b"b1") == {}
    assert sim.s.key_tasks == {"alice": 3, "bob": 3}
    assert set(sim.s.tasks) == {*t1, t2[0], *tb}
    assert sim.s.counters["rejected"] == 2


def test_quota_rejection_text() -> None:
    sim = Sim(config(max_tasks_per_client=2, max_submit_rate=0))
    sim.client(b"c1")
    out, tids = sim.submit(b"c1", 4)
    reasons = out.rejected(b"c1")
    assert list(reasons) == tids[2:]
    for why in reasons.values():
        assert why.startswith(QUOTA), why
        assert "2 tasks" in why and "--max-tasks-per-client" in why
    # rejections travel as REJECTED outcomes with attempt 0, never as ERROR messages
    for item, _ in out.results(b"c1"):
        assert (item.status, item.attempt) == (Outcome.REJECTED, 0)
    assert not [s for s in out if type(s.msg) is P.Error]


def test_quota_is_freed_as_tasks_finish_in_every_way() -> None:
    sim = Sim(config(max_tasks_per_client=4, max_submit_rate=0))
    sim.node(b"n1", slots=2)
    sim.client(b"a1", key="alice")
    sim.client(b"a2", key="alice")
    out, (t1, t2) = sim.submit(b"a1", 2, timeout=2.0)
    assert out.dispatched(b"n1") == [t1, t2]
    _, (t3, t4) = sim.submit(b"a2", 2)
    assert sim.s.key_tasks["alice"] == 4
    out, (t5,) = sim.submit(b"a2", 1)
    assert list(out.rejected(b"a2")) == [t5]
    # a result frees one place: for either session of the key
    sim.result(b"n1", t1)
    assert sim.s.key_tasks["alice"] == 3
    out, (t6,) = sim.submit(b"a1", 1)
    assert out.rejected(b"a1") == {}
    # a cancel (by the other session of the same key) frees one
    sim.cancel(b"a2", t6)
    assert sim.s.key_tasks["alice"] == 3
    # a timeout frees one (t2 runs with a 2 s timeout)
    sim.tick(2.5)
    assert t2 not in sim.s.tasks
    assert sim.s.key_tasks["alice"] == 2
    # a session that says BYE takes its tasks with it
    sim.bye(b"a2")
    assert t3 not in sim.s.tasks and t4 not in sim.s.tasks
    assert "alice" not in sim.s.key_tasks  # nothing left: no entry left behind
    out, _ = sim.submit(b"a1", 4, now=2.6)
    assert out.rejected(b"a1") == {}
    assert sim.s.key_tasks["alice"] == 4


def test_resubmitting_a_tracked_task_does_not_count_twice() -> None:
    sim = Sim(config(max_tasks_per_client=2, max_submit_rate=0))
    sim.client(b"c1")
    _, tids = sim.submit(b"c1", 2)
    out, _ = sim.submit(b"c1", tids=tids, resubmit=True, now=GRACE + 1)
    assert out.rejected(b"c1") == {}
    assert sim.s.key_tasks["key-c1"] == 2


# --------------------------------------------------------------------------- rate


def test_rate_limit_rejection_text_and_burst_of_one_second() -> None:
    sim = Sim(config(max_submit_rate=10), now=100.0)  # long after the restart grace
    sim.client(b"c1")
    out, tids = sim.submit(b"c1", 25)
    reasons = out.rejected(b"c1")
    assert list(reasons) == tids[10:]  # one second's worth goes through at once
    for why in reasons.values():
        assert why.startswith(RATE), why
        assert "10 new tasks per second per key" in why
    assert sim.s.counters["rejected"] == 15
    assert set(sim.s.tasks) == set(tids[:10])
    # rate-limited tasks hold no quota
    assert sim.s.key_tasks["key-c1"] == 10


def test_the_rate_refills_with_the_clock_up_to_one_second() -> None:
    sim = Sim(config(max_submit_rate=10), now=100.0)
    sim.client(b"c1")
    out, tids = sim.submit(b"c1", 10)
    assert out.rejected(b"c1") == {}
    out, tids = sim.submit(b"c1", 1)
    assert list(out.rejected(b"c1")) == tids  # empty bucket
    out, tids = sim.submit(b"c1", 5, now=100.25)  # a quarter second: 2.5 tokens
    assert list(out.rejected(b"c1")) == tids[2:]
    out, tids = sim.submit(b"c1", 3, now=100.35)  # 0.5 + 1.0 tokens
    assert list(out.rejected(b"c1")) == tids[1:]
    # a long pause fills the bucket to one second's worth, no more
    out, tids = sim.submit(b"c1", 30, now=200.0)
    assert len(accepted(out, b"c1", tids)) == 10


def test_a_rate_under_one_per_second_allows_one_task_at_a_time() -> None:
    sim = Sim(config(max_submit_rate=0.5), now=100.0)
    sim.client(b"c1")
    out, tids = sim.submit(b"c1", 3)
    assert list(out.rejected(b"c1")) == tids[1:]
    out, tids = sim.submit(b"c1", 1, now=101.0)  # half a token
    assert list(out.rejected(b"c1")) == tids
    out, tids = sim.submit(b"c1", 2, now=103.0)  # a full one again
    assert list(out.rejected(b"c1")) == tids[1:]
    assert "0.5 new tasks per second" in out.rejected(b"c1")[tids[1]]


def test_each_key_has_its_own_rate_and_sessions_share_it() -> None:
    sim = Sim(config(max_submit_rate=5), now=100.0)
    sim.client(b"a1", key="alice")
    sim.client(b"a2", key="alice")
    sim.client(b"b1", key="bob")
    out, _ = sim.submit(b"a1", 3)
    assert out.rejected(b"a1") == {}
    out, t2 = sim.submit(b"a2", 3)  # alice's second session shares the bucket
    assert list(out.rejected(b"a2")) == t2[2:]
    out, _ = sim.submit(b"b1", 5)
    assert out.rejected(b"b1") == {}


def test_rate_zero_means_no_limit() -> None:
    sim = Sim(config(max_submit_rate=0), now=100.0)
    sim.client(b"c1")
    out, _ = sim.submit(b"c1", 20_000)
    assert out.rejected(b"c1") == {}
    assert len(sim.s.tasks) == 20_000
    out, _ = sim.submit(b"c1", 5_000)  # at the same instant
    assert out.rejected(b"c1") == {}
    assert sim.s.key_rate == {}


def test_welcome_tells_the_client_both_limits() -> None:
    for rate in (0.0, 0.5, 200.0, 100_000.0):
        sim = Sim(config(max_submit_rate=rate, max_tasks_per_client=77))
        out = sim.client(b"c1")
        (welcome,) = [s.msg for s in out if type(s.msg) is P.Welcome]
        assert welcome.max_rate == rate
        assert welcome.max_tasks == 77
    assert SchedulerConfig().max_submit_rate == 100_000.0  # the default


def test_quota_refusals_do_not_use_up_the_rate() -> None:
    sim = Sim(config(max_submit_rate=5, max_tasks_per_client=2), now=100.0)
    sim.node(b"n1", slots=2)
    sim.client(b"c1")
    out, tids = sim.submit(b"c1", 4)
    assert all(w.startswith(QUOTA) for w in out.rejected(b"c1").values())
    assert accepted(out, b"c1", tids) == tids[:2]
    for t in tids[:2]:
        sim.result(b"n1", t)
    out, _ = sim.submit(b"c1", 2)  # 3 tokens left at the same instant
    assert out.rejected(b"c1") == {}


def test_a_resubmission_of_a_tracked_task_is_never_rate_limited() -> None:
    sim = Sim(config(max_submit_rate=1), now=100.0)
    sim.client(b"c1")
    out, tids = sim.submit(b"c1", 1)
    assert out.rejected(b"c1") == {}
    # the client reconnected and resends what it has no result for: not a new task
    out, _ = sim.submit(b"c1", tids=tids, resubmit=True)
    assert out.rejected(b"c1") == {}
    assert len(sim.s.tasks) == 1


# --------------------------------------------------------------------------- restart grace


def test_resubmissions_to_a_restarted_broker_are_exempt_during_the_grace() -> None:
    sim = Sim(config(max_submit_rate=2))  # a broker that just (re)started at t=0
    sim.node(b"n1", slots=100)
    sim.client(b"c1")
    # the client had 50 tasks in flight at the previous broker: all come back at once
    out, old = sim.submit(b"c1", 50, resubmit=True, now=0.2)
    assert out.rejected(b"c1") == {}
    assert sim.s.key_tasks["key-c1"] == 50
    assert out.dispatched(b"n1") == []  # held for the grace (a node may still run them)
    # and they did not use up the bucket: a fresh burst still gets its two
    out, fresh = sim.submit(b"c1", 3, now=0.3)
    assert list(out.rejected(b"c1")) == fresh[2:]
    assert all(w.startswith(RATE) for w in out.rejected(b"c1").values())
    assert out.dispatched(b"n1") == fresh[:2]
    # when the grace ends the held resubmissions go to the node, none refused
    sim.beat(b"n1", now=GRACE)
    out = sim.tick(GRACE)
    assert sorted(out.dispatched(b"n1")) == sorted(old)
    # after the grace a resubmission counts like any new task
    out, late = sim.submit(b"c1", 5, resubmit=True, now=GRACE + 10)
    assert list(out.rejected(b"c1")) == late[2:]


def test_the_grace_ends_when_the_node_timeout_and_two_beats_have_passed() -> None:
    sim = Sim(config(max_submit_rate=1))
    sim.client(b"c1")
    out, tids = sim.submit(b"c1", 3, resubmit=True, now=GRACE - 0.01)
    assert out.rejected(b"c1") == {}
    out, tids = sim.submit(b"c1", 3, resubmit=True, now=GRACE)
    assert list(out.rejected(b"c1")) == tids[1:]


# --------------------------------------------------------------------------- refused tasks stay refused


def test_rejected_tasks_never_reach_a_node() -> None:
    sim = Sim(config(max_submit_rate=3, max_tasks_per_client=5), now=100.0)
    sim.node(b"n1", slots=50)
    sim.client(b"c1")
    sent: list[bytes] = []
    refused: set[bytes] = set()
    now = 100.0
    for _ in range(20):
        now += 0.2
        out, _ = sim.submit(b"c1", 4, now=now)
        refused |= set(out.rejected(b"c1"))
        sent += out.dispatched(b"n1")
        for t in out.dispatched(b"n1"):
            sent += sim.result(b"n1", t).dispatched(b"n1")
        sent += sim.tick(now + 0.01).dispatched(b"n1")
    assert refused and sent
    assert not refused & set(sent)
    assert not refused & set(sim.s.tasks)
    assert len(sent) == len(set(sent))  # each accepted task went out once
    assert sim.s.counters["rejected"] == len(refused)
    assert sim.s.counters["submitted"] == len(sent)


@settings(max_examples=100, deadline=None)
@given(
    rate=st.sampled_from([1.0, 3.0, 10.0, 0.5, 250.0]),
    steps=st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 40)), min_size=1, max_size=25),
)
def test_the_rate_matches_a_token_bucket_model(rate: float, steps: list[tuple[float, int]]) -> None:
    sim = Sim(config(max_submit_rate=rate, max_tasks_per_client=1_000_000), now=1000.0)
    sim.client(b"c1")
    cap = max(1.0, rate)
    tokens, last, now = cap, None, 1000.0
    total = 0
    for gap, n in steps:
        now += gap
        if last is not None:
            tokens = min(cap, tokens + (now - last) * rate)
        last = now
        want = 0
        while want < n and tokens >= 1.0:
            tokens -= 1.0
            want += 1
        out, tids = sim.submit(b"c1", n, now=now)
        got = accepted(out, b"c1", tids)
        assert got == tids[:want]  # accepted in order, the rest refused
        total += len(got)
    # never more than one second's worth plus what the elapsed time earned
    assert total <= cap + (now - 1000.0) * rate + 1e-9


@pytest.mark.parametrize("rate", [1.0, 100.0])
def test_rate_limit_is_per_key_not_per_connection(rate: float) -> None:
    # a key that reconnects (a new route, a new session) finds its bucket as it left it
    sim = Sim(config(max_submit_rate=rate), now=100.0)
    sim.client(b"c1", key="k")
    out, tids = sim.submit(b"c1", int(rate))
    assert out.rejected(b"c1") == {}
    sim.bye(b"c1")
    sim.client(b"c2", key="k")
    out, tids = sim.submit(b"c2", 1)
    assert list(out.rejected(b"c2")) == tids


def test_the_default_headroom_lets_a_client_paced_at_the_rate_through() -> None:
    # the client's own bucket starts a round trip before the broker's: without headroom a client
    # that paces itself exactly at the rate is refused once, right after its first burst
    sim = Sim(config(max_submit_rate=10, rate_headroom=RATE_HEADROOM), now=100.0)
    assert RATE_HEADROOM > 1.0
    sim.client(b"c1")
    out, _ = sim.submit(b"c1", 10)  # the client's burst: its own bucket was full
    assert not out.rejected(b"c1")
    # the client refilled 100 ms (one task) before the broker's bucket began to: no refusal
    out, _ = sim.submit(b"c1", 1, now=100.05)
    assert not out.rejected(b"c1")
