"""A swarm spread over Linux network namespaces: a cut link, detection, failover, rejoin.

Five namespaces per run, all named with a random per-run prefix: one holds a
bridge, and broker, node1, node2 and client each get their own namespace with
one veth into that bridge and an address in 10.231.0.0/24. Nothing touches
the host's own interfaces or routes: every link is created inside the
namespaces (``ip -n BRIDGE_NS link add ... peer ... netns HOST_NS``), and
deleting the namespaces removes all of it. The broker, the nodes and the
client are separate processes started with ``ip netns exec``, with the
default heartbeat settings (0.5 s x 3).

Scenario (``test_cut_link_failover_and_rejoin``):

1. tasks of about 0.3 s go to both nodes;
2. node1's link is cut on the bridge side (``ip link set VETH down``) while it
   holds tasks: the broker must stop listing it within 5 s, and its tasks must
   run again on node2 and complete;
3. the link comes back: node1 re-registers, takes new work, and every task id
   is resolved exactly once with the right value (counted on the wire, before
   the client's own duplicate filter, and in the broker's counters).

``test_link_heals_during_failover`` brings the link back as soon as node1 is
declared dead, while the tasks taken from it still wait at the broker, and
checks the same exactly-once delivery.

Skipped, with the reason, when not root, when ``ip netns`` is missing, or when
a namespace cannot be made (e.g. in a restricted container).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from zlink.security import BrokerHome

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SKILLS = HERE / "skills_netns.py"

SUBNET_PREFIX = "10.231.0"
BROKER_IP = f"{SUBNET_PREFIX}.1"
BROKER_BIND = f"tcp://{BROKER_IP}:7700"
HOSTS = {"broker": 1, "node1": 2, "node2": 3, "client": 4}
TASK_SECONDS = 0.3
#: the broker declares a node dead after interval x liveness silent seconds (defaults)
NODE_TIMEOUT = 0.5 * 3

pytestmark = [pytest.mark.netns]


# --------------------------------------------------------------------------- the namespaces


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


L = TypeVar("L", bound="NetLab")


class NetLab:
    """A bridge namespace and one namespace per host, each host on its own veth.

    Every name starts with a random per-run prefix; :meth:`close` kills what is
    left running in the namespaces and deletes them (and with them every link).
    """

    def __init__(self) -> None:
        self.prefix = "zl" + os.urandom(3).hex()  # 8 chars: interface names stay under 15
        self.bridge_ns = f"{self.prefix}-br"
        self.bridge = f"{self.prefix}br"
        self.ns = {host: f"{self.prefix}-{host}" for host in HOSTS}
        #: the bridge-side end of each host's veth (cut this to unplug the host)
        self.port = {host: f"{self.prefix}p{num}" for host, num in HOSTS.items()}
        self.dev = f"{self.prefix}e"  # the host-side end, inside each host namespace
        self.ip = {host: f"{SUBNET_PREFIX}.{num}" for host, num in HOSTS.items()}
        self.made: list[str] = []

    def add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.made.append(name)

    def build(self) -> None:
        """Make the rest of the lab (after the bridge namespace, which shows we may make one)."""
        for ns in self.ns.values():
            self.add_ns(ns)
        b = self.bridge_ns
        _ip("-n", b, "link", "set", "lo", "up")
        _ip("-n", b, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", b, "link", "set", self.bridge, "up")
        for host, ns in self.ns.items():
            port = self.port[host]
            _ip("-n", b, "link", "add", port, "type", "veth", "peer", "name", self.dev, "netns", ns)
            _ip("-n", b, "link", "set", port, "master", self.bridge)
            _ip("-n", b, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", self.dev)
            _ip("-n", ns, "link", "set", self.dev, "up")

    def set_port(self, host: str, up: bool) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self.port[host], "up" if up else "down")

    def close(self) -> list[str]:
        """Delete every namespace made (killing any process left in one); returns problems."""
        problems: list[str] = []
        for ns in reversed(self.made):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes inside this run's own namespace
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    problems.append(f"process {pid} was still running in {ns}; killed")
                except (ProcessLookupError, ValueError):
                    pass
            res = _ip("netns", "del", ns, check=False)
            if res.returncode != 0:
                problems.append(f"could not delete namespace {ns}: {res.stderr.strip()}")
        self.made.clear()
        left = [ns for ns in self.ns.values() if ns in _ip("netns", "list", check=False).stdout]
        if left:
            problems.append(f"namespaces left behind: {left}")
        return problems


def open_lab(lab_class: type[L]) -> Iterator[L]:
    """Build a lab of ``lab_class`` for one test and tear it down; skips where ``ip netns`` cannot run."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces need Linux")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' command (iproute2) is not installed")
    try:
        probe = _ip("netns", "list", check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"'ip netns' is unavailable: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"'ip netns' is unavailable: {probe.stderr.strip()}")
    lab = lab_class()
    try:
        try:
            lab.add_ns(lab.bridge_ns)
        except RuntimeError as exc:
            pytest.skip(f"cannot create a network namespace here (restricted container?): {exc}")
        lab.build()
        yield lab
    finally:
        problems = lab.close()
        for p in problems:
            print(f"netns cleanup: {p}")
        assert not [p for p in problems if "left behind" in p or "could not delete" in p], problems


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    yield from open_lab(NetLab)


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process this test starts; :meth:`close` stops them all (TERM, then KILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def spawn(
        self, label: str, ns: str, argv: list[str], env: dict[str, str], *, stdin: int | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        log = open(self.logs / f"{label}.log", "wb")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        full_env = {k: v for k, v in os.environ.items() if k not in ("ZLINK_JOIN", "ZLINK_HOME")}
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env)
        # ip netns exec execs the command: the pid is the Python process itself
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *argv],
            env=full_env,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=log if stdout is None else stdout,
            stderr=log,
        )
        self.procs[label] = proc
        return proc

    def log_tail(self, label: str, lines: int = 25) -> str:
        try:
            text = (self.logs / f"{label}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for f in self._files:
            f.close()


class Driver:
    """The client driver (skills_netns.py run as a script) in the client namespace."""

    def __init__(self, proc: subprocess.Popen[bytes], results: Path) -> None:
        self.proc = proc
        self.results = results
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.replies.put(json.loads(raw))
            except json.JSONDecodeError:
                self.replies.put({"error": f"unreadable reply {raw!r}"})
        self.replies.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the client driver did not answer within {timeout:g} s")
        if reply is None:
            pytest.fail(f"the client driver exited (code {self.proc.poll()})")
        assert "error" not in reply, reply["error"]
        return reply

    def ready(self, timeout: float = 20.0) -> None:
        assert self._next(timeout) == {"ready": True}

    def ask(self, op: str, *, wait: float = 10.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        return self._next(wait + 5.0)

    def quit(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
            except OSError:
                pass

    def resolved(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]


def _submit(driver: Driver, first: int, count: int, seconds: float = TASK_SECONDS) -> dict[int, str]:
    reply = driver.ask("submit", items=[[i, seconds] for i in range(first, first + count)], timeout=40.0)
    return {int(i): tid for i, tid in reply["tids"].items()}


def _wait_results(driver: Driver, total: int, timeout: float) -> list[dict[str, Any]]:
    reply = driver.ask("wait_results", count=total, timeout=timeout, wait=timeout)
    lines = driver.resolved()
    assert reply["ok"], f"only {reply['resolved']} of {total} tasks resolved in {timeout:g} s: {lines[-5:]}"
    return lines


def _check_values(lines: list[dict[str, Any]], tids: dict[int, str]) -> dict[int, dict[str, Any]]:
    """The resolved lines of these tasks: each ok, with the right value; by task number."""
    by_i = {line["i"]: line for line in lines if line["i"] in tids}
    assert sorted(by_i) == sorted(tids), f"missing results: {sorted(set(tids) - set(by_i))}"
    for i, line in by_i.items():
        assert line["ok"], f"task {i} failed: {line.get('error')}"
        assert line["tid"] == tids[i]
        assert line["value"]["i"] == i and line["value"]["square"] == i * i, line
    return by_i


# --------------------------------------------------------------------------- the swarm


class Swarm:
    """Broker, node1, node2 (2 slots each) and the client driver, each in its own namespace."""

    def __init__(self, lab: NetLab, tmp_path: Path) -> None:
        self.lab = lab
        self.t_start = time.monotonic()
        self.home = tmp_path / "home"
        logs = tmp_path / "logs"
        logs.mkdir()
        self.procs = Procs(logs)
        self.results = tmp_path / "results.jsonl"
        self.driver: Driver | None = None

    def start(self) -> Driver:
        procs, lab = self.procs, self.lab
        broker = procs.spawn(
            "broker", lab.ns["broker"],
            ["-m", "zlink", "broker", "--bind", BROKER_BIND, "--home", str(self.home), "--log-level", "info",
             "--quiet"],
            {},
        )  # fmt: skip
        bh = BrokerHome(self.home)
        deadline = time.monotonic() + 15
        while not bh.bound_endpoints():
            assert broker.poll() is None, f"the broker exited at start:\n{procs.log_tail('broker')}"
            assert time.monotonic() < deadline, "the broker did not bind in 15 s"
            time.sleep(0.05)
        assert bh.bound_endpoints() == [BROKER_BIND]

        def join(name: str, role: str) -> str:
            return bh.invite(name=name, role=role, endpoints=[BROKER_BIND]).dump()

        for node in ("node1", "node2"):
            procs.spawn(
                node, lab.ns[node],
                ["-m", "zlink", "node", "--skills", str(SKILLS), "--slots", "2", "--name", node, "--log-level", "info"],
                {"ZLINK_JOIN": join(node, "node"), "ZLINK_NETNS_NODE": node},
            )  # fmt: skip
        client = procs.spawn(
            "client", lab.ns["client"], [str(SKILLS), str(self.results)],
            {"ZLINK_JOIN": join("netns-client", "client")}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        driver = self.driver = Driver(client, self.results)
        driver.ready()
        up = driver.ask("wait_nodes", present=["node1", "node2"], timeout=20.0, wait=20.0)
        assert up["ok"], f"nodes did not join across the bridge: {up['status']}"
        return driver

    def alive(self, *names: str) -> None:
        for name in names:
            proc = self.procs.procs[name]
            assert proc.poll() is None, f"{name} exited:\n{self.procs.log_tail(name)}"

    def check_exactly_once(self, all_tids: dict[int, str]) -> dict[str, Any]:
        """Every task resolved once (client), delivered once (wire) and counted once (broker)."""
        driver = self.driver
        assert driver is not None
        time.sleep(0.5)  # room for a late duplicate to arrive
        report = driver.ask("report")
        lines = driver.resolved()
        per_tid = Counter(line["tid"] for line in lines)
        assert len(lines) == len(all_tids), f"{len(lines)} resolutions for {len(all_tids)} tasks"
        assert set(per_tid) == set(all_tids.values()) and set(per_tid.values()) == {1}, per_tid
        twice = {tid: n for tid, n in report["deliveries"].items() if n != 1}
        assert not twice, f"results delivered more than once (task id: deliveries): {twice}"
        assert set(report["deliveries"]) == set(all_tids.values())
        st = driver.ask("status")["status"]
        c = st["counters"]
        print(
            f"broker counters: done {c['done']} submitted {c['submitted']} requeued {c['requeued']} "
            f"stale_results {c['stale_results']} nodes_died {c['nodes_died']} lost {c['lost']}"
        )
        assert c["submitted"] == len(all_tids) and c["done"] == len(all_tids), c
        assert c["failed"] == c["lost"] == c["timed_out"] == c["rejected"] == 0, c
        return c

    def close(self, failed: bool) -> None:
        if failed:
            for name in self.procs.procs:
                print(f"--- {name} log (tail) ---\n{self.procs.log_tail(name)}")
        if self.driver is not None:
            self.driver.quit()
        self.procs.close()


@pytest.fixture
def swarm(netlab: NetLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    sw = Swarm(netlab, tmp_path)
    failures = request.session.testsfailed
    try:
        yield sw
    finally:
        # the call phase's report is in before teardown: show the logs when the test failed
        sw.close(failed=request.session.testsfailed > failures)


def _cut_and_detect(swarm: Swarm, driver: Driver) -> tuple[dict[str, Any], float, float]:
    """Wait until node1 holds tasks, cut its link, wait until the broker drops node1.

    Returns the broker's status just before the cut, the time of the cut and the detection time.
    """
    busy = driver.ask("wait_nodes", busy=["node1"], timeout=5.0)
    assert busy["ok"], f"node1 got no work: {busy['status']}"
    held = next(n["busy"] for n in busy["status"]["nodes"] if n["name"] == "node1")
    swarm.lab.set_port("node1", up=False)
    t_cut = time.monotonic()
    gone = driver.ask("wait_nodes", absent=["node1"], timeout=10.0, wait=10.0)
    detect = time.monotonic() - t_cut
    print(
        f"node1 held {held} task(s) when its link was cut; the broker dropped it after {detect:.2f} s "
        f"(heartbeat 0.5 s x 3 = {NODE_TIMEOUT:g} s)"
    )
    assert gone["ok"], f"node1 still listed {detect:.1f} s after its link was cut: {gone['status']}"
    assert detect < 5.0, f"detection took {detect:.2f} s"
    assert detect > NODE_TIMEOUT - 0.6, f"node1 dropped after only {detect:.2f} s: too eager"
    return busy["status"], t_cut, detect


def _restore_and_rejoin(swarm: Swarm, driver: Driver, t_cut: float) -> float:
    """Bring node1's link back; returns how long until the broker lists node1 again."""
    swarm.lab.set_port("node1", up=True)
    t_up = time.monotonic()
    back = driver.ask("wait_nodes", present=["node1"], timeout=20.0, wait=20.0)
    rejoin = time.monotonic() - t_up
    assert back["ok"], f"node1 did not rejoin within 20 s: {back['status']}\n{swarm.procs.log_tail('node1')}"
    print(f"node1 listed again {rejoin:.2f} s after its link came back (outage {t_up - t_cut:.2f} s)")
    assert rejoin < 10.0, f"rejoin took {rejoin:.2f} s"
    return rejoin


# --------------------------------------------------------------------------- the tests


@pytest.mark.timeout(90)
def test_cut_link_failover_and_rejoin(swarm: Swarm) -> None:
    """Cut node1 off while it holds tasks; they finish on node2; node1 comes back and works again."""
    driver = swarm.start()
    t_joined = time.monotonic()
    all_tids: dict[int, str] = {}

    # (1) both nodes get work -------------------------------------------------------
    tids1 = _submit(driver, 0, 8)
    all_tids.update(tids1)
    phase1 = _check_values(_wait_results(driver, len(all_tids), 15.0), tids1)
    ran1 = Counter(line["value"]["node"] for line in phase1.values())
    print(f"\nphase 1: {dict(ran1)}")
    assert set(ran1) == {"node1", "node2"}, f"not both nodes got work: {dict(ran1)}"

    # (2) cut node1's link while it holds tasks ---------------------------------------
    tids2 = _submit(driver, 100, 8)
    all_tids.update(tids2)
    before, t_cut, _detect = _cut_and_detect(swarm, driver)
    phase2 = _check_values(_wait_results(driver, len(all_tids), 15.0), tids2)
    t_phase2 = time.monotonic()
    ran2 = Counter(line["value"]["node"] for line in phase2.values())
    moved = sorted(i for i, line in phase2.items() if line["value"]["attempt"] >= 2)
    print(f"phase 2: results by node {dict(ran2)}; re-run after the cut (attempt >= 2): {moved}")
    late = [i for i, line in phase2.items() if line["value"]["node"] == "node1" and line["t"] > t_cut]
    assert not late, f"results came from behind the cut link: {late}"  # (CLOCK_MONOTONIC is system-wide)
    assert moved, "no task of node1's moved to node2"
    assert all(phase2[i]["value"]["node"] == "node2" for i in moved)
    requeued = driver.ask("status")["status"]["counters"]["requeued"] - before["counters"]["requeued"]
    assert len(moved) == requeued, f"the broker re-queued {requeued} task(s) of node1's but {len(moved)} re-ran"
    swarm.alive("broker", "node1", "node2")

    # (3) restore the link: node1 comes back and takes new work -------------------------
    _restore_and_rejoin(swarm, driver, t_cut)
    time.sleep(2 * NODE_TIMEOUT)  # it must stay: heartbeats flow again
    steady = driver.ask("wait_nodes", present=["node1", "node2"], timeout=0.1)
    assert steady["ok"], f"node1 dropped again after rejoining: {steady['status']}"
    tids3 = _submit(driver, 200, 8)
    all_tids.update(tids3)
    phase3 = _check_values(_wait_results(driver, len(all_tids), 15.0), tids3)
    ran3 = Counter(line["value"]["node"] for line in phase3.values())
    print(f"phase 3: results by node {dict(ran3)}")
    assert ran3["node1"] > 0, f"node1 took no new work after rejoining: {dict(ran3)}"

    # exactly once, everywhere ----------------------------------------------------------
    c = swarm.check_exactly_once(all_tids)
    assert c["nodes_died"] == 1, c
    print(
        f"timings: swarm up {t_joined - swarm.t_start:.1f} s, phases 1-2 {t_phase2 - t_joined:.1f} s, "
        f"total {time.monotonic() - swarm.t_start:.1f} s"
    )


@pytest.mark.timeout(60)
def test_link_heals_during_failover(swarm: Swarm) -> None:
    """The link comes back as soon as node1 is declared dead, while its old tasks wait at the broker.

    Tasks of 4 s fill both nodes (2 slots + 2 prefetched each), so the tasks re-queued
    from node1 cannot start on node2 before node1 is back: node1's HELLO then lists
    them as its own, still running. Whatever the broker makes of that (adopt the
    running attempt, or fence node1's answer off), each task resolves exactly once.
    """
    driver = swarm.start()
    tids = _submit(driver, 0, 8, seconds=4.0)
    _held, t_cut, detect = _cut_and_detect(swarm, driver)
    rejoin = _restore_and_rejoin(swarm, driver, t_cut)
    t_back = detect + rejoin
    lines = _check_values(_wait_results(driver, len(tids), 30.0), tids)
    by = Counter((line["value"]["node"], line["value"]["attempt"]) for line in lines.values())
    print(f"node1 back {t_back:.2f} s after the cut; results by (node, attempt): {dict(sorted(by.items()))}")
    swarm.alive("broker", "node1", "node2")
    swarm.check_exactly_once(tids)
