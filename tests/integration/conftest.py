"""Shared helpers for the integration tests: real processes, real sockets, real CurveZMQ.

Everything runs on 127.0.0.1. Every process started here is stopped in a
``finally`` (``LocalSwarm.close()``), and every home lives under pytest's
``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zlink
from zlink import protocol as P
from zlink.demo import LocalSwarm
from zlink.security import BrokerHome

SKILLS = Path(__file__).resolve().with_name("skills_basic.py")
REPO = Path(__file__).resolve().parents[2]


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_by_name(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    for n in status["nodes"]:
        if n["name"] == name:
            return n
    return None


def start_swarm(
    home: Path,
    nodes: list[str],
    *,
    slots: int = 2,
    liveness: int | None = None,
    broker_args: tuple[str, ...] = (),
    seal: bool = True,
) -> LocalSwarm:
    """A CLI broker and one CLI node process per name, serving skills_basic.py; waits until all joined.

    ``liveness`` (missed 0.5 s beats before a node is dead) defaults to the
    broker's own default, so the suite runs the settings users get. Payloads
    are sealed (``seal=False``: a swarm without a seal key).
    """
    if liveness is not None:
        broker_args = ("--liveness", str(liveness), *broker_args)
    swarm = LocalSwarm(home=home, broker_args=broker_args, seal=seal)
    try:
        swarm.start_broker()
        for name in nodes:
            swarm.start_node(str(SKILLS), slots=slots, name=name)
        with zlink.Client(swarm.invite("client", "swarm-probe"), connect_timeout=15) as probe:
            swarm.wait_nodes(probe, len(nodes), timeout=30)
    except BaseException:
        swarm.close()
        raise
    return swarm


# --------------------------------------------------------------------------- raw sockets


class RawPeer:
    """A raw pyzmq DEALER, CurveZMQ-authenticated with a join string's keys (or plaintext)."""

    def __init__(self, endpoint: str, join: zlink.Join | None) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if join is not None:
            assert join.keys.secret is not None
            self.sock.curve_serverkey = join.broker_key.encode("ascii")
            self.sock.curve_publickey = join.keys.public.encode("ascii")
            self.sock.curve_secretkey = join.keys.secret.encode("ascii")
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        # a blocking send: the DEALER queues until the handshake completes
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> list[bytes] | None:
        if self.sock.poll(int(timeout * 1000)):
            return self.sock.recv_multipart()
        return None

    def ask(self, frames: list[bytes], timeout: float = 5.0) -> P.Message | None:
        """Send, then decode the one reply (None when nothing came back in time)."""
        self.send(frames)
        reply = self.recv(timeout)
        if reply is None:
            return None
        return P.decode(reply[0], len(reply) - 1)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def raw_peer() -> Iterator[Callable[[str, zlink.Join | None], RawPeer]]:
    made: list[RawPeer] = []

    def make(endpoint: str, join: zlink.Join | None) -> RawPeer:
        peer = RawPeer(endpoint, join)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for p in made:
            p.close()


# --------------------------------------------------------------------------- in-process broker


@pytest.fixture
def inproc_broker(tmp_path: Path) -> Iterator[zlink.Broker]:
    """An in-process broker on 127.0.0.1 with its home in tmp_path."""
    broker = zlink.Broker(bind="tcp://127.0.0.1:*", home=tmp_path / "home").start()
    try:
        yield broker
    finally:
        broker.stop()


def invite(broker: zlink.Broker, name: str, role: str) -> str:
    return BrokerHome(broker.home.path).invite(name=name, role=role, endpoints=[broker.endpoint]).dump()


# --------------------------------------------------------------------------- the zlink command


def zlink_exe() -> list[str]:
    exe = shutil.which("zlink")
    assert exe is not None, "the zlink console script is not on PATH (pip install -e .)"
    return [exe]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ZLINK_JOIN", "ZLINK_HOME")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_zlink(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``zlink ARGS`` to completion (killed by subprocess.run after ``timeout``)."""
    return subprocess.run(
        [*zlink_exe(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        check=False,
    )
