"""Batched ``map`` on a real swarm: many items per task, each item resolved as if it were its own task.

One module-scoped swarm of real processes: a CLI broker and two CLI nodes
serving ``skills_batch.py`` with 2 slots each (CurveZMQ on 127.0.0.1). The
broker's counters show how many *tasks* a map sent, so a test can prove that
items travelled in batches (far fewer tasks than items) or one per task
(``batch=1``). ``batch=N`` fixes the batch size where a test needs chosen items
in one batch. The node-kill test adds a third node to the swarm and kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import zlink
from zlink.demo import LocalSwarm

from .conftest import node_by_name, wait_for

SKILLS = Path(__file__).resolve().with_name("skills_batch.py")
NODES = ("batch-1", "batch-2")
SLOTS = 2  # per node


@dataclass
class Swarm:
    local: LocalSwarm
    join: str


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    local = LocalSwarm(home=tmp_path_factory.mktemp("batching"))
    try:
        local.start_broker()
        for name in NODES:
            local.start_node(str(SKILLS), slots=SLOTS, name=name)
        join = local.invite("client", "batch-client")
        with zlink.Client(join, connect_timeout=15) as probe:
            local.wait_nodes(probe, len(NODES), timeout=30)
        yield Swarm(local, join)
    finally:
        local.close()  # nodes first, so they drain while the broker still acknowledges


def idle(client: zlink.Client) -> bool:
    """Nothing queued or running at the broker, and no node holding a task."""
    st = client.status()
    return not st["queued"] and st["running"] == 0 and all(n["busy"] == 0 for n in st["nodes"])


@pytest.fixture
def client(swarm: Swarm) -> Iterator[zlink.Client]:
    with zlink.Client(swarm.join) as c:
        wait_for(lambda: idle(c), timeout=15, what="the swarm to be idle before the test")
        yield c


@pytest.fixture
def logdir(tmp_path: Path) -> str:
    d = tmp_path / "log"
    d.mkdir()
    return str(d)


def counters(client: zlink.Client) -> dict[str, int]:
    return dict(client.status()["counters"])


def delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def take_until_error(it: Iterator[Any]) -> tuple[list[Any], BaseException | None]:
    """Every value the map yields, and the error it raised (None if it ended)."""
    got: list[Any] = []
    try:
        for value in it:
            got.append(value)
    except zlink.ZlinkError as exc:
        return got, exc
    return got, None


# --------------------------------------------------------------------------- batching happens


@pytest.mark.timeout(60)
def test_20000_noop_items_in_order_in_far_fewer_tasks(client: zlink.Client) -> None:
    n = 20_000
    before = counters(client)
    assert list(client.map("inc", range(n))) == [x + 1 for x in range(n)]
    after = counters(client)
    tasks = delta(before, after, "submitted")
    # 256 single-item probes, then batches of window // 4 = 250 items: a few hundred tasks
    assert 0 < tasks < n // 10, tasks
    assert delta(before, after, "done") == tasks
    assert delta(before, after, "failed") == 0


@pytest.mark.timeout(30)
def test_unordered_map_yields_every_result_once(client: zlink.Client) -> None:
    n = 8_000
    before = counters(client)
    got = list(client.map("inc", range(n), ordered=False, window=2000))
    assert Counter(got) == Counter(x + 1 for x in range(n))
    assert delta(before, counters(client), "submitted") < n // 10


@pytest.mark.timeout(30)
def test_batch_1_sends_one_broker_task_per_item(client: zlink.Client) -> None:
    n = 300
    before = counters(client)
    assert list(client.map("inc", range(n), batch=1)) == [x + 1 for x in range(n)]
    after = counters(client)
    assert delta(before, after, "submitted") == n
    assert delta(before, after, "done") == n


@pytest.mark.timeout(30)
def test_map_reduce_batches_several_skills_and_keeps_their_order(client: zlink.Client) -> None:
    n = 1_500
    before = counters(client)
    # the reduce skill gets every result, items in order and skills in the given order per item
    reduced = client.map_reduce(["inc", "async_double"], range(n), "inc_all", batch=100, timeout=30)
    assert reduced == [v + 1 for x in range(n) for v in (x + 1, 2 * x)]
    # 2 * n items in batches of at most 100 items of one skill, plus the reduce task
    assert delta(before, counters(client), "submitted") < 2 * n // 10


# --------------------------------------------------------------------------- items fail one by one


@pytest.mark.timeout(30)
def test_an_item_raising_mid_batch_raises_at_its_position(client: zlink.Client, logdir: str) -> None:
    n, bad, size = 60, 37, 16  # item 37 sits in the middle of the third batch (32..47)
    items = [(x, bad, logdir) for x in range(n)]
    got, err = take_until_error(client.map("fail_at", items, unpack=True, batch=size))
    assert got == [x * 10 for x in range(bad)]  # every earlier item was yielded first
    assert isinstance(err, zlink.RemoteError), err
    assert err.remote_type == "zlink_skills_skills_batch.ItemFailed"
    assert err.remote_message == f"item {bad} failed on purpose"
    assert err.node in NODES
    assert "ItemFailed" in err.remote_traceback
    # the node ran the rest of that batch after the failing item
    ran = {int(p.name.removeprefix("ran-")) for p in Path(logdir).iterdir()}
    assert set(range(32, 48)) <= ran
    # the client is fine: a second map carries on after the failed item
    rest = [(x, -1, logdir) for x in range(bad + 1, n)]
    assert list(client.map("fail_at", rest, unpack=True, batch=size)) == [x * 10 for x in range(bad + 1, n)]


@pytest.mark.timeout(30)
def test_an_item_over_its_timeout_fails_alone(client: zlink.Client) -> None:
    # 16 items in two batches of 8; item 7 (the last of the first batch) sleeps past the timeout
    items = [(x, 1.0 if x == 7 else 0.0) for x in range(16)]
    before = counters(client)
    got, err = take_until_error(client.map("nap", items, unpack=True, batch=8, timeout=0.4))
    assert got == list(range(7))  # the items before it in its batch are fine
    assert isinstance(err, zlink.TaskTimeout), err
    assert "timeout" in str(err)
    assert err.task_id is not None
    # the batch as a whole had 8 x 0.4 s: it finished, and only the slow item failed
    assert delta(before, counters(client), "submitted") == 2
    # the same items within their timeout
    fast = [(x, 0.0) for x in range(16)]
    assert list(client.map("nap", fast, unpack=True, batch=8, timeout=0.4)) == list(range(16))


@pytest.mark.timeout(30)
def test_an_item_that_hangs_is_reported_at_its_timeout_not_the_batchs(client: zlink.Client) -> None:
    # item 5 of one batch of 8 sleeps 5 s against a 0.3 s timeout: the node answers for the
    # batch as soon as the item is over its timeout, keeping the items before it
    items = [(x, 5.0 if x == 5 else 0.0) for x in range(8)]
    t0 = time.monotonic()
    got, err = take_until_error(client.map("nap", items, unpack=True, batch=8, timeout=0.3))
    took = time.monotonic() - t0
    assert got == [0, 1, 2, 3, 4]
    assert isinstance(err, zlink.TaskTimeout), err
    assert "batch item 5" in str(err)
    assert took < 3.0, f"the hang was reported after {took:.1f} s, not near the 0.3 s timeout"


@pytest.mark.timeout(60)
def test_results_too_big_for_one_message_arrive_in_parts(client: zlink.Client) -> None:
    # the first 600 results are tiny, so batches grow; later ones are 200 KB each, so a batch
    # of them exceeds one 16 MiB message: the node sends it in parts and nothing fails
    n, big_from, size = 1500, 600, 200_000
    got = list(client.map("blob", [(i, big_from, size) for i in range(n)], unpack=True))
    assert [len(r) for r in got] == [size if i >= big_from else 10 for i in range(n)]


@pytest.mark.timeout(30)
def test_an_unserializable_result_fails_only_its_item(client: zlink.Client) -> None:
    n = 20
    got, err = take_until_error(client.map("unpackable_at", [(x, n - 1) for x in range(n)], unpack=True, batch=n))
    assert got == list(range(n - 1))  # the other items of the same batch
    assert isinstance(err, zlink.RemoteError), err
    assert err.remote_type == "TypeError"
    assert "msgpack" in err.remote_message
    # adaptively sized, the failing item the last one of a large batch
    n = 2_000
    got, err = take_until_error(client.map("unpackable_at", [(x, n - 1) for x in range(n)], unpack=True))
    assert got == list(range(n - 1))
    assert isinstance(err, zlink.RemoteError) and err.remote_type == "TypeError", err


# --------------------------------------------------------------------------- kinds of skills


@pytest.mark.timeout(30)
def test_generator_skill_in_a_batch_gives_its_return_value(client: zlink.Client) -> None:
    ns = [k % 7 for k in range(80)]
    before = counters(client)
    assert list(client.map("gen_sum", ns, batch=16)) == [n * (n - 1) // 2 for n in ns]
    assert delta(before, counters(client), "submitted") == 5
    assert list(client.map("gen_sum", ns * 10)) == [n * (n - 1) // 2 for n in ns * 10]


@pytest.mark.timeout(30)
def test_async_skill_in_a_batch(client: zlink.Client) -> None:
    before = counters(client)
    assert list(client.map("async_double", range(200), batch=50)) == [2 * x for x in range(200)]
    assert delta(before, counters(client), "submitted") == 4
    got = list(client.map("async_double", range(2_000), ordered=False))
    assert Counter(got) == Counter(2 * x for x in range(2_000))


# --------------------------------------------------------------------------- cancellation


@pytest.mark.timeout(30)
def test_leaving_a_batched_map_early_cancels_the_batches_in_flight(client: zlink.Client) -> None:
    # batch 0 is fast; the 7 batches after it take 50 x 0.1 s = 5 s each
    items = [(x, 0.0 if x < 50 else 0.1) for x in range(400)]
    before = counters(client)
    with contextlib.closing(client.map("nap", items, unpack=True, batch=50, window=400)) as it:
        assert next(it) == 0
        st = client.status()
        assert sum(n["busy"] for n in st["nodes"]) > 0  # slow batches are running
    # every slot would stay busy for seconds more; the cancelled batches stop between items
    wait_for(lambda: idle(client), timeout=3.0, what="the nodes to drop the cancelled batches")
    after = counters(client)
    assert delta(before, after, "submitted") == 8  # all 400 items went out at once
    assert delta(before, after, "done") == 1  # the fast batch; the 7 slow ones were cancelled
    assert delta(before, after, "cancelled") == 7
    assert list(client.map("inc", range(100))) == list(range(1, 101))  # and the swarm works on


# --------------------------------------------------------------------------- AsyncClient.map


@pytest.mark.timeout(30)
def test_async_client_map_batched_ordered_and_unordered(swarm: Swarm, client: zlink.Client) -> None:
    n = 5_000

    async def run() -> tuple[list[Any], list[Any], list[Any], list[Any], BaseException | None]:
        async with zlink.AsyncClient(swarm.join) as ac:
            ordered = [v async for v in ac.map("inc", range(n))]
            unordered = [v async for v in ac.map("inc", range(n), ordered=False)]
            fixed = [v async for v in ac.map("async_double", range(300), batch=64, ordered=False)]
            partial: list[Any] = []
            err: BaseException | None = None
            try:
                async for v in ac.map("unpackable_at", [(x, 150) for x in range(300)], unpack=True, batch=64):
                    partial.append(v)
            except zlink.RemoteError as exc:
                err = exc
            return ordered, unordered, fixed, partial, err

    before = counters(client)
    ordered, unordered, fixed, partial, err = asyncio.run(run())
    assert ordered == [x + 1 for x in range(n)]
    assert Counter(unordered) == Counter(x + 1 for x in range(n))
    assert sorted(fixed) == [2 * x for x in range(300)]
    assert partial == list(range(150))
    assert isinstance(err, zlink.RemoteError) and err.remote_type == "TypeError"
    assert delta(before, counters(client), "submitted") < 2 * n // 10


# --------------------------------------------------------------------------- node failure


@pytest.mark.timeout(60)
def test_node_killed_mid_map_every_result_exactly_once(swarm: Swarm, client: zlink.Client) -> None:
    victim = swarm.local.start_node(str(SKILLS), slots=SLOTS, name="victim")
    try:
        wait_for(lambda: node_by_name(client.status(), "victim"), timeout=20, what="the victim node to join")
        n = 3_000
        before = counters(client)
        items = [(x, 0.002) for x in range(n)]  # 20 ms per batch of 10: batches are in flight on every node
        got: list[Any] = []
        killed_busy = None
        for value in client.map("nap", items, unpack=True, batch=10, ordered=False, timeout=10):
            got.append(value)
            if len(got) == 300:
                killed_busy = (node_by_name(client.status(), "victim") or {}).get("busy")
                victim.send_signal(signal.SIGKILL)
        assert killed_busy, "the victim held no batch when it was killed"
        assert len(got) == n
        assert Counter(got) == Counter(range(n))
        assert victim.wait(5) == -signal.SIGKILL
        wait_for(lambda: node_by_name(client.status(), "victim") is None, timeout=10, what="the victim unlisted")
        after = counters(client)
        assert delta(before, after, "requeued") >= 1  # the victim's batches ran again elsewhere
        assert delta(before, after, "lost") == 0
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(5)
