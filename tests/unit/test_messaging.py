"""Agent messaging in the broker's scheduler: direct messages, held mail, topics, the loop guard,
and the question/answer thread of multi-turn tasks.

Pure: :class:`zlink.scheduler.Scheduler` is driven with a fake clock (plain floats) and fake
peers, in the style of test_limits.py (its small helpers are re-written here so that the files
stay independent). Message payloads are plain bytes: the broker measures held mail by length.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from zlink import protocol as P
from zlink.protocol import Outcome
from zlink.scheduler import (
    MAILBOX_BYTES,
    MAILBOX_PER_NAME,
    MAX_TOPICS_PER_PEER,
    Heartbeat,
    Identity,
    PeerGone,
    PeerMessage,
    Scheduler,
    SchedulerConfig,
    Send,
    Tick,
)

EPOCH = b"epoch-msg"
HB = 1.0
LIVENESS = 3

pytestmark = pytest.mark.timeout(30)


def config(**kw: Any) -> SchedulerConfig:
    base: dict[str, Any] = {"heartbeat_interval": HB, "liveness": LIVENESS, "max_message_size": 1 << 20}
    return SchedulerConfig(**{**base, **kw})


class Out(list[Send]):
    def to(self, route: bytes, kind: type[P.Message] | None = None) -> list[Send]:
        return [s for s in self if s.route == route and (kind is None or type(s.msg) is kind)]

    def delivered(self, route: bytes) -> list[tuple[P.Deliver, Any]]:
        return [(s.msg, s.frames[0]) for s in self.to(route, P.Deliver)]  # type: ignore[misc]

    def sent(self, route: bytes) -> list[P.Sent]:
        return [s.msg for s in self.to(route, P.Sent)]  # type: ignore[misc]

    def errors(self, route: bytes) -> list[P.Error]:
        return [s.msg for s in self.to(route, P.Error)]  # type: ignore[misc]

    def results(self, route: bytes) -> list[tuple[P.ResultItem, Any]]:
        out: list[tuple[P.ResultItem, Any]] = []
        for s in self.to(route, P.Result):
            out.extend(zip(s.msg.results, s.frames, strict=True))  # type: ignore[attr-defined]
        return out


class Sim:
    """A scheduler, a fake clock, and shorthands for what peers send."""

    def __init__(self, cfg: SchedulerConfig | None = None, now: float = 0.0) -> None:
        self.s = Scheduler(epoch=EPOCH, config=cfg or config(), now=now)
        self.now = now
        self._mids = itertools.count(1)

    def __call__(self, event: Any, now: float | None = None) -> Out:
        if now is not None:
            assert now >= self.now, "the fake clock only moves forward"
            self.now = now
        out = Out(self.s.handle(event, self.now))
        for send in out:  # all of it must survive the wire
            assert P.decode(P.encode(send.msg), len(send.frames)) == send.msg
        return out

    def hello(
        self, route: bytes, name: str, *, hat: str = "client", role: str | None = None, key: str | None = None,
        claimed: str = "", session: bytes | None = None, now: float | None = None, **kw: Any,
    ) -> Out:  # fmt: skip
        """HELLO from ``route`` authenticated as the key named ``name`` (``claimed``: the name it asks for)."""
        msg = P.Hello(name=claimed, role=hat, session=session or b"session-" + route, **kw)
        identity = Identity(key or "key-" + name, name, role or hat)
        return self(PeerMessage(route, msg, identity=identity), now)

    def node(self, route: bytes, name: str, skills: tuple[str, ...] = ("ask",), slots: int = 1) -> Out:
        """HELLO from a node, and its first heartbeat (as a live node sends at once)."""
        out = self.hello(route, name, hat="node", skills={s: {} for s in skills}, slots=slots)
        out.extend(self(Heartbeat("key-" + name, P.Heartbeat(session=b"session-" + route, epoch=EPOCH))))
        return out

    def mid(self) -> bytes:
        return b"m%d" % next(self._mids)

    def send(
        self, route: bytes, to: str, body: bytes = b"hi", *, ttl: float = 60.0, mid: bytes | None = None,
        now: float | None = None,
    ) -> tuple[Out, bytes]:  # fmt: skip
        mid = mid or self.mid()
        return self(PeerMessage(route, P.SendMessage(to=to, mid=mid, ttl=ttl), [body]), now), mid

    def publish(self, route: bytes, topic: str, body: bytes = b"news") -> tuple[Out, bytes]:
        mid = self.mid()
        return self(PeerMessage(route, P.Publish(topic=topic, mid=mid), [body])), mid

    def subscribe(self, route: bytes, *topics: str, stop: bool = False) -> Out:
        return self(PeerMessage(route, P.Subscribe(topics=topics, stop=stop)))

    def bye(self, route: bytes) -> Out:
        return self(PeerMessage(route, P.Bye(reason="done")))

    def tick(self, now: float) -> Out:
        return self(Tick(), now)


def ok(out: Out, route: bytes, mid: bytes) -> bool:
    return [(s.mid, s.ok) for s in out.sent(route)] == [(mid, True)]


def refused(out: Out, route: bytes, mid: bytes) -> str:
    """The reason of the one SENT ok=false for ``mid`` (fails if it was delivered or not answered)."""
    answers = out.sent(route)
    assert [(s.mid, s.ok) for s in answers] == [(mid, False)], answers
    return answers[0].reason


# --------------------------------------------------------------------------- direct messages


def test_a_message_carries_the_senders_key_name_not_the_name_it_claims() -> None:
    sim = Sim()
    sim.hello(b"A", "alice", claimed="bob")  # asks to be called bob: a display name, no more
    sim.hello(b"B", "bob")
    body = b"\xc1M\x01 opaque sealed bytes"
    out, mid = sim.send(b"A", "bob", body)
    [(deliver, frame)] = out.delivered(b"B")
    assert deliver == P.Deliver(sender="alice", mid=mid, topic="")
    assert frame is body  # carried untouched
    assert ok(out, b"A", mid)
    assert out.delivered(b"A") == []
    # addressed by key name: the display name "bob" that alice asked for is not an address
    out, mid2 = sim.send(b"B", "alice", b"back")
    assert [d.sender for d, _ in out.delivered(b"A")] == ["bob"]
    assert ok(out, b"B", mid2)
    assert sim.s.counters["messages"] == 2


def test_node_and_client_roles_both_send_and_receive() -> None:
    sim = Sim()
    sim.node(b"N", "worker")
    sim.hello(b"C", "coord")
    out, mid = sim.send(b"N", "coord", b"from the node")
    assert [d.sender for d, _ in out.delivered(b"C")] == ["worker"]
    assert ok(out, b"N", mid)
    out, mid = sim.send(b"C", "worker")
    assert [d.sender for d, _ in out.delivered(b"N")] == ["coord"]
    assert ok(out, b"C", mid)


def test_messages_between_two_peers_keep_their_order() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    sim.hello(b"B", "bob")
    got = []
    for i in range(200):
        out, _ = sim.send(b"A", "bob", b"%d" % i)
        got += [f for _, f in out.delivered(b"B")]
    assert got == [b"%d" % i for i in range(200)]


def test_the_newest_session_of_a_key_receives_its_messages() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    sim.hello(b"B1", "bob", key="kb")
    sim.hello(b"B2", "bob", key="kb")  # a second process with the same key, newer
    out, mid = sim.send(b"A", "bob", b"one")
    assert len(out.delivered(b"B2")) == 1 and out.delivered(b"B1") == []
    assert ok(out, b"A", mid)
    # the newest leaves: the other live session takes over
    sim.bye(b"B2")
    out, _ = sim.send(b"A", "bob", b"two")
    assert [f for _, f in out.delivered(b"B1")] == [b"two"]
    # a session that says HELLO again (a reconnect) is the newest again
    sim.hello(b"B3", "bob", key="kb")
    out, _ = sim.send(b"A", "bob", b"three")
    assert [f for _, f in out.delivered(b"B3")] == [b"three"] and out.delivered(b"B1") == []
    # nobody left: the message waits
    sim.bye(b"B3")
    sim.bye(b"B1")
    out, mid = sim.send(b"A", "bob", b"four")
    assert out.sent(b"A") == [] and "bob" in sim.s.mailbox


def test_a_message_from_an_unknown_connection_is_refused() -> None:
    sim = Sim()
    sim.hello(b"B", "bob")
    out, _ = sim.send(b"X", "bob")  # no HELLO on this connection
    assert [e.code for e in out.errors(b"X")] == ["hello-first"]
    assert out.delivered(b"B") == []


# --------------------------------------------------------------------------- held mail


def test_messages_for_an_absent_name_wait_and_arrive_in_order_when_it_connects() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    mids = []
    for i in range(3):
        out, mid = sim.send(b"A", "carol", b"held-%d" % i, ttl=30.0, now=float(i))
        assert out.sent(b"A") == []  # not delivered, not refused: held
        mids.append(mid)
    assert sim.s.held_bytes == 3 * len(b"held-0")
    out = sim.hello(b"C", "carol", now=5.0)
    # WELCOME first: a sealed message can only be opened by a peer that knows its own key name
    assert [type(s.msg) for s in out.to(b"C")] == [P.Welcome, P.Deliver, P.Deliver, P.Deliver]
    assert [(d.sender, d.mid, f) for d, f in out.delivered(b"C")] == [
        ("alice", mids[i], b"held-%d" % i) for i in range(3)
    ]
    assert [(s.mid, s.ok) for s in out.sent(b"A")] == [(m, True) for m in mids]
    assert sim.s.mailbox == {} and sim.s.held_bytes == 0
    # nothing is delivered twice
    out = sim.tick(100.0)
    assert out.delivered(b"C") == [] and out.sent(b"A") == []


def test_a_held_message_expires_after_its_ttl_and_the_sender_is_told() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    _, mid = sim.send(b"A", "carol", b"x", ttl=5.0)
    assert sim.tick(4.5).sent(b"A") == []
    out = sim.tick(5.5)
    why = refused(out, b"A", mid)
    assert why.startswith("undeliverable") and "'carol' did not connect in time" in why
    assert sim.s.mailbox == {} and sim.s.held_bytes == 0
    assert sim.s.counters["undeliverable"] == 1
    # carol connects afterwards: nothing for her
    out = sim.hello(b"C", "carol")
    assert out.delivered(b"C") == []


def test_the_broker_caps_the_ttl_at_its_max_message_ttl() -> None:
    sim = Sim(config(max_message_ttl=2.0))
    sim.hello(b"A", "alice")
    _, mid = sim.send(b"A", "carol", ttl=3600.0)
    assert sim.tick(1.5).sent(b"A") == []
    assert "did not connect in time" in refused(sim.tick(2.5), b"A", mid)


def test_ttl_zero_means_now_or_never() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    out, mid = sim.send(b"A", "carol", ttl=0.0)
    assert refused(out, b"A", mid) == "undeliverable: 'carol' is not connected"
    assert sim.s.mailbox == {}


def test_a_sender_that_left_is_not_told_about_expiry_and_nothing_breaks() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    sim.send(b"A", "carol", ttl=1.0)
    sim.bye(b"A")
    out = sim.tick(2.0)
    assert out == [] or all(s.route != b"A" for s in out)
    assert sim.s.mailbox == {}
    # a message held for carol from a sender that left is still delivered
    sim.hello(b"A2", "alice")
    sim.send(b"A2", "carol", b"late", ttl=10.0)
    sim.bye(b"A2")
    out = sim.hello(b"C", "carol")
    assert [(d.sender, f) for d, f in out.delivered(b"C")] == [("alice", b"late")]


def test_the_mailbox_holds_at_most_so_many_messages_per_name() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    for _ in range(MAILBOX_PER_NAME):
        out, _ = sim.send(b"A", "carol", b"x")
        assert out.sent(b"A") == []
    out, mid = sim.send(b"A", "carol", b"x")
    assert "holds too many messages for 'carol'" in refused(out, b"A", mid)
    assert len(sim.s.mailbox["carol"]) == MAILBOX_PER_NAME
    # another absent name has its own box
    out, _ = sim.send(b"A", "dave", b"x")
    assert out.sent(b"A") == [] and len(sim.s.mailbox["dave"]) == 1
    # carol connects: she gets exactly the ones held
    out = sim.hello(b"C", "carol")
    assert len(out.delivered(b"C")) == MAILBOX_PER_NAME
    assert sum(s.ok for s in out.sent(b"A")) == MAILBOX_PER_NAME


def test_the_mailbox_holds_at_most_so_many_bytes_in_all() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    big = bytes(MAILBOX_BYTES // 2 - 10)  # one object, carried by reference
    for name in ("carol", "dave"):
        out, _ = sim.send(b"A", name, big)
        assert out.sent(b"A") == []
    out, mid = sim.send(b"A", "erin", big)
    assert "holds too many messages for 'erin'" in refused(out, b"A", mid)
    assert sim.s.held_bytes == 2 * len(big)
    # delivering frees room
    sim.hello(b"C", "carol")
    assert sim.s.held_bytes == len(big)
    out, _ = sim.send(b"A", "erin", big)
    assert out.sent(b"A") == []


def test_a_short_ttl_message_behind_a_long_one_still_expires_on_time() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    sim.send(b"A", "carol", b"patient", ttl=300.0)
    _, mid = sim.send(b"A", "carol", b"urgent", ttl=2.0)
    out = sim.tick(3.0)
    assert "did not connect in time" in refused(out, b"A", mid)


def test_a_message_for_a_client_whose_connection_is_gone_is_not_reported_delivered() -> None:
    sim = Sim()
    sim.hello(b"A", "alice")
    sim.hello(b"B", "bob")
    sim(PeerGone(b"B"))  # the broker's send to bob's route failed: the connection is gone
    out, mid = sim.send(b"A", "bob", b"into the void", ttl=5.0)
    assert out.sent(b"A") == [] or refused(out, b"A", mid)


# --------------------------------------------------------------------------- topics


def test_a_topic_fans_out_to_every_subscriber_but_the_publisher() -> None:
    sim = Sim()
    for r, n in ((b"P", "pub"), (b"S1", "s1"), (b"S2", "s2"), (b"S3", "s3"), (b"X", "other")):
        sim.hello(r, n)
    for r in (b"P", b"S1", b"S2", b"S3"):
        sim.subscribe(r, "news", "weather")
    sim.subscribe(b"X", "sports")
    out, mid = sim.publish(b"P", "news", b"extra")
    for r in (b"S1", b"S2", b"S3"):
        assert [(d.sender, d.topic, d.mid, f) for d, f in out.delivered(r)] == [("pub", "news", mid, b"extra")]
    assert out.delivered(b"P") == [] and out.delivered(b"X") == []
    assert ok(out, b"P", mid)
    assert sim.s.counters["published"] == 1
    # unsubscribing stops it; the other topic stays
    sim.subscribe(b"S2", "news", stop=True)
    out, _ = sim.publish(b"P", "news")
    assert {s.route for s in out if type(s.msg) is P.Deliver} == {b"S1", b"S3"}
    out, _ = sim.publish(b"P", "weather")
    assert len(out.delivered(b"S2")) == 1
    # a topic nobody subscribes to: published to no one, still ok
    out, mid = sim.publish(b"P", "empty")
    assert ok(out, b"P", mid) and [s for s in out if type(s.msg) is P.Deliver] == []


def test_roles_node_may_subscribe_but_not_publish() -> None:
    sim = Sim()
    sim.node(b"N", "worker")
    sim.hello(b"C", "coord")
    sim.hello(b"B", "both-key", role="both")
    sim.hello(b"D", "admin-key", role="admin")
    sim.subscribe(b"N", "jobs")
    out, mid = sim.publish(b"N", "jobs", b"i am a node")
    assert refused(out, b"N", mid) == "forbidden: role 'node' may not publish"
    assert [s for s in out if type(s.msg) is P.Deliver] == []
    for route in (b"C", b"B", b"D"):
        out, mid = sim.publish(route, "jobs", b"work")
        assert ok(out, route, mid)
        assert len(out.delivered(b"N")) == 1


def test_a_peer_that_leaves_is_taken_off_its_topics() -> None:
    sim = Sim()
    sim.hello(b"P", "pub")
    sim.hello(b"S1", "s1")
    sim.node(b"N", "worker")
    sim.subscribe(b"S1", "a", "b")
    sim.subscribe(b"N", "a")
    assert set(sim.s.topics) == {"a", "b"}
    sim.bye(b"S1")
    assert set(sim.s.topics) == {"a"}  # empty topics are forgotten
    out, _ = sim.publish(b"P", "b")
    assert out.delivered(b"S1") == []
    # a node declared dead is taken off too
    out = sim.tick(HB * LIVENESS + 1)
    assert sim.s.topics == {}
    out, _ = sim.publish(b"P", "a")
    assert [s for s in out if type(s.msg) is P.Deliver] == []
    # the same key coming back starts with no topics (its peer subscribes again itself)
    sim.hello(b"S1b", "s1")
    out, _ = sim.publish(b"P", "a")
    assert out.delivered(b"S1b") == []


def test_topics_per_peer_are_bounded() -> None:
    sim = Sim()
    sim.hello(b"S", "s")
    topics = [f"t{i}" for i in range(MAX_TOPICS_PER_PEER + 5)]
    for i in range(0, len(topics), 500):
        sim.subscribe(b"S", *topics[i : i + 500])
    assert len(sim.s.peers[b"S"].topics) == MAX_TOPICS_PER_PEER
    assert len(sim.s.topics) == MAX_TOPICS_PER_PEER


# --------------------------------------------------------------------------- the loop guard


def pair(sim: Sim) -> None:
    sim.hello(b"A", "alice")
    sim.hello(b"B", "bob")


def test_a_one_way_stream_is_one_turn_whatever_its_length() -> None:
    sim = Sim(config(max_conversation_turns=2, max_conversation_rate=1.0))
    pair(sim)
    for i in range(5000):
        out, mid = sim.send(b"A", "bob", b"%d" % i)
        assert ok(out, b"A", mid)
    assert sim.s.counters["loop_guard"] == 0
    # the reply is the second turn; a second reply from bob is the same turn
    for _ in range(50):
        out, mid = sim.send(b"B", "alice", now=5.0)
        assert ok(out, b"B", mid)
    assert sim.s.convos[("alice", "bob")][0] == 2


def test_alternating_messages_hit_the_turn_limit_and_both_sides_are_told() -> None:
    sim = Sim(config(max_conversation_turns=4, max_conversation_rate=0.0))
    pair(sim)
    sim.hello(b"C", "carol")
    routes = [b"A", b"B"]
    names = ["bob", "alice"]
    for turn in range(4):
        out, mid = sim.send(routes[turn % 2], names[turn % 2], now=float(turn))
        assert ok(out, routes[turn % 2], mid), turn
    out, mid = sim.send(b"A", "bob", now=10.0)  # the fifth turn
    why = refused(out, b"A", mid)
    assert why.startswith("loop-guard: 4 turns between 'alice' and 'bob'")
    assert "max_conversation_turns" in why and "paused for 3590 s" in why
    assert out.delivered(b"B") == []
    # both peers are told, without task ids (it is about their conversation)
    for route in (b"A", b"B"):
        assert [(e.code, e.message, e.tids) for e in out.errors(route)] == [("loop-guard", why, ())]
    assert out.to(b"C") == []
    assert sim.s.counters["loop_guard"] == 1
    # still paused later in the hour
    out, mid = sim.send(b"A", "bob", now=1800.0)
    assert "is paused for 1800 s more" in refused(out, b"A", mid)
    assert out.errors(b"A") == [] and out.errors(b"B") == []  # only a new pause is announced
    # other conversations are unaffected
    out, mid = sim.send(b"A", "carol", now=1800.0)
    assert ok(out, b"A", mid)
    out, mid = sim.send(b"C", "alice", now=1800.0)
    assert ok(out, b"C", mid)
    # the hour ends: the conversation may go on
    out, mid = sim.send(b"A", "bob", now=3601.0)
    assert ok(out, b"A", mid) and len(out.delivered(b"B")) == 1


def test_a_paused_conversation_carries_no_message_either_way() -> None:
    sim = Sim(config(max_conversation_turns=2, max_conversation_rate=0.0))
    pair(sim)
    sim.send(b"A", "bob", now=1.0)
    sim.send(b"B", "alice", now=2.0)
    out, mid = sim.send(b"A", "bob", now=3.0)
    assert "max_conversation_turns" in refused(out, b"A", mid)  # paused for the rest of the hour
    out, mid = sim.send(b"B", "alice", now=4.0)  # bob spoke last
    assert out.delivered(b"A") == []
    assert refused(out, b"B", mid).startswith("loop-guard")


def test_the_turn_limit_counts_per_window() -> None:
    sim = Sim(config(max_conversation_turns=3, max_conversation_rate=0.0, conversation_window=100.0))
    pair(sim)
    i = 0
    for window in range(10):  # three turns in each of ten windows: never over
        for j in range(3):
            route, to = (b"A", "bob") if i % 2 == 0 else (b"B", "alice")
            out, mid = sim.send(route, to, now=window * 100.0 + j)
            assert ok(out, route, mid), (window, j)
            i += 1
    assert sim.s.counters["loop_guard"] == 0
    # a fourth turn within the last window is one too many
    route, to = (b"A", "bob") if i % 2 == 0 else (b"B", "alice")
    out, mid = sim.send(route, to, now=950.0)
    assert "3 turns between 'alice' and 'bob' within 100 s" in refused(out, route, mid)


def test_the_turn_rate_pauses_the_conversation_for_a_while() -> None:
    sim = Sim(config(max_conversation_turns=10_000, max_conversation_rate=2.0, loop_pause=10.0))
    pair(sim)
    # a burst of up to max(1, rate) turns passes
    out, m1 = sim.send(b"A", "bob", now=100.0)
    out2, m2 = sim.send(b"B", "alice", now=100.0)
    assert ok(out, b"A", m1) and ok(out2, b"B", m2)
    out, m3 = sim.send(b"A", "bob", now=100.0)
    why = refused(out, b"A", m3)
    assert why == (
        "loop-guard: more than 2 turns per second between 'alice' and 'bob' (max_conversation_rate); paused for 10 s"
    )
    assert [e.message for e in out.errors(b"A")] == [why] and [e.message for e in out.errors(b"B")] == [why]
    # paused: still refused just before the pause ends
    out, m4 = sim.send(b"A", "bob", now=109.9)
    assert refused(out, b"A", m4).startswith("loop-guard: the conversation between 'alice' and 'bob' is paused")
    assert out.errors(b"B") == []  # only a new pause is announced
    # the pause ends: the conversation goes on
    out, m5 = sim.send(b"A", "bob", now=110.0)
    assert ok(out, b"A", m5) and len(out.delivered(b"B")) == 1
    assert sim.s.counters["loop_guard"] == 1


def test_turns_slower_than_the_rate_are_never_paused() -> None:
    sim = Sim(config(max_conversation_turns=10_000, max_conversation_rate=2.0))
    pair(sim)
    for i in range(300):
        route, to = (b"A", "bob") if i % 2 == 0 else (b"B", "alice")
        out, mid = sim.send(route, to, now=i * 0.5)
        assert ok(out, route, mid), i
    assert sim.s.counters["loop_guard"] == 0


def test_rate_zero_turns_the_rate_limit_off() -> None:
    sim = Sim(config(max_conversation_turns=10_000, max_conversation_rate=0.0))
    pair(sim)
    for i in range(2000):
        route, to = (b"A", "bob") if i % 2 == 0 else (b"B", "alice")
        out, mid = sim.send(route, to, now=1.0)
        assert ok(out, route, mid), i


def test_the_loop_guard_tells_only_the_peers_that_are_connected() -> None:
    sim = Sim(config(max_conversation_turns=1, max_conversation_rate=0.0))
    sim.hello(b"A", "alice")
    sim.hello(b"D", "dave")
    out, mid = sim.send(b"D", "alice")  # turn one
    assert ok(out, b"D", mid)
    sim.bye(b"D")
    out, mid = sim.send(b"A", "dave", ttl=10.0)  # turn two, to a peer that left
    assert "max_conversation_turns" in refused(out, b"A", mid)
    assert [e.code for e in out.errors(b"A")] == ["loop-guard"]
    assert [s for s in out if s.route == b"D"] == []
    assert sim.s.mailbox == {}  # refused, not held


# --------------------------------------------------------------------------- questions and answers


class TaskSim(Sim):
    """A client and a node with skill ``ask``; tasks are submitted and dispatched."""

    def __init__(self, cfg: SchedulerConfig | None = None) -> None:
        super().__init__(cfg)
        self._tids = itertools.count(1)
        self.node(b"N", "worker")
        self.hello(b"C", "alice", key="kc")

    def submit(self, route: bytes = b"C", skill: str = "ask") -> tuple[Out, bytes]:
        tid = b"t%d" % next(self._tids)
        msg = P.Submit(tasks=(P.TaskSpec(tid, skill, None),), resubmit=False)
        return self(PeerMessage(route, msg, [b"payload"])), tid

    def question(self, tid: bytes, seq: int, attempt: int = 1, status: int = Outcome.QUESTION) -> Out:
        item = P.ResultItem(tid, attempt, status)
        return self(PeerMessage(b"N", P.Result(results=(item,)), [b"q%d" % seq]))

    def answer(self, route: bytes, tid: bytes, seq: int, body: bytes = b"answer") -> Out:
        return self(PeerMessage(route, P.Answer(tid=tid, seq=seq), [body]))


def test_questions_go_to_the_client_and_answers_to_the_node_running_the_task() -> None:
    sim = TaskSim()
    out, tid = sim.submit()
    assert [i.tid for s in out.to(b"N", P.Dispatch) for i in s.msg.tasks] == [tid]  # type: ignore[attr-defined]
    out = sim.question(tid, 1)
    assert [(i.tid, i.attempt, i.status, f) for i, f in out.results(b"C")] == [(tid, 1, Outcome.QUESTION, b"q1")]
    out = sim.answer(b"C", tid, 1, b"four days")
    [send] = out.to(b"N")
    assert send.msg == P.Answer(tid=tid, seq=1, attempt=1)  # the broker fills in the attempt
    assert send.frames == [b"four days"]
    # a second question and answer on the same task
    out = sim.question(tid, 2)
    assert [i.status for i, _ in out.results(b"C")] == [Outcome.QUESTION]
    out = sim.answer(b"C", tid, 2)
    assert [s.msg.seq for s in out.to(b"N", P.Answer)] == [2]  # type: ignore[attr-defined]
    # the task ends: an answer that comes now goes nowhere
    sim.question(tid, 0, status=Outcome.OK)
    out = sim.answer(b"C", tid, 3)
    assert out == []
    assert tid not in sim.s.tasks


def test_answers_come_only_from_the_key_that_submitted_the_task() -> None:
    sim = TaskSim()
    _, tid = sim.submit()
    sim.hello(b"M", "mallory", key="km")  # another client key
    sim.hello(b"C2", "alice", key="kc", session=b"other-session")  # another session of alice's key
    sim.question(tid, 1)
    assert sim.answer(b"M", tid, 1, b"forged") == []  # not yours: no oracle, nothing forwarded
    assert sim.s.counters["stale_answers"] == 0
    out = sim.answer(b"C2", tid, 1, b"from alice's other session")
    assert [s.frames for s in out.to(b"N", P.Answer)] == [[b"from alice's other session"]]
    # unknown task ids: silence
    assert sim.answer(b"C", b"no-such-task", 1) == []
    # a node may not answer
    out = sim(PeerMessage(b"N", P.Answer(tid=tid, seq=1), [b"x"]))
    assert [e.code for e in out.errors(b"N")] == ["unexpected"]


def test_answers_for_a_task_that_is_not_running_are_dropped() -> None:
    sim = TaskSim()
    _, t1 = sim.submit()
    _, t2 = sim.submit()  # the node has one slot (and prefetch 0): t2 stays queued
    assert sim.s.tasks[t2].state == "queued"
    assert sim.answer(b"C", t2, 1) == []
    assert sim.s.counters["stale_answers"] == 1
    # the node dies: t1 goes back to the queue, and an answer to its old question is stale
    sim.question(t1, 1)
    sim.tick(HB * LIVENESS + 1)
    assert sim.s.tasks[t1].state == "queued"
    assert sim.answer(b"C", t1, 1) == []
    assert sim.s.counters["stale_answers"] == 2


def test_a_task_may_ask_so_many_questions_and_no_more() -> None:
    sim = TaskSim(config(max_task_questions=2))
    _, tid = sim.submit()
    for seq in (1, 2):
        out = sim.question(tid, seq)
        assert [i.status for i, _ in out.results(b"C")] == [Outcome.QUESTION]
    out = sim.question(tid, 3)
    assert out.results(b"C") == []  # not forwarded
    [err] = out.errors(b"N")
    assert (err.code, err.tids) == ("loop-guard", (tid,))
    assert err.message == "loop-guard: task asked more than 2 questions (max_task_questions)"
    assert sim.s.counters["loop_guard"] == 1
    # the task itself goes on and may still finish
    out = sim.question(tid, 0, status=Outcome.OK)
    assert [i.status for i, _ in out.results(b"C")] == [Outcome.OK]
    # another task has its own count
    _, t2 = sim.submit()
    out = sim.question(t2, 1)
    assert [i.status for i, _ in out.results(b"C")] == [Outcome.QUESTION]


def test_questions_of_a_stale_attempt_are_not_forwarded() -> None:
    sim = TaskSim()
    _, tid = sim.submit()
    out = sim.question(tid, 1, attempt=7)  # no such attempt running
    assert out.results(b"C") == []
    assert sim.s.counters["stale_results"] == 1
