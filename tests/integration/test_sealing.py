"""Sealed payloads and per-key limits, with real processes and CurveZMQ on 127.0.0.1.

One sealed swarm (a CLI broker, two CLI nodes serving skills_seal.py and one
in-process node) serves most tests; raw pyzmq peers with real keys play the
broker's part: they tamper with, move, forge and replay sealed payloads. The
limits run against their own brokers (``--max-submit-rate``, and an in-process
broker with ``max_tasks_per_client``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

import zlink
from zlink import protocol as P
from zlink import seal as S
from zlink.cli import render_status
from zlink.demo import LocalSwarm
from zlink.protocol import Outcome
from zlink.scheduler import RATE_HEADROOM
from zlink.seal import ClientSealer, NodeSealer, SealKey, is_sealed

from .conftest import RawPeer, clean_env, invite, run_zlink, wait_for, zlink_exe

SKILLS = Path(__file__).resolve().with_name("skills_seal.py")
NODES = ["seal-node-1", "seal-node-2"]
MakeRaw = Callable[[str, "zlink.Join | None"], RawPeer]


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    sw = LocalSwarm(home=tmp_path_factory.mktemp("sealing") / "home")  # seal=True: a key in every join string
    try:
        sw.start_broker()
        for name in NODES:
            sw.start_node(str(SKILLS), slots=2, name=name)
        with zlink.Client(sw.invite("client", "seal-probe"), connect_timeout=15) as probe:
            sw.wait_nodes(probe, len(NODES), timeout=30)
        yield sw
    finally:
        sw.close()


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm) -> Iterator[zlink.Client]:
    with zlink.Client(swarm.invite("client", "seal-client"), connect_timeout=15) as c:
        yield c


@pytest.fixture(scope="module")
def inproc_node(swarm: LocalSwarm, client: zlink.Client) -> Iterator[zlink.Node]:
    """A node in this process (so its counters can be read), with the swarm's key from its join string."""
    node = zlink.Node(swarm.invite("node", "seal-inproc"), slots=2, connect_timeout=15)

    @node.skill("inproc_square")
    def inproc_square(x: int) -> int:
        return x * x

    node.start()
    try:
        wait_for(lambda: _node(client.status(), "seal-inproc"), timeout=15, what="the in-process node")
        yield node
    finally:
        node.stop()


def _node(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((n for n in status["nodes"] if n["name"] == name), None)


def _plain_join(swarm: LocalSwarm, role: str, name: str) -> zlink.Join:
    """A join string of this swarm without the seal key in it."""
    return zlink.Join.parse(swarm.invite(role, name)).with_seal_key(None)


def _flip(data: bytes, pos: int = -1) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


def _hello_client(raw: RawPeer, name: str) -> bytes:
    session = os.urandom(8)
    reply = raw.ask([P.encode(P.Hello(name=name, role="client", session=session))], timeout=10)
    assert isinstance(reply, P.Welcome), reply
    return session


def _collect(raw: RawPeer, tids: set[bytes], timeout: float = 20.0) -> dict[bytes, tuple[P.ResultItem, bytes]]:
    """Read RESULT messages until every id in ``tids`` has a final outcome."""
    got: dict[bytes, tuple[P.ResultItem, bytes]] = {}
    deadline = time.monotonic() + timeout
    while not tids <= set(got):
        frames = raw.recv(timeout=max(0.1, deadline - time.monotonic()))
        assert frames is not None, f"{len(tids - set(got))} of {len(tids)} outcomes never came"
        msg = P.decode(frames[0], len(frames) - 1)
        if isinstance(msg, P.Result):
            for item, payload in zip(msg.results, frames[1:], strict=True):
                if item.status != Outcome.PARTIAL:
                    got[item.tid] = (item, payload)
    return got


class RawNode:
    """A hand-made node: registers skills over a raw DEALER, beats on the heartbeat channel,
    and answers whatever it is dispatched with whatever result bytes a test gives it."""

    def __init__(self, endpoint: str, join: zlink.Join, name: str, skills: list[str]) -> None:
        self.peer = RawPeer(endpoint, join)
        self.session = os.urandom(8)
        self._queue: list[tuple[P.DispatchItem, bytes]] = []
        hello = P.Hello(name=name, role="node", session=self.session, skills={s: {} for s in skills}, slots=4)
        self.peer.send([P.encode(hello)])
        self.welcome = self._wait(P.Welcome)
        self._stop = threading.Event()
        self._ctx: zmq.Context[Any] = zmq.Context()
        host = endpoint.rsplit(":", 1)[0]
        self._beats = threading.Thread(target=self._beat, args=(join, f"{host}:{self.welcome.heartbeat_port}"))
        self._beats.start()

    def _beat(self, join: zlink.Join, endpoint: str) -> None:
        pub = self._ctx.socket(zmq.PUB)
        try:
            assert join.keys.secret is not None
            pub.curve_serverkey = join.broker_key.encode("ascii")
            pub.curve_publickey = join.keys.public.encode("ascii")
            pub.curve_secretkey = join.keys.secret.encode("ascii")
            pub.setsockopt(zmq.LINGER, 0)
            pub.connect(endpoint)
            beat = P.encode(P.Heartbeat(session=self.session, epoch=self.welcome.epoch, free=4))
            while not self._stop.wait(0.1):
                try:
                    pub.send(beat, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            pub.close(linger=0)

    def _wait(self, kind: type[P.Message], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            frames = self.peer.recv(timeout=max(0.05, deadline - time.monotonic()))
            assert frames is not None, f"no {kind.__name__} came"
            msg = P.decode(frames[0], len(frames) - 1)
            if isinstance(msg, P.Dispatch):
                self._queue.extend(zip(msg.tasks, frames[1:], strict=True))
            if isinstance(msg, kind):
                return msg

    def next_task(self, timeout: float = 15.0) -> tuple[P.DispatchItem, bytes]:
        if not self._queue:
            self._wait(P.Dispatch, timeout)
        return self._queue.pop(0)

    def answer(self, item: P.DispatchItem, status: int, payload: bytes) -> None:
        self.peer.send([P.encode(P.Result(results=(P.ResultItem(item.tid, item.attempt, status),))), payload])

    def close(self) -> None:
        try:
            self.peer.send([P.encode(P.Bye(reason="done"))])
            time.sleep(0.1)
        finally:
            self._stop.set()
            self._beats.join(5)
            self._ctx.term()
            self.peer.close()


FORGED_ERROR = P.pack_value(["ValueError", "forged words", "", "raw-forger"])


def _sealed_partial(sealer: NodeSealer, pub: bytes, item: P.DispatchItem, seq: int, value: Any) -> bytes:
    """A partial result as a real node seals it: numbered (4 bytes) inside the seal."""
    plain = seq.to_bytes(4, "big") + P.pack_value(value)
    return sealer.seal_result(pub, item.tid, item.skill, item.attempt, Outcome.PARTIAL, plain)


@contextmanager
def cli_node(
    join: str, name: str, log: Path, *args: str, skill_set: str = "", seal_env: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``zlink node`` serving skills_seal.py as a child process, its stderr in ``log``; stopped on exit."""
    env = clean_env(ZLINK_JOIN=join, SKILLS_SEAL_SET=skill_set)
    env.pop("ZLINK_SEAL_KEY", None)
    if seal_env is not None:
        env["ZLINK_SEAL_KEY"] = seal_env
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*zlink_exe(), "node", "--skills", str(SKILLS), "--slots", "1", "--name", name, "--log-level", "warning",
             *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _scan_memory(pid: int, needles: list[bytes]) -> set[bytes]:
    """The needles found in the readable memory of process ``pid`` (``/proc/PID/mem``)."""
    found: set[bytes] = set()
    overlap = max(len(n) for n in needles) - 1
    chunk = 8 << 20
    with open(f"/proc/{pid}/maps") as f:
        regions = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in regions:
            parts = line.split()
            if not parts[1].startswith("r") or (len(parts) > 5 and parts[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            tail = b""
            pos = start
            while pos < end:
                try:
                    mem.seek(pos)
                    data = mem.read(min(chunk, end - pos))
                except (OSError, ValueError):
                    break
                if not data:
                    break
                buf = tail + data
                found.update(n for n in needles if n in buf)
                tail = buf[-overlap:]
                pos += len(data)
    return found


# --------------------------------------------------------------------------- a sealed swarm works


@pytest.mark.timeout(60)
def test_sealed_swarm_runs_submit_map_stream_and_errors(swarm: LocalSwarm, client: zlink.Client) -> None:
    assert swarm.seal_key is not None
    assert client.seal_key == swarm.seal_key  # taken from the join string
    assert zlink.Join.parse(swarm.invite("client", "any-peer")).seal_key == swarm.seal_key  # in every one
    before = client.status()["counters"]["submitted"]
    assert client.submit("square", 7).result(timeout=20) == 49
    value = {"bytes": b"\x00\xc1\xff", "list": [1, 2.5, None, True], "text": "üñï"}
    assert client.submit("echo", value).result(timeout=20) == value
    # map, in fixed batches: 1000 items travel in 20 sealed tasks
    assert list(client.map("square", range(1000), batch=50, timeout=30)) == [x * x for x in range(1000)]
    assert client.status()["counters"]["submitted"] - before <= 2 + 20
    # map with adaptive batches, and one item per task in completion order
    assert list(client.map("square", range(3000), timeout=30)) == [x * x for x in range(3000)]
    assert sorted(client.map("square", range(200), ordered=False, batch=1, timeout=30)) == sorted(
        x * x for x in range(200)
    )
    # a generator skill's partial results, then its return value
    stream = client.stream("count_up", 6, tag="p", timeout=30)
    assert list(stream) == [f"p{i}" for i in range(6)]
    assert stream.result(timeout=20) == "pdone"
    # errors are sealed too and arrive intact
    with pytest.raises(zlink.RemoteError) as info:
        client.submit("fail", "sealed boom").result(timeout=20)
    assert (info.value.remote_type, info.value.remote_message) == ("ValueError", "sealed boom")
    assert "ValueError: sealed boom" in info.value.remote_traceback
    with pytest.raises(zlink.RemoteError):
        list(client.map("fail", ["in a batch"] * 4, batch=4, timeout=30))
    # outcomes the broker decides are plain strings and still come through
    with pytest.raises(zlink.TaskTimeout):
        client.submit("hold", 1, 10.0, timeout=0.5).result(timeout=20)
    fut = client.submit("hold", 1, 10.0)
    time.sleep(0.2)
    assert fut.cancel()
    assert fut.cancelled()

    # the asyncio client seals the same way
    async def run_async() -> list[int]:
        async with zlink.AsyncClient(swarm.invite("client", "seal-async"), connect_timeout=15) as ac:
            return [await ac.submit("square", 5), *[r async for r in ac.map("square", range(50))]]

    assert asyncio.run(run_async()) == [25, *(x * x for x in range(50))]
    assert client.seal_failures == 0
    st = client.status()
    for name in NODES:
        node = _node(st, name)
        assert node is not None and node["seal"] == swarm.seal_key.key_id


@pytest.mark.timeout(60)
def test_broker_memory_never_holds_a_sealed_canary(swarm: LocalSwarm, client: zlink.Client) -> None:
    """The proof for sealing: while sealed tasks, results, partials and errors carrying a
    canary flow through the broker (and some wait in its queues), its memory has no canary.
    An unsealed task parked at the same broker shows that the scan would find one."""
    assert swarm.broker is not None
    pid = swarm.broker.pid
    try:
        _scan_memory(pid, [b"warm-up"])
    except PermissionError as exc:
        pytest.skip(f"cannot read /proc/{pid}/mem here ({exc}); needs root or ptrace_scope 0")
    canary = f"zlink-canary-{uuid.uuid4().hex}"
    control = f"zlink-control-{uuid.uuid4().hex}"
    errors: list[BaseException] = []
    rounds = [0]
    stop = threading.Event()

    def traffic() -> None:
        try:
            while not stop.is_set():
                assert client.submit("echo", canary).result(timeout=20) == canary
                assert list(client.map("echo", [canary] * 300, timeout=30)) == [canary] * 300
                assert list(client.map("echo", [f"{canary}{i}" for i in range(20)], batch=1, timeout=30)) == [
                    f"{canary}{i}" for i in range(20)
                ]
                assert list(client.stream("count_up", 3, tag=canary, timeout=30)) == [f"{canary}{i}" for i in range(3)]
                with pytest.raises(zlink.RemoteError) as info:
                    client.submit("fail", canary).result(timeout=20)
                assert info.value.remote_message == canary
                rounds[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    with zlink.Client(_plain_join(swarm, "client", "mem-plain"), connect_timeout=15) as plain:
        assert plain.seal_key is None
        # parked at the broker (no node offers the skill): one unsealed, some sealed
        parked = [plain.submit("nobody_offers_this", control, timeout=50)]
        parked += [client.submit("nobody_offers_this", f"{canary}-parked-{i}", timeout=50) for i in range(20)]
        wait_for(lambda: client.status()["queued"].get("nobody_offers_this") == 21, what="the parked tasks")
        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            wait_for(lambda: rounds[0] >= 1 or errors, timeout=40, what="sealed traffic")
            for _ in range(3):  # scan while the traffic flows
                found = _scan_memory(pid, [canary.encode(), control.encode()])
                assert control.encode() in found, "the scan did not find the unsealed control payload"
                assert canary.encode() not in found, "a sealed argument or result is readable in the broker"
        finally:
            stop.set()
            worker.join(60)
            for f in parked:
                f.cancel()
    assert not worker.is_alive()
    assert not errors, errors
    assert rounds[0] >= 1


# --------------------------------------------------------------------------- a relay that tampers


@pytest.mark.timeout(60)
def test_tampered_moved_or_unsealed_tasks_get_a_seal_error(
    swarm: LocalSwarm, inproc_node: zlink.Node, raw_peer: MakeRaw
) -> None:
    """A raw client with the seal key plays a tampering broker: it submits valid sealed
    payloads, altered ones, ones moved to another task id or skill, and plain ones."""
    assert swarm.seal_key is not None
    raw = raw_peer(swarm.endpoint, zlink.Join.parse(swarm.invite("client", "raw-tamper")))
    session = _hello_client(raw, "raw-tamper")
    sealer = ClientSealer(swarm.seal_key)
    counter = itertools.count(1)

    def new_tid() -> bytes:
        return session + next(counter).to_bytes(8, "big")

    before = inproc_node.seal_failures
    specs: list[P.TaskSpec] = []
    frames: list[bytes] = []
    expect: dict[bytes, str] = {}  # tid -> "ok" or the words of its SealError

    def add(tid: bytes, skill: str, payload: bytes, outcome: str) -> None:
        specs.append(P.TaskSpec(tid, skill, 20.0, 1))
        frames.append(payload)
        expect[tid] = outcome

    args = P.pack_value([[6]])
    for skill in ("square", "inproc_square"):  # the CLI nodes, and the node in this process
        good = new_tid()
        good_payload = sealer.seal_task(good, skill, args)
        add(good, skill, good_payload, "ok")
        t = new_tid()
        add(t, skill, _flip(sealer.seal_task(t, skill, args)), "failed to open")  # one bit of the tag
        t = new_tid()
        add(t, skill, _flip(sealer.seal_task(t, skill, args), 36), "failed to open")  # one bit of the ciphertext
        add(new_tid(), skill, good_payload, "failed to open")  # a valid payload moved to another task id
        t = new_tid()
        add(t, skill, sealer.seal_task(t, "echo", args), "failed to open")  # sealed for another skill
        add(new_tid(), skill, args, "not sealed")  # no seal at all
    raw.send([P.encode(P.Submit(tasks=tuple(specs))), *frames])
    got = _collect(raw, set(expect))
    for tid, outcome in expect.items():
        item, payload = got[tid]
        if outcome == "ok":
            assert item.status == Outcome.OK, P.unpack_value(payload)
            assert is_sealed(payload)
            skill = next(s.skill for s in specs if s.tid == tid)
            assert P.unpack_value(sealer.open_result(tid, skill, item.attempt, item.status, payload)) == 36
            continue
        assert item.status == Outcome.ERROR
        assert not is_sealed(payload)  # a refusal carries no user data and goes unsealed
        rtype, message, _, _ = P.unpack_value(payload)
        assert rtype == "zlink.errors.SealError", (rtype, message)
        assert outcome in message
        assert f"seal key id is {swarm.seal_key.key_id}" in message
    assert inproc_node.seal_failures - before == 5
    # the nodes keep serving
    again = [new_tid(), new_tid()]
    payloads = [sealer.seal_task(again[0], "square", P.pack_value([[9]])),
                sealer.seal_task(again[1], "inproc_square", P.pack_value([[9]]))]  # fmt: skip
    specs2 = (P.TaskSpec(again[0], "square", 20.0), P.TaskSpec(again[1], "inproc_square", 20.0))
    raw.send([P.encode(P.Submit(tasks=specs2)), *payloads])
    got = _collect(raw, set(again))
    for tid, skill in zip(again, ("square", "inproc_square"), strict=True):
        item, payload = got[tid]
        assert item.status == Outcome.OK
        assert P.unpack_value(sealer.open_result(tid, skill, item.attempt, item.status, payload)) == 81
    assert inproc_node.seal_failures - before == 5


@pytest.mark.timeout(60)
def test_odd_task_ids_and_keys_never_stop_a_sealed_node(
    swarm: LocalSwarm, inproc_node: zlink.Node, raw_peer: MakeRaw
) -> None:
    """Short task ids, and (with the seal key) a low-order client key, end in SealError; the node serves on."""
    assert swarm.seal_key is not None
    raw = raw_peer(swarm.endpoint, zlink.Join.parse(swarm.invite("client", "raw-odd")))
    session = _hello_client(raw, "raw-odd")
    before = inproc_node.seal_failures
    short = [b"", b"x", b"1234567"]
    junk = [S.TASK_MAGIC + os.urandom(32) + os.urandom(40) for _ in short]
    # a task sealed with the seal key under an all-zero (low-order) client public key
    low = session + (1).to_bytes(8, "big")
    body = swarm.seal_key.task_aead(bytes(32)).encrypt(
        low[-8:].rjust(12, b"\0"), P.pack_value([[2]]), S._task_ad(low, "inproc_square")
    )
    specs = tuple(P.TaskSpec(t, "inproc_square", 20.0, 1) for t in [*short, low])
    raw.send([P.encode(P.Submit(tasks=specs)), *junk, S.TASK_MAGIC + bytes(32) + body])
    got = _collect(raw, {s.tid for s in specs})
    for spec in specs:
        item, payload = got[spec.tid]
        assert item.status == Outcome.ERROR
        assert P.unpack_value(payload)[0] == "zlink.errors.SealError"
    assert inproc_node.seal_failures - before == 4
    sealer = ClientSealer(swarm.seal_key)
    tid = session + (2).to_bytes(8, "big")
    raw.send([P.encode(P.Submit(tasks=(P.TaskSpec(tid, "inproc_square", 20.0),))),
              sealer.seal_task(tid, "inproc_square", P.pack_value([[12]]))])  # fmt: skip
    item, payload = _collect(raw, {tid})[tid]
    assert P.unpack_value(sealer.open_result(tid, "inproc_square", item.attempt, item.status, payload)) == 144


@pytest.mark.timeout(60)
def test_forged_or_tampered_results_fail_at_the_client(swarm: LocalSwarm, client: zlink.Client) -> None:
    """A raw node answers a real sealed client: only a result sealed with the seal key, to
    that client, for that task, attempt and status, is taken; partials are checked too."""
    assert swarm.seal_key is not None
    real = NodeSealer(swarm.seal_key)  # what an honest node would send
    forger = NodeSealer(SealKey.generate())  # an X25519 key of its own, but not the seal key
    node = RawNode(swarm.endpoint, zlink.Join.parse(swarm.invite("node", "raw-forger")), "raw-forger", ["forge_me"])
    try:
        with zlink.Client(swarm.invite("client", "forge-victim"), connect_timeout=15) as victim:

            def answer_with(make: Callable[[P.DispatchItem, bytes], tuple[int, bytes]]) -> zlink.TaskFuture:
                fut = victim.submit("forge_me", 1, timeout=30)
                item, payload = node.next_task()
                assert item.skill == "forge_me" and is_sealed(payload)
                # the task opens with the seal key: it is the victim's, sealed to its session key
                plain, pub = real.open_task(item.tid, item.skill, payload)
                assert P.unpack_value(plain) == [[1]]
                status, frame = make(item, pub)
                node.answer(item, status, frame)
                return fut

            def sealed(sealer: NodeSealer, item: P.DispatchItem, pub: bytes, status: int, value: Any,
                       attempt: int | None = None) -> bytes:  # fmt: skip
                return sealer.seal_result(
                    pub, item.tid, item.skill, item.attempt if attempt is None else attempt, status, P.pack_value(value)
                )

            # the control: a correctly sealed result is taken
            fut = answer_with(lambda it, pub: (Outcome.OK, sealed(real, it, pub, Outcome.OK, 42)))
            assert fut.result(timeout=20) == 42
            cases: list[tuple[str, Callable[[P.DispatchItem, bytes], tuple[int, bytes]], str]] = [
                ("forged", lambda it, pub: (Outcome.OK, sealed(forger, it, pub, Outcome.OK, 666)), "failed to open"),
                ("tampered", lambda it, pub: (Outcome.OK, _flip(sealed(real, it, pub, Outcome.OK, 42), 47)),
                 "failed to open"),
                ("unsealed ok", lambda it, pub: (Outcome.OK, P.pack_value(666)), "not sealed"),
                ("unsealed error", lambda it, pub: (Outcome.ERROR, FORGED_ERROR), "unverified"),
                ("error sealed as ok", lambda it, pub: (Outcome.OK, sealed(real, it, pub, Outcome.ERROR, 42)),
                 "failed to open"),
                ("other attempt", lambda it, pub: (Outcome.OK, sealed(real, it, pub, Outcome.OK, 42, it.attempt + 1)),
                 "failed to open"),
            ]  # fmt: skip
            for name, make, words in cases:
                fut = answer_with(make)
                with pytest.raises(zlink.SealError) as info:
                    fut.result(timeout=20)
                assert words in str(info.value), (name, str(info.value))
                assert info.value.task_id == fut.task_id
            assert victim.seal_failures == len(cases)
            # the unsealed error's text is shown, marked as unverified
            fut = answer_with(lambda it, pub: (Outcome.ERROR, FORGED_ERROR))
            with pytest.raises(zlink.SealError, match=r"unverified.*forged words"):
                fut.result(timeout=20)
            failures = victim.seal_failures

            # partial results: forged, unsealed, repeated or out of order ones never reach the caller
            stream = victim.stream("forge_me", 1, timeout=30)
            item, payload = node.next_task()
            _, pub = real.open_task(item.tid, item.skill, payload)
            first = _sealed_partial(real, pub, item, 1, "p1")
            third = _sealed_partial(real, pub, item, 3, "p3")
            for frame in (
                _sealed_partial(forger, pub, item, 1, "forged"),
                P.pack_value("unsealed partial"),
                first,
                first,  # the relay repeats one
                _sealed_partial(real, pub, item, 2, "p2"),
                third,
                _sealed_partial(real, pub, item, 2, "p2 again"),  # out of order
            ):
                node.answer(item, Outcome.PARTIAL, frame)
            node.answer(item, Outcome.OK, real.seal_result(pub, item.tid, item.skill, item.attempt, Outcome.OK,
                                                            P.pack_value("final")))  # fmt: skip
            assert list(stream) == ["p1", "p2", "p3"]
            assert stream.result(timeout=20) == "final"
            assert victim.seal_failures - failures == 4
        assert client.seal_failures == 0  # another client of the swarm saw nothing of it
    finally:
        node.close()


# --------------------------------------------------------------------------- peers that disagree


@pytest.mark.timeout(60)
def test_an_unsealed_client_gets_a_remote_error_from_sealed_nodes(
    swarm: LocalSwarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZLINK_SEAL_KEY", raising=False)
    with zlink.Client(_plain_join(swarm, "client", "no-key"), connect_timeout=15) as c:
        assert c.seal_key is None
        with pytest.raises(zlink.RemoteError) as info:
            c.submit("square", 3).result(timeout=20)
        assert not isinstance(info.value, zlink.SealError)
        assert info.value.remote_type == "zlink.errors.SealError"
        assert "not sealed" in info.value.remote_message
        assert "seal key" in info.value.remote_message
        with pytest.raises(zlink.RemoteError, match="SealError"):
            list(c.map("square", range(10), timeout=30))


@pytest.mark.timeout(60)
def test_a_client_with_another_seal_key_gets_seal_error(swarm: LocalSwarm) -> None:
    other = SealKey.generate()
    # the argument beats the key in the join string
    with zlink.Client(swarm.invite("client", "wrong-key"), connect_timeout=15, seal_key=other) as c:
        assert c.seal_key == other
        with pytest.raises(zlink.SealError) as info:
            c.submit("square", 3).result(timeout=20)
        text = str(info.value)
        assert "unverified" in text  # the node's refusal came unsealed: shown, but not trusted
        assert "failed to open" in text
        assert other.key_id in text
        assert c.seal_failures == 1
        with pytest.raises(zlink.SealError):
            list(c.map("square", range(20), timeout=30))


@pytest.mark.timeout(60)
def test_status_shows_seal_ids_and_mixed_swarms(
    swarm: LocalSwarm, client: zlink.Client, inproc_node: zlink.Node, tmp_path: Path
) -> None:
    assert swarm.seal_key is not None
    kid = swarm.seal_key.key_id
    status_join = swarm.invite("client", "status-reader")
    expected = {*NODES, "seal-inproc"}

    def names() -> set[str]:
        return {n["name"] for n in client.status()["nodes"]}

    wait_for(lambda: names() == expected, what="only the sealed nodes")
    st = client.status()
    assert {n["seal"] for n in st["nodes"]} == {kid}
    assert st["seal_keys"] == [kid]
    res = run_zlink("status", "--join", status_join)
    assert res.returncode == 0, res.stderr
    assert f"sealing: on (seal key id {kid})" in res.stdout
    assert "SEAL" in res.stdout and "UNSEALED" not in res.stdout

    other = SealKey.generate()
    stranger = zlink.Node(swarm.invite("node", "stranger-node"), slots=1, connect_timeout=15, seal_key=other)

    @stranger.skill("stranger_square")
    def stranger_square(x: int) -> int:
        return x * x

    stranger.start()
    try:
        with cli_node(_plain_join(swarm, "node", "bare-node").dump(), "bare-node", tmp_path / "bare.log",
                      skill_set="bare"):  # fmt: skip
            wait_for(lambda: names() == expected | {"stranger-node", "bare-node"}, timeout=30, what="the odd nodes")
            st = client.status()
            assert _node(st, "stranger-node")["seal"] == other.key_id  # type: ignore[index]
            assert _node(st, "bare-node")["seal"] == ""  # type: ignore[index]
            assert st["seal_keys"] == sorted({"", kid, other.key_id})
            res = run_zlink("status", "--join", status_join)
            assert res.returncode == 0, res.stderr
            assert "sealing: MIXED" in res.stdout
            bare_line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("bare-node"))
            assert "UNSEALED" in bare_line
            stranger_line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("stranger-node"))
            assert other.key_id in stranger_line
            # nothing runs across the groups: the tasks fail with SealError
            before = client.seal_failures
            with pytest.raises(zlink.SealError, match="unverified"):
                client.submit("stranger_square", 2).result(timeout=20)
            assert stranger.seal_failures == 1
            with pytest.raises(zlink.SealError, match="no seal key"):
                client.submit("bare_square", 2).result(timeout=20)
            assert client.seal_failures - before == 2
            assert "payloads are NOT sealed end to end" in (tmp_path / "bare.log").read_text()
        wait_for(lambda: "bare-node" not in names(), timeout=20, what="the unsealed node to leave")
        res = run_zlink("status", "--join", status_join)
        assert "sealing: MIXED: nodes hold different seal keys" in res.stdout
    finally:
        stranger.stop()
    wait_for(lambda: names() == expected, timeout=20, what="the stranger to leave")
    res = run_zlink("status", "--join", status_join)
    assert f"sealing: on (seal key id {kid})" in res.stdout


# --------------------------------------------------------------------------- the command line


@pytest.mark.timeout(60)
def test_cli_seal_key(swarm: LocalSwarm, tmp_path: Path) -> None:
    res = run_zlink("seal-key")
    assert res.returncode == 0, res.stderr
    printed = SealKey.parse(res.stdout.strip())
    assert res.stdout.count("\n") == 1

    out = tmp_path / "swarm.key"
    res = run_zlink("seal-key", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # the key goes to the file only
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = SealKey.load(out)
    assert key != printed
    assert f"wrote seal key {key.key_id} to {out}" in res.stderr
    assert key.text() not in res.stderr

    res = run_zlink("seal-key", "--out", str(out))
    assert res.returncode == 2
    assert "exists" in res.stderr and "never overwritten" in res.stderr
    assert SealKey.load(out) == key

    plain = _plain_join(swarm, "client", "cli-sealed")
    for source in (str(out), key.text()):
        res = run_zlink("seal-key", "--key", source, "--join", plain.dump())
        assert res.returncode == 0, res.stderr
        sealed = zlink.Join.parse(res.stdout.strip())
        assert sealed.seal_key == key
        assert (sealed.keys, sealed.endpoints, sealed.broker_key, sealed.name, sealed.role) == (
            plain.keys, plain.endpoints, plain.broker_key, plain.name, plain.role,
        )  # fmt: skip
    res = run_zlink("seal-key", "--key", str(out))  # no --join: the key itself
    assert res.returncode == 0 and SealKey.parse(res.stdout) == key

    res = run_zlink("seal-key", "--key", str(out), "--out", str(tmp_path / "new.key"))
    assert res.returncode == 2 and "cannot be combined" in res.stderr
    assert not (tmp_path / "new.key").exists()
    res = run_zlink("seal-key", "--key", SealKey.generate().text()[:-3], "--join", plain.dump())
    assert res.returncode == 2 and "damaged" in res.stderr
    os.chmod(out, 0o644)
    res = run_zlink("seal-key", "--key", str(out), "--join", plain.dump())
    assert res.returncode == 2 and "readable by other users" in res.stderr
    assert res.stdout == ""


@pytest.mark.timeout(60)
def test_cli_submit_says_whether_it_seals(swarm: LocalSwarm, tmp_path: Path) -> None:
    assert swarm.seal_key is not None
    plain = _plain_join(swarm, "client", "cli-submitter")
    res = run_zlink("submit", "--join", plain.dump(), "square", "5")
    assert "payloads are NOT sealed end to end" in res.stderr
    assert "whoever runs the broker host can read them" in res.stderr
    assert res.returncode == 1  # the sealed nodes refuse the plain task
    assert "SealError" in res.stderr and "not sealed" in res.stderr

    res = run_zlink("submit", "--join", plain.with_seal_key(swarm.seal_key).dump(), "square", "5")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "25"
    assert "NOT sealed" not in res.stderr

    # $ZLINK_SEAL_KEY: the key's text, or a key file
    env = clean_env(ZLINK_SEAL_KEY=swarm.seal_key.text())
    res = run_zlink("submit", "--join", plain.dump(), "square", "6", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "36" and "NOT sealed" not in res.stderr
    keyfile = tmp_path / "swarm.key"
    swarm.seal_key.save(keyfile)
    res = run_zlink("submit", "--join", plain.dump(), "square", "7", env=clean_env(ZLINK_SEAL_KEY=str(keyfile)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "49"
    # --seal-key beats the join string: a wrong one fails the task with SealError
    res = run_zlink("submit", "--join", plain.with_seal_key(swarm.seal_key).dump(),
                    "--seal-key", SealKey.generate().text(), "square", "2")  # fmt: skip
    assert res.returncode == 1
    assert "task failed" in res.stderr and "unverified" in res.stderr


@pytest.mark.timeout(60)
def test_cli_node_with_a_seal_key_file(
    swarm: LocalSwarm, client: zlink.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert swarm.seal_key is not None
    kid = swarm.seal_key.key_id
    keyfile = tmp_path / "node.key"
    swarm.seal_key.save(keyfile)
    join = _plain_join(swarm, "node", "keyfile-node").dump()
    log = tmp_path / "node.log"
    with cli_node(join, "keyfile-node", log, "--seal-key", str(keyfile), skill_set="extra") as proc:
        wait_for(lambda: proc.poll() is not None or "payloads sealed end to end" in log.read_text(),
                 timeout=20, what="the node's notice")  # fmt: skip
        assert proc.poll() is None, log.read_text()
        assert f"payloads sealed end to end (seal key id {kid})" in log.read_text()
        assert "NOT sealed" not in log.read_text()
        wait_for(lambda: _node(client.status(), "keyfile-node"), timeout=20, what="the node to join")
        assert _node(client.status(), "keyfile-node")["seal"] == kid  # type: ignore[index]
        assert client.submit("extra_square", 12).result(timeout=20) == 144
        assert list(client.map("extra_square", range(100), timeout=30)) == [x * x for x in range(100)]
        # an in-process client whose key comes from $ZLINK_SEAL_KEY (a key file) reaches it too
        monkeypatch.setenv("ZLINK_SEAL_KEY", str(keyfile))
        with zlink.Client(_plain_join(swarm, "client", "env-keyed"), connect_timeout=15) as c:
            assert c.seal_key == swarm.seal_key
            assert c.submit("extra_square", 3).result(timeout=20) == 9
    # a key file that others can read is refused before the node connects
    os.chmod(keyfile, 0o640)
    res = run_zlink("node", "--skills", str(SKILLS), "--seal-key", str(keyfile), env=clean_env(ZLINK_JOIN=join))
    assert res.returncode == 2
    assert "readable by other users" in res.stderr
    # and so is one named by $ZLINK_SEAL_KEY (zlink node reads it too)
    res = run_zlink("node", "--skills", str(SKILLS), env=clean_env(ZLINK_JOIN=join, ZLINK_SEAL_KEY=str(keyfile)))
    assert res.returncode == 2
    assert "readable by other users" in res.stderr


# --------------------------------------------------------------------------- per-key limits


RATE = 200.0
RATE_LIMITED = "rate limit: at most 200 new tasks per second per key"


@pytest.fixture(scope="module")
def rate_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    home = tmp_path_factory.mktemp("rate") / "home"
    sw = LocalSwarm(home=home, broker_args=("--max-submit-rate", f"{RATE:g}"), seal=False)
    try:
        sw.start_broker()
        sw.start_node(str(SKILLS), slots=2, name="rate-node")
        with zlink.Client(sw.invite("client", "rate-probe"), connect_timeout=15) as probe:
            sw.wait_nodes(probe, 1, timeout=30)
        yield sw
    finally:
        sw.close()


@pytest.mark.timeout(60)
def test_a_flood_over_the_submit_rate_is_refused_while_others_complete(
    rate_swarm: LocalSwarm, raw_peer: MakeRaw
) -> None:
    with zlink.Client(rate_swarm.invite("client", "bystander"), connect_timeout=15) as bystander:
        assert bystander.max_rate == RATE  # from WELCOME
        assert rate_swarm.seal_key is None and bystander.seal_key is None  # LocalSwarm(seal=False)
        assert "sealing: OFF" in render_status(bystander.status())  # (this swarm has no seal key)
        rejected_before = bystander.status()["counters"]["rejected"]
        # a raw client of another key floods the broker: 2,000 SUBMITs of one task each
        raw = raw_peer(rate_swarm.endpoint, zlink.Join.parse(rate_swarm.invite("client", "flooder")))
        session = _hello_client(raw, "flooder")
        tids = [session + i.to_bytes(8, "big") for i in range(2000)]
        got: dict[bytes, tuple[P.ResultItem, bytes]] = {}

        def drain(wait: float) -> None:
            while True:
                frames = raw.recv(timeout=wait)
                if frames is None:
                    return
                msg = P.decode(frames[0], len(frames) - 1)
                if isinstance(msg, P.Result):
                    for item, payload in zip(msg.results, frames[1:], strict=True):
                        got[item.tid] = (item, payload)
                wait = 0

        t0 = time.monotonic()
        for i, tid in enumerate(tids):
            raw.send([P.encode(P.Submit(tasks=(P.TaskSpec(tid, "square", 30.0, 1),))), P.pack_value([[i]])])
            if i % 50 == 49:
                drain(0)
        # other clients' tasks complete while the flood is refused (well within their own burst)
        futs = [bystander.submit("square", i, timeout=30) for i in range(50)]
        assert list(bystander.map("square", range(100), batch=1, timeout=30)) == [x * x for x in range(100)]
        assert [f.result(timeout=30) for f in futs] == [i * i for i in range(50)]
        deadline = time.monotonic() + 40
        while len(got) < len(tids) and time.monotonic() < deadline:
            drain(0.5)
        flood_seconds = time.monotonic() - t0
        assert len(got) == len(tids), f"{len(tids) - len(got)} outcomes of the flood never came"
        refused = [p for item, p in got.values() if item.status == Outcome.REJECTED]
        done = {tid: (item, p) for tid, (item, p) in got.items() if item.status != Outcome.REJECTED}
        assert {P.unpack_value(p) for p in refused} == {RATE_LIMITED}
        assert len(refused) >= 500
        # one second's burst, then the rate, with the broker's headroom over clients' own pacing
        # (an upper bound over however long the flood took)
        h = RATE_HEADROOM
        assert RATE <= len(done) <= (RATE * h + 1) + RATE * h * flood_seconds + 1
        for tid, (item, p) in done.items():
            assert item.status == Outcome.OK and P.unpack_value(p) == tids.index(tid) ** 2
        # the only refusals at the broker were the flooder's
        assert bystander.status()["counters"]["rejected"] - rejected_before == len(refused)


@pytest.mark.timeout(60)
def test_a_client_slows_down_to_the_submit_rate(rate_swarm: LocalSwarm) -> None:
    with zlink.Client(rate_swarm.invite("client", "pacer"), connect_timeout=15) as c:
        assert c.max_rate == RATE
        t0 = time.monotonic()
        futs = [c.submit("square", i, timeout=60) for i in range(600)]
        submitting = time.monotonic() - t0
        # 200 at once, then 200 a second: submit() waited about two seconds in all
        assert submitting >= 1.9, submitting
        for i, f in enumerate(futs):
            assert f.result(timeout=30) == i * i  # slowed down, never refused


@pytest.mark.timeout(60)
def test_a_paced_map_is_never_refused(rate_swarm: LocalSwarm) -> None:
    with zlink.Client(rate_swarm.invite("client", "paced"), connect_timeout=15) as paced:
        t0 = time.monotonic()
        values = list(paced.map("square", range(600), batch=1, timeout=60))
        seconds = time.monotonic() - t0
    assert values == [x * x for x in range(600)]
    assert seconds >= 1.9, seconds  # 600 tasks at 200/s with a burst of 200: two seconds at least


@pytest.mark.timeout(60)
def test_two_sessions_of_one_key_share_the_task_quota(tmp_path: Path) -> None:
    broker = zlink.Broker(bind="tcp://127.0.0.1:*", home=tmp_path / "home", max_tasks_per_client=5).start()
    key = SealKey.generate()
    gate = threading.Event()
    try:
        node = zlink.Node(invite(broker, "quota-node", "node"), slots=8, connect_timeout=15, seal_key=key)

        @node.skill()
        def wait_gate(i: int) -> int:
            gate.wait(30)
            return i

        node.start()
        try:
            join = invite(broker, "quota-client", "client")  # one key, two sessions
            a = zlink.Client(join, connect_timeout=15, seal_key=key)
            b = zlink.Client(join, connect_timeout=15, seal_key=key)
            c = zlink.Client(invite(broker, "other-client", "client"), connect_timeout=15, seal_key=key)
            try:
                assert a.session != b.session
                assert a.max_tasks == b.max_tasks == 5
                held = [a.submit("wait_gate", i, timeout=30) for i in range(5)]
                wait_for(lambda: a.status()["running"] == 5, what="five tasks of the key at the node")
                # the other session of the same key has room by its own count, but the key is full
                with pytest.raises(zlink.RejectedError) as info:
                    b.submit("wait_gate", 99, timeout=30).result(timeout=20)
                assert "quota: this key has 5 tasks at the broker" in str(info.value)
                # another key is not affected
                other = c.submit("wait_gate", 7, timeout=30)
                gate.set()
                assert [f.result(timeout=20) for f in held] == [0, 1, 2, 3, 4]
                assert other.result(timeout=20) == 7
                # finished tasks free the key's quota
                assert b.submit("wait_gate", 8, timeout=30).result(timeout=20) == 8
                assert a.status()["counters"]["rejected"] == 1
            finally:
                for cl in (a, b, c):
                    cl.close()
        finally:
            gate.set()
            node.stop()
    finally:
        gate.set()
        broker.stop()
