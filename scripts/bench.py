"""Loopback benchmark: zlink against the raw ZeroMQ floor, Ray, Dask and Celery, in one run, one table.

Every system runs as separate processes on 127.0.0.1, one system up at a
time, with the same shape: a middle process (the raw relay, the zlink broker,
Ray's GCS/raylet, Dask's scheduler, Redis for Celery), W = 2 worker processes
and one client. The raw relay is the floor: a CurveZMQ ROUTER/ROUTER loop
that only routes by id, DEALER echo workers, no heartbeats, no bookkeeping.
zlink runs with CurveZMQ and sealed payloads. The peers come from
``scripts/bench_peers.py`` (installed with ``pip install -e '.[bench]'``);
a peer that cannot run here is reported as skipped, with the reason.

Compared on every system: maps of 10,000 and 100,000 no-op tasks (one task
per item; zlink also with its default adaptive batching), the single-task
round trip p50 and p99, CPU per task, and (peers) the parallel speed-up of
400 x 50 ms tasks on 32 slots. zlink alone, each on a swarm of its own:
failure detection (``kill -9`` to re-dispatch), a broker's CPU and memory with
200 idle nodes, broker memory per queued 100 B task, the memory of a lazy
1,000,000-item map, and sealing's cost at 100 B to 1 MiB payloads.

    python scripts/bench.py --quick               # smoke test, about a minute without peers
    python scripts/bench.py --write-docs          # the full run; table into docs/benchmarks.md, chart into docs/img/
    python scripts/bench.py --peers none --only map,round_trip
    python scripts/bench.py --repeat 3 --json /tmp/bench.json --markdown /tmp/bench.md

Each measurement is one function returning a dict; the printed table is built
from :func:`make_rows`, so a new figure is a new measurement plus a row or two.
Every wait is bounded in time and every process started is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import zmq

from zlink._zmqio import recv_frames, send_frames  # the floor sends and receives as zlink does

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SKILLS_FILE = HERE / "bench_skills.py"
PAYLOAD_SIZE = 20  # bytes of request body in the raw relay (a msgpack'd small int in zlink is smaller)
HWM = 100_000  # same order as zlink's DEALER/ROUTER high-water marks
STALL_S = 15.0  # no progress for this long fails a measurement
PEER_NAMES = ("ray", "dask", "celery")  # the peers of scripts/bench_peers.py, in the order they run
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A measurement could not finish (stalled, timed out, wrong results)."""


# =========================================================================== helpers


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (0.0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuMeter:
    """CPU seconds used by the middle process, the workers and this process during a block."""

    def __init__(self, relay_pid: int, worker_pids: list[int]) -> None:
        self.relay_pid = relay_pid
        self.worker_pids = worker_pids
        self.relay = self.workers = self.client = 0.0

    def __enter__(self) -> CpuMeter:
        self._r = proc_cpu_seconds(self.relay_pid)
        self._w = sum(proc_cpu_seconds(p) for p in self.worker_pids)
        self._c = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.relay = proc_cpu_seconds(self.relay_pid) - self._r
        self.workers = sum(proc_cpu_seconds(p) for p in self.worker_pids) - self._w
        self.client = time.process_time() - self._c

    def per_task_us(self, n: int) -> dict[str, float]:
        return {
            "relay_cpu_us_per_task": self.relay / n * 1e6,
            "worker_cpu_us_per_task": self.workers / n * 1e6,
            "client_cpu_us_per_task": self.client / n * 1e6,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(samples_s: list[float]) -> dict[str, float]:
    s = sorted(x * 1000 for x in samples_s)
    return {
        "p50_ms": percentile(s, 50),
        "p90_ms": percentile(s, 90),
        "p99_ms": percentile(s, 99),
        "mean_ms": statistics.fmean(s),
        "max_ms": s[-1],
        "count": len(s),
    }


def stop_processes(procs: list[Any], grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds in total, then SIGKILL. Works for Popen and mp.Process."""
    for p in procs:
        with contextlib.suppress(Exception):
            if p.is_alive() if hasattr(p, "is_alive") else p.poll() is None:
                p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        left = max(0.1, deadline - time.monotonic())
        if hasattr(p, "is_alive"):
            p.join(left)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        else:
            try:
                p.wait(left)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(2.0)


@contextlib.contextmanager
def watchdog(seconds: float, on_expiry: Callable[[], None]) -> Iterator[threading.Event]:
    """Call ``on_expiry`` from a timer thread if the block is still running after ``seconds``.

    On leaving the block the timer thread is joined, so ``on_expiry`` (e.g. a
    ``Client.close()``) never runs at the same time as the caller's cleanup.
    """
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        on_expiry()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
        timer.join(30.0)


# =========================================================================== the raw relay (the floor)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; only the parent handles it and cleans up
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _curve_server(sock: zmq.Socket[Any], public: bytes, secret: bytes) -> None:
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def _curve_client(sock: zmq.Socket[Any], server_public: bytes) -> None:
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def _tune(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)


def raw_relay_main(public: bytes, secret: bytes, workers_expected: int, ctrl: Any) -> None:
    """The floor: two CURVE-server ROUTERs, requests round-robin to workers, replies by routing id."""
    _ignore_sigint()
    parent = os.getppid()
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)  # clients
    back = ctx.socket(zmq.ROUTER)  # workers
    for s in (front, back):
        _tune(s)
        _curve_server(s, public, secret)
        s.bind("tcp://127.0.0.1:*")
    ctrl.send(("ports", front.getsockopt_string(zmq.LAST_ENDPOINT), back.getsockopt_string(zmq.LAST_ENDPOINT)))
    workers: list[bytes] = []
    waiting: deque[list[bytes]] = deque()  # requests that came before any worker (not expected)
    rr = 0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        events = dict(poller.poll(1000))
        if not events:
            if os.getppid() != parent:
                break  # orphaned: the bench process is gone
            continue
        if back in events:
            for _ in range(1000):
                try:
                    frames = recv_frames(back)
                except zmq.Again:
                    break
                if len(frames) == 2 and frames[1].bytes == b"READY":
                    workers.append(frames[0].bytes)
                    if len(workers) == workers_expected:
                        ctrl.send(("ready", len(workers)))
                    while waiting:
                        send_frames(back, [workers[rr % len(workers)], *waiting.popleft()])
                        rr += 1
                    continue
                send_frames(front, frames[1:])  # [client id, body] back to the client
        if front in events:
            for _ in range(1000):
                try:
                    frames = recv_frames(front)
                except zmq.Again:
                    break
                if not workers:
                    waiting.append(frames)
                    continue
                send_frames(back, [workers[rr % len(workers)], *frames])
                rr += 1
    ctx.destroy(linger=0)


def raw_worker_main(endpoint: str, server_public: bytes) -> None:
    """A DEALER that echoes every request ([client id, body]) back to the relay."""
    _ignore_sigint()
    parent = os.getppid()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    _tune(sock)
    _curve_client(sock, server_public)
    sock.connect(endpoint)
    sock.send(b"READY")
    while True:
        if not sock.poll(1000):
            if os.getppid() != parent:
                break
            continue
        for _ in range(1000):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            send_frames(sock, frames)
    ctx.destroy(linger=0)


_S = TypeVar("_S", bound="_System")


class _System(ABC):
    """A system under test: started on ``with`` entry (cleaned up if that fails), closed on exit."""

    relay_pid: int
    worker_pids: list[int]

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self: _S) -> _S:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cpu_meter(self) -> CpuMeter:
        """CPU of the relay (or broker) process and the worker (or node) processes."""
        return CpuMeter(self.relay_pid, self.worker_pids)


class RawRelay(_System):
    """A raw relay process, ``workers`` echo worker processes and a DEALER client in this process."""

    name = "raw relay"

    def __init__(self, workers: int = 2, start_timeout: float = 20.0) -> None:
        self.n_workers = workers
        self.start_timeout = start_timeout
        self.procs: list[Any] = []
        self.ctx: zmq.Context[Any] | None = None
        self.sock: zmq.Socket[Any] | None = None
        self.relay_pid = 0
        self.worker_pids: list[int] = []
        self._seq = 0
        #: the figures of the last throughput run on this system (the batched map reuses them)
        self.throughput: dict[str, float] | None = None

    def _start(self) -> None:
        mpc = mp.get_context("spawn")
        public, secret = zmq.curve_keypair()
        recv_end, send_end = mpc.Pipe(duplex=False)
        relay = mpc.Process(target=raw_relay_main, args=(public, secret, self.n_workers, send_end), daemon=True)
        relay.start()
        self.procs.append(relay)
        self.relay_pid = relay.pid or 0
        msg = self._ctrl(recv_end, relay)
        front, back = msg[1], msg[2]
        for _ in range(self.n_workers):
            w = mpc.Process(target=raw_worker_main, args=(back, public), daemon=True)
            w.start()
            self.procs.append(w)
            self.worker_pids.append(w.pid or 0)
        self._ctrl(recv_end, relay)  # ("ready", n): every worker is registered
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        _tune(self.sock)
        _curve_client(self.sock, public)
        self.sock.connect(front)

    def _ctrl(self, conn: Any, relay: Any) -> Any:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if conn.poll(0.1):
                return conn.recv()
            if not relay.is_alive():
                raise BenchError(f"the raw relay exited at start (code {relay.exitcode})")
            for p in self.procs[1:]:
                if not p.is_alive():
                    raise BenchError(f"a raw worker exited at start (code {p.exitcode})")
        raise BenchError("the raw relay did not start in time")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        stop_processes(self.procs)
        self.procs.clear()

    # ------------------------------------------------------------------ operations

    def _body(self, i: int) -> bytes:
        return i.to_bytes(8, "big") + b"x" * (PAYLOAD_SIZE - 8)

    def pipelined(self, n: int, window: int, budget: float) -> None:
        """Send ``n`` requests keeping up to ``window`` in flight; receive every reply."""
        sock = self.sock
        assert sock is not None
        body = self._body
        sent = received = 0
        deadline = time.monotonic() + budget
        last_progress = time.monotonic()
        while received < n:
            while sent < n and sent - received < window:
                sock.send(body(sent))
                sent += 1
            if not sock.poll(1000):
                now = time.monotonic()
                if now > deadline or now - last_progress > STALL_S:
                    raise BenchError(f"raw relay stalled: {received:,}/{n:,} replies")
                continue
            for _ in range(window):
                try:
                    sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                received += 1
            last_progress = time.monotonic()
            if last_progress > deadline:
                raise BenchError(f"raw relay over its time budget: {received:,}/{n:,} replies")

    def round_trips(self, n: int, budget: float) -> list[float]:
        """``n`` sequential request/reply round trips; returns each one's seconds."""
        sock = self.sock
        assert sock is not None
        out: list[float] = []
        deadline = time.monotonic() + budget
        for _ in range(n):
            self._seq += 1
            req = self._body(self._seq)
            t0 = time.perf_counter()
            sock.send(req)
            if not sock.poll(STALL_S * 1000):
                raise BenchError("raw relay: no reply within the stall limit")
            rep = sock.recv()
            out.append(time.perf_counter() - t0)
            if rep != req:
                raise BenchError("raw relay: reply does not match the request")
            if time.monotonic() > deadline:
                raise BenchError(f"raw relay round trips over their time budget ({len(out):,}/{n:,})")
        return out


# =========================================================================== zlink


class ZlinkSwarm(_System):
    """``LocalSwarm``: the CLI broker, ``workers`` CLI nodes on bench_skills.py, a Client in this process."""

    name = "zlink"

    def __init__(
        self,
        workers: int = 2,
        slots: int = 4,
        prefetch: int | None = None,
        start_timeout: float = 30.0,
        seal: bool = True,
    ) -> None:
        self.seal = seal
        self.n_workers = workers
        self.slots = slots
        self.prefetch = prefetch
        self.start_timeout = start_timeout
        self.swarm: Any = None
        self.client: Any = None
        self.relay_pid = 0
        self.worker_pids: list[int] = []
        self.throughput: dict[str, float] | None = None

    def _start(self) -> None:
        from zlink import Client
        from zlink.demo import LocalSwarm

        self.swarm = LocalSwarm(seal=self.seal)
        self.swarm.start_broker(timeout=self.start_timeout)
        self.relay_pid = self.swarm.broker.pid
        for i in range(self.n_workers):
            p = self.swarm.start_node(
                str(SKILLS_FILE), slots=self.slots, prefetch=self.prefetch, name=f"bench-node-{i + 1}"
            )
            self.worker_pids.append(p.pid)
        self.client = Client(self.swarm.invite("client", "bench-client"), connect_timeout=self.start_timeout)
        self.swarm.wait_nodes(self.client, self.n_workers, timeout=self.start_timeout)

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
                self.client = None
        finally:
            if self.swarm is not None:
                self.swarm.close()
                self.swarm = None

    def _guard(self, budget: float) -> contextlib.AbstractContextManager[threading.Event]:
        # closing the client fails every pending future with ClosedError: nothing can block past the budget
        client = self.client
        return watchdog(budget, lambda: client.close(timeout=2.0))

    # ------------------------------------------------------------------ operations

    def pipelined(self, n: int, window: int, budget: float) -> None:
        with self._guard(budget) as fired:
            try:
                # batch=1: one task per item, the per-task path (the batched row measures batches)
                got = list(self.client.map("noop", range(n), window=window, batch=1))
            except Exception as exc:
                if fired.is_set():
                    raise BenchError(f"zlink map over its time budget of {budget:g} s") from exc
                raise
        if len(got) != n or got[0] != 0 or got[-1] != n - 1:
            raise BenchError("zlink map returned wrong results")

    def batched(self, n: int, window: int, budget: float) -> None:
        """``client.map`` of ``n`` no-op tasks with ``window`` in flight, consumed (and checked) as they come."""
        with self._guard(budget) as fired:
            try:
                check_map(self.client.map("noop", range(n), window=window), n)
            except Exception as exc:
                if fired.is_set():
                    raise BenchError(f"zlink map over its time budget of {budget:g} s") from exc
                raise

    def round_trips(self, n: int, budget: float) -> list[float]:
        client = self.client
        out: list[float] = []
        deadline = time.monotonic() + budget
        for i in range(n):
            t0 = time.perf_counter()
            try:
                value = client.submit("noop", i).result(timeout=STALL_S)
            except TimeoutError:
                raise BenchError(f"zlink: no result within {STALL_S:g} s") from None
            out.append(time.perf_counter() - t0)
            if value != i:
                raise BenchError("zlink: result does not match the argument")
            if time.monotonic() > deadline:
                raise BenchError(f"zlink round trips over their time budget ({len(out):,}/{n:,})")
        return out


System = RawRelay | ZlinkSwarm


# =========================================================================== zlink alone: failure detection

FAILOVER_SKILLS = HERE / "bench_failover_skills.py"
FD_NODES = 3  # nodes in the failure-detection swarm: all but one run a long task, one is free to take it over
HOLD_S = 3600.0  # how long a held task would run if nobody cancelled it
HEARTBEAT_S = 0.5  # zlink's default heartbeat interval (the broker runs with its defaults)
POLL_S = 0.02  # how often the failure-detection loop reads the start log and asks the broker for its status


class StartLog:
    """Reads ``start <tag> <pid> <monotonic>`` lines as the ``hold`` skill appends them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[tuple[str, int, float]]:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # an incomplete last line waits for its end
        out = []
        for line in lines:
            parts = line.decode("ascii", "replace").split()
            if len(parts) == 4 and parts[0] == "start":
                out.append((parts[1], int(parts[2]), float(parts[3])))
        return out


def measure_failure_detection(cfg: Settings) -> dict[str, Any]:
    """Seconds from ``kill -9`` of a node to its running task starting again on another node.

    A ``zlink broker`` with default heartbeat settings and :data:`FD_NODES`
    ``zlink node`` processes (1 slot, no prefetch) serving
    ``scripts/bench_failover_skills.py``; all but one node run a long ``hold``
    task. Each round SIGKILLs the node running one of the tasks (after a random
    pause, so the kill falls anywhere in its heartbeat cycle), then reads the
    log the skill appends to for the next start of that task on another pid:
    both times are CLOCK_MONOTONIC, shared by every process, so the figure is
    the kill-to-re-dispatch time to well under a millisecond. The status
    figure is when ``client.status()``, asked every 20 ms, first no longer
    lists the node (an upper bound within 20 ms plus one status round trip).
    A replacement node is started after each round and the next kill waits
    until it has joined.
    """
    import random
    import shutil
    import tempfile

    from zlink import Client
    from zlink.demo import LocalSwarm

    busy = FD_NODES - 1
    tmp = Path(tempfile.mkdtemp(prefix="zlink-bench-fd-"))
    log_path = tmp / "starts.log"
    log_path.write_bytes(b"")
    swarm = LocalSwarm()
    client: Any = None
    nodes: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}  # pid -> (name, process) of live node processes
    made = 0
    rng = random.Random()

    def add_node() -> None:
        nonlocal made
        made += 1
        name = f"fd-node-{made}"
        proc = swarm.start_node(str(FAILOVER_SKILLS), slots=1, prefetch=0, name=name)
        nodes[proc.pid] = (name, proc)

    def wait_listed(count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(client.status(timeout=5.0)["nodes"]) == count:
                return
            for name, proc in nodes.values():
                if proc.poll() is not None:
                    raise BenchError(f"failure detection: node {name} exited (code {proc.returncode})")
            time.sleep(0.05)
        raise BenchError(f"failure detection: the broker did not list {count} nodes within {timeout:g} s")

    try:
        swarm.start_broker(timeout=20.0)
        for _ in range(FD_NODES):
            add_node()
        client = Client(swarm.invite("client", "bench-fd-client"), connect_timeout=20.0)
        wait_listed(FD_NODES)
        futures = [client.submit("hold", f"task-{i}", HOLD_S, str(log_path), max_attempts=100) for i in range(busy)]
        tail = StartLog(log_path)
        running: dict[str, int] = {}  # task tag -> pid of the node running it
        deadline = time.monotonic() + 20.0
        while len(running) < busy:
            for tag, pid, _ in tail.read():
                running[tag] = pid
            if time.monotonic() > deadline:
                raise BenchError("failure detection: the long tasks did not start within 20 s")
            time.sleep(POLL_S)
        redispatch: list[float] = []
        declared: list[float] = []
        for k in range(cfg.kills):
            tag = f"task-{k % busy}"
            pid = running[tag]
            name, proc = nodes.pop(pid)
            time.sleep(rng.uniform(0.0, HEARTBEAT_S))  # a random phase against the victim's heartbeats
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            t_start: float | None = None
            t_gone: float | None = None
            limit = t_kill + STALL_S
            while t_start is None or t_gone is None:
                for seen_tag, seen_pid, t in tail.read():
                    running[seen_tag] = seen_pid
                    if seen_tag == tag and seen_pid != pid and t_start is None:
                        t_start = t
                if t_gone is None and all(n["name"] != name for n in client.status(timeout=5.0)["nodes"]):
                    t_gone = time.monotonic()
                if time.monotonic() > limit:
                    raise BenchError(
                        f"failure detection: {tag} was not re-dispatched within {STALL_S:g} s of killing {name}"
                    )
                time.sleep(POLL_S)
            proc.wait(5.0)
            redispatch.append(t_start - t_kill)
            declared.append(t_gone - t_kill)
            add_node()
            wait_listed(FD_NODES)
        for fut in futures:
            fut.cancel()
    finally:
        try:
            if client is not None:
                client.close()  # BYE: the broker cancels the held tasks, so the nodes stop at once
        finally:
            swarm.close()
            shutil.rmtree(tmp, ignore_errors=True)
    r = sorted(redispatch)
    d = sorted(declared)
    return {
        "median_s": statistics.median(r),
        "p90_s": percentile(r, 90),
        "max_s": r[-1],
        "min_s": r[0],
        "status_median_s": statistics.median(d),
        "status_max_s": d[-1],
        "kills": len(r),
        "samples_s": [round(x, 6) for x in r],
    }


# =========================================================================== zlink alone: a broker with idle nodes


SETTLE_S = 2.0  # idle broker: every node listed and no death for this long before the CPU is measured


def proc_rss_kib(pid: int) -> float:
    """Resident set size of a live process in KiB, from /proc (NaN if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return math.nan


def cpu_percent(pid: int, seconds: float) -> float:
    """CPU a process uses over ``seconds`` of wall time, as a percentage of one core."""
    c0, t0 = proc_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (proc_cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100


ThreadTimes = dict[int, tuple[str, float, int]]


def thread_times(pid: int) -> ThreadTimes:
    """Per thread of a live process: (name, CPU seconds, voluntary context switches = wake-ups from a wait)."""
    out: ThreadTimes = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                base = f"/proc/{pid}/task/{tid}"
                with open(f"{base}/comm") as fh:
                    name = fh.read().strip()
                with open(f"{base}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                switches = 0
                with open(f"{base}/status") as fh:
                    for line in fh:
                        if line.startswith("voluntary_ctxt_switches:"):
                            switches = int(line.split()[1])
                out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK, switches)
            except (OSError, IndexError, ValueError):
                continue
    return out


def thread_split(before: ThreadTimes, after: ThreadTimes, wall: float) -> tuple[float, float, float]:
    """(% of a core in libzmq's threads, % in the Python threads, wake-ups/s of the Python threads) between reads."""
    zmq_cpu = py_cpu = 0.0
    py_wakeups = 0
    for tid, (name, cpu, switches) in after.items():
        _, cpu0, switches0 = before.get(tid, (name, 0.0, 0))
        if name.startswith("ZMQbg"):
            zmq_cpu += cpu - cpu0
        else:
            py_cpu += cpu - cpu0
            py_wakeups += switches - switches0
    return zmq_cpu / wall * 100, py_cpu / wall * 100, py_wakeups / wall


def idle_nodes_main(endpoint: str, broker_key: str, keys: list[tuple[str, str, str]], beacon: bool, ctrl: Any) -> None:
    """Simulated idle nodes in one process, each with its own key and connections.

    Each one is what a real idle node shows the broker: a CurveZMQ DEALER that
    says HELLO (role node, one skill, one slot), a PUB that sends a HEARTBEAT
    every interval once WELCOMEd (first beats spread evenly over one interval),
    and, with ``beacon``, a SUB to the broker's beacon. No thread per node, no
    work: one poll loop for all. Answers "hello-first" with a new HELLO, like a
    real node. Reports ("welcomed", n) once all are in; on "stop" it replies
    with its counters and exits.
    """
    import heapq
    import random

    from zlink import protocol as P

    _ignore_sigint()
    parent = os.getppid()
    host = endpoint.rsplit(":", 1)[0]
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = max(1024, 3 * len(keys) + 16)
    rng = random.Random()

    def secure(sock: zmq.Socket[Any], public: str, secret: str) -> zmq.Socket[Any]:
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = broker_key.encode("ascii")
        sock.curve_publickey = public.encode("ascii")
        sock.curve_secretkey = secret.encode("ascii")
        return sock

    poller = zmq.Poller()
    ctrl_fd = ctrl.fileno()
    poller.register(ctrl_fd, zmq.POLLIN)
    dealers: dict[zmq.Socket[Any], int] = {}
    subs: set[zmq.Socket[Any]] = set()
    hellos: list[bytes] = []
    sessions: list[bytes] = []
    beats: list[bytes | None] = [None] * len(keys)
    pubs: list[zmq.Socket[Any] | None] = [None] * len(keys)
    socks: list[zmq.Socket[Any]] = []
    for i, (name, public, secret) in enumerate(keys):
        d = secure(ctx.socket(zmq.DEALER), public, secret)
        d.connect(endpoint)
        sessions.append(os.urandom(8))
        hello = P.encode(
            P.Hello(
                name=name, role="node", session=sessions[i], skills={"idle": {"description": "never called"}},
                slots=1, prefetch=0, agent="zlink-bench-idle",
            )
        )  # fmt: skip
        d.send(hello)
        hellos.append(hello)
        dealers[d] = i
        socks.append(d)
        poller.register(d, zmq.POLLIN)
    interval = 0.5
    due: list[tuple[float, int]] = []  # (when, node) heap of heartbeats to send
    counts = {"welcomed": 0, "beats": 0, "beacons": 0, "rehellos": 0, "dropped": 0, "other": 0}
    reported = False
    next_parent_check = time.monotonic() + 1.0
    try:
        while True:
            now = time.monotonic()
            timeout = min(1.0, max(0.0, due[0][0] - now)) if due else 1.0
            events = dict(poller.poll(math.ceil(timeout * 1000)))
            if ctrl_fd in events and ctrl.poll() and ctrl.recv() == "stop":
                break
            for sock in events:
                if sock in dealers:
                    i = dealers[sock]
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        msg = P.decode(frames[0], len(frames) - 1)
                        if type(msg) is P.Welcome:
                            interval = msg.heartbeat_interval
                            beats[i] = P.encode(P.Heartbeat(session=sessions[i], epoch=msg.epoch, free=1))
                            if pubs[i] is None:
                                _, public, secret = keys[i]
                                pub = secure(ctx.socket(zmq.PUB), public, secret)
                                pub.setsockopt(zmq.SNDHWM, 10)
                                pub.connect(f"{host}:{msg.heartbeat_port}")
                                pubs[i] = pub
                                socks.append(pub)
                                if beacon:
                                    sub = secure(ctx.socket(zmq.SUB), public, secret)
                                    sub.setsockopt(zmq.SUBSCRIBE, b"")
                                    sub.connect(f"{host}:{msg.beacon_port}")
                                    subs.add(sub)
                                    socks.append(sub)
                                    poller.register(sub, zmq.POLLIN)
                                heapq.heappush(due, (time.monotonic() + rng.uniform(0.0, interval), i))
                                counts["welcomed"] += 1
                        elif type(msg) is P.Error and msg.code == "hello-first":
                            sock.send(hellos[i])
                            counts["rehellos"] += 1
                        else:
                            counts["other"] += 1
                elif sock in subs:
                    while True:
                        try:
                            sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        counts["beacons"] += 1
            now = time.monotonic()
            while due and due[0][0] <= now:
                when, i = heapq.heappop(due)
                pub, beat = pubs[i], beats[i]
                if pub is not None and beat is not None:
                    try:
                        pub.send(beat, zmq.NOBLOCK)
                        counts["beats"] += 1
                    except zmq.Again:
                        counts["dropped"] += 1
                heapq.heappush(due, (when + interval if when + interval > now else now + interval, i))
            if not reported and counts["welcomed"] == len(keys):
                ctrl.send(("welcomed", counts["welcomed"]))
                reported = True
            if now >= next_parent_check:
                next_parent_check = now + 1.0
                if os.getppid() != parent:
                    return  # orphaned: the bench process is gone
        ctrl.send(("stopped", counts))
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


def measure_idle_broker(cfg: Settings) -> dict[str, float]:
    """The broker's CPU and memory with no nodes, then with ``cfg.idle_nodes`` idle ones.

    A ``zlink broker`` (default heartbeats: 0.5 s x 3) started by LocalSwarm
    and one connected client. First its CPU over half the measuring time and
    its RSS with no node; then ``cfg.idle_nodes`` keys are invited (one per
    node, as ``zlink invite`` would) and simulated by :func:`idle_nodes_main`
    in ``cfg.idle_procs`` helper processes. Once ``client.status()`` lists
    them all and neither that nor the count of dead nodes changed for
    :data:`SETTLE_S`, the broker's CPU (utime + stime from /proc, in all and
    per thread) is measured over ``cfg.idle_seconds``, then its RSS; the
    status must then still list every node and count no new death.
    """
    from zlink import Client
    from zlink.demo import LocalSwarm
    from zlink.security import BrokerHome

    n = cfg.idle_nodes
    swarm = LocalSwarm()
    client: Any = None
    helpers: list[Any] = []
    conns: list[Any] = []
    try:
        swarm.start_broker(timeout=20.0)
        assert swarm.broker is not None
        pid = swarm.broker.pid
        client = Client(swarm.invite("client", "bench-idle-client"), connect_timeout=20.0)
        client.status()
        time.sleep(1.0)  # past the start-up work
        cpu_empty = cpu_percent(pid, cfg.idle_seconds / 2)
        rss_empty = proc_rss_kib(pid)
        home = BrokerHome(swarm.home)
        joins = [home.invite(name=f"idle-node-{i + 1}", role="node", endpoints=[swarm.endpoint]) for i in range(n)]
        keys = [(j.name, j.keys.public, j.keys.secret or "") for j in joins]
        mpc = mp.get_context("spawn")
        procs = max(1, min(cfg.idle_procs, n))
        t_join = time.monotonic()
        for k in range(procs):
            parent_end, child_end = mpc.Pipe()
            args = (swarm.endpoint, joins[0].broker_key, keys[k::procs], True, child_end)
            h = mpc.Process(target=idle_nodes_main, args=args, daemon=True)
            h.start()
            helpers.append(h)
            conns.append(parent_end)
        deadline = time.monotonic() + 60.0
        waiting = set(range(procs))
        while waiting:
            for k in list(waiting):
                if conns[k].poll(0.05):
                    conns[k].recv()
                    waiting.discard(k)
                elif not helpers[k].is_alive():
                    raise BenchError(f"an idle-node helper exited at start (code {helpers[k].exitcode})")
            if time.monotonic() > deadline:
                raise BenchError(f"idle nodes: {procs - len(waiting)}/{procs} helpers had all their nodes welcomed")
        join_s = math.nan
        last: tuple[int, int] = (-1, -1)
        changed = time.monotonic()
        while True:  # until every node is listed and nothing changed (no death) for SETTLE_S
            st = client.status()
            now = time.monotonic()
            listed, deaths = len(st["nodes"]), st["counters"]["nodes_died"]
            if listed == n and math.isnan(join_s):
                join_s = now - t_join
            if (listed, deaths) != last:
                last, changed = (listed, deaths), now
            elif listed == n and now - changed >= SETTLE_S:
                break
            if now > deadline:
                raise BenchError(f"idle nodes: not settled after 60 s: {listed}/{n} nodes listed, {deaths} deaths")
            time.sleep(0.1)
        before = st
        sims = [h.pid or 0 for h in helpers]
        sim_c0 = sum(proc_cpu_seconds(p) for p in sims)
        threads0 = thread_times(pid)
        t0 = time.monotonic()
        cpu_idle = cpu_percent(pid, cfg.idle_seconds)
        wall = time.monotonic() - t0
        zmq_cpu, py_cpu, py_wakeups = thread_split(threads0, thread_times(pid), wall)
        sim_cpu = (sum(proc_cpu_seconds(p) for p in sims) - sim_c0) / wall * 100
        rss_idle = proc_rss_kib(pid)
        after = client.status()
        died = after["counters"]["nodes_died"] - before["counters"]["nodes_died"]
        if len(after["nodes"]) != n or died:
            raise BenchError(f"idle nodes: {len(after['nodes'])}/{n} listed after the measurement, {died} died")
        worst_silence = max(node["last_seen"] for node in after["nodes"])
        stats: dict[str, int] = {}
        for conn in conns:
            conn.send("stop")
        for conn in conns:
            if conn.poll(5.0):
                _, c = conn.recv()
                for key, v in c.items():
                    stats[key] = stats.get(key, 0) + v
    finally:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        stop_processes(helpers)
        try:
            if client is not None:
                client.close()
        finally:
            swarm.close()
    return {
        "nodes": n,
        "cpu_pct": cpu_idle,
        "cpu_pct_empty": cpu_empty,
        "rss_mib_empty": rss_empty / 1024,
        "rss_mib": rss_idle / 1024,
        "kib_per_node": (rss_idle - rss_empty) / n,
        "cpu_us_per_node_s": cpu_idle / 100 / n * 1e6,
        "cpu_pct_python": py_cpu,
        "cpu_pct_libzmq": zmq_cpu,
        "python_wakeups_per_s": py_wakeups,
        "cpu_us_per_wakeup": py_cpu / 100 / py_wakeups * 1e6 if py_wakeups else math.nan,
        "join_s": join_s,
        "join_deaths": before["counters"]["nodes_died"],
        "worst_silence_s": worst_silence,
        "sim_cpu_pct": sim_cpu,
        "sim_rehellos": stats.get("rehellos", 0),
        "sim_dropped_beats": stats.get("dropped", 0),
        "seconds": cfg.idle_seconds,
    }


# =========================================================================== zlink alone: the parallel API

PAR_NODES = 4  # parallel speed-up: node processes...
PAR_SLOTS = 8  # ...with this many slots each
PAR_WAIT_S = 0.05  # what the ``wait50`` skill sleeps
MEM_SAMPLE_S = 0.5  # lazy map memory: how often RSS is sampled
MB = 1e6  # memory figures are in MB (10^6 bytes), as the target is stated


def check_map(results: Iterator[Any], n: int, progress: list[int] | None = None) -> None:
    """Consume an ordered ``map`` over ``range(n)`` of an identity skill, checking every result as it comes.

    Nothing is kept: memory stays what the map itself holds. ``progress[0]``, if
    given, counts the results (another thread watches it for stalls).
    """
    count = 0
    for value in results:
        if value != count:
            raise BenchError(f"zlink map: result {count:,} is {value!r}")
        count += 1
        if progress is not None:
            progress[0] = count
    if count != n:
        raise BenchError(f"zlink map: {count:,} results for {n:,} tasks")


def ints(n: int) -> Iterator[int]:
    """A generator of ``n`` small ints: the map cannot know its length or hold it all."""
    yield from range(n)


def measure_parallel_speedup(cfg: Settings) -> dict[str, Any]:
    """Wall time of ``cfg.par_tasks`` 50 ms tasks on :data:`PAR_NODES` nodes x :data:`PAR_SLOTS` slots.

    A ``zlink broker`` and :data:`PAR_NODES` ``zlink node`` processes started
    with ``--slots 8`` (default prefetch) by LocalSwarm, serving ``wait50``
    (``time.sleep(0.05)``). A warm-up ``map`` of two waves (64 tasks) starts
    every slot's thread and gives the broker each node's rate; then one
    ``client.map("wait50", range(n))`` (default window 1,000: every task is
    in flight at once) is timed to its last result. The ideal is
    ``n * 0.05 / 32`` s; with 400 tasks that is 12.5 waves, so even a perfect
    scheduler needs 13 waves (1.04x the ideal).
    """
    from zlink import Client
    from zlink.demo import LocalSwarm

    n = cfg.par_tasks
    slots = PAR_NODES * PAR_SLOTS
    ideal = n * PAR_WAIT_S / slots
    swarm = LocalSwarm()
    client: Any = None
    try:
        swarm.start_broker(timeout=20.0)
        for i in range(PAR_NODES):
            swarm.start_node(str(SKILLS_FILE), slots=PAR_SLOTS, name=f"par-node-{i + 1}")
        client = Client(swarm.invite("client", "bench-par-client"), connect_timeout=20.0)
        swarm.wait_nodes(client, PAR_NODES, timeout=20.0)
        with watchdog(cfg.budget, lambda: client.close(timeout=2.0)) as fired:
            try:
                t0 = time.perf_counter()
                check_map(client.map("wait50", range(2 * slots)), 2 * slots)
                warmup = time.perf_counter() - t0
                before = {node["name"]: node["done"] for node in client.status()["nodes"]}
                t0 = time.perf_counter()
                check_map(client.map("wait50", range(n)), n)
                wall = time.perf_counter() - t0
            except Exception as exc:
                if fired.is_set():
                    raise BenchError(f"parallel speed-up over its time budget of {cfg.budget:g} s") from exc
                raise
        per_node = sorted(node["done"] - before.get(node["name"], 0) for node in client.status()["nodes"])
    finally:
        try:
            if client is not None:
                client.close()
        finally:
            swarm.close()
    return {
        "wall_s": wall,
        "ideal_s": ideal,
        "ratio": wall / ideal,
        "waves_floor_s": math.ceil(n / slots) * PAR_WAIT_S,
        "speedup": n * PAR_WAIT_S / wall,
        "tasks": n,
        "slots": slots,
        "warmup_s": warmup,
        "per_node_min": per_node[0],
        "per_node_max": per_node[-1],
    }


class RssSampler:
    """Peak VmRSS of some processes, sampled every :data:`MEM_SAMPLE_S` in a thread.

    It also watches a progress counter and calls ``on_stall`` if it did not move
    for :data:`STALL_S` seconds.
    """

    def __init__(self, pids: dict[str, int], progress: list[int], on_stall: Callable[[], None]) -> None:
        self.pids = pids
        self.base = {name: proc_rss_kib(pid) for name, pid in pids.items()}
        self.peak = dict(self.base)
        self.samples: list[tuple[float, ...]] = []
        self.progress = progress
        self.on_stall = on_stall
        self.stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def sample(self) -> None:
        row = [round(time.monotonic() - self._t0, 2)]
        for name, pid in self.pids.items():
            kib = proc_rss_kib(pid)
            if not math.isnan(kib):
                self.peak[name] = max(self.peak[name], kib)
            row.append(round(kib * 1024 / MB, 1))
        self.samples.append(tuple(row))

    def _run(self) -> None:
        seen, moved = -1, time.monotonic()
        while not self._stop.wait(MEM_SAMPLE_S):
            self.sample()
            now = time.monotonic()
            if self.progress[0] != seen:
                seen, moved = self.progress[0], now
            elif now - moved > STALL_S and not self.stalled:
                self.stalled = True
                self.on_stall()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30.0)
        self.sample()

    def growth_mb(self, name: str) -> float:
        return (self.peak[name] - self.base[name]) * 1024 / MB


def measure_map_memory(cfg: Settings) -> dict[str, Any]:
    """RSS growth of the client (this process) and the broker over a lazy ``map`` of ``cfg.mem_items`` items.

    A swarm of its own (a ``zlink broker`` and ``cfg.workers`` ``zlink node``
    processes with the bench's slots and prefetch) so the broker starts from
    its idle footprint. After a warm-up map (5,000 tasks) and a
    ``gc.collect()``, the VmRSS of this process, the broker and the nodes is
    read from /proc/PID/status, then sampled every 0.5 s in a thread while
    ``client.map("noop", ints(n))`` (a generator, the default window of 1,000,
    ordered) is consumed and checked item by item, keeping nothing; growth is
    the peak (the last sample after the map included) minus the value before.
    """
    import gc

    from zlink import Client
    from zlink.demo import LocalSwarm

    n = cfg.mem_items
    swarm = LocalSwarm()
    client: Any = None
    try:
        swarm.start_broker(timeout=20.0)
        assert swarm.broker is not None
        nodes = [
            swarm.start_node(str(SKILLS_FILE), slots=cfg.slots, prefetch=cfg.prefetch, name=f"mem-node-{i + 1}")
            for i in range(cfg.workers)
        ]  # fmt: skip
        client = Client(swarm.invite("client", "bench-mem-client"), connect_timeout=20.0)
        swarm.wait_nodes(client, cfg.workers, timeout=20.0)
        check_map(client.map("noop", ints(5000)), 5000)
        gc.collect()
        pids = {"client": os.getpid(), "broker": swarm.broker.pid}
        pids.update({f"node-{i + 1}": p.pid for i, p in enumerate(nodes)})
        progress = [0]
        budget = max(cfg.budget, n / 2000)  # at least 2,000 tasks/s
        with (
            watchdog(budget, lambda: client.close(timeout=2.0)) as fired,
            RssSampler(pids, progress, lambda: client.close(timeout=2.0)) as rss,
        ):
            try:
                t0 = time.perf_counter()
                check_map(client.map("noop", ints(n)), n, progress)
                wall = time.perf_counter() - t0
            except Exception as exc:
                if rss.stalled:
                    raise BenchError(f"lazy map: no result for {STALL_S:g} s after {progress[0]:,}/{n:,}") from exc
                if fired.is_set():
                    raise BenchError(f"lazy map over its time budget of {budget:g} s ({progress[0]:,}/{n:,})") from exc
                raise
    finally:
        try:
            if client is not None:
                client.close()
        finally:
            swarm.close()
    node_names = [name for name in pids if name.startswith("node-")]
    return {
        "items": n,
        "seconds": wall,
        "tasks_per_s": n / wall,
        "client_growth_mb": rss.growth_mb("client"),
        "broker_growth_mb": rss.growth_mb("broker"),
        "node_growth_mb": max(rss.growth_mb(name) for name in node_names),
        "client_rss_mb_before": rss.base["client"] * 1024 / MB,
        "broker_rss_mb_before": rss.base["broker"] * 1024 / MB,
        "samples": len(rss.samples),
        "rss_mb_series": [list(s) for s in rss.samples],  # [seconds, client, broker, node-1, ...]
    }


def _conn_clients_main(endpoint: str, server_public: bytes, n: int, ctrl: Any) -> None:
    """``n`` CurveZMQ DEALERs connected to ``endpoint``, each saying one message; held until told to stop."""
    _ignore_sigint()
    ctx = zmq.Context()
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        _curve_client(s, server_public)
        s.connect(endpoint)
        s.send(b"hi")
        socks.append(s)
    ctrl.recv()
    ctx.destroy(linger=0)


def measure_connection_memory(cfg: Settings) -> dict[str, Any]:
    """The floor under the broker's memory per idle node: libzmq's own cost of one CurveZMQ connection.

    A raw ROUTER (CurveZMQ server, in a process of its own: this one) with
    ``cfg.idle_nodes`` CurveZMQ DEALERs connected from a helper process, each
    having sent one message; RSS growth / connections. A zlink node holds three
    such connections to its broker (tasks, heartbeats, beacon).
    """
    n = cfg.idle_nodes
    mpc = mp.get_context("spawn")
    recv_end, send_end = mpc.Pipe()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    _curve_server(router, public, secret)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    time.sleep(0.3)
    before = proc_rss_kib(os.getpid())
    proc = mpc.Process(target=_conn_clients_main, args=(f"tcp://127.0.0.1:{port}", public, n, recv_end), daemon=True)
    proc.start()
    try:
        got = 0
        deadline = time.monotonic() + max(30.0, n / 20)
        while got < n and time.monotonic() < deadline:
            if router.poll(500):
                router.recv_multipart()
                got += 1
        if got < n:
            raise BenchError(f"connection memory: only {got}/{n} connections said hello")
        time.sleep(1.0)
        after = proc_rss_kib(os.getpid())
    finally:
        with contextlib.suppress(OSError):
            send_end.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        router.close(linger=0)
        ctx.term()
    return {"connections": n, "kib_per_connection": (after - before) / n}


QUEUED_PAYLOAD = 100  # broker memory per queued task: bytes of each task's argument


def measure_queued_memory(cfg: Settings) -> dict[str, Any]:
    """Broker memory per queued task: ``cfg.queued_tasks`` sealed 100 B tasks that no node can take.

    A broker of its own (sealed swarm, default limits) and no node: every task
    submitted waits in the broker's queue for a node that offers its skill. The
    broker's VmRSS is read after a warm-up of 1,000 queued tasks (so the
    allocator's first arenas and the queue's structures exist) and again once
    ``client.status()`` counts every task queued; per task = growth / tasks.
    The tasks are cancelled (the broker's memory is then read once more, to
    show how much it gives back).
    """
    import gc

    from zlink import Client
    from zlink.demo import LocalSwarm

    n = cfg.queued_tasks
    body = os.urandom(QUEUED_PAYLOAD)
    swarm = LocalSwarm()
    client: Any = None
    futures: list[Any] = []

    def wait_queued(count: int, deadline: float) -> None:
        while sum(client.status()["queued"].values()) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"queued memory: the broker did not queue {count:,} tasks in time")
            time.sleep(0.1)

    try:
        swarm.start_broker(timeout=20.0)
        assert swarm.broker is not None
        client = Client(swarm.invite("client", "bench-queue-client"), connect_timeout=20.0)
        deadline = time.monotonic() + max(cfg.budget, n / 2000)
        futures = [client.submit("noop", body) for _ in range(1000)]
        wait_queued(1000, deadline)
        gc.collect()
        time.sleep(0.5)
        before = proc_rss_kib(swarm.broker.pid)
        t0 = time.perf_counter()
        futures += [client.submit("noop", body) for _ in range(n)]
        wait_queued(1000 + n, deadline)
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        after = proc_rss_kib(swarm.broker.pid)
        for f in futures:
            f.cancel()
        futures.clear()
        with contextlib.suppress(BenchError):
            wait_queued_zero = time.monotonic() + 30
            while sum(client.status()["queued"].values()) > 0 and time.monotonic() < wait_queued_zero:
                time.sleep(0.1)
        released = proc_rss_kib(swarm.broker.pid)
    finally:
        try:
            if client is not None:
                client.close()
        finally:
            swarm.close()
    return {
        "tasks": n,
        "payload_bytes": QUEUED_PAYLOAD,
        "bytes_per_task": (after - before) * 1024 / n,
        "rss_mib_before": before / 1024,
        "rss_mib_queued": after / 1024,
        "rss_mib_cancelled": released / 1024,
        "submit_tasks_per_s": n / wall,
    }


# =========================================================================== measurements


@dataclass(frozen=True)
class Settings:
    tasks: int  # the smaller map (also the CPU-per-task figures)
    big_tasks: int  # the larger map
    rtt: int
    warmup: int
    window: int
    workers: int
    slots: int
    prefetch: int | None  # None: zlink's default (at most 1024, adapted by the broker)
    repeat: int
    pick: str  # "best" or "median"
    budget: float  # seconds per measurement run (at least MIN_RATE tasks/s on the bigger runs)
    kills: int = 20  # failure detection: nodes killed with SIGKILL, one at a time
    idle_nodes: int = 200  # idle broker: simulated idle nodes
    idle_seconds: float = 10.0  # idle broker: CPU measured over this long (half that with no node)
    idle_procs: int = 4  # idle broker: helper processes the simulated nodes are spread over
    par_tasks: int = 400  # parallel speed-up: 50 ms tasks on 4 nodes x 8 slots
    batch_window: int = 10_000  # map with batching: its window (tasks in flight)
    mem_items: int = 1_000_000  # lazy map memory: items of the generator
    queued_tasks: int = 100_000  # broker memory per queued task
    seal_scale: float = 1.0  # sealing cost: fraction of SEAL_TASKS run per payload size
    peers: tuple[str, ...] = PEER_NAMES  # peers compared (each skipped, with the reason, if it cannot run here)
    only: tuple[str, ...] = ()  # measurements to run (empty: all)

    def runs(self, measurement: str) -> bool:
        return not self.only or measurement in self.only

    def map_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({self.tasks, self.big_tasks}))


#: sealing cost: payload size (bytes) -> tasks per run (the arguments travel there and back)
SEAL_TASKS: dict[int, int] = {100: 3000, 4096: 3000, 65536: 600, 1 << 20: 60}


def _size_name(size: int) -> str:
    return f"{size // (1 << 20)} MiB" if size >= 1 << 20 else f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def measure_sealing(cfg: Settings) -> dict[str, Any]:
    """Sealed against unsealed: the same swarm set-up with and without a seal key.

    For each payload size: ``client.map("noop", payloads, batch=1)`` (one task
    per item, so every task is sealed and opened once each way), after a
    warm-up, on a sealed swarm and on an unsealed one (CurveZMQ on both).
    Figures: tasks/s and MiB/s of arguments each way, and sealed/unsealed.
    """
    out: dict[str, Any] = {}
    for seal in (False, True):
        tag = "sealed" if seal else "unsealed"
        with ZlinkSwarm(cfg.workers, cfg.slots, cfg.prefetch, seal=seal) as system:
            client = system.client
            for size, base in SEAL_TASKS.items():
                n = max(10, int(base * cfg.seal_scale))
                body = os.urandom(size)
                window = max(4, min(cfg.window, (64 << 20) // size))  # at most ~64 MiB in flight
                list(client.map("noop", [body] * max(5, n // 10), window=window, batch=1))  # warm-up
                with watchdog(cfg.budget, lambda c=client: c.close(timeout=2.0)) as fired:
                    t0 = time.perf_counter()
                    try:
                        got = sum(len(r) for r in client.map("noop", [body] * n, window=window, batch=1))
                    except Exception as exc:
                        if fired.is_set():
                            raise BenchError(f"sealing run over its time budget of {cfg.budget:g} s") from exc
                        raise
                    wall = time.perf_counter() - t0
                if got != n * size:
                    raise BenchError("sealing run: results do not match the arguments")
                out[f"{tag}_tps_{size}"] = n / wall
                out[f"{tag}_mibs_{size}"] = n * size / wall / (1 << 20)
    for size in SEAL_TASKS:
        out[f"ratio_{size}"] = out[f"sealed_tps_{size}"] / out[f"unsealed_tps_{size}"]
    return out


MIN_RATE = 250  # tasks/s below which a map run counts as stuck (Celery runs at ~600/s here)


def _timed(system: Any, run: Callable[[], None]) -> tuple[float, Any]:
    """Wall seconds of ``run()`` and the system's CPU meter over it (``per_task_us(n)``)."""
    with system.cpu_meter() as cpu:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    return wall, cpu


def measure_map(system: Any, cfg: Settings) -> dict[str, float]:
    """No-op throughput of a map of each of ``cfg.map_sizes()`` tasks, after a warm-up.

    Every system: one task per item (``pipelined``: at most ``cfg.window`` in
    flight), the raw relay's requests, each peer's own best way of mapping (see
    bench_peers.py), zlink's ``client.map(..., batch=1)``. zlink also runs its
    default ``client.map`` (adaptive batching, window ``cfg.batch_window``),
    consumed and checked as results come. CPU per task: the smaller map.
    """
    out: dict[str, float] = {}
    for n in cfg.map_sizes():
        budget = max(cfg.budget, n / MIN_RATE)
        system.pipelined(cfg.warmup, cfg.window, budget)
        wall, cpu = _timed(system, lambda n=n, b=budget: system.pipelined(n, cfg.window, b))
        out[f"tps_{n}"] = n / wall
        if n == cfg.tasks:
            out.update(cpu.per_task_us(n))
        if isinstance(system, ZlinkSwarm):
            system.batched(max(cfg.warmup, min(n, 2 * cfg.batch_window)), cfg.batch_window, budget)
            wall, cpu = _timed(system, lambda n=n, b=budget: system.batched(n, cfg.batch_window, b))
            out[f"batched_tps_{n}"] = n / wall
            if n == cfg.big_tasks:
                out.update({f"batched_{k}": v for k, v in cpu.per_task_us(n).items()})
    system.throughput = {"tasks_per_s": out[f"tps_{cfg.tasks}"]}
    return out


def measure_round_trip(system: Any, cfg: Settings) -> dict[str, float]:
    """Sequential single-request latency (one in flight)."""
    system.round_trips(max(20, cfg.warmup // 5), cfg.budget)
    return latency_summary(system.round_trips(cfg.rtt, cfg.budget))


def measure_peer_parallel(system: Any, cfg: Settings) -> dict[str, Any]:
    """A peer's parallel speed-up: ``cfg.par_tasks`` x 50 ms on its 2 workers x 16 (32 at once, as zlink's 4x8)."""
    result: dict[str, Any] = system.parallel_speedup(cfg.par_tasks, PAR_WAIT_S, cfg.budget)
    return result


#: measurement name -> function(system, settings) -> figures, run on each system of MEASURED_ON
MEASUREMENTS: dict[str, Callable[[Any, Settings], dict[str, Any]]] = {
    "round_trip": measure_round_trip,  # first, on a fresh system (Celery's latency after 100k tasks stalls)
    "map": measure_map,
}
#: zlink-only measurements that start and stop their own processes: function(settings) -> figures.
#: They run after the compared systems in each repeat (with none of them up) and fill the zlink column.
SOLO_MEASUREMENTS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "failure_detection": measure_failure_detection,
    "idle_broker": measure_idle_broker,
    "queued_memory": measure_queued_memory,
    "connection_memory": measure_connection_memory,
    "parallel_speedup": measure_parallel_speedup,
    "map_memory": measure_map_memory,
    "sealing": measure_sealing,
}
#: measurements a peer runs on itself, filling its column of a zlink-only measurement
PEER_MEASUREMENTS: dict[str, Callable[[Any, Settings], dict[str, Any]]] = {
    "parallel_speedup": measure_peer_parallel,
}
#: figures echoed on stderr as each run finishes
BRIEF_KEYS = (
    "tasks_per_s", "p50_ms", "p99_ms", "median_s", "max_s", "cpu_pct", "kib_per_node", "bytes_per_task",
    "wall_s", "ratio", "client_growth_mb", "broker_growth_mb",
)  # fmt: skip


def _make_system(name: str, cfg: Settings) -> Any:
    if name == "raw":
        return RawRelay(cfg.workers)
    if name == "zlink":
        return ZlinkSwarm(cfg.workers, cfg.slots, cfg.prefetch)
    import bench_peers

    return bench_peers.make_peer(name, workers=cfg.workers)


def system_names(cfg: Settings) -> tuple[str, ...]:
    """The systems compared, in the order they run: the floor, zlink, then the peers asked for."""
    return ("raw", "zlink", *cfg.peers)


def peer_unavailable(name: str) -> str | None:
    import bench_peers

    return bench_peers.available(name)


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure of zlink against the other systems, or zlink's alone with a limit."""

    measurement: str
    key: str
    label: str
    fmt: str = "{:,.2f}"
    higher_is_better: bool = False
    targets: tuple[tuple[str, float], ...] = ()  # (system, zlink/system): >= if higher is better, else <=
    vs_key: str | None = None  # the other systems' key, when it differs from zlink's
    limit: float | None = None  # on the zlink figure itself, in ``unit``; same direction as ``targets``
    unit: str = ""  # printed after the limit, e.g. " s" or "%"
    strict: bool = False  # the limit excludes its own value (< rather than <=)

    def target_text(self, ascii_only: bool = True) -> str:
        ge, le = (">=", "<=") if ascii_only else ("≥", "≤")
        if self.limit is not None:
            op = (">" if self.higher_is_better else "<") if self.strict else (ge if self.higher_is_better else le)
            return f"{op} {self.limit:g}{self.unit}"
        if not self.targets:
            return "-"
        op = ge if self.higher_is_better else le
        return " ".join(f"{name}{op}{t:g}x" for name, t in self.targets)

    def meets_one(self, ratio: float, target: float) -> bool:
        return ratio >= target if self.higher_is_better else ratio <= target

    def meets_limit(self, value: float | None) -> bool | None:
        if self.limit is None or value is None or math.isnan(value):
            return None
        if self.higher_is_better:
            return value > self.limit if self.strict else value >= self.limit
        return value < self.limit if self.strict else value <= self.limit


def make_rows(cfg: Settings) -> list[Row]:
    peer_targets = (("ray", 10.0), ("dask", 25.0), ("celery", 25.0))
    rows: list[Row] = []
    for n in cfg.map_sizes():
        rows.append(Row("map", f"batched_tps_{n}", f"map, default batching, {short_count(n)} no-op (tasks/s)",
                        "{:,.0f}", True, (("raw", 2.0), *peer_targets), vs_key=f"tps_{n}"))  # fmt: skip
    for n in cfg.map_sizes():
        rows.append(Row("map", f"tps_{n}", f"map, one task per item, {short_count(n)} (tasks/s)", "{:,.0f}", True,
                        (("raw", 0.7),)))  # fmt: skip
    return [
        *rows,
        Row("round_trip", "p50_ms", "round trip p50 (ms)", "{:,.3f}", targets=(("raw", 1.5), ("ray", 0.25))),
        Row("round_trip", "p99_ms", "round trip p99 (ms)", "{:,.3f}"),
        Row("map", "relay_cpu_us_per_task", f"relay/broker CPU per task, {short_count(cfg.tasks)} (us)", "{:,.1f}"),
        Row("map", "worker_cpu_us_per_task", "  worker/node CPU per task (us)", "{:,.1f}"),
        Row("map", "client_cpu_us_per_task", "  client CPU per task (us)", "{:,.1f}"),
        Row(
            "map",
            "batched_relay_cpu_us_per_task",
            f"  zlink batched {short_count(cfg.big_tasks)}: broker (us)",
            "{:,.2f}",
        ),
        Row("map", "batched_worker_cpu_us_per_task", "  zlink batched: node (us)", "{:,.2f}"),
        Row("map", "batched_client_cpu_us_per_task", "  zlink batched: client (us)", "{:,.2f}"),
        Row(
            "parallel_speedup",
            "ratio",
            f"parallel: {cfg.par_tasks} x 50 ms on 32 slots, wall/ideal",
            "{:,.3f}",
            limit=1.15,
            unit="x",
        ),
        Row("parallel_speedup", "wall_s", "  wall (s)", "{:,.3f}"),
        Row("parallel_speedup", "speedup", "  speed-up over one slot (x)", "{:,.1f}", higher_is_better=True),
        Row("failure_detection", "median_s", "kill -9 to re-dispatch, median (s)", "{:,.3f}", limit=1.5, unit=" s"),
        Row("failure_detection", "max_s", "kill -9 to re-dispatch, max (s)", "{:,.3f}"),
        Row("failure_detection", "status_median_s", "kill -9 to gone from status, median (s)", "{:,.3f}"),
        Row(
            "idle_broker",
            "kib_per_node",
            f"broker memory per idle node, {cfg.idle_nodes} nodes (KiB)",
            "{:,.1f}",
            limit=20,
            unit=" KiB",
        ),
        Row("connection_memory", "kib_per_connection", "  floor: libzmq, one CurveZMQ connection (KiB)", "{:,.1f}"),
        Row("idle_broker", "rss_mib_empty", "  broker RSS, no node (MiB)", "{:,.1f}"),
        Row("idle_broker", "rss_mib", f"  broker RSS, {cfg.idle_nodes} idle nodes (MiB)", "{:,.1f}"),
        Row(
            "idle_broker",
            "cpu_pct",
            f"broker CPU, {cfg.idle_nodes} idle nodes (% core)",
            "{:,.2f}",
            limit=5,
            unit="%",
            strict=True,
        ),
        Row("idle_broker", "cpu_pct_python", "  in its Python threads (% core)", "{:,.2f}"),
        Row("idle_broker", "cpu_pct_libzmq", "  in libzmq's I/O threads (% core)", "{:,.2f}"),
        Row("idle_broker", "python_wakeups_per_s", "  Python thread wake-ups per second", "{:,.0f}"),
        Row("idle_broker", "cpu_pct_empty", "broker CPU, no node (% core)", "{:,.2f}"),
        Row(
            "queued_memory",
            "bytes_per_task",
            f"broker memory per queued {QUEUED_PAYLOAD} B task, {short_count(cfg.queued_tasks)} queued (B)",
            "{:,.0f}",
            limit=2048,
            unit=" B",
        ),
        Row("queued_memory", "rss_mib_queued", "  broker RSS with them queued (MiB)", "{:,.1f}"),
        Row(
            "map_memory",
            "client_growth_mb",
            f"lazy map of {short_count(cfg.mem_items)} items: client RSS growth (MB)",
            "{:,.1f}",
            limit=100,
            unit=" MB",
            strict=True,
        ),
        Row(
            "map_memory", "broker_growth_mb", "  broker RSS growth (MB)", "{:,.1f}", limit=100, unit=" MB", strict=True
        ),
        Row("map_memory", "node_growth_mb", "  node RSS growth, largest (MB)", "{:,.1f}"),
        *[
            row
            for size in SEAL_TASKS
            for row in (
                Row(
                    "sealing",
                    f"ratio_{size}",
                    f"sealed/unsealed throughput, {_size_name(size)} payloads",
                    "{:,.2f}",
                    higher_is_better=True,
                ),
                Row("sealing", f"sealed_tps_{size}", "  sealed (tasks/s)", "{:,.0f}", higher_is_better=True),
                Row("sealing", f"unsealed_tps_{size}", "  unsealed (tasks/s)", "{:,.0f}", higher_is_better=True),
            )
        ],
    ]


def pick(values: list[float], higher_is_better: bool, how: str) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan
    if how == "median":
        return statistics.median(vals)
    return max(vals) if higher_is_better else min(vals)


Runs = dict[str, dict[str, list[dict[str, Any]]]]


def _brief(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:,.3f}" for k, v in result.items() if k in BRIEF_KEYS or k.startswith(("tps_", "batched_tps"))
    )


def run_all(cfg: Settings, log: Callable[[str], None]) -> tuple[Runs, dict[str, str]]:
    """Run every measurement ``cfg.repeat`` times on each system, then the zlink-only ones.

    Only one system is up at a time (an idle system must not take CPU from the
    one being measured), and the systems take turns on every repeat so that
    noise from the rest of the machine hits all alike. A peer that cannot run
    here, or fails, is skipped with the reason (the second value), never
    silently dropped; zlink and the raw relay failing end the run.
    """
    systems = system_names(cfg)
    every = [*MEASUREMENTS, *SOLO_MEASUREMENTS]
    runs: Runs = {m: {s: [] for s in systems} for m in every if cfg.runs(m)}
    skipped: dict[str, str] = {}
    for name in cfg.peers:
        reason = peer_unavailable(name)
        if reason is not None:
            skipped[name] = reason
    for rep in range(cfg.repeat):
        tag = f"run {rep + 1}/{cfg.repeat}"
        for sname in systems:
            if sname in skipped:
                continue
            names = [m for m in MEASUREMENTS if cfg.runs(m)]
            if sname in cfg.peers:
                names += [m for m in PEER_MEASUREMENTS if cfg.runs(m)]
            if not names:
                continue
            t_start = time.monotonic()
            try:
                with _make_system(sname, cfg) as system:
                    log(f"  {tag} {sname}: started in {time.monotonic() - t_start:.1f} s")
                    for mname in names:
                        t0 = time.monotonic()
                        measure = MEASUREMENTS.get(mname) or PEER_MEASUREMENTS[mname]
                        result = measure(system, cfg)
                        runs[mname][sname].append(result)
                        log(f"  {tag} {sname:<6} {mname:<17} {_brief(result)}  ({time.monotonic() - t0:.1f} s)")
            except (BenchError, RuntimeError) as exc:
                if sname not in cfg.peers:
                    raise
                skipped[sname] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                log(f"  {tag} {sname}: {skipped[sname]}")
        for mname, solo in SOLO_MEASUREMENTS.items():
            if not cfg.runs(mname):
                continue
            t0 = time.monotonic()
            result = solo(cfg)
            runs[mname]["zlink"].append(result)
            log(f"  {tag} zlink  {mname:<17} {_brief(result)}  ({time.monotonic() - t0:.1f} s)")
    return runs, skipped


def summarize(runs: Runs, cfg: Settings, skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One dict per row: each system's value, zlink's ratio to each, the target text and the verdict.

    The verdict is PASS when every target whose system was measured is met (a
    skipped peer's target cannot be judged: the target text says so), MISS when
    one is not, "-" when nothing can be judged.
    """
    out = []
    systems = system_names(cfg)
    for row in make_rows(cfg):
        if row.measurement not in runs:
            continue  # not run (--only)
        per = runs[row.measurement]
        values: dict[str, float | None] = {}
        for sname in systems:
            key = row.key if sname == "zlink" else (row.vs_key or row.key)
            samples = [r[key] for r in per.get(sname, []) if key in r]
            values[sname] = pick(samples, row.higher_is_better, cfg.pick) if samples else None
        zl = values["zlink"]
        ratios = {
            s: (zl / v if v and not math.isnan(v) and zl is not None and not math.isnan(zl) else None)
            for s, v in values.items()
            if s != "zlink"
        }
        checks = [row.meets_one(r, t) for s, t in row.targets if (r := ratios.get(s)) is not None]
        limit_ok = row.meets_limit(zl)
        if limit_ok is not None:
            checks.append(limit_ok)
        verdict = "-" if not checks else "PASS" if all(checks) else "MISS"
        unjudged = [s for s, _ in row.targets if s in systems and ratios.get(s) is None and values["zlink"] is not None]
        out.append({
            "metric": row.label,
            "measurement": row.measurement,
            "key": row.key,
            "values": values,
            "ratios": ratios,
            "target": row.target_text(),
            "target_md": row.target_text(ascii_only=False),
            "unjudged": unjudged,
            "verdict": verdict,
            "fmt": row.fmt,
            "higher_is_better": row.higher_is_better,
        })  # fmt: skip
    return out


# =========================================================================== output


def short_count(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip()
    try:
        from zlink import __version__ as zlink_version
    except ImportError:
        zlink_version = "?"
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": model,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "curve": bool(zmq.has("curve")),
        "zlink": zlink_version,
        "commit": commit,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    """The command that reproduces the figures (output-file options left out)."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    args: list[str] = []
    skip = False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--json", "--markdown"):
            skip = True
        elif not arg.startswith(("--json=", "--markdown=")):
            args.append(arg)
    return shlex.join(["python", str(script), *args])


def fmt_value(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else fmt.format(value)


def _ratio_text(r: dict[str, Any], sname: str) -> str:
    v = r["ratios"].get(sname)
    return "-" if v is None else f"{v:.2f}x" if v < 100 else f"{v:,.0f}x"


def table_lines(rows: list[dict[str, Any]], cfg: Settings, skipped: dict[str, str]) -> list[str]:
    systems = system_names(cfg)
    others = [s for s in systems if s != "zlink"]
    w = max([34, *(len(r["metric"]) + 2 for r in rows)])
    tw = max([8, *(len(r["target"]) + 2 for r in rows)])

    def value(r: dict[str, Any], sname: str) -> str:
        compared = any(v is not None for s, v in r["values"].items() if s != "zlink")
        if sname in skipped and r["values"].get(sname) is None and compared:
            return "skipped"
        return fmt_value(r["values"].get(sname), r["fmt"])

    header = (
        f"{'metric':<{w}}" + "".join(f"{s:>11}" for s in systems) + "".join(f"{'z/' + s:>9}" for s in others)
        + f"{'target':>{tw}}{'':>6}"
    )  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['metric']:<{w}}" + "".join(f"{value(r, s):>11}" for s in systems)
            + "".join(f"{_ratio_text(r, s):>9}" for s in others) + f"{r['target']:>{tw}}{r['verdict']:>6}"
        )  # fmt: skip
    return lines


def skipped_lines(skipped: dict[str, str]) -> list[str]:
    return [f"skipped: {name}: {reason}" for name, reason in skipped.items()]


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The targets missed or not judged, one line each."""
    out = []
    for r in rows:
        if r["verdict"] == "MISS":
            out.append(f"MISS: {r['metric'].strip()}: target {r['target']}")
        if r["unjudged"]:
            out.append(f"not judged (peer skipped): {r['metric'].strip()} against {', '.join(r['unjudged'])}")
    return out


def machine_lines(m: dict[str, Any]) -> list[str]:
    return [
        f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu_model']}, {m['os']}",
        f"software: Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']} (CURVE {m['curve']}), "
        f"zlink {m['zlink']} {m['commit']}".rstrip(),
        f"load average at start: {' '.join(str(x) for x in m['load_avg'])}",
    ]


def settings_text(cfg: Settings) -> str:
    prefetch = "auto" if cfg.prefetch is None else cfg.prefetch
    sizes = " and ".join(f"{n:,}" for n in cfg.map_sizes())
    return (
        f"{cfg.workers} workers/nodes per system ({cfg.slots} slots, prefetch {prefetch} per zlink node); maps of "
        f"{sizes} no-op tasks (window {cfg.window:,} one task per item, {cfg.batch_window:,} batched); "
        f"{cfg.rtt:,} sequential round trips; warm-up {cfg.warmup:,}; peers {', '.join(cfg.peers) or 'none'}; "
        f"{cfg.kills} node kills; {cfg.idle_nodes} idle nodes in {cfg.idle_procs} helper process(es), "
        f"broker CPU over {cfg.idle_seconds:g} s; {cfg.queued_tasks:,} queued tasks; parallel speed-up "
        f"{cfg.par_tasks:,} x 50 ms on {PAR_NODES} nodes x {PAR_SLOTS} slots; lazy map {cfg.mem_items:,} items; "
        f"{cfg.pick} of {cfg.repeat} run(s) per figure" + (f"; only {', '.join(cfg.only)}" if cfg.only else "")
    )


#: how the figures of zlink alone and of the parallel API are measured, printed under the table and in the markdown
NOTES = {
    "failure_detection": (
        "kill -9: a broker with default heartbeats (0.5 s x 3) and {fd} nodes (1 slot, no prefetch), {busy} of them "
        "running a long task; each round SIGKILLs the node running one task (at a random point of its heartbeat "
        "cycle) and times the kill to the next start of that task on another node, as the skill logs it "
        "(CLOCK_MONOTONIC, shared by all processes: sub-millisecond precision); a replacement node joins before the "
        "next kill. 'gone from status' is when client.status(), asked every 20 ms, first no longer lists the node."
    ),
    "idle_broker": (
        "idle broker: a broker with default heartbeats and one idle client; CPU is utime + stime from "
        "/proc/PID/stat over the stated time, as a percentage of one core (10 ms clock ticks); RSS is VmRSS. "
        "The idle nodes are simulated, each with its own invited key: a CurveZMQ DEALER that said HELLO (node, one "
        "skill, one slot), a PUB sending a HEARTBEAT every 0.5 s, and a SUB to the beacon, as a real node has. "
        "Memory per node = (RSS with them - RSS with none) / nodes. The per-thread split and the wake-ups "
        "(voluntary context switches) come from /proc/PID/task."
    ),
    "parallel_speedup": (
        "parallel speed-up: a broker and {par_nodes} nodes started with --slots {par_slots} (default prefetch) on a "
        "swarm of their own; after a warm-up map of two waves, client.map('wait50', range({par})) (each task sleeps "
        "50 ms; default window 1,000, so all are in flight) is timed to its last result. Ideal = {par} x 0.05 s / "
        "{par_total} slots; the target is wall <= 1.15x that. Whole waves alone need "
        "ceil({par}/{par_total}) x 50 ms. Each peer runs the same tasks on its 2 workers x 16 (Dask threads, "
        "Celery -c, Ray threaded actors): 32 at once, after the same warm-up."
    ),
    "map": (
        "maps: each system maps a no-op over {sizes} items after a warm-up, one task per item with at most "
        "{window:,} in flight (the raw relay: pipelined requests on one DEALER; Ray: remote functions collected "
        "with ray.wait; Dask: client.map in chunks, gathered; Celery: groups over Redis; zlink: "
        "client.map(..., batch=1)); zlink also runs its default client.map (adaptive batching, window "
        "{bwindow}). Targets on the batched rows compare zlink's default map with each system's per-item map; "
        "the one-task-per-item rows compare like with like. CPU per task is user + system time of each process "
        "during the {tasks}-task run (clock ticks of 10 ms)."
    ),
    "connection_memory": (
        "connection floor: a raw CurveZMQ ROUTER in the benchmark process with {nodes} DEALERs connected from a "
        "helper process, each having sent one message; RSS growth / connections. A zlink node holds three "
        "connections to its broker (tasks, heartbeats, beacon)."
    ),
    "queued_memory": (
        "queued memory: a broker of its own with no node; after a warm-up of 1,000, {queued} sealed tasks of "
        "100 B to a skill no node offers are submitted, and the broker's VmRSS growth once status counts them "
        "all queued is divided by their number."
    ),
    "map_memory": (
        "lazy map memory: a swarm of its own ({workers} nodes); after a warm-up map and gc.collect(), "
        "client.map('noop', generator of {items:,} ints) with the default window (1,000), consumed and checked "
        "item by item, nothing kept. VmRSS of this process (the client) and of the broker, from /proc/PID/status, "
        "sampled every 0.5 s in a thread; growth = peak - value just before the map, in MB (10^6 bytes)."
    ),
}


def measurement_notes(rows: list[dict[str, Any]], cfg: Settings) -> list[str]:
    shown = {r["measurement"] for r in rows}
    fields = {
        "fd": FD_NODES, "busy": FD_NODES - 1, "par": cfg.par_tasks, "par_nodes": PAR_NODES, "par_slots": PAR_SLOTS,
        "par_total": PAR_NODES * PAR_SLOTS, "bwindow": f"{cfg.batch_window:,}",
        "workers": cfg.workers, "slots": cfg.slots, "prefetch": "adaptive" if cfg.prefetch is None else cfg.prefetch,
        "tasks": f"{cfg.tasks:,}", "window": cfg.window, "items": cfg.mem_items,
        "nodes": cfg.idle_nodes, "sizes": " and ".join(f"{n:,}" for n in cfg.map_sizes()),
        "queued": f"{cfg.queued_tasks:,}",
    }  # fmt: skip
    return [note.format(**fields) for m, note in NOTES.items() if m in shown]


def markdown(
    rows: list[dict[str, Any]], m: dict[str, Any], cfg: Settings, cmd: str, skipped: dict[str, str], chart: str = ""
) -> str:
    systems = system_names(cfg)
    others = [s for s in systems if s != "zlink"]
    names = {"raw": "raw relay", "zlink": "zlink", "ray": "Ray", "dask": "Dask", "celery": "Celery"}
    out = [
        "## zlink against the raw ZeroMQ floor, Ray, Dask and Celery",
        "",
        "Every system on 127.0.0.1 of one machine, in one run, one system up at a time: the raw relay (a minimal "
        "CurveZMQ ROUTER/ROUTER loop that only routes by id, and DEALER echo workers), zlink (broker, "
        f"{cfg.workers} `zlink node` processes on `scripts/bench_skills.py`, CurveZMQ and sealed payloads) and "
        f"each peer with {cfg.workers} worker processes (`scripts/bench_peers.py`). `z/X` is zlink's figure "
        "divided by X's. Rows without other figures are zlink's alone, with absolute limits.",
        "",
        f"- Machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu_model']}, {m['os']}",
        f"- Software: Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}, zlink {m['zlink']}"
        + (f" (`{m['commit']}`)" if m["commit"] else "")
        + "".join(f", {names[p]} {v}" for p, v in m.get("peers", {}).items() if v),
        f"- Load average at start: {' '.join(str(x) for x in m['load_avg'])}",
        f"- Settings: {settings_text(cfg)}",
        f"- Reproduce: `{cmd}`",
        *(f"- Skipped: {names.get(k, k)}: {v}" for k, v in skipped.items()),
        "",
        *([f"![zlink against the others]({chart})", ""] if chart else []),
        "| metric | " + " | ".join(names.get(s, s) for s in systems) + " | "
        + " | ".join(f"z/{s}" for s in others) + " | target | |",
        "|---|" + "---:|" * (len(systems) + len(others)) + "---|---|",
    ]  # fmt: skip
    for r in rows:
        cells = [fmt_value(r["values"].get(s), r["fmt"]) for s in systems] + [_ratio_text(r, s) for s in others]
        verdict = r["verdict"] if r["verdict"] != "-" else ""
        out.append(f"| {r['metric']} | " + " | ".join(cells) + f" | {r['target_md']} | {verdict} |")
    out += ["", *(f"- {note[0].upper()}{note[1:]}" for note in measurement_notes(rows, cfg))]
    return "\n".join(out) + "\n"


CHART_SYSTEMS = ("raw", "zlink", "ray", "dask", "celery")


def write_chart(rows: list[dict[str, Any]], cfg: Settings, path: Path) -> bool:
    """A PNG of the map throughputs and the round-trip p50 of every system (False if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_key = {(r["measurement"], r["key"]): r for r in rows}
    systems = [s for s in system_names(cfg) if s in CHART_SYSTEMS]
    colors = {"raw": "#999999", "zlink": "#d62728", "ray": "#1f77b4", "dask": "#ff7f0e", "celery": "#2ca02c"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    groups = []
    for n in cfg.map_sizes():
        groups.append((f"map {short_count(n)}\none task per item", by_key.get(("map", f"tps_{n}")), False))
    for n in cfg.map_sizes():
        groups.append((f"map {short_count(n)}\nzlink batched", by_key.get(("map", f"batched_tps_{n}")), True))
    width = 0.8 / len(systems)
    for i, sname in enumerate(systems):
        xs, ys = [], []
        for g, (_label, r, batched) in enumerate(groups):
            if r is None:
                continue
            v = r["values"].get(sname)
            if batched and sname != "zlink":
                continue  # the others have no batched map: their per-item figure is in the first groups
            if v:
                xs.append(g + (i - (len(systems) - 1) / 2) * width)
                ys.append(v)
        ax1.bar(xs, ys, width, label=sname, color=colors.get(sname))
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax1.set_ylabel("tasks per second (log)")
    ax1.set_title("no-op throughput")
    ax1.legend(fontsize=8)
    rt = by_key.get(("round_trip", "p50_ms"))
    if rt is not None:
        names = [s for s in systems if rt["values"].get(s)]
        ax2.bar(names, [rt["values"][s] for s in names], color=[colors.get(s) for s in names])
        ax2.set_yscale("log")
        ax2.set_ylabel("ms (log)")
        ax2.set_title("single-task round trip p50")
        ax2.tick_params(axis="x", labelsize=8)
    fig.suptitle("zlink on loopback, CurveZMQ on, one machine, same run", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


DOCS_FILE = ROOT / "docs" / "benchmarks.md"
CHART_FILE = ROOT / "docs" / "img" / "benchmarks.png"
BEGIN, END = "<!-- bench:begin (written by scripts/bench.py --write-docs) -->", "<!-- bench:end -->"


def write_docs(text: str, path: Path = DOCS_FILE) -> None:
    """Replace the generated section of docs/benchmarks.md (between BEGIN and END; appended if absent)."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{BEGIN}\n{text}{END}\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        doc = head + section + ("\n" + tail if tail else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + section
    path.write_text(doc)


# =========================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small counts for a smoke test (maps of 2,000 and 10,000, 300 round trips, 5 kills, idle CPU over "
        "5 s, 10,000 queued tasks, lazy map of 100,000, 50 idle nodes)",
    )
    ap.add_argument("--tasks", type=int, default=None, help="the smaller map (default 10,000)")
    ap.add_argument("--big-tasks", type=int, default=None, help="the larger map (default 100,000)")
    ap.add_argument(
        "--peers",
        default=",".join(PEER_NAMES),
        metavar="NAME[,NAME]|none",
        help=f"peers to compare ({', '.join(PEER_NAMES)}; default all; 'none' for zlink and the raw relay only)",
    )
    ap.add_argument("--queued-tasks", type=int, default=None, help="broker memory: tasks queued (default 100,000)")
    ap.add_argument("--rtt", type=int, default=None, help="sequential round trips for latency (default 2,000)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up tasks before each run (default 500)")
    ap.add_argument("--window", type=int, default=1000, help="tasks in flight while pipelining (default 1,000)")
    ap.add_argument("--workers", type=int, default=2, help="worker / node processes (default 2)")
    ap.add_argument("--slots", type=int, default=4, help="slots per zlink node (default 4)")
    ap.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="most tasks queued per zlink node beyond its slots (default: zlink's, adapted to the task rate)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement (default 1)")
    ap.add_argument(
        "--pick",
        choices=("best", "median"),
        default="best",
        help="with --repeat: report the best run (max tasks/s, min latency) or the median (default best)",
    )
    ap.add_argument("--budget", type=float, default=120.0, help="seconds one measurement run may take (default 120)")
    ap.add_argument("--kills", type=int, default=None, help="failure detection: nodes killed (default 20)")
    ap.add_argument("--idle-nodes", type=int, default=200, help="idle broker: simulated idle nodes (default 200)")
    ap.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="idle broker: seconds the broker's CPU is measured (default 10)",
    )
    ap.add_argument(
        "--idle-procs", type=int, default=4, help="idle broker: helper processes for the idle nodes (default 4)"
    )
    ap.add_argument(
        "--par-tasks", type=int, default=400, help="parallel speed-up: 50 ms tasks on 4 nodes x 8 slots (default 400)"
    )
    ap.add_argument("--batch-window", type=int, default=10_000, help="batched map: tasks in flight (default 10,000)")
    ap.add_argument(
        "--mem-items", type=int, default=None, help="lazy map memory: items of the generator (default 1,000,000)"
    )
    every = [*MEASUREMENTS, *SOLO_MEASUREMENTS]
    ap.add_argument("--write-docs", action="store_true",
                    help=f"write the table into {DOCS_FILE.relative_to(ROOT)} and the chart to "
                    f"{CHART_FILE.relative_to(ROOT)}")  # fmt: skip
    ap.add_argument("--chart", type=Path, default=None, metavar="FILE", help="write the chart (PNG) here")
    ap.add_argument(
        "--only",
        default="",
        metavar="NAME[,NAME]",
        help=f"run only these measurements ({', '.join(every)}; default all)",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every figure as JSON")
    ap.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write the table as a markdown section")
    args = ap.parse_args(argv)
    positive = (
        "tasks", "rtt", "warmup", "window", "workers", "slots", "repeat", "kills", "idle_nodes", "idle_procs",
        "par_tasks", "big_tasks", "batch_window", "mem_items", "queued_tasks",
    )  # fmt: skip
    for name in positive:
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.kills is not None and args.kills > 198:
        ap.error("--kills must be at most 198 (each held task may die 99 times)")
    if args.idle_seconds is not None and args.idle_seconds <= 0:
        ap.error("--idle-seconds must be more than 0")
    args.peers = tuple(p for p in args.peers.replace(",", " ").split() if p and p != "none")
    bad = [p for p in args.peers if p not in PEER_NAMES]
    if bad:
        ap.error(f"--peers: unknown peer(s) {', '.join(bad)}; choose from {', '.join(PEER_NAMES)} or none")
    args.only = tuple(m for m in args.only.replace(",", " ").split() if m)
    unknown = [m for m in args.only if m not in every]
    if unknown:
        ap.error(f"--only: unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(every)}")
    if args.prefetch is not None and args.prefetch < 0:
        ap.error("--prefetch must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Settings(
        tasks=args.tasks or (2_000 if args.quick else 10_000),
        big_tasks=args.big_tasks or (10_000 if args.quick else 100_000),
        queued_tasks=args.queued_tasks or (10_000 if args.quick else 100_000),
        peers=args.peers,
        rtt=args.rtt or (300 if args.quick else 2_000),
        warmup=args.warmup or (200 if args.quick else 500),
        window=args.window,
        workers=args.workers,
        slots=args.slots,
        prefetch=args.prefetch,
        repeat=args.repeat,
        pick=args.pick,
        budget=args.budget,
        kills=args.kills or (5 if args.quick else 20),
        idle_nodes=args.idle_nodes,
        idle_seconds=args.idle_seconds or (5.0 if args.quick else 10.0),
        idle_procs=args.idle_procs,
        par_tasks=args.par_tasks,
        batch_window=args.batch_window,
        mem_items=args.mem_items or (100_000 if args.quick else 1_000_000),
        seal_scale=0.2 if args.quick else 1.0,
        only=args.only,
    )
    # SIGTERM unwinds through the finally blocks like Ctrl-C, so no child process is left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = machine_info()
    cmd = command_line()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    log(f"zlink bench: {settings_text(cfg)}")
    started = time.monotonic()
    from zlink.errors import ZlinkError

    try:
        runs, skipped = run_all(cfg, log)
    except (BenchError, ZlinkError) as exc:
        print(f"bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted (every process it started was stopped)", file=sys.stderr)
        return 130
    if cfg.peers:
        import bench_peers

        machine["peers"] = {p: bench_peers.version_of(p) for p in cfg.peers if p not in skipped}
    rows = summarize(runs, cfg, skipped)
    lines = [
        *machine_lines(machine),
        f"settings: {settings_text(cfg)}",
        f"command: {cmd}",
        "",
        *table_lines(rows, cfg, skipped),
        "",
        "z/X = zlink's figure / X's; rows without other figures are zlink's alone, with absolute limits",
        *skipped_lines(skipped),
        *verdict_lines(rows),
        *measurement_notes(rows, cfg),
        f"total {time.monotonic() - started:.1f} s",
    ]
    print("\n".join(lines))
    chart = args.chart or (CHART_FILE if args.write_docs else None)
    if chart is not None:
        if write_chart(rows, cfg, chart):
            print(f"chart written to {chart}")
        else:
            print("chart not written: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
            chart = None
    if args.json is not None:
        doc = {
            "machine": machine,
            "command": cmd,
            "settings": asdict(cfg),
            "skipped": skipped,
            "rows": [{k: v for k, v in r.items() if k != "fmt"} for r in rows],
            "runs": runs,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"figures written to {args.json}")
    chart_ref = ""
    if chart is not None:
        with contextlib.suppress(ValueError):
            chart_ref = str(Path(chart).resolve().relative_to(DOCS_FILE.parent))
    text = markdown(rows, machine, cfg, cmd, skipped, chart_ref)
    if args.markdown is not None:
        args.markdown.write_text(text)
        print(f"markdown written to {args.markdown}")
    if args.write_docs:
        write_docs(text)
        print(f"table written to {DOCS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
