"""Failure scenarios on real processes: a CLI broker and CLI nodes on 127.0.0.1, default heartbeats.

Each test builds its own small swarm (``Rig``) with the broker's default
settings (heartbeat 0.5 s, liveness 3), breaks something for real (``kill -9``,
``SIGSTOP``, ``SIGTERM``, a task that kills its process, a broker killed and
restarted on the same home and port) and checks what docs/architecture.md
promises ("What is guaranteed"):

* results reach the client at most once per task, and exactly once while the
  client and broker stay up: ``CountingClient`` counts, per task id, the final
  results that arrived on the wire, and every future is resolved exactly once;
* tasks run at least once: the skills in ``skills_chaos.py`` log every
  completed execution to ``$ZLINK_CHAOS_LOG``, so a test can tell a re-execution
  (allowed) from a duplicate delivery (not allowed), and which process ran what.

Measured figures (detection times and the like) are printed with a ``FIGURE``
prefix; run with ``-s`` to see them. Every process is stopped in the fixture's
teardown, which then fails the test if any process mentioning its temporary
home or log is still alive.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zlink
from zlink import protocol as P
from zlink.demo import LocalSwarm, processes_mentioning

from .conftest import node_by_name, wait_for
from .skills_chaos import read_log, work_runs

SKILLS = Path(__file__).resolve().with_name("skills_chaos.py")
#: default broker settings: heartbeat interval x liveness
INTERVAL, LIVENESS = 0.5, 3


class KnownBug(AssertionError):
    """The check that shows a known zlink bug failed (the only failure a strict xfail here accepts)."""


def figure(text: str) -> None:
    print(f"FIGURE {text}", flush=True)


class CountingClient(zlink.Client):
    """A client that also counts, per task id, every final RESULT the broker sent it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.deliveries: collections.Counter[bytes] = collections.Counter()
        self.resolutions: collections.Counter[bytes] = collections.Counter()
        super().__init__(*args, **kwargs)

    def on_message(self, msg: P.Message, frames: list[zmq.Frame]) -> None:
        if type(msg) is P.Result:
            for item in msg.results:  # type: ignore[attr-defined]
                if item.status != P.Outcome.PARTIAL:
                    self.deliveries[item.tid] += 1
        super().on_message(msg, frames)

    def track(self, fut: zlink.TaskFuture) -> zlink.TaskFuture:
        """Count how often ``fut`` is resolved (must end up exactly once)."""
        fut.add_done_callback(lambda f: self.resolutions.update([f.tid]))  # type: ignore[attr-defined]
        return fut

    def task(self, skill: str, *args: Any, **kwargs: Any) -> zlink.TaskFuture:
        return self.track(self.submit(skill, *args, **kwargs))

    def assert_once(self, futs: Iterable[zlink.TaskFuture], *, delivered: bool = True) -> None:
        """Every future resolved exactly once; with ``delivered``, its final RESULT came exactly once."""
        for f in futs:
            assert f.done(), f"{f!r} is not resolved"
            assert self.resolutions[f.tid] == 1, f"{f!r} resolved {self.resolutions[f.tid]} times"
            if delivered:
                assert self.deliveries[f.tid] == 1, f"{f!r}: {self.deliveries[f.tid]} final results on the wire"
            else:
                assert self.deliveries[f.tid] <= 1, f"{f!r}: {self.deliveries[f.tid]} final results on the wire"


class Rig:
    """One test's swarm: a CLI broker and CLI nodes serving skills_chaos.py, counting clients."""

    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.log = tmp_path / "chaos.log"
        self.swarm = LocalSwarm(home=self.home)
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: list[CountingClient] = []

    # ------------------------------------------------------------------ processes

    @property
    def broker(self) -> subprocess.Popen[bytes]:
        assert self.swarm.broker is not None
        return self.swarm.broker

    def start_broker(self) -> str:
        ep = self.swarm.start_broker()  # LocalSwarm keeps the same ports across restarts
        return ep

    def kill_broker(self) -> None:
        self.broker.kill()
        self.broker.wait(5)

    def node(self, name: str, *, slots: int = 2, prefetch: int | None = None) -> subprocess.Popen[bytes]:
        proc = self.swarm.start_node(str(SKILLS), slots=slots, prefetch=prefetch, name=name)
        self.nodes[name] = proc
        return proc

    def client(self, name: str = "client") -> CountingClient:
        c = CountingClient(self.swarm.invite("client", f"{name}-{len(self.clients) + 1}"), connect_timeout=20)
        self.clients.append(c)
        return c

    # ------------------------------------------------------------------ observing

    def wait_listed(self, client: zlink.Client, names: Iterable[str], timeout: float = 20.0) -> dict[str, Any]:
        want = set(names)

        def listed() -> dict[str, Any] | None:
            st = client.status(5)
            return st if want <= {n["name"] for n in st["nodes"]} else None

        return wait_for(listed, timeout=timeout, interval=0.1, what=f"nodes {sorted(want)} to be listed")  # type: ignore[no-any-return]

    def wait_busy(self, client: zlink.Client, want: dict[str, int], timeout: float = 15.0) -> dict[str, Any]:
        """Until each named node has at least that many tasks in flight (broker's view)."""

        def busy() -> dict[str, Any] | None:
            st = client.status(5)
            for name, n in want.items():
                node = node_by_name(st, name)
                if node is None or node["busy"] < n:
                    return None
            return st

        return wait_for(busy, timeout=timeout, interval=0.05, what=f"nodes busy {want}")  # type: ignore[no-any-return]

    def close(self) -> None:
        for c in self.clients:
            c.close(timeout=2)
        self.swarm.close(kill=True)  # resumes stopped nodes, kills them, stops the broker
        left = processes_mentioning(str(self.home), str(self.log))
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not left, f"processes left behind: {left}"


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setenv("ZLINK_CHAOS_LOG", str(tmp_path / "chaos.log"))  # LocalSwarm copies os.environ
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def _poll(client: zlink.Client, until: Callable[[dict[str, Any]], bool], timeout: float) -> float | None:
    """Seconds until ``until(status)`` held, polling every 50 ms; None if it never did."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = client.status(2)
        if until(st):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _listed(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda st: node_by_name(st, name) is not None


def _unlisted(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda st: node_by_name(st, name) is None


# =========================================================================== 1. kill -9


@pytest.mark.timeout(60)
def test_kill9_node_its_tasks_move_to_the_other_node(rig: Rig) -> None:
    """A node killed with SIGKILL mid-task: detected, its tasks re-dispatched and finished elsewhere."""
    rig.start_broker()
    a, b = rig.node("node-a"), rig.node("node-b")
    c = rig.client()
    rig.wait_listed(c, ["node-a", "node-b"])
    futs = {i: c.task("work", i, 3.0, timeout=60) for i in range(4)}
    st = rig.wait_busy(c, {"node-a": 2, "node-b": 2})
    requeued0 = st["counters"]["requeued"]

    a.kill()
    t_kill = time.monotonic()
    t_gone = t_moved = None
    while time.monotonic() - t_kill < 10 and (t_gone is None or t_moved is None):
        st = c.status(2)
        now = time.monotonic() - t_kill
        if t_gone is None and node_by_name(st, "node-a") is None:
            t_gone = now
        b_busy = (node_by_name(st, "node-b") or {}).get("busy", 0)
        if t_moved is None and st["counters"]["requeued"] >= requeued0 + 2 and b_busy == 4:
            t_moved = now  # re-queued and dispatched to node-b
        time.sleep(0.05)
    figure(f"kill -9 -> node unlisted {t_gone} s, tasks re-dispatched {t_moved} s (bound 4 s)")
    assert t_gone is not None and t_gone < 4.0, t_gone
    assert t_moved is not None and t_moved < 4.0, t_moved

    assert {i: f.result(30) for i, f in futs.items()} == {i: i * i for i in range(4)}
    c.assert_once(futs.values())
    # node-a died before finishing anything: every task completed once, on node-b
    assert work_runs(rig.log) == {i: [b.pid] for i in range(4)}
    assert a.wait(5) == -signal.SIGKILL
    st = c.status(5)
    assert st["counters"]["nodes_died"] + st["counters"]["undeliverable"] >= 1
    assert st["counters"]["lost"] == 0


# =========================================================================== 2. SIGSTOP / SIGCONT


@pytest.mark.timeout(60)
def test_sigstop_node_is_declared_dead_then_rejoins_without_duplicate_delivery(rig: Rig) -> None:
    """A stalled node loses its tasks to the other node; resumed, it rejoins and its late results are fenced off."""
    rig.start_broker()
    a, b = rig.node("node-a"), rig.node("node-b")
    c = rig.client()
    rig.wait_listed(c, ["node-a", "node-b"])
    futs = {i: c.task("work", i, 2.5, timeout=60) for i in range(4)}
    rig.wait_busy(c, {"node-a": 2, "node-b": 2})

    a.send_signal(signal.SIGSTOP)
    try:
        t_dead = _poll(c, _unlisted("node-a"), timeout=10)
        figure(f"SIGSTOP -> node declared dead after {t_dead} s")
        assert t_dead is not None and t_dead < 4.0
        assert {i: f.result(30) for i, f in futs.items()} == {i: i * i for i in range(4)}
        runs = work_runs(rig.log)
        assert runs == {i: [b.pid] for i in range(4)}, runs  # node-a is frozen: node-b ran all four
    finally:
        a.send_signal(signal.SIGCONT)
    t_rejoin = _poll(c, _listed("node-a"), timeout=15)
    figure(f"SIGCONT -> node listed again after {t_rejoin} s")
    assert t_rejoin is not None and t_rejoin < 8.0

    # node-a finishes the two tasks it held (its sleeps ended while it was stopped);
    # those executions are real, their results must not reach the client again
    def a_finished() -> bool:
        return sum(pids.count(a.pid) for pids in work_runs(rig.log).values()) == 2

    wait_for(a_finished, timeout=10, what="node-a to finish its stale tasks")
    time.sleep(1.0)  # room for a wrongly forwarded late result to arrive
    c.assert_once(futs.values())
    runs = work_runs(rig.log)
    assert sorted(len(p) for p in runs.values()) == [1, 1, 2, 2]  # at-least-once, never lost

    # the rejoined node takes new work again
    more = {i: c.task("work", i, 0.3, timeout=30) for i in range(10, 16)}
    assert {i: f.result(30) for i, f in more.items()} == {i: i * i for i in more}
    c.assert_once(more.values())
    runs = work_runs(rig.log)
    assert any(runs[i] == [a.pid] for i in more), runs
    assert c.status(5)["counters"]["nodes_died"] == 1
    assert a.poll() is None  # it was never killed


# =========================================================================== 3. busy is not dead


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_node_busy_with_pure_python_cpu_is_not_declared_dead(rig: Rig) -> None:
    """Both slots hold the GIL-bound CPU for 30 s; heartbeats still flow, the node stays listed."""
    rig.start_broker()
    a = rig.node("node-busy", slots=2)
    c = rig.client()
    rig.wait_listed(c, ["node-busy"])
    futs = [c.task("spin", 30.0, timeout=120) for _ in range(2)]
    rig.wait_busy(c, {"node-busy": 2})
    t0 = time.monotonic()
    polls = missing = 0
    worst_seen = 0.0
    while not all(f.done() for f in futs) and time.monotonic() - t0 < 50:
        st = c.status(5)
        polls += 1
        node = node_by_name(st, "node-busy")
        if node is None:
            missing += 1
        else:
            worst_seen = max(worst_seen, node["last_seen"])
        assert st["counters"]["nodes_died"] == 0, st["counters"]
        time.sleep(0.5)
    figure(
        f"spin(30) x2: {polls} status polls over {time.monotonic() - t0:.1f} s, node missing {missing} times, "
        f"largest last_seen {worst_seen:.3f} s (dead at {INTERVAL * LIVENESS} s)"
    )
    assert missing == 0
    results = [f.result(10) for f in futs]
    assert [r["pid"] for r in results] == [a.pid, a.pid]
    assert all(r["loops"] > 0 for r in results)
    c.assert_once(futs)
    st = c.status(5)
    assert st["counters"]["nodes_died"] == 0 and st["counters"]["requeued"] == 0


# =========================================================================== 4. poison task


@pytest.mark.timeout(90)
def test_poison_task_is_lost_after_max_attempts_others_complete(rig: Rig) -> None:
    """A task that kills its node dies on 3 nodes and fails with TaskLost; the tasks around it complete."""
    rig.start_broker()
    for k in range(3):
        rig.node(f"node-{k}")
    c = rig.client()
    rig.wait_listed(c, [f"node-{k}" for k in range(3)])
    good = {i: c.task("work", i, 0.2, timeout=60, max_attempts=10) for i in range(15)}
    bad = c.task("poison", 1000, timeout=60, max_attempts=3)
    good.update({i: c.task("work", i, 0.2, timeout=60, max_attempts=10) for i in range(15, 30)})

    replaced: set[str] = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60 and not (bad.done() and all(f.done() for f in good.values())):
        for name, proc in list(rig.nodes.items()):
            if proc.poll() is not None and name not in replaced:  # keep three nodes of capacity
                replaced.add(name)
                rig.node(f"node-{len(rig.nodes)}")
        time.sleep(0.1)
    figure(f"poison: lost after {time.monotonic() - t0:.1f} s, {len(replaced)} nodes died")

    with pytest.raises(zlink.TaskLost):
        bad.result(0)
    assert {i: f.result(0) for i, f in good.items()} == {i: i * i for i in range(30)}
    c.assert_once([bad, *good.values()])
    deaths = [parts for parts in read_log(rig.log) if parts[0] == "poison"]
    pids = {int(parts[2]) for parts in deaths}
    assert len(deaths) == 3 and len(pids) == 3, deaths  # one attempt per node, on three nodes
    assert {proc.pid for name, proc in rig.nodes.items() if name in replaced} == pids
    assert all(rig.nodes[name].returncode == 137 for name in replaced)
    runs = work_runs(rig.log)
    assert sorted(runs) == list(range(30))
    assert c.status(5)["counters"]["lost"] == 1


# =========================================================================== 5. broker restart


@pytest.mark.timeout(60)
def test_broker_kill9_and_restart_delivers_everything_once_without_rerun(rig: Rig) -> None:
    """kill -9 of the broker with tasks running and tasks finishing while it is down; restart on the same port.

    Every unresolved future completes exactly once with its value; the tasks
    that were running are adopted (not started again) and the ones that finished
    while no broker existed are delivered from the node, not run again.

    The order of re-registration is pinned down: the node is frozen until the
    client has re-registered and resubmitted, so the broker holds the four tasks
    queued, waiting for the node that has them. One node, so nobody else can take
    them. The two other orders are the tests below (each was a zlink bug, now fixed).
    """
    endpoint = rig.start_broker()
    a = rig.node("node-a", slots=4)
    c = rig.client()
    rig.wait_listed(c, ["node-a"])
    long_ = {i: c.task("work", i, 5.0, timeout=60) for i in (0, 1)}
    short = {i: c.task("work", i, 1.0, timeout=60) for i in (2, 3)}
    futs = [*long_.values(), *short.values()]
    rig.wait_busy(c, {"node-a": 4})
    epoch = c.epoch

    rig.kill_broker()
    t_kill = time.monotonic()
    # the short tasks finish while no broker exists: the node holds their results
    wait_for(lambda: {2, 3} <= set(work_runs(rig.log)), timeout=10, what="short tasks to finish with no broker")
    a.send_signal(signal.SIGSTOP)
    try:
        time.sleep(max(0.0, t_kill + 2.5 - time.monotonic()))  # past the peers' 2 s "broker gone" rule
        assert not any(f.done() for f in futs)
        assert rig.start_broker() == endpoint
        wait_for(lambda: c.welcome is not None and c.epoch != epoch, timeout=20, what="the client to re-register")
        with zlink.Client(rig.swarm.invite("client", "probe"), connect_timeout=20) as probe:
            st = wait_for(
                lambda: (s := probe.status(5))["queued"].get("work") == 4 and s,
                timeout=10,
                what="the four resubmitted tasks to wait at the broker",
            )
        assert st["nodes"] == [] and not any(f.done() for f in futs)
    finally:
        a.send_signal(signal.SIGCONT)
    t_cont = time.monotonic()

    assert {i: f.result(30) for i, f in short.items()} == {2: 4, 3: 9}
    t_short = time.monotonic() - t_cont
    assert {i: f.result(30) for i, f in long_.items()} == {0: 0, 1: 1}
    figure(f"broker restart: results held by the node delivered {t_short:.2f} s after it re-registered")
    assert t_short < 5.0
    time.sleep(0.5)  # room for a duplicate
    c.assert_once(futs)
    # the finished tasks were delivered, not re-run; the running ones were adopted, not restarted
    assert work_runs(rig.log) == {i: [a.pid] for i in range(4)}
    # and the swarm works as before
    assert c.task("work", 7, 0.0, timeout=30).result(30) == 49


@pytest.mark.timeout(60)
def test_broker_restart_task_held_by_a_late_node_is_not_run_again(rig: Rig) -> None:
    """docs/architecture.md: a task that was running is not started twice when its node re-registers
    within the restart grace (node timeout + 2 intervals, 2.5 s by default), even after the client has
    resubmitted it. Here node-a is stopped across the restart and resumed only once the client's
    resubmission has reached the new broker."""
    rig.start_broker()
    a, b = rig.node("node-a"), rig.node("node-b")
    c = rig.client()
    rig.wait_listed(c, ["node-a", "node-b"])
    futs = {i: c.task("work", i, s, timeout=60) for i, s in [(0, 4.0), (1, 4.0), (2, 0.3), (3, 0.3)]}
    rig.wait_busy(c, {"node-a": 2, "node-b": 2})
    rig.kill_broker()
    wait_for(lambda: {2, 3} <= set(work_runs(rig.log)), timeout=10, what="short tasks to finish with no broker")
    a.send_signal(signal.SIGSTOP)
    try:
        rig.start_broker()
        with zlink.Client(rig.swarm.invite("client", "probe"), connect_timeout=20) as probe:
            # the client resubmitted node-a's two tasks before node-a is back
            wait_for(
                lambda: sum(probe.status(5)["queued"].values()) >= 2,
                timeout=20,
                what="the resubmitted tasks to reach the new broker",
            )
    finally:
        a.send_signal(signal.SIGCONT)
    assert {i: f.result(30) for i, f in futs.items()} == {i: i * i for i in range(4)}
    assert all(c.resolutions[f.tid] == 1 for f in futs.values())
    wait_for(lambda: len(work_runs(rig.log).get(0, [])) >= 1, timeout=10, what="task 0 to finish")
    time.sleep(1.0)  # node-a's own executions finish right after SIGCONT
    runs = work_runs(rig.log)
    if not all(len(runs[i]) == 1 for i in range(4)):
        raise KnownBug(f"executions per task: {runs} (node-a {a.pid}, node-b {b.pid})")


@pytest.mark.timeout(60)
def test_broker_restart_finished_task_is_not_rerun_when_the_client_registers_last(rig: Rig) -> None:
    """The third order: the node re-registers first (its held result waits at the broker), then the client.

    The client's I/O thread is held up (``call_soon``) while the broker comes
    back and the node re-registers, as a busy client process would be.
    """
    rig.start_broker()
    a = rig.node("node-a")
    c = rig.client()
    rig.wait_listed(c, ["node-a"])
    fut = c.task("work", 0, 0.3, timeout=60)
    rig.wait_busy(c, {"node-a": 1})
    rig.kill_broker()
    t_kill = time.monotonic()
    wait_for(lambda: 0 in work_runs(rig.log), timeout=10, what="the task to finish with no broker")
    # 4 s: the client has presumed the broker gone (at 2 s) and said HELLO at least twice
    time.sleep(max(0.0, t_kill + 4.0 - time.monotonic()))
    gate = threading.Event()
    c.call_soon(lambda: gate.wait(20) and None)
    try:
        rig.start_broker()
        with zlink.Client(rig.swarm.invite("client", "probe"), connect_timeout=20) as probe:
            wait_for(lambda: node_by_name(probe.status(5), "node-a") is not None, timeout=20, what="node-a back")
        time.sleep(0.5)  # its held result has reached the broker
    finally:
        gate.set()
    assert fut.result(30) == 0
    time.sleep(1.5)  # a second execution (0.3 s) and its result
    assert c.resolutions[fut.tid] == 1  # the future itself is fine: the client drops the duplicate
    runs = work_runs(rig.log)
    if runs != {0: [a.pid]} or c.deliveries[fut.tid] != 1:
        raise KnownBug(f"executions {runs}, final results on the wire {c.deliveries[fut.tid]}")


# =========================================================================== 6. SIGTERM drain


@pytest.mark.timeout(60)
def test_sigterm_drains_node_running_tasks_finish_queued_ones_move(rig: Rig) -> None:
    """SIGTERM: the node finishes its running tasks, hands back the ones it had not started, exits 0."""
    rig.start_broker()
    a, b = rig.node("node-a"), rig.node("node-b")
    c = rig.client()
    rig.wait_listed(c, ["node-a", "node-b"])
    futs = {i: c.task("work", i, 2.0, timeout=60) for i in range(8)}
    rig.wait_busy(c, {"node-a": 4, "node-b": 4})  # 2 running + 2 prefetched at each node
    time.sleep(0.3)  # the dispatches have reached the nodes

    a.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    code = a.wait(30)  # the default grace period
    t_exit = time.monotonic() - t_term
    figure(f"SIGTERM drain: node exited {code} after {t_exit:.2f} s (2 s tasks running)")
    assert code == 0
    assert t_exit < 6.0

    assert {i: f.result(30) for i, f in futs.items()} == {i: i * i for i in range(8)}
    c.assert_once(futs.values())
    runs = work_runs(rig.log)
    assert sorted(runs) == list(range(8)) and all(len(p) == 1 for p in runs.values()), runs
    by_pid = collections.Counter(p[0] for p in runs.values())
    assert by_pid == {a.pid: 2, b.pid: 6}, by_pid  # a ran its two running tasks; its two queued ones moved
    st = c.status(5)
    assert node_by_name(st, "node-a") is None
    assert st["counters"]["nodes_died"] == 0 and st["counters"]["lost"] == 0


# =========================================================================== 7. timeout cancels on the node


@pytest.mark.timeout(40)
def test_timeout_cancels_the_running_task_on_the_node_and_frees_its_slot(rig: Rig) -> None:
    rig.start_broker()
    a = rig.node("node-one", slots=1, prefetch=0)
    c = rig.client()
    rig.wait_listed(c, ["node-one"])
    t0 = time.monotonic()
    fut = c.task("cooperative", 30.0, "t7", timeout=1.0)
    with pytest.raises(zlink.TaskTimeout):
        fut.result(20)
    t_fail = time.monotonic() - t0
    quick = c.task("work", 5, 0.0, timeout=20)
    assert quick.result(20) == 25
    t_quick = time.monotonic() - t0 - t_fail
    figure(f"timeout=1: TaskTimeout after {t_fail:.2f} s; next task on the 1-slot node done {t_quick:.2f} s later")
    assert 0.9 <= t_fail < 2.5
    assert t_quick < 2.0

    coop = [p for p in read_log(rig.log) if p[0] == "cooperative"]
    assert len(coop) == 1, coop
    _, tag, pid, outcome, elapsed = coop[0]
    assert (tag, int(pid), outcome) == ("t7", a.pid, "cancelled")
    assert float(elapsed) < 3.0  # returned early, not after 30 s
    assert work_runs(rig.log) == {5: [a.pid]}
    c.assert_once([fut, quick], delivered=False)
    assert c.deliveries[quick.tid] == 1
    st = c.status(5)
    assert node_by_name(st, "node-one")["busy"] == 0  # type: ignore[index]


# =========================================================================== 8. client while the broker is away


@pytest.mark.timeout(60)
def test_client_keeps_futures_pending_while_broker_is_away(rig: Rig) -> None:
    endpoint = rig.start_broker()
    a = rig.node("node-a", slots=6)
    c = rig.client()
    rig.wait_listed(c, ["node-a"])
    # still running when the client re-registers (up to ~4 s after the restart, its
    # reconnect backoff): a task that finished while the broker was away can run twice
    # when the client said HELLO more than once meanwhile (see the xfail test above)
    before = {i: c.task("work", i, 11.0, timeout=60) for i in (0, 1)}
    rig.wait_busy(c, {"node-a": 2})

    rig.kill_broker()
    t_kill = time.monotonic()
    time.sleep(2.5)  # the client now presumes the broker gone
    during = {i: c.task("work", i, 0.2, timeout=60) for i in range(2, 6)}
    t_sub = time.monotonic()
    short = c.task("work", 6, 0.2, timeout=1.5)
    with pytest.raises(zlink.TaskTimeout):
        short.result(10)
    t_short = time.monotonic() - t_sub
    figure(f"broker away: a 1.5 s-timeout future failed after {t_short:.2f} s")
    assert 1.4 <= t_short < 2.5
    time.sleep(max(0.0, t_kill + 5.0 - time.monotonic()))
    pending = [*before.values(), *during.values()]
    assert not any(f.done() for f in pending), [f for f in pending if f.done()]

    assert rig.start_broker() == endpoint
    t_up = time.monotonic()
    assert {i: f.result(30) for i, f in during.items()} == {i: i * i for i in during}
    figure(f"broker away 5 s: tasks submitted meanwhile done {time.monotonic() - t_up:.2f} s after the restart")
    assert {i: f.result(30) for i, f in before.items()} == {0: 0, 1: 1}
    c.assert_once(pending)
    runs = work_runs(rig.log)
    assert runs == {i: [a.pid] for i in range(6)}, runs  # once each; the timed-out task never ran


# =========================================================================== more bugs found


@pytest.mark.timeout(40)
def test_status_works_again_after_a_status_request_lost_in_a_broker_outage(rig: Rig) -> None:
    rig.start_broker()
    c = rig.client()
    assert c.status(5)["counters"]["submitted"] == 0
    epoch = c.epoch
    rig.kill_broker()
    with pytest.raises(zlink.TaskTimeout):
        c.status(1)  # asked within the 2 s before the client presumes the broker gone
    rig.start_broker()
    wait_for(lambda: c.welcome is not None and c.epoch != epoch, timeout=20, what="the client to re-register")
    try:
        st = c.status(3)
    except zlink.TaskTimeout as exc:
        raise KnownBug(f"status() after the restart: {exc} (waiters queued: {len(c._status_waiters)})") from exc
    assert st["epoch"] == c.epoch.hex()  # type: ignore[union-attr]


@pytest.mark.timeout(90)
def test_a_broker_back_after_a_long_outage_hears_its_nodes_at_once(rig: Rig) -> None:
    """After an outage long enough for libzmq's reconnect backoff to reach its 2-4 s ceiling, the
    node's heartbeat and beacon connections used to wait out that backoff after the broker came
    back: the restarted broker declared the node dead before its first beat (nodes_died 1) and the
    node presumed the broker gone again. A WELCOME with a new epoch now reconnects both at once."""
    rig.start_broker()
    rig.node("node-a", slots=1)
    c = rig.client()
    rig.wait_listed(c, ["node-a"])
    epoch = c.epoch
    rig.kill_broker()
    time.sleep(12)  # backoff 80-250 ms, doubling per attempt up to 2-4 s: at its ceiling by now
    rig.start_broker()
    wait_for(lambda: c.welcome is not None and c.epoch != epoch, timeout=20, what="the client to re-register")
    st = rig.wait_listed(c, ["node-a"], timeout=10)
    deadline = time.monotonic() + 5.0  # the broker declares a silent node dead 1.5 s after it joined
    while time.monotonic() < deadline:
        st = c.status(5)
        assert st["counters"]["nodes_died"] == 0, st["events"]
        time.sleep(0.2)
    node = node_by_name(st, "node-a")
    assert node is not None and node["beating"], st["nodes"]
    assert [e for _, e in st["events"] if "joined" in e] == [e for _, e in st["events"]][:1], st["events"]
    assert c.task("work", 3, 0.0, timeout=30).result(30) == 9
