"""Peers for ``scripts/bench.py``: Ray, Dask distributed and Celery (Redis), with the same tasks and figures.

Each peer is a class with the interface of the ``_System`` subclasses of
``scripts/bench.py`` (``RawRelay``, ``ZlinkSwarm``): a context manager that
starts everything on entry (and cleans up if that fails) and stops it on exit,
with ``name``, ``relay_pid``, ``worker_pids``, ``throughput``,
``cpu_meter()``, ``pipelined(n, window, budget)`` and
``round_trips(n, budget)``, so ``bench.measure_map`` and
``bench.measure_round_trip`` run on it as they are. It adds
``parallel_wait(n_tasks, seconds)`` (the wall time of ``n_tasks`` tasks that
each sleep ``seconds``, all in flight at once) and ``parallel_speedup(...)``
(a warm-up, then the figures of ``bench.measure_parallel_speedup``).

Every peer runs on 127.0.0.1 only, with :data:`PEER_WORKERS` (2) worker
processes and the tasks of ``scripts/bench_peer_tasks.py`` (``noop`` and
``wait``, as ``scripts/bench_skills.py`` serves them to zlink):

- **Ray** (:class:`RayPeer`): ``ray.init(num_cpus=2, include_dashboard=False)``
  local, in a temporary folder, node address 127.0.0.1 (Ray otherwise swaps
  127.0.0.1 for the machine's address and listens on every interface). No-op
  tasks are remote functions (``num_cpus=1``: 2 worker processes), mapped with
  ``ray.wait`` (``window // 20`` results at a time) keeping at most ``window``
  in flight; the 50 ms tasks run on 2 threaded actors (``max_concurrency`` =
  concurrency), called round-robin, created at the first ``parallel_wait``.
- **Dask** (:class:`DaskPeer`): ``LocalCluster(n_workers=2, processes=True,
  threads_per_worker=concurrency)`` on 127.0.0.1, no dashboard (scheduler and
  nannies in the client's process, 2 worker processes); ``client.map`` in
  chunks of ``window // 2``, at most two in flight, each collected with
  ``gather``.
- **Celery** (:class:`CeleryPeer`): Debian's ``redis-server`` on a free
  loopback port (``--save '' --appendonly no``) as broker and result backend,
  killed on exit; 2 ``celery worker`` subprocesses with the ``threads`` pool
  (``-c`` concurrency); ``group`` s of ``window // 2`` tasks, at most two in
  flight; a round trip is ``apply_async().get()``.

The peer's client side (``ray.init``, Dask's client with its scheduler,
Celery's app) runs in a driver process of its own, started by the class and
driven over a pipe: Ray's driver ends its whole process when its GCS is gone,
a hung start can be killed without harm, and nothing of a peer (threads,
environment, signal handlers) stays in the benchmark process. The round trips
are timed in the driver; the "client" CPU is the driver's. Each driver writes
the peers' logs to a file of its own (the tail is in any error).

:func:`available` says whether a peer can run here (``None``) or why not (a
string for "skipped: ..."); :data:`PEERS` maps each name to its class.

    python scripts/bench_peers.py                      # which peers can run here
    python scripts/bench.py --peers ray,dask           # measure them beside zlink and the raw relay

Every start and stop is bounded in time; on exit a peer stops what it started,
then kills by pid any of its processes still there (``leftovers`` lists them;
it should stay empty).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    # bench_peer_tasks must be importable here and, by reference, in the peers' workers (Dask's spawned
    # workers inherit sys.path; Ray gets HERE as its code search path; Celery's workers as PYTHONPATH)
    sys.path.insert(0, str(HERE))

import bench_peer_tasks as peer_tasks  # noqa: E402

PEER_WORKERS = 2  # worker processes per peer, as zlink's shared swarm has 2 nodes
#: per worker process, for the 50 ms tasks (Dask threads per worker, Celery -c, Ray actor max_concurrency):
#: 2 x 16 = 32 at once, as many as the 4 nodes x 8 slots of bench.py's parallel speed-up
PEER_CONCURRENCY = 16
STALL_S = 15.0  # no result for this long fails a measurement (as in bench.py)
WAIT_S = 0.05  # what the parallel tasks sleep
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"
RPC_SLACK_S = 30.0  # the driver enforces each budget itself; the benchmark process waits this much longer


class PeerError(RuntimeError):
    """A peer could not start, or a measurement on it could not finish (stalled, timed out, wrong results)."""


# =========================================================================== availability


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def available(name: str) -> str | None:
    """``None`` if peer ``name`` ("ray", "dask" or "celery") can run here, else why not (for "skipped: ...")."""
    hint = "pip install -e '.[bench]'"
    if name == "ray":
        return f"ray not installed ({hint})" if _missing("ray") else None
    if name == "dask":
        if _missing("dask"):
            return f"dask not installed ({hint})"
        return f"dask distributed not installed ({hint})" if _missing("distributed") else None
    if name == "celery":
        if _missing("celery"):
            return f"celery not installed ({hint})"
        if _missing("redis"):
            return f"the redis Python client not installed ({hint})"
        if shutil.which("redis-server") is None:
            return "redis-server not found (Debian: apt-get install -y redis-server)"
        return None
    return f"unknown peer {name!r} (choose from {', '.join(PEERS)})"


def version_of(name: str) -> str:
    """The installed version of a peer's main package ('' if unknown); Celery's includes redis-server's."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"ray": "ray", "dask": "distributed", "celery": "celery"}.get(name, name)
    try:
        text = version(package)
    except PackageNotFoundError:
        return ""
    exe = shutil.which("redis-server")
    if name == "celery" and exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
            server = next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), "")
            if server:
                text += f", redis-server {server}"
    return text


# =========================================================================== processes


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (0.0 if unreadable)."""
    try:
        fields = _stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time in clock ticks): still the same process later if both match."""
    try:
        return pid, int(_stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(ident: tuple[int, int]) -> bool:
    try:
        fields = _stat_fields(ident[0])
        return fields[0] != "Z" and int(fields[19]) == ident[1]
    except (OSError, IndexError, ValueError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def session_members(sid: int) -> list[int]:
    """Every live process of session ``sid`` but ``sid`` itself and this process (a driver's peer processes).

    Each driver starts a session of its own, so this finds the peer's processes
    even after their parent died (Ray's workers, for one, change their
    process group but not their session).
    """
    out: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (sid, me):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _stat_fields(int(entry))
                if int(fields[3]) == sid and fields[0] != "Z":
                    out.append(int(entry))
    return out


def sweep_session(sid: int, grace: float, rounds: int = 3) -> list[int]:
    """Kill every process of session ``sid`` (see :func:`session_members`), again while new ones appear."""
    killed: list[int] = []
    for _ in range(rounds):
        members = session_members(sid)
        if not members:
            break
        killed += kill_processes(_idents(members), grace)
    return killed


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def kill_processes(idents: list[tuple[int, int]], grace: float) -> list[int]:
    """SIGTERM these processes, wait up to ``grace`` s, then SIGKILL the rest; reap those that are our children.

    Each is given as (pid, start time), so a pid reused since is left alone.
    Returns the pids that were still up when called.
    """
    idents = [i for i in idents if _alive(i)]
    for pid, _ in idents:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(i) for i in idents):
        _reap(idents)
        time.sleep(0.05)
    for ident in idents:
        if _alive(ident):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(ident[0], signal.SIGKILL)
    time.sleep(0.05)
    _reap(idents)
    return [pid for pid, _ in idents]


def _reap(idents: list[tuple[int, int]]) -> None:
    for pid, _ in idents:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _idents(pids: list[int]) -> list[tuple[int, int]]:
    return [i for i in map(_identity, pids) if i is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _shared_helper(pid: int) -> bool:
    """multiprocessing's resource tracker: it serves the whole benchmark process and exits with it."""
    return "multiprocessing.resource_tracker" in cmdline(pid)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT during the block (main thread only) and raise KeyboardInterrupt after it if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; only the benchmark process handles it and cleans up
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PeerCpuMeter:
    """CPU seconds of a peer's processes during a block, with ``bench.CpuMeter``'s interface.

    ``relay`` is the peer's middle (Ray's GCS and raylet, Redis for Celery;
    nothing for Dask, whose scheduler runs in the client's process), ``client``
    the driver process (where ``ray.init``, Dask's client and scheduler, or
    Celery's app run), ``other`` the helpers (Ray's agents, monitors and
    minimal dashboard). A figure with no process is NaN (printed "-").
    """

    def __init__(
        self, relay_pids: list[int], worker_pids: list[int], client_pid: int, other_pids: list[int] | None = None
    ) -> None:
        self.relay_pids = list(relay_pids)
        self.worker_pids = list(worker_pids)
        self.client_pid = client_pid
        self.other_pids = list(other_pids or [])
        self.relay = self.workers = self.client = self.other = 0.0

    def _read(self) -> tuple[float, float, float, float]:
        def total(pids: list[int]) -> float:
            return sum(proc_cpu_seconds(p) for p in pids)

        return (
            total(self.relay_pids),
            total(self.worker_pids),
            proc_cpu_seconds(self.client_pid),
            total(self.other_pids),
        )

    def __enter__(self) -> PeerCpuMeter:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        self.relay, self.workers, self.client, self.other = (b - a for a, b in zip(self._start, end, strict=True))

    def per_task_us(self, n: int) -> dict[str, float]:
        return {
            "relay_cpu_us_per_task": self.relay / n * 1e6 if self.relay_pids else math.nan,
            "worker_cpu_us_per_task": self.workers / n * 1e6,
            "client_cpu_us_per_task": self.client / n * 1e6,
            "other_cpu_us_per_task": self.other / n * 1e6 if self.other_pids else math.nan,
            "total_cpu_us_per_task": (self.relay + self.workers + self.client + self.other) / n * 1e6,
        }


# =========================================================================== inside the driver: the backends


def _check(value: Any, expected: Any, peer: str) -> None:
    if value != expected:
        raise PeerError(f"{peer}: result {value!r} does not match the argument {expected!r}")


class _Backend:
    """One peer's client side, run in the driver process: starts the peer, runs the tasks, stops it."""

    name = "peer"

    def __init__(self, workers: int, concurrency: int, start_timeout: float, tmp: str, **options: Any) -> None:
        self.workers = workers
        self.concurrency = concurrency
        self.start_timeout = start_timeout
        self.tmp = tmp
        self.options = options
        self.timings: dict[str, float] = {}

    def setup(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> dict[str, list[int]]:
        """{"relay": [...], "workers": [...], "other": [...]}: the peer's processes now."""
        raise NotImplementedError

    def pipelined(self, n: int, window: int, budget: float) -> None:
        raise NotImplementedError

    def round_trips(self, n: int, budget: float) -> list[float]:
        raise NotImplementedError

    def run_wait(self, n: int, seconds: float, budget: float) -> None:
        raise NotImplementedError


class _RayBackend(_Backend):
    name = "ray"

    def setup(self) -> str:
        if self.options.get("map_with") == "actors":
            how = f"method calls round-robin on the {self.workers} actors below"
        else:
            how = f"remote functions (num_cpus=1: {self.workers} worker processes)"
        return (
            f"Ray {version_of('ray')}: ray.init(num_cpus={self.workers}, include_dashboard=False) local, node "
            f"127.0.0.1; no-op tasks: {how}, ray.wait(num_returns="
            f"window/20) keeping at most window in flight, round trip ray.get(f.remote(i)); 50 ms tasks: "
            f"{self.workers} threaded actors, max_concurrency={self.concurrency}, called round-robin"
        )

    def start(self) -> None:
        # Ray swaps 127.0.0.1 for the machine's address and listens on every interface unless "clusters" are off
        # (as they are by default on macOS and Windows): then the node is 127.0.0.1 and its servers bind only
        # there. The switch is read when ray is imported, here and in Ray's own processes. Usage stats: off.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        t0 = time.monotonic()
        import ray
        from ray.job_config import JobConfig

        self.ray = ray
        self.timings["import_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        ray.init(
            num_cpus=self.workers,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            object_store_memory=int(self.options.get("object_store_mb", 256)) << 20,
            namespace="zlink-bench",
            job_config=JobConfig(code_search_path=[str(HERE)]),
            _temp_dir=self.tmp,
        )
        self.timings["init_s"] = time.monotonic() - t0
        node_ip = ray.util.get_node_ip_address()
        if node_ip != LOOPBACK:
            raise PeerError(f"ray: the node address is {node_ip}, not {LOOPBACK}")
        self.noop = ray.remote(peer_tasks.noop)
        self.actors: list[Any] = []
        self.rr = 0
        # one round of tasks, so that the task workers are up before anything is timed
        t0 = time.monotonic()
        if ray.get([self.noop.remote(i) for i in range(4 * self.workers)], timeout=60) != list(range(4 * self.workers)):
            raise PeerError("ray: wrong results at start")
        self.timings["first_tasks_s"] = time.monotonic() - t0
        if self.options.get("map_with") == "actors":
            self._ensure_actors()

    def _ensure_actors(self) -> list[Any]:
        if not self.actors:
            t0 = time.monotonic()
            waiter = self.ray.remote(max_concurrency=self.concurrency)(peer_tasks.Waiter)
            actors = [waiter.remote() for _ in range(self.workers)]
            self.ray.get([a.pid.remote() for a in actors], timeout=60)
            self.actors = actors
            self.timings["actors_start_s"] = time.monotonic() - t0
        return self.actors

    def stop(self) -> None:
        self.actors = []
        ray = getattr(self, "ray", None)  # a start may have failed anywhere
        if ray is not None and ray.is_initialized():
            ray.shutdown()

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"relay": [], "workers": [], "other": []}
        for pid in descendants(os.getpid()):
            cmd = cmdline(pid)
            if cmd.split(" ", 1)[0].endswith(("/gcs_server", "/raylet")):
                out["relay"].append(pid)
            elif cmd.startswith("ray::") and not cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
                out["workers"].append(pid)  # ray::IDLE, ray::noop, ray::Waiter: the worker processes
            else:
                out["other"].append(pid)  # agents, monitor, log monitor, the minimal dashboard
        return out

    def _submit_noop(self, i: int) -> Any:
        if self.options.get("map_with") == "actors":
            self.rr += 1
            return self.actors[self.rr % len(self.actors)].noop.remote(i)
        return self.noop.remote(i)

    def _get(self, refs: Any, deadline: float, what: str) -> Any:
        left = min(STALL_S, deadline - time.monotonic())
        if left <= 0:
            raise PeerError(f"ray {what} over its time budget")
        try:
            return self.ray.get(refs, timeout=left)
        except self.ray.exceptions.GetTimeoutError:
            raise PeerError(f"ray {what}: no result within {left:.3g} s") from None

    def pipelined(self, n: int, window: int, budget: float) -> None:
        # Ray's pattern for a bounded number of pending tasks: ray.wait, then submit as many as came back.
        # Waiting for window/20 at a time rather than the documented 1 (O(window) per call) is ~1.3x faster.
        ray = self.ray
        deadline = time.monotonic() + budget
        batch = max(1, window // 20)
        pending: list[Any] = []
        sent = received = total = 0
        while received < n:
            while sent < n and len(pending) < window:
                pending.append(self._submit_noop(sent))
                sent += 1
            left = min(STALL_S, deadline - time.monotonic())
            if left <= 0:
                raise PeerError(f"ray map over its time budget of {budget:g} s ({received:,}/{n:,})")
            ready, pending = ray.wait(pending, num_returns=min(batch, len(pending)), timeout=left)
            if not ready:
                raise PeerError(f"ray map: no result within {left:.3g} s ({received:,}/{n:,})")
            values = self._get(ready, deadline, "map")
            total += sum(values)
            received += len(values)
        if total != n * (n - 1) // 2:
            raise PeerError("ray map: wrong results")

    def round_trips(self, n: int, budget: float) -> list[float]:
        deadline = time.monotonic() + budget
        out: list[float] = []
        for i in range(n):
            t0 = time.perf_counter()
            value = self._get(self._submit_noop(i), deadline, "round trips")
            out.append(time.perf_counter() - t0)
            _check(value, i, "ray")
        return out

    def run_wait(self, n: int, seconds: float, budget: float) -> None:
        actors = self._ensure_actors()
        refs = [actors[i % len(actors)].wait.remote(i, seconds) for i in range(n)]
        try:
            values = self.ray.get(refs, timeout=budget)
        except self.ray.exceptions.GetTimeoutError:
            raise PeerError(f"ray: {n} waits over their time budget of {budget:g} s") from None
        if values != list(range(n)):
            raise PeerError("ray: wrong results from the waits")


class _DaskBackend(_Backend):
    name = "dask"

    def setup(self) -> str:
        return (
            f"Dask distributed {version_of('dask')}: LocalCluster(n_workers={self.workers}, processes=True, "
            f"threads_per_worker={self.concurrency}) on 127.0.0.1, no dashboard, scheduler and nannies in the "
            "client's process; map: client.map in chunks of window/2, at most two in flight, each gathered; "
            "round trip client.submit(noop, i).result(); 50 ms tasks: client.map + gather"
        )

    def start(self) -> None:
        t0 = time.monotonic()
        import dask
        from distributed import Client, LocalCluster

        self.timings["import_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        # scratch space under the peer's own folder, not /tmp/dask-scratch-space (the nannies pass this on)
        dask.config.set({"temporary-directory": self.tmp})
        self.cluster = LocalCluster(
            n_workers=self.workers,
            threads_per_worker=self.concurrency,
            processes=True,
            host=LOOPBACK,
            protocol="tcp",
            dashboard_address=None,
            worker_dashboard_address=None,
            # the scheduler serves its HTTP routes even without a dashboard, by default on :8787
            scheduler_kwargs={"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"},
            silence_logs=logging.ERROR,
            local_directory=self.tmp,
        )
        self.client = Client(self.cluster, timeout=self.start_timeout)
        self.client.wait_for_workers(self.workers, timeout=self.start_timeout)
        self.timings["init_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        n = 4 * self.workers
        if self._gather(self.client.map(peer_tasks.noop, range(n), pure=False), 60) != list(range(n)):
            raise PeerError("dask: wrong results at start")
        self.timings["first_tasks_s"] = time.monotonic() - t0

    def stop(self) -> None:
        client, cluster = getattr(self, "client", None), getattr(self, "cluster", None)  # a start may have failed
        try:
            if client is not None:
                client.close(timeout=10)
        finally:
            if cluster is not None:
                cluster.close(timeout=10)

    def pids(self) -> dict[str, list[int]]:
        # the workers are the driver's spawned children; the scheduler and the nannies live in the driver
        workers = sorted(self.client.run(peer_tasks.worker_pid, 0).values())
        return {"relay": [], "workers": workers, "other": []}

    @staticmethod
    def _gather(futures: list[Any], budget: float) -> list[Any]:
        """The futures' results in order (one ``gather``); PeerError past ``budget`` seconds."""
        from distributed import wait

        if budget <= 0:
            raise PeerError("dask: over the time budget")
        try:
            wait(futures, timeout=budget)
        except TimeoutError:
            raise PeerError(f"dask: no results within {budget:.3g} s") from None
        return list(futures[0].client.gather(futures)) if futures else []

    def pipelined(self, n: int, window: int, budget: float) -> None:
        # client.map in chunks of window/2, at most two chunks in flight, the oldest gathered: as fast as one
        # client.map + gather of everything here, and 1.2-1.3x faster than refilling an as_completed
        client = self.client
        deadline = time.monotonic() + budget
        chunk = max(1, window // 2)
        chunks: deque[tuple[int, list[Any]]] = deque()
        sent = received = 0
        while received < n:
            while sent < n and sent - received + min(chunk, n - sent) <= window:
                k = min(chunk, n - sent)
                chunks.append((sent, client.map(peer_tasks.noop, range(sent, sent + k), pure=False)))
                sent += k
            first, futures = chunks.popleft()
            values = self._gather(futures, min(STALL_S, deadline - time.monotonic()))
            if values != list(range(first, first + len(futures))):
                raise PeerError(f"dask map: results {first:,}.. are wrong")
            received += len(values)

    def round_trips(self, n: int, budget: float) -> list[float]:
        client = self.client
        deadline = time.monotonic() + budget
        out: list[float] = []
        for i in range(n):
            t0 = time.perf_counter()
            try:
                value = client.submit(peer_tasks.noop, i, pure=False).result(timeout=STALL_S)
            except TimeoutError:
                raise PeerError(f"dask: no result within {STALL_S:g} s") from None
            out.append(time.perf_counter() - t0)
            _check(value, i, "dask")
            if time.monotonic() > deadline:
                raise PeerError(f"dask round trips over their time budget ({len(out):,}/{n:,})")
        return out

    def run_wait(self, n: int, seconds: float, budget: float) -> None:
        futures = self.client.map(peer_tasks.wait, range(n), seconds=seconds, pure=False)
        if self._gather(futures, budget) != list(range(n)):
            raise PeerError("dask: wrong results from the waits")


class _CeleryBackend(_Backend):
    name = "celery"
    app: Any = None
    redis: subprocess.Popen[bytes] | None = None

    def __init__(self, workers: int, concurrency: int, start_timeout: float, tmp: str, **options: Any) -> None:
        super().__init__(workers, concurrency, start_timeout, tmp, **options)
        self.procs: list[subprocess.Popen[bytes]] = []

    def setup(self) -> str:
        pool = self.options.get("pool", "threads")
        return (
            f"Celery {version_of('celery')}: Redis as broker and result backend on a free loopback port "
            f"(--save '' --appendonly no); {self.workers} 'celery worker' subprocesses, -P {pool} -c "
            f"{self.concurrency}, default prefetch (4 per slot), without gossip/mingle/heartbeat; map: groups of "
            "window/2 tasks, at most two in flight, each joined with .get(); round trip apply_async().get(); "
            "50 ms tasks: one group"
        )

    def _log(self, name: str) -> Any:
        return open(os.path.join(self.tmp, name), "wb")

    def _tail(self, name: str) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.tmp, name), "rb") as fh:
            return fh.read()[-1500:].decode("utf-8", "replace").strip()
        return ""

    def _start_redis(self, deadline: float) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise PeerError("redis-server not found")
        for _attempt in range(3):  # the free port may be taken between the probe and redis binding it
            self.port = free_port()
            with self._log("redis.log") as log:
                self.redis = subprocess.Popen(
                    [
                        exe, "--bind", LOOPBACK, "--port", str(self.port), "--save", "", "--appendonly", "no",
                        "--dir", self.tmp, "--protected-mode", "yes", "--daemonize", "no", "--databases", "2",
                        "--loglevel", "warning",
                    ],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint,
                )  # fmt: skip
            conn = redis.Redis(host=LOOPBACK, port=self.port, socket_connect_timeout=0.5, socket_timeout=2.0)
            try:
                while self.redis.poll() is None:
                    try:
                        if conn.ping():
                            return
                    except redis.RedisError:
                        if time.monotonic() > deadline:
                            raise PeerError("redis-server did not answer PING in time") from None
                        time.sleep(0.02)
            finally:
                conn.close()
            self.redis.wait(5.0)
        raise PeerError(f"redis-server exited at start: {self._tail('redis.log')}")

    def start(self) -> None:
        t0 = time.monotonic()
        from celery import Celery

        self.timings["import_s"] = time.monotonic() - t0
        deadline = time.monotonic() + self.start_timeout
        t0 = time.monotonic()
        self._start_redis(deadline)
        self.timings["redis_s"] = time.monotonic() - t0
        broker = f"redis://{LOOPBACK}:{self.port}/0"
        backend = f"redis://{LOOPBACK}:{self.port}/1"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
        names = [f"zlb-{i + 1}@{LOOPBACK}" for i in range(self.workers)]
        for i, name in enumerate(names):
            with self._log(f"worker-{i + 1}.log") as log:
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable, "-m", "celery", "-A", "bench_peer_tasks", "-b", broker,
                            "--result-backend", backend, "worker", "-P", self.options.get("pool", "threads"),
                            "-c", str(self.concurrency), "-n", name, "--without-gossip", "--without-mingle",
                            "--without-heartbeat", "-l", "WARNING",
                        ],
                        cwd=self.tmp, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        preexec_fn=_ignore_sigint,
                    )
                )  # fmt: skip
        self.app = Celery("zlink_bench_client", broker=broker, backend=backend, set_as_current=False)
        self.app.conf.update(broker_connection_retry_on_startup=True, result_expires=600)
        seen: set[str] = set()
        while not seen.issuperset(names):
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    tail = self._tail(f"worker-{i + 1}.log")
                    raise PeerError(f"celery worker {i + 1} exited at start (code {p.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise PeerError(f"celery workers did not answer ping within {self.start_timeout:g} s: {sorted(seen)}")
            for reply in self.app.control.ping(timeout=0.5) or []:
                seen.update(reply)
        self.timings["workers_s"] = time.monotonic() - t0 - self.timings["redis_s"]
        t0 = time.monotonic()
        n = 4 * self.workers
        if self._join(self._group(peer_tasks.CELERY_NOOP, range(n)), time.monotonic() + 60, "start") != list(range(n)):
            raise PeerError("celery: wrong results at start")
        self.timings["first_tasks_s"] = time.monotonic() - t0

    def stop(self) -> None:
        if self.app is not None:
            with contextlib.suppress(Exception):
                self.app.close()
        # SIGTERM is Celery's warm shutdown (running tasks finish: ours are short), then SIGKILL; then Redis
        kill_processes(_idents([p.pid for p in self.procs]), 10.0)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(1.0)
        if self.redis is not None:
            kill_processes(_idents([self.redis.pid]), 5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.redis.wait(1.0)

    def pids(self) -> dict[str, list[int]]:
        workers = [p.pid for p in self.procs]
        for p in self.procs:
            workers.extend(descendants(p.pid))  # the prefork pool's children
        return {"relay": [self.redis.pid] if self.redis else [], "workers": workers, "other": []}

    def _group(self, task: str, items: Any, *extra: Any) -> Any:
        from celery import group

        return group([self.app.signature(task, args=(i, *extra)) for i in items], app=self.app).apply_async()

    def _join(self, result: Any, deadline: float, what: str) -> list[Any]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        left = min(STALL_S, deadline - time.monotonic())
        if left <= 0:
            raise PeerError(f"celery {what} over its time budget")
        try:
            return list(result.get(timeout=left))
        except CeleryTimeout:
            raise PeerError(f"celery {what}: no results within {left:.3g} s") from None

    def pipelined(self, n: int, window: int, budget: float) -> None:
        deadline = time.monotonic() + budget
        chunk = max(1, window // 2)
        groups: deque[tuple[int, int, Any]] = deque()
        sent = received = 0
        while received < n:
            while sent < n and sent - received + min(chunk, n - sent) <= window:
                k = min(chunk, n - sent)
                groups.append((sent, k, self._group(peer_tasks.CELERY_NOOP, range(sent, sent + k))))
                sent += k
            first, k, result = groups.popleft()
            values = self._join(result, deadline, "map")
            if values != list(range(first, first + k)):
                raise PeerError(f"celery map: results {first:,}.. are wrong")
            received += k

    def round_trips(self, n: int, budget: float) -> list[float]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        deadline = time.monotonic() + budget
        noop = self.app.signature(peer_tasks.CELERY_NOOP)
        out: list[float] = []
        for i in range(n):
            t0 = time.perf_counter()
            try:
                value = noop.clone(args=(i,)).apply_async().get(timeout=STALL_S)
            except CeleryTimeout:
                raise PeerError(f"celery: no result within {STALL_S:g} s") from None
            out.append(time.perf_counter() - t0)
            _check(value, i, "celery")
            if time.monotonic() > deadline:
                raise PeerError(f"celery round trips over their time budget ({len(out):,}/{n:,})")
        return out

    def run_wait(self, n: int, seconds: float, budget: float) -> None:
        # a long group: its own deadline, not the per-join stall limit
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            values = list(self._group(peer_tasks.CELERY_WAIT, range(n), seconds).get(timeout=budget))
        except CeleryTimeout:
            raise PeerError(f"celery: {n} waits over their time budget of {budget:g} s") from None
        if values != list(range(n)):
            raise PeerError("celery: wrong results from the waits")


_BACKENDS: dict[str, type[_Backend]] = {"ray": _RayBackend, "dask": _DaskBackend, "celery": _CeleryBackend}


def _driver_main(name: str, kwargs: dict[str, Any], conn: Any, tmp: str, log_path: str) -> None:
    """The driver process: start peer ``name``, answer the benchmark's commands, stop it, kill what is left.

    Replies: ("ready", info) or ("error", text) to the start; ("ok", value) or
    ("error", text) to each command; ("stopped", info) to "stop". Exits on
    "stop" or a closed pipe; if the benchmark process is gone, within a second
    it kills the peer's processes, removes ``tmp`` and exits.
    """
    _ignore_sigint()
    # a session of its own: a Ctrl-C at the terminal reaches only the benchmark process, which then stops the peer
    # in order (Ray's GCS and raylet would otherwise die of it at once); an orphaned driver stops by itself
    os.setsid()
    parent = os.getppid()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)  # the peers' own chatter (banners, warnings) goes to the log, not the benchmark's table
    os.dup2(log_fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    backend = _BACKENDS[name](tmp=tmp, **kwargs)
    started = False

    def orphan_watch() -> None:
        # the benchmark process is gone (killed): end every process of the peer, its files, and this one
        while os.getppid() == parent:
            time.sleep(1.0)
        sweep_session(os.getpid(), 2.0)
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()

    def error_text(exc: BaseException) -> str:
        if isinstance(exc, PeerError):
            return str(exc)
        return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc)[-6:])}".strip()

    def finish() -> dict[str, Any]:
        info: dict[str, Any] = {"error": ""}
        t0 = time.monotonic()
        if started:
            try:
                backend.stop()
            except Exception as exc:
                info["error"] = error_text(exc)
        info["stop_s"] = time.monotonic() - t0
        info["leftovers"] = sweep_session(os.getpid(), 3.0)
        return info

    try:
        backend.start()
        started = True
        conn.send(("ready", {"pids": backend.pids(), "setup": backend.setup(), "timings": backend.timings}))
    except Exception as exc:
        started = True  # stop whatever got started
        with contextlib.suppress(OSError):
            conn.send(("error", error_text(exc)))
        finish()
        return
    commands: dict[str, Callable[..., Any]] = {
        "pids": backend.pids,
        "timings": lambda: backend.timings,
        "pipelined": backend.pipelined,
        "round_trips": backend.round_trips,
        "run_wait": backend.run_wait,
    }
    try:
        while True:
            if not conn.poll(1.0):
                continue
            cmd, args = conn.recv()
            if cmd == "stop":
                break
            try:
                conn.send(("ok", commands[cmd](*args)))
            except Exception as exc:
                conn.send(("error", error_text(exc)))
    except (EOFError, OSError):
        pass
    info = finish()
    with contextlib.suppress(OSError):
        conn.send(("stopped", info))
    if os.getppid() != parent:
        shutil.rmtree(tmp, ignore_errors=True)  # orphaned: nobody else will


# =========================================================================== in the benchmark process


class PeerSystem:
    """A peer under test (``bench._System``'s interface), driven in a process of its own.

    Started on ``with`` entry (cleaned up if that fails), stopped on exit.
    ``start_s``/``stop_s`` are how long the last start and stop took, seen
    from here (the start includes the driver process and importing the
    peer's package; ``timings`` has the driver's breakdown);
    ``leftovers`` the pids still up after the stop, which had to be killed.
    """

    name = "peer"

    def __init__(
        self,
        workers: int = PEER_WORKERS,
        concurrency: int = PEER_CONCURRENCY,
        start_timeout: float = 90.0,
        stop_timeout: float = 30.0,
        **options: Any,
    ) -> None:
        if workers < 1 or concurrency < 1:
            raise ValueError("workers and concurrency must be at least 1")
        self.workers = workers
        self.concurrency = concurrency
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.options = options
        self.relay_pid = 0
        self.relay_pids: list[int] = []
        self.worker_pids: list[int] = []
        self.other_pids: list[int] = []
        self.client_pid = 0
        #: the figures of the last throughput run on this peer (bench.measure_map sets it)
        self.throughput: dict[str, float] | None = None
        self.setup = ""
        self.timings: dict[str, float] = {}
        self.start_s: float | None = None
        self.stop_s: float | None = None
        self.stop_error = ""
        self.leftovers: list[int] = []
        self._proc: Any = None
        self._conn: Any = None
        self._tmp: str | None = None
        self._known: set[tuple[int, int]] = set()  # (pid, start time) of every process of the peer seen so far

    @property
    def slots(self) -> int:
        """Tasks the peer runs at once in ``parallel_wait``."""
        return self.workers * self.concurrency

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> PeerSystem:
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix=f"zlb-{self.name}-")  # short: Ray puts unix sockets under it
        self.leftovers, self.stop_error = [], ""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        kwargs = {
            "workers": self.workers,
            "concurrency": self.concurrency,
            "start_timeout": self.start_timeout,
            **self.options,
        }
        log_path = os.path.join(self._tmp, "driver.log")
        # not a daemon: Dask's LocalCluster starts processes of its own from the driver
        self._proc = ctx.Process(
            target=_driver_main, args=(self.name, kwargs, child, self._tmp, log_path), name=f"bench-{self.name}"
        )
        self._proc.start()
        child.close()
        self.client_pid = self._proc.pid
        deadline = time.monotonic() + self.start_timeout
        while not self._conn.poll(0.1):
            self._remember()
            if not self._proc.is_alive():
                raise PeerError(f"{self.name}: the driver exited at start (code {self._proc.exitcode}){self._log()}")
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name} did not start within {self.start_timeout:g} s{self._log()}")
        kind, info = self._recv()
        if kind != "ready":
            raise PeerError(f"{self.name} failed to start: {info}{self._log()}")
        self.setup = info["setup"]
        self.timings = info["timings"]
        self._set_pids(info["pids"])

    def _recv(self) -> tuple[str, Any]:
        try:
            msg: tuple[str, Any] = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise PeerError(f"{self.name}: the driver went away ({exc!r}){self._log()}") from None
        return msg

    def _log(self, chars: int = 1500) -> str:
        if not self._tmp:
            return ""
        with contextlib.suppress(OSError), open(os.path.join(self._tmp, "driver.log"), "rb") as fh:
            text = fh.read()[-chars:].decode("utf-8", "replace").strip()
            return f"\n--- the driver's log, last lines:\n{text}" if text else ""
        return ""

    def _remember(self) -> None:
        """Note every process below the driver now, to kill any of them still up after the stop."""
        if self._proc is not None and self._proc.pid:
            self._known.update(_idents([self._proc.pid, *descendants(self._proc.pid)]))

    def _set_pids(self, pids: dict[str, list[int]]) -> None:
        self.relay_pids = pids["relay"]
        self.worker_pids = pids["workers"]
        self.other_pids = pids["other"]
        self.relay_pid = self.relay_pids[-1] if self.relay_pids else 0
        self._remember()

    def close(self) -> None:
        """Stop the peer (bounded by ``stop_timeout``), then kill by pid whatever of it is left.

        A Ctrl-C during the stop is held until it is done (a second Ctrl-C would
        otherwise cut the clean-up short), then raised.
        """
        if self._proc is None:
            return
        with _sigint_deferred():
            self._close()

    def _close(self) -> None:
        proc = self._proc
        t0 = time.monotonic()
        self._remember()
        try:
            if proc.is_alive():
                with contextlib.suppress(PeerError, OSError):
                    self.timings.update(self._call("timings", timeout=5.0))  # with any taken since the start
                try:
                    self._conn.send(("stop", ()))
                    deadline = time.monotonic() + self.stop_timeout
                    # a start or a command may still be answering first
                    while self._conn.poll(max(0.0, deadline - time.monotonic())):
                        kind, info = self._conn.recv()
                        if kind == "stopped":
                            self.stop_error = info["error"]
                            self.leftovers = list(info["leftovers"])
                            self.timings["driver_stop_s"] = info["stop_s"]
                            break
                    else:
                        self.stop_error = f"no answer to stop within {self.stop_timeout:g} s"
                except (EOFError, OSError) as exc:
                    self.stop_error = f"the driver went away: {exc!r}"
                proc.join(5.0)
        finally:
            # anything of the peer still up (the driver too, if it hung) is killed by pid: the processes seen
            # below the driver, and any other process of its session (one whose parent died, say)
            self.leftovers += [p for p in kill_processes(list(self._known), 3.0) if p != proc.pid]
            self.leftovers += sweep_session(proc.pid, 3.0)
            with contextlib.suppress(Exception):
                proc.join(2.0)
                proc.close()
            self._conn.close()
            self._proc = self._conn = None
            self._known.clear()
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            self.stop_s = time.monotonic() - t0
        if self.stop_error:
            print(f"bench_peers: stopping {self.name}: {self.stop_error}", file=sys.stderr)

    # ------------------------------------------------------------------ commands

    def _call(self, cmd: str, *args: Any, timeout: float) -> Any:
        if self._proc is None:
            raise PeerError(f"{self.name} is not running")
        self._conn.send((cmd, args))
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.5):
            if not self._proc.is_alive():
                raise PeerError(f"{self.name}: the driver died (code {self._proc.exitcode}){self._log()}")
            if time.monotonic() > deadline:
                self._remember()
                kill_processes(_idents([self._proc.pid]), 1.0)  # close() sweeps the rest
                raise PeerError(f"{self.name}: no answer to {cmd} within {timeout:g} s")
        kind, value = self._recv()
        if kind != "ok":
            raise PeerError(f"{self.name} {cmd}: {value}")
        return value

    def cpu_meter(self) -> PeerCpuMeter:
        """CPU of the peer's processes, with its pids as they are now (Ray starts worker processes lazily)."""
        self._set_pids(self._call("pids", timeout=RPC_SLACK_S))
        return PeerCpuMeter(self.relay_pids, self.worker_pids, self.client_pid, self.other_pids)

    def pipelined(self, n: int, window: int, budget: float) -> None:
        """Run ``n`` no-op tasks keeping up to ``window`` in flight, every result checked."""
        self._call("pipelined", n, window, budget, timeout=budget + RPC_SLACK_S)

    def round_trips(self, n: int, budget: float) -> list[float]:
        """``n`` sequential single no-op tasks; returns each one's seconds (timed in the driver)."""
        out: list[float] = self._call("round_trips", n, budget, timeout=budget + RPC_SLACK_S)
        return out

    def parallel_wait(self, n_tasks: int, seconds: float = WAIT_S, *, budget: float = 120.0) -> float:
        """Wall time of ``n_tasks`` tasks that each sleep ``seconds``, all in flight at once (no warm-up)."""
        t0 = time.perf_counter()
        self._call("run_wait", n_tasks, seconds, budget, timeout=budget + RPC_SLACK_S)
        wall = time.perf_counter() - t0
        self._remember()
        return wall

    def parallel_speedup(self, n_tasks: int = 400, seconds: float = WAIT_S, budget: float = 120.0) -> dict[str, Any]:
        """``bench.measure_parallel_speedup``'s figures: a warm-up of two waves, then ``parallel_wait`` timed."""
        warmup = self.parallel_wait(2 * self.slots, seconds, budget=budget)
        wall = self.parallel_wait(n_tasks, seconds, budget=budget)
        ideal = n_tasks * seconds / self.slots
        return {
            "wall_s": wall,
            "ideal_s": ideal,
            "ratio": wall / ideal,
            "waves_floor_s": math.ceil(n_tasks / self.slots) * seconds,
            "speedup": n_tasks * seconds / wall,
            "tasks": n_tasks,
            "slots": self.slots,
            "warmup_s": warmup,
        }


class RayPeer(PeerSystem):
    """Ray: ``map_with="tasks"`` (default: remote functions) or ``"actors"``; ``object_store_mb`` (256)."""

    name = "ray"


class DaskPeer(PeerSystem):
    """Dask distributed: a ``LocalCluster`` of ``workers`` processes x ``concurrency`` threads."""

    name = "dask"


class CeleryPeer(PeerSystem):
    """Celery with Redis: ``pool="threads"`` (default), ``"prefork"`` or ``"solo"`` for the workers."""

    name = "celery"


#: peer name -> its class; each is a context manager that starts and stops its processes
PEERS: dict[str, type[PeerSystem]] = {"ray": RayPeer, "dask": DaskPeer, "celery": CeleryPeer}


def make_peer(name: str, **kwargs: Any) -> PeerSystem:
    """An instance of peer ``name``, not started (use it in ``with``)."""
    return PEERS[name](**kwargs)


# =========================================================================== availability check


def main() -> int:
    """Print whether each peer can run here (its version) or why not; bench.py runs the measurements."""
    for name in PEERS:
        reason = available(name)
        print(f"{name:<7} {'available, ' + (version_of(name) or '?') if reason is None else 'skipped: ' + reason}")
    print("measure them with: python scripts/bench.py  (or --peers ray,dask --only map,round_trip)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
