"""Several brokers, one swarm: join strings name them all, nodes share their slots, clients fail over.

Everything on 127.0.0.1: three ``zlink broker`` processes sharing one home
(keys and allowed/), ``zlink node`` processes joined to all three, clients in
this process. The network-namespace version (a broker host cut off, no TCP
reset) is in ``test_netns_multibroker.py``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import zlink
from zlink.demo import LocalSwarm
from zlink.security import BrokerHome, Join

from .conftest import run_zlink, wait_for

SKILLS = str(Path(__file__).resolve().with_name("skills_multibroker.py"))


def _swarm(tmp_path: Path, brokers: int = 3) -> LocalSwarm:
    swarm = LocalSwarm(home=tmp_path / "home")
    swarm.start_brokers(brokers)
    return swarm


def _client_on(swarm: LocalSwarm, i: int, name: str) -> zlink.Client:
    """A client whose join string names only broker ``i`` (to place load on a chosen broker)."""
    join = BrokerHome(swarm.home).invite(name=name, role="client", endpoints=[swarm.endpoints[i]])
    return zlink.Client(join.with_seal_key(swarm.seal_key).dump(), connect_timeout=15)


@pytest.mark.timeout(60)
def test_invite_names_every_broker_of_the_swarm(tmp_path: Path) -> None:
    with _swarm(tmp_path) as swarm:
        out = run_zlink("invite", "--home", str(swarm.home), "--name", "w1", "--role", "node")
        assert out.returncode == 0, out.stderr
        join = Join.parse(out.stdout.strip().splitlines()[-1])
        assert sorted(join.endpoints) == sorted(swarm.endpoints)  # this broker's bind and its --peer brokers
        extra = run_zlink("invite", "--home", str(swarm.home), "--name", "w2", "--peer", "tcp://10.0.0.9:7700")
        assert "tcp://10.0.0.9:7700" in Join.parse(extra.stdout.strip().splitlines()[-1]).endpoints
        bad = run_zlink("invite", "--home", str(swarm.home), "--name", "w3", "--peer", "10.0.0.9:7700")
        assert bad.returncode == 2 and "tcp://HOST:PORT" in bad.stderr


@pytest.mark.timeout(90)
def test_every_broker_lists_every_node_and_a_node_never_exceeds_its_slots(tmp_path: Path) -> None:
    with _swarm(tmp_path) as swarm:
        for i in range(2):
            swarm.start_node(SKILLS, slots=2, name=f"mb-node-{i}")
        clients = [_client_on(swarm, i, f"c{i}") for i in range(3)]
        try:
            for c in clients:  # each broker sees both nodes
                swarm.wait_nodes(c, 2, timeout=20)
            # three clients, each on its own broker, 8 tasks of 0.4 s each: 24 tasks for 2 nodes x 2 slots
            futures = [c.submit("hold", k, 0.4) for c in clients for k in range(8)]
            results = [f.result(timeout=30) for f in futures]
        finally:
            for c in clients:
                c.close()
    peaks = {r["pid"]: r["peak"] for r in results}
    assert len(peaks) == 2 and max(peaks.values()) <= 2, peaks  # never more running than the node's slots
    assert sorted(r["i"] for r in results) == sorted(k for _ in range(3) for k in range(8))


@pytest.mark.timeout(120)
def test_killing_a_broker_under_load_loses_nothing_and_delivers_nothing_twice(tmp_path: Path) -> None:
    n_items = 20_000
    with _swarm(tmp_path) as swarm:
        for i in range(3):
            swarm.start_node(SKILLS, slots=4, name=f"mb-node-{i}")
        clients = [zlink.Client(swarm.invite("client", f"load-{i}"), connect_timeout=15) for i in range(6)]
        try:
            swarm.wait_nodes(clients[0], 3, timeout=20)
            victim = swarm.endpoints.index(clients[0].endpoint)  # the broker of at least one client
            on_victim = [c for c in clients if c.endpoint == swarm.endpoints[victim]]
            got: dict[int, list[Any]] = {}
            errors: list[BaseException] = []
            progress = Counter[int]()

            def run(k: int, c: zlink.Client) -> None:
                try:
                    out = []
                    for v in c.map("echo", range(n_items), window=500, batch=1):
                        out.append(v)
                        progress[k] += 1
                    got[k] = out
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(k, c)) for k, c in enumerate(clients)]
            for t in threads:
                t.start()
            wait_for(lambda: min(progress.values(), default=0) > 1000, timeout=30, what="every map under way")
            killed_at = time.monotonic()
            swarm.kill_broker(victim)
            # every client of the dead broker moves to a live one, well within the failure-detection time
            wait_for(
                lambda: all(c.endpoint != swarm.endpoints[victim] and c.welcome is not None for c in on_victim),
                timeout=5, what="the dead broker's clients moving on",
            )  # fmt: skip
            moved_in = time.monotonic() - killed_at
            for t in threads:
                t.join(90)
            assert not errors, errors
            for k in range(len(clients)):
                assert got[k] == list(range(n_items)), f"client {k}: lost, repeated or reordered results"
            assert moved_in < 1.5, moved_in
            # the swarm goes on: the surviving brokers still list every node
            live = next(c for c in clients if c.endpoint != swarm.endpoints[victim])
            assert len(live.status()["nodes"]) == 3
        finally:
            for c in clients:
                c.close()


@pytest.mark.timeout(90)
def test_a_returning_broker_gets_its_nodes_back(tmp_path: Path) -> None:
    with _swarm(tmp_path) as swarm:
        swarm.start_node(SKILLS, slots=2, name="mb-node")
        c0 = _client_on(swarm, 0, "probe-0")
        try:
            swarm.wait_nodes(c0, 1, timeout=20)
            swarm.kill_broker(1)
            assert c0.submit("echo", "still here").result(timeout=10) == "still here"
            swarm.restart_broker(1)
            c1 = _client_on(swarm, 1, "probe-1")
            try:
                swarm.wait_nodes(c1, 1, timeout=20)  # the node re-registered with the restarted broker
                assert c1.submit("echo", 42).result(timeout=10) == 42
            finally:
                c1.close()
        finally:
            c0.close()
