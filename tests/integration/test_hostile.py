"""Hostile but authenticated peers: the broker stays up, serves everyone else and forgets the abuse.

A CLI broker (``--max-message-size 65536 --max-tasks-per-client 50``) and two
CLI nodes. Raw pyzmq DEALER peers with real keys (the CurveZMQ handshake
succeeds) flood it with malformed frames, frames over the size limit, unknown
commands, HELLO floods, 10,000 connect/disconnect cycles, other peers' task
ids and far more tasks than their quota, while a legitimate client keeps
running ``map`` jobs of 2,000 items. Checked:

* the broker process stays up and the legitimate maps complete, correctly;
* every refused message is answered with an ``ERROR`` whose code says why (or,
  for one frame over the limit, libzmq drops the connection, as documented),
  and the same count appears in ``status()["errors"]``;
* a quota abuser gets ``REJECTED`` results whose reason starts with ``quota:``;
* CANCEL, SUBMIT and RESULT with another peer's task ids change nothing for it;
* the broker's resident memory (``VmRSS``) goes back to its baseline (within a
  generous margin) once the abandoned sessions have been swept.

No assertion is about speed: times are printed for the report only.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import zlink
from zlink import protocol as P
from zlink.demo import LocalSwarm

from .conftest import RawPeer, start_swarm, wait_for

LIMIT = 64 * 1024
QUOTA = 50
MB = 1024 * 1024
#: the broker's memory after the abuse may exceed its baseline by this much (allocator slack)
RSS_MARGIN = 30 * MB
CYCLES = 10_000
CYCLE_THREADS = 4

MakeRaw = Callable[[str, "zlink.Join | None"], RawPeer]
STATE: dict[str, Any] = {}


def _hdr(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _spec(skill: str = "square", timeout: float | None = None) -> list[Any]:
    return [os.urandom(16), skill, timeout, 1, [], []]


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def decode(frames: list[bytes]) -> P.Message:
    return P.decode(frames[0], len(frames) - 1)


# (frames, the ERROR code the broker answers with); sent by a peer that said HELLO as a client
GARBAGE: list[tuple[list[bytes], str]] = [
    ([b"\xc1" + bytes(range(256))], "malformed"),
    ([b""], "malformed"),
    ([_hdr([1, "HELLO", 3])], "malformed"),
    ([_hdr({1: 1, 2: "STATUS"})], "malformed"),
    ([_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec()]})[:-5], b"x"], "malformed"),
    ([b"\x91" * 5000 + b"\xc0"], "malformed"),
    ([_hdr({"v": 2, "c": "STATUS"})], "bad-version"),
    ([_hdr({"c": "STATUS"})], "bad-version"),
    ([_hdr({"v": 1, "c": "FROBNICATE"})], "unknown-command"),
    ([_hdr({"v": 1, "c": "status"})], "unknown-command"),
    ([_hdr({"v": 1, "c": 7})], "unknown-command"),
    ([_hdr({"v": 1, "c": "SUBMIT", "tasks": "abc"})], "bad-field"),
    ([_hdr({"v": 1, "c": "SUBMIT", "tasks": [["t", "square", None, 3, [], []]]}), b"x"], "bad-field"),
    ([_hdr({"v": 1, "c": "CANCEL", "tids": [1, 2]})], "bad-field"),
    ([_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec(), _spec()]}), b"x"], "frame-count"),
    ([_hdr({"v": 1, "c": "STATUS"}), b"x"], "frame-count"),
    (
        [_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec() for _ in range(3)]}), *(b"p" * 30_000 for _ in range(3))],
        "too-large",
    ),
    ([P.encode(P.Result(results=(P.ResultItem(os.urandom(16), 1, 0),))), b"\xc0"], "unexpected"),
    ([P.encode(P.Dispatch(tasks=()))], "unexpected"),
    ([P.encode(P.Drain(reason="x"))], "unexpected"),
    ([P.encode(P.Hello(role="node", session=os.urandom(8), skills={"x": {}}, slots=1))], "forbidden"),
    ([P.encode(P.Hello(role="wizard", session=os.urandom(8)))], "bad-role"),
]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    sw = start_swarm(
        tmp_path_factory.mktemp("hostile") / "home",
        ["hostile-node-1", "hostile-node-2"],
        slots=2,
        broker_args=("--max-message-size", str(LIMIT), "--max-tasks-per-client", str(QUOTA)),
        seal=False,  # unsealed: a forged result would be accepted by the client, so any leak through shows
    )
    try:
        yield sw
    finally:
        sw.close()


@pytest.fixture(scope="module")
def legit(swarm: LocalSwarm) -> Iterator[zlink.Client]:
    with zlink.Client(swarm.invite("client", "legit"), connect_timeout=15) as c:
        assert c.max_message_size == LIMIT and c.max_tasks == QUOTA
        yield c


def join(swarm: LocalSwarm, name: str, role: str = "client") -> zlink.Join:
    return zlink.Join.parse(swarm.invite(role, name))


def serves(client: zlink.Client, n: int = 2000) -> None:
    assert list(client.map("square", range(n), timeout=60)) == [x * x for x in range(n)]


def hello(raw: RawPeer, role: str = "client", **kw: Any) -> P.Welcome:
    reply = raw.ask([P.encode(P.Hello(role=role, session=os.urandom(8), **kw))], timeout=15)
    assert isinstance(reply, P.Welcome), reply
    return reply


def status_counts(client: zlink.Client) -> tuple[dict[str, int], dict[str, int]]:
    st = client.status()
    return dict(st["counters"]), dict(st["errors"])


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before) if after.get(k, 0) != before.get(k, 0)
    }


# --------------------------------------------------------------------------- offenders


class Offender:
    """One abusive peer on its own thread: what it sent, what came back, and any failure."""

    def __init__(self, name: str, fn: Callable[[Offender], None]) -> None:
        self.name = name
        self.expected: Counter[str] = Counter()  # ERROR codes the broker owes it
        self.received: Counter[str] = Counter()  # ERROR codes it got
        self.notes: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._fn = fn
        self.thread = threading.Thread(target=self._run, name=f"offender-{name}", daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            self._fn(self)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.seconds = time.monotonic() - t0

    def expect_errors(self, raw: RawPeer, batch: list[tuple[list[bytes], str]]) -> None:
        """Send a window of bad messages, then read one ERROR per message, in order."""
        for frames, code in batch:
            raw.send(frames)
            self.expected[code] += 1
        for _, code in batch:
            reply = raw.recv(timeout=20)
            assert reply is not None, f"{self.name}: no answer to a message that deserves {code!r}"
            msg = decode(reply)
            assert isinstance(msg, P.Error), (self.name, msg)
            assert msg.code == code, (self.name, code, msg)
            assert msg.message, f"{self.name}: ERROR {code} without a message"
            self.received[msg.code] += 1


def garbage_flood(swarm: LocalSwarm, most: int, until: threading.Event) -> Callable[[Offender], None]:
    """Rounds of 1,000 bad messages, until ``until`` is set (at least one round, at most ``most`` messages)."""

    def run(o: Offender) -> None:
        raw = RawPeer(swarm.endpoint, join(swarm, "evil-garbage"))
        try:
            hello(raw)
            rng = random.Random(1)
            sent = 0
            while sent < most and (sent == 0 or not until.is_set()):
                for _ in range(10):
                    o.expect_errors(raw, [rng.choice(GARBAGE) for _ in range(100)])
                sent += 1000
                until.wait(0.3)
            o.notes["sent"] = sent
        finally:
            raw.close()

    return run


def oversize(swarm: LocalSwarm) -> Callable[[Offender], None]:
    def run(o: Offender) -> None:
        raw = RawPeer(swarm.endpoint, join(swarm, "evil-oversize"))
        try:
            hello(raw)
            # many frames, each under the limit, together over it: refused with an ERROR
            frames = [_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec(), _spec()]}), b"a" * 40_000, b"b" * 40_000]
            o.expect_errors(raw, [(frames, "too-large")] * 50)
            # one frame over the limit: libzmq (ZMQ_MAXMSGSIZE) drops the connection, no reply
            for _ in range(20):
                raw.send([_hdr({"v": 1, "c": "STATUS", "pad": "x" * (LIMIT + 100)})])
                o.notes["oversize_replies"] = o.notes.get("oversize_replies", 0) + (raw.recv(timeout=0.2) is not None)
            # the DEALER reconnects by itself; the broker answers it as before
            again = wait_for(lambda: raw.ask([_hdr({"v": 1, "c": "NOPE"})], timeout=1.0), timeout=20, what="reconnect")
            assert isinstance(again, P.Error) and again.code == "unknown-command"
            o.expected["unknown-command"] += 1
            o.received["unknown-command"] += 1
            # (the NOPEs sent while it was still disconnected may also be answered late: drain them)
            while (late := raw.recv(timeout=0.5)) is not None:
                msg = decode(late)
                assert isinstance(msg, P.Error) and msg.code == "unknown-command", msg
                o.expected["unknown-command"] += 1
                o.received["unknown-command"] += 1
        finally:
            raw.close()

    return run


def hello_flood(
    swarm: LocalSwarm, legit_session: bytes, fresh: int, same: int, until: threading.Event
) -> Callable[[Offender], None]:
    def run(o: Offender) -> None:
        raw = RawPeer(swarm.endpoint, join(swarm, "evil-hello"))
        windows: list[float] = []
        try:
            # a new session every time (the broker keeps each until swept), in windows of 100, spread
            # over the flood: at least 1,000, at most ``fresh``
            while len(windows) < fresh // 100 and (len(windows) < 10 or not until.is_set()):
                t0 = time.monotonic()
                for _ in range(100):
                    raw.send([P.encode(P.Hello(role="client", session=os.urandom(8)))])
                for _ in range(100):
                    reply = raw.recv(timeout=20)
                    assert reply is not None and isinstance(decode(reply), P.Welcome)
                windows.append(time.monotonic() - t0)
                until.wait(0.1)
            o.notes["fresh"] = 100 * len(windows)
            o.notes["ms_per_hello_first_last"] = (round(windows[0] * 10, 2), round(windows[-1] * 10, 2))
            session = os.urandom(8)
            for _ in range(same // 100):  # the same session again and again: idempotent
                for _ in range(100):
                    raw.send([P.encode(P.Hello(role="client", session=session))])
                for _ in range(100):
                    reply = raw.recv(timeout=20)
                    assert reply is not None and isinstance(decode(reply), P.Welcome)
            raw.send([P.encode(P.Bye(reason="done"))])
        finally:
            raw.close()
        # another key's session, on a connection of its own: refused
        thief = RawPeer(swarm.endpoint, join(swarm, "evil-thief"))
        try:
            stolen = P.encode(P.Hello(role="client", session=legit_session))
            o.expect_errors(thief, [([stolen], "forbidden")] * 10)
        finally:
            thief.close()

    return run


def connect_cycles(
    swarm: LocalSwarm, n: int, threads: int, prefix: str = "evil-cycler", done: threading.Event | None = None
) -> Callable[[Offender], None]:
    """``n`` connections, each: CurveZMQ handshake, one request, one answer, close; on ``threads`` threads."""

    def run(o: Offender) -> None:
        joins = [join(swarm, f"{prefix}-{i}") for i in range(threads)]
        lock = threading.Lock()
        failures: list[str] = []

        def worker(j: zlink.Join, count: int, offset: int) -> None:
            ctx: zmq.Context[Any] = zmq.Context()
            assert j.keys.secret is not None
            got: Counter[str] = Counter()
            owed: Counter[str] = Counter()
            try:
                for i in range(count):
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.curve_serverkey = j.broker_key.encode()
                    sock.curve_publickey = j.keys.public.encode()
                    sock.curve_secretkey = j.keys.secret.encode()
                    sock.connect(swarm.endpoint)
                    mode = (i + offset) % 4
                    if mode < 2:  # a client that registers, then vanishes (0) or says goodbye (1)
                        sock.send(P.encode(P.Hello(role="client", session=os.urandom(8))))
                    else:  # a request before HELLO
                        sock.send(P.encode(P.Status()))
                        owed["hello-first"] += 1
                    if sock.poll(10_000):
                        msg = decode(sock.recv_multipart())
                        if mode < 2:
                            if not isinstance(msg, P.Welcome):
                                failures.append(f"HELLO answered with {msg}")
                            elif mode == 1:
                                sock.send(P.encode(P.Bye(reason="bye")))
                        elif isinstance(msg, P.Error):
                            got[msg.code] += 1
                        else:
                            failures.append(f"STATUS before HELLO answered with {msg}")
                    else:
                        failures.append("no answer within 10 s")
                    sock.close(linger=100 if mode == 1 else 0)
            finally:
                ctx.term()
                with lock:
                    o.expected.update(owed)
                    o.received.update(got)

        per = n // threads
        ts = [threading.Thread(target=worker, args=(joins[k], per, k)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        o.notes["cycles"] = per * threads
        if done is not None:
            done.set()
        o.notes["cycle_failures"] = failures[:5]
        o.notes["cycle_failure_count"] = len(failures)

    return run


def quota_abuse(swarm: LocalSwarm, name: str, tasks: int) -> Callable[[Offender], None]:
    def run(o: Offender) -> None:
        raw = RawPeer(swarm.endpoint, join(swarm, name))
        try:
            o.notes["welcome_max_tasks"] = hello(raw).max_tasks
            sent: list[bytes] = []
            for _ in range(tasks // 500):
                specs = tuple(P.TaskSpec(os.urandom(16), "nobody-offers-this", 30.0, 1) for _ in range(500))
                raw.send([P.encode(P.Submit(tasks=specs)), *(P.pack_value([[1]]) for _ in specs)])
                sent += [s.tid for s in specs]
            outcomes: dict[bytes, tuple[int, str]] = {}
            while len(outcomes) < tasks - QUOTA:
                frames = raw.recv(timeout=20)
                assert frames is not None, f"only {len(outcomes)} rejections came back"
                msg = decode(frames)
                assert isinstance(msg, P.Result), msg
                for item, payload in zip(msg.results, frames[1:], strict=True):
                    outcomes[item.tid] = (item.status, P.unpack_value(payload))
            reasons = Counter(why.split(":")[0] for status, why in outcomes.values() if status == P.Outcome.REJECTED)
            o.notes["rejections"] = dict(reasons)
            o.notes["statuses"] = dict(Counter(P.Outcome.NAMES[s] for s, _ in outcomes.values()))
            accepted = [t for t in sent if t not in outcomes]
            o.notes["accepted"] = len(accepted)
            # give the quota back: cancel what was accepted
            raw.send([P.encode(P.Cancel(tids=tuple(accepted)))])
            cancelled = 0
            while cancelled < len(accepted):
                frames = raw.recv(timeout=20)
                assert frames is not None
                msg = decode(frames)
                assert isinstance(msg, P.Result)
                cancelled += sum(1 for r in msg.results if r.status == P.Outcome.CANCELLED)
            raw.send([P.encode(P.Bye(reason="done"))])
        finally:
            raw.close()

    return run


def id_guesser(swarm: LocalSwarm, legit_session: bytes, until: threading.Event) -> Callable[[Offender], None]:
    """CANCELs the legitimate client's task ids (they are its session and a counter), and RESULTs as a client."""

    def run(o: Offender) -> None:
        raw = RawPeer(swarm.endpoint, join(swarm, "evil-guesser"))
        try:
            hello(raw)
            start = 1
            while start < 500_000 and (start < 20_000 or not until.is_set()):
                tids = tuple(legit_session + i.to_bytes(8, "big") for i in range(start, start + 500))
                raw.send([P.encode(P.Cancel(tids=tids))])
                start += 500
                time.sleep(0.02)
            o.notes["cancelled_ids"] = start - 1
            # a cancel of someone else's task gets no answer at all (no oracle for guessed ids)
            o.notes["answers_to_cancels"] = raw.recv(timeout=0.5)
            item = P.ResultItem(legit_session + (1).to_bytes(8, "big"), 1, P.Outcome.OK)
            o.expect_errors(raw, [([P.encode(P.Result(results=(item,))), P.pack_value("forged")], "unexpected")] * 20)
        finally:
            raw.close()

    return run


# --------------------------------------------------------------------------- the flood


@pytest.mark.timeout(90)
def test_flood_of_hostile_peers(swarm: LocalSwarm, legit: zlink.Client) -> None:
    assert swarm.broker is not None
    pid = swarm.broker.pid
    # warm up: a map and some connection churn, so that the baseline includes the steady state
    serves(legit)
    warm = Offender("warm-up", connect_cycles(swarm, 400, 2, prefix="warm-cycler"))
    warm.thread.start()
    warm.thread.join(60)
    assert warm.error is None, warm.error
    time.sleep(1.0)
    baseline = rss(pid)
    counters0, errors0 = status_counts(legit)
    clients0 = legit.status()["clients"]
    STATE.update(baseline=baseline, clients0=clients0)

    stop = threading.Event()
    maps: dict[str, Any] = {"done": 0, "failed": []}

    def legit_maps() -> None:
        while not stop.is_set() or maps["done"] == 0:
            try:
                serves(legit)
                maps["done"] += 1
            except BaseException as exc:  # reported below
                maps["failed"].append(exc)
                return

    cycles_done = threading.Event()
    offenders = [
        Offender("garbage", garbage_flood(swarm, 40_000, cycles_done)),
        Offender("oversize", oversize(swarm)),
        Offender("hello-flood", hello_flood(swarm, legit.session, 5000, 1000, cycles_done)),
        Offender("cycles", connect_cycles(swarm, CYCLES, CYCLE_THREADS, done=cycles_done)),
        Offender("quota", quota_abuse(swarm, "evil-greedy", 2000)),
        Offender("guesser", id_guesser(swarm, legit.session, cycles_done)),
    ]
    t0 = time.monotonic()
    legit_thread = threading.Thread(target=legit_maps, name="legit-maps")
    legit_thread.start()
    maps_before_flood = maps["done"]
    for o in offenders:
        o.thread.start()
    for o in offenders:
        o.thread.join(max(1.0, 75 - (time.monotonic() - t0)))
    flood_seconds = time.monotonic() - t0
    maps_during_flood = maps["done"] - maps_before_flood
    stop.set()
    legit_thread.join(60)
    peak = rss(pid)
    STATE["peak"] = peak

    # the broker is up, the legitimate client's maps all completed, correctly, during the flood too
    assert swarm.broker.poll() is None, "the broker died"
    assert not legit_thread.is_alive()
    assert maps["failed"] == [], maps["failed"]
    assert maps_during_flood >= 1
    for o in offenders:
        assert not o.thread.is_alive(), f"{o.name} did not finish"
        assert o.error is None, f"{o.name}: {o.error!r}"
    serves(legit)

    by_name = {o.name: o for o in offenders}
    # every refused message got an ERROR with the right code...
    for o in offenders:
        assert o.received == o.expected, (o.name, o.expected, o.received)
    # ...and is counted in status, code by code (one frame over the limit is dropped by libzmq: no count)
    counters1, errors1 = status_counts(legit)
    expected: Counter[str] = Counter()
    for o in offenders:
        expected.update(o.expected)
    counted = delta(errors1, errors0)
    # "hello-first" is not an offence (a reconnecting peer gets it too): a legitimate node that the broker
    # declared dead under this load would add one; every other code must match exactly
    first = counted.pop("hello-first", 0)
    owed_first = expected.pop("hello-first", 0)
    assert owed_first <= first <= owed_first + counters1["nodes_died"] - counters0["nodes_died"] + 2, (
        first,
        owed_first,
    )
    assert counted == dict(expected), (counted, dict(expected))
    assert counters1["protocol_errors"] - counters0["protocol_errors"] == sum(expected.values())
    expected["hello-first"] = owed_first
    assert by_name["oversize"].notes.get("oversize_replies", 0) == 0  # a dropped connection, never a reply
    # the cycles all completed their handshake and got their answer
    cycles = by_name["cycles"]
    assert cycles.notes["cycles"] == CYCLES
    assert cycles.notes["cycle_failure_count"] == 0, cycles.notes["cycle_failures"]
    # the quota abuser: exactly its quota accepted, every other task REJECTED with a reason naming the quota
    quota = by_name["quota"]
    assert quota.notes["welcome_max_tasks"] == QUOTA
    assert quota.notes["accepted"] == QUOTA
    assert quota.notes["rejections"] == {"quota": 2000 - QUOTA}, quota.notes
    assert counters1["rejected"] - counters0["rejected"] == 2000 - QUOTA
    # cancels of the legitimate client's ids were silent and changed nothing (its maps completed above)
    assert by_name["guesser"].notes["answers_to_cancels"] is None
    assert counters1["cancelled"] - counters0["cancelled"] == QUOTA  # only the abuser's own cancels
    after_flood = rss(pid)
    STATE.update(peak=peak, after_flood=after_flood)
    print(
        f"\nflood: {flood_seconds:.1f} s; legit maps of 2000 during it: {maps_during_flood}; "
        f"offender seconds: {', '.join(f'{o.name} {o.seconds:.1f}' for o in offenders)}; "
        f"broker RSS baseline {baseline / MB:.1f} MiB, right after {peak / MB:.1f} MiB, "
        f"clients in status {legit.status()['clients']} (before {clients0}); errors {dict(expected)}; "
        f"notes {[(o.name, o.notes) for o in offenders]}"
    )
    assert after_flood - baseline < RSS_MARGIN + 50 * MB  # a sanity bound; the real check is after the sweep


# --------------------------------------------------------------------------- other peers' task ids


@pytest.mark.timeout(60)
def test_other_peers_task_ids_change_nothing(swarm: LocalSwarm, legit: zlink.Client, raw_peer: MakeRaw) -> None:
    with zlink.Client(swarm.invite("client", "victim"), connect_timeout=15) as victim:
        counters0, errors0 = status_counts(legit)
        futs = [victim.submit("sleep_then", i, 1.5, timeout=30) for i in range(6)]
        tids = [f.tid for f in futs]
        wait_for(lambda: legit.status()["running"] >= 4, timeout=15, what="the victim's tasks to run")

        attacker = raw_peer(swarm.endpoint, join(swarm, "attacker"))
        hello(attacker)
        attacker.send([P.encode(P.Cancel(tids=tuple(tids)))])  # not yours: ignored, silently
        assert attacker.recv(timeout=0.3) is None
        # SUBMIT with the victim's ids: refused, task by task, to the attacker only
        specs = tuple(P.TaskSpec(t, "echo", 10.0, 1) for t in tids)
        attacker.send([P.encode(P.Submit(tasks=specs)), *(P.pack_value([["stolen"]]) for _ in specs)])
        reply = attacker.recv(timeout=10)
        assert reply is not None
        msg = decode(reply)
        assert isinstance(msg, P.Result)
        assert sorted(r.tid for r in msg.results) == sorted(tids)
        assert {r.status for r in msg.results} == {P.Outcome.REJECTED}
        assert {P.unpack_value(p) for p in reply[1:]} == {"task id in use"}
        # the victim's session under another key: refused
        stolen = attacker.ask([P.encode(P.Hello(role="client", session=victim.session))])
        assert isinstance(stolen, P.Error) and stolen.code == "forbidden"

        # a node key that was never given these tasks answers them: discarded (stale), never delivered
        rogue = raw_peer(swarm.endpoint, join(swarm, "rogue-node", "node"))
        hello(rogue, role="node", skills={"rogue-only": {}}, slots=1)
        forged = tuple(P.ResultItem(t, a, P.Outcome.OK) for t in tids for a in (1, 2))
        rogue.send([P.encode(P.Result(results=forged)), *(P.pack_value("forged") for _ in forged)])
        cancel = rogue.ask([P.encode(P.Cancel(tids=tuple(tids)))])
        assert isinstance(cancel, P.Error) and cancel.code == "unexpected"
        rogue.send([P.encode(P.Bye(reason="done"))])  # before it misses its heartbeats and is declared dead

        assert [f.result(timeout=30) for f in futs] == list(range(6))
        counters1, errors1 = status_counts(legit)
    assert counters1["stale_results"] - counters0["stale_results"] == len(forged)
    assert counters1["cancelled"] == counters0["cancelled"]
    assert counters1["rejected"] - counters0["rejected"] == len(tids)
    assert delta(errors1, errors0) == {"forbidden": 1, "unexpected": 1}


@pytest.mark.timeout(60)
def test_rogue_node_cannot_claim_a_task_by_listing_it_in_hello(
    swarm: LocalSwarm, legit: zlink.Client, raw_peer: MakeRaw
) -> None:
    with zlink.Client(swarm.invite("client", "claim-victim"), connect_timeout=15) as victim:
        first = victim.submit("square", 3)
        assert first.result(timeout=20) == 9
        next_tid = victim.session + (int.from_bytes(first.tid[8:], "big") + 1).to_bytes(8, "big")
        rogue = raw_peer(swarm.endpoint, join(swarm, "claiming-node", "node"))
        hello(rogue, role="node", skills={"unrelated": {}}, slots=1, running=((next_tid, 1),))
        fut = victim.submit("square", 4, timeout=20)
        assert fut.tid == next_tid
        rogue.send([P.encode(P.Result(results=(P.ResultItem(next_tid, 1, P.Outcome.OK),))), P.pack_value(-1)])
        try:
            assert fut.result(timeout=20) == 16, "the rogue node's forged result was delivered"
        finally:
            rogue.send([P.encode(P.Bye(reason="done"))])


@pytest.mark.timeout(60)
@pytest.mark.xfail(
    strict=True,
    reason="known weakness: task ids are the client's session and a counter, and the broker keys tasks by id, "
    "so a key that learns a session can submit its next ids first and the owner's tasks are refused "
    "('task id in use'); see docs/security.md",
)
def test_squatting_a_clients_next_task_ids_does_not_fail_its_tasks(swarm: LocalSwarm, raw_peer: MakeRaw) -> None:
    with zlink.Client(swarm.invite("client", "squat-victim"), connect_timeout=15) as victim:
        first = victim.submit("square", 3)
        assert first.result(timeout=20) == 9
        counter = int.from_bytes(first.tid[8:], "big")
        squatter = raw_peer(swarm.endpoint, join(swarm, "squatter"))
        hello(squatter)
        specs = tuple(
            P.TaskSpec(victim.session + (counter + k).to_bytes(8, "big"), "nobody-offers-this", 5.0, 1)
            for k in range(1, 4)
        )
        squatter.send([P.encode(P.Submit(tasks=specs)), *(P.pack_value([[0]]) for _ in specs)])
        time.sleep(0.3)
        try:
            assert victim.submit("square", 4).result(timeout=20) == 16
        finally:
            squatter.send([P.encode(P.Cancel(tids=tuple(s.tid for s in specs)))])


# --------------------------------------------------------------------------- quota, on its own


@pytest.mark.timeout(60)
def test_quota_abuser_is_rejected_and_others_are_not(swarm: LocalSwarm, legit: zlink.Client) -> None:
    counters0, _ = status_counts(legit)
    abuser = Offender("quota-2", quota_abuse(swarm, "evil-greedy-2", 500))
    abuser.thread.start()
    serves(legit)  # another key's quota does not touch this client
    abuser.thread.join(40)
    assert abuser.error is None, abuser.error
    assert abuser.notes["accepted"] == QUOTA
    assert abuser.notes["rejections"] == {"quota": 500 - QUOTA}
    counters1, _ = status_counts(legit)
    assert counters1["rejected"] - counters0["rejected"] == 500 - QUOTA
    # its quota is back once its tasks are gone: the next submission is accepted
    with zlink.Client(swarm.invite("client", "evil-greedy-2b"), connect_timeout=15) as again:
        assert again.submit("square", 5, timeout=20).result(timeout=20) == 25


# --------------------------------------------------------------------------- the submission rate limit


@pytest.mark.timeout(60)
def test_rate_limit_rejects_bursts_with_a_clear_reason(tmp_path: Path, raw_peer: MakeRaw) -> None:
    sw = LocalSwarm(home=tmp_path / "home", broker_args=("--max-submit-rate", "20"), seal=False)
    try:
        sw.start_broker()
        raw = raw_peer(sw.endpoint, zlink.Join.parse(sw.invite("client", "burst")))
        assert hello(raw).max_rate == 20.0
        specs = tuple(P.TaskSpec(os.urandom(16), "nobody-offers-this", 30.0, 1) for _ in range(100))
        raw.send([P.encode(P.Submit(tasks=specs)), *(P.pack_value([[1]]) for _ in specs)])
        reply = raw.recv(timeout=10)
        assert reply is not None
        msg = decode(reply)
        assert isinstance(msg, P.Result)
        reasons = Counter(str(P.unpack_value(p)).split(":")[0] for p in reply[1:])
        assert {r.status for r in msg.results} == {P.Outcome.REJECTED}
        assert set(reasons) == {"rate limit"}, reasons
        # about one second's burst gets through (the broker allows some headroom over the nominal rate)
        refused = reasons["rate limit"]
        assert 100 - 2 * 20 <= refused <= 100 - 20, refused
        with zlink.Client(sw.invite("client", "watcher"), connect_timeout=15) as watcher:
            st = watcher.status()
            assert st["counters"]["rejected"] == refused and st["counters"]["submitted"] == 100 - refused
        assert sw.broker is not None and sw.broker.poll() is None
    finally:
        sw.close()


# --------------------------------------------------------------------------- one message that kills the broker


@pytest.mark.timeout(60)
def test_deeply_nested_header_does_not_kill_the_broker(tmp_path: Path, raw_peer: MakeRaw) -> None:
    sw = LocalSwarm(home=tmp_path / "home", seal=False)
    try:
        sw.start_broker()
        raw = raw_peer(sw.endpoint, zlink.Join.parse(sw.invite("client", "nester")))
        nested = b"\x91" * 1010 + b"\xc0"  # under msgpack's own depth limit of 1024
        raw.send([b"\x82" + _hdr("v") + nested + _hdr("c") + _hdr("STATUS")])
        reply = raw.recv(timeout=2)
        time.sleep(0.5)
        assert sw.broker is not None and sw.broker.poll() is None, f"the broker exited ({sw.broker.poll()})"
        assert reply is not None and isinstance(decode(reply), P.Error)
    finally:
        sw.close()


# --------------------------------------------------------------------------- memory back to baseline


@pytest.mark.timeout(90)
def test_memory_returns_to_baseline(swarm: LocalSwarm, legit: zlink.Client) -> None:
    if "baseline" not in STATE:
        pytest.skip("needs test_flood_of_hostile_peers to have run first (its baseline)")
    assert swarm.broker is not None
    pid = swarm.broker.pid
    # sessions abandoned without BYE are swept once silent for the broker's client timeout (30 s)
    t0 = time.monotonic()
    wait_for(
        lambda: legit.status()["clients"] <= STATE["clients0"] + 5,
        timeout=75,
        interval=1.0,
        what="the abandoned client sessions to be swept",
    )
    swept = time.monotonic() - t0
    serves(legit)
    time.sleep(2.0)
    settled = rss(pid)
    st = legit.status()
    print(
        f"\nbroker RSS: baseline {STATE['baseline'] / MB:.1f} MiB, peak {STATE.get('peak', 0) / MB:.1f} MiB, "
        f"settled {settled / MB:.1f} MiB (+{(settled - STATE['baseline']) / MB:.1f}); sessions swept after "
        f"{swept:.1f} s more; clients_gone {st['counters'].get('clients_gone')}; clients now {st['clients']}"
    )
    assert settled - STATE["baseline"] < RSS_MARGIN, (STATE, settled)
    assert swarm.broker.poll() is None
