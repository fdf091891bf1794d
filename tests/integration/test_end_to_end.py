"""End to end: a CLI broker, two CLI node processes and Python clients over CurveZMQ on 127.0.0.1."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import time
from collections.abc import Iterator

import pytest

import zlink
from zlink.demo import LocalSwarm

from .conftest import SKILLS, invite, node_by_name, start_swarm, wait_for

NODES = ["node-a", "node-b"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with start_swarm(tmp_path_factory.mktemp("e2e") / "home", NODES, slots=2) as sw:
        yield sw


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm) -> Iterator[zlink.Client]:
    with zlink.Client(swarm.invite("client", "e2e-client"), connect_timeout=15) as c:
        yield c


def _busy(client: zlink.Client) -> int:
    return sum(n["busy"] for n in client.status()["nodes"])


@pytest.mark.timeout(60)
def test_map_1000_in_order_spread_over_both_nodes(swarm: LocalSwarm, client: zlink.Client) -> None:
    # batch=1: one task per item, so the nodes' task counts can be checked against the items
    results = list(client.map("square", range(1000), timeout=60, batch=1))
    assert results == [x * x for x in range(1000)]
    st = client.status()
    for name in NODES:
        node = node_by_name(st, name)
        assert node is not None, f"{name} missing from status: {st['nodes']}"
        assert node["done"] > 0, f"{name} ran nothing: {st['nodes']}"
        assert "square" in node["skills"]
    assert sum(node_by_name(st, n)["done"] for n in NODES) >= 1000  # type: ignore[index]
    assert st["counters"]["done"] >= 1000
    assert swarm.broker is not None and swarm.broker.poll() is None


@pytest.mark.timeout(30)
def test_submit_with_args_and_kwargs(client: zlink.Client) -> None:
    assert client.submit("add", 2, b=3).result(timeout=20) == 5
    assert client.submit("add", a=10).result(timeout=20) == 10
    assert client.submit("add", "ab", "cd").result(timeout=20) == "abcd"
    value = {"s": "ünïcødé", "b": b"\x00\xffbytes", "l": [1, 2.5, None, True], "n": {"k": [2**62, -(2**63)]}}
    assert client.submit("echo", value).result(timeout=20) == value
    # tuples travel as msgpack arrays and come back as lists
    assert client.submit("echo", (1, 2)).result(timeout=20) == [1, 2]


@pytest.mark.timeout(30)
def test_skill_exception_is_remote_error(client: zlink.Client) -> None:
    fut = client.submit("fail")
    with pytest.raises(zlink.RemoteError) as info:
        fut.result(timeout=20)
    err = info.value
    assert isinstance(err, zlink.TaskError)
    assert err.remote_type == "ValueError"
    assert err.remote_message == "boom"
    assert "Traceback" in err.remote_traceback
    assert "ValueError: boom" in err.remote_traceback
    assert "skills_basic" in err.remote_traceback  # the node's own frame
    assert err.node in NODES
    assert err.task_id == fut.task_id
    # the failure is counted, and the swarm keeps working
    assert client.submit("square", 9).result(timeout=20) == 81


@pytest.mark.timeout(40)
def test_task_timeout_cancels_running_task(client: zlink.Client) -> None:
    fut = client.submit("sleep_then", "late", 30, timeout=0.5)
    with pytest.raises(zlink.TaskTimeout):
        fut.result(timeout=20)
    # the node was told to stop: its slot frees long before the 30 s sleep would end
    wait_for(lambda: _busy(client) == 0, timeout=15, what="the timed-out task to leave its node")
    assert client.submit("sleep_then", "ok", 0.01, timeout=20).result(timeout=20) == "ok"


@pytest.mark.timeout(40)
def test_task_for_unknown_skill_times_out(client: zlink.Client) -> None:
    fut = client.submit("no_node_has_this", 1, timeout=1.0)
    with pytest.raises(zlink.TaskTimeout):
        fut.result(timeout=20)
    assert "no_node_has_this" not in client.status()["queued"]


@pytest.mark.timeout(60)
def test_task_waits_until_a_node_with_the_skill_joins(
    swarm: LocalSwarm, client: zlink.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    fut = client.submit("late_square", 12)
    # queued at the broker, not failed
    wait_for(lambda: client.status()["queued"].get("late_square") == 1, timeout=10, what="late_square to be queued")
    assert not fut.done()
    monkeypatch.setenv("SKILLS_BASIC_LATE", "1")  # LocalSwarm copies os.environ at spawn
    proc = swarm.start_node(str(SKILLS), slots=1, name="node-late")
    try:
        assert fut.result(timeout=30) == 144
        late = node_by_name(client.status(), "node-late")
        assert late is not None and late["done"] >= 1 and "late_square" in late["skills"]
    finally:
        proc.terminate()
        proc.wait(10)
    # the late node said BYE: it leaves the broker's table
    wait_for(lambda: node_by_name(client.status(), "node-late") is None, timeout=10, what="node-late to leave")


@pytest.mark.timeout(30)
def test_non_msgpack_arguments_raise_type_error_at_submit(client: zlink.Client) -> None:
    with pytest.raises(TypeError):
        client.submit("echo", {1, 2, 3})
    with pytest.raises(TypeError):
        client.submit("echo", object())
    with pytest.raises(TypeError):
        client.submit("add", 1, b=object())
    # nothing was sent; the client is still healthy
    assert client.submit("echo", "still fine").result(timeout=20) == "still fine"


@pytest.mark.timeout(30)
def test_as_completed_and_unordered_map(client: zlink.Client) -> None:
    futs = [client.submit("square", i) for i in range(100)]
    seen = {}
    for f in client.as_completed(futs, timeout=25):
        assert f.done()
        seen[f.task_id] = f.result()
    assert len(seen) == 100
    assert sorted(seen.values()) == sorted(i * i for i in range(100))
    assert {f.task_id: f.result() for f in futs} == seen

    unordered = list(client.map("square", range(200), ordered=False, window=50, timeout=25))
    assert sorted(unordered) == [i * i for i in range(200)]


@pytest.mark.timeout(30)
def test_whoami_runs_on_node_processes(swarm: LocalSwarm, client: zlink.Client) -> None:
    pids = {p.pid for p in swarm.procs if p is not swarm.broker}
    info = client.submit("whoami").result(timeout=20)
    assert info["pid"] in pids
    assert info["skill"] == "whoami"
    assert info["attempt"] == 1


@pytest.mark.timeout(40)
def test_async_client_submit_and_map(swarm: LocalSwarm) -> None:
    join = swarm.invite("client", "async-client")

    async def main() -> tuple[int, list[int], int, list[int]]:
        async with zlink.AsyncClient(join, connect_timeout=15) as ac:
            one = await asyncio.wait_for(ac.submit("square", 12), 20)
            many = [x async for x in ac.map("square", range(300), timeout=20)]
            coro_skill = await asyncio.wait_for(ac.submit("async_double", 21), 20)
            unordered = [x async for x in ac.map("async_double", range(50), ordered=False)]
            st = await ac.status()
            assert st["clients"] >= 1
            return one, many, coro_skill, unordered

    one, many, coro_skill, unordered = asyncio.run(main())
    assert one == 144
    assert many == [x * x for x in range(300)]
    assert coro_skill == 42
    assert sorted(unordered) == [2 * x for x in range(50)]


@pytest.mark.timeout(40)
def test_async_client_remote_error(swarm: LocalSwarm) -> None:
    join = swarm.invite("client", "async-client-2")

    async def main() -> None:
        async with zlink.AsyncClient(join, connect_timeout=15) as ac:
            with pytest.raises(zlink.RemoteError) as info:
                await asyncio.wait_for(ac.submit("fail"), 20)
            assert info.value.remote_type == "ValueError"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_in_process_broker_and_node(inproc_broker: zlink.Broker) -> None:
    node = zlink.Node(invite(inproc_broker, "inproc-node", "node"), slots=3, connect_timeout=15)

    @node.skill()
    def cube(x: int) -> int:
        return x**3

    @node.skill("task_info")
    def info() -> list[object]:
        t = zlink.current_task()
        return [t.skill, t.attempt, len(t.id)]

    @node.skill()
    async def shout(s: str) -> str:
        await asyncio.sleep(0)
        return s.upper()

    node.start()
    try:
        with zlink.Client(invite(inproc_broker, "inproc-client", "client"), connect_timeout=15) as c:
            assert list(c.map("cube", range(500), timeout=30, batch=1)) == [x**3 for x in range(500)]
            assert c.submit("task_info").result(timeout=20) == ["task_info", 1, 32]
            assert c.submit("shout", "hi").result(timeout=20) == "HI"
            st = c.status()
            assert [n["name"] for n in st["nodes"]] == ["inproc-node"]
            assert st["nodes"][0]["skills"] == ["cube", "shout", "task_info"]
            assert st["nodes"][0]["done"] == 502
            assert st["counters"]["protocol_errors"] == 0
            assert st["endpoint"] == inproc_broker.endpoint  # the broker that answered
    finally:
        node.stop()
    assert node.completed == 502


@pytest.mark.timeout(40)
def test_cancel_queued_task(client: zlink.Client) -> None:
    fut = client.submit("no_node_has_this_either", 1)
    wait_for(lambda: client.status()["queued"].get("no_node_has_this_either") == 1, timeout=10, what="queueing")
    assert fut.cancel()
    with pytest.raises(cf.CancelledError):
        fut.result(timeout=1)
    wait_for(
        lambda: "no_node_has_this_either" not in client.status()["queued"],
        timeout=10,
        what="the cancelled task to leave the broker's queue",
    )


@pytest.mark.timeout(60)
def test_stalled_idle_node_rejoins(tmp_path_factory: pytest.TempPathFactory) -> None:
    # the broker's default liveness: 3 beats of 0.5 s
    sw = start_swarm(tmp_path_factory.mktemp("stall") / "home", ["stall-node"], slots=1, liveness=None)
    try:
        node = next(p for p in sw.procs if p is not sw.broker)
        with zlink.Client(sw.invite("client", "stall-client"), connect_timeout=15) as c:
            assert c.submit("square", 2).result(timeout=20) == 4
            os.kill(node.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: not c.status()["nodes"], timeout=15, what="the stalled node to be declared dead")
            finally:
                os.kill(node.pid, signal.SIGCONT)
            assert node.poll() is None  # alive, connected, heartbeating again
            t0 = time.monotonic()
            # it should register again and serve; with the bug it stays out of the swarm
            assert c.submit("square", 3, timeout=6).result(timeout=20) == 9
            assert [n["name"] for n in c.status()["nodes"]] == ["stall-node"]
            assert time.monotonic() - t0 < 10
    finally:
        sw.close()
