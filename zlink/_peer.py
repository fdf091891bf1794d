"""The connection every node and client keeps to the broker (internal).

One I/O thread per peer owns all its sockets: the DEALER to the broker, the
SUB that hears the broker's beacon, and the socket monitor that turns a refused
CurveZMQ handshake into :class:`AuthenticationError`. Other threads never touch
a socket: they hand closures to the I/O thread with :meth:`call_soon`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import math
import os
import queue
import random
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from ._zmqio import recv_frames, send_frames
from .errors import (
    AuthenticationError,
    ClosedError,
    ConnectError,
    LoopGuarded,
    RemoteProtocolError,
    SealError,
    Undeliverable,
    ZlinkError,
)
from .seal import MessageSealer, SealKey
from .security import Join, resolve_seal_key

log = logging.getLogger("zlink.peer")

_HANDSHAKE_FAILED: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MONITOR_EVENTS: Final = _HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED

AGENT: Final = "zlink"
#: seconds a closing peer waits for the broker's answer to its BYE (see PeerLink._await_bye)
BYE_WAIT: Final = 0.25


def curve_client(sock: zmq.Socket[Any], join: Join) -> None:
    sock.curve_serverkey = join.broker_key.encode("ascii")
    sock.curve_publickey = join.keys.public.encode("ascii")
    assert join.keys.secret is not None
    sock.curve_secretkey = join.keys.secret.encode("ascii")


def tune_reconnect(sock: zmq.Socket[Any]) -> None:
    """Exponential reconnect backoff with per-socket jitter (no reconnect storms)."""
    sock.setsockopt(zmq.RECONNECT_IVL, random.randint(80, 250))
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, random.randint(2000, 4000))
    sock.setsockopt(zmq.LINGER, 0)
    connection_heartbeats(sock)


def connection_heartbeats(sock: zmq.Socket[Any]) -> None:
    """ZMTP heartbeats: a TCP connection that went silent (cut link, dead host) is
    dropped and re-established after a few seconds instead of waiting for the
    kernel's retransmission backoff, which can take minutes."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 6000)


def with_port(endpoint: str, port: int) -> str:
    host = urlsplit(endpoint).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


class Waker:
    """Wakes the I/O thread's poll from any thread, at most one byte in flight."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)
        self.armed = False

    def wake(self) -> None:
        if not self.armed:
            self.armed = True
            try:
                self.w.send(b"x")
            except (BlockingIOError, OSError):
                pass

    def clear(self) -> None:
        # drain first, then disarm: a wake() in between must not be lost (the
        # caller processes its queues after clear(), so anything queued before
        # the disarm is seen, and anything after it sends a new byte)
        try:
            while self.r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self.armed = False

    def close(self) -> None:
        self.r.close()
        self.w.close()


class Message(NamedTuple):
    """An agent message as received: ``sender`` is the name of the key the broker
    authenticated the sender with; ``topic`` is "" for a direct message."""

    sender: str
    body: Any
    topic: str = ""
    id: str = ""


class PeerLink(ABC):
    """Base of Node and Client: connection, handshake, epochs, the I/O loop.

    Subclasses provide :meth:`hello`, :meth:`on_message`, and may override
    :meth:`on_welcome`, :meth:`on_tick` and :meth:`on_close`.
    """

    hat: str = "client"

    def __init__(
        self,
        join: str | Join | None,
        *,
        name: str | None,
        connect_timeout: float,
        heartbeat_interval: float | None = None,
        liveness: int | None = None,
        seal_key: SealKey | str | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.join = Join.from_env(join)
        eps = self.join.endpoints
        #: the broker this link talks to now: a client picks one of the join string's brokers at random
        #: (spreading clients) and moves to the next when it dies; a node keeps one link per broker
        self.endpoint = endpoint or (random.choice(eps) if self.hat == "client" else eps[0])
        self._failover = endpoint is None and self.hat == "client" and len(set(eps)) > 1
        self._switched = 0.0
        #: the swarm's payload key; None means this peer's payloads travel unsealed
        self.seal_key = resolve_seal_key(seal_key, self.join)
        self.name = name or self.join.name or f"{socket.gethostname()}-{os.getpid()}"
        self.connect_timeout = connect_timeout
        self.session = os.urandom(8)
        self.epoch: bytes | None = None
        self.welcome: P.Welcome | None = None
        self.max_message_size = 16 * 1024 * 1024
        #: seconds between this node's heartbeats (never slower than the broker asks)
        self.heartbeat_interval = heartbeat_interval or 0.5
        #: missed broker beacons before this peer presumes the broker gone
        self.liveness = liveness or 3
        self.beacon_interval = 0.5
        self._want_interval = heartbeat_interval
        self._want_liveness = liveness
        self._calls: deque[Callable[[], None]] = deque()
        self._waker = Waker()
        self._closing = False
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._ready = threading.Event()
        self._fatal: ZlinkError | None = None
        self._last_beacon = 0.0
        self._hello_sent = 0.0
        self._hello_backoff = 1.0
        self._beacon_endpoint = ""
        self.dropped_sends = 0
        #: seconds the broker's wall clock is ahead of ours, from its last beacon (None: none heard)
        self.clock_offset: float | None = None
        # agent messaging
        self._inbox: queue.Queue[Message | BaseException] = queue.Queue()
        self._sending: dict[bytes, cf.Future[None]] = {}
        self._send_deadline: dict[bytes, float] = {}
        self._unsent: deque[tuple[str, str, bytes, bytes, float]] = deque()
        self._topics: set[str] = set()
        self._mids = itertools.count(1)
        self._msg_sealer = MessageSealer(self.seal_key) if self.seal_key is not None else None
        #: sealed payloads (tasks, results, messages, answers) that failed to open: tampered
        #: with, sealed with another seal key, or unsealed in a swarm that seals
        self.seal_failures = 0
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._thread = threading.Thread(target=self._run, name=f"zlink-{self.hat}-io", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def _connect(self) -> None:
        """Start the I/O thread and wait for WELCOME (or a clear failure)."""
        self._thread.start()
        if not self._ready.wait(self.connect_timeout):
            self._closing = True
            self._waker.wake()
            self._thread.join(2.0)
            self._term()
            if self._fatal is not None:
                raise self._fatal
            raise ConnectError(
                f"could not reach the broker at {', '.join(self.join.endpoints)} within "
                f"{self.connect_timeout:g} s (is it running, and is the port reachable?)"
            )
        if self._fatal is not None:
            self._thread.join(2.0)
            self._term()
            raise self._fatal

    def _term(self) -> None:
        if self._thread.is_alive():
            return  # never block on term() while a socket may still be open
        try:
            self._ctx.term()
        except zmq.ZMQError:
            pass
        self._waker.close()

    def close(self, timeout: float = 5.0) -> None:
        """Say BYE and stop the I/O thread. Idempotent and thread-safe."""
        with self._close_lock:
            if self._closed.is_set() or not self._thread.is_alive():
                self._closed.set()
                return
            self._closing = True
            self._waker.wake()
            self._thread.join(timeout)
            self._closed.set()
            self._term()
        for fut in list(self._sending.values()):  # messages the broker never confirmed
            if not fut.done():
                fut.set_exception(ClosedError(f"this {self.hat} was closed before the message was confirmed"))
        self._sending.clear()

    @property
    def closed(self) -> bool:
        return self._closed.is_set() or self._closing

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread (thread-safe)."""
        if self._closing:
            raise ClosedError(f"this {self.hat} is closed")
        self._calls.append(fn)
        self._waker.wake()

    # ------------------------------------------------------------------ agent messaging (any thread)

    def send(self, to: str, message: Any, *, ttl: float = 60.0) -> cf.Future[None]:
        """Send ``message`` (a msgpack value) to the peer named ``to``; returns a future.

        The future resolves once the broker delivered it, or fails with
        :class:`~zlink.Undeliverable` (``to`` did not connect within ``ttl``
        seconds) or :class:`~zlink.LoopGuarded`. The recipient sees this peer's
        key name as the sender, as the broker authenticated it.
        """
        if not isinstance(to, str) or not to or len(to) > P.MAX_NAME:
            raise ValueError(f"invalid peer name {to!r}")
        return self._send_message(to, "", message, ttl)

    def publish(self, topic: str, message: Any) -> cf.Future[None]:
        """Send ``message`` to every current subscriber of ``topic``; the future resolves when the
        broker has fanned it out (it fails with :class:`~zlink.Undeliverable` if this key may not publish)."""
        if not isinstance(topic, str) or not topic or len(topic) > P.MAX_NAME:
            raise ValueError(f"invalid topic {topic!r}")
        return self._send_message("", topic, message, 0.0)

    def subscribe(self, *topics: str) -> None:
        """Receive the messages published to these topics (through :meth:`receive`)."""
        self._topics.update(topics)
        self.call_soon(lambda: self._post(P.Subscribe(topics=tuple(topics))) if self.welcome else None)

    def unsubscribe(self, *topics: str) -> None:
        self._topics.difference_update(topics)
        self.call_soon(lambda: self._post(P.Subscribe(topics=tuple(topics), stop=True)) if self.welcome else None)

    def receive(self, timeout: float | None = None) -> Message:
        """The next message for this peer (direct or from a topic); ``TimeoutError`` after ``timeout``.

        Raises :class:`~zlink.LoopGuarded` once when the broker paused one of this
        peer's conversations.
        """
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def inbox(self) -> AsyncIterator[Message]:
        """``async for msg in peer.inbox()``: every message as it arrives (forever)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                yield self.receive(timeout=0)
            except TimeoutError:
                await loop.run_in_executor(None, self._wait_inbox)

    def _wait_inbox(self) -> None:
        with self._inbox.not_empty:
            while not self._inbox.queue and not self.closed:
                self._inbox.not_empty.wait(0.5)

    def _send_message(self, to: str, topic: str, message: Any, ttl: float) -> cf.Future[None]:
        if self.closed:
            raise ClosedError(f"this {self.hat} is closed")
        plain = P.pack_value(message)
        if len(plain) > self.max_message_size - 4096:
            raise Undeliverable(
                f"the message is {len(plain)} bytes; the broker accepts at most {self.max_message_size} per message"
            )
        mid = next(self._mids).to_bytes(8, "big") + os.urandom(4)
        fut: cf.Future[None] = cf.Future()
        self._sending[mid] = fut
        # no answer at all (e.g. the broker restarted and lost it): give up after the TTL and a margin
        self._send_deadline[mid] = time.monotonic() + ttl + 30.0

        def go() -> None:
            if self.welcome is None:
                self._unsent.append((to, topic, mid, plain, ttl))  # sent after WELCOME
                return
            self._post_message(to, topic, mid, plain, ttl)

        self.call_soon(go)
        return fut

    def _post_message(self, to: str, topic: str, mid: bytes, plain: bytes, ttl: float) -> None:
        payload = plain
        if self._msg_sealer is not None:
            me = self.welcome.key_name if self.welcome is not None else ""
            payload = self._msg_sealer.seal(me, to or "#" + topic, mid, plain)
        if topic:
            self._post(P.Publish(topic=topic, mid=mid), [payload])
        else:
            self._post(P.SendMessage(to=to, mid=mid, ttl=ttl), [payload])

    def _messaging_welcome(self) -> None:
        """After every WELCOME (I/O thread): topics again (a new broker knows none), then what waited."""
        if self._topics:
            self._post(P.Subscribe(topics=tuple(self._topics)))
        while self._unsent:
            self._post_message(*self._unsent.popleft())

    def _on_deliver(self, msg: P.Deliver, frames: list[zmq.Frame]) -> None:
        data: bytes | memoryview = frames[0].buffer
        try:
            if self._msg_sealer is not None:
                me = self.welcome.key_name if self.welcome is not None else ""
                data = self._msg_sealer.open(msg.sender, "#" + msg.topic if msg.topic else me, msg.mid, data)
            body = P.unpack_value(data)
        except (SealError, RemoteProtocolError) as exc:
            self.seal_failures += 1
            log.warning("dropped a message from %s: %s", msg.sender, exc)
            return
        self._inbox.put(Message(msg.sender, body, msg.topic, msg.mid.hex()))

    def _expire_sends(self, now: float) -> None:
        for mid in [m for m, t in self._send_deadline.items() if t <= now]:
            del self._send_deadline[mid]
            fut = self._sending.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_exception(Undeliverable("the broker never confirmed this message (did it restart?)"))

    def _on_sent(self, msg: P.Sent) -> None:
        self._send_deadline.pop(msg.mid, None)
        fut = self._sending.pop(msg.mid, None)
        if fut is None or fut.done():
            return
        if msg.ok:
            fut.set_result(None)
        elif msg.reason.startswith("loop-guard"):
            fut.set_exception(LoopGuarded(msg.reason))
        else:
            fut.set_exception(Undeliverable(msg.reason))

    # ------------------------------------------------------------------ hooks

    @abstractmethod
    def hello(self) -> P.Hello:
        """The HELLO this peer registers with."""

    @abstractmethod
    def on_message(self, msg: P.Message, frames: list[zmq.Frame]) -> None:
        """Every message from the broker but WELCOME (I/O thread)."""

    def on_welcome(self, welcome: P.Welcome, new_epoch: bool) -> None:
        """After every WELCOME; ``new_epoch`` when the broker restarted."""

    def on_tick(self, now: float) -> None:
        """Called at least every ``tick_interval`` seconds on the I/O thread."""

    def on_close(self) -> None:
        """On the I/O thread, just before the sockets close."""

    def on_poll(self) -> None:
        """On the I/O thread after every wake-up of its poll loop."""

    def on_fatal(self, exc: ZlinkError) -> None:
        """The link cannot go on (e.g. the key was revoked)."""

    tick_interval: float = 0.05

    # ------------------------------------------------------------------ I/O thread

    def _post(self, msg: P.Message, frames: list[Any] | None = None) -> None:
        """Send on the DEALER (I/O thread only)."""
        header = P.encode(msg)
        try:
            if frames:
                send_frames(self._sock, [header, *frames])
            else:
                self._sock.send(header, zmq.NOBLOCK)
        except zmq.Again:
            # the send queue is full (broker unreachable for long): the message is
            # dropped here; unresolved tasks are resubmitted on the next WELCOME
            self.dropped_sends += 1
            if msg.COMMAND != "HELLO":
                self.welcome = None
        except zmq.ZMQError as exc:  # pragma: no cover - context torn down under us
            log.debug("send failed: %s", exc)

    def _send_hello(self) -> None:
        self._hello_sent = time.monotonic()
        self._post(self.hello())

    def _run(self) -> None:
        ctx = self._ctx
        sock = self._sock = ctx.socket(zmq.DEALER)
        curve_client(sock, self.join)
        tune_reconnect(sock)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        beacon = ctx.socket(zmq.SUB)
        curve_client(beacon, self.join)
        tune_reconnect(beacon)
        beacon.setsockopt(zmq.SUBSCRIBE, b"")
        self._beacon_sock = beacon
        self.setup(ctx)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(beacon, zmq.POLLIN)
        poller.register(self._waker.r, zmq.POLLIN)
        waker_fd = self._waker.r.fileno()
        self._send_hello()
        next_tick = time.monotonic()
        handshake_failures = 0
        try:
            while not self._closing:
                timeout = max(0.0, next_tick - time.monotonic())
                events = dict(poller.poll(math.ceil(timeout * 1000)))
                if waker_fd in events:  # pyzmq reports plain sockets by fd
                    self._waker.clear()
                while self._calls:
                    try:
                        self._calls.popleft()()
                    except ZlinkError as exc:  # a closure's failure belongs to its caller
                        log.debug("call failed: %s", exc)
                if sock in events:
                    for _ in range(1000):
                        try:
                            frames = recv_frames(sock)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                if beacon in events:
                    self._drain_beacon(beacon)
                if monitor in events:
                    while True:
                        try:
                            ev = recv_monitor_message(monitor, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        kind = ev["event"]
                        if kind & _HANDSHAKE_FAILED:
                            handshake_failures += 1
                            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH or handshake_failures >= 2:
                                self._auth_failed()
                        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                            handshake_failures = 0
                        elif kind == zmq.EVENT_DISCONNECTED and self.welcome is not None:
                            self.on_disconnected()
                self.on_poll()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.tick_interval
                    self._check_link(now)
                    if self._send_deadline:
                        self._expire_sends(now)
                    self.on_tick(now)
        except Exception:  # pragma: no cover - a bug: surface it rather than hang callers
            log.exception("zlink %s I/O thread crashed", self.hat)
            self._fatal = self._fatal or ConnectError("the zlink I/O thread crashed; see the log")
            self._ready.set()
        finally:
            try:
                if self.welcome is not None and self._fatal is None:
                    self.on_close()
                    self._post(P.Bye(reason="closing"))
                    self._await_bye(sock)
            finally:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                for s in (monitor, beacon, sock):
                    s.close(linger=0 if self._fatal else 200)
                self.teardown()
                self._closed.set()

    def setup(self, ctx: zmq.Context[Any]) -> None:
        """Extra sockets a subclass needs (I/O thread, before connecting)."""

    def teardown(self) -> None:
        """Close what :meth:`setup` opened."""

    def _auth_failed(self) -> None:
        exc = AuthenticationError(
            f"the broker at {', '.join(self.join.endpoints)} refused this key "
            f"({self.join.keys.public[:8]}...): it is not authorised, was revoked, "
            "or the join string names the wrong broker key"
        )
        self._fatal = exc
        self._closing = True
        self._ready.set()
        self.on_fatal(exc)

    def _check_link(self, now: float) -> None:
        if self.welcome is not None and now - self._last_beacon > self.beacon_interval:
            # this thread may itself have been busy (a slow callback): read what
            # arrived meanwhile before judging the broker
            self._drain_beacon(self._beacon_sock)
        silent = now - self._last_beacon
        if self.welcome is not None and silent > self.beacon_interval * (self.liveness + 1):
            # no beacon for longer than the broker's own liveness rule: presume it
            # gone (restarting, or cut off); keep every unresolved task and say
            # HELLO until a broker answers (DEALER reconnects by itself, with backoff)
            if self._failover:
                self._switch_broker(f"no beacon for {silent:.1f} s")
                return
            log.warning(
                "no beacon from the broker at %s for %.1f s: presuming it gone, re-registering", self.endpoint, silent
            )
            self.welcome = None
            self.on_broker_lost()
        elif (
            self._failover and self.welcome is None and self._switched
            and now - self._switched > self.beacon_interval * (self.liveness + 1)
        ):  # fmt: skip
            self._switch_broker("no answer")  # the broker we moved to does not answer either: try the next
        # re-send HELLO while a WELCOME is overdue, backing off to every few seconds
        if self.welcome is None and now - self._hello_sent > self._hello_backoff:
            self._hello_backoff = min(5.0, self._hello_backoff * 1.5) * random.uniform(0.9, 1.1)
            self._send_hello()

    def on_disconnected(self) -> None:
        """The broker's process or host closed the connection (I/O thread): a client with other
        brokers moves on at once rather than waiting for the beacons to stop."""
        if self._failover:
            self._switch_broker("its connection closed")

    def _switch_broker(self, why: str) -> None:
        """Move to the next broker of the join string (I/O thread); unresolved work follows on its WELCOME."""
        eps = sorted(set(self.join.endpoints))  # one order for every peer: nodes hand over to the same broker
        old = self.endpoint
        new = eps[(eps.index(old) + 1) % len(eps)] if old in eps else eps[0]
        log.warning("broker %s lost (%s): moving to %s", old, why, new)
        try:
            self._sock.disconnect(old)
        except zmq.ZMQError:
            pass
        self._sock.connect(new)
        self.endpoint = new
        self._switched = time.monotonic()
        if self.welcome is not None:
            self.welcome = None
            self.on_broker_lost()
        self._hello_backoff = 1.0
        self._send_hello()

    def on_broker_lost(self) -> None:
        """The broker went silent (I/O thread); state is kept for when it returns."""

    def _drain_beacon(self, beacon: zmq.Socket[Any]) -> None:
        while True:
            try:
                data = beacon.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = P.decode(data)
            except RemoteProtocolError:
                continue
            if type(msg) is P.Beacon:
                self._last_beacon = time.monotonic()
                if msg.time:  # the broker's wall clock minus ours (plus the beacon's travel time)
                    self.clock_offset = msg.time - time.time()
                if self.epoch is not None and msg.epoch != self.epoch and self.welcome is not None:
                    log.info("broker restarted (new epoch %s): registering again", msg.epoch.hex())
                    self.welcome = None
                    self._send_hello()

    def _await_bye(self, sock: zmq.Socket[Any], limit: float = BYE_WAIT) -> None:
        """Until the broker answers our BYE (at most ``limit`` seconds), reading and dropping the rest.

        Closing a TCP connection with unread data in it makes the kernel reset it,
        and a reset discards what the broker has received but not yet read: the
        last CANCELs and the BYE itself, so the broker would keep this session's
        tasks (and its key's quota) until the client timeout. Reading until the
        broker's answer means nothing is on the way when the socket closes.
        """
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            try:
                if not sock.poll(math.ceil(left * 1000)):
                    return
                frames = recv_frames(sock)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            try:
                if type(P.decode(frames[0].buffer, len(frames) - 1)) is P.Bye:
                    return
            except RemoteProtocolError:
                pass

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        self._last_beacon = time.monotonic()  # any message shows the broker is alive
        try:
            msg = P.decode(frames[0].buffer, len(frames) - 1)
        except RemoteProtocolError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        t = type(msg)
        if t is P.Welcome:
            self._on_welcome(msg)  # type: ignore[arg-type]
            return
        if t is P.Deliver:
            self._on_deliver(msg, frames[1:])  # type: ignore[arg-type]
            return
        if t is P.Sent:
            self._on_sent(msg)  # type: ignore[arg-type]
            return
        if type(msg) is P.Error:
            if msg.code == "hello-first":
                if now_overdue(self._hello_sent, 0.2):
                    self.welcome = None
                    self._send_hello()
                return
            if msg.code == "loop-guard" and not msg.tids:
                self._inbox.put(LoopGuarded(msg.message))  # the other side of a paused conversation
                return
            if msg.code in ("forbidden", "bad-role", "bad-hello", "unauthenticated", "revoked") and not msg.tids:
                refused = AuthenticationError(f"the broker refused this {self.hat}: {msg.message}")
                if not self._ready.is_set() or msg.code == "revoked":
                    self._fatal = refused
                    self._closing = True
                    self._ready.set()
                    self.on_fatal(refused)
                    return
        self.on_message(msg, frames[1:])

    def _on_welcome(self, msg: P.Welcome) -> None:
        self._switched = 0.0
        if self.welcome is not None and msg.epoch == self.epoch:
            # the answer to a HELLO resent while the broker was away: we are
            # registered already, and re-running on_welcome would resubmit again
            return
        rejoined = self.epoch is not None  # every WELCOME after the first follows a lost broker
        new_epoch = rejoined and msg.epoch != self.epoch
        self.epoch = msg.epoch
        self.welcome = msg
        self.name = msg.name
        self.max_message_size = msg.max_message_size
        # the broker's interval is authoritative for declaring nodes dead: beat at
        # least that often (faster if asked); our own liveness judges the broker
        self.beacon_interval = msg.heartbeat_interval
        self.heartbeat_interval = min(msg.heartbeat_interval, self._want_interval or math.inf)
        self.liveness = self._want_liveness or msg.liveness
        self._last_beacon = time.monotonic()
        self._hello_backoff = max(1.0, self.heartbeat_interval * 2)
        if msg.beacon_port:
            endpoint = with_port(self.endpoint, msg.beacon_port)
            # first WELCOME, or back after the broker was lost (restarted, on new ports or the same
            # ones, or cut off a while): a connection made afresh tries at once, where the old one
            # waits out its reconnect backoff, which after a long outage outlasts the beacon
            # silence that makes us presume the broker gone
            if endpoint != self._beacon_endpoint or rejoined:
                if self._beacon_endpoint:
                    try:
                        self._beacon_sock.disconnect(self._beacon_endpoint)
                    except zmq.ZMQError:
                        pass
                self._beacon_sock.connect(endpoint)
                self._beacon_endpoint = endpoint
        self.on_welcome(msg, new_epoch)
        self._messaging_welcome()
        self._ready.set()


def now_overdue(since: float, seconds: float) -> bool:
    return time.monotonic() - since > seconds
