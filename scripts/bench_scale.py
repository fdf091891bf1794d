"""Scale figures of issue #10 on loopback: a broker with 1,000 nodes, several brokers, a broker killed under load.

Three measurements, each on a swarm of its own, every process on 127.0.0.1:

1. **One broker at scale.** A ``zlink broker`` with one real ``zlink node``
   (``scripts/bench_skills.py``) and 1,000 simulated idle nodes (each with its
   own invited key, a CurveZMQ DEALER that said HELLO, a PUB heartbeat every
   0.5 s and a SUB to the beacon: :func:`bench.idle_nodes_main`, spread over a
   few helper processes), then 100,000 tasks queued by a client in another
   process (to the simulated nodes' ``idle`` skill: each simulated node is
   handed one it never answers, the rest wait in the broker's queue). Measured
   at each step: the round trip of fresh single tasks to the real node
   (``client.submit('noop', i).result()``, p50 and p99), the broker's RSS
   (growth per node and per queued task), its CPU (% of one core, /proc, as
   ``bench.measure_idle_broker`` does) and the heartbeats the simulated nodes send.
2. **Brokers vs throughput.** No-op ``client.map`` (default batching, and
   ``batch=1``) from several clients in separate processes, on 1 broker, then
   on 3 brokers (``LocalSwarm.start_brokers(3)``, nodes joined to all, one
   client pinned to each broker); tasks/s for each and the ratio, with the CPU
   each group of processes used (on a machine with few cores the brokers,
   nodes and clients compete for the same cores).
3. **A broker killed under load.** 3 brokers, nodes joined to all, clients
   with join strings naming all brokers (one placed on each), each running
   ``batch=1`` maps back to back; one broker is SIGKILLed after a few seconds
   and restarted a few seconds later. Every map is checked to return every
   result exactly once, in order; the aggregate throughput is reported per
   second and as before / during / after means.

    python scripts/bench_scale.py                 # the full run, about 3 minutes (at most ~5)
    python scripts/bench_scale.py --quick         # small counts, under a minute
    python scripts/bench_scale.py --only scale --nodes 500 --json /tmp/scale.json

Every wait is bounded in time; every process started is stopped on exit
(``LocalSwarm.close()`` in ``finally``, helper processes stopped and joined),
and the run ends by checking that none is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (scripts/bench.py: the simulated nodes, /proc readers, machine description)

SKILLS = str(bench.SKILLS_FILE)
QUEUE_SKILL = "idle"  # the skill the simulated nodes declare (and never run)
QUEUE_PAYLOAD = 100  # bytes of each queued task's argument (as bench.measure_queued_memory)
SETTLE_S = 2.0  # simulated nodes: all listed and no death for this long before measuring
PLACE_TRIES = 40  # failover clients: new connections tried until one lands on the wanted broker
MEASURES = ("scale", "brokers", "failover")
HOMES: list[str] = []  # every swarm's home: a process mentioning one after the run was left behind


@dataclass(frozen=True)
class Settings:
    nodes: int = 1000  # 1. simulated idle nodes
    sim_procs: int = 4  # 1. helper processes they are spread over
    queued: int = 100_000  # 1. tasks left waiting in the broker's queue
    rtt: int = 2000  # 1. sequential round trips per step
    warmup: int = 200  # 1. round trips before each measured series
    cpu_seconds: float = 10.0  # 1. broker CPU measured over this long
    clients: int = 3  # 2./3. client processes
    node_procs: int = 2  # 2./3. real `zlink node` processes...
    slots: int = 4  # ...with this many slots each
    tasks: int = 20_000  # 2. batch=1 map, items per client
    batched_tasks: int = 200_000  # 2. default batched map, items per client
    window: int = 1000  # 2./3. batch=1 map window
    batch_window: int = 10_000  # 2. batched map window
    repeat: int = 3  # 2. runs per broker count (best is reported)
    fail_seconds: float = 24.0  # 3. length of the loaded run
    kill_at: float = 8.0  # 3. SIGKILL one broker this long into it...
    restart_at: float = 16.0  # 3. ...and restart it then
    chunk: int = 2000  # 3. items per map (maps run back to back)
    item_timeout: float = 30.0  # 3. each item's timeout (a task stuck longer fails its map, reported)
    only: tuple[str, ...] = ()

    def runs(self, name: str) -> bool:
        return not self.only or name in self.only


QUICK = {
    "nodes": 100, "sim_procs": 2, "queued": 5000, "rtt": 300, "warmup": 50, "cpu_seconds": 2.0,
    "tasks": 2000, "batched_tasks": 20_000, "repeat": 1, "fail_seconds": 9.0, "kill_at": 3.0,
    "restart_at": 6.0, "chunk": 500, "item_timeout": 10.0,
}  # fmt: skip


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _orphan_guard(parent: int) -> None:
    """Exit this helper process when the benchmark process that started it is gone."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _join_for(swarm: Any, name: str, endpoints: list[str]) -> str:
    """A client join string naming only ``endpoints`` (to pin a client to one broker)."""
    from zlink.security import BrokerHome

    join = BrokerHome(swarm.home).invite(name=name, role="client", endpoints=endpoints)
    return join.with_seal_key(swarm.seal_key).dump()


def _pct(cpu_s: float, wall: float) -> float:
    return cpu_s / wall * 100 if wall > 0 else math.nan


# =========================================================================== client processes


def client_main(join: str, want: str, ctrl: Any) -> None:
    """One ``zlink.Client`` in a process of its own, driven over a pipe.

    With ``want`` (an endpoint), connections are made again (at most
    :data:`PLACE_TRIES`) until the client's random pick of a broker is that
    one: clients spread evenly while keeping a join string that names every
    broker, so they can fail over. Commands: ``map``, ``loop``, ``submit``,
    ``stop``; every reply is one tuple.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _orphan_guard(os.getppid())
    from zlink import Client

    client: Any = None
    futures: list[Any] = []
    try:
        tries = 0
        while True:
            tries += 1
            client = Client(join, connect_timeout=20.0)
            if not want or client.endpoint == want or tries >= PLACE_TRIES:
                break
            client.close()
        ctrl.send(("ready", client.endpoint, tries, os.getpid()))
        while True:
            if not ctrl.poll(1.0):
                continue
            cmd = ctrl.recv()
            if cmd[0] == "stop":
                break
            try:
                if cmd[0] == "map":
                    reply = _run_map(client, *cmd[1:])
                elif cmd[0] == "loop":
                    reply = _run_loop(client, *cmd[1:])
                elif cmd[0] == "submit":
                    _, skill, n, size = cmd
                    body = os.urandom(size)
                    t0 = time.perf_counter()
                    futures += [client.submit(skill, body) for _ in range(n)]
                    reply = ("submitted", len(futures), time.perf_counter() - t0)
                else:
                    reply = ("error", f"unknown command {cmd[0]!r}")
            except Exception as exc:  # reported to the parent, which fails the measurement
                reply = ("error", f"{type(exc).__name__}: {exc}")
            ctrl.send(reply)
    finally:
        if client is not None:
            client.close()


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _run_map(client: Any, t_go: float, base: int, n: int, batch: int | None, window: int) -> tuple[Any, ...]:
    """One map of ``n`` no-ops starting at ``t_go`` (CLOCK_MONOTONIC, shared by every process); checked."""
    _sleep_until(t_go)
    t0 = time.monotonic()
    k = 0
    for v in client.map("noop", range(base, base + n), batch=batch, window=window, timeout=120.0):
        if v != base + k:
            return ("error", f"map: item {k} returned {v!r}, expected {base + k}")
        k += 1
    t1 = time.monotonic()
    if k != n:
        return ("error", f"map: {k} of {n} results")
    return ("mapped", t0, t1, n)


def _run_loop(
    client: Any, t_go: float, t_end: float, base: int, chunk: int, window: int, item_timeout: float
) -> tuple[Any, ...]:
    """``batch=1`` maps of ``chunk`` items back to back from ``t_go`` until ``t_end``; results counted per second.

    Every map must yield exactly its items, once each, in order (``ordered=True``):
    a lost task raises or times out, a duplicate or a reordering shows as a
    wrong value. Each problem is recorded and the loop goes on with the next map.
    """
    _sleep_until(t_go)
    start_ep = client.endpoint
    counts: dict[int, int] = {}
    errors: list[str] = []
    maps = items = 0
    start = base
    mono = time.monotonic
    while mono() < t_end and len(errors) < 10:
        k = 0
        try:
            for v in client.map("noop", range(start, start + chunk), batch=1, window=window, timeout=item_timeout):
                if v != start + k:
                    errors.append(f"map {maps}: item {k} returned {v!r}, expected {start + k}")
                    break
                k += 1
                b = int(mono() - t_go)
                counts[b] = counts.get(b, 0) + 1
        except Exception as exc:
            errors.append(f"map {maps}: {type(exc).__name__}: {exc}"[:300])
        else:
            if k != chunk and not errors:
                errors.append(f"map {maps}: {k} of {chunk} results")
        maps += 1
        items += k
        start += chunk
    return ("looped", counts, maps, items, errors, start_ep, client.endpoint)


class Clients:
    """Client processes (spawned), one pipe each; every exchange is bounded in time."""

    def __init__(self, joins: list[tuple[str, str]], timeout: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        try:
            for join, want in joins:
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(target=client_main, args=(join, want, child_end), daemon=True)
                p.start()
                child_end.close()
                self.procs.append(p)
                self.conns.append(parent_end)
            ready = self.gather(timeout, "connect")
        except BaseException:
            self.close()
            raise
        self.endpoints = [r[1] for r in ready]
        self.tries = [r[2] for r in ready]
        self.pids = [r[3] for r in ready]

    def gather(self, timeout: float, what: str) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        out: list[tuple[Any, ...] | None] = [None] * len(self.conns)
        while any(r is None for r in out):
            for k, conn in enumerate(self.conns):
                if out[k] is not None:
                    continue
                try:
                    if conn.poll(0.02):
                        out[k] = conn.recv()
                    elif not self.procs[k].is_alive():
                        raise bench.BenchError(f"client process {k} exited (code {self.procs[k].exitcode}) in {what}")
                except EOFError:
                    raise bench.BenchError(f"client process {k} closed its pipe in {what}") from None
            if time.monotonic() > deadline:
                late = [k for k, r in enumerate(out) if r is None]
                raise bench.BenchError(f"{what}: client process(es) {late} did not answer within {timeout:g} s")
        replies = [r for r in out if r is not None]
        for k, r in enumerate(replies):
            if r[0] == "error":
                raise bench.BenchError(f"client process {k} in {what}: {r[1]}")
        return replies

    def ask(self, cmds: list[tuple[Any, ...]], timeout: float, what: str) -> list[tuple[Any, ...]]:
        for conn, cmd in zip(self.conns, cmds, strict=True):
            conn.send(cmd)
        return self.gather(timeout, what)

    def ask_one(self, k: int, cmd: tuple[Any, ...], timeout: float, what: str) -> tuple[Any, ...]:
        self.conns[k].send(cmd)
        deadline = time.monotonic() + timeout
        while not self.conns[k].poll(0.05):
            if not self.procs[k].is_alive() or time.monotonic() > deadline:
                raise bench.BenchError(f"{what}: client process {k} did not answer within {timeout:g} s")
        r = self.conns[k].recv()
        if r[0] == "error":
            raise bench.BenchError(f"client process {k} in {what}: {r[1]}")
        return r  # type: ignore[no-any-return]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        deadline = time.monotonic() + 15.0
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        bench.stop_processes([p for p in self.procs if p.is_alive()])
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


# =========================================================================== 1. one broker at scale


class SimNodes:
    """``n`` simulated idle nodes (:func:`bench.idle_nodes_main`) in ``procs`` helper processes."""

    def __init__(self, swarm: Any, n: int, procs: int, prefix: str) -> None:
        from zlink.security import BrokerHome

        home = BrokerHome(swarm.home)
        t0 = time.monotonic()
        joins = [home.invite(name=f"{prefix}-{i + 1}", role="node", endpoints=[swarm.endpoint]) for i in range(n)]
        #: seconds to invite the n keys (BrokerHome.invite, as `zlink invite` does)
        self.invite_s = time.monotonic() - t0
        keys = [(j.name, j.keys.public, j.keys.secret or "") for j in joins]
        ctx = mp.get_context("spawn")
        self.n = n
        self.helpers: list[Any] = []
        self.conns: list[Any] = []
        self.welcomed_at: list[float] = []
        self.t_start = time.monotonic()
        procs = max(1, min(procs, n))
        for k in range(procs):
            parent_end, child_end = ctx.Pipe()
            args = (swarm.endpoint, joins[0].broker_key, keys[k::procs], True, child_end)
            h = ctx.Process(target=bench.idle_nodes_main, args=args, daemon=True)
            h.start()
            child_end.close()
            self.helpers.append(h)
            self.conns.append(parent_end)

    def wait_welcomed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        at: dict[int, float] = {}
        while len(at) < len(self.helpers):
            for k, conn in enumerate(self.conns):
                if k in at:
                    continue
                if conn.poll(0.02):
                    conn.recv()
                    at[k] = time.monotonic()
                elif not self.helpers[k].is_alive():
                    raise bench.BenchError(f"simulated-node helper {k} exited (code {self.helpers[k].exitcode})")
            if time.monotonic() > deadline:
                raise bench.BenchError(
                    f"simulated nodes: {len(at)}/{len(self.helpers)} helpers had all their nodes welcomed in time"
                )
        self.welcomed_at = [at[k] for k in range(len(self.helpers))]

    def pids(self) -> list[int]:
        return [h.pid or 0 for h in self.helpers]

    def stop(self) -> dict[str, Any]:
        """Stop the helpers; their counters, and heartbeats sent per second since each helper's nodes were all in."""
        t_stop = time.monotonic()
        stats: dict[str, int] = {}
        rate = 0.0
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send("stop")
        for k, conn in enumerate(self.conns):
            with contextlib.suppress(OSError, EOFError):
                deadline = time.monotonic() + 10.0
                msg: tuple[Any, ...] = ("",)
                while msg[0] != "stopped" and conn.poll(max(0.0, deadline - time.monotonic())):
                    msg = conn.recv()  # a "welcomed" report may still be waiting
                if msg[0] == "stopped":
                    c = msg[1]
                    for key, v in c.items():
                        stats[key] = stats.get(key, 0) + v
                    if k < len(self.welcomed_at):
                        rate += c.get("beats", 0) / max(1e-3, t_stop - self.welcomed_at[k])
        return {**stats, "beats_per_s": rate}

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        bench.stop_processes(self.helpers)


def _round_trips(client: Any, n: int, warmup: int, budget: float) -> dict[str, float]:
    """``submit('noop', i).result()`` one after another: p50/p99 of ``n`` after ``warmup``, within ``budget`` s."""
    for i in range(warmup):
        client.submit("noop", i).result(timeout=10.0)
    samples: list[float] = []
    end = time.monotonic() + budget
    perf = time.perf_counter
    for i in range(n):
        t0 = perf()
        client.submit("noop", i).result(timeout=10.0)
        samples.append(perf() - t0)
        if time.monotonic() > end:
            break
    return bench.latency_summary(samples)


def _wait_settled(client: Any, count: int, timeout: float) -> tuple[dict[str, Any], int]:
    """Until status lists ``count`` nodes and neither that nor the deaths changed for SETTLE_S.

    A broker busy with a storm of handshakes may not answer STATUS for a while:
    unanswered requests are counted, not fatal, until ``timeout``. Returns
    (status, unanswered STATUS requests).
    """
    from zlink.errors import ZlinkError

    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    last: tuple[int, int] = (-1, -1)
    changed = t0
    unanswered = 0
    while True:
        try:
            st = client.status(timeout=5.0)
        except ZlinkError:
            unanswered += 1
            if time.monotonic() > deadline:
                raise bench.BenchError(f"nodes not settled in {timeout:g} s: the broker does not answer") from None
            continue
        now = time.monotonic()
        listed, deaths = len(st["nodes"]), st["counters"]["nodes_died"]
        if (listed, deaths) != last:
            last, changed = (listed, deaths), now
        elif listed >= count and now - changed >= SETTLE_S:
            return st, unanswered
        if now > deadline:
            raise bench.BenchError(f"nodes not settled in {timeout:g} s: {listed}/{count} listed, {deaths} deaths")
        time.sleep(0.2)


def _broker_cpu(pid: int, seconds: float, sims: list[int]) -> dict[str, float]:
    """The broker's CPU over ``seconds`` (all, libzmq I/O threads, Python threads), and the helpers'."""
    sim0 = sum(bench.proc_cpu_seconds(p) for p in sims)
    th0 = bench.thread_times(pid)
    t0 = time.monotonic()
    cpu = bench.cpu_percent(pid, seconds)
    wall = time.monotonic() - t0
    zmq_cpu, py_cpu, wakeups = bench.thread_split(th0, bench.thread_times(pid), wall)
    sim = _pct(sum(bench.proc_cpu_seconds(p) for p in sims) - sim0, wall)
    return {"cpu_pct": cpu, "cpu_pct_libzmq": zmq_cpu, "cpu_pct_python": py_cpu, "wakeups_per_s": wakeups,
            "sim_cpu_pct": sim}  # fmt: skip


def measure_scale(cfg: Settings) -> dict[str, Any]:
    """One broker, one real node, ``cfg.nodes`` simulated nodes, then ``cfg.queued`` queued tasks."""
    from zlink import Client
    from zlink.demo import LocalSwarm

    out: dict[str, Any] = {"nodes": cfg.nodes, "queued_target": cfg.queued}
    swarm = LocalSwarm()
    HOMES.append(str(swarm.home))
    client: Any = None
    sims: SimNodes | None = None
    queuer: Clients | None = None
    budget = max(60.0, cfg.rtt * 0.05)
    try:
        swarm.start_broker(timeout=20.0)
        assert swarm.broker is not None
        pid = swarm.broker.pid
        out["broker_pid"] = pid
        client = Client(swarm.invite("client", "scale-rtt-client"), connect_timeout=20.0)
        client.status()
        time.sleep(1.0)
        out["rss_mib_empty"] = bench.proc_rss_kib(pid) / 1024
        swarm.start_node(SKILLS, slots=cfg.slots, name="real-node")
        swarm.wait_nodes(client, 1, timeout=30.0)
        log("scale: 1 real node joined; round trips with it alone")
        out["rtt_alone"] = _round_trips(client, cfg.rtt, cfg.warmup, budget)
        time.sleep(0.5)
        rss_one = bench.proc_rss_kib(pid)
        out["rss_mib_one_node"] = rss_one / 1024

        log(f"scale: inviting {cfg.nodes:,} keys, then as many simulated nodes in {cfg.sim_procs} processes join")
        sims = SimNodes(swarm, cfg.nodes, cfg.sim_procs, "sim-node")
        out["invite_s"] = sims.invite_s
        t_join = time.monotonic()
        c_join = bench.proc_cpu_seconds(pid)
        sims.wait_welcomed(timeout=max(120.0, cfg.nodes / 5))
        out["welcome_s"] = time.monotonic() - t_join
        st, unanswered = _wait_settled(client, cfg.nodes + 1, timeout=max(120.0, cfg.nodes / 5))
        out["settled_s"] = time.monotonic() - t_join - SETTLE_S
        out["join_broker_cpu_s"] = bench.proc_cpu_seconds(pid) - c_join
        out["join_status_unanswered"] = unanswered
        out["join_deaths"] = st["counters"]["nodes_died"]
        deaths0 = st["counters"]["nodes_died"]
        rss_nodes = bench.proc_rss_kib(pid)
        out["rss_mib_nodes"] = rss_nodes / 1024
        out["kib_per_node"] = (rss_nodes - rss_one) / cfg.nodes
        log(f"scale: broker CPU with {cfg.nodes:,} nodes heartbeating, over {cfg.cpu_seconds:g} s")
        out["cpu_nodes"] = _broker_cpu(pid, cfg.cpu_seconds, sims.pids())
        st = client.status()
        out["worst_silence_s_nodes"] = max(n["last_seen"] for n in st["nodes"])
        log(f"scale: round trips with {cfg.nodes:,} nodes connected")
        out["rtt_nodes"] = _round_trips(client, cfg.rtt, cfg.warmup, budget)

        # each simulated node is handed one task of its skill (never answered): submit that many more
        submit = cfg.queued + cfg.nodes
        log(f"scale: queueing {submit:,} tasks to '{QUEUE_SKILL}' from a client process")
        queuer = Clients([(swarm.invite("client", "scale-queue-client"), "")])
        r = queuer.ask([("submit", QUEUE_SKILL, submit, QUEUE_PAYLOAD)], max(60.0, submit / 500), "submit")
        out["submit_s"] = r[0][2]
        deadline = time.monotonic() + max(60.0, submit / 1000)
        t_sub = time.monotonic()
        while True:
            st = client.status()
            queued = st["queued"].get(QUEUE_SKILL, 0)
            if queued >= cfg.queued:
                break
            if time.monotonic() > deadline:
                raise bench.BenchError(f"the broker queued {queued:,} of {cfg.queued:,} tasks in time")
            time.sleep(0.25)
        out["queue_wait_s"] = time.monotonic() - t_sub
        out["queued"] = queued
        out["running"] = st["running"]
        time.sleep(1.0)
        rss_queued = bench.proc_rss_kib(pid)
        out["rss_mib_queued"] = rss_queued / 1024
        out["bytes_per_task"] = (rss_queued - rss_nodes) * 1024 / submit
        t0 = time.perf_counter()
        client.status()
        out["status_ms_queued"] = (time.perf_counter() - t0) * 1000
        log(f"scale: round trips with {cfg.nodes:,} nodes and {queued:,} tasks queued")
        out["rtt_queued"] = _round_trips(client, cfg.rtt, cfg.warmup, budget)
        log(f"scale: broker CPU with {cfg.nodes:,} nodes and the queue, over {cfg.cpu_seconds:g} s")
        out["cpu_queued"] = _broker_cpu(pid, cfg.cpu_seconds, sims.pids())
        st = client.status()
        out["worst_silence_s_queued"] = max(n["last_seen"] for n in st["nodes"])
        out["deaths_while_measuring"] = st["counters"]["nodes_died"] - deaths0
        out["listed_at_end"] = len(st["nodes"])
        out["queued_at_end"] = st["queued"].get(QUEUE_SKILL, 0)
        out["sim"] = sims.stop()
        out["beats_nominal_per_s"] = cfg.nodes / 0.5
    finally:
        try:
            if queuer is not None:
                queuer.close()
            if sims is not None:
                sims.close()
            if client is not None:
                client.close()
        finally:
            swarm.close()
    return out


# =========================================================================== 2. brokers vs throughput


@contextlib.contextmanager
def multi_swarm(cfg: Settings, brokers: int, client_joins: Callable[[Any], list[tuple[str, str]]]) -> Iterator[Any]:
    """``brokers`` brokers, ``cfg.node_procs`` nodes joined to all, every broker listing them, client processes.

    Yields (swarm, clients); everything is stopped on leaving.
    """
    from zlink import Client
    from zlink.demo import LocalSwarm

    swarm = LocalSwarm()
    HOMES.append(str(swarm.home))
    clients: Clients | None = None
    try:
        swarm.start_brokers(brokers, timeout=20.0)
        for i in range(cfg.node_procs):
            swarm.start_node(SKILLS, slots=cfg.slots, name=f"node-{i + 1}")
        for i, ep in enumerate(swarm.endpoints):
            with Client(_join_for(swarm, f"probe-{i}", [ep]), connect_timeout=20.0) as probe:
                swarm.wait_nodes(probe, cfg.node_procs, timeout=30.0)
        clients = Clients(client_joins(swarm))
        yield swarm, clients
    finally:
        try:
            if clients is not None:
                clients.close()
        finally:
            swarm.close()


def _group_pids(swarm: Any, clients: Clients) -> dict[str, list[int]]:
    brokers = {p.pid for p in [swarm.broker, *swarm.brokers] if p is not None and p.poll() is None}
    nodes = [p.pid for p in swarm.procs if p.pid not in brokers and p.poll() is None]
    return {"brokers": sorted(brokers), "nodes": nodes, "clients": list(clients.pids)}


def _cpu_of(groups: dict[str, list[int]]) -> dict[str, float]:
    return {g: sum(bench.proc_cpu_seconds(p) for p in pids) for g, pids in groups.items()}


def _cpu_snap(swarm: Any, clients: Clients) -> tuple[float, dict[str, dict[int, float]]]:
    """(time, group -> pid -> CPU seconds) of the live processes now."""
    return time.monotonic(), {
        g: {p: bench.proc_cpu_seconds(p) for p in pids} for g, pids in _group_pids(swarm, clients).items()
    }


def _cpu_between(a: tuple[float, dict[str, dict[int, float]]], b: tuple[float, dict[str, dict[int, float]]]) -> dict:
    """% of one core per group between two snapshots (processes alive at both)."""
    wall = b[0] - a[0]
    return {g: _pct(sum(b[1][g][p] - c for p, c in pids.items() if p in b[1][g]), wall) for g, pids in a[1].items()}


def _phase(swarm: Any, clients: Clients, n: int, batch: int | None, window: int, base: int) -> dict[str, Any]:
    """Every client maps ``n`` no-ops at once; aggregate tasks/s and each group's CPU (% of one core)."""
    k = len(clients.procs)
    groups = _group_pids(swarm, clients)
    t_go = time.monotonic() + 0.5
    cmds = [("map", t_go, base + i * n, n, batch, window) for i in range(k)]
    for conn, cmd in zip(clients.conns, cmds, strict=True):
        conn.send(cmd)
    _sleep_until(t_go)
    c0, w0 = _cpu_of(groups), time.monotonic()
    replies = clients.gather(max(60.0, k * n / 500), "map")
    c1, w1 = _cpu_of(groups), time.monotonic()
    first = min(r[1] for r in replies)
    last = max(r[2] for r in replies)
    return {
        "tasks": k * n,
        "tps": k * n / (last - first),
        "wall_s": last - first,
        "per_client_tps": [r[3] / (r[2] - r[1]) for r in replies],
        "cpu_pct": {g: _pct(c1[g] - c0[g], w1 - w0) for g in groups},
    }


def measure_brokers(cfg: Settings) -> dict[str, Any]:
    """No-op throughput on 1 broker and on 3, each ``cfg.repeat`` times (interleaved); best run reported."""
    runs: dict[int, list[dict[str, Any]]] = {1: [], 3: []}
    for r in range(cfg.repeat):
        for brokers in (1, 3):

            def joins(swarm: Any, brokers: int = brokers) -> list[tuple[str, str]]:
                eps = swarm.endpoints
                return [(_join_for(swarm, f"tp-client-{k}", [eps[k % len(eps)]]), "") for k in range(cfg.clients)]

            log(f"brokers: run {r + 1}/{cfg.repeat}, {brokers} broker(s), {cfg.clients} client processes")
            with multi_swarm(cfg, brokers, joins) as (swarm, clients):
                clients.ask([("map", 0.0, 0, 1000, 1, cfg.window)] * cfg.clients, 60.0, "warm-up")
                clients.ask([("map", 0.0, 0, 5000, None, cfg.batch_window)] * cfg.clients, 60.0, "warm-up")
                one = _phase(swarm, clients, cfg.tasks, 1, cfg.window, 0)
                batched = _phase(swarm, clients, cfg.batched_tasks, None, cfg.batch_window, 0)
                runs[brokers].append({"batch1": one, "batched": batched, "client_brokers": clients.endpoints})
    best = {
        b: {mode: max((run[mode] for run in rs), key=lambda x: x["tps"]) for mode in ("batch1", "batched")}
        for b, rs in runs.items()
    }
    return {
        "runs": {str(b): rs for b, rs in runs.items()},
        "best": {str(b): v for b, v in best.items()},
        "ratio_batch1": best[3]["batch1"]["tps"] / best[1]["batch1"]["tps"],
        "ratio_batched": best[3]["batched"]["tps"] / best[1]["batched"]["tps"],
    }


# =========================================================================== 3. a broker killed under load


def measure_failover(cfg: Settings) -> dict[str, Any]:
    """3 brokers under batch=1 load from clients spread over them; SIGKILL one, restart it; throughput per second."""
    from zlink import Client

    out: dict[str, Any] = {}

    def joins(swarm: Any) -> list[tuple[str, str]]:
        eps = swarm.endpoints
        return [(swarm.invite("client", f"fo-client-{k}"), eps[k % len(eps)]) for k in range(cfg.clients)]

    with multi_swarm(cfg, 3, joins) as (swarm, clients):
        eps = swarm.endpoints
        on = [eps.index(ep) for ep in clients.endpoints]
        out["client_brokers_at_start"] = on
        out["placement_tries"] = clients.tries
        victim = on[1 % len(on)]  # the broker of client 1 (client k asked for broker k)
        out["victim"] = victim
        out["victim_clients"] = on.count(victim)
        clients.ask([("map", 0.0, 0, 1000, 1, cfg.window)] * cfg.clients, 60.0, "warm-up")
        t_go = time.monotonic() + 0.5
        t_end = t_go + cfg.fail_seconds
        base = 10_000_000
        for k, conn in enumerate(clients.conns):
            conn.send(("loop", t_go, t_end, base * (k + 1), cfg.chunk, cfg.window, cfg.item_timeout))
        _sleep_until(t_go + 1.0)
        snaps = [_cpu_snap(swarm, clients)]
        _sleep_until(t_go + cfg.kill_at)
        snaps.append(_cpu_snap(swarm, clients))
        swarm.kill_broker(victim)
        snaps.append(_cpu_snap(swarm, clients))
        out["killed_at_s"] = time.monotonic() - t_go
        log(f"failover: broker {victim} killed at {out['killed_at_s']:.2f} s")
        _sleep_until(t_go + cfg.restart_at)
        t_r = time.monotonic()
        swarm.restart_broker(victim, timeout=20.0)
        out["restarted_at_s"] = t_r - t_go
        out["restart_bound_s"] = time.monotonic() - t_r
        snaps.append(_cpu_snap(swarm, clients))
        with Client(_join_for(swarm, "fo-probe", [eps[victim]]), connect_timeout=20.0) as probe:
            swarm.wait_nodes(probe, cfg.node_procs, timeout=20.0)
        out["nodes_back_s"] = time.monotonic() - t_r
        log(f"failover: broker {victim} restarted at {out['restarted_at_s']:.2f} s, nodes back after "
            f"{out['nodes_back_s']:.2f} s")  # fmt: skip
        _sleep_until(t_end)
        snaps.append(_cpu_snap(swarm, clients))
        out["cpu_pct"] = {
            "before": _cpu_between(snaps[0], snaps[1]),
            "during": _cpu_between(snaps[2], snaps[3]),
            "after": _cpu_between(snaps[3], snaps[4]),
        }
        replies = clients.gather(cfg.fail_seconds + 10 * cfg.item_timeout + 60.0, "loaded run")
    secs = math.ceil(cfg.fail_seconds)
    buckets = [0] * secs
    errors: list[str] = []
    items = maps = 0
    ends = []
    for k, (_, counts, m, n, errs, _start_ep, end_ep) in enumerate(replies):
        for b, c in counts.items():
            if 0 <= b < secs:
                buckets[b] += c
        items += n
        maps += m
        errors += [f"client {k}: {e}" for e in errs]
        ends.append(eps.index(end_ep) if end_ep in eps else -1)
    kill_b = int(out["killed_at_s"])
    restart_b = int(out["restarted_at_s"])

    def mean(lo: int, hi: int) -> float:
        sel = buckets[max(0, lo) : max(0, hi)]
        return sum(sel) / len(sel) if sel else math.nan

    out.update(
        {
            "buckets": buckets,
            "items": items,
            "maps": maps,
            "errors": errors,
            "client_brokers_at_end": ends,
            "before_tps": mean(1 if kill_b > 1 else 0, kill_b),  # second 0 is the start-up
            "during_tps": mean(kill_b + 1, restart_b),  # the second of the kill is partial
            "after_tps": mean(restart_b + 1, secs),
        }
    )
    out["during_over_before"] = out["during_tps"] / out["before_tps"]
    out["after_over_before"] = out["after_tps"] / out["before_tps"]
    return out


# =========================================================================== report


def _ms(d: dict[str, float], key: str) -> str:
    return f"{d[key]:.3f}"


def report_lines(res: dict[str, Any], cfg: Settings, machine: dict[str, Any], cmd: str) -> list[str]:
    lines = [
        "zlink scale benchmark (issue #10), every process on 127.0.0.1",
        *bench.machine_lines(machine),
        f"command: {cmd}",
        f"settings: {settings_text(cfg)}",
    ]

    def table(rows: list[tuple[str, str, str]]) -> None:
        w = max(len(r[0]) for r in rows) + 2
        lines.append(f"{'metric':<{w}}{'value':>14}  target")
        lines.append("-" * (w + 30))
        for label, value, target in rows:
            lines.append(f"{label:<{w}}{value:>14}  {target}".rstrip())

    s = res.get("scale")
    if s is not None:
        n, q = s["nodes"], s["queued"]
        verdict = "PASS" if s["rtt_queued"]["p50_ms"] < 5 else "MISS"
        lines += ["", f"1. One broker, 1 real node + {n:,} simulated nodes, then {q:,} tasks queued"]
        cn, cq, sim = s["cpu_nodes"], s["cpu_queued"], s["sim"]
        rows = [
            ("round trip p50, real node alone (ms)", _ms(s["rtt_alone"], "p50_ms"), ""),
            ("round trip p99, real node alone (ms)", _ms(s["rtt_alone"], "p99_ms"), ""),
            (f"round trip p50, +{n:,} nodes (ms)", _ms(s["rtt_nodes"], "p50_ms"), ""),
            (f"round trip p99, +{n:,} nodes (ms)", _ms(s["rtt_nodes"], "p99_ms"), ""),
            (f"round trip p50, +{n:,} nodes +{q:,} queued (ms)", _ms(s["rtt_queued"], "p50_ms"), f"< 5 ms {verdict}"),
            (f"round trip p99, +{n:,} nodes +{q:,} queued (ms)", _ms(s["rtt_queued"], "p99_ms"), ""),
            ("  round trips per series", f"{s['rtt_queued']['count']:,}", ""),
            ("broker RSS, no node (MiB)", f"{s['rss_mib_empty']:.1f}", ""),
            ("broker RSS, 1 real node (MiB)", f"{s['rss_mib_one_node']:.1f}", ""),
            (f"broker RSS, +{n:,} nodes (MiB)", f"{s['rss_mib_nodes']:.1f}", ""),
            (f"broker RSS, +{n:,} nodes +{q:,} queued (MiB)", f"{s['rss_mib_queued']:.1f}", ""),
            ("  growth per node (KiB)", f"{s['kib_per_node']:.1f}", ""),
            ("  growth per queued task (bytes, 100 B sealed args)", f"{s['bytes_per_task']:,.0f}", ""),
            (f"broker CPU, {n:,} nodes heartbeating (% core)", f"{cn['cpu_pct']:.1f}", ""),
            ("  libzmq threads / Python threads (%)", f"{cn['cpu_pct_libzmq']:.1f} / {cn['cpu_pct_python']:.1f}",
             ""),
            ("  broker Python thread wake-ups per second", f"{cn['wakeups_per_s']:,.0f}", ""),
            (f"broker CPU, {n:,} nodes + queue (% core)", f"{cq['cpu_pct']:.1f}", ""),
            ("heartbeats sent to the broker per second", f"{sim.get('beats_per_s', math.nan):,.0f}",
             f"nominal {s['beats_nominal_per_s']:,.0f}"),
            ("  broker CPU / heartbeats (us, beacons included)",
             f"{cn['cpu_pct'] / 100 / sim['beats_per_s'] * 1e6:.1f}" if sim.get("beats_per_s") else "-", ""),
            ("  max time since a node's last beat, 2 samples (s)",
             f"{max(s['worst_silence_s_nodes'], s['worst_silence_s_queued']):.2f}", "< 1.5 (node timeout)"),
            ("  nodes declared dead while measuring", f"{s['deaths_while_measuring']}", "0"),
            ("simulated nodes' helpers CPU (% core)", f"{cn['sim_cpu_pct']:.1f}", ""),
            (f"joining: inviting {n:,} keys (s)", f"{s['invite_s']:.1f}", ""),
            (f"joining: {n:,} nodes all welcomed / listed and settled after (s)",
             f"{s['welcome_s']:.1f} / {s['settled_s']:.1f}", ""),
            ("joining: broker CPU used (s)", f"{s['join_broker_cpu_s']:.1f}", ""),
            ("joining: STATUS requests unanswered within 5 s", f"{s['join_status_unanswered']}", "0"),
            ("joining: nodes declared dead during the join", f"{s['join_deaths']:,}", "0"),
            (f"{s['queued'] + s['running']:,} tasks: submit (s) / all queued after (s)",
             f"{s['submit_s']:.1f} / {s['queue_wait_s']:.1f}", ""),
            ("client.status() with the queue (ms)", f"{s['status_ms_queued']:.1f}", ""),
        ]  # fmt: skip
        table(rows)
        lines.append(
            f"  queue: {s['queued']:,} tasks queued for '{QUEUE_SKILL}' (offered only by the simulated nodes) and "
            f"{s['running']:,} running (one handed to each simulated node, never answered); helpers' counters: "
            + ", ".join(f"{k} {v:,}" for k, v in sim.items() if k != "beats_per_s")
        )
    b = res.get("brokers")
    if b is not None:
        cores = machine["usable_cores"]
        lines += [
            "",
            f"2. Brokers vs no-op throughput: {cfg.clients} client processes, {cfg.node_procs} nodes x {cfg.slots} "
            f"slots joined to every broker; best of {cfg.repeat}; this machine has {cores} usable core(s)",
        ]
        rows = []
        for mode, label, per in (
            ("batched", "default batching", cfg.batched_tasks),
            ("batch1", "batch=1", cfg.tasks),
        ):
            for nb in ("1", "3"):
                ph = b["best"][nb][mode]
                cpu = ph["cpu_pct"]
                rows.append(
                    (f"map {label}, {nb} broker(s), {cfg.clients} x {per:,} (tasks/s)", f"{ph['tps']:,.0f}",
                     f"CPU % core: brokers {cpu['brokers']:.0f}, nodes {cpu['nodes']:.0f}, clients "
                     f"{cpu['clients']:.0f} (all {sum(cpu.values()):.0f} of {cores * 100})")
                )  # fmt: skip
            rows.append((f"  3 brokers / 1 broker, {label}", f"{b[f'ratio_{mode}']:.2f}x", ""))
        table(rows)
        for nb in ("1", "3"):
            all_runs = ", ".join(f"{run['batched']['tps']:,.0f} / {run['batch1']['tps']:,.0f}" for run in b["runs"][nb])
            lines.append(f"  every run, {nb} broker(s), batched / batch=1 tasks/s: {all_runs}")
        if cores < 3 + cfg.node_procs + cfg.clients:
            lines.append(
                f"  On {cores} core(s) the brokers, nodes and clients share the same cores (see the CPU column): "
                "more brokers add processes here, not capacity."
            )
    f = res.get("failover")
    if f is not None:
        lines += [
            "",
            f"3. Broker {f['victim']} of 3 SIGKILLed at {f['killed_at_s']:.1f} s and restarted at "
            f"{f['restarted_at_s']:.1f} s, under batch=1 maps of {cfg.chunk:,} from {cfg.clients} clients "
            f"(brokers of the clients at start {f['client_brokers_at_start']}, at end {f['client_brokers_at_end']})",
        ]
        ok = "yes" if not f["errors"] else "NO"

        def cpu(w: str) -> str:
            c = f["cpu_pct"][w]
            return f"CPU % core: brokers {c['brokers']:.0f}, nodes {c['nodes']:.0f}, clients {c['clients']:.0f}"

        rows = [
            ("throughput before the kill (tasks/s)", f"{f['before_tps']:,.0f}", cpu("before")),
            ("throughput with one broker down (tasks/s)", f"{f['during_tps']:,.0f}",
             f"{f['during_over_before']:.2f}x of before; {cpu('during')}"),
            ("throughput after the restart (tasks/s)", f"{f['after_tps']:,.0f}",
             f"{f['after_over_before']:.2f}x of before; {cpu('after')}"),
            ("restarted broker listed every node after (s)", f"{f['nodes_back_s']:.2f}", ""),
            ("maps / results checked", f"{f['maps']:,} / {f['items']:,}", ""),
            ("every result exactly once, in order", ok, "yes"),
        ]  # fmt: skip
        table(rows)
        lines.append("  tasks per 1 s bucket: " + " ".join(f"{c:,}" for c in f["buckets"]))
        lines.append(
            "  marks: K = kill, R = restart:  "
            + " ".join(
                "K" if i == int(f["killed_at_s"]) else "R" if i == int(f["restarted_at_s"]) else "."
                for i in range(len(f["buckets"]))
            )
        )
        for e in f["errors"][:20]:
            lines.append(f"  ERROR: {e}")
    return lines


def settings_text(cfg: Settings) -> str:
    return (
        f"1: {cfg.nodes:,} simulated nodes in {cfg.sim_procs} processes, {cfg.queued:,} queued, {cfg.rtt:,} round "
        f"trips per step (warm-up {cfg.warmup}), CPU over {cfg.cpu_seconds:g} s; 2: {cfg.clients} clients, "
        f"{cfg.node_procs} nodes x {cfg.slots} slots, maps of {cfg.tasks:,} (batch=1, window {cfg.window:,}) and "
        f"{cfg.batched_tasks:,} (default batching, window {cfg.batch_window:,}) per client, {cfg.repeat} run(s); "
        f"3: {cfg.fail_seconds:g} s, kill at {cfg.kill_at:g} s, restart at {cfg.restart_at:g} s, maps of "
        f"{cfg.chunk:,} (item timeout {cfg.item_timeout:g} s)" + (f"; only {', '.join(cfg.only)}" if cfg.only else "")
    )


def leftovers(markers: list[str]) -> list[tuple[int, str]]:
    """Processes started here that are still alive (helper processes, or anything mentioning a swarm's home)."""
    from zlink.demo import processes_mentioning

    left = [(p.pid or 0, f"helper {p.name}") for p in mp.active_children()]
    return left + (processes_mentioning(*markers) if markers else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small counts, under a minute in all")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every figure to FILE")
    ap.add_argument("--only", default="", help=f"comma-separated measurements to run ({', '.join(MEASURES)})")
    d = Settings()
    for name in (
        "nodes", "sim_procs", "queued", "rtt", "warmup", "cpu_seconds", "clients", "node_procs", "slots", "tasks",
        "batched_tasks", "window", "batch_window", "repeat", "fail_seconds", "kill_at", "restart_at", "chunk",
        "item_timeout",
    ):  # fmt: skip
        default = getattr(d, name)
        ap.add_argument(
            "--" + name.replace("_", "-"), type=type(default), default=None,
            help=f"default {default:,} ({QUICK[name]:,} with --quick)" if name in QUICK else f"default {default:,}",
        )  # fmt: skip
    return ap.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    fields = {name: getattr(args, name) for name in Settings.__dataclass_fields__ if name != "only"}
    base = QUICK if args.quick else {}
    values = {k: (v if v is not None else base.get(k, getattr(Settings(), k))) for k, v in fields.items()}
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in only if x not in MEASURES]
    if bad:
        raise SystemExit(f"bench_scale: unknown measurement(s) {bad}; choose from {', '.join(MEASURES)}")
    cfg = Settings(**values, only=only)
    if not 0 < cfg.kill_at < cfg.restart_at < cfg.fail_seconds:
        raise SystemExit("bench_scale: need 0 < --kill-at < --restart-at < --fail-seconds")
    return cfg


def _raise_fd_limit(needed: int) -> None:
    """The broker holds 3 connections per node: raise this process's soft limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_settings(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _raise_fd_limit(4 * cfg.nodes + 1024)
    machine = bench.machine_info()
    cmd = bench.command_line()
    from zlink.errors import ZlinkError

    started = time.monotonic()
    log(f"bench_scale: {settings_text(cfg)}")
    results: dict[str, Any] = {}
    try:
        for name, fn in (("scale", measure_scale), ("brokers", measure_brokers), ("failover", measure_failover)):
            if cfg.runs(name):
                t0 = time.monotonic()
                results[name] = fn(cfg)
                log(f"bench_scale: {name} done in {time.monotonic() - t0:.1f} s")
    except (bench.BenchError, ZlinkError) as exc:
        print(f"bench_scale: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_scale: interrupted (every process it started was stopped)", file=sys.stderr)
        return 130
    total = time.monotonic() - started
    left = leftovers(HOMES)
    lines = report_lines(results, cfg, machine, cmd)
    lines += [
        "",
        "Notes: CPU is utime + stime from /proc/PID/stat (10 ms ticks) as % of one core; RSS is VmRSS. The simulated "
        "nodes are bench.idle_nodes_main (a DEALER that said HELLO with one skill and one slot, a PUB heartbeat "
        "every 0.5 s, a SUB to the beacon, each with its own invited key). The broker counts no heartbeats itself: "
        "the rate is the helpers' beats sent / their time since all their nodes were welcomed, and the max "
        "last_seen in status (after each CPU measurement) shows them arriving. Throughput = all clients' items / "
        "(last client's end - first client's start), clients starting together.",
        f"processes left behind: {len(left)}" + "".join(f"\n  {pid} {what}" for pid, what in left),
        f"total {total:.1f} s",
    ]
    print("\n".join(lines), flush=True)
    if args.json is not None:
        doc = {
            "machine": machine, "command": cmd, "settings": asdict(cfg), "results": results, "total_s": total,
            "homes": HOMES, "left_behind": left,
        }  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    failed = bool(results.get("failover", {}).get("errors"))
    return 2 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
