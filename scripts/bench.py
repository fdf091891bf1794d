"""Loopback benchmark: zlink versus a minimal raw CurveZMQ ROUTER/DEALER relay.

Both systems run as separate processes on 127.0.0.1 with CurveZMQ on every
socket, with the same shape: one relay (the raw loop, or the zlink broker),
W worker processes (raw DEALER echo workers, or ``zlink node`` processes running
``scripts/bench_skills.py``) and one client in this process. The raw relay is
the floor: routing ids only, round-robin to workers, no heartbeats, no
bookkeeping. The ratio column says how far zlink is from that floor.

    python scripts/bench.py --quick               # smoke test, well under a minute
    python scripts/bench.py                       # 10,000 tasks, 2,000 round trips
    python scripts/bench.py --repeat 3 --json /tmp/bench.json --markdown /tmp/bench.md

Each measurement is one function returning a dict; the printed table is built
from :data:`ROWS`, so a new figure is a new measurement plus a row or two.
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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SKILLS_FILE = HERE / "bench_skills.py"
PAYLOAD_SIZE = 20  # bytes of request body in the raw relay (a msgpack'd small int in zlink is smaller)
HWM = 100_000  # same order as zlink's DEALER/ROUTER high-water marks
STALL_S = 15.0  # no progress for this long fails a measurement
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
                    frames = back.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) == 2 and frames[1] == b"READY":
                    workers.append(frames[0])
                    if len(workers) == workers_expected:
                        ctrl.send(("ready", len(workers)))
                    while waiting:
                        back.send_multipart([workers[rr % len(workers)], *waiting.popleft()])
                        rr += 1
                    continue
                front.send_multipart(frames[1:])  # [client id, body] back to the client
        if front in events:
            for _ in range(1000):
                try:
                    frames = front.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if not workers:
                    waiting.append(frames)
                    continue
                back.send_multipart([workers[rr % len(workers)], *frames])
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
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            sock.send_multipart(frames)
    ctx.destroy(linger=0)


class RawRelay:
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

    def __enter__(self) -> RawRelay:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def cpu_meter(self) -> CpuMeter:
        return CpuMeter(self.relay_pid, self.worker_pids)


# =========================================================================== zlink


class ZlinkSwarm:
    """``LocalSwarm``: the CLI broker, ``workers`` CLI nodes on bench_skills.py, a Client in this process."""

    name = "zlink"

    def __init__(
        self, workers: int = 2, slots: int = 4, prefetch: int | None = None, start_timeout: float = 30.0
    ) -> None:
        self.n_workers = workers
        self.slots = slots
        self.prefetch = prefetch
        self.start_timeout = start_timeout
        self.swarm: Any = None
        self.client: Any = None
        self.relay_pid = 0
        self.worker_pids: list[int] = []

    def __enter__(self) -> ZlinkSwarm:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        from zlink import Client
        from zlink.demo import LocalSwarm

        self.swarm = LocalSwarm()
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
                got = list(self.client.map("noop", range(n), window=window))
            except Exception as exc:
                if fired.is_set():
                    raise BenchError(f"zlink map over its time budget of {budget:g} s") from exc
                raise
        if len(got) != n or got[0] != 0 or got[-1] != n - 1:
            raise BenchError("zlink map returned wrong results")

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

    def cpu_meter(self) -> CpuMeter:
        return CpuMeter(self.relay_pid, self.worker_pids)


System = RawRelay | ZlinkSwarm


# =========================================================================== measurements


@dataclass(frozen=True)
class Settings:
    tasks: int
    rtt: int
    warmup: int
    window: int
    workers: int
    slots: int
    prefetch: int | None  # None: zlink's default (at most 1024, adapted by the broker)
    repeat: int
    pick: str  # "best" or "median"
    budget: float  # seconds per measurement run


def measure_throughput(system: System, cfg: Settings) -> dict[str, float]:
    """Pipelined tasks/s: ``cfg.tasks`` tiny requests, at most ``cfg.window`` in flight."""
    system.pipelined(cfg.warmup, cfg.window, cfg.budget)
    with system.cpu_meter() as cpu:
        t0 = time.perf_counter()
        system.pipelined(cfg.tasks, cfg.window, cfg.budget)
        wall = time.perf_counter() - t0
    return {"tasks_per_s": cfg.tasks / wall, "seconds": wall, "tasks": cfg.tasks, **cpu.per_task_us(cfg.tasks)}


def measure_round_trip(system: System, cfg: Settings) -> dict[str, float]:
    """Sequential single-request latency (one in flight)."""
    system.round_trips(max(20, cfg.warmup // 5), cfg.budget)
    return latency_summary(system.round_trips(cfg.rtt, cfg.budget))


#: measurement name -> function(system, settings) -> figures
MEASUREMENTS: dict[str, Callable[[System, Settings], dict[str, float]]] = {
    "throughput": measure_throughput,
    "round_trip": measure_round_trip,
}
#: the systems compared, in the order they run; each is a context manager that starts and stops its processes
SYSTEMS: dict[str, Callable[[Settings], System]] = {
    "raw": lambda cfg: RawRelay(cfg.workers),
    "zlink": lambda cfg: ZlinkSwarm(cfg.workers, cfg.slots, cfg.prefetch),
}
#: figures echoed on stderr as each run finishes
BRIEF_KEYS = ("tasks_per_s", "p50_ms", "p99_ms")
#: which systems each measurement runs on (a zlink-only figure such as failure detection lists only "zlink")
MEASURED_ON: dict[str, tuple[str, ...]] = {
    "throughput": ("raw", "zlink"),
    "round_trip": ("raw", "zlink"),
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure of a measurement, compared zlink / raw."""

    measurement: str
    key: str
    label: str
    fmt: str = "{:,.2f}"
    higher_is_better: bool = False
    target: float | None = None  # on zlink/raw; >= target if higher is better, else <= target

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}x"


ROWS: list[Row] = [
    Row("throughput", "tasks_per_s", "throughput (tasks/s, {tasks})", "{:,.0f}", higher_is_better=True, target=0.5),
    Row("round_trip", "p50_ms", "round trip p50 (ms)", "{:,.3f}", target=2.0),
    Row("round_trip", "p99_ms", "round trip p99 (ms)", "{:,.3f}"),
    Row("throughput", "relay_cpu_us_per_task", "relay/broker CPU per task (us)", "{:,.1f}"),
    Row("throughput", "worker_cpu_us_per_task", "worker/node CPU per task (us)", "{:,.1f}"),
    Row("throughput", "client_cpu_us_per_task", "client CPU per task (us)", "{:,.1f}"),
]


def pick(values: list[float], higher_is_better: bool, how: str) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan
    if how == "median":
        return statistics.median(vals)
    return max(vals) if higher_is_better else min(vals)


def run_all(cfg: Settings, log: Callable[[str], None]) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Run every measurement ``cfg.repeat`` times on both systems.

    Only one system is up at a time (an idle system must not take CPU from the
    one being measured), and the systems alternate on every repeat so that
    noise from the rest of the machine hits both alike.
    """
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {s: [] for s in SYSTEMS} for m in MEASUREMENTS}
    for rep in range(cfg.repeat):
        for sname, make in SYSTEMS.items():
            names = [m for m in MEASUREMENTS if sname in MEASURED_ON[m]]
            if not names:
                continue
            t_start = time.monotonic()
            with make(cfg) as system:
                log(f"  run {rep + 1}/{cfg.repeat} {sname}: started in {time.monotonic() - t_start:.1f} s")
                for mname in names:
                    t0 = time.monotonic()
                    result = MEASUREMENTS[mname](system, cfg)
                    runs[mname][sname].append(result)
                    brief = ", ".join(f"{k}={v:,.3f}" for k, v in result.items() if k in BRIEF_KEYS)
                    log(f"  run {rep + 1}/{cfg.repeat} {sname:<5} {mname:<11} {brief}  ({time.monotonic() - t0:.1f} s)")
    return runs


def summarize(runs: dict[str, dict[str, list[dict[str, float]]]], cfg: Settings) -> list[dict[str, Any]]:
    rows = []
    for row in ROWS:
        per = runs.get(row.measurement, {})
        values = {}
        for sname in ("raw", "zlink"):
            samples = [r[row.key] for r in per.get(sname, []) if row.key in r]
            values[sname] = pick(samples, row.higher_is_better, cfg.pick) if samples else None
        raw_v, zl_v = values["raw"], values["zlink"]
        ratio = zl_v / raw_v if raw_v and zl_v is not None else None
        verdict = "-"
        if row.target is not None and ratio is not None:
            ok = ratio >= row.target if row.higher_is_better else ratio <= row.target
            verdict = "PASS" if ok else "MISS"
        rows.append({
            "metric": row.label.format(tasks=short_count(cfg.tasks)),
            "measurement": row.measurement,
            "key": row.key,
            "raw": raw_v,
            "zlink": zl_v,
            "ratio": ratio,
            "target": row.target_text(),
            "verdict": verdict,
            "fmt": row.fmt,
        })  # fmt: skip
    return rows


# =========================================================================== output


def short_count(n: int) -> str:
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


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    header = f"{'metric':<34}{'raw relay':>12}{'zlink':>12}{'ratio':>9}{'target':>10}{'':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"{r['metric']:<34}{fmt_value(r['raw'], r['fmt']):>12}{fmt_value(r['zlink'], r['fmt']):>12}"
            f"{ratio:>9}{r['target']:>10}{r['verdict']:>6}"
        )
    return lines


def machine_lines(m: dict[str, Any]) -> list[str]:
    return [
        f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu_model']}, {m['os']}",
        f"software: Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']} (CURVE {m['curve']}), "
        f"zlink {m['zlink']} {m['commit']}".rstrip(),
        f"load average at start: {' '.join(str(x) for x in m['load_avg'])}",
    ]


def settings_text(cfg: Settings) -> str:
    prefetch = "auto" if cfg.prefetch is None else cfg.prefetch
    return (
        f"{cfg.workers} workers/nodes ({cfg.slots} slots, prefetch {prefetch} per zlink node), window {cfg.window:,}, "
        f"{cfg.tasks:,} pipelined tasks, {cfg.rtt:,} sequential round trips, warm-up {cfg.warmup:,}; "
        f"{cfg.pick} of {cfg.repeat} run(s) per figure"
    )


def markdown(rows: list[dict[str, Any]], m: dict[str, Any], cfg: Settings, cmd: str) -> str:
    out = [
        "## Loopback overhead: zlink versus a raw CurveZMQ relay",
        "",
        "Both systems on 127.0.0.1 with CurveZMQ on every socket: one relay process (a minimal ROUTER/ROUTER "
        "loop that only routes by id, or the zlink broker), worker processes (DEALER echo workers, or "
        "`zlink node` processes running `scripts/bench_skills.py`) and one client in the benchmark process. "
        "The ratio is zlink / raw relay. The CPU rows are the user + system CPU time each process used during "
        "the throughput run, divided by the tasks (clock-tick resolution: 10 ms over the whole run); "
        "they show where the time goes, they have no target.",
        "",
        f"- Machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu_model']}, {m['os']}",
        f"- Software: Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}, zlink {m['zlink']}"
        + (f" (`{m['commit']}`)" if m["commit"] else ""),
        f"- Load average at start: {' '.join(str(x) for x in m['load_avg'])}",
        f"- Settings: {settings_text(cfg)}",
        f"- Reproduce: `{cmd}`",
        "",
        "| metric | raw relay | zlink | ratio | target | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = r["target"].replace(">=", "≥").replace("<=", "≤")
        out.append(
            f"| {r['metric']} | {fmt_value(r['raw'], r['fmt'])} | {fmt_value(r['zlink'], r['fmt'])} "
            f"| {ratio} | {target} | {r['verdict'] if r['verdict'] != '-' else ''} |"
        )
    return "\n".join(out) + "\n"


# =========================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small counts for a smoke test (2,000 tasks, 300 round trips)")
    ap.add_argument("--tasks", type=int, default=None, help="pipelined tasks for throughput (default 10,000)")
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
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every figure as JSON")
    ap.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write the table as a markdown section")
    args = ap.parse_args(argv)
    for name in ("tasks", "rtt", "warmup", "window", "workers", "slots", "repeat"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name} must be at least 1")
    if args.prefetch is not None and args.prefetch < 0:
        ap.error("--prefetch must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Settings(
        tasks=args.tasks or (2_000 if args.quick else 10_000),
        rtt=args.rtt or (300 if args.quick else 2_000),
        warmup=args.warmup or (200 if args.quick else 500),
        window=args.window,
        workers=args.workers,
        slots=args.slots,
        prefetch=args.prefetch,
        repeat=args.repeat,
        pick=args.pick,
        budget=args.budget,
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
        runs = run_all(cfg, log)
    except (BenchError, ZlinkError) as exc:
        print(f"bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted (every process it started was stopped)", file=sys.stderr)
        return 130
    rows = summarize(runs, cfg)
    lines = [
        *machine_lines(machine),
        f"settings: {settings_text(cfg)}",
        f"command: {cmd}",
        "",
        *table_lines(rows),
        "",
        f"ratio = zlink / raw relay; total {time.monotonic() - started:.1f} s",
    ]
    print("\n".join(lines))
    if args.json is not None:
        doc = {
            "machine": machine,
            "command": cmd,
            "settings": asdict(cfg),
            "rows": [{k: v for k, v in r.items() if k != "fmt"} for r in rows],
            "runs": runs,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"figures written to {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows, machine, cfg, cmd))
        print(f"markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
