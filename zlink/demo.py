"""``zlink demo``: a throw-away local swarm that audits a Python codebase.

It starts a broker and N node processes on 127.0.0.1 with CurveZMQ and fresh
keys in a temporary home, fans ``inspect``, ``scan`` and ``docs`` out per file,
merges the results with one ``verify`` task, runs the same job in one process
for comparison, and removes every process and file it created.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from .client import Client
from .errors import ConnectError
from .seal import SealKey
from .security import BrokerHome

__all__ = ["LocalSwarm", "processes_mentioning", "run_demo"]


def _free_port_triple() -> int:
    """A port P with P, P+1 and P+2 free on 127.0.0.1, below the ephemeral range.

    A restarted broker binds P+1 and P+2 again for its side channels; ports
    from the ephemeral range may by then be held (or in TIME_WAIT) by any
    outgoing connection on the host, ports below it are never handed out.
    """
    import random
    import socket

    low = 20_000
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        low = min(low, first - 3000)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(500):
        port = random.randrange(max(10_000, low - 10_000), low)
        socks: list[socket.socket] = []
        try:
            for p in (port, port + 1, port + 2):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ConnectError("found no three consecutive free ports on 127.0.0.1")


def processes_mentioning(*markers: str) -> list[tuple[int, str]]:
    """Live processes (not this one) whose command line or environment mentions a marker.

    Returns (pid, command line) pairs: tests and the chaos script use it to prove
    that nothing they started is left behind.
    """
    found = []
    wanted = [m.encode() for m in markers]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if any(m in cmd or m in env for m in wanted):
            found.append((int(entry), cmd.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return found


class LocalSwarm:
    """A broker and nodes as child processes on 127.0.0.1, with a temporary home.

    Used by the demo, the tests and the benchmarks. Everything it starts is
    stopped and everything it writes is removed by :meth:`close`.
    """

    def __init__(self, *, home: Path | None = None, broker_args: tuple[str, ...] = (), seal: bool = True) -> None:
        self._own_home = home is None
        #: the swarm's payload key, put in every join string this swarm hands out (seal=False: none)
        self.seal_key = SealKey.generate() if seal else None
        self.home = Path(home or tempfile.mkdtemp(prefix="zlink-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        #: with start_brokers(): every broker of the swarm, and their endpoints (join strings name them all)
        self.brokers: list[subprocess.Popen[bytes] | None] = []
        self.endpoints: list[str] = []
        self._broker_procs: set[subprocess.Popen[bytes]] = set()  # every broker process started
        self._broker_args = broker_args
        self._names = 0

    def start_broker(self, timeout: float = 15.0) -> str:
        bh = BrokerHome(self.home)
        bh.config_file.unlink(missing_ok=True)
        # three consecutive free ports below the kernel's ephemeral range, so that a
        # restart can bind the very same ones (ephemeral ports get reused by others)
        bind = self.endpoint or f"tcp://127.0.0.1:{_free_port_triple()}"
        self.broker = self._spawn(
            [
                "broker",
                "--home",
                str(self.home),
                "--bind",
                bind,
                "--log-level",
                "warning",
                "--quiet",
                *self._broker_args,
            ]
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                raise ConnectError(f"the broker exited at start (code {self.broker.returncode})")
            eps = bh.bound_endpoints()
            if eps:
                self.endpoint = eps[0]
                return self.endpoint
            time.sleep(0.05)
        raise ConnectError("the broker did not start in time")

    def start_brokers(self, n: int, timeout: float = 15.0) -> list[str]:
        """``n`` brokers of one swarm sharing this home (same keys, same allowed/), each told of the others."""
        ports: list[int] = []
        while len(ports) < n:
            port = _free_port_triple()
            if all(abs(port - q) > 2 for q in ports):
                ports.append(port)
        self.endpoints = [f"tcp://127.0.0.1:{p}" for p in ports]
        self.brokers = [None] * n
        self.endpoint = self.endpoints[0]
        self.start_broker(timeout=timeout)  # creates the keys
        self.brokers[0] = self.broker
        for i in range(1, n):
            self.restart_broker(i, timeout=timeout)
        return self.endpoints

    def restart_broker(self, i: int, timeout: float = 15.0) -> subprocess.Popen[bytes]:
        """Start broker ``i`` of :meth:`start_brokers` (again) on its own port."""
        import socket

        ep = self.endpoints[i]
        peers = [arg for other in self.endpoints if other != ep for arg in ("--peer", other)]
        args = ["broker", "--home", str(self.home), "--bind", ep, "--log-level", "warning", "--quiet"]
        proc = self._spawn([*args, *peers, *self._broker_args])
        self._broker_procs.add(proc)
        self.brokers[i] = proc
        if i == 0:
            self.broker = proc
        port = int(ep.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ConnectError(f"broker {i} exited at start (code {proc.returncode})")
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port + 2)) == 0:  # the last port it binds
                    return proc
            time.sleep(0.05)
        raise ConnectError(f"broker {i} did not start in time")

    def kill_broker(self, i: int) -> None:
        """SIGKILL broker ``i`` (of :meth:`start_brokers`) and reap it."""
        proc = self.brokers[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def invite(self, role: str, name: str | None = None) -> str:
        self._names += 1
        nm = name or f"{role}-{self._names}"
        endpoints = self.endpoints or [self.endpoint]
        join = BrokerHome(self.home).invite(name=nm, role=role, endpoints=endpoints)
        return join.with_seal_key(self.seal_key).dump()

    def start_node(
        self, skills: str, *, slots: int = 1, prefetch: int | None = None, name: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        join = self.invite("node", name)
        args = ["node", "--skills", skills, "--slots", str(slots), "--log-level", "warning", *extra]
        if prefetch is not None:
            args += ["--prefetch", str(prefetch)]
        return self._spawn(args, env={"ZLINK_JOIN": join})

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        full_env.pop("ZLINK_JOIN", None)
        full_env.update(env or {})
        root = str(Path(__file__).resolve().parent.parent)
        full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
        # the join string travels in the environment, never on a command line
        proc = subprocess.Popen([sys.executable, "-m", "zlink", *args], env=full_env, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def wait_nodes(self, client: Client, count: int, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = client.status()
            if len(st["nodes"]) >= count:
                return st
            for p in self.procs:
                if p.poll() is not None and p is not self.broker and p not in self._broker_procs:
                    raise ConnectError(f"a node process exited early (code {p.returncode})")
            time.sleep(0.1)
        raise ConnectError(f"only {len(st.get('nodes', []))} of {count} nodes joined in time")

    def close(self, *, kill: bool = False) -> None:
        """Stop every process (nodes first, then the broker) and remove the home.

        Stopped (SIGSTOP) processes are resumed first so that they can exit;
        ``kill=True`` kills the nodes outright instead of letting them drain.
        """
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        nodes = [p for p in self.procs if p is not self.broker and p not in self._broker_procs]
        for p in nodes:
            if p.poll() is None:
                if kill:
                    p.kill()
                else:
                    p.send_signal(signal.SIGTERM)
        # the broker last: draining nodes wait for it to acknowledge their final results
        deadline = time.monotonic() + 5
        for p in nodes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        brokers = [p for p in {id(p): p for p in [self.broker, *self.brokers]}.values() if p is not None]
        for p in brokers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in brokers:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _audit_module() -> Any:
    from nodes import audit

    return audit


def run_demo(
    *, nodes: int = 2, path: Path | None = None, limit: int | None = None, sequential: bool = True,
    report_file: Path | None = None, window: int = 2000, out: TextIO | None = None,
) -> int:  # fmt: skip
    """Run the audit on a local swarm; returns a process exit code."""
    out = out or sys.stdout
    audit = _audit_module()
    root = str(path or sysconfig.get_paths()["stdlib"])
    files = audit.find_files(root, limit=limit)
    if not files:
        print(f"zlink demo: no Python files under {root}", file=sys.stderr)
        return 2
    print(
        f"zlink demo: a broker and {nodes} node process(es) on 127.0.0.1, CurveZMQ with throw-away keys, "
        "payloads sealed end to end (the broker cannot read them)",
        file=out,
    )
    print(f"auditing {len(files):,} files under {root}: inspect, scan and docs per file, then one verify", file=out)
    out.flush()
    with LocalSwarm() as swarm:
        swarm.start_broker()
        for i in range(nodes):
            swarm.start_node("nodes.audit", slots=1, name=f"audit-node-{i + 1}")
        with Client(swarm.invite("client", "demo-client")) as client:
            swarm.wait_nodes(client, nodes)
            t0 = time.perf_counter()
            sources = _Sources(audit, files)
            # every file to each of the three skills, then one verify task over all results
            verify = client.map_reduce(
                list(audit.SKILLS), sources, "verify",
                unpack=True, ordered=False, window=window, timeout=600, progress=True,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            tasks = (len(files) - len(sources.unreadable)) * len(audit.SKILLS)
            st = client.status()
    print(audit.format_report(verify), file=out)
    spread = ", ".join(f"{n['name']} {n['done']:,}" for n in st["nodes"])
    print(
        f"\nswarm: {wall:.2f} s with {nodes} node(s) ({tasks:,} skill calls + 1 verify, "
        f"in batches; tasks per node: {spread})",
        file=out,
    )
    if sources.unreadable:
        print(f"skipped {len(sources.unreadable)} unreadable file(s): {', '.join(sources.unreadable[:5])}", file=out)
        files = [f for f in files if f not in set(sources.unreadable)]
    gc.collect()
    if sequential:
        out.flush()
        t1 = time.perf_counter()
        seq = audit.run_sequential(files)
        seq_wall = time.perf_counter() - t1
        same = json.dumps(seq, sort_keys=True) == json.dumps(verify, sort_keys=True)
        print(
            f"one process: {seq_wall:.2f} s   speedup {seq_wall / wall:.2f}x   "
            f"(same report: {'yes' if same else 'NO'})",
            file=out,
        )
    if report_file is not None:
        report_file.write_text(json.dumps(verify, indent=2, sort_keys=True))
        print(f"full report written to {report_file}", file=out)
    return 0 if verify.get("ok") else 1


class _Sources:
    """(path, source) for every file, read lazily as the fan-out consumes them."""

    def __init__(self, audit: Any, paths: list[str]) -> None:
        self.audit = audit
        self.paths = paths
        self.unreadable: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for path in self.paths:
            try:
                yield path, self.audit.read_source(path)
            except OSError:
                self.unreadable.append(path)
