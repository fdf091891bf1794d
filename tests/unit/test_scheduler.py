"""Unit tests for the pure broker state machine in :mod:`zlink.scheduler`.

The scheduler is driven with plain floats as the clock and fake payload objects
that refuse to be read, copied, compared or hashed: the scheduler must only
carry them along by reference.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from zlink import protocol as P
from zlink import scheduler as S
from zlink.protocol import Outcome
from zlink.scheduler import (
    Heartbeat,
    Identity,
    PeerGone,
    PeerMessage,
    Revoked,
    Scheduler,
    SchedulerConfig,
    Send,
    Tick,
)

EPOCH = b"epoch-42"
CONFIG = SchedulerConfig(
    heartbeat_interval=1.0, liveness=3, max_message_size=4321, beacon_port=5001, heartbeat_port=5002
)
NODE_TIMEOUT = CONFIG.heartbeat_interval * CONFIG.liveness  # 3.0

# --------------------------------------------------------------------------- fakes


class Payload:
    """An opaque payload frame: any attempt to look inside it fails the test."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        object.__setattr__(self, "label", label)

    def __repr__(self) -> str:
        return f"<Payload {self.label}>"

    def _touched(self, *_: Any) -> Any:
        raise AssertionError(f"the scheduler looked inside payload {self.label!r}")

    __eq__ = __hash__ = __bool__ = __len__ = __iter__ = __bytes__ = _touched  # type: ignore[assignment]
    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = __getitem__ = _touched  # type: ignore[assignment]


class Out(list[Send]):
    """The actions of one ``handle`` call, with helpers to pick them apart."""

    def to(self, route: bytes) -> list[P.Message]:
        return [s.msg for s in self if s.route == route]

    def routes(self) -> set[bytes]:
        return {s.route for s in self}

    def dispatched(self, route: bytes) -> list[tuple[P.DispatchItem, Any]]:
        out: list[tuple[P.DispatchItem, Any]] = []
        for s in self:
            if s.route == route and type(s.msg) is P.Dispatch:
                assert len(s.frames) == len(s.msg.tasks)
                out.extend(zip(s.msg.tasks, s.frames, strict=True))
        return out

    def all_dispatched(self) -> dict[bytes, list[tuple[P.DispatchItem, Any]]]:
        return {r: self.dispatched(r) for r in self.routes() if self.dispatched(r)}

    def results(self, route: bytes) -> list[tuple[P.ResultItem, Any]]:
        out: list[tuple[P.ResultItem, Any]] = []
        for s in self:
            if s.route == route and type(s.msg) is P.Result:
                assert len(s.frames) == len(s.msg.results)
                out.extend(zip(s.msg.results, s.frames, strict=True))
        return out

    def cancels(self, route: bytes) -> list[bytes]:
        return [tid for s in self if s.route == route and type(s.msg) is P.Cancel for tid in s.msg.tids]

    def errors(self, route: bytes) -> list[P.Error]:
        return [s.msg for s in self if s.route == route and type(s.msg) is P.Error]

    def error_codes(self, route: bytes) -> list[str]:
        return [e.code for e in self.errors(route)]


class Sim:
    """A scheduler plus a fake clock and shorthands for the events peers cause."""

    def __init__(self, config: SchedulerConfig = CONFIG, now: float = 0.0) -> None:
        self.s = Scheduler(epoch=EPOCH, config=config, now=now)
        self.now = now
        self.sessions: dict[bytes, bytes] = {}  # route -> session
        self.keys: dict[bytes, str] = {}  # route -> key
        self._tids = itertools.count(1)

    def __call__(self, event: Any, now: float | None = None) -> Out:
        if now is not None:
            assert now >= self.now, "the fake clock only moves forward"
            self.now = now
        out = Out(self.s.handle(event, self.now))
        for send in out:
            assert isinstance(send, Send)
            # everything the scheduler emits must survive the wire and be accepted by the peer
            assert P.decode(P.encode(send.msg), len(send.frames)) == send.msg
        return out

    # peers ------------------------------------------------------------------

    def hello(
        self, route: bytes, hat: str, *, key: str | None = None, role: str | None = None,
        session: bytes | None = None, name: str = "", now: float | None = None, **kw: Any,
    ) -> Out:  # fmt: skip
        key = key if key is not None else "key-" + route.decode()
        role = role if role is not None else hat
        session = session if session is not None else b"session-" + route
        self.sessions[route] = session
        self.keys[route] = key
        msg = P.Hello(name=name, role=hat, session=session, **kw)
        return self(PeerMessage(route, msg, identity=Identity(key, "name-" + key, role)), now)

    def node(
        self, route: bytes, skills: Iterable[str] = ("echo",), slots: int = 1, prefetch: int = 0, **kw: Any
    ) -> Out:
        """HELLO from a node, and its first heartbeat (as a live node sends at once)."""
        out = self.hello(route, "node", skills={s: {} for s in skills}, slots=slots, prefetch=prefetch, **kw)
        if any(type(m) is P.Welcome for m in out.to(route)):
            out.extend(self.beat(route))
        return out

    def client(self, route: bytes, **kw: Any) -> Out:
        return self.hello(route, "client", **kw)

    def send(self, route: bytes, msg: P.Message, frames: list[Any] | None = None, now: float | None = None) -> Out:
        return self(PeerMessage(route, msg, frames or []), now)

    # clients ------------------------------------------------------------------

    def submit(
        self, route: bytes, n: int = 1, *, skill: str = "echo", timeout: float | None = None, max_attempts: int = 3,
        tids: list[bytes] | None = None, now: float | None = None, resubmit: bool = False,
    ) -> tuple[Out, list[bytes], list[Payload]]:  # fmt: skip
        tids = tids if tids is not None else [b"t%d" % next(self._tids) for _ in range(n)]
        payloads = [Payload(f"job-{tid.decode()}") for tid in tids]
        specs = tuple(P.TaskSpec(tid, skill, timeout, max_attempts) for tid in tids)
        out = self.send(route, P.Submit(tasks=specs, resubmit=resubmit), list(payloads), now)
        return out, tids, payloads

    def cancel(self, route: bytes, *tids: bytes, now: float | None = None) -> Out:
        return self.send(route, P.Cancel(tids=tids), now=now)

    def bye(self, route: bytes, now: float | None = None) -> Out:
        return self.send(route, P.Bye(reason="done"), now=now)

    # nodes --------------------------------------------------------------------

    def result(
        self, route: bytes, tid: bytes, attempt: int, status: int = Outcome.OK, frame: Any = None,
        now: float | None = None,
    ) -> Out:  # fmt: skip
        frame = frame if frame is not None else Payload(f"result-{tid.decode()}-{attempt}")
        return self.send(route, P.Result(results=(P.ResultItem(tid, attempt, status),)), [frame], now)

    def beat(
        self, route: bytes, now: float | None = None, *, key: str | None = None, epoch: bytes | None = EPOCH
    ) -> Out:
        msg = P.Heartbeat(session=self.sessions[route], epoch=epoch)
        return self(Heartbeat(key if key is not None else self.keys[route], msg), now)

    def tick(self, now: float) -> Out:
        return self(Tick(), now)

    def inflight(self, route: bytes) -> dict[bytes, int]:
        return dict(self.s.nodes[self.sessions[route]].inflight)


def status_text(out: Out, route: bytes) -> list[tuple[bytes, int, int, str]]:
    """Results to ``route`` whose frame is a broker-made message, unpacked."""
    return [(i.tid, i.attempt, i.status, P.unpack_value(f)) for i, f in out.results(route)]


def setup(nodes: dict[bytes, dict[str, Any]] | None = None, clients: Iterable[bytes] = (b"c1",)) -> Sim:
    sim = Sim()
    for route, kw in (nodes if nodes is not None else {b"n1": {}}).items():
        sim.node(route, **kw)
    for route in clients:
        sim.client(route)
    return sim


# --------------------------------------------------------------------------- the transition table


def test_task_transitions_table() -> None:
    table = S.TASK_TRANSITIONS
    assert type(table) is dict
    assert table
    states = {"new", "queued", "running", "gone"}
    seen: set[str] = set()
    for key, target in table.items():
        assert type(key) is tuple
        assert len(key) == 2
        state, event = key
        assert type(state) is str
        assert type(event) is str
        assert event
        assert type(target) is str
        assert state in states
        assert target in states
        seen |= {state, target}
    assert seen == states
    assert all(state != "gone" for state, _ in table)  # gone is final
    assert all(target != "new" for target in table.values())
    assert table[("new", "submit")] == "queued"
    assert table[("queued", "dispatch")] == "running"
    assert table[("running", "node-dead")] == "queued"
    assert table[("running", "result")] == "gone"


# --------------------------------------------------------------------------- hello


def test_hello_gets_welcome_with_config_values() -> None:
    sim = Sim(now=100.0)
    out = sim.client(b"c1", now=112.5)
    assert out.routes() == {b"c1"}
    (welcome,) = out.to(b"c1")
    assert welcome == P.Welcome(
        epoch=EPOCH, name="name-key-c1", role="client", heartbeat_interval=1.0, liveness=3,
        max_message_size=4321, beacon_port=5001, heartbeat_port=5002, time=112.5, max_tasks=1_000_000,
        max_rate=100_000.0, key_name="name-key-c1",
    )  # fmt: skip
    out = sim.node(b"n1", name="worker")
    (welcome,) = out.to(b"n1")
    assert isinstance(welcome, P.Welcome)
    assert (welcome.name, welcome.role, welcome.epoch) == ("worker", "node", EPOCH)


def test_hello_time_is_never_negative() -> None:
    sim = Sim(now=-50.0)
    (welcome,) = sim.client(b"c1").to(b"c1")
    assert isinstance(welcome, P.Welcome)
    assert welcome.time == 0.0


def test_duplicate_names_get_suffixes() -> None:
    sim = Sim()
    names = []
    for i in range(3):
        (welcome,) = sim.client(b"c%d" % i, name="agent").to(b"c%d" % i)
        assert isinstance(welcome, P.Welcome)
        names.append(welcome.name)
    assert names == ["agent", "agent-2", "agent-3"]


def test_deduplicated_long_name_fits_in_welcome() -> None:
    sim = Sim()
    long = "n" * P.MAX_NAME
    sim.client(b"c1", name=long)  # Sim checks that every message the scheduler sends decodes
    sim.client(b"c2", name=long)


def test_hello_without_identity_is_refused() -> None:
    sim = Sim()
    out = sim(PeerMessage(b"x", P.Hello(session=b"s")))
    assert out.error_codes(b"x") == ["unauthenticated"]
    assert sim.s.peers == {}
    assert sim.s.counters["protocol_errors"] == 1
    assert sim.s.errors == {"unauthenticated": 1}


@pytest.mark.parametrize(
    ("role", "hat", "ok"),
    [
        ("client", "client", True),
        ("client", "node", False),
        ("node", "node", True),
        ("node", "client", False),
        ("both", "node", True),
        ("both", "client", True),
        ("admin", "client", True),
        ("admin", "node", False),
        ("nonsense", "client", False),
    ],
)
def test_roles_on_hello(role: str, hat: str, ok: bool) -> None:
    sim = Sim()
    out = sim.hello(b"p", hat, role=role, skills={"echo": {}}, slots=1)
    if ok:
        assert [type(m) for m in out.to(b"p")] == [P.Welcome]
        assert b"p" in sim.s.peers
    else:
        assert out.error_codes(b"p") == ["forbidden"]
        assert b"p" not in sim.s.peers
        assert sim.s.nodes == {}
        assert sim.s.clients == {}


def test_unknown_hat_is_bad_role() -> None:
    sim = Sim()
    out = sim.hello(b"p", "admin", role="admin")
    assert out.error_codes(b"p") == ["bad-role"]
    assert b"p" not in sim.s.peers


@pytest.mark.parametrize(("skills", "slots"), [((), 1), (("echo",), 0)])
def test_node_needs_a_skill_and_a_slot(skills: tuple[str, ...], slots: int) -> None:
    sim = Sim()
    out = sim.node(b"n1", skills=skills, slots=slots)
    assert out.error_codes(b"n1") == ["bad-hello"]
    assert sim.s.nodes == {}


def test_node_key_cannot_act_as_client_after_hello() -> None:
    sim = setup(clients=())
    out, _, _ = sim.submit(b"n1")  # a node sending SUBMIT
    assert out.error_codes(b"n1") == ["unexpected"]
    assert sim.s.tasks == {}
    out = sim.cancel(b"n1", b"t1")
    assert out.error_codes(b"n1") == ["unexpected"]


def test_client_cannot_send_results() -> None:
    sim = setup()
    out = sim.result(b"c1", b"t1", 1)
    assert out.error_codes(b"c1") == ["unexpected"]
    assert sim.s.counters["stale_results"] == 0


def test_both_role_can_be_node_and_client_on_two_connections() -> None:
    sim = Sim()
    sim.node(b"me-node", key="me", role="both", session=b"s-node")
    sim.client(b"me-client", key="me", role="both", session=b"s-client")
    out, (tid,), (payload,) = sim.submit(b"me-client")
    ((item, frame),) = out.dispatched(b"me-node")
    assert item.tid == tid
    assert frame is payload
    out = sim.result(b"me-node", tid, 1)
    assert [i.tid for i, _ in out.results(b"me-client")] == [tid]


@pytest.mark.parametrize(("role", "hat", "ok"), [("client", "client", True), ("node", "node", False),
                                                 ("both", "node", True), ("admin", "client", True)])  # fmt: skip
def test_status_needs_a_role_with_status(role: str, hat: str, ok: bool) -> None:
    sim = Sim()
    sim.hello(b"p", hat, role=role, skills={"echo": {}}, slots=1)
    out = sim.send(b"p", P.Status())
    (reply,) = out.to(b"p")
    if ok:
        assert isinstance(reply, P.StatusReply)
        assert reply.status["epoch"] == EPOCH.hex()
    else:
        assert isinstance(reply, P.Error)
        assert reply.code == "forbidden"


def test_messages_before_hello_get_hello_first() -> None:
    sim = setup()
    for msg, frames in [
        (P.Submit(tasks=(P.TaskSpec(b"t1", "echo"),)), [Payload("p")]),
        (P.Cancel(tids=(b"t1",)), []),
        (P.Status(), []),
        (P.Result(results=(P.ResultItem(b"t1", 1, Outcome.OK),)), [Payload("r")]),
        (P.Bye(), []),
    ]:
        out = sim.send(b"stranger", msg, frames)
        assert out.error_codes(b"stranger") == ["hello-first"]
        assert out.routes() == {b"stranger"}
    assert sim.s.tasks == {}
    assert sim.s.errors == {"hello-first": 5}


def test_session_of_another_key_is_refused() -> None:
    sim = setup()
    out = sim.client(b"thief", key="other", session=b"session-c1")
    assert out.error_codes(b"thief") == ["forbidden"]
    assert sim.s.clients[b"session-c1"].route == b"c1"


# --------------------------------------------------------------------------- queueing and routing


def test_task_waits_for_a_node_with_the_skill() -> None:
    sim = setup(nodes={b"n1": {"skills": ["echo"]}})
    out, (tid,), (payload,) = sim.submit(b"c1", skill="render", now=1.0)
    assert list(out) == []
    assert sim.s.tasks[tid].state == "queued"
    assert sim.s.status()["queued"] == {"render": 1}
    # a node with other skills joins: still waiting
    out = sim.node(b"n2", skills=["resize"], now=2.0)
    assert out.dispatched(b"n2") == []
    # the right node joins: dispatched at once, in the same batch as its WELCOME
    out = sim.node(b"n3", skills=["render", "resize"], slots=2, now=3.0)
    assert [type(m) for m in out.to(b"n3")] == [P.Welcome, P.Dispatch]
    ((item, frame),) = out.dispatched(b"n3")
    assert item == P.DispatchItem(tid, "render", 1, None)
    assert frame is payload
    assert sim.s.tasks[tid].state == "running"
    assert sim.s.status()["queued"] == {}
    assert sim.s.status()["running"] == 1


def test_dispatch_carries_time_left() -> None:
    sim = setup(nodes={})
    sim.submit(b"c1", timeout=10.0, now=1.0)
    out = sim.node(b"n1", now=5.0)
    ((item, _),) = out.dispatched(b"n1")
    assert item.timeout == pytest.approx(6.0)


def test_least_loaded_routing_spreads_by_load() -> None:
    sim = setup(nodes={b"a": {"slots": 2}, b"b": {"slots": 2}})
    out, tids, payloads = sim.submit(b"c1", 4)
    got = out.all_dispatched()
    assert {r: len(v) for r, v in got.items()} == {b"a": 2, b"b": 2}
    # one DISPATCH per node per handle call, frames in item order
    assert len([m for m in out.to(b"a") if type(m) is P.Dispatch]) == 1
    sent = {item.tid: frame for items in got.values() for item, frame in items}
    assert sorted(sent) == sorted(tids)
    for tid, payload in zip(tids, payloads, strict=True):
        assert sent[tid] is payload


def test_routing_is_by_relative_load() -> None:
    sim = setup(nodes={b"small": {"slots": 1}, b"big": {"slots": 3}})
    out, _, _ = sim.submit(b"c1", 4)
    assert {r: len(v) for r, v in out.all_dispatched().items()} == {b"small": 1, b"big": 3}
    # the next one finds no room
    out, (tid,), _ = sim.submit(b"c1")
    assert out.all_dispatched() == {}
    assert sim.s.tasks[tid].state == "queued"


def test_capacity_is_slots_plus_prefetch_and_frees_on_result() -> None:
    sim = setup(nodes={b"a": {"slots": 2, "prefetch": 1}, b"b": {"slots": 1, "prefetch": 0}})
    out, tids, payloads = sim.submit(b"c1", 10)
    per = out.all_dispatched()
    assert {r: len(v) for r, v in per.items()} == {b"a": 3, b"b": 1}
    assert sim.s.status()["queued"] == {"echo": 6}
    # least loaded first, ties to the node that joined first, FIFO from the queue
    assert [i.tid for i, _ in per[b"a"]] == [tids[0], tids[2], tids[3]]
    assert [i.tid for i, _ in per[b"b"]] == [tids[1]]
    assert all(f is payloads[tids.index(i.tid)] for v in per.values() for i, f in v)
    # each answer frees exactly one slot, which the next queued task takes
    first = per[b"b"][0][0]
    out = sim.result(b"b", first.tid, first.attempt)
    ((nxt, frame),) = out.dispatched(b"b")
    assert nxt.tid == tids[4]
    assert frame is payloads[4]
    assert len(sim.inflight(b"a")) == 3
    assert len(sim.inflight(b"b")) == 1


def test_queued_tasks_go_out_in_submission_order() -> None:
    sim = setup(nodes={})
    _, tids, _ = sim.submit(b"c1", 5)
    out = sim.node(b"n1", slots=5)
    assert [i.tid for i, _ in out.dispatched(b"n1")] == tids


def test_skill_specific_nodes() -> None:
    sim = setup(nodes={b"a": {"skills": ["x"], "slots": 5}, b"b": {"skills": ["y"], "slots": 5}})
    out_x, tx, _ = sim.submit(b"c1", 2, skill="x")
    out_y, ty, _ = sim.submit(b"c1", 2, skill="y")
    assert [i.tid for i, _ in out_x.dispatched(b"a")] == tx
    assert [i.tid for i, _ in out_y.dispatched(b"b")] == ty
    assert out_x.dispatched(b"b") == out_y.dispatched(b"a") == []


# --------------------------------------------------------------------------- results


def test_payloads_are_forwarded_by_identity() -> None:
    sim = setup()
    out, (tid,), (payload,) = sim.submit(b"c1")
    ((item, frame),) = out.dispatched(b"n1")
    assert frame is payload
    answer = Payload("the-answer")
    out = sim.result(b"n1", tid, item.attempt, Outcome.ERROR, frame=answer)
    ((res, back),) = out.results(b"c1")
    assert res == P.ResultItem(tid, 1, Outcome.ERROR)
    assert back is answer
    assert sim.s.counters["failed"] == 1
    assert sim.s.status()["nodes"][0]["failed"] == 1


def test_result_delivered_exactly_once() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    out = sim.result(b"n1", tid, 1)
    assert [(i.tid, i.status) for i, _ in out.results(b"c1")] == [(tid, Outcome.OK)]
    assert tid not in sim.s.tasks
    assert sim.s.counters["done"] == 1
    # the same result again is stale and goes nowhere
    out = sim.result(b"n1", tid, 1)
    assert out.results(b"c1") == []
    assert sim.s.counters["stale_results"] == 1
    assert sim.s.counters["done"] == 1


def test_batch_of_results_goes_back_as_one_message() -> None:
    sim = setup(nodes={b"n1": {"slots": 3}})
    out, tids, _ = sim.submit(b"c1", 3)
    frames = [Payload(f"r{i}") for i in range(3)]
    items = tuple(P.ResultItem(tid, 1, Outcome.OK) for tid in tids)
    out = sim.send(b"n1", P.Result(results=items), frames)
    msgs = [m for m in out.to(b"c1") if type(m) is P.Result]
    assert len(msgs) == 1
    got = out.results(b"c1")
    assert [i for i, _ in got] == list(items)
    assert all(f is g for (_, f), g in zip(got, frames, strict=True))


def test_stale_and_foreign_results_are_ignored_and_counted() -> None:
    sim = setup(nodes={b"a": {}, b"b": {}})
    out, (t1, t2), _ = sim.submit(b"c1", 2)
    on = {r: items[0][0].tid for r, items in out.all_dispatched().items()}
    assert set(on) == {b"a", b"b"}
    # wrong attempt number
    out = sim.result(b"a", on[b"a"], 2)
    assert out.results(b"c1") == []
    # a tid that was dispatched to the other node
    out = sim.result(b"a", on[b"b"], 1)
    assert out.results(b"c1") == []
    # a tid nobody ever submitted
    out = sim.result(b"a", b"nope", 1)
    assert out.results(b"c1") == []
    assert sim.s.counters["stale_results"] == 3
    assert t1 in sim.s.tasks
    assert t2 in sim.s.tasks
    # the genuine results still count
    out = sim.result(b"b", on[b"b"], 1)
    assert [i.tid for i, _ in out.results(b"c1")] == [on[b"b"]]
    out = sim.result(b"a", on[b"a"], 1)
    assert [i.tid for i, _ in out.results(b"c1")] == [on[b"a"]]
    assert sim.s.tasks == {}
    assert sim.s.counters["stale_results"] == 3


def test_partial_results_are_forwarded_and_keep_the_slot() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    _, (waiting,), _ = sim.submit(b"c1")
    parts = [Payload("part-1"), Payload("part-2")]
    for part in parts:
        out = sim.result(b"n1", tid, 1, Outcome.PARTIAL, frame=part)
        ((item, frame),) = out.results(b"c1")
        assert item == P.ResultItem(tid, 1, Outcome.PARTIAL)
        assert frame is part
        assert out.dispatched(b"n1") == []
    assert sim.inflight(b"n1") == {tid: 1}
    out = sim.result(b"n1", tid, 1, Outcome.OK)
    assert [i.status for i, _ in out.results(b"c1")] == [Outcome.OK]
    assert [i.tid for i, _ in out.dispatched(b"n1")] == [waiting]


def test_results_follow_a_client_that_reconnects() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    out = sim.client(b"c1-again", key="key-c1", session=b"session-c1")
    assert [type(m) for m in out.to(b"c1-again")] == [P.Welcome]
    out = sim.result(b"n1", tid, 1)
    assert out.results(b"c1") == []
    assert [i.tid for i, _ in out.results(b"c1-again")] == [tid]


def test_node_reconnect_keeps_its_tasks() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    out = sim.node(b"n1-again", key="key-n1", session=b"session-n1", running=((tid, 1),))
    assert out.dispatched(b"n1-again") == []
    assert b"n1" not in sim.s.peers
    out = sim.result(b"n1-again", tid, 1)
    assert [i.tid for i, _ in out.results(b"c1")] == [tid]
    out = sim.result(b"n1", tid, 1)
    assert out.error_codes(b"n1") == ["hello-first"]


# --------------------------------------------------------------------------- liveness


def test_dead_node_tasks_are_redispatched_and_late_result_ignored() -> None:
    sim = setup(nodes={b"a": {"slots": 2}})
    out, tids, payloads = sim.submit(b"c1", 2)
    assert [i.attempt for i, _ in out.dispatched(b"a")] == [1, 1]
    sim.node(b"b", slots=2, now=1.0)
    # b heartbeats, a goes silent after t=0
    for t in (1.0, 2.0, 3.0):
        sim.beat(b"b", now=t)
        out = sim.tick(t)
        assert out.dispatched(b"b") == []
    sim.beat(b"b", now=3.0)
    out = sim.tick(3.0)  # exactly interval * liveness: still alive
    assert b"session-a" in sim.s.nodes
    out = sim.tick(3.25)
    assert b"session-a" not in sim.s.nodes
    assert b"a" not in sim.s.peers
    assert sim.s.counters["nodes_died"] == 1
    assert sim.s.counters["requeued"] == 2
    redo = out.dispatched(b"b")
    assert [(i.tid, i.attempt) for i, _ in redo] == [(tid, 2) for tid in tids]
    assert all(f is p for (_, f), p in zip(redo, payloads, strict=True))
    assert out.cancels(b"a") == []
    assert out.to(b"a") == []
    assert out.results(b"c1") == []
    # the dead node's late answer is refused (it is no longer a peer)
    out = sim.result(b"a", tids[0], 1, now=3.5)
    assert out.results(b"c1") == []
    assert out.error_codes(b"a") == ["hello-first"]
    # it comes back under the same session: its old attempt is now stale
    sim.node(b"a", now=3.6)
    out = sim.result(b"a", tids[0], 1, now=3.7)
    assert out.results(b"c1") == []
    assert sim.s.counters["stale_results"] == 1
    # the new attempt is the one that counts
    out = sim.result(b"b", tids[0], 2)
    assert [(i.tid, i.attempt, i.status) for i, _ in out.results(b"c1")] == [(tids[0], 2, Outcome.OK)]


def test_any_message_from_a_node_keeps_it_alive() -> None:
    sim = setup()
    sim.result(b"n1", b"unknown", 1, now=2.5)  # a stale result is still a sign of life
    sim.tick(5.5)
    assert b"session-n1" in sim.s.nodes
    sim.tick(5.75)
    assert b"session-n1" not in sim.s.nodes


def test_heartbeats_keep_a_node_alive() -> None:
    sim = setup()
    for t in range(1, 20):
        sim.beat(b"n1", now=float(t))
        sim.tick(float(t) + 0.5)
    assert b"session-n1" in sim.s.nodes
    sim.beat(b"n1", now=25.0, epoch=None)  # a heartbeat without an epoch also counts
    sim.tick(27.0)
    assert b"session-n1" in sim.s.nodes


@pytest.mark.parametrize("how", ["other-key", "other-epoch", "unknown-session"])
def test_bad_heartbeats_do_not_keep_a_node_alive(how: str) -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    for t in (1.0, 2.0, 3.0, 3.5):
        if how == "other-key":
            sim.beat(b"n1", now=t, key="key-intruder")
        elif how == "other-epoch":
            sim.beat(b"n1", now=t, epoch=b"old-epoch")
        else:
            sim(Heartbeat("key-n1", P.Heartbeat(session=b"someone-else")), t)
        sim.tick(t)
    assert b"session-n1" not in sim.s.nodes
    assert sim.s.tasks[tid].state == "queued"


def test_a_new_node_waits_for_its_first_heartbeat_while_others_get_through() -> None:
    """Its heartbeat channel is a second handshake, slow when a thousand nodes join at once."""
    # on a quiet broker, a node that never beats is dead after the node timeout
    sim = Sim()
    sim.hello(b"lone", "node", skills={"echo": {}}, slots=1)
    sim.tick(NODE_TIMEOUT + 0.01)
    assert b"session-lone" not in sim.s.nodes

    # a join storm: 1,000 nodes say HELLO at once, and their first heartbeats trickle in
    grace = CONFIG.first_beat_grace
    assert grace > NODE_TIMEOUT + 1
    sim = Sim()
    sim.client(b"c1")
    routes = [b"n%d" % i for i in range(1000)]
    for r in routes:
        sim.hello(r, "node", skills={"echo": {}}, slots=1)
    _, tids, _ = sim.submit(b"c1", 2)
    t = 0.0
    for k in range(100, 1000, 100):  # 100 more every 0.5 s: the broker is getting through them
        t += 0.5
        for r in routes[:k]:
            sim.beat(r, now=t)
        sim.tick(t)
    assert len(sim.s.nodes) == 1000 and t > NODE_TIMEOUT  # nobody dead: first beats keep coming
    for r in routes[:900]:
        sim.beat(r, now=grace - 0.5)
    sim.tick(grace + 0.01)  # the last 100 never beat, and progress stopped a while ago
    assert len(sim.s.nodes) == 900 and sim.s.counters["nodes_died"] == 100
    assert all(sim.s.tasks[tid].state == "running" for tid in tids)  # on live nodes
    # from the first beat on, the ordinary node timeout applies
    sim.tick(grace - 0.5 + NODE_TIMEOUT + 0.01)
    assert sim.s.nodes == {}


def test_heartbeat_cannot_revive_a_dead_node() -> None:
    sim = setup()
    sim.tick(4.0)
    assert b"session-n1" not in sim.s.nodes
    sim.beat(b"n1", now=4.5)
    assert b"session-n1" not in sim.s.nodes
    assert sim.s.peers.get(b"n1") is None


def test_max_attempts_exhausted_gives_lost() -> None:
    sim = setup(nodes={b"a": {}})
    _, (tid,), _ = sim.submit(b"c1", max_attempts=2)
    sim.node(b"b", now=0.5)
    sim.node(b"c", now=0.5)
    # a dies, b gets attempt 2
    sim.beat(b"b", now=3.0)
    sim.beat(b"c", now=3.0)
    out = sim.tick(3.5)
    assert [(i.tid, i.attempt) for r in (b"b", b"c") for i, _ in out.dispatched(r)] == [(tid, 2)]
    holder = b"b" if out.dispatched(b"b") else b"c"
    other = b"c" if holder == b"b" else b"b"
    # the holder dies too: no attempts left, even though `other` is alive
    for t in (4.0, 5.0, 6.0, 6.5):
        sim.beat(other, now=t)
        out = sim.tick(t)
    assert sim.s.counters["lost"] == 1
    results = status_text(out, b"c1")
    assert len(results) == 1
    assert results[0][:3] == (tid, 2, Outcome.LOST)
    assert "2 times" in results[0][3]
    assert out.dispatched(other) == []
    assert tid not in sim.s.tasks


def test_single_attempt_task_is_lost_with_its_node() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1", max_attempts=1)
    out = sim.tick(10.0)
    assert [(i.tid, i.attempt, i.status) for i, _ in out.results(b"c1")] == [(tid, 1, Outcome.LOST)]
    assert sim.s.tasks == {}


def test_two_nodes_dying_in_one_tick_do_not_burn_attempts() -> None:
    # regression: a's task used to be re-dispatched to b (also dead), burning attempt 2, and ended LOST
    sim = setup(nodes={b"a": {}, b"b": {}, b"c": {}})
    out, (tid,), _ = sim.submit(b"c1", max_attempts=2)
    assert [i.tid for i, _ in out.dispatched(b"a")] == [tid]
    sim.beat(b"c", now=3.5)
    out = sim.tick(3.5)  # a and b are both past their liveness
    assert sim.s.counters["nodes_died"] == 2
    # the task was only ever sent once (to a): it must now go to c as attempt 2
    assert out.results(b"c1") == []
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"c")] == [(tid, 2)]


def test_peer_gone_drops_a_node_and_requeues() -> None:
    sim = setup(nodes={b"a": {}, b"b": {}})
    out, (t1, t2), _ = sim.submit(b"c1", 2)
    on_a = out.dispatched(b"a")[0][0].tid
    sim.result(b"b", out.dispatched(b"b")[0][0].tid, 1)
    out = sim(PeerGone(b"a"))
    assert sim.s.counters["undeliverable"] == 1
    assert b"session-a" not in sim.s.nodes
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"b")] == [(on_a, 2)]
    assert {t1, t2} >= {on_a}


def test_peer_gone_for_a_client_keeps_its_tasks() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    sim(PeerGone(b"c1"))
    assert sim.s.counters["undeliverable"] == 1
    assert tid in sim.s.tasks  # kept: the client may come back with its session and resubmit
    assert b"c1" not in sim.s.peers  # the connection is gone
    assert any(c.route == b"c1" for c in sim.s.clients.values())


def test_node_bye_requeues_its_tasks_at_the_head() -> None:
    sim = setup(nodes={b"a": {"slots": 2}})
    _, tids, _ = sim.submit(b"c1", 3)
    out = sim.bye(b"a")
    assert b"session-a" not in sim.s.nodes
    assert out.to(b"a") == [P.Bye(reason="bye")]  # only the answer: the node may close its connection now
    out = sim.node(b"b", slots=3)
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"b")] == [(tids[0], 2), (tids[1], 2), (tids[2], 1)]


def test_requeued_task_prefers_a_node_it_has_not_tried() -> None:
    sim = setup(nodes={b"a": {}, b"x": {}})
    out, (t1,), _ = sim.submit(b"c1")
    assert [i.tid for i, _ in out.dispatched(b"a")] == [t1]
    _, (t2,), _ = sim.submit(b"c1")
    sim.result(b"x", t2, 1, now=0.5)
    # a dies, t1 moves to x
    for t in (1.0, 2.0, 3.5):
        sim.beat(b"x", now=t)
        out = sim.tick(t)
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"x")] == [(t1, 2)]
    # a comes back under its old session with more room, y joins; both get some work
    sim.node(b"a", slots=4, now=3.6)
    sim.node(b"y", slots=2, now=3.6)
    out, (t3, t4), _ = sim.submit(b"c1", 2)
    assert [i.tid for i, _ in out.dispatched(b"a")] == [t3]  # load 1/4
    assert [i.tid for i, _ in out.dispatched(b"y")] == [t4]  # load 1/2
    # x dies: a is the least loaded, but t1 already died there once, so it goes to y
    for t in (5.0, 6.6):
        sim.beat(b"a", now=t)
        sim.beat(b"y", now=t)
    out = sim.tick(6.6)
    assert b"session-x" not in sim.s.nodes
    assert out.dispatched(b"a") == []
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"y")] == [(t1, 3)]


# --------------------------------------------------------------------------- deadlines


def test_timeout_of_a_queued_task_says_why() -> None:
    sim = setup(nodes={b"n1": {"slots": 1, "prefetch": 0}})
    sim.submit(b"c1", now=0.0)  # occupies n1
    _, (busy,), _ = sim.submit(b"c1", timeout=1.0, now=0.0)
    _, (nobody,), _ = sim.submit(b"c1", skill="nosuch", timeout=1.0, now=0.0)
    sim.beat(b"n1", now=1.0)
    out = sim.tick(1.0)
    assert sorted(status_text(out, b"c1")) == sorted(
        [
            (busy, 0, Outcome.TIMEOUT, "task timed out while queued: every node with skill 'echo' was busy"),
            (nobody, 0, Outcome.TIMEOUT, "task timed out while queued: no node offers skill 'nosuch'"),
        ]
    )


def test_timeout_of_a_running_task() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1", timeout=2.0, now=1.0)
    _, (waiting,), (waiting_payload,) = sim.submit(b"c1", now=1.0)
    sim.beat(b"n1", now=2.5)
    out = sim.tick(2.999)
    assert list(out) == []
    out = sim.tick(3.0)
    assert status_text(out, b"c1") == [(tid, 1, Outcome.TIMEOUT, "task timed out while running on node 'name-key-n1'")]
    assert out.cancels(b"n1") == [tid]
    assert tid not in sim.s.tasks
    assert sim.s.counters["timed_out"] == 1
    # the slot stays taken until the node answers
    assert sim.inflight(b"n1") == {tid: 1}
    assert out.dispatched(b"n1") == []
    assert sim.s.tasks[waiting].state == "queued"
    sim.beat(b"n1", now=3.5)
    assert list(sim.tick(3.5)) == []
    out = sim.result(b"n1", tid, 1, Outcome.CANCELLED, now=3.6)
    assert out.results(b"c1") == []
    assert sim.s.counters["stale_results"] == 1
    assert [(i.tid, f is waiting_payload) for i, f in out.dispatched(b"n1")] == [(waiting, True)]


def test_timeout_of_a_queued_task_sends_no_cancel() -> None:
    sim = setup(nodes={})
    _, (tid,), _ = sim.submit(b"c1", timeout=0.5, skill="nobody-has-it")
    out = sim.tick(0.5)
    assert [(i.tid, i.attempt, i.status) for i, _ in out.results(b"c1")] == [(tid, 0, Outcome.TIMEOUT)]
    assert [m for m in out if type(m.msg) is P.Cancel] == []
    out = sim.node(b"late", skills=["nobody-has-it"])
    assert out.dispatched(b"late") == []
    assert sim.s.status()["queued"] == {}


def test_timeout_is_measured_from_submission_not_dispatch() -> None:
    sim = setup(nodes={b"n1": {}})
    _, (first,), _ = sim.submit(b"c1", now=0.0)
    _, (second,), _ = sim.submit(b"c1", timeout=5.0, now=1.0)
    out = sim.result(b"n1", first, 1, now=4.0)
    ((item, _),) = out.dispatched(b"n1")
    assert (item.tid, item.timeout) == (second, pytest.approx(2.0))
    sim.beat(b"n1", now=5.9)
    assert sim.tick(5.9).results(b"c1") == []
    out = sim.tick(6.0)
    assert [(i.tid, i.status) for i, _ in out.results(b"c1")] == [(second, Outcome.TIMEOUT)]


def test_result_before_deadline_wins_and_no_timeout_follows() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1", timeout=1.0)
    out = sim.result(b"n1", tid, 1, now=0.9)
    assert [i.status for i, _ in out.results(b"c1")] == [Outcome.OK]
    out = sim.tick(2.0)
    assert out.results(b"c1") == []
    assert sim.s.counters["timed_out"] == 0


def test_zero_timeout_times_out_on_the_next_tick() -> None:
    sim = setup()
    out, (tid,), _ = sim.submit(b"c1", timeout=0.0, now=1.0)
    ((item, _),) = out.dispatched(b"n1")
    assert item.timeout == 0.0
    out = sim.tick(1.0)
    assert [(i.tid, i.status) for i, _ in out.results(b"c1")] == [(tid, Outcome.TIMEOUT)]


def test_next_wakeup() -> None:
    sim = setup(nodes={})
    assert sim.s.next_wakeup() == pytest.approx(0.25)  # interval / 4 after the last tick
    sim.tick(10.0)
    assert sim.s.next_wakeup() == pytest.approx(10.25)
    _, (slow,), _ = sim.submit(b"c1", timeout=5.0, now=10.0)
    assert sim.s.next_wakeup() == pytest.approx(10.25)
    _, (fast,), _ = sim.submit(b"c1", timeout=0.1, now=10.05)
    assert sim.s.next_wakeup() == pytest.approx(10.15)
    sim.cancel(b"c1", fast, now=10.1)
    assert sim.s.next_wakeup() == pytest.approx(10.25)
    sim.tick(14.9)
    assert sim.s.next_wakeup() == pytest.approx(15.0)
    out = sim.tick(sim.s.next_wakeup())
    assert [(i.tid, i.status) for i, _ in out.results(b"c1")] == [(slow, Outcome.TIMEOUT)]
    assert sim.s.next_wakeup() == pytest.approx(15.25)


# --------------------------------------------------------------------------- cancel and bye


def test_cancel_a_queued_task() -> None:
    sim = setup(nodes={})
    _, (tid, other), _ = sim.submit(b"c1", 2)
    out = sim.cancel(b"c1", tid)
    assert status_text(out, b"c1") == [(tid, 0, Outcome.CANCELLED, "cancelled by the client")]
    assert sim.s.counters["cancelled"] == 1
    assert tid not in sim.s.tasks
    out = sim.node(b"n1", slots=5)
    assert [i.tid for i, _ in out.dispatched(b"n1")] == [other]
    assert sim.s.status()["queued"] == {}


def test_cancel_a_running_task() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    _, (waiting,), _ = sim.submit(b"c1")
    out = sim.cancel(b"c1", tid)
    assert [(i.tid, i.attempt, i.status) for i, _ in out.results(b"c1")] == [(tid, 1, Outcome.CANCELLED)]
    assert out.cancels(b"n1") == [tid]
    assert out.dispatched(b"n1") == []
    out = sim.result(b"n1", tid, 1, Outcome.CANCELLED)
    assert out.results(b"c1") == []
    assert [i.tid for i, _ in out.dispatched(b"n1")] == [waiting]
    # cancelling again, or a finished task, says nothing
    assert list(sim.cancel(b"c1", tid)) == []
    assert sim.s.counters["cancelled"] == 1


def test_cancel_from_another_key_is_ignored() -> None:
    sim = setup(clients=(b"c1", b"c2"))
    _, (queued,), _ = sim.submit(b"c1", skill="nobody")
    _, (running,), _ = sim.submit(b"c1")
    out = sim.cancel(b"c2", queued, running, b"made-up")
    assert list(out) == []
    assert sim.s.tasks[queued].state == "queued"
    assert sim.s.tasks[running].state == "running"
    assert sim.s.counters["cancelled"] == 0
    out = sim.result(b"n1", running, 1)
    assert [i.tid for i, _ in out.results(b"c1")] == [running]


def test_client_bye_cancels_its_tasks() -> None:
    sim = setup(nodes={b"n1": {"slots": 2}}, clients=(b"c1", b"c2"))
    _, (r1, r2, _queued), _ = sim.submit(b"c1", 3)
    _, (mine,), _ = sim.submit(b"c2", skill="nobody")
    out = sim.bye(b"c1")
    assert sorted(out.cancels(b"n1")) == sorted([r1, r2])
    assert out.results(b"c1") == []
    assert set(sim.s.tasks) == {mine}
    assert sim.s.counters["cancelled"] == 3
    assert b"session-c1" not in sim.s.clients
    # the node's answers are stale; the queued task never runs
    out = sim.result(b"n1", r1, 1)
    assert out.results(b"c1") == []
    assert out.dispatched(b"n1") == []
    assert sim.s.counters["stale_results"] == 1
    out = sim.send(b"c1", P.Status())
    assert out.error_codes(b"c1") == ["hello-first"]


# --------------------------------------------------------------------------- duplicates and limits


def test_duplicate_tid_from_the_same_client_is_ignored() -> None:
    sim = setup()
    out, (tid,), (payload,) = sim.submit(b"c1", tids=[b"dup"])
    out2, _, _ = sim.submit(b"c1", tids=[b"dup"])
    assert list(out2) == []
    assert sim.s.counters["submitted"] == 1
    assert sim.s.tasks[tid].payload is payload
    out = sim.result(b"n1", tid, 1)
    assert len(out.results(b"c1")) == 1


def test_duplicate_tid_within_one_batch() -> None:
    sim = setup(nodes={b"n1": {"slots": 5}})
    out, _, payloads = sim.submit(b"c1", tids=[b"x", b"x"])
    ((_item, frame),) = out.dispatched(b"n1")
    assert frame is payloads[0]
    assert sim.s.counters["submitted"] == 1


def test_duplicate_tid_from_another_key_is_rejected() -> None:
    sim = setup(clients=(b"c1", b"c2"))
    _, (tid,), (payload,) = sim.submit(b"c1", tids=[b"shared"])
    out, _, _ = sim.submit(b"c2", tids=[b"shared"])
    assert status_text(out, b"c2") == [(tid, 0, Outcome.REJECTED, "task id in use")]
    assert out.results(b"c1") == []
    assert sim.s.counters["rejected"] == 1
    assert sim.s.tasks[tid].payload is payload
    out = sim.result(b"n1", tid, 1)
    assert [i.tid for i, _ in out.results(b"c1")] == [tid]
    assert out.results(b"c2") == []


def test_max_tasks_per_client() -> None:
    sim = Sim(SchedulerConfig(heartbeat_interval=1.0, liveness=3, max_tasks_per_client=3))
    sim.node(b"n1")
    sim.client(b"c1")
    sim.client(b"c2")
    out, tids, _ = sim.submit(b"c1", 5)
    assert [(i.tid, i.status) for i, _ in out.results(b"c1")] == [(t, Outcome.REJECTED) for t in tids[3:]]
    assert set(sim.s.tasks) == set(tids[:3])
    assert sim.s.counters["rejected"] == 2
    # the limit is per client
    out, _, _ = sim.submit(b"c2", 3)
    assert out.results(b"c2") == []
    # a finished task makes room again
    sim.result(b"n1", tids[0], 1)
    out, (again,), _ = sim.submit(b"c1")
    assert out.results(b"c1") == []
    assert again in sim.s.tasks


# --------------------------------------------------------------------------- revocation


def test_revoked_key_drops_its_peers() -> None:
    sim = setup(nodes={b"a": {}, b"b": {}}, clients=(b"c1", b"c2"))
    out, (ta, tb), _ = sim.submit(b"c1", 2)
    on_a = out.dispatched(b"a")[0][0].tid
    on_b = out.dispatched(b"b")[0][0].tid
    _, (tc2,), _ = sim.submit(b"c2", skill="nobody")
    # revoke node a: ERROR to it, its task moves to b once b has room
    out = sim(Revoked("key-a"))
    assert out.error_codes(b"a") == ["revoked"]
    assert b"session-a" not in sim.s.nodes
    assert sim.s.tasks[on_a].state == "queued"
    out = sim.result(b"b", on_b, 1)
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"b")] == [(on_a, 2)]
    out = sim.result(b"a", on_a, 1)
    assert out.error_codes(b"a") == ["hello-first"]
    # revoke client c2: ERROR, its queued task is gone, nobody else is touched
    out = sim(Revoked("key-c2"))
    assert out.error_codes(b"c2") == ["revoked"]
    assert out.routes() == {b"c2"}
    assert tc2 not in sim.s.tasks
    assert b"session-c2" not in sim.s.clients
    # revoke client c1 whose task is running on b: b gets a CANCEL
    out = sim(Revoked("key-c1"))
    assert out.error_codes(b"c1") == ["revoked"]
    assert out.cancels(b"b") == [on_a]
    assert sim.s.tasks == {}
    assert {ta, tb} == {on_a, on_b}


def test_revoked_key_with_several_connections() -> None:
    sim = Sim()
    sim.node(b"n", key="shared", role="both", session=b"sn")
    sim.client(b"c", key="shared", role="both", session=b"sc")
    sim.client(b"other")
    out = sim(Revoked("shared"))
    assert sorted(out.routes()) == [b"c", b"n"]
    assert out.error_codes(b"n") == ["revoked"]
    assert out.error_codes(b"c") == ["revoked"]
    assert set(sim.s.peers) == {b"other"}


# --------------------------------------------------------------------------- status


def _walk(value: Any) -> Iterable[Any]:
    yield value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(k)
            yield from _walk(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _walk(v)


def test_status_has_no_payloads_and_counts_queued_per_skill() -> None:
    sim = setup(nodes={b"n1": {"skills": ["a", "b"], "slots": 2}}, clients=(b"c1",))
    sim.submit(b"c1", 3, skill="a")
    sim.submit(b"c1", 2, skill="b")
    sim.submit(b"c1", 1, skill="z")
    status = sim.s.status()
    assert status["queued"] == {"a": 1, "b": 2, "z": 1}
    assert status["running"] == 2
    assert status["clients"] == 1
    assert status["counters"]["submitted"] == 6
    assert status["counters"]["dispatched"] == 2
    (node,) = status["nodes"]
    assert node["skills"] == ["a", "b"]
    assert node["busy"] == 2
    assert node["slots"] == 2
    for value in _walk(status):
        assert type(value) in (dict, list, str, int, float, bool, type(None)), value
    reply = P.StatusReply(status=status)
    assert P.decode(P.encode(reply)) == reply


def test_status_reply_and_uptime() -> None:
    sim = Sim(now=10.0)
    sim.client(b"c1")
    out = sim.send(b"c1", P.Status(), now=12.5)
    (reply,) = out.to(b"c1")
    assert isinstance(reply, P.StatusReply)
    assert reply.status["uptime"] == 2.5
    assert reply.status["nodes"] == []


# --------------------------------------------------------------------------- known bugs


def test_resubmitted_tid_is_fenced_from_its_old_attempt() -> None:
    # regression: the resubmission restarted at attempt 1, so the old attempt's answer was delivered
    sim = setup(nodes={b"n1": {"slots": 1, "prefetch": 1}, b"n2": {}})
    _, (tid,), _ = sim.submit(b"c1", tids=[b"again"], timeout=1.0)
    sim.beat(b"n2", now=1.0)
    out = sim.tick(1.0)
    assert out.cancels(b"n1") == [tid]  # n1 is still busy with attempt 1
    # the client resubmits the same id (e.g. it missed the TIMEOUT during a reconnect)
    out, _, (second,) = sim.submit(b"c1", tids=[b"again"], now=1.0)
    ((item, frame),) = [d for r in (b"n1", b"n2") for d in out.dispatched(r)]
    assert item.attempt == 2
    assert frame is second
    # n1 answers the CANCEL of the *old* attempt: fenced off
    out = sim.result(b"n1", tid, 1, Outcome.CANCELLED, frame=Payload("old"), now=1.1)
    assert out.results(b"c1") == []
    assert sim.s.counters["stale_results"] == 1
    assert sim.s.tasks[tid].state == "running"


def test_resubmitted_tid_waits_for_the_node_still_running_it() -> None:
    sim = setup(nodes={b"n1": {"slots": 2}})
    _, (tid,), _ = sim.submit(b"c1", tids=[b"again"], timeout=1.0)
    sim.tick(1.0)
    out, _, (second,) = sim.submit(b"c1", tids=[b"again"], now=1.0)
    # n1 still holds attempt 1 of this very id: it must not get attempt 2 on top of it
    assert out.dispatched(b"n1") == []
    assert sim.inflight(b"n1") == {tid: 1}
    out = sim.result(b"n1", tid, 1, Outcome.CANCELLED, now=1.1)
    assert [(i.tid, i.attempt, f is second) for i, f in out.dispatched(b"n1")] == [(tid, 2, True)]
    out = sim.result(b"n1", tid, 2, now=1.2)
    assert [(i.tid, i.attempt, i.status) for i, _ in out.results(b"c1")] == [(tid, 2, Outcome.OK)]
    assert sim.s.fence == {}


def test_fence_covers_every_cancelled_attempt_still_running() -> None:
    cfg = SchedulerConfig(heartbeat_interval=10.0, liveness=3)  # no liveness noise
    sim = Sim(cfg)
    sim.node(b"a", slots=2)
    sim.node(b"b", slots=1)
    sim.client(b"c1")
    out, (tid,), _ = sim.submit(b"c1", tids=[b"T"], timeout=1.0)
    assert [i.attempt for i, _ in out.dispatched(b"a")] == [1]
    sim.tick(1.0)  # attempt 1 times out; a is told to stop but still runs it
    out, _, _ = sim.submit(b"c1", tids=[b"T"], timeout=1.0, now=1.0)
    assert [i.attempt for i, _ in out.dispatched(b"b")] == [2]
    sim.tick(2.0)  # attempt 2 times out too
    sim.result(b"b", tid, 2, Outcome.CANCELLED, now=2.1)  # b answers at once
    sim.submit(b"c1", tids=[b"filler"], now=2.2)  # keeps b busy
    out, _, _ = sim.submit(b"c1", tids=[b"T"], now=2.3)
    assert out.dispatched(b"a") == [], "a still runs attempt 1 of this id: the third incarnation waits"
    out = sim.result(b"a", tid, 1, Outcome.CANCELLED, frame=Payload("stale"), now=2.4)
    assert out.results(b"c1") == [], "attempt 1's late answer was delivered for the third incarnation"
    ((third, _),) = out.dispatched(b"a")
    assert third.attempt == 3
    assert sim.s.fence == {}


def test_node_capacity_never_exceeds_slots_plus_prefetch() -> None:
    # the broker adapts how much it prefetches to a node's completion rate, up to the announced limit
    sim = setup(nodes={b"fast": {"slots": 1, "prefetch": 3}})
    _, tids, _ = sim.submit(b"c1", 300)
    done: list[bytes] = []
    peak = 0
    for step in range(1, 400):
        held = sim.inflight(b"fast")
        peak = max(peak, len(held))
        assert len(held) <= 1 + 3
        if not held:
            break
        items = tuple(P.ResultItem(tid, attempt, Outcome.OK) for tid, attempt in held.items())
        out = sim.send(b"fast", P.Result(results=items), [Payload("r") for _ in items], now=step * 0.005)
        done.extend(i.tid for i, _ in out.results(b"c1"))
    assert sorted(done) == sorted(tids)
    assert sim.s.tasks == {}
    assert peak == 4  # a fast node ends up with its whole prefetch in use


# --------------------------------------------------------------------------- randomized model test


@dataclass
class NodeModel:
    route: bytes
    key: str
    session: bytes
    capacity: int
    skills: frozenset[str]
    last_seen: float
    silent: bool = False
    dead: bool = False
    #: tid -> attempt: what the node process really holds (dispatched, not finally answered)
    holds: dict[bytes, int] = field(default_factory=dict)
    #: tids the broker told this node to stop
    cancelled: set[bytes] = field(default_factory=set)


@dataclass
class TaskModel:
    tid: bytes
    client: bytes
    payload: Payload
    deadline: float
    max_attempts: int
    abandoned: bool = False
    finals: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)


SKILLS = ("a", "b", "c")  # nobody offers "c" until the final drain
# binary fractions only, so the model and the scheduler round time identically
MODEL_CONFIG = SchedulerConfig(heartbeat_interval=0.25, liveness=3, max_tasks_per_client=10)


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of submits, answers, deaths, cancels and timeouts."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(epoch=EPOCH, config=MODEL_CONFIG, now=0.0)
        self.now = 0.0
        self.nodes: list[NodeModel] = []
        self.clients: dict[bytes, str] = {}  # route -> key
        self.sessions: dict[bytes, int] = {}
        self.tasks: dict[bytes, TaskModel] = {}
        self.rejected_dups: Counter[tuple[bytes, bytes]] = Counter()
        self.expected_dup_rejects: Counter[tuple[bytes, bytes]] = Counter()
        self.node_frames: dict[tuple[bytes, int], list[Any]] = {}
        self.tid_counter = itertools.count()
        self.route_counter = itertools.count()

    # ------------------------------------------------------------ plumbing

    def handle(self, event: Any) -> list[Send]:
        out = self.s.handle(event, self.now)
        for send in out:
            msg = send.msg
            assert P.decode(P.encode(msg), len(send.frames)) == msg
            if type(msg) is P.Dispatch:
                node = self._node_by_route(send.route)
                assert node is not None and not node.dead, "dispatch to a node that is not connected"
                for item, frame in zip(msg.tasks, send.frames, strict=True):
                    task = self.tasks[item.tid]
                    assert frame is task.payload
                    assert item.skill in node.skills
                    assert not task.finals, "dispatch of a finished task"
                    assert item.tid not in node.holds
                    assert not task.attempts or item.attempt > task.attempts[-1]
                    assert 1 <= item.attempt <= task.max_attempts
                    task.attempts.append(item.attempt)
                    node.holds[item.tid] = item.attempt
                    assert len(node.holds) <= node.capacity, "node got more than slots + prefetch"
            elif type(msg) is P.Cancel:
                node = self._node_by_route(send.route)
                assert node is not None and not node.dead, "cancel to a node that is not connected"
                for tid in msg.tids:
                    assert tid in node.holds, "cancel of a task the node does not hold"
                    node.cancelled.add(tid)
            elif type(msg) is P.Result:
                assert send.route in self.clients
                for item, frame in zip(msg.results, send.frames, strict=True):
                    self._on_client_result(send.route, item, frame)
        return out

    def _on_client_result(self, route: bytes, item: P.ResultItem, frame: Any) -> None:
        task = self.tasks.get(item.tid)
        if task is None or task.client != route:
            assert item.status == Outcome.REJECTED
            assert self.expected_dup_rejects[(route, item.tid)] > self.rejected_dups[(route, item.tid)]
            self.rejected_dups[(route, item.tid)] += 1
            return
        assert not task.abandoned, "result for a task whose client said BYE"
        if item.status in (Outcome.OK, Outcome.ERROR, Outcome.PARTIAL):
            assert any(frame is f for f in self.node_frames.get((item.tid, item.attempt), ())), "frame was swapped"
        else:
            assert isinstance(P.unpack_value(frame), str)
        if item.status == Outcome.PARTIAL:
            assert not task.finals
            return
        if item.status == Outcome.TIMEOUT:
            assert self.now >= task.deadline
        if item.status == Outcome.LOST:
            assert item.attempt == task.max_attempts
        task.finals.append(item.status)
        assert len(task.finals) == 1, f"two final results for {item.tid!r}: {task.finals}"

    def _node_by_route(self, route: bytes) -> NodeModel | None:
        for node in self.nodes:
            if node.route == route:
                return node
        return None

    def _live_nodes(self) -> list[NodeModel]:
        return [n for n in self.nodes if not n.dead]

    def _mark_dead(self) -> None:
        for node in self.nodes:
            if node.dead:
                continue
            overdue = self.now - node.last_seen > MODEL_CONFIG.node_timeout
            assert overdue == (node.session not in self.s.nodes), "liveness decided wrongly"
            if overdue:
                node.dead = True
                node.holds.clear()  # it restarts with a new session if it ever comes back

    def _add_node(self, skills: frozenset[str], slots: int, prefetch: int) -> None:
        i = next(self.route_counter)
        route, session = b"n%d" % i, b"sn%d" % i
        node = NodeModel(route, f"kn{i}", session, max(1, slots + prefetch), skills, self.now)
        self.nodes.append(node)
        out = self.handle(
            PeerMessage(route, P.Hello(role="node", session=session, skills={s: {} for s in skills}, slots=slots,
                                       prefetch=prefetch), identity=Identity(node.key, node.key, "node"))
        )  # fmt: skip
        assert type(out[0].msg) is P.Welcome
        self.handle(Heartbeat(node.key, P.Heartbeat(session=session, epoch=EPOCH)))  # a live node beats at once

    def _answer(self, node: NodeModel, tid: bytes, status: int) -> None:
        attempt = node.holds[tid]
        frame = Payload(f"answer-{tid.decode()}-{attempt}-{status}")
        self.node_frames.setdefault((tid, attempt), []).append(frame)
        if status != Outcome.PARTIAL:
            del node.holds[tid]
        node.last_seen = self.now
        self.handle(PeerMessage(node.route, P.Result(results=(P.ResultItem(tid, attempt, status),)), [frame]))

    # ------------------------------------------------------------ rules

    @initialize()
    def start(self) -> None:
        for route in (b"c1", b"c2"):
            self._hello_client(route)
        self._add_node(frozenset({"a"}), 1, 1)

    def _hello_client(self, route: bytes) -> None:
        key = "key-" + route.decode()
        self.clients[route] = key
        self.sessions[route] = self.sessions.get(route, 0) + 1
        session = b"%s-%d" % (route, self.sessions[route])
        self.handle(PeerMessage(route, P.Hello(session=session), identity=Identity(key, key, "client")))

    @precondition(lambda self: len(self._live_nodes()) < 4)
    @rule(
        skills=st.sets(st.sampled_from(SKILLS[:2]), min_size=1).map(frozenset),
        slots=st.integers(1, 2),
        prefetch=st.integers(0, 1),
    )
    def add_node(self, skills: frozenset[str], slots: int, prefetch: int) -> None:
        self._add_node(skills, slots, prefetch)

    @rule(
        client=st.sampled_from([b"c1", b"c2"]),
        n=st.integers(1, 3),
        skill=st.sampled_from(["a", "b", "a", "b", "c"]),
        timeout=st.none() | st.sampled_from([0.0, 0.5, 1.0, 2.5, 6.0]),
        max_attempts=st.integers(1, 3),
    )
    def submit(self, client: bytes, n: int, skill: str, timeout: float | None, max_attempts: int) -> None:
        tids = [b"t%d" % next(self.tid_counter) for _ in range(n)]
        payloads = [Payload(tid.decode()) for tid in tids]
        for tid, payload in zip(tids, payloads, strict=True):
            deadline = self.now + timeout if timeout is not None else math.inf
            self.tasks[tid] = TaskModel(tid, client, payload, deadline, max_attempts)
        specs = tuple(P.TaskSpec(tid, skill, timeout, max_attempts) for tid in tids)
        self.handle(PeerMessage(client, P.Submit(tasks=specs), list(payloads)))
        limit = MODEL_CONFIG.max_tasks_per_client
        tracked = sum(1 for t in self.s.tasks.values() if t.client.route == client)
        assert tracked <= limit
        for tid in tids:
            task = self.tasks[tid]
            assert (tid in self.s.tasks) != (task.finals == [Outcome.REJECTED])

    @precondition(lambda self: any(t.tid in self.s.tasks for t in self.tasks.values()))
    @rule(data=st.data(), same_client=st.booleans())
    def resubmit_tracked_tid(self, data: st.DataObject, same_client: bool) -> None:
        tid = data.draw(st.sampled_from(sorted(t for t in self.tasks if t in self.s.tasks)))
        owner = self.tasks[tid].client
        client = owner if same_client else (b"c2" if owner == b"c1" else b"c1")
        spec = P.TaskSpec(tid, "a")
        if not same_client:
            self.expected_dup_rejects[(client, tid)] += 1
        out = self.handle(PeerMessage(client, P.Submit(tasks=(spec,)), [Payload("dup")]))
        if same_client:
            assert list(out) == []

    @precondition(lambda self: any(n.holds for n in self._live_nodes()))
    @rule(data=st.data(), status=st.sampled_from([Outcome.OK, Outcome.ERROR, Outcome.PARTIAL]))
    def node_answers(self, data: st.DataObject, status: int) -> None:
        node = data.draw(st.sampled_from([n for n in self._live_nodes() if n.holds]))
        tid = data.draw(st.sampled_from(sorted(node.holds)))
        self._answer(node, tid, status)

    @precondition(lambda self: bool(self._live_nodes()))
    @rule(data=st.data(), attempt=st.integers(1, 3))
    def node_sends_bogus_result(self, data: st.DataObject, attempt: int) -> None:
        node = data.draw(st.sampled_from(self._live_nodes()))
        tid = data.draw(st.sampled_from(sorted(self.tasks) or [b"x"]))
        if node.holds.get(tid) == attempt:
            return
        before = self.s.counters["stale_results"]
        node.last_seen = self.now
        out = self.handle(PeerMessage(node.route, P.Result(results=(P.ResultItem(tid, attempt, 0),)), [Payload("?")]))
        assert [s for s in out if type(s.msg) is P.Result] == []
        assert self.s.counters["stale_results"] == before + 1

    @precondition(lambda self: any(n.dead for n in self.nodes))
    @rule(data=st.data())
    def dead_node_answers_late(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from([n for n in self.nodes if n.dead]))
        tid = data.draw(st.sampled_from(sorted(self.tasks) or [b"x"]))
        out = self.handle(PeerMessage(node.route, P.Result(results=(P.ResultItem(tid, 1, 0),)), [Payload("late")]))
        assert [(s.route, s.msg.code) for s in out if type(s.msg) is P.Error] == [(node.route, "hello-first")]
        assert len(out) == 1

    @precondition(lambda self: any(not n.silent for n in self._live_nodes()))
    @rule(data=st.data())
    def silence_node(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from([n for n in self._live_nodes() if not n.silent]))
        node.silent = True

    @precondition(lambda self: any(n.holds for n in self._live_nodes()))
    @rule(data=st.data())
    def kill_busy_node(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from([n for n in self._live_nodes() if n.holds]))
        node.silent = True
        for _ in range(4):  # the others keep beating; 4 intervals > interval * liveness
            self._advance(MODEL_CONFIG.heartbeat_interval)
        assert node.dead
        assert node.session not in self.s.nodes

    @rule(dt=st.sampled_from([0.125, 0.25, 0.5, 1.0]))
    def advance(self, dt: float) -> None:
        self._advance(dt)

    def _advance(self, dt: float) -> None:
        self.now += dt
        for node in self._live_nodes():
            if not node.silent:
                node.last_seen = self.now
                self.handle(Heartbeat(node.key, P.Heartbeat(session=node.session, epoch=EPOCH)))
        self.handle(Tick())
        self._mark_dead()
        for task in self.tasks.values():
            if task.tid in self.s.tasks:
                assert task.deadline > self.now, "a task outlived its deadline past a tick"

    @precondition(lambda self: bool(self.tasks))
    @rule(data=st.data(), client=st.sampled_from([b"c1", b"c2"]))
    def cancel(self, data: st.DataObject, client: bytes) -> None:
        tid = data.draw(st.sampled_from(sorted(self.tasks)))
        task = self.tasks[tid]
        tracked = tid in self.s.tasks
        out = self.handle(PeerMessage(client, P.Cancel(tids=(tid,))))
        if not tracked or task.client != client:
            assert list(out) == []
            assert (tid in self.s.tasks) == tracked
        else:
            assert tid not in self.s.tasks
            assert task.finals == [Outcome.CANCELLED]

    @rule(client=st.sampled_from([b"c1", b"c2"]))
    def client_bye_and_return(self, client: bytes) -> None:
        for task in self.tasks.values():
            if task.client == client and task.tid in self.s.tasks:
                task.abandoned = True
        out = self.handle(PeerMessage(client, P.Bye()))
        assert [s.msg for s in out if s.route == client] == [P.Bye(reason="bye")]  # the answer, nothing else
        assert not any(t.client.route == client for t in self.s.tasks.values())
        self._hello_client(client)

    # ------------------------------------------------------------ invariants

    @invariant()
    def finals_and_tracking_agree(self) -> None:
        for tid, task in self.tasks.items():
            assert len(task.finals) <= 1
            if task.abandoned or task.finals:
                assert tid not in self.s.tasks
            else:
                assert tid in self.s.tasks, f"{tid!r} vanished without a final result"

    @invariant()
    def inflight_matches_reality(self) -> None:
        for node in self._live_nodes():
            sched_node = self.s.nodes[node.session]
            assert len(sched_node.inflight) <= node.capacity  # slots + prefetch
            assert sched_node.inflight == node.holds

    @invariant()
    def abandoned_work_is_cancelled(self) -> None:
        for node in self._live_nodes():
            for tid in node.holds:
                if tid not in self.s.tasks:
                    assert tid in node.cancelled, f"{node.route!r} was never told to stop {tid!r}"

    @invariant()
    def work_conserving(self) -> None:
        for task in self.s.tasks.values():
            if task.state == "queued":
                for node in self.s.skill_nodes.get(task.skill, ()):
                    assert len(node.inflight) >= node.capacity, f"{task.tid!r} waits while a node has room"

    @invariant()
    def status_is_consistent(self) -> None:
        status = self.s.status()
        queued = sum(1 for t in self.s.tasks.values() if t.state == "queued")
        assert sum(status["queued"].values()) == queued
        assert status["running"] == len(self.s.tasks) - queued
        P.encode(P.StatusReply(status=status))

    # ------------------------------------------------------------ drain

    def teardown(self) -> None:
        # give every skill a healthy node, answer everything, let time pass
        self._add_node(frozenset(SKILLS), 50, 0)
        for _ in range(40):
            for node in self._live_nodes():
                for tid in sorted(node.holds):
                    self._answer(node, tid, Outcome.OK)
            self._advance(1.0)
            if not self.s.tasks:
                break
        assert self.s.tasks == {}
        for node in self._live_nodes():
            assert self.s.nodes[node.session].inflight == {}
        for task in self.tasks.values():
            assert len(task.finals) == (0 if task.abandoned else 1), task
        assert self.rejected_dups == self.expected_dup_rejects


SchedulerMachine.TestCase.settings = settings(
    derandomize=True,
    deadline=None,
    max_examples=120,
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSchedulerMachine = SchedulerMachine.TestCase


# --------------------------------------------------------------------------- restarts, acks and draining


def acks(out: Out, route: bytes) -> list[bytes]:
    """Acknowledgements to a node: in an ACK, or riding along a DISPATCH."""
    got = [tid for m in out.to(route) if type(m) is P.Ack for tid in m.tids]
    return got + [tid for m in out.to(route) if type(m) is P.Dispatch for tid in m.acks]


def acked(sim: Sim, out: Out, route: bytes) -> list[bytes]:
    """What reaches the node by the next tick (standalone ACKs wait for it)."""
    return acks(out, route) + acks(sim.tick(sim.now), route)


def test_every_final_result_is_acknowledged_even_a_stale_one() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    out = sim.result(b"n1", tid, 1)
    assert acks(out, b"n1") == [], "not on the hot path: the ACK waits for a DISPATCH or the tick"
    assert acked(sim, out, b"n1") == [tid]
    out = sim.result(b"n1", tid, 1)  # a duplicate: discarded, but the node may forget it
    assert acked(sim, out, b"n1") == [tid] and out.results(b"c1") == []


def test_node_reconnect_without_a_task_requeues_it_without_a_death() -> None:
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1", max_attempts=1)
    out = sim.node(b"n1-again", key="key-n1", session=b"session-n1", running=())
    # the DISPATCH was lost in transit: the task goes out again, and it is no death
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"n1-again")] == [(tid, 2)]
    assert sim.s.counters["lost"] == 0


def test_restarted_broker_adopts_a_running_task_when_its_client_resubmits() -> None:
    sim = Sim()
    sim.node(b"n1", running=((b"T", 2),))  # the node kept running T through the restart
    assert sim.s.adopted[b"T"][1] == 2
    sim.client(b"c1")
    out, _, _ = sim.submit(b"c1", tids=[b"T"], resubmit=True)
    assert out.dispatched(b"n1") == [], "the running attempt is adopted, not started twice"
    out = sim.result(b"n1", b"T", 2, frame=Payload("answer"))
    assert [(i.tid, i.status) for i, _ in out.results(b"c1")] == [(b"T", Outcome.OK)]
    assert sim.s.adopted == {} and sim.s.tasks == {}


def test_result_that_arrives_before_the_resubmission_waits_as_an_orphan() -> None:
    sim = Sim()
    sim.node(b"n1", running=((b"T", 1),))
    answer = Payload("answer")
    out = sim.result(b"n1", b"T", 1, frame=answer)
    assert acked(sim, out, b"n1") == [b"T"]  # the broker holds it now
    assert b"T" in sim.s.orphans
    sim.client(b"c1")
    out, _, _ = sim.submit(b"c1", tids=[b"T"], resubmit=True)
    assert out.dispatched(b"n1") == []
    ((item, frame),) = out.results(b"c1")
    assert item.status == Outcome.OK and frame is answer
    assert sim.s.orphans == {} and sim.s.tasks == {}


def test_orphans_expire() -> None:
    cfg = SchedulerConfig(heartbeat_interval=100.0, orphan_ttl=5.0)
    sim = Sim(cfg)
    sim.node(b"n1", running=((b"T", 1),))
    sim.result(b"n1", b"T", 1, now=1.0)
    sim.tick(5.9)
    assert b"T" in sim.s.orphans
    sim.tick(6.1)
    assert sim.s.orphans == {}


def test_resubmission_before_the_node_returns_is_attached_when_it_does() -> None:
    sim = Sim()
    sim.client(b"c1")
    sim.submit(b"c1", tids=[b"T"], resubmit=True)  # no node yet: queued
    out = sim.node(b"n1", running=((b"T", 4),))
    assert out.dispatched(b"n1") == [], "the node already runs it"
    out = sim.result(b"n1", b"T", 4)
    assert [(i.tid, i.attempt) for i, _ in out.results(b"c1")] == [(b"T", 4)]


def test_drain_stops_dispatch_and_returned_tasks_are_requeued_for_free() -> None:
    sim = setup(nodes={b"a": {"slots": 2}})
    _, (t1, t2), _ = sim.submit(b"c1", 2, max_attempts=1)
    sim.send(b"a", P.Drain())
    sim.node(b"b", slots=2)
    out, (t3,), _ = sim.submit(b"c1")
    assert out.dispatched(b"a") == [] and [i.tid for i, _ in out.dispatched(b"b")] == [t3]
    out = sim.result(b"a", t2, 1, Outcome.RETURNED)
    assert [(i.tid, i.attempt) for i, _ in out.dispatched(b"b")] == [(t2, 2)]
    assert acked(sim, out, b"a") == [t2] and out.results(b"c1") == []
    assert sim.s.counters["lost"] == 0
    out = sim.result(b"a", t1, 1)
    assert [i.tid for i, _ in out.results(b"c1")] == [t1]


# --------------------------------------------------------------------------- read/write keys


def submit_keyed(sim: Sim, tid: bytes, reads: tuple[str, ...] = (), writes: tuple[str, ...] = (), **kw: Any) -> Out:
    spec = P.TaskSpec(tid, "echo", kw.get("timeout"), 3, reads, writes)
    return sim.send(b"c1", P.Submit(tasks=(spec,)), [Payload(tid.decode())])


def started(out: Out) -> list[bytes]:
    return [i.tid for s in out if type(s.msg) is P.Dispatch for i in s.msg.tasks]


def keyed_sim() -> Sim:
    return setup(nodes={b"n1": {"slots": 8, "prefetch": 0}})


def test_writers_of_a_key_never_overlap_and_start_in_order() -> None:
    sim = keyed_sim()
    assert started(submit_keyed(sim, b"w1", writes=("k",))) == [b"w1"]
    assert started(submit_keyed(sim, b"w2", writes=("k",))) == []
    assert started(submit_keyed(sim, b"w3", writes=("k",))) == []
    assert started(sim.result(b"n1", b"w1", 1)) == [b"w2"]
    assert started(sim.result(b"n1", b"w2", 1)) == [b"w3"]


def test_readers_run_together_and_exclude_writers() -> None:
    sim = keyed_sim()
    assert started(submit_keyed(sim, b"r1", reads=("k",))) == [b"r1"]
    assert started(submit_keyed(sim, b"r2", reads=("k",))) == [b"r2"]
    assert started(submit_keyed(sim, b"w", writes=("k",))) == []
    # a reader arriving after a waiting writer waits behind it (no writer starvation)
    assert started(submit_keyed(sim, b"r3", reads=("k",))) == []
    assert started(sim.result(b"n1", b"r1", 1)) == []
    assert started(sim.result(b"n1", b"r2", 1)) == [b"w"]
    assert started(sim.result(b"n1", b"w", 1)) == [b"r3"]


def test_unrelated_tasks_are_not_held_back() -> None:
    sim = keyed_sim()
    submit_keyed(sim, b"w1", writes=("k",))
    assert started(submit_keyed(sim, b"w2", writes=("k",))) == []
    assert started(submit_keyed(sim, b"other", writes=("j",))) == [b"other"]
    out, (free,), _ = sim.submit(b"c1")
    assert started(out) == [free]


def test_cancelled_or_timed_out_holders_release_their_keys() -> None:
    sim = keyed_sim()
    submit_keyed(sim, b"w1", writes=("k",), timeout=1.0)
    submit_keyed(sim, b"w2", writes=("k",))
    submit_keyed(sim, b"w3", writes=("k",))
    assert started(sim.cancel(b"c1", b"w2")) == []  # a waiting task leaves the line
    sim.beat(b"n1", now=1.0)
    # w1 timed out, but its node may still be running it: the key stays held...
    assert started(sim.tick(1.0)) == []
    # ...until the node answers the CANCEL
    assert started(sim.result(b"n1", b"w1", 1, Outcome.CANCELLED, now=1.1)) == [b"w3"]
    assert sim.s.key_waiting == {} and sim.s.key_zombies == {}


def test_a_task_needing_two_keys_waits_for_both() -> None:
    sim = keyed_sim()
    submit_keyed(sim, b"a", writes=("x",))
    submit_keyed(sim, b"b", writes=("y",))
    assert started(submit_keyed(sim, b"ab", reads=("x",), writes=("y",))) == []
    assert started(sim.result(b"n1", b"a", 1)) == []
    assert started(sim.result(b"n1", b"b", 1)) == [b"ab"]
    sim.result(b"n1", b"ab", 1)
    assert sim.s.key_holders == {} and sim.s.key_waiting == {}


def test_a_requeued_task_keeps_its_keys() -> None:
    sim = setup(nodes={b"a": {"slots": 1, "prefetch": 0}, b"b": {"slots": 1, "prefetch": 0}})
    submit_keyed(sim, b"w1", writes=("k",))
    submit_keyed(sim, b"w2", writes=("k",))
    sim.beat(b"b", now=NODE_TIMEOUT + 0.5)
    out = sim.tick(NODE_TIMEOUT + 0.5)  # the node running w1 died: w1 runs again before w2
    assert [i.tid for s in out if type(s.msg) is P.Dispatch for i in s.msg.tasks] == [b"w1"]


def test_an_old_hello_on_the_same_connection_does_not_requeue() -> None:
    # HELLOs resent during an outage can arrive late, after DISPATCHes sent on the same
    # connection: those tasks are still on their way to the node, not lost
    sim = setup()
    _, (tid,), _ = sim.submit(b"c1")
    out = sim.node(b"n1", key="key-n1", session=b"session-n1", running=())
    assert out.dispatched(b"n1") == []
    assert sim.inflight(b"n1") == {tid: 1}
    assert sim.s.counters["requeued"] == 0


def test_a_cancelled_writer_whose_node_dies_releases_its_key() -> None:
    sim = setup(nodes={b"a": {"slots": 1, "prefetch": 0}, b"b": {"slots": 1, "prefetch": 0}})
    submit_keyed(sim, b"w1", writes=("k",))
    submit_keyed(sim, b"w2", writes=("k",))
    sim.cancel(b"c1", b"w1")
    assert sim.s.key_zombies
    sim.beat(b"b", now=NODE_TIMEOUT + 0.5)
    out = sim.tick(NODE_TIMEOUT + 0.5)  # a (running the cancelled w1) died
    assert started(out) == [b"w2"]
    assert sim.s.key_zombies == {}


def test_a_young_broker_holds_resubmissions_for_returning_nodes() -> None:
    # after a broker restart, a client may resubmit before the node that still runs
    # the task has re-registered: the task must wait for it, not run twice
    sim = Sim()
    sim.client(b"c1")
    sim.node(b"other")
    spec = P.TaskSpec(b"T", "echo")
    out = sim.send(b"c1", P.Submit(tasks=(spec,), resubmit=True), [Payload("T")], now=0.1)
    assert out.dispatched(b"other") == []
    out = sim.node(b"late", running=((b"T", 1),))  # the node that ran it comes back
    assert out.dispatched(b"late") == []
    out = sim.result(b"late", b"T", 1)
    assert [i.tid for i, _ in out.results(b"c1")] == [b"T"]


def test_held_resubmissions_go_out_when_the_grace_ends() -> None:
    sim = Sim()
    sim.client(b"c1")
    sim.node(b"n1", slots=2)
    spec = P.TaskSpec(b"T", "echo")
    sim.send(b"c1", P.Submit(tasks=(spec,), resubmit=True), [Payload("T")], now=0.1)
    grace = NODE_TIMEOUT + 2 * CONFIG.heartbeat_interval
    assert sim.s.next_wakeup() <= grace
    sim.beat(b"n1", now=grace - 0.1)
    assert sim.tick(grace - 0.1).dispatched(b"n1") == []
    sim.beat(b"n1", now=grace)
    out = sim.tick(grace)
    assert [i.tid for i, _ in out.dispatched(b"n1")] == [b"T"]
    # and a first submission is never held
    out = sim.send(b"c1", P.Submit(tasks=(P.TaskSpec(b"U", "echo"),)), [Payload("U")])
    assert [i.tid for i, _ in out.dispatched(b"n1")] == [b"U"]


def test_acks_ride_along_the_next_dispatch() -> None:
    sim = setup(nodes={b"n1": {"slots": 1, "prefetch": 0}})
    _, (t1, t2), _ = sim.submit(b"c1", 2)
    out = sim.result(b"n1", t1, 1)  # frees the slot: t2 goes out, with the ACK of t1
    ((dispatch,),) = [[m for m in out.to(b"n1") if type(m) is P.Dispatch]]
    assert [i.tid for i in dispatch.tasks] == [t2] and dispatch.acks == (t1,)
    assert [m for m in out.to(b"n1") if type(m) is P.Ack] == []


def _full_beat(sim: Sim, route: bytes, running: tuple[tuple[bytes, int], ...], now: float) -> Out:
    msg = P.Heartbeat(session=sim.sessions[route], epoch=EPOCH, running=running, complete=True)
    return sim(Heartbeat(sim.keys[route], msg), now)


def test_a_task_the_node_stops_listing_is_requeued_after_the_grace() -> None:
    sim = setup(nodes={b"a": {"slots": 2}, b"b": {"slots": 2}})
    out, tids, _ = sim.submit(b"c1", 1)
    ((item, _),) = out.dispatched(b"a") or out.dispatched(b"b")
    holder, other = (b"a", b"b") if out.dispatched(b"a") else (b"b", b"a")
    grace = sim.s._grace
    # listed: never reclaimed, however long it runs
    for t in (0.5, 1.0, grace + 1.0, 2 * grace + 2.0):
        _full_beat(sim, holder, ((item.tid, 1),), t)
        sim.beat(other, now=t)
        assert sim.tick(t).dispatched(other) == []
    # an incomplete list (e.g. truncated, or an old node) proves nothing
    t = 2 * grace + 2.5
    sim.beat(holder, now=t)
    assert sim.s.counters["reclaimed"] == 0
    # missing from complete lists: re-queued once the grace has passed, and only then
    start = t + 0.5
    out = _full_beat(sim, holder, (), start)
    assert out.dispatched(other) == []
    sim.beat(other, now=start + grace)
    out = _full_beat(sim, holder, (), start + grace)
    assert out.dispatched(other) == [] and sim.s.counters["reclaimed"] == 0
    out = _full_beat(sim, holder, (), start + grace + 0.5)
    assert sim.s.counters["reclaimed"] == 1
    redo = out.dispatched(other) or out.dispatched(holder)
    assert [(i.tid, i.attempt) for i, _ in redo] == [(tids[0], 2)]
    # the first attempt's late answer is fenced off; the new one is delivered
    done_on = other if out.dispatched(other) else holder
    assert sim.result(holder, tids[0], 1, now=start + grace + 0.6).results(b"c1") == []
    assert [i.tid for i, _ in sim.result(done_on, tids[0], 2, now=start + grace + 0.7).results(b"c1")] == [tids[0]]
