"""Chaos run: a loopback swarm that keeps working while its processes are killed, frozen and restarted.

It starts a CLI broker and N CLI node processes on 127.0.0.1 (``LocalSwarm``,
default heartbeat settings: 0.5 s x 3), submits M tasks ``work(i, seconds)``
whose result is ``i * i`` through one ``zlink.Client`` while, on a schedule
drawn from ``--seed``:

* ``kill -9`` hits a random node (a replacement node is started at once);
* ``SIGSTOP`` freezes a random node, ``SIGCONT`` thaws it 2-4 s later;
* ``kill -9`` hits the broker, which is restarted on the same home and port.

With ``--brokers N`` (N >= 2) the swarm has N brokers sharing one home
(``LocalSwarm.start_brokers``); nodes join all of them and ``--clients``
clients (default 3) each pick one at random and fail over when it dies. The
chaos then also hits brokers, never all at once (an action that would leave
no broker up is skipped):

* ``kill -9`` a broker, restarted 0.5-2.5 s later (``--broker-restarts``) or
  3-6 s later (``--broker-kills``), on the same port;
* ``SIGSTOP`` a broker, ``SIGCONT`` 2-4 s later (``--broker-stops``): it comes
  back with the state it had, after its clients and nodes moved on.

For each broker action it measures how long the clients on that broker took
to register with another one, and how long the broker took to list the live
nodes again once back.

Then it checks what docs/architecture.md promises: every future resolved
exactly once with the right value, and every final result arrived on the wire
exactly once (a re-*execution* is allowed, a duplicate *delivery* is not). The
nodes log each completed execution to a file, which gives the number of tasks
that ran more than once. From outside, polling ``status()`` every 50 ms, it
measures how long the broker took to notice each kill and stop (the node leaves
the status; its tasks are re-queued) and how long nodes took to come back.

    python scripts/chaos.py                         # 3 nodes, 2,000 tasks, ~30 s
    python scripts/chaos.py --long                  # ~3 minutes, more of everything
    python scripts/chaos.py --nodes 4 --tasks 500 --duration 20 --seed 7 --json out.json
    python scripts/chaos.py --brokers 3             # 3 brokers, 3 clients; brokers killed and frozen too

Exit code 0 when every check passed, 1 when one failed, 2 when the swarm
could not be set up. Every wait is bounded and every process started is
stopped on exit (stopped ones are resumed first).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

import zlink  # noqa: E402
from zlink import protocol as P  # noqa: E402
from zlink.demo import LocalSwarm, processes_mentioning  # noqa: E402
from zlink.errors import ConnectError, ZlinkError  # noqa: E402
from zlink.security import BrokerHome  # noqa: E402

SKILLS = ROOT / "tests" / "integration" / "skills_chaos.py"
POLL = 0.05  # status polling period (s)
STOP_SECONDS = (2.0, 4.0)  # how long a SIGSTOP lasts
BROKER_DOWN = (0.5, 2.5)  # how long the broker stays dead
BROKER_KILL_DOWN = (3.0, 6.0)  # how long a killed broker (--broker-kills) stays dead


# =========================================================================== helpers


class CountingClient(zlink.Client):
    """A client that also counts, per task id, the final RESULTs that arrived and the futures' resolutions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.deliveries: collections.Counter[bytes] = collections.Counter()
        #: tid -> [(monotonic time, attempt, status)] of every final RESULT item received
        self.delivered: dict[bytes, list[tuple[float, int, int]]] = {}
        self.resolutions: collections.Counter[bytes] = collections.Counter()
        self._count_lock = threading.Lock()
        #: monotonic times of every HELLO built and every WELCOME received (with "new epoch")
        self.hellos: list[float] = []
        self.welcomes: list[tuple[float, bool]] = []
        super().__init__(*args, **kwargs)

    def hello(self) -> P.Hello:
        self.hellos.append(time.monotonic())
        return super().hello()

    def on_welcome(self, welcome: P.Welcome, new_epoch: bool) -> None:
        self.welcomes.append((time.monotonic(), new_epoch))
        super().on_welcome(welcome, new_epoch)

    def on_message(self, msg: P.Message, frames: list[zmq.Frame]) -> None:
        if type(msg) is P.Result:
            for item in msg.results:  # type: ignore[attr-defined]
                if item.status != P.Outcome.PARTIAL:
                    self.deliveries[item.tid] += 1
                    self.delivered.setdefault(item.tid, []).append((time.monotonic(), item.attempt, item.status))
        super().on_message(msg, frames)

    def _resolved(self, fut: cf.Future[Any]) -> None:
        with self._count_lock:
            self.resolutions[fut.tid] += 1  # type: ignore[attr-defined]

    def task(self, skill: str, *args: Any, **kwargs: Any) -> zlink.TaskFuture:
        fut = self.submit(skill, *args, **kwargs)
        fut.add_done_callback(self._resolved)
        return fut


def work_runs(path: Path) -> dict[int, list[int]]:
    """i -> pids of every completed ``work(i, ...)`` execution (lines ``"<i> <pid>"``)."""
    runs: dict[int, list[int]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return runs
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            runs.setdefault(int(parts[0]), []).append(int(parts[1]))
    return runs


def spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def fmt_spread(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "n=0"
    return f"n={s['n']}  min {s['min']:.2f} s  median {s['median']:.2f} s  max {s['max']:.2f} s"


@dataclass
class Sample:
    t: float
    busy: dict[str, int]  # node name -> tasks in flight
    counters: dict[str, int]
    epoch: str
    broker: int = 0  # which broker answered (its index; 0 with one broker)


@dataclass
class Event:
    at: float  # seconds after the start
    kind: str  # kill | stop | cont | broker, and with several brokers: bkill | bstop | bcont | bstart
    node: str = ""
    done_at: float = 0.0  # monotonic time the action happened
    info: dict[str, Any] = field(default_factory=dict)
    broker: int = -1  # the broker hit (several brokers)
    parent: Event | None = None  # bcont / bstart: the bstop / kill they end


# =========================================================================== the run


class Chaos:
    """One chaos run: :meth:`run` sets the swarm up, plays the schedule, waits, and returns the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="zlink-chaos-"))
        self.log = self.tmp / "chaos.log"
        self.swarm = LocalSwarm(home=self.tmp / "home")
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.alive: set[str] = set()
        self.stopped: set[str] = set()
        self.node_count = 0
        #: several brokers (--brokers N >= 2): nodes join them all, clients fail over between them
        self.multi = args.brokers > 1
        self.clients: list[CountingClient] = []
        self.client: CountingClient | None = None  # the first client
        #: task number -> the client that submitted it
        self.owner: dict[int, CountingClient] = {}
        #: one monitor client per broker, joined to that broker only (it never fails over)
        self.monitors: dict[int, zlink.Client | None] = {}
        self.monitor_joins: dict[int, str] = {}
        self.monitor_lock = threading.Lock()
        #: brokers running and not stopped (an action never takes the last one down)
        self.broker_up: set[int] = set()
        self.broker_actions = 0
        self.samples: list[Sample] = []
        self.monitor_failures = 0
        self.client_epochs: list[tuple[float, bytes | None]] = []
        #: (monotonic time, client index, broker endpoint, registered) at every change
        self.client_track: list[tuple[float, int, str, bool]] = []
        self.stop_threads = threading.Event()
        self.events: list[Event] = []
        self.t0 = 0.0
        self.futures: dict[int, zlink.TaskFuture] = {}
        self.seconds: list[float] = []
        self.submit_error: BaseException | None = None
        self.problems: list[str] = []

    # ------------------------------------------------------------------ processes

    def start_node(self) -> str:
        self.node_count += 1
        name = f"chaos-node-{self.node_count}"
        extra = () if self.args.verbose else ("--log-level", "error")
        self.nodes[name] = self.swarm.start_node(str(SKILLS), slots=self.args.slots, name=name, extra=extra)
        self.alive.add(name)
        return name

    def start_broker(self) -> None:
        last: Exception | None = None
        for _ in range(3):
            try:
                self.swarm.start_broker()
                return
            except ConnectError as exc:  # e.g. a port taken meanwhile: try again shortly
                last = exc
                time.sleep(1.0)
        raise ConnectError(f"the broker could not be (re)started: {last}")

    def restart_broker_i(self, i: int) -> None:
        """Start broker ``i`` of several again on its own port (a few tries)."""
        last: Exception | None = None
        for _ in range(3):
            try:
                self.swarm.restart_broker(i)
                return
            except ConnectError as exc:
                last = exc
                time.sleep(1.0)
        raise ConnectError(f"broker {i} could not be restarted: {last}")

    @property
    def n_brokers(self) -> int:
        return self.args.brokers

    def setup(self) -> None:
        a = self.args
        os.environ["ZLINK_CHAOS_LOG"] = str(self.log)  # LocalSwarm copies os.environ at spawn
        if not a.verbose:
            logging.getLogger("zlink").setLevel(logging.ERROR)
        if self.multi:
            self.swarm.start_brokers(a.brokers)
        else:
            self.start_broker()
        self.broker_up = set(range(a.brokers))
        for _ in range(a.nodes):
            self.start_node()
        for k in range(a.clients):
            name = "chaos-client" if a.clients == 1 else f"chaos-client-{k + 1}"
            self.clients.append(CountingClient(self.swarm.invite("client", name), connect_timeout=20))
        self.client = self.clients[0]
        for b in range(a.brokers):
            if self.multi:
                join = BrokerHome(self.swarm.home).invite(
                    name=f"chaos-monitor-{b + 1}", role="client", endpoints=[self.swarm.endpoints[b]]
                )
                self.monitor_joins[b] = join.with_seal_key(self.swarm.seal_key).dump()
            else:
                self.monitor_joins[b] = self.swarm.invite("client", "chaos-monitor")
            mon = self.monitors[b] = zlink.Client(self.monitor_joins[b], connect_timeout=20)
            self.swarm.wait_nodes(mon, a.nodes, timeout=30)

    def cleanup(self) -> list[int]:
        for c in (*self.clients, *self.monitors.values()):
            if c is not None:
                try:
                    c.close(timeout=2)
                except Exception:  # cleanup must go on
                    pass
        self.swarm.close(kill=True)  # resumes stopped nodes, kills them, stops the broker
        left = [pid for pid, _ in processes_mentioning(str(self.tmp))]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.environ.pop("ZLINK_CHAOS_LOG", None)
        return left

    # ------------------------------------------------------------------ schedule

    def plan(self) -> None:
        a = self.args
        kinds = ["kill"] * a.kills + ["stop"] * a.stops + ["broker"] * a.broker_restarts
        kinds += ["bkill"] * a.broker_kills + ["bstop"] * a.broker_stops
        self.rng.shuffle(kinds)
        lo, hi = 0.1 * a.duration, 0.8 * a.duration
        slot = (hi - lo) / max(1, len(kinds))
        if kinds and slot < 3.0:
            print(f"chaos: note: events only {slot:.1f} s apart; measurements may overlap", file=sys.stderr)
        for k, kind in enumerate(kinds):
            self.events.append(Event(at=lo + k * slot + self.rng.uniform(0, slot * 0.5), kind=kind))
        mean = min(1.0, max(0.002, 0.5 * a.duration * a.nodes * a.slots / max(1, a.tasks)))
        self.seconds = [round(self.rng.uniform(0, 2 * mean), 4) for _ in range(a.tasks)]

    def pick(self) -> str | None:
        choices = sorted(self.alive - self.stopped)
        return self.rng.choice(choices) if choices else None

    def do(self, ev: Event) -> None:
        if ev.kind == "kill":
            name = self.pick()
            if name is None:
                return
            proc = self.nodes[name]
            proc.kill()
            ev.node, ev.done_at = name, time.monotonic()
            proc.wait(5)
            self.alive.discard(name)
            ev.info["replacement"] = self.start_node()  # keep the capacity
        elif ev.kind == "stop":
            name = self.pick()
            if name is None or len(self.alive - self.stopped) < 2:
                return  # keep one node running
            self.nodes[name].send_signal(signal.SIGSTOP)
            ev.node, ev.done_at = name, time.monotonic()
            self.stopped.add(name)
            cont = Event(at=ev.at + self.rng.uniform(*STOP_SECONDS), kind="cont", node=name)
            self.events.append(cont)
            self.events.sort(key=lambda e: e.at)
        elif ev.kind == "cont":
            self.nodes[ev.node].send_signal(signal.SIGCONT)
            ev.done_at = time.monotonic()
            self.stopped.discard(ev.node)
        elif ev.kind == "broker":
            if self.multi:
                self.kill_broker(ev, self.rng.uniform(*BROKER_DOWN))
            else:
                self.restart_broker(ev)
        elif ev.kind == "bkill":
            self.kill_broker(ev, self.rng.uniform(*BROKER_KILL_DOWN))
        elif ev.kind == "bstop":
            self.stop_broker(ev)
        elif ev.kind in ("bstart", "bcont"):
            self.broker_back(ev)

    def restart_broker(self, ev: Event) -> None:
        """The one broker: kill -9, down for a moment, started again (everything waits meanwhile)."""
        assert self.swarm.broker is not None
        down = self.rng.uniform(*BROKER_DOWN)
        ev.broker = 0
        ev.info["expect_nodes"] = len(self.alive - self.stopped)
        # the monitor pauses: a STATUS lost in the outage would break its client (a
        # known bug); it connects a fresh client once the broker is back
        with self.monitor_lock:
            self.close_monitor(0)
            self.broker_up.discard(0)
            self.swarm.broker.kill()
            ev.done_at = time.monotonic()
            self.swarm.broker.wait(5)
            time.sleep(down)
            self.start_broker()
            self.broker_up.add(0)
            ev.info["down"] = round(time.monotonic() - ev.done_at, 3)
            ev.info["up_at"] = time.monotonic()

    # ------------------------------------------------------------------ several brokers

    def close_monitor(self, b: int) -> None:
        """Forget broker ``b``'s monitor (a STATUS lost in an outage would break it); a new one is made later."""
        mon = self.monitors.get(b)
        self.monitors[b] = None
        if mon is not None:
            try:
                mon.close(timeout=1)
            except ZlinkError:
                pass

    def pick_broker(self, ev: Event) -> int | None:
        """A broker that is up, provided another one stays up; None (the event is skipped) otherwise.

        Every other broker action (the first, the third, ...) hits a broker some client
        uses, when one is up, so that every run makes clients fail over; the others hit
        any broker up.
        """
        up = sorted(self.broker_up)
        if len(up) < 2:
            ev.info["skipped"] = f"only {len(up)} broker(s) up: never all at once"
            return None
        self.broker_actions += 1
        if self.broker_actions % 2 == 1:
            used = {self.swarm.endpoints.index(c.endpoint) for c in self.clients if c.endpoint in self.swarm.endpoints}
            serving = [b for b in up if b in used]
            if serving:
                return self.rng.choice(serving)
        return self.rng.choice(up)

    def _take_down(self, ev: Event, b: int) -> None:
        endpoint = self.swarm.endpoints[b]
        ev.broker = b
        ev.info["clients_on_it"] = [k for k, c in enumerate(self.clients) if c.endpoint == endpoint]
        with self.monitor_lock:
            self.close_monitor(b)
            self.broker_up.discard(b)

    def _schedule(self, ev: Event, kind: str, after: float) -> None:
        self.events.append(Event(at=ev.at + after, kind=kind, broker=ev.broker, parent=ev))
        self.events.sort(key=lambda e: e.at)

    def kill_broker(self, ev: Event, down: float) -> None:
        """kill -9 one broker of several; it is started again ``down`` seconds later (a bstart event)."""
        b = self.pick_broker(ev)
        if b is None:
            return
        self._take_down(ev, b)
        proc = self.swarm.brokers[b]
        assert proc is not None
        proc.kill()
        ev.done_at = time.monotonic()
        proc.wait(5)
        self._schedule(ev, "bstart", down)

    def stop_broker(self, ev: Event) -> None:
        """SIGSTOP one broker of several; SIGCONT 2-4 s later (a bcont event)."""
        b = self.pick_broker(ev)
        if b is None:
            return
        self._take_down(ev, b)
        proc = self.swarm.brokers[b]
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        ev.done_at = time.monotonic()
        self._schedule(ev, "bcont", self.rng.uniform(*STOP_SECONDS))

    def broker_back(self, ev: Event) -> None:
        """bstart: start the killed broker again; bcont: thaw the stopped one."""
        parent = ev.parent
        assert parent is not None
        b = ev.broker
        if ev.kind == "bstart":
            self.restart_broker_i(b)
        else:
            proc = self.swarm.brokers[b]
            assert proc is not None
            proc.send_signal(signal.SIGCONT)
        ev.done_at = time.monotonic()
        parent.info["down"] = round(ev.done_at - parent.done_at, 3)
        parent.info["up_at"] = ev.done_at
        parent.info["expect_nodes"] = len(self.alive - self.stopped)
        with self.monitor_lock:
            self.broker_up.add(b)

    # ------------------------------------------------------------------ threads

    def monitor_loop(self) -> None:
        next_t = time.monotonic()
        while not self.stop_threads.is_set():
            with self.monitor_lock:
                for b in range(self.n_brokers):
                    self.sample(b)
            next_t += POLL
            self.stop_threads.wait(max(0.0, next_t - time.monotonic()))
            next_t = max(next_t, time.monotonic() - POLL)

    def sample(self, b: int) -> None:
        """One STATUS from broker ``b`` (monitor lock held); a fresh monitor client when it has none."""
        timeout = 10.0 if not self.multi else 5.0
        mon = self.monitors.get(b)
        if mon is not None:
            try:
                st = mon.status(1.0)
                self.samples.append(
                    Sample(
                        time.monotonic(),
                        {n["name"]: n["busy"] for n in st["nodes"]},
                        dict(st["counters"]),
                        st["epoch"],
                        b,
                    )
                )
            except ZlinkError:
                self.monitor_failures += 1
                try:  # start over with a fresh client (a lost STATUS breaks the old one)
                    mon.close(timeout=1)
                    self.monitors[b] = zlink.Client(self.monitor_joins[b], connect_timeout=timeout)
                except ZlinkError:
                    self.monitors[b] = None
        if self.monitors.get(b) is None and b in self.broker_up:
            try:
                self.monitors[b] = zlink.Client(self.monitor_joins[b], connect_timeout=timeout)
            except ZlinkError:
                pass

    def epoch_loop(self) -> None:
        """When each client re-registers: with a new broker epoch, or with another broker (every 20 ms)."""
        c = self.client
        assert c is not None
        last: dict[int, tuple[str, bool]] = {}
        while not self.stop_threads.wait(0.02):
            now = time.monotonic()
            if c.welcome is not None and (not self.client_epochs or self.client_epochs[-1][1] != c.epoch):
                self.client_epochs.append((now, c.epoch))
            for k, cl in enumerate(self.clients):
                state = (cl.endpoint, cl.welcome is not None)
                if last.get(k) != state:
                    last[k] = state
                    self.client_track.append((now, k, *state))

    def submit_loop(self) -> None:
        assert self.clients
        span = 0.7 * self.args.duration
        timeout = self.args.duration * 3 + 120
        try:
            for i, secs in enumerate(self.seconds):
                due = self.t0 + span * i / max(1, len(self.seconds))
                delay = due - time.monotonic()
                if delay > 0 and self.stop_threads.wait(delay):
                    return
                client = self.clients[i % len(self.clients)]  # round robin over the clients
                self.owner[i] = client
                self.futures[i] = client.task("work", i, secs, timeout=timeout, max_attempts=self.args.max_attempts)
        except BaseException as exc:  # reported as a failed check
            self.submit_error = exc

    # ------------------------------------------------------------------ the whole run

    def run(self) -> dict[str, Any]:
        a = self.args
        self.plan()
        self.setup()
        assert self.client is not None
        self.t0 = time.monotonic()
        threads = [
            threading.Thread(target=self.monitor_loop, name="chaos-monitor", daemon=True),
            threading.Thread(target=self.submit_loop, name="chaos-submit", daemon=True),
            threading.Thread(target=self.epoch_loop, name="chaos-epochs", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            k = 0
            while k < len(self.events):
                ev = self.events[k]
                delay = self.t0 + ev.at - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, 0.1))
                    continue
                self.do(ev)
                k += 1
            threads[1].join(a.duration + 60)
            # leave the last event time to be noticed (detection is measured from outside)
            last = max((e.done_at for e in self.events if e.done_at), default=0.0)
            time.sleep(max(0.0, min(5.0, last + 5.0 - time.monotonic())))
            deadline = self.t0 + a.duration + a.drain
            waited = cf.wait(list(self.futures.values()), timeout=max(1.0, deadline - time.monotonic()))
            wall = time.monotonic() - self.t0
            time.sleep(1.0)  # room for a duplicate result to show up
        finally:
            self.stop_threads.set()
            for t in threads:
                t.join(5)
        return self.report(wall, len(waited.not_done))

    # ------------------------------------------------------------------ checks and figures

    def first_after(self, t: float, pred: Any, until: float = float("inf"), broker: int | None = None) -> float | None:
        for s in self.samples:
            if t <= s.t <= until and (broker is None or s.broker == broker) and pred(s):
                return s.t - t
        return None

    def last_before(self, t: float, broker: int | None = None) -> Sample | None:
        best = None
        for s in self.samples:
            if s.t < t:
                if broker is None or s.broker == broker:
                    best = s
            else:
                break
        return best

    def steady_brokers(self, t: float) -> list[int]:
        """Brokers no broker action touched from 1 s before ``t`` to 10 s after (all, with one broker).

        A node event is timed on them: a broker that was down or frozen meanwhile lists nodes late or anew.
        """
        if not self.multi:
            return [0]
        touched = set()
        for ev in self.events:
            if ev.kind in ("broker", "bkill", "bstop") and ev.done_at:
                back = ev.info.get("up_at", float("inf")) + 3.0
                if ev.done_at - 1.0 <= t + 10.0 and back >= t - 1.0:
                    touched.add(ev.broker)
        return [b for b in range(self.n_brokers) if b not in touched] or list(range(self.n_brokers))

    def node_first_after(self, t: float, pred: Any, until: float = float("inf")) -> float | None:
        """:meth:`first_after` for a node event: when every steady broker shows it (the latest of them)."""
        found = [self.first_after(t, pred, until, b) for b in self.steady_brokers(t)]
        times = [x for x in found if x is not None]
        return max(times) if times and len(times) == len(found) else None

    def moved_after(self, ev: Event) -> float | None:
        """How long until every client on the broker ``ev`` took down was registered with another one."""
        victim = self.swarm.endpoints[ev.broker]
        if not ev.info.get("clients_on_it"):
            return None
        worst = 0.0
        for k in ev.info["clients_on_it"]:
            t = next(
                (t for t, kk, ep, ok in self.client_track if kk == k and t >= ev.done_at and ep != victim and ok),
                None,
            )
            if t is None:
                return None
            worst = max(worst, t - ev.done_at)
        return worst

    def report(self, wall: float, not_done: int) -> dict[str, Any]:
        a = self.args
        c0 = self.client
        assert c0 is not None
        wrong: list[str] = []
        failed: collections.Counter[str] = collections.Counter()
        pending = 0
        multi_resolved = dup_delivered = undelivered = 0
        dups: list[dict[str, Any]] = []
        for i, fut in self.futures.items():
            c = self.owner[i]
            if not fut.done():
                pending += 1
                continue
            exc = fut.exception(0)
            if exc is not None:
                failed[type(exc).__name__] += 1
            elif fut.result(0) != i * i:
                wrong.append(f"task {i}: {fut.result(0)!r} != {i * i}")
            if c.resolutions[fut.tid] != 1:
                multi_resolved += 1
            n = c.deliveries[fut.tid]
            if n > 1:
                dup_delivered += 1
                dups.append(
                    {
                        "task": i,
                        "results": [
                            {"t": round(t - self.t0, 3), "attempt": att, "status": st}
                            for t, att, st in c.delivered[fut.tid]
                        ],
                    }
                )
            elif n == 0 and exc is None:
                undelivered += 1
        runs = work_runs(self.log)
        executions = sum(len(p) for p in runs.values())
        rerun = {i: len(p) for i, p in runs.items() if len(p) > 1}
        never_ran = [i for i, f in self.futures.items() if f.done() and f.exception(0) is None and i not in runs]

        if self.submit_error is not None:
            self.problems.append(f"submitting failed: {self.submit_error!r}")
        if len(self.futures) != a.tasks:
            self.problems.append(f"only {len(self.futures)} of {a.tasks} tasks were submitted")
        if pending or not_done:
            self.problems.append(f"{pending} tasks never resolved")
        if failed:
            self.problems.append(f"tasks failed: {dict(failed)}")
        if wrong:
            self.problems.append(f"{len(wrong)} wrong results, e.g. {wrong[:3]}")
        if multi_resolved:
            self.problems.append(f"{multi_resolved} futures resolved more than once")
        if dup_delivered and a.strict_wire:
            self.problems.append(f"{dup_delivered} tasks had their final RESULT sent to the client more than once")
        if undelivered:
            self.problems.append(f"{undelivered} successful tasks without a RESULT on the wire")
        if never_ran:
            self.problems.append(f"{len(never_ran)} tasks have a result but no logged execution: {never_ran[:5]}")

        # figures from the status samples
        kills, stops, conts, restarts = [], [], [], []
        brokers_hit: list[dict[str, Any]] = []
        for ev in self.events:
            if not ev.done_at:
                continue
            if ev.kind == "kill":
                befores = [self.last_before(ev.done_at, b) for b in range(self.n_brokers)]
                requeued = [
                    self.first_after(
                        ev.done_at, lambda s, r=bs.counters["requeued"]: s.counters["requeued"] > r, ev.done_at + 10, b
                    )
                    for b, bs in enumerate(befores)
                    if bs is not None
                ]  # on whichever broker held the node's tasks: the first that re-queued some
                kills.append(
                    {
                        "node": ev.node,
                        "busy_before": sum(bs.busy.get(ev.node, 0) for bs in befores if bs is not None)
                        if any(bs is not None and ev.node in bs.busy for bs in befores)
                        else None,
                        "unlisted_after": self.node_first_after(ev.done_at, lambda s, n=ev.node: n not in s.busy),
                        "requeued_after": min((x for x in requeued if x is not None), default=None),
                    }
                )
            elif ev.kind == "stop":
                stops.append(
                    {
                        "node": ev.node,
                        "dead_after": self.node_first_after(ev.done_at, lambda s, n=ev.node: n not in s.busy),
                    }
                )
            elif ev.kind == "cont":
                conts.append(
                    {
                        "node": ev.node,
                        "rejoined_after": self.node_first_after(ev.done_at, lambda s, n=ev.node: n in s.busy),
                    }
                )
            elif ev.kind in ("broker", "bkill", "bstop") and self.multi:
                up = ev.info.get("up_at")
                expect = ev.info.get("expect_nodes", 1)
                brokers_hit.append(
                    {
                        "kind": {"broker": "restart", "bkill": "kill", "bstop": "stop"}[ev.kind],
                        "broker": ev.broker,
                        "t": round(ev.done_at - self.t0, 3),
                        "down": ev.info.get("down"),
                        "clients_on_it": ev.info.get("clients_on_it", []),
                        "clients_moved_after": self.moved_after(ev),
                        "nodes_back_after": None
                        if up is None
                        else self.first_after(up, lambda s, n=expect: len(s.busy) >= n, up + 30, ev.broker),
                    }
                )
            elif ev.kind == "broker":
                up = ev.info.get("up_at", ev.done_at)
                expect = ev.info.get("expect_nodes", 1)
                client_back = next((t - up for t, _ in self.client_epochs if t >= up), None)
                restarts.append(
                    {
                        "down": ev.info.get("down"),
                        "nodes_back_after": self.first_after(up, lambda s, n=expect: len(s.busy) >= n, up + 30),
                        "client_back_after": client_back,
                    }
                )
        last = {b: self.last_before(float("inf"), b) for b in range(self.n_brokers)}
        by_broker = {str(b): s.counters for b, s in last.items() if s is not None}
        final = self.samples[-1].counters if self.samples and not self.multi else {}
        moved = [h["clients_moved_after"] for h in brokers_hit if h["clients_on_it"]]
        out: dict[str, Any] = {
            "ok": not self.problems,
            "problems": self.problems,
            "seed": a.seed,
            "long": a.long,
            "workdir": str(self.tmp),
            "brokers": a.brokers,
            "clients": a.clients,
            "nodes": a.nodes,
            "slots": a.slots,
            "tasks": a.tasks,
            "duration": a.duration,
            "wall": round(wall, 2),
            "mean_task_seconds": round(statistics.fmean(self.seconds), 4) if self.seconds else 0.0,
            "completed": sum(1 for f in self.futures.values() if f.done() and f.exception(0) is None),
            "failed": dict(failed),
            "pending": pending,
            "futures_resolved_twice": multi_resolved,
            "duplicate_wire_results": dup_delivered,
            "executions": executions,
            "tasks_run_more_than_once": len(rerun),
            "re_executions": executions - len(runs),
            "node_kills": len(kills),
            "stops": len(stops),
            "broker_restarts": len(restarts) + sum(1 for h in brokers_hit if h["kind"] == "restart"),
            "broker_kills": sum(1 for h in brokers_hit if h["kind"] == "kill"),
            "broker_stops": sum(1 for h in brokers_hit if h["kind"] == "stop"),
            "skipped": [
                {"t": round(e.at, 3), "kind": e.kind, "why": e.info["skipped"]}
                for e in self.events
                if "skipped" in e.info
            ],
            "brokers_detail": brokers_hit,
            "broker_clients_moved": spread([x for x in moved if x is not None]),
            "broker_clients_not_moved": sum(1 for x in moved if x is None),
            "broker_nodes_back": spread(
                [h["nodes_back_after"] for h in brokers_hit if h["nodes_back_after"] is not None]
            ),
            "detection_unlisted": spread([k["unlisted_after"] for k in kills if k["unlisted_after"] is not None]),
            "detection_requeued": spread([k["requeued_after"] for k in kills if k["requeued_after"] is not None]),
            "stop_declared_dead": spread([s["dead_after"] for s in stops if s["dead_after"] is not None]),
            "cont_rejoined": spread([s["rejoined_after"] for s in conts if s["rejoined_after"] is not None]),
            "restart_nodes_back": spread(
                [r["nodes_back_after"] for r in restarts if r["nodes_back_after"] is not None]
            ),
            "restart_client_back": spread(
                [r["client_back_after"] for r in restarts if r["client_back_after"] is not None]
            ),
            "duplicates": dups,
            "client_hellos": [round(t - self.t0, 3) for t in c0.hellos if t >= self.t0],
            "client_welcomes": [[round(t - self.t0, 3), new] for t, new in c0.welcomes if t >= self.t0],
            "client_moves": [
                [round(t - self.t0, 3), k, self.broker_index(ep), ok]
                for t, k, ep, ok in self.client_track
                if t >= self.t0
            ],
            "events": [
                {
                    "t": round(e.done_at - self.t0, 3),
                    "kind": e.kind,
                    "node": e.node,
                    **({"broker": e.broker} if self.multi and e.broker >= 0 else {}),
                    **{k: v for k, v in e.info.items() if k != "up_at"},
                }
                for e in self.events
                if e.done_at
            ],
            "kills": kills,
            "stops_detail": stops,
            "conts_detail": conts,
            "restarts_detail": restarts,
            "status_samples": len(self.samples),
            "monitor_failures": self.monitor_failures,
            "broker_counters": final,
            "broker_counters_by_broker": by_broker,
        }
        return out

    def broker_index(self, endpoint: str) -> int:
        eps = self.swarm.endpoints or [self.swarm.endpoint]
        return eps.index(endpoint) if endpoint in eps else -1


def print_report(r: dict[str, Any]) -> None:
    multi = r["brokers"] > 1
    swarm = f"{r['brokers']} brokers, {r['clients']} clients, " if multi else ""
    print(
        f"chaos: {swarm}{r['nodes']} nodes x {r['slots']} slots, {r['tasks']:,} tasks "
        f"(mean {r['mean_task_seconds']} s), seed {r['seed']}, {r['wall']:.1f} s"
    )
    more = f", {r['broker_kills']} broker kills, {r['broker_stops']} broker stop/cont" if multi else ""
    print(
        f"  events:      {r['node_kills']} node kills, {r['stops']} stop/cont, {r['broker_restarts']} broker restarts"
        f"{more}"
    )
    if r["skipped"]:
        print(f"  skipped:     {len(r['skipped'])} ({r['skipped'][0]['why']})")
    print(
        f"  results:     {r['completed']:,}/{r['tasks']:,} correct, failed {r['failed'] or 0}, pending {r['pending']}, "
        f"futures resolved twice {r['futures_resolved_twice']}"
    )
    print(
        f"  executions:  {r['executions']:,} ({r['tasks_run_more_than_once']} tasks ran more than once, "
        f"{r['re_executions']} re-executions)"
    )
    print(
        f"  wire:        {r['duplicate_wire_results']} tasks whose final RESULT reached the client twice "
        "(dropped by the client)"
    )
    print(f"  kill -9 -> node unlisted:     {fmt_spread(r['detection_unlisted'])}")
    print(f"  kill -9 -> tasks re-queued:   {fmt_spread(r['detection_requeued'])}")
    print(f"  SIGSTOP -> declared dead:     {fmt_spread(r['stop_declared_dead'])}")
    print(f"  SIGCONT -> listed again:      {fmt_spread(r['cont_rejoined'])}")
    keys = ("requeued", "stale_results", "nodes_died", "lost", "undeliverable")
    if multi:
        not_moved = f" ({r['broker_clients_not_moved']} never moved)" if r["broker_clients_not_moved"] else ""
        print(f"  broker down -> clients moved: {fmt_spread(r['broker_clients_moved'])}{not_moved}")
        print(f"  broker back -> nodes back:    {fmt_spread(r['broker_nodes_back'])}")
        for b, bc in sorted(r["broker_counters_by_broker"].items()):
            print(f"  broker {b} (last epoch): " + ", ".join(f"{k} {bc.get(k, '?')}" for k in keys))
    else:
        print(f"  broker restart -> nodes back: {fmt_spread(r['restart_nodes_back'])}")
        print(f"  broker restart -> client back:{fmt_spread(r['restart_client_back'])}")
        bc = r["broker_counters"]
        print("  broker (last epoch): " + ", ".join(f"{k} {bc.get(k, '?')}" for k in keys))
    if r["ok"]:
        print("CHAOS OK")
    else:
        print("CHAOS FAILED:")
        for p in r["problems"]:
            print(f"  - {p}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--brokers", type=int, default=1, help="brokers of the swarm (default 1; 2 or more: multi-broker mode)"
    )
    ap.add_argument("--clients", type=int, default=None, help="task clients (default 1; with --brokers: 3)")
    ap.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    ap.add_argument("--slots", type=int, default=2, help="slots per node (default 2)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks to run (default 2,000; --long 20,000)")
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds of submitting and chaos (default 30; --long 180)"
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the chaos schedule and task lengths (default 1)")
    ap.add_argument("--kills", type=int, default=None, help="node kill -9s (default 3; --long 15)")
    ap.add_argument("--stops", type=int, default=None, help="node SIGSTOP/SIGCONTs (default 2; --long 8)")
    ap.add_argument("--broker-restarts", type=int, default=None, help="broker kill -9 + restarts (default 1; --long 4)")
    ap.add_argument(
        "--broker-kills", type=int, default=None,
        help="with --brokers: broker kill -9s, restarted 3-6 s later (default 1; --long 3)",
    )  # fmt: skip
    ap.add_argument(
        "--broker-stops", type=int, default=None,
        help="with --brokers: broker SIGSTOP/SIGCONTs, 2-4 s apart (default 1; --long 3)",
    )  # fmt: skip
    ap.add_argument("--max-attempts", type=int, default=10, help="max_attempts of each task (default 10)")
    ap.add_argument("--drain", type=float, default=90.0, help="seconds allowed after --duration to finish (default 90)")
    ap.add_argument("--long", action="store_true", help="a long run: ~3 minutes, more tasks and events")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH", help="write the report as JSON")
    ap.add_argument(
        "--strict-wire",
        action="store_true",
        help="also fail when a final RESULT reaches the client twice on the wire\n"
        "(the client drops the second one; by default this is reported, not failed:\n"
        "a known zlink bug after broker restarts, see the report)",
    )
    ap.add_argument("--verbose", action="store_true", help="keep the nodes' and client's warnings")
    args = ap.parse_args(argv)
    long_ = {"tasks": 20_000, "duration": 180.0, "kills": 15, "stops": 8, "broker_restarts": 4}
    short = {"tasks": 2_000, "duration": 30.0, "kills": 3, "stops": 2, "broker_restarts": 1}
    multi = args.brokers > 1
    long_ |= {"broker_kills": 3 if multi else 0, "broker_stops": 3 if multi else 0}
    short |= {"broker_kills": 1 if multi else 0, "broker_stops": 1 if multi else 0, "clients": 3 if multi else 1}
    long_["clients"] = short["clients"]
    for key, value in (long_ if args.long else short).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.nodes < 2 or args.slots < 1 or args.tasks < 1 or args.duration <= 0:
        ap.error("need --nodes >= 2, --slots >= 1, --tasks >= 1, --duration > 0")
    if args.brokers < 1 or args.clients < 1:
        ap.error("need --brokers >= 1 and --clients >= 1")
    if not multi and (args.broker_kills or args.broker_stops):
        ap.error("--broker-kills and --broker-stops need --brokers >= 2 (one broker always stays up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chaos = Chaos(args)
    report: dict[str, Any] | None = None
    code = 2
    try:
        report = chaos.run()
        code = 0 if report["ok"] else 1
    except (ZlinkError, OSError, subprocess.SubprocessError) as exc:
        print(f"chaos: the run could not go on: {exc!r}", file=sys.stderr)
    finally:
        left = chaos.cleanup()
        if left:
            print(f"chaos: killed {len(left)} processes left behind: {left}", file=sys.stderr)
            if report is not None:
                report["ok"] = False
                report["problems"].append(f"processes left behind: {left}")
                code = 1
    if report is None:
        return code
    if args.json == "-":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
