"""Authentication and authorisation against a CLI broker process over real CurveZMQ."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq

import zlink
from zlink import protocol as P
from zlink.demo import LocalSwarm
from zlink.security import BrokerHome, generate_keypair

from .conftest import SKILLS, RawPeer, node_by_name, run_zlink, start_swarm, wait_for

MakeRaw = Callable[[str, "zlink.Join | None"], RawPeer]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with start_swarm(tmp_path_factory.mktemp("auth") / "home", ["auth-node"], slots=2) as sw:
        yield sw


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm) -> Iterator[zlink.Client]:
    with zlink.Client(swarm.invite("client", "good-client"), connect_timeout=15) as c:
        yield c


def _serves(client: zlink.Client, n: int = 50) -> None:
    assert list(client.map("square", range(n), timeout=30)) == [x * x for x in range(n)]


def _broker_alive(swarm: LocalSwarm) -> bool:
    return swarm.broker is not None and swarm.broker.poll() is None


@pytest.mark.timeout(30)
def test_unauthorised_key_is_refused_quickly(swarm: LocalSwarm, client: zlink.Client) -> None:
    broker_key = BrokerHome(swarm.home).keys().public
    join = zlink.Join(endpoints=(swarm.endpoint,), broker_key=broker_key, keys=generate_keypair(), name="stranger")
    denied_before = client.status()["counters"].get("auth_denied", 0)
    t0 = time.monotonic()
    with pytest.raises(zlink.AuthenticationError):
        zlink.Client(join, connect_timeout=10)
    assert time.monotonic() - t0 < 5
    # the broker counts the refusal (its counter is refreshed about once a second)
    wait_for(lambda: client.status()["counters"].get("auth_denied", 0) > denied_before, timeout=10, what="auth_denied")
    _serves(client)


@pytest.mark.timeout(30)
def test_wrong_broker_key_is_refused_quickly(swarm: LocalSwarm, client: zlink.Client) -> None:
    good = zlink.Join.parse(swarm.invite("client", "wrong-broker-key"))
    impostor = generate_keypair().public
    join = zlink.Join(endpoints=good.endpoints, broker_key=impostor, keys=good.keys, name=good.name, role=good.role)
    t0 = time.monotonic()
    # observed (and documented in zlink.errors): AuthenticationError, a subclass of ConnectError
    with pytest.raises(zlink.AuthenticationError):
        zlink.Client(join, connect_timeout=10)
    assert time.monotonic() - t0 < 5
    # the same keys with the right broker key work
    with zlink.Client(good, connect_timeout=10) as c:
        assert c.submit("square", 4).result(timeout=20) == 16


@pytest.mark.timeout(30)
def test_plaintext_dealer_gets_nothing(swarm: LocalSwarm, client: zlink.Client, raw_peer: MakeRaw) -> None:
    plain = raw_peer(swarm.endpoint, None)
    hello = P.encode(P.Hello(name="plain", role="client", session=os.urandom(8), agent="raw"))
    plain.send([hello])
    plain.send([P.encode(P.Status())])
    assert plain.recv(timeout=1.0) is None
    _serves(client)
    assert _broker_alive(swarm)


@pytest.mark.timeout(30)
def test_unauthorised_curve_dealer_gets_nothing(swarm: LocalSwarm, client: zlink.Client, raw_peer: MakeRaw) -> None:
    broker_key = BrokerHome(swarm.home).keys().public
    stranger = zlink.Join(endpoints=(swarm.endpoint,), broker_key=broker_key, keys=generate_keypair())
    raw = raw_peer(swarm.endpoint, stranger)
    # the message is queued on the DEALER; the handshake never completes, so it never leaves
    raw.sock.send(P.encode(P.Status()), zmq.NOBLOCK)
    assert raw.recv(timeout=1.0) is None
    _serves(client)


@pytest.mark.timeout(40)
def test_revoked_key_refused_and_live_client_dropped(swarm: LocalSwarm, client: zlink.Client) -> None:
    join = swarm.invite("client", "victim")
    live = zlink.Client(join, connect_timeout=10)
    try:
        assert live.submit("square", 3).result(timeout=20) == 9
        running = live.submit("sleep_then", "never", 30)
        wait_for(lambda: client.status()["running"] >= 1, timeout=10, what="the victim's task to start")

        assert [p.name for p in BrokerHome(swarm.home).revoke("victim")] == ["victim.key"]

        # new connections with the key are refused from now on
        t0 = time.monotonic()
        with pytest.raises(zlink.AuthenticationError):
            zlink.Client(join, connect_timeout=10)
        assert time.monotonic() - t0 < 5

        # the already-connected client is told (ERROR revoked, within ~1 s): its
        # unresolved tasks fail with AuthenticationError and the client closes itself
        with pytest.raises(zlink.AuthenticationError, match="revoked"):
            running.result(timeout=15)
        assert live.closed
        with pytest.raises(zlink.ClosedError):
            live.submit("square", 1)
        # the broker dropped the victim's running task and told the node to stop it
        wait_for(lambda: client.status()["running"] == 0, timeout=10, what="the victim's task to be dropped")
        wait_for(
            lambda: node_by_name(client.status(), "auth-node")["busy"] == 0,  # type: ignore[index]
            timeout=10,
            what="the node to free the slot",
        )
    finally:
        live.close()
    _serves(client)


@pytest.mark.timeout(60)
def test_revoke_via_cli_stops_a_running_node(swarm: LocalSwarm, client: zlink.Client) -> None:
    proc = swarm.start_node(str(SKILLS), slots=1, name="doomed-node")
    try:
        wait_for(lambda: node_by_name(client.status(), "doomed-node"), timeout=20, what="doomed-node to join")
        res = run_zlink("revoke", "--home", str(swarm.home), "doomed-node", timeout=30)
        assert res.returncode == 0, res.stderr
        assert "revoked 'doomed-node'" in res.stdout
        assert not (swarm.home / "allowed" / "doomed-node.key").exists()
        # the node hears ERROR revoked, gives up, and the CLI exits with code 3
        assert proc.wait(20) == 3
        wait_for(lambda: node_by_name(client.status(), "doomed-node") is None, timeout=10, what="node removal")
        # revoking it again is a clear configuration error
        again = run_zlink("revoke", "--home", str(swarm.home), "doomed-node", timeout=30)
        assert again.returncode == 2
        assert "no allowed key named 'doomed-node'" in again.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _serves(client)


@pytest.mark.timeout(30)
def test_node_key_cannot_act_as_client(swarm: LocalSwarm, client: zlink.Client) -> None:
    node_join = swarm.invite("node", "node-only")
    t0 = time.monotonic()
    with pytest.raises(zlink.AuthenticationError, match="may not act as a client"):
        zlink.Client(node_join, connect_timeout=10)
    assert time.monotonic() - t0 < 5
    _serves(client)


@pytest.mark.timeout(30)
def test_client_key_cannot_register_as_node(swarm: LocalSwarm, client: zlink.Client) -> None:
    node = zlink.Node(swarm.invite("client", "client-only"), slots=1, connect_timeout=10)
    node.add_skills(str(SKILLS))
    t0 = time.monotonic()
    try:
        with pytest.raises(zlink.AuthenticationError, match="may not act as a node"):
            node.start()
    finally:
        node.stop()
    assert time.monotonic() - t0 < 5
    assert node_by_name(client.status(), "client-only") is None


@pytest.mark.timeout(30)
def test_raw_hello_with_a_role_the_key_lacks_is_forbidden(swarm: LocalSwarm, raw_peer: MakeRaw) -> None:
    raw = raw_peer(swarm.endpoint, zlink.Join.parse(swarm.invite("client", "raw-role")))
    hello = P.Hello(name="raw", role="node", session=os.urandom(8), skills={"square": {}}, slots=1)
    reply = raw.ask([P.encode(hello)])
    assert isinstance(reply, P.Error) and reply.code == "forbidden"
    reply = raw.ask([P.encode(P.Hello(name="raw", role="emperor", session=os.urandom(8)))])
    assert isinstance(reply, P.Error) and reply.code == "bad-role"
    # the role it does have is welcome
    reply = raw.ask([P.encode(P.Hello(name="raw", role="client", session=os.urandom(8)))])
    assert isinstance(reply, P.Welcome) and reply.role == "client"


@pytest.mark.timeout(40)
def test_another_key_cannot_hijack_a_session_or_task(
    swarm: LocalSwarm, client: zlink.Client, raw_peer: MakeRaw
) -> None:
    victim = zlink.Client(swarm.invite("client", "victim-2"), connect_timeout=10)
    try:
        fut = victim.submit("sleep_then", "mine", 1.5)
        raw = raw_peer(swarm.endpoint, zlink.Join.parse(swarm.invite("client", "attacker")))
        # reuse the victim's session id: refused
        reply = raw.ask([P.encode(P.Hello(name="attacker", role="client", session=victim.session))])
        assert isinstance(reply, P.Error) and reply.code == "forbidden"
        reply = raw.ask([P.encode(P.Hello(name="attacker", role="client", session=os.urandom(8)))])
        assert isinstance(reply, P.Welcome)
        # cancelling someone else's task is ignored silently (no oracle for guessed ids)
        raw.send([P.encode(P.Cancel(tids=(fut.tid,)))])
        # submitting a task under someone else's task id is rejected
        spec = P.TaskSpec(fut.tid, "square", None, 1, (), ())
        reply = raw.ask([P.encode(P.Submit(tasks=(spec,))), msgpack.packb([[5]])])
        assert isinstance(reply, P.Result)
        assert [(r.tid, r.status) for r in reply.results] == [(fut.tid, P.Outcome.REJECTED)]
        assert fut.result(timeout=20) == "mine"
    finally:
        victim.close()
