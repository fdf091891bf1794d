"""The broker process: sockets, a poll loop and the ZAP handler around the scheduler.

All decisions live in :mod:`zlink.scheduler`; this module only moves bytes.
It binds three CurveZMQ server sockets:

* ``ROUTER`` on the main endpoint (port P): HELLO, tasks, results, status;
* ``PUB`` on port P+1: the beacon (epoch and time) every heartbeat interval;
* ``SUB`` on port P+2: node heartbeats.

and answers ZAP requests itself from the allowed-keys folder, in the same loop,
so a key added or removed there counts from the next handshake on. Payload
frames are received without copying and forwarded as they are; no payload is
ever decoded, logged or written anywhere.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import zmq

from . import protocol as P
from ._peer import connection_heartbeats
from ._zmqio import recv_frames, send_frames
from .errors import ConfigError, RemoteProtocolError
from .scheduler import Heartbeat, Identity, PeerGone, PeerMessage, Revoked, Scheduler, SchedulerConfig, Send, Tick
from .security import AllowedKeys, BrokerHome, KeyPair, ZapPolicy

__all__ = ["Broker"]

log = logging.getLogger("zlink.broker")

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
_DRAIN: Final = 2000


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, TypeError):
        return ""


def _port_of(endpoint: str) -> int:
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def _side_endpoint(bind: str, offset: int) -> str:
    """The bind address of a side channel: port + offset, or any port for ``*``/0."""
    head, _, port = bind.rpartition(":")
    if port in ("*", "0"):
        return f"{head}:*"
    try:
        return f"{head}:{int(port) + offset}"
    except ValueError:
        raise ConfigError(f"cannot read a port from bind address {bind!r}") from None


class Broker:
    """Runs the relay. ``run()`` blocks; ``start()`` runs it on a thread (tests, demo).

    ::

        broker = Broker(bind="tcp://0.0.0.0:7700", home="~/.zlink")
        broker.run()      # until SIGINT/SIGTERM or broker.stop()
    """

    def __init__(
        self,
        *,
        bind: str = "tcp://0.0.0.0:7700",
        home: str | Path | None = None,
        heartbeat_interval: float = 0.5,
        liveness: int = 3,
        max_message_size: int = 16 * 1024 * 1024,
        max_tasks_per_client: int = 1_000_000,
        max_submit_rate: float = 100_000.0,
        max_conversation_turns: int = 1000,
        max_conversation_rate: float = 20.0,
        max_task_questions: int = 100,
        max_message_ttl: float = 600.0,
        metrics: str | None = None,
        peers: Sequence[str] = (),
    ) -> None:
        if not bind.startswith("tcp://"):
            raise ConfigError(f"bind address must look like tcp://HOST:PORT, got {bind!r}")
        for peer in peers:
            if not peer.startswith("tcp://") or not urlsplit(peer).port:
                raise ConfigError(f"a peer broker must look like tcp://HOST:PORT, got {peer!r}")
        #: the other brokers of this swarm (they share this broker's keys); ``zlink invite`` names them all
        self.peers = tuple(peers)
        if heartbeat_interval <= 0 or liveness < 1:
            raise ConfigError("heartbeat interval must be > 0 and liveness >= 1")
        self.bind = bind
        self.home = BrokerHome(home)
        self.keys: KeyPair
        self.keys, self.created_keys = self.home.ensure()
        self.allowed = AllowedKeys(self.home.allowed)
        self.zap = ZapPolicy(self.allowed)
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.max_message_size = max_message_size
        self.max_tasks_per_client = max_tasks_per_client
        if max_submit_rate < 0:
            raise ConfigError("--max-submit-rate must be >= 0 (0: no limit)")
        self.max_submit_rate = max_submit_rate
        if max_conversation_turns < 1 or max_conversation_rate < 0 or max_task_questions < 0 or max_message_ttl < 0:
            raise ConfigError("loop-guard limits must be positive (a rate of 0: no rate limit)")
        self.max_conversation_turns = max_conversation_turns
        self.max_conversation_rate = max_conversation_rate
        self.max_task_questions = max_task_questions
        self.max_message_ttl = max_message_ttl
        #: "HOST:PORT" of the Prometheus endpoint (None: off)
        self.metrics = metrics
        self.metrics_address = ""
        self._want_status = threading.Event()
        self._status_ready = threading.Event()
        self._status_snapshot: dict[str, Any] | None = None
        self.epoch = os.urandom(8)
        self.endpoint = ""
        self.beacon_endpoint = ""
        self.heartbeat_endpoint = ""
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.sched: Scheduler | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> Broker:
        """Run on a background thread; return once bound."""
        self._thread = threading.Thread(target=self._run_safely, name="zlink-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ConfigError("broker did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _run_safely(self) -> None:
        try:
            self.run(handle_signals=False)
        except BaseException as exc:  # reported to start(), or logged if it started
            if self._ready.is_set():
                log.exception("broker loop crashed")
            self._error = exc
            self._ready.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop

    def run(self, *, handle_signals: bool = True) -> None:
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self._stop.set())
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            self._serve(ctx)
        finally:
            ctx.destroy(linger=0)

    def _server_socket(self, ctx: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_server = True
        sock.curve_secretkey = (self.keys.secret or "").encode("ascii")
        sock.curve_publickey = self.keys.public.encode("ascii")
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        connection_heartbeats(sock)
        return sock

    def _bind(self, sock: zmq.Socket[Any], endpoint: str) -> str:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind {endpoint}: {exc.strerror} (is another broker running there?)") from None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _serve(self, ctx: zmq.Context[Any]) -> None:
        # the ZAP handler must exist before any CURVE socket binds
        zap = ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
        router = self._server_socket(ctx, zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 200_000)
        router.setsockopt(zmq.RCVHWM, 200_000)
        router.setsockopt(zmq.ZAP_DOMAIN, b"zlink")
        self.endpoint = self._bind(router, self.bind)
        beacon = self._server_socket(ctx, zmq.PUB)
        beacon.setsockopt(zmq.ZAP_DOMAIN, b"zlink")
        self.beacon_endpoint = self._bind(beacon, _side_endpoint(self.bind, 1))
        hb = self._server_socket(ctx, zmq.SUB)
        hb.setsockopt(zmq.ZAP_DOMAIN, b"zlink")
        hb.setsockopt(zmq.SUBSCRIBE, b"")
        hb.setsockopt(zmq.RCVHWM, 1_000_000)  # read in batches, see the loop
        self.heartbeat_endpoint = self._bind(hb, _side_endpoint(self.bind, 2))
        try:
            self.home.save_endpoints([self.endpoint], self.peers)
        except OSError as exc:
            log.warning("could not record the endpoint in %s: %s", self.home.config_file, exc)

        now = time.monotonic()
        config = SchedulerConfig(
            heartbeat_interval=self.heartbeat_interval,
            liveness=self.liveness,
            max_message_size=self.max_message_size,
            beacon_port=_port_of(self.beacon_endpoint),
            heartbeat_port=_port_of(self.heartbeat_endpoint),
            max_tasks_per_client=self.max_tasks_per_client,
            max_submit_rate=self.max_submit_rate,
            max_conversation_turns=self.max_conversation_turns,
            max_conversation_rate=self.max_conversation_rate,
            max_task_questions=self.max_task_questions,
            max_message_ttl=self.max_message_ttl,
        )
        sched = self.sched = Scheduler(epoch=self.epoch, config=config, now=now)
        metrics_server = None
        if self.metrics:
            from .metrics import MetricsServer

            try:
                metrics_server = MetricsServer(self.metrics, self._snapshot).start()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot serve metrics on {self.metrics}: {exc}") from None
            self.metrics_address = metrics_server.address
            log.info("metrics on http://%s/metrics", self.metrics_address)
        log.info(
            "broker listening on %s (beacon %s, heartbeats %s), epoch %s",
            self.endpoint, self.beacon_endpoint, self.heartbeat_endpoint, self.epoch.hex(),
        )  # fmt: skip
        self._ready.set()

        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(zap, zmq.POLLIN)
        # heartbeats are NOT polled: they are read in a batch right before each
        # liveness check (every interval / 4), which is the only time they matter;
        # waking up for each of them cost most of an idle broker's CPU
        next_beacon = 0.0
        next_keys = now + 1.0
        max_size = self.max_message_size
        handle = sched.handle
        decode = P.decode
        while not self._stop.is_set():
            wait = min(sched.next_wakeup(), next_beacon, now + 0.25) - time.monotonic()
            events = dict(poller.poll(max(0, math.ceil(wait * 1000))))
            now = time.monotonic()
            if zap in events:
                self._serve_zap(zap)
            if router in events:
                for _ in range(_DRAIN):
                    try:
                        frames = recv_frames(router)
                    except zmq.Again:
                        break
                    if len(frames) < 2:
                        sched.count_error("empty")
                        continue
                    route = frames[0].bytes
                    header = frames[1]
                    if len(frames) > 2 and sum(len(f) for f in frames[1:]) > max_size:
                        sched.count_error("too-large")
                        self._send(
                            router, [Send(route, P.Error(code="too-large", message=f"message over {max_size} bytes"))]
                        )
                        continue
                    try:
                        msg = decode(header.buffer, len(frames) - 2)
                    except RecursionError:  # belt and braces: decode maps what it knows
                        sched.count_error("malformed")
                        self._send(router, [Send(route, P.Error(code="malformed", message="header nested too deeply"))])
                        continue
                    except RemoteProtocolError as exc:
                        sched.count_error(exc.code)
                        self._send(router, [Send(route, P.Error(code=exc.code, message=str(exc)[:500]))])
                        continue
                    identity = address = None
                    if type(msg) is P.Hello:
                        identity = self._identity(header)
                        address = _peer_address(header)
                    self._send(router, handle(PeerMessage(route, msg, frames[2:], identity, address or ""), now))
            due = now >= sched.next_wakeup()
            if due:
                for _ in range(1_000_000):
                    try:
                        frame = hb.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        beat = decode(frame.buffer, 0)
                    except RecursionError:
                        sched.count_error("heartbeat-malformed")
                        continue
                    except RemoteProtocolError as exc:
                        sched.count_error(f"heartbeat-{exc.code}")
                        continue
                    if type(beat) is not P.Heartbeat:
                        sched.count_error("heartbeat-unexpected")
                        continue
                    key = str(frame.get("User-Id"))
                    self._send(router, handle(Heartbeat(key, beat), now))
            if now >= next_beacon:
                next_beacon = now + self.heartbeat_interval
                try:
                    beacon.send(P.encode(P.Beacon(epoch=self.epoch, time=time.time())), zmq.NOBLOCK)
                except zmq.Again:
                    pass
            if now >= next_keys:
                next_keys = now + 1.0
                for key in self.allowed.take_removed():
                    log.info("key %s... was revoked: disconnecting its peers", key[:8])
                    self._send(router, handle(Revoked(key), now))
                sched.counters["auth_denied"] = self.zap.denied
            if due:
                self._send(router, handle(Tick(), now))
            if self._want_status.is_set():
                self._want_status.clear()
                self._status_snapshot = sched.status()
                self._status_ready.set()
        log.info("broker stopping")
        if metrics_server is not None:
            metrics_server.stop()
        for s in (router, beacon, hb, zap):
            s.close(linger=0)

    def _snapshot(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The scheduler's status, taken by the broker's loop (thread-safe; None if it does not answer)."""
        self._status_ready.clear()
        self._want_status.set()
        if not self._status_ready.wait(timeout):
            return None
        return self._status_snapshot

    def _identity(self, header: zmq.Frame) -> Identity | None:
        try:
            user = header.get("User-Id")
        except zmq.ZMQError:
            return None
        entry = self.allowed.get(str(user)) if user else None
        if entry is None:
            return None
        return Identity(entry.public, entry.name, entry.role)

    def _serve_zap(self, zap: zmq.Socket[Any]) -> None:
        while True:
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self.zap.reply(request)
            except Exception:  # never let a ZAP request take the broker down
                log.exception("ZAP handler failed; refusing the connection")
                reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
            if reply[2] != b"200":
                log.info("refused a connection: %s", reply[3].decode())
            zap.send_multipart(reply)

    def _send(self, router: zmq.Socket[Any], actions: list[Send]) -> None:
        undelivered: set[bytes] = set()  # direct messages whose recipient's connection is gone
        for act in actions:
            msg = act.msg
            if undelivered and type(msg) is P.Sent and msg.ok and msg.mid in undelivered:
                # the scheduler confirmed it before the send failed: tell the truth instead
                act = Send(act.route, P.Sent(mid=msg.mid, ok=False, reason="undeliverable: the recipient disconnected"))
            header = P.encode(act.msg)
            try:
                send_frames(router, [act.route, header, *act.frames] if act.frames else [act.route, header])
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                    if type(msg) is P.Deliver and not msg.topic:
                        undelivered.add(msg.mid)
                    assert self.sched is not None
                    more = self.sched.handle(PeerGone(act.route), time.monotonic())
                    if more:
                        self._send(router, more)
                else:  # pragma: no cover - context torn down
                    raise


def endpoint_host(endpoint: str) -> str:
    return urlsplit(endpoint).hostname or ""
