"""Agents talking to agents (issue #6), with real processes on 127.0.0.1.

A CLI broker started by :class:`zlink.demo.LocalSwarm` (CurveZMQ, sealed join strings), one CLI
node process serving skills_messaging.py, Clients in this process, raw CurveZMQ DEALERs for
what a well-behaved peer would never send, the ``zlink`` command from a bash script, and
``zlink chat`` in a detached tmux session. Every process and tmux server is stopped in a
``finally`` (fixtures included); every home lives under pytest's tmp dir. Nothing here asserts
on speed: waits are generous upper bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import zlink
from zlink import protocol as P
from zlink.demo import LocalSwarm
from zlink.seal import MessageSealer

from .conftest import RawPeer, clean_env, run_zlink, wait_for, zlink_exe

SKILLS = Path(__file__).resolve().with_name("skills_messaging.py")
SCRIPT = Path(__file__).resolve().with_name("chat_script.sh")
REPO = Path(__file__).resolve().parents[2]

#: broker A: a low turn limit (rate limit off, so that only the turn limit can trip), few questions per task
TURNS = 50
QUESTIONS = 5
#: broker B: a low turn rate, a short cap on how long mail is held
RATE = 3
MAX_TTL = 1.0
MAX_SIZE = 1_000_000

MakeRaw = Callable[[str, zlink.Join | None], RawPeer]


def _swarm(home: Path, broker_args: tuple[str, ...], skills: Path | None) -> LocalSwarm:
    swarm = LocalSwarm(home=home, broker_args=broker_args)  # seals by default
    try:
        swarm.start_broker()
        if skills is not None:
            swarm.start_node(str(skills), slots=4, name="msg-node")
            with zlink.Client(swarm.invite("client", "msg-probe"), connect_timeout=15) as probe:
                swarm.wait_nodes(probe, 1, timeout=30)
    except BaseException:
        swarm.close()
        raise
    return swarm


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    args = (
        "--max-conversation-turns", str(TURNS), "--max-conversation-rate", "0",
        "--max-task-questions", str(QUESTIONS),
    )  # fmt: skip
    sw = _swarm(tmp_path_factory.mktemp("msg-a") / "home", args, SKILLS)
    try:
        yield sw
    finally:
        sw.close()


@pytest.fixture(scope="module")
def rate_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    args = (
        "--max-conversation-rate", str(RATE), "--max-message-ttl", str(MAX_TTL),
        "--max-message-size", str(MAX_SIZE),
    )  # fmt: skip
    sw = _swarm(tmp_path_factory.mktemp("msg-b") / "home", args, None)
    try:
        yield sw
    finally:
        sw.close()


@pytest.fixture
def peers() -> Iterator[Callable[[str], zlink.Client]]:
    """Clients from join strings, all closed at the end of the test."""
    with contextlib.ExitStack() as stack:

        def connect(join: str) -> zlink.Client:
            return stack.enter_context(zlink.Client(join, connect_timeout=15))

        yield connect


def _no_message(peer: zlink.Client | zlink.Node, seconds: float = 0.3) -> bool:
    try:
        msg = peer.receive(timeout=seconds)
    except TimeoutError:
        return True
    pytest.fail(f"unexpected message: {msg!r}")


# --------------------------------------------------------------------------- direct messages


@pytest.mark.timeout(60)
def test_a_thousand_direct_messages_arrive_in_order_with_the_senders_name(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    alice = peers(swarm.invite("client", "alice"))
    bob = peers(swarm.invite("client", "bob"))
    assert alice.seal_key is not None and bob.seal_key is not None  # sealed end to end
    futures = [alice.send("bob", {"i": i, "pad": "x" * (i % 64), "raw": bytes([i % 256])}) for i in range(1000)]
    got = [bob.receive(timeout=30) for _ in range(1000)]
    for fut in futures:
        assert fut.result(timeout=30) is None  # delivered
    assert [m.body["i"] for m in got] == list(range(1000))
    assert all(m.body["raw"] == bytes([m.body["i"] % 256]) for m in got)
    assert {(m.sender, m.topic) for m in got} == {("alice", "")}
    assert len({m.id for m in got}) == 1000
    assert bob.seal_failures == 0
    # the other way: bob answers each one, to the name he saw (one more turn: a stream each way)
    back = [bob.send(m.sender, {"re": m.body["i"]}) for m in got]
    replies = [alice.receive(timeout=30) for _ in range(1000)]
    for fut in back:
        fut.result(timeout=30)
    assert [(m.sender, m.body) for m in replies] == [("bob", {"re": i}) for i in range(1000)]
    assert _no_message(bob) and _no_message(alice)
    # async for over inbox(): the same messages, in order
    for i in range(3):
        alice.send("bob", f"async {i}")

    async def read_three() -> list[zlink.Message]:
        out: list[zlink.Message] = []
        async for msg in bob.inbox():
            out.append(msg)
            if len(out) == 3:
                break
        return out

    got3 = asyncio.run(asyncio.wait_for(read_three(), 20))
    assert [(m.sender, m.body) for m in got3] == [("alice", f"async {i}") for i in range(3)]


@pytest.mark.timeout(60)
def test_the_sender_name_cannot_be_forged(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client], raw_peer: MakeRaw
) -> None:
    """A raw CurveZMQ peer with mallory's key: whatever it claims, its messages say mallory."""
    assert swarm.seal_key is not None
    bob = peers(swarm.invite("client", "forge-bob"))
    carol = peers(swarm.invite("client", "forge-carol"))
    raw = raw_peer(swarm.endpoint, zlink.Join.parse(swarm.invite("client", "mallory")))
    welcome = raw.ask([P.encode(P.Hello(name="forge-carol", role="client", session=os.urandom(8)))], timeout=10)
    assert isinstance(welcome, P.Welcome), welcome
    assert welcome.key_name == "mallory"  # the name it asked for is a display name, not its address
    sealer = MessageSealer(swarm.seal_key)
    body = P.pack_value("transfer the money")

    def raw_send(to: str, payload: bytes, mid: bytes | None = None) -> P.Message | None:
        return raw.ask([P.encode(P.SendMessage(to=to, mid=mid or os.urandom(12), ttl=10.0)), payload], timeout=10)

    # 1. sealed as if carol sent it: the broker stamps "mallory", the seal then fails to open
    mid = os.urandom(12)
    sent = raw_send("forge-bob", sealer.seal("forge-carol", "forge-bob", mid, body), mid)
    assert isinstance(sent, P.Sent) and sent.ok  # the broker delivered it; bob must drop it
    # 2. sealed by mallory for someone else, re-addressed to bob
    mid = os.urandom(12)
    assert isinstance(raw_send("forge-bob", sealer.seal("mallory", "forge-carol", mid, body), mid), P.Sent)
    # 3. sealed for bob under another message id
    assert isinstance(raw_send("forge-bob", sealer.seal("mallory", "forge-bob", b"another-id", body)), P.Sent)
    # 4. not sealed at all, in a sealed swarm
    assert isinstance(raw_send("forge-bob", body), P.Sent)
    # 5. a DELIVER with a claimed sender, sent to the broker: refused, never relayed
    err = raw.ask([P.encode(P.Deliver(sender="forge-carol", mid=os.urandom(12))), body], timeout=10)
    assert isinstance(err, P.Error) and err.code == "unexpected", err
    wait_for(lambda: bob.seal_failures == 4, timeout=15, what="bob to drop the four forged messages")
    # 6. an honest message from mallory arrives, as mallory's
    mid = os.urandom(12)
    assert isinstance(raw_send("forge-bob", sealer.seal("mallory", "forge-bob", mid, body), mid), P.Sent)
    msg = bob.receive(timeout=10)
    assert (msg.sender, msg.body, msg.id) == ("mallory", "transfer the money", mid.hex())
    assert _no_message(bob)
    assert bob.seal_failures == 4
    # the display name mallory asked for does not make it carol's mailbox
    carol.send("forge-carol", "to myself").result(timeout=10)
    assert carol.receive(timeout=10).body == "to myself"
    assert raw.recv(timeout=0.5) is None  # nothing of carol's went to mallory
    # on the wire, to mallory: the broker's DELIVER names the sender, and the seal binds sender,
    # recipient and id, so a broker could not re-address it or pass it off as another's
    carol.send("mallory", "hello mallory").result(timeout=10)
    frames = raw.recv(timeout=10)
    assert frames is not None and len(frames) == 2
    deliver = P.decode(frames[0], 1)
    assert isinstance(deliver, P.Deliver) and (deliver.sender, deliver.topic) == ("forge-carol", "")
    assert sealer.open("forge-carol", "mallory", deliver.mid, frames[1]) == P.pack_value("hello mallory")
    for sender, target, mid in (
        ("forge-bob", "mallory", deliver.mid),
        ("forge-carol", "forge-bob", deliver.mid),
        ("forge-carol", "mallory", os.urandom(12)),
    ):
        with pytest.raises(zlink.SealError):
            sealer.open(sender, target, mid, frames[1])


@pytest.mark.timeout(60)
def test_mail_waits_for_a_peer_within_its_ttl_and_is_undeliverable_after(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    alice = peers(swarm.invite("client", "held-alice"))
    carol_join = swarm.invite("client", "held-carol")
    dave_join = swarm.invite("client", "held-dave")
    first = alice.send("held-carol", {"n": 1}, ttl=30)
    second = alice.send("held-carol", {"n": 2}, ttl=30)
    expiring = alice.send("held-dave", "you will not see this", ttl=1.0)
    time.sleep(0.5)
    assert not first.done() and not second.done()  # held, neither delivered nor refused
    # carol connects: both arrive, in order, and the sender hears they were delivered
    carol = peers(carol_join)
    got = [carol.receive(timeout=10) for _ in range(2)]
    assert [(m.sender, m.body) for m in got] == [("held-alice", {"n": 1}), ("held-alice", {"n": 2})]
    first.result(timeout=10)
    second.result(timeout=10)
    # dave does not connect in time
    with pytest.raises(zlink.Undeliverable, match="'held-dave' did not connect in time") as info:
        expiring.result(timeout=20)
    assert type(info.value) is zlink.Undeliverable  # not the loop guard
    dave = peers(dave_join)
    assert _no_message(dave, 0.5)  # an expired message is gone
    # ttl=0: now or never
    with pytest.raises(zlink.Undeliverable, match="'held-nobody' is not connected"):
        alice.send("held-nobody", "x", ttl=0).result(timeout=10)


@pytest.mark.timeout(60)
def test_the_newest_session_of_a_key_gets_its_messages(swarm: LocalSwarm, peers: Callable[[str], zlink.Client]) -> None:
    alice = peers(swarm.invite("client", "sess-alice"))
    join = swarm.invite("client", "sess-bob")
    older = peers(join)
    newer = zlink.Client(join, connect_timeout=15)
    try:
        alice.send("sess-bob", "to the newest").result(timeout=10)
        assert newer.receive(timeout=10).body == "to the newest"
        assert _no_message(older)
    finally:
        newer.close()
    alice.send("sess-bob", "to the one left").result(timeout=10)
    assert older.receive(timeout=10).body == "to the one left"


@pytest.mark.timeout(60)
def test_max_message_ttl_caps_how_long_the_broker_holds_mail(
    rate_swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    alice = peers(rate_swarm.invite("client", "cap-alice"))
    fut = alice.send("cap-absent", "wait for me an hour", ttl=3600)
    with pytest.raises(zlink.Undeliverable, match="did not connect in time"):
        fut.result(timeout=20)  # the broker held it MAX_TTL s at most


@pytest.mark.timeout(60)
def test_a_message_too_large_for_the_broker_fails_instead_of_hanging(
    rate_swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    alice = peers(rate_swarm.invite("client", "big-alice"))
    peers(rate_swarm.invite("client", "big-bob"))
    # refused at once, before it leaves (the broker would drop it with no word to the sender)
    with pytest.raises(zlink.Undeliverable, match="bytes"):
        alice.send("big-bob", b"x" * (MAX_SIZE + 1000)).result(timeout=5)


class Lines(threading.Thread):
    """The lines a child process prints, as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))


def _listen(join: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*zlink_exe(), "listen"], env=clean_env(ZLINK_JOIN=join), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.mark.timeout(60)
def test_a_message_for_a_crashed_listener_is_not_reported_delivered(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    alice = peers(swarm.invite("client", "crash-alice"))
    listener = _listen(swarm.invite("client", "crash-bob"))
    try:
        out = Lines(listener)
        alice.send("crash-bob", "ping").result(timeout=20)  # held until the listener connects
        wait_for(lambda: out.lines == ["crash-alice> ping"], timeout=20, what="the listener to print ping")
        listener.send_signal(signal.SIGKILL)  # no BYE
        listener.wait(10)
        time.sleep(0.5)  # the TCP connection is closed: the broker's ROUTER drops the route
        fut = alice.send("crash-bob", "into the void", ttl=1.0)
        with pytest.raises(zlink.Undeliverable):
            fut.result(timeout=15)
    finally:
        _stop(listener)


@pytest.mark.timeout(60)
def test_listen_keeps_listening_after_a_loop_guard_notice(
    rate_swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    join = rate_swarm.invite("client", "lg-x")
    older = peers(join)  # another session of the listener's key, to take x's turns
    y = peers(rate_swarm.invite("client", "lg-y"))
    z = peers(rate_swarm.invite("client", "lg-z"))
    listener = _listen(join)
    try:
        out = Lines(listener)

        def listener_is_newest() -> bool:
            y.send("lg-x", "probe").result(timeout=10)
            with contextlib.suppress(TimeoutError):
                older.receive(timeout=0.2)  # not yet: the older session got it
                return False
            return True

        wait_for(listener_is_newest, timeout=20, what="the listener to connect")
        wait_for(lambda: "lg-y> probe" in out.lines, timeout=10, what="the listener to print")
        with pytest.raises(zlink.LoopGuarded):
            for i in range(50):  # x and y take turns until the rate guard pauses them
                older.send("lg-y", f"x{i}").result(timeout=10)
                y.receive(timeout=10)
                y.send("lg-x", f"y{i}").result(timeout=10)
        # the listener was told; it still prints what others send
        z.send("lg-x", "still there?").result(timeout=10)
        wait_for(lambda: "lg-z> still there?" in out.lines or listener.poll() is not None, timeout=15)
        assert listener.poll() is None, listener.stderr.read() if listener.stderr else ""
    finally:
        _stop(listener)


# --------------------------------------------------------------------------- topics


@pytest.mark.timeout(60)
def test_a_topic_reaches_every_subscriber_but_the_publisher(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    pub = peers(swarm.invite("client", "topic-pub"))
    subs = [peers(swarm.invite("client", f"topic-sub-{i}")) for i in range(3)]
    node = zlink.Node(swarm.invite("node", "topic-node"), slots=1, connect_timeout=15)

    @node.skill("topic_noop")
    def topic_noop() -> None:
        return None

    node.start()
    try:
        for peer in [pub, *subs]:
            peer.subscribe("news", "weather")
            peer.status()  # a round trip on the same connection: the SUBSCRIBE was handled
        node.subscribe("news")
        # a node key may send direct messages (and this round trip syncs its SUBSCRIBE)
        node.send("topic-pub", "node here").result(timeout=10)
        assert pub.receive(timeout=10)[:2] == ("topic-node", "node here")

        pub.publish("news", {"headline": "zlink ships messaging"}).result(timeout=10)
        for peer in [*subs, node]:
            msg = peer.receive(timeout=10)
            assert (msg.sender, msg.topic, msg.body) == ("topic-pub", "news", {"headline": "zlink ships messaging"})
        assert _no_message(pub)  # not to the publisher

        # unsubscribing stops that topic only
        subs[1].unsubscribe("news")
        subs[1].status()
        pub.publish("news", "second").result(timeout=10)
        pub.publish("weather", "sunny").result(timeout=10)
        for peer in (subs[0], subs[2]):
            assert [(m.topic, m.body) for m in (peer.receive(10), peer.receive(10))] == [
                ("news", "second"),
                ("weather", "sunny"),
            ]
        assert [(m.topic, m.body) for m in (subs[1].receive(10),)] == [("weather", "sunny")]
        assert node.receive(timeout=10).body == "second"
        for peer in (*subs, node, pub):
            assert _no_message(peer, 0.2)

        # a node-role key may not publish
        with pytest.raises(zlink.Undeliverable, match="forbidden: role 'node' may not publish"):
            node.publish("news", "from a worker").result(timeout=10)
        for peer in subs:
            assert _no_message(peer, 0.2)
    finally:
        node.stop()


@pytest.mark.timeout(60)
def test_subscriptions_come_back_after_a_broker_restart(tmp_path: Path) -> None:
    swarm = _swarm(tmp_path / "home", (), None)
    try:
        pub_join, sub_join = swarm.invite("client", "rs-pub"), swarm.invite("client", "rs-sub")
        with zlink.Client(pub_join, connect_timeout=15) as pub, zlink.Client(sub_join, connect_timeout=15) as sub:
            sub.subscribe("alerts")
            sub.status()
            pub.publish("alerts", "before").result(timeout=10)
            assert sub.receive(timeout=10).body == "before"
            old_epoch = sub.epoch
            assert swarm.broker is not None
            swarm.broker.send_signal(signal.SIGTERM)
            swarm.broker.wait(10)
            swarm.start_broker()  # the same endpoint and keys, a new epoch, no state
            wait_for(
                lambda: sub.welcome is not None and pub.welcome is not None and old_epoch not in (sub.epoch, pub.epoch),
                timeout=30,
                what="both clients to register with the new broker",
            )
            # the subscriber never subscribes again itself: it re-sends its topics on WELCOME
            deadline = time.monotonic() + 30
            while True:
                pub.publish("alerts", "after")
                try:
                    msg = sub.receive(timeout=0.5)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "the subscription did not survive the restart"
            assert (msg.sender, msg.topic, msg.body) == ("rs-pub", "alerts", "after")
    finally:
        swarm.close()


# --------------------------------------------------------------------------- multi-turn tasks


@pytest.mark.timeout(60)
def test_a_sync_skill_asks_twice_through_future_questions(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    client = peers(swarm.invite("client", "mt-sync"))
    fut = client.submit("plan_trip", "Lisbon", timeout=40)
    answers = iter([4, "800 EUR"])
    asked = []
    for question in fut.questions(timeout=30):
        assert isinstance(question, zlink.Question) and question.future is fut
        asked.append((question.seq, question.value))
        question.answer(next(answers))
    assert asked == [(1, "How many days in Lisbon?"), (2, "And the budget for 4 days?")]
    assert fut.result(timeout=10) == "4 days in Lisbon for 800 EUR"


@pytest.mark.timeout(60)
def test_an_async_skill_asks_twice_through_on_question(swarm: LocalSwarm, peers: Callable[[str], zlink.Client]) -> None:
    client = peers(swarm.invite("client", "mt-async"))
    seen: list[Any] = []
    replies = {"Ship to?": "12 Rua Augusta"}

    def on_question(value: Any) -> Any:
        seen.append(value)
        return True if isinstance(value, dict) else replies[value]

    order = {"item": "book", "qty": 2}
    fut = client.submit("confirm_order", order, timeout=40, on_question=on_question)
    assert fut.result(timeout=30) == {"order": order, "confirmed": True, "ship_to": "12 Rua Augusta"}
    assert seen == [{"confirm": order}, "Ship to?"]
    # an answer that ends the conversation early
    assert client.submit("confirm_order", order, timeout=40, on_question=lambda v: False).result(timeout=30) == {
        "order": order,
        "confirmed": False,
    }


@pytest.mark.timeout(60)
def test_questions_come_among_the_items_of_a_stream(swarm: LocalSwarm, peers: Callable[[str], zlink.Client]) -> None:
    client = peers(swarm.invite("client", "mt-stream"))
    stream = client.stream("trip_stream", "Oslo", timeout=40)
    items: list[Any] = []
    answers = {"days?": 3, "hotel?": "Hotel Bristol"}
    for item in stream:
        if isinstance(item, zlink.Question):
            items.append(("asked", item.value))
            item.answer(answers[item.value])
        else:
            items.append(item)
    assert items == [
        "planning Oslo",
        ("asked", "days?"),
        "3 days booked",
        ("asked", "hotel?"),
        "Hotel Bristol booked",
    ]
    assert stream.result(timeout=10) == "Oslo: 3 days at Hotel Bristol"


@pytest.mark.timeout(60)
def test_a_task_asking_too_many_questions_gets_loop_guarded(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client]
) -> None:
    client = peers(swarm.invite("client", "mt-limit"))
    asked: list[Any] = []

    def echo(value: Any) -> Any:
        asked.append(value)
        return value

    out = client.submit("ask_until_guarded", timeout=40, on_question=echo).result(timeout=30)
    assert out["answered"] == QUESTIONS and out["error"] == "LoopGuarded"
    assert out["message"] == f"loop-guard: task asked more than {QUESTIONS} questions (max_task_questions)"
    assert asked == list(range(QUESTIONS))  # the one over the limit never reached the client
    assert client.status()["counters"]["loop_guard"] >= 1


@pytest.mark.timeout(60)
def test_cancelling_a_task_that_waits_for_an_answer_raises_task_cancelled_in_the_skill(
    swarm: LocalSwarm, peers: Callable[[str], zlink.Client], tmp_path: Path
) -> None:
    client = peers(swarm.invite("client", "mt-cancel"))
    marker = tmp_path / "how-the-ask-ended.txt"
    fut = client.submit("wait_for_answer", str(marker), timeout=50)
    question = next(iter(fut.questions(timeout=30)))
    assert question.value == "anyone there?"
    assert fut.cancel()
    wait_for(marker.exists, timeout=20, what="the skill to leave ask()")
    assert marker.read_text().startswith("TaskCancelled: "), marker.read_text()
    question.answer("too late")  # an answer for a cancelled task goes nowhere, and breaks nothing
    assert client.submit("plan_trip", "Rome", timeout=30, on_question=lambda v: 2).result(timeout=30) == (
        "2 days in Rome for 2"
    )


# --------------------------------------------------------------------------- the loop guard


class Echo(threading.Thread):
    """An agent that answers every message with the body plus one, until something stops it."""

    def __init__(self, peer: zlink.Client) -> None:
        super().__init__(daemon=True, name=f"echo-{peer.name}")
        self.peer = peer
        self.received: list[int] = []
        self.sent = 0
        self.events: list[tuple[str, str]] = []

    def run(self) -> None:
        while True:
            try:
                msg = self.peer.receive(timeout=20)
            except zlink.LoopGuarded as exc:
                self.events.append(("receive", str(exc)))
                return
            except TimeoutError:
                self.events.append(("timeout", ""))
                return
            self.received.append(msg.body)
            try:
                self.peer.send(msg.sender, msg.body + 1).result(timeout=20)
                self.sent += 1
            except zlink.LoopGuarded as exc:
                self.events.append(("send", str(exc)))  # then read the notice every side gets


def _echo_pair(sw: LocalSwarm, a: str, b: str, peers: Callable[[str], zlink.Client]) -> tuple[Echo, Echo]:
    pa, pb = peers(sw.invite("client", a)), peers(sw.invite("client", b))
    ea, eb = Echo(pa), Echo(pb)
    ea.start()
    eb.start()
    pa.send(b, 0).result(timeout=10)  # the first turn
    ea.join(50)
    eb.join(50)
    assert not ea.is_alive() and not eb.is_alive(), "the echo did not stop"
    return ea, eb


@pytest.mark.timeout(60)
def test_the_turn_limit_stops_two_echoing_agents(swarm: LocalSwarm, peers: Callable[[str], zlink.Client]) -> None:
    ea, eb = _echo_pair(swarm, "echo-a", "echo-b", peers)
    # turns 1..TURNS were delivered (alice sent the odd ones), turn TURNS + 1 was alice's and refused
    assert eb.received == list(range(0, TURNS, 2))
    assert ea.received == list(range(1, TURNS, 2))
    assert (ea.sent + 1, eb.sent) == (TURNS // 2, TURNS // 2)
    why = f"loop-guard: {TURNS} turns between 'echo-a' and 'echo-b' within 3600 s (max_conversation_turns)"
    assert [kind for kind, _ in ea.events] == ["send", "receive"]
    assert [kind for kind, _ in eb.events] == ["receive"]
    for _, message in ea.events + eb.events:
        assert message.startswith(why), message
    # the echo stopped: nothing more is on its way
    assert _no_message(ea.peer, 0.5) and _no_message(eb.peer, 0.2)
    # and it stays paused: another turn from echo-a is refused
    with pytest.raises(zlink.LoopGuarded, match="is paused for"):
        ea.peer.send("echo-b", -1).result(timeout=10)
    assert ea.peer.status()["counters"]["loop_guard"] >= 1


@pytest.mark.timeout(60)
def test_the_turn_rate_stops_two_echoing_agents(rate_swarm: LocalSwarm, peers: Callable[[str], zlink.Client]) -> None:
    ea, eb = _echo_pair(rate_swarm, "rate-a", "rate-b", peers)
    guarded = [(who, kind, message) for who, e in (("a", ea), ("b", eb)) for kind, message in e.events]
    assert sorted((who, kind) for who, kind, _ in guarded if kind == "receive") == [("a", "receive"), ("b", "receive")]
    senders = [who for who, kind, _ in guarded if kind == "send"]
    assert len(senders) == 1, guarded  # exactly one message went over, and its sender was told
    for _, _, message in guarded:
        assert f"more than {RATE:g} turns per second between" in message, message
        assert message.endswith("(max_conversation_rate); paused for 10 s"), message
    total = len(ea.received) + len(eb.received)
    assert total >= RATE  # a burst of RATE turns always passes
    refused_side = ea if senders == ["a"] else eb
    other = "rate-b" if refused_side is ea else "rate-a"
    assert _no_message(ea.peer, 0.5) and _no_message(eb.peer, 0.2)
    # within the pause, that side's next turn is refused too
    with pytest.raises(zlink.LoopGuarded, match="is paused for"):
        refused_side.peer.send(other, -1).result(timeout=10)


# --------------------------------------------------------------------------- the command line


@pytest.mark.timeout(60)
def test_send_and_listen_from_a_shell_script(swarm: LocalSwarm, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = clean_env(
        ZLINK_BIN=zlink_exe()[0],
        ALICE=swarm.invite("client", "sh-alice"),
        BOB=swarm.invite("client", "sh-bob"),
        BOB_NAME="sh-bob",
        OUT=str(out),
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=55, stdin=subprocess.DEVNULL
    )
    codes = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)

    def text(name: str) -> str:
        return (out / name).read_text()

    assert codes.get("done") == "1", (proc.stdout, proc.stderr)
    # 1. JSON in, one JSON line out
    assert (codes["send_json"], codes["listen_json"]) == ("0", "0"), text("send_json.out") + text("listen_json.err")
    [line] = text("listen_json.out").splitlines()
    got = json.loads(line)
    assert set(got) == {"from", "topic", "id", "message"}
    assert (got["from"], got["topic"], got["message"]) == ("sh-alice", None, {"task": "review", "pr": 42})
    # 2. text from stdin, printed as "sender> text"
    assert (codes["send_stdin"], codes["listen_text"]) == ("0", "0"), text("send_stdin.out") + text("listen_text.err")
    assert text("listen_text.out") == "sh-alice> hello from stdin\n"
    # 3. JSON from stdin, held until the listener connected
    assert (codes["send_held"], codes["listen_held"]) == ("0", "0"), text("send_held.out") + text("listen_held.err")
    assert json.loads(text("listen_held.out"))["message"] == {"from_stdin": [1, 2, 3]}
    # 4. undeliverable: exit 1 and why
    assert codes["send_nobody"] == "1"
    assert "undeliverable: 'nobody-at-all' did not connect in time" in text("send_nobody.err")
    # 5. a topic
    assert (codes["publish"], codes["subscribe"]) == ("0", "0"), text("publish.out") + text("subscribe.err")
    sub = json.loads(text("subscribe.out").splitlines()[0])
    assert (sub["from"], sub["topic"], sub["message"]) == ("sh-alice", "builds", "main is green")


@pytest.mark.timeout(60)
def test_listen_timeout_exits_1(swarm: LocalSwarm) -> None:
    res = run_zlink("listen", "--timeout", "0.5", env=clean_env(ZLINK_JOIN=swarm.invite("client", "quiet-listener")))
    assert "no message within 0.5 s" in res.stderr
    assert res.returncode == 1


def _if_has(text: str, part: str) -> str:
    return text if part in text else ""


def _tmux(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """tmux on a private server (its socket in the test's tmp dir): the user's sessions are never touched."""
    return subprocess.run(["tmux", "-S", str(sock), *args], capture_output=True, text=True, timeout=10, check=False)


@pytest.mark.timeout(60)
def test_chat_in_a_terminal(swarm: LocalSwarm, peers: Callable[[str], zlink.Client], tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    bob = peers(swarm.invite("client", "chat-bob"))
    carol = peers(swarm.invite("client", "chat-carol"))
    # the join string reaches the chat through a private file, never a command line
    launcher = tmp_path / "chat.sh"
    launcher.write_text(
        "#!/bin/sh\n"
        f"export ZLINK_JOIN='{swarm.invite('client', 'chat-alice')}'\n"
        f"export PYTHONPATH='{REPO}'\n"
        "unset ZLINK_HOME\n"
        f"'{sys.executable}' -m zlink chat --to chat-bob\n"
        'echo "chat exited with $?"\n'
        "sleep 60\n"
    )
    launcher.chmod(0o700)
    sock = tmp_path / f"tmux-{uuid.uuid4().hex[:8]}.sock"
    screen_file = tmp_path / "chat_screen.txt"

    def screen() -> str:
        text = _tmux(sock, "capture-pane", "-p", "-J", "-t", "chat").stdout
        screen_file.write_text(text)
        return text

    try:
        started = _tmux(sock, "new-session", "-d", "-s", "chat", "-x", "160", "-y", "40", f"sh {launcher}")
        assert started.returncode == 0, started.stderr
        wait_for(lambda: "chatting with chat-bob as chat-alice" in screen(), timeout=30, what="the chat to start")
        # a line typed in the terminal reaches bob, from chat-alice
        _tmux(sock, "send-keys", "-t", "chat", "hello bob, 3 failures in test_io", "Enter")
        msg = bob.receive(timeout=20)
        assert (msg.sender, msg.body, msg.topic) == ("chat-alice", "hello bob, 3 failures in test_io", "")
        # someone else's message is not part of this chat; bob's answer is
        carol.send("chat-alice", "carol butting in").result(timeout=10)
        bob.send("chat-alice", "on it, sending the log").result(timeout=10)
        wait_for(lambda: "chat-bob> on it, sending the log" in screen(), timeout=20, what="bob's reply on screen")
        bob.send("chat-alice", {"log": ["test_io.py:12"]}).result(timeout=10)
        wait_for(lambda: 'chat-bob> {"log": ["test_io.py:12"]}' in screen(), timeout=20, what="a JSON value")
        _tmux(sock, "send-keys", "-t", "chat", "thanks", "Enter")
        assert bob.receive(timeout=20).body == "thanks"
        _tmux(sock, "send-keys", "-t", "chat", "C-d")
        final = wait_for(lambda: _if_has(screen(), "chat exited with 0"), timeout=20, what="the chat to end")
        assert "carol butting in" not in final
        lines = final.splitlines()
        assert lines.index("chat-bob> on it, sending the log") > lines.index("hello bob, 3 failures in test_io")
        assert screen_file.read_text() == final
    finally:
        _tmux(sock, "kill-server")
        sock.unlink(missing_ok=True)
