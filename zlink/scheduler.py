"""The broker's brain: a pure state machine with no sockets and no clock.

The broker shell feeds it events (a decoded message from a peer, a heartbeat,
a tick of its clock) together with the current time, and sends what it returns.
Every state change of a task happens here, in the transitions listed in
:data:`TASK_TRANSITIONS`; ``docs/architecture.md`` prints the same table and a
test keeps the two in sync.

Payload frames are carried as opaque objects: the scheduler never looks inside.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from . import protocol as P
from .protocol import Outcome

__all__ = [
    "ROLES",
    "TASK_TRANSITIONS",
    "Heartbeat",
    "Identity",
    "PeerGone",
    "PeerMessage",
    "Scheduler",
    "SchedulerConfig",
    "Send",
    "Tick",
]

#: Roles an authorised key can have, and what each may do.
ROLES: Final = {
    "node": frozenset({"node", "message"}),
    "client": frozenset({"client", "status", "message", "publish"}),
    "both": frozenset({"node", "client", "status", "message", "publish"}),
    "admin": frozenset({"client", "status", "admin", "message", "publish"}),
}

QUEUED: Final = "queued"
RUNNING: Final = "running"

#: (state, event) -> next state. "gone" means the broker forgets the task.
TASK_TRANSITIONS: Final[dict[tuple[str, str], str]] = {
    ("new", "submit"): QUEUED,
    (QUEUED, "dispatch"): RUNNING,
    (QUEUED, "cancel"): "gone",
    (QUEUED, "deadline"): "gone",
    (QUEUED, "client-bye"): "gone",
    (RUNNING, "result"): "gone",
    (RUNNING, "node-dead"): QUEUED,
    (RUNNING, "node-dead, attempts exhausted"): "gone",
    (RUNNING, "cancel"): "gone",
    (RUNNING, "deadline"): "gone",
    (RUNNING, "client-bye"): "gone",
}


# --------------------------------------------------------------------------- events and actions


#: agent messaging bounds: held messages per absent name, bytes held in all, topics per peer,
#: conversations tracked by the loop guard
MAILBOX_PER_NAME: Final = 1000
MAILBOX_BYTES: Final = 64 * 1024 * 1024
MAX_TOPICS_PER_PEER: Final = 1024
MAX_CONVERSATIONS: Final = 100_000

#: upper bounds (seconds) of the task latency histogram buckets (status and metrics)
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: the broker's submission rate limit allows this much more than clients pace themselves to
RATE_HEADROOM: Final = 1.2


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection authenticated as (from the broker's key table)."""

    key: str
    name: str
    role: str


@dataclass(frozen=True, slots=True)
class PeerMessage:
    """A decoded message from the main socket. ``identity`` is needed on HELLO."""

    route: bytes
    msg: P.Message
    frames: list[Any] = field(default_factory=list)
    identity: Identity | None = None
    #: the peer's network address as the socket saw it (on HELLO; for status only)
    address: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat from the PUB/SUB channel, with the key that sent it."""

    key: str
    msg: P.Heartbeat


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: check deadlines and liveness."""


@dataclass(frozen=True, slots=True)
class PeerGone:
    """A send to this route failed: the peer is no longer connected."""

    route: bytes


@dataclass(frozen=True, slots=True)
class Revoked:
    """A key was removed from the allowed set: drop its peers now."""

    key: str


Event = PeerMessage | Heartbeat | Tick | PeerGone | Revoked


@dataclass(slots=True)
class Send:
    """Action: send ``msg`` followed by ``frames`` to ``route``."""

    route: bytes
    msg: P.Message
    frames: list[Any] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    heartbeat_interval: float = 0.5
    liveness: int = 3
    #: at most this many seconds a node has, from its HELLO, to get its first heartbeat through
    #: while other nodes' first heartbeats keep arriving (the heartbeat channel is a second CurveZMQ
    #: connection, which a broker welcoming a thousand nodes at once may take seconds to accept);
    #: otherwise, and from its first heartbeat on, the node timeout applies
    first_beat_grace: float = 5.0
    max_message_size: int = 16 * 1024 * 1024
    beacon_port: int = 0
    heartbeat_port: int = 0
    #: most tasks one client key may have queued or running at the broker (all its sessions together)
    max_tasks_per_client: int = 1_000_000
    #: most new tasks per second one client key may submit, in bursts of up to one second's worth
    #: (0: no limit); resubmissions to a restarted broker do not count
    max_submit_rate: float = 100_000.0
    #: the broker allows this factor over the rate that clients pace themselves to
    rate_headroom: float = RATE_HEADROOM
    #: how long a restarted broker keeps a result whose client has not resubmitted yet
    orphan_ttl: float = 60.0
    #: a client not heard from for this long is gone: its tasks are cancelled and forgotten
    #: (clients send a HEARTBEAT every CLIENT_PING seconds; a returning client resubmits)
    client_timeout: float = 30.0
    #: agent messaging: the longest a message may wait for a peer that is not connected
    max_message_ttl: float = 600.0
    #: loop guard, per conversation (a pair of peers): turns (a message answering the other
    #: side's) per window, and per second; a one-way stream of messages is one turn
    max_conversation_turns: int = 1000
    conversation_window: float = 3600.0
    max_conversation_rate: float = 20.0
    #: how long a conversation that went over its rate stays paused
    loop_pause: float = 10.0
    #: loop guard for a task's question thread: questions one task may ask
    max_task_questions: int = 100

    @property
    def node_timeout(self) -> float:
        return self.heartbeat_interval * self.liveness


# --------------------------------------------------------------------------- state


class Peer:
    __slots__ = ("address", "hat", "identity", "last_seen", "name", "route", "seal", "session", "topics")

    def __init__(self, route: bytes, session: bytes, name: str, identity: Identity, hat: str, now: float) -> None:
        self.route = route
        self.session = session
        self.name = name
        self.identity = identity
        self.hat = hat
        self.last_seen = now
        self.seal = ""  # the public id of the peer's seal key, "" when unsealed
        self.topics: set[str] = set()  # agent messaging: topics it subscribed to
        self.address = ""


#: seconds of work the broker tries to keep queued at a node beyond its slots
PREFETCH_HORIZON: Final = 0.01
#: how often (seconds) a node's completion rate is re-measured
RATE_WINDOW: Final = 0.05


def _capacity(slots: int, max_prefetch: int, want: int) -> int:
    """Tasks the broker keeps at a node: its slots plus ``want`` queued (at most ``max_prefetch``);
    none while it offers no slot (a node sharing its slots with other brokers, all taken)."""
    return 0 if slots == 0 else slots + min(max_prefetch, want)


class Node(Peer):
    __slots__ = (
        "alive", "beating", "capacity", "done", "draining", "failed", "inflight", "joined", "max_prefetch",
        "missing", "rate", "rate_n", "rate_t", "skills", "slots",
    )  # fmt: skip

    def __init__(self, *a: Any, skills: dict[str, Any], slots: int, prefetch: int) -> None:
        super().__init__(*a)
        self.skills = skills
        self.slots = slots
        #: the node accepts at most this many tasks beyond its slots...
        self.max_prefetch = prefetch
        #: ...and the broker keeps about PREFETCH_HORIZON seconds of work there,
        #: at least ``slots`` (capped by max_prefetch): capacity = slots + that
        self.capacity = _capacity(slots, prefetch, slots)
        self.draining = False
        self.rate = 0.0  # completions per second (EWMA)
        self.rate_t = self.last_seen
        self.rate_n = 0
        #: tid -> attempt for everything sent to this node and not yet answered
        self.inflight: dict[bytes, int] = {}
        #: tid -> since when the node's complete heartbeats have not listed a task it should hold
        self.missing: dict[bytes, float] = {}
        self.done = 0
        self.failed = 0
        self.alive = True
        self.joined = self.last_seen
        #: a heartbeat arrived since HELLO; until then the node has ``first_beat_grace`` to send one
        self.beating = False


class Client(Peer):
    __slots__ = ("joined", "tasks")

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.tasks: set[bytes] = set()
        self.joined = self.last_seen


class Task:
    __slots__ = (
        "attempt",
        "client",
        "created",
        "deadline",
        "deaths",
        "gated",
        "holds",
        "max_attempts",
        "node",
        "payload",
        "questions",
        "reads",
        "resubmitted",
        "skill",
        "state",
        "tid",
        "tried",
        "writes",
    )  # fmt: skip

    def __init__(self, spec: P.TaskSpec, client: Client, payload: Any, deadline: float) -> None:
        self.tid = spec.tid
        self.skill = spec.skill
        self.client = client
        self.created = 0.0  # when it was submitted (scheduler clock)
        self.payload = payload
        self.attempt = 0
        self.resubmitted = False  # submitted again by its client (e.g. to a restarted broker)
        self.questions = 0
        self.deaths = 0
        self.max_attempts = spec.max_attempts
        self.deadline = deadline
        self.node: Node | None = None
        self.state = QUEUED
        self.reads = spec.reads
        self.writes = spec.writes
        self.tried: set[bytes] = set()
        self.gated = False  # waiting for its read/write keys
        self.holds = False  # holds its read/write keys


# --------------------------------------------------------------------------- the machine


class Scheduler:
    """Routes tasks to the least-loaded capable node and tracks them to the end.

    Call :meth:`handle` with an event and the current time (any monotonic
    clock in seconds); it returns the messages to send. It never raises for
    anything a peer sent: bad requests come back as ERROR messages and are
    counted in :attr:`counters`.
    """

    def __init__(self, *, epoch: bytes, config: SchedulerConfig | None = None, now: float = 0.0) -> None:
        self.epoch = epoch
        self.config = config or SchedulerConfig()
        self.started = now
        self.peers: dict[bytes, Peer] = {}  # route -> peer
        self.nodes: dict[bytes, Node] = {}  # session -> node
        self.clients: dict[bytes, Client] = {}  # session -> client
        self.names: dict[str, bytes] = {}  # name -> session
        self.tasks: dict[bytes, Task] = {}
        #: skill -> [tasks held, of them running]: what status() reports, kept as tasks move
        #: (counting the tasks there took 10 ms with 100,000 queued, on the broker's loop)
        self.skill_load: dict[str, list[int]] = {}
        self.queues: dict[str, deque[Task]] = {}
        self.skill_nodes: dict[str, list[Node]] = {}
        self.deadlines: list[tuple[float, bytes]] = []
        #: tid -> [highest attempt, holders] for tasks forgotten while nodes still
        #: run them: a resubmission of the same id continues the attempt count, so
        #: an answer from an old attempt can never pass for the new one (fencing)
        self.fence: dict[bytes, list[int]] = {}
        #: session -> (route, key) of nodes declared dead, so a heartbeat from one
        #: that comes back can be answered with "hello-first" (bounded, oldest out)
        self.ghosts: dict[bytes, tuple[bytes, str]] = {}
        #: tid -> (node, attempt): tasks a node says it runs (or finished) that no
        #: client has (re)submitted to this broker yet, e.g. after a broker restart
        self.adopted: dict[bytes, tuple[Node, int]] = {}
        #: tid -> (status, payload, expiry): results of adopted tasks that arrived
        #: before their client resubmitted them; delivered on resubmission
        self.orphans: dict[bytes, tuple[int, Any, float, int]] = {}
        self.counters: dict[str, int] = {
            "submitted": 0, "dispatched": 0, "done": 0, "failed": 0, "requeued": 0,
            "lost": 0, "timed_out": 0, "cancelled": 0, "rejected": 0, "stale_results": 0, "reclaimed": 0,
            "undeliverable": 0, "nodes_died": 0, "protocol_errors": 0, "clients_gone": 0,
            "messages": 0, "published": 0, "loop_guard": 0, "stale_answers": 0,
        }  # fmt: skip
        self.errors: dict[str, int] = {}
        #: recent swarm events for operators (node joins, deaths, departures): (time, text)
        self.events: deque[tuple[float, str]] = deque(maxlen=50)
        #: skill -> [count per LATENCY_BUCKETS bucket (the last one: +Inf), sum of seconds]:
        #: submit-to-result time of the tasks nodes answered
        self.latency: dict[str, list[float]] = {}
        self._client_sweep = 0.0  # next look for silent clients
        self._name_next: dict[str, int] = {}  # name -> next suffix to try (see _unique_name)
        #: agent messaging: key name -> the session that receives that name's messages
        self.inbox_of: dict[str, Peer] = {}
        #: name -> messages held for it while it is not connected: (sender, sender session, mid, payload, expiry)
        self.mailbox: dict[str, deque[tuple[str, bytes, bytes, Any, float]]] = {}
        self.held_bytes = 0
        #: topic -> subscribed peers
        self.topics: dict[str, set[Peer]] = {}
        #: loop guard: (name, name) sorted -> [turns, window start, tokens, last, paused until, last direction]
        self.convos: dict[tuple[str, str], list[float]] = {}
        #: client key -> tasks it has at the broker (the quota counts keys, not sessions)
        self.key_tasks: dict[str, int] = {}
        #: client key -> [tokens, last refill]: the submission rate limit
        self.key_rate: dict[str, list[float]] = {}
        # per-flush batches
        self._out: list[Send] = []
        self._dispatch: dict[Node, tuple[list[P.DispatchItem], list[Any]]] = {}
        self._results: dict[Client, tuple[list[P.ResultItem], list[Any]]] = {}
        self._acks: dict[Node, list[bytes]] = {}
        self._ack_all = False
        #: read/write keys: key -> [running readers, running writers (0/1)]
        self.key_holders: dict[str, list[int]] = {}
        #: key -> tasks waiting for it, in submission order
        self.key_waiting: dict[str, deque[Task]] = {}
        self._rescan: set[str] = set()
        #: (tid, attempt, node session) -> cancelled task whose node still runs it:
        #: its keys stay held until the node answers or dies
        self.key_zombies: dict[tuple[bytes, int, bytes], Task] = {}
        #: resubmitted tasks this broker never saw, held for a node timeout while the node
        #: that may run them comes back: after this broker started (nodes of the previous
        #: one re-register), or after their client arrived from a broker that died (nodes
        #: hand that broker's tasks to this one); see _on_submit
        self._held: list[Task] = []
        self._held_until = 0.0
        # nodes notice a new broker from its beacon (one interval) and say HELLO
        self._grace = self.config.node_timeout + 2 * self.config.heartbeat_interval
        #: when a node's first heartbeat last arrived (joining nodes are still getting through)
        self._first_beat_at = -math.inf
        self._restart_grace_end = now + self._grace
        self._now = now
        self._last_tick = now

    # ------------------------------------------------------------------ entry point

    def handle(self, event: Event, now: float) -> list[Send]:
        self._now = now
        if type(event) is PeerMessage:
            self._on_message(event)
        elif type(event) is Tick:
            self._on_tick()
        elif type(event) is Heartbeat:
            self._on_heartbeat(event)
        elif type(event) is PeerGone:
            self._on_gone(event.route)
        elif type(event) is Revoked:
            self._on_revoked(event.key)
        if self._rescan:
            self._release_waiting()
        return self._flush()

    def count_error(self, code: str) -> None:
        """Count a rejected input (also used by the shell for decode errors)."""
        self.counters["protocol_errors"] += 1
        self.errors[code] = self.errors.get(code, 0) + 1

    def next_wakeup(self) -> float:
        """When the next :class:`Tick` is due (deadlines, liveness checks)."""
        soon = self._last_tick + self.config.heartbeat_interval / 4
        if self._held:
            soon = min(soon, self._held_until)
        while self.deadlines and self.deadlines[0][1] not in self.tasks:
            heapq.heappop(self.deadlines)
        if self.deadlines:
            soon = min(soon, self.deadlines[0][0])
        return soon

    # ------------------------------------------------------------------ messages

    def _error(self, route: bytes, code: str, message: str, tids: Iterable[bytes] = ()) -> None:
        self.count_error(code)
        self._out.append(Send(route, P.Error(code=code, message=message, tids=tuple(tids))))

    def _on_message(self, ev: PeerMessage) -> None:
        msg = ev.msg
        if type(msg) is P.Hello:
            self._on_hello(ev.route, msg, ev.identity)
            peer = self.peers.get(ev.route)
            if peer is not None and ev.address:
                peer.address = ev.address
            return
        peer = self.peers.get(ev.route)
        if peer is None:
            # unknown connection (new route after a reconnect, or a broker restart)
            # not an error of the peer's: it reconnected, or this broker restarted
            self.errors["hello-first"] = self.errors.get("hello-first", 0) + 1
            self._out.append(
                Send(ev.route, P.Error(code="hello-first", message="send HELLO first (new connection or broker epoch)"))
            )
            return
        peer.last_seen = self._now
        t = type(msg)
        if t is P.Submit and type(peer) is Client:
            self._on_submit(peer, msg, ev.frames)  # type: ignore[arg-type]
        elif t is P.Result and type(peer) is Node:
            self._on_result(peer, msg, ev.frames)  # type: ignore[arg-type]
        elif t is P.Cancel and type(peer) is Client:
            self._on_cancel(peer, msg.tids)  # type: ignore[attr-defined]
        elif t is P.Status and msg.op:  # type: ignore[attr-defined]
            if "admin" in ROLES[peer.identity.role]:
                self._out.append(Send(ev.route, P.StatusReply(status=self._admin(msg.op, msg.arg))))  # type: ignore[attr-defined]
            else:
                self._error(ev.route, "forbidden", f"role {peer.identity.role!r} may not manage the swarm (admin only)")
        elif t is P.Status:
            if "status" in ROLES[peer.identity.role]:
                self._out.append(Send(ev.route, P.StatusReply(status=self.status())))
            else:
                self._error(ev.route, "forbidden", f"role {peer.identity.role!r} may not read status")
        elif t is P.Bye:
            self._drop_peer(peer, "bye")
            # the answer: nothing more comes to this connection, so the peer may close it without
            # resetting it (a reset would discard what it sent and this broker has not read yet)
            self._out.append(Send(ev.route, P.Bye(reason="bye")))
        elif t is P.Heartbeat and type(peer) is Client:
            pass  # a client's liveness ping: last_seen is all it updates
        elif t is P.SendMessage:
            self._on_send(peer, msg, ev.frames)  # type: ignore[arg-type]
        elif t is P.Publish:
            self._on_publish(peer, msg, ev.frames)  # type: ignore[arg-type]
        elif t is P.Subscribe:
            self._on_subscribe(peer, msg)  # type: ignore[arg-type]
        elif t is P.Answer and type(peer) is Client:
            self._on_answer(peer, msg, ev.frames)  # type: ignore[arg-type]
        elif t is P.Credit and type(peer) is Node:
            self._on_credit(peer, msg.slots)  # type: ignore[attr-defined]
        elif t is P.Drain and type(peer) is Node:
            peer.draining = True
            peer.capacity = 0
            self._dispatch.pop(peer, None)
        else:
            self._error(ev.route, "unexpected", f"{msg.COMMAND} is not valid from a {peer.hat}")

    def _on_hello(self, route: bytes, msg: P.Hello, identity: Identity | None) -> None:
        if identity is None:
            self._error(route, "unauthenticated", "connection has no authenticated key")
            return
        allowed = ROLES.get(identity.role, frozenset())
        hat = msg.role
        if hat not in ("node", "client"):
            self._error(route, "bad-role", f"unknown role {hat!r}")
            return
        if hat not in allowed:
            self._error(
                route, "forbidden", f"key {identity.name!r} has role {identity.role!r}: it may not act as a {hat}"
            )
            return
        if hat == "node" and (msg.slots < 1 or not msg.skills):
            self._error(route, "bad-hello", "a node must offer at least one skill and one slot")
            return
        # a peer that re-sends HELLO (reconnect, new epoch) replaces its old self
        old = self.peers.get(route)
        if old is not None and (old.session != msg.session or old.hat != hat):
            self._drop_peer(old, "replaced")
        same = (self.nodes if hat == "node" else self.clients).get(msg.session)
        if same is not None and same.identity.key != identity.key:
            self._error(route, "forbidden", "session id belongs to another key")
            return
        name = self._unique_name(msg.name or identity.name, msg.session)
        moved = same is not None and same.route != route
        if same is not None:
            # known session (maybe on a new connection): move it, keep its state
            self.peers.pop(same.route, None)
            same.route = route
            same.last_seen = self._now
            same.name = name
            peer: Peer = same
            if type(same) is Node:
                same.alive = True
                self._update_node(same, msg)
        elif hat == "node":
            node = Node(
                route, msg.session, name, identity, hat, self._now,
                skills=msg.skills, slots=msg.slots, prefetch=msg.prefetch,
            )  # fmt: skip
            self.nodes[msg.session] = node
            for skill in msg.skills:
                self.skill_nodes.setdefault(skill, []).append(node)
            self._event(f"node {name} joined: {msg.slots} slot(s), skills {', '.join(sorted(msg.skills))[:200]}")
            peer = node
        else:
            peer = Client(route, msg.session, name, identity, hat, self._now)
            self.clients[msg.session] = peer
        peer.seal = msg.seal
        self.peers[route] = peer
        self.names[name] = msg.session
        cfg = self.config
        self._out.append(
            Send(
                route,
                P.Welcome(
                    epoch=self.epoch, name=name, role=identity.role,
                    heartbeat_interval=cfg.heartbeat_interval, liveness=cfg.liveness,
                    max_message_size=cfg.max_message_size, beacon_port=cfg.beacon_port,
                    heartbeat_port=cfg.heartbeat_port, time=max(0.0, self._now),
                    max_tasks=cfg.max_tasks_per_client, max_rate=cfg.max_submit_rate, key_name=identity.name,
                ),
            )
        )  # fmt: skip
        self._open_inbox(peer)  # after WELCOME: held messages are sealed to the name it tells
        if type(peer) is Node:
            # on the same connection, tasks missing from the HELLO are still on
            # their way to the node (a HELLO can be old, e.g. resent during an
            # outage); only a new connection can have lost them
            self._reconcile(peer, msg.running, known=moved)
            for skill in peer.skills:
                self._pump(skill)

    def _reconcile(self, node: Node, running: tuple[tuple[bytes, int], ...], *, known: bool) -> None:
        """Take a node's own list of the tasks it holds (running or finished, unacked).

        After a broker restart nothing is known yet: each becomes *adopted*, so a
        client's resubmission attaches to the running attempt instead of starting
        a second one. For a node that reconnects to this same broker, a task we
        think it holds but it does not know went missing in transit: re-queue it.
        """
        held = dict(running)
        if known:
            missing = [tid for tid, att in node.inflight.items() if held.get(tid) != att]
            lost: dict[bytes, int] = {tid: node.inflight.pop(tid) for tid in missing}
            self._requeue_tasks(node, lost, died=False)
        for tid, attempt in held.items():
            if node.inflight.get(tid) == attempt:
                continue
            task = self.tasks.get(tid)
            if (
                task is not None and task.state == QUEUED and tid not in node.inflight
                and task.resubmitted and task.skill in node.skills
            ):  # fmt: skip
                # resubmitted (after a broker restart) before the node came back: attach it to the
                # running attempt. Only such tasks, of a skill the node offers: a node cannot claim
                # a task a client just submitted by naming it in HELLO
                self._running(task)
                task.node = node
                task.attempt = attempt
                task.tried.add(node.session)
                node.inflight[tid] = attempt
                if (task.reads or task.writes) and not task.holds:
                    self._take_keys(task)  # it runs already: it holds its keys
            elif task is None and tid not in node.inflight:
                node.inflight[tid] = attempt
                self.adopted[tid] = (node, attempt)
            elif tid not in node.inflight:
                # the task runs elsewhere now: the node's answer will be fenced off
                node.inflight[tid] = attempt
                entry = self.fence.setdefault(tid, [attempt, 0])
                entry[0] = max(entry[0], attempt)
                entry[1] += 1

    def _update_node(self, node: Node, msg: P.Hello) -> None:
        """A known node said HELLO again: take its current skills and slots."""
        for skill in node.skills:
            if skill not in msg.skills:
                lst = self.skill_nodes.get(skill)
                if lst is not None and node in lst:
                    lst.remove(node)
                    if not lst:
                        del self.skill_nodes[skill]
        for skill in msg.skills:
            if skill not in node.skills:
                self.skill_nodes.setdefault(skill, []).append(node)
        node.skills = msg.skills
        node.slots = msg.slots
        node.max_prefetch = msg.prefetch
        node.capacity = _capacity(msg.slots, msg.prefetch, msg.slots)

    def _unique_name(self, wanted: str, session: bytes) -> str:
        name = (wanted or "peer")[: P.MAX_NAME - 12]
        holder = self.names.get(name)
        if holder is None or holder == session or not self._session_alive(holder):
            return name
        # continue from the last suffix handed out for this name: a flood of sessions of one
        # key costs linear work, not a scan from -2 every time
        i = self._name_next.get(name, 2)
        while True:
            holder = self.names.get(f"{name}-{i}")
            if holder is None or holder == session or not self._session_alive(holder):
                break
            i += 1
        if len(self._name_next) < 100_000:
            self._name_next[name] = i + 1
        return f"{name}-{i}"

    def _session_alive(self, session: bytes) -> bool:
        node = self.nodes.get(session)
        return (node is not None and node.alive) or session in self.clients

    def _on_submit(self, client: Client, msg: P.Submit, frames: list[Any]) -> None:
        if len(frames) != len(msg.tasks):
            self._error(client.route, "frame-count", "one payload frame per task")
            return
        now = self._now
        rejected: list[tuple[bytes, str]] = []
        touched: set[str] = set()
        cfg = self.config
        limit = cfg.max_tasks_per_client
        key = client.identity.key
        held = self.key_tasks.get(key, 0)
        rate = cfg.max_submit_rate
        bucket: list[float] | None = None
        # a new broker's (or a failed-over client's) resubmissions are not new work: no rate limit
        grace_end = max(self._restart_grace_end, client.joined + self._grace)
        if rate > 0 and not (msg.resubmit and now < grace_end):
            # headroom over the clients' own pacing (one second's burst at the nominal
            # rate): their bucket starts a round trip earlier than ours, and messages jitter
            headroom = cfg.rate_headroom
            cap = max(1.0, rate) * headroom + (headroom > 1.0)
            bucket = self.key_rate.get(key)
            if bucket is None:
                bucket = self.key_rate[key] = [cap, now]
            bucket[0] = min(cap, bucket[0] + (now - bucket[1]) * rate * headroom)
            bucket[1] = now
        for spec, payload in zip(msg.tasks, frames, strict=True):
            tid = spec.tid
            existing = self.tasks.get(tid)
            if existing is not None:
                if existing.client is not client and existing.client.identity.key != key:
                    rejected.append((tid, "task id in use"))
                # else: a resubmission of a task we still track; keep the one we have
                continue
            if held >= limit:
                rejected.append((tid, f"quota: this key has {held} tasks at the broker (--max-tasks-per-client)"))
                continue
            if bucket is not None:
                if bucket[0] < 1.0:
                    rejected.append((tid, f"rate limit: at most {rate:g} new tasks per second per key"))
                    continue
                bucket[0] -= 1.0
            if self.orphans and msg.resubmit and tid in self.orphans:
                # finished on a node while we (a restarted broker) did not know it yet
                status, result, _, attempt = self.orphans.pop(tid)
                self.counters["done" if status == Outcome.OK else "failed"] += 1
                # the attempt the node ran: a sealed result is bound to it
                self._queue_result(client, P.ResultItem(tid, attempt, status), result)
                continue
            deadline = now + spec.timeout if spec.timeout is not None else math.inf
            task = Task(spec, client, payload, deadline)
            task.created = now
            if self.fence and tid in self.fence:
                task.attempt = self.fence[tid][0]
            self.tasks[tid] = task
            load = self.skill_load.get(spec.skill)
            if load is None:
                load = self.skill_load[spec.skill] = [0, 0]
            load[0] += 1
            client.tasks.add(tid)
            held += 1
            self.counters["submitted"] += 1
            task.resubmitted = msg.resubmit
            if self.adopted and tid in self.adopted and msg.resubmit:
                node, attempt = self.adopted.pop(tid)
                if node.alive and node.inflight.get(tid) == attempt and spec.skill in node.skills:
                    self._running(task)
                    task.node = node
                    task.attempt = attempt
                    task.tried.add(node.session)
                    if spec.reads or spec.writes:
                        self._take_keys(task)  # it runs already: it holds its keys
                    if spec.timeout is not None:
                        heapq.heappush(self.deadlines, (deadline, tid))
                    continue
            if spec.timeout is not None:
                heapq.heappush(self.deadlines, (deadline, tid))
            if msg.resubmit and now < grace_end:
                # a young broker, or a client that moved here from a broker that died: the
                # node that ran this task may not have re-registered (or handed over that
                # broker's tasks) yet; give it the chance to adopt it (no second run)
                # before dispatching it anywhere
                self._held.append(task)
                self._held_until = max(self._held_until, grace_end)
                continue
            if spec.reads or spec.writes:
                self._gate(task)
                if task.gated:
                    continue
            q = self.queues.get(spec.skill)
            if q is None:
                q = self.queues[spec.skill] = deque()
            q.append(task)
            touched.add(spec.skill)
        for skill in touched:
            self._pump(skill)
        self.key_tasks[key] = held
        if rejected:
            self.counters["rejected"] += len(rejected)
            for tid, why in rejected:
                self._deliver_status(client, tid, 0, Outcome.REJECTED, why)

    def _on_result(self, node: Node, msg: P.Result, frames: list[Any]) -> None:
        if len(frames) != len(msg.results):
            self._error(node.route, "frame-count", "one payload frame per result")
            return
        freed = False
        acks = self._acks.get(node)
        if acks is None:
            acks = self._acks[node] = []
        for item, payload in zip(msg.results, frames, strict=True):
            tid = item.tid
            attempt = node.inflight.get(tid)
            if item.status != Outcome.PARTIAL:
                acks.append(tid)  # whatever becomes of it, the node may forget it now
            if attempt is None or attempt != item.attempt:
                # not ours, or a superseded attempt: fence it off
                self.counters["stale_results"] += 1
                continue
            if item.status == Outcome.PARTIAL or item.status == Outcome.QUESTION:
                task = self.tasks.get(tid)
                if task is not None and task.node is node and task.attempt == attempt:
                    if item.status == Outcome.QUESTION:
                        task.questions += 1
                        if task.questions > self.config.max_task_questions:
                            self._loop_guarded(node.route, tid)
                            continue
                    self._queue_result(task.client, P.ResultItem(tid, attempt, item.status), payload)
                continue
            del node.inflight[tid]
            freed = True
            task = self.tasks.get(tid)
            if task is None and self.adopted.get(tid) == (node, attempt):
                del self.adopted[tid]
                if item.status != Outcome.RETURNED:
                    self.orphans[tid] = (item.status, payload, self._now + self.config.orphan_ttl, attempt)
                continue
            if task is None or task.node is not node or task.attempt != attempt:
                self._answered(node, tid, attempt)  # the answer of a forgotten attempt
                self.counters["stale_results"] += 1
                continue
            if item.status == Outcome.RETURNED:
                self._requeue_tasks(node, {tid: attempt}, died=False)
                continue
            self._forget(task)
            self._observe(task.skill, self._now - task.created)
            if item.status == Outcome.OK:
                self.counters["done"] += 1
                node.done += 1
            else:
                self.counters["failed"] += 1
                node.failed += 1
            self._queue_result(task.client, P.ResultItem(tid, attempt, item.status), payload)
        if freed:
            if self._now - node.rate_t >= RATE_WINDOW:
                self._adapt(node)
            self._pump_node(node)

    def _adapt(self, node: Node) -> None:
        """Re-size a node's prefetch to its measured completion rate.

        Fast tasks need many queued at the node to hide the round trip through
        the broker; slow ones need few, so that work is not parked at one node
        while another idles.
        """
        now = self._now
        finished = node.done + node.failed
        elapsed = now - node.rate_t
        rate = (finished - node.rate_n) / elapsed if elapsed > 0 else 0.0
        node.rate = rate if node.rate == 0.0 else 0.5 * node.rate + 0.5 * rate
        node.rate_t, node.rate_n = now, finished
        want = max(node.slots, int(node.rate * PREFETCH_HORIZON))
        if not node.draining:
            node.capacity = _capacity(node.slots, node.max_prefetch, want)

    def _on_credit(self, node: Node, slots: int) -> None:
        """A node joined to several brokers re-sized its share of slots for this one."""
        node.slots = slots
        if not node.draining:
            node.capacity = _capacity(slots, node.max_prefetch, max(slots, int(node.rate * PREFETCH_HORIZON)))
        if len(node.inflight) < node.capacity:
            self._pump_node(node)

    def _on_cancel(self, client: Client, tids: Iterable[bytes]) -> None:
        for tid in tids:
            task = self.tasks.get(tid)
            if task is None or task.client.identity.key != client.identity.key:
                continue  # unknown or not yours: say nothing (no oracle for guessed ids)
            self.counters["cancelled"] += 1
            self._cancel_task(task)
            self._deliver_status(task.client, tid, task.attempt, Outcome.CANCELLED, "cancelled by the client")

    # ------------------------------------------------------------------ agent messaging

    def _open_inbox(self, peer: Peer) -> None:
        """The newest session of a key receives that key's messages, and what waited for it."""
        name = peer.identity.name
        self.inbox_of[name] = peer
        held = self.mailbox.pop(name, None)
        if held:
            for sender, sender_session, mid, payload, _ in held:
                self.held_bytes -= len(payload)
                self._out.append(Send(peer.route, P.Deliver(sender=sender, mid=mid), [payload]))
                self._sent_to_session(sender_session, mid, True, "")

    def _close_inbox(self, peer: Peer) -> None:
        for topic in list(peer.topics):
            self._unsubscribe(peer, topic)
        name = peer.identity.name
        if self.inbox_of.get(name) is peer:
            del self.inbox_of[name]
            # another live session of the same key takes over its messages
            for other in self.peers.values():
                if other is not peer and other.identity.name == name:
                    self.inbox_of[name] = other

    def _sent(self, peer: Peer, mid: bytes, ok: bool, reason: str) -> None:
        self._out.append(Send(peer.route, P.Sent(mid=mid, ok=ok, reason=reason)))

    def _sent_to_session(self, session: bytes, mid: bytes, ok: bool, reason: str) -> None:
        peer: Peer | None = self.clients.get(session) or self.nodes.get(session)
        if peer is not None and self.peers.get(peer.route) is peer:
            self._sent(peer, mid, ok, reason)

    def _on_send(self, peer: Peer, msg: P.SendMessage, frames: list[Any]) -> None:
        sender, to = peer.identity.name, msg.to
        why = self._conversation(sender, to)
        if why:
            self._sent(peer, msg.mid, False, why)
            return
        self.counters["messages"] += 1
        target = self.inbox_of.get(to)
        if target is not None:
            self._out.append(Send(target.route, P.Deliver(sender=sender, mid=msg.mid), [frames[0]]))
            self._sent(peer, msg.mid, True, "")
            return
        ttl = min(msg.ttl, self.config.max_message_ttl)
        box = self.mailbox.get(to)
        size = len(frames[0])
        if ttl <= 0:
            self._sent(peer, msg.mid, False, f"undeliverable: {to!r} is not connected")
        elif (box is not None and len(box) >= MAILBOX_PER_NAME) or self.held_bytes + size > MAILBOX_BYTES:
            self._sent(peer, msg.mid, False, f"undeliverable: the broker holds too many messages for {to!r}")
        else:
            if box is None:
                box = self.mailbox[to] = deque()
            box.append((sender, peer.session, msg.mid, frames[0], self._now + ttl))
            self.held_bytes += size

    def _expire_mail(self, now: float) -> None:
        for name in list(self.mailbox):
            box = self.mailbox[name]
            if any(m[4] <= now for m in box):  # TTLs differ: any message may be due, not only the first
                keep: deque[tuple[str, bytes, bytes, Any, float]] = deque()
                for m in box:
                    if m[4] > now:
                        keep.append(m)
                        continue
                    self.held_bytes -= len(m[3])
                    self.counters["undeliverable"] += 1
                    self._sent_to_session(m[1], m[2], False, f"undeliverable: {name!r} did not connect in time")
                box = self.mailbox[name] = keep
            if not box:
                del self.mailbox[name]

    def _on_publish(self, peer: Peer, msg: P.Publish, frames: list[Any]) -> None:
        if "publish" not in ROLES[peer.identity.role]:
            self._sent(peer, msg.mid, False, f"forbidden: role {peer.identity.role!r} may not publish")
            return
        sender = peer.identity.name
        for sub in self.topics.get(msg.topic, ()):
            if sub is not peer:
                self._out.append(Send(sub.route, P.Deliver(sender=sender, mid=msg.mid, topic=msg.topic), [frames[0]]))
        self.counters["published"] += 1
        self._sent(peer, msg.mid, True, "")

    def _on_subscribe(self, peer: Peer, msg: P.Subscribe) -> None:
        for topic in msg.topics:
            if msg.stop:
                self._unsubscribe(peer, topic)
            elif len(peer.topics) < MAX_TOPICS_PER_PEER:
                peer.topics.add(topic)
                self.topics.setdefault(topic, set()).add(peer)

    def _unsubscribe(self, peer: Peer, topic: str) -> None:
        peer.topics.discard(topic)
        subs = self.topics.get(topic)
        if subs is not None:
            subs.discard(peer)
            if not subs:
                del self.topics[topic]

    def _conversation(self, a: str, b: str) -> str:
        """Loop guard: "" if a message from ``a`` to ``b`` may pass, else why not (both are told)."""
        cfg = self.config
        now = self._now
        pair = (a, b) if a <= b else (b, a)
        st = self.convos.get(pair)
        rate = cfg.max_conversation_rate
        if st is None:
            if len(self.convos) >= MAX_CONVERSATIONS:
                self._forget_quiet_conversations(now)
            st = self.convos[pair] = [0.0, now, max(1.0, rate), now, 0.0, -1.0]
        if now < st[4]:  # paused: neither side gets through
            return f"loop-guard: the conversation between {a!r} and {b!r} is paused for {st[4] - now:.0f} s more"
        direction = 0.0 if a == pair[0] else 1.0
        if direction == st[5]:
            return ""  # the same side again: not a new turn
        if now - st[1] >= cfg.conversation_window:
            st[0], st[1] = 0.0, now
        if rate > 0:
            st[2] = min(max(1.0, rate), st[2] + (now - st[3]) * rate)
        st[3] = now
        why = ""
        if st[0] >= cfg.max_conversation_turns:
            st[4] = st[1] + cfg.conversation_window
            why = (
                f"loop-guard: {cfg.max_conversation_turns} turns between {a!r} and {b!r} within "
                f"{cfg.conversation_window:g} s (max_conversation_turns); paused for {st[4] - now:.0f} s"
            )
        elif rate > 0 and st[2] < 1.0:
            st[4] = now + cfg.loop_pause
            why = (
                f"loop-guard: more than {rate:g} turns per second between {a!r} and {b!r} "
                f"(max_conversation_rate); paused for {cfg.loop_pause:g} s"
            )
        if why:
            self.counters["loop_guard"] += 1
            for name in {a, b}:
                peer = self.inbox_of.get(name)
                if peer is not None:
                    self._out.append(Send(peer.route, P.Error(code="loop-guard", message=why)))
            return why
        st[0] += 1
        st[5] = direction
        if rate > 0:
            st[2] -= 1.0
        return ""

    def _forget_quiet_conversations(self, now: float) -> None:
        window = self.config.conversation_window
        for pair in [p for p, st in self.convos.items() if now - st[3] > window and now >= st[4]]:
            del self.convos[pair]
        while len(self.convos) >= MAX_CONVERSATIONS:
            del self.convos[next(iter(self.convos))]

    def _loop_guarded(self, node_route: bytes, tid: bytes) -> None:
        """A task asked more questions than allowed: the node's ask() fails."""
        limit = self.config.max_task_questions
        why = f"loop-guard: task asked more than {limit} questions (max_task_questions)"
        self.counters["loop_guard"] += 1
        self._out.append(Send(node_route, P.Error(code="loop-guard", message=why, tids=(tid,))))

    def _on_answer(self, client: Client, msg: P.Answer, frames: list[Any]) -> None:
        task = self.tasks.get(msg.tid)
        if task is None or task.client.identity.key != client.identity.key:
            return  # unknown or not yours: nothing to say (no oracle for guessed ids)
        node = task.node
        if task.state != RUNNING or node is None or not node.alive:
            self.counters["stale_answers"] += 1
            return  # requeued or finished: a new attempt asks again
        self._out.append(Send(node.route, P.Answer(tid=msg.tid, seq=msg.seq, attempt=task.attempt), [frames[0]]))

    # ------------------------------------------------------------------ heartbeats and time

    def _on_heartbeat(self, ev: Heartbeat) -> None:
        node = self.nodes.get(ev.msg.session)
        if node is None:
            ghost = self.ghosts.pop(ev.msg.session, None)
            if ghost is not None and ghost[1] == ev.key:
                # a node we declared dead is alive after all (it was stalled or cut
                # off): tell it to register again; its old tasks run elsewhere now
                self._out.append(Send(ghost[0], P.Error(code="hello-first", message="you were declared dead")))
            return
        if node.identity.key != ev.key or not node.alive:
            return
        if ev.msg.epoch is not None and ev.msg.epoch != self.epoch:
            return  # it has not re-registered with us yet
        node.last_seen = self._now
        if not node.beating:
            node.beating = True
            self._first_beat_at = self._now
        if ev.msg.complete and (node.inflight or node.missing):
            self._check_missing(node, ev.msg.running)

    def _check_missing(self, node: Node, running: tuple[tuple[bytes, int], ...]) -> None:
        """Re-queue what the node should hold but has not listed for a grace period.

        A node lists every task it holds in each heartbeat. A task missing from
        them for longer than the grace (a result on its way takes milliseconds,
        a dispatch the same) was lost between them, e.g. handed to this broker in
        a HELLO and then answered elsewhere: waiting for it would hold a slot and
        its client for ever. It runs again (its late answer, if any, is fenced off).
        """
        now = self._now
        listed = dict(running)
        missing = node.missing
        for tid in [t for t in missing if listed.get(t) == node.inflight.get(t) or t not in node.inflight]:
            del missing[tid]
        lost: dict[bytes, int] = {}
        for tid, attempt in node.inflight.items():
            if listed.get(tid) == attempt:
                continue
            since = missing.setdefault(tid, now)
            if now - since > self._grace:
                lost[tid] = attempt
        if lost:
            for tid in lost:
                del node.inflight[tid]
                del missing[tid]
            self.counters["reclaimed"] += len(lost)
            self._event(f"node {node.name}: {len(lost)} task(s) it no longer lists re-queued")
            self._requeue_tasks(node, lost, died=False)
            self._pump_node(node)

    def _on_tick(self) -> None:
        now = self._last_tick = self._now
        self._ack_all = True
        if self._held and now >= self._held_until:
            self._release_held()
        dl = self.deadlines
        while dl and dl[0][0] <= now:
            deadline, tid = heapq.heappop(dl)
            task = self.tasks.get(tid)
            if task is None or task.deadline != deadline:
                continue
            self.counters["timed_out"] += 1
            if task.state == RUNNING and task.node is not None:
                why = f"task timed out while running on node {task.node.name!r}"
            elif task.skill not in self.skill_nodes:
                why = f"task timed out while queued: no node offers skill {task.skill!r}"
            else:
                why = f"task timed out while queued: every node with skill {task.skill!r} was busy"
            self._cancel_task(task)
            self._deliver_status(task.client, tid, task.attempt, Outcome.TIMEOUT, why)
        if self.orphans:
            for tid in [t for t, (_, _, exp, _) in self.orphans.items() if exp <= now]:
                del self.orphans[tid]
        if now >= self._client_sweep:
            self._client_sweep = now + 1.0
            if self.mailbox:
                self._expire_mail(now)
            quiet = now - self.config.client_timeout
            for client in [c for c in self.clients.values() if c.last_seen < quiet]:
                self.counters["clients_gone"] += 1
                self._drop_peer(client, "silent")
        horizon = now - self.config.node_timeout
        nodes = self.nodes.values()
        # a node's first heartbeat waits for its second CurveZMQ handshake, queued behind those of
        # every other node joining: while first heartbeats keep coming through, the ones still
        # waiting get up to first_beat_grace; when none came for a node timeout, they are dead
        cfg = self.config
        first = horizon if self._first_beat_at < horizon else now - max(cfg.first_beat_grace, cfg.node_timeout)
        dead = [n for n in nodes if n.last_seen < (horizon if n.beating else first)]
        for node in dead:  # all of them first, so none gets the others' tasks
            node.alive = False
        for node in dead:
            self.counters["nodes_died"] += 1
            held = len(node.inflight)
            self._drop_peer(node, "dead")
            self._event(
                f"node {node.name} died (no heartbeat for {self.config.node_timeout:g} s); {held} task(s) requeued"
            )

    def _on_gone(self, route: bytes) -> None:
        self.counters["undeliverable"] += 1
        peer = self.peers.get(route)
        if peer is not None:
            # a node's tasks go elsewhere; a client keeps its tasks (it may come back with
            # its session) but stops receiving its name's messages until it does
            self._drop_peer(peer, "gone")

    def _on_revoked(self, key: str) -> None:
        for peer in [p for p in self.peers.values() if p.identity.key == key]:
            self._out.append(Send(peer.route, P.Error(code="revoked", message="this key was revoked")))
            self._drop_peer(peer, "revoked")

    # ------------------------------------------------------------------ task plumbing

    def _pump(self, skill: str) -> None:
        """Dispatch queued tasks of ``skill`` to capable nodes with room."""
        q = self.queues.get(skill)
        if not q:
            return
        nodes = self.skill_nodes.get(skill)
        if not nodes:
            return
        tasks = self.tasks
        skipped: list[Task] = []
        try:
            self._pump_queue(q, nodes, tasks, skipped)
        finally:
            if skipped:  # tasks whose only free node still runs an old attempt of them
                q.extendleft(reversed(skipped))
            elif not q:
                self.queues.pop(skill, None)

    def _pump_queue(self, q: deque[Task], nodes: list[Node], tasks: dict[bytes, Task], skipped: list[Task]) -> None:
        while q:
            best: Node | None = None
            best_load = 2.0
            for n in nodes:
                used = len(n.inflight)
                if used < n.capacity and n.alive:
                    load = used / n.capacity
                    if load < best_load:
                        best, best_load = n, load
            if best is None:
                return
            task = q.popleft()
            if tasks.get(task.tid) is not task or task.state != QUEUED:
                continue  # cancelled or timed out while queued
            holding = task.tid in best.inflight
            if holding or (task.tried and best.session in task.tried and len(nodes) > 1):
                other = self._other_node(nodes, task)
                if other is not None:
                    best = other
                elif holding:
                    skipped.append(task)
                    continue
            self._start(task, best)

    def _other_node(self, nodes: list[Node], task: Task) -> Node | None:
        """A node with room that does not hold this task id, untried ones first."""
        fallback = None
        for n in nodes:
            if len(n.inflight) < n.capacity and n.alive and task.tid not in n.inflight:
                if n.session not in task.tried:
                    return n
                fallback = fallback or n
        return fallback

    def _pump_node(self, node: Node) -> None:
        for skill in node.skills:
            if self.queues.get(skill):
                self._pump(skill)

    def _start(self, task: Task, node: Node) -> None:
        task.attempt += 1
        self._running(task)
        task.node = node
        task.tried.add(node.session)
        node.inflight[task.tid] = task.attempt
        self.counters["dispatched"] += 1
        timeout = None if task.deadline == math.inf else max(0.0, task.deadline - self._now)
        batch = self._dispatch.get(node)
        if batch is None:
            batch = self._dispatch[node] = ([], [])
        batch[0].append(P.DispatchItem(task.tid, task.skill, task.attempt, timeout))
        batch[1].append(task.payload)

    def _running(self, task: Task) -> None:
        task.state = RUNNING
        self.skill_load[task.skill][1] += 1

    def _forget(self, task: Task, *, keep_keys: bool = False) -> None:
        del self.tasks[task.tid]
        load = self.skill_load[task.skill]
        load[0] -= 1
        if task.state == RUNNING:
            load[1] -= 1
        if not load[0]:
            del self.skill_load[task.skill]
        task.client.tasks.discard(task.tid)
        key = task.client.identity.key
        left = self.key_tasks.get(key, 1) - 1
        if left > 0:
            self.key_tasks[key] = left
        else:
            self.key_tasks.pop(key, None)
        task.state = "gone"
        task.payload = None
        if (task.holds or task.gated) and not keep_keys:
            self._drop_keys(task)

    # ------------------------------------------------------------------ read/write keys
    #
    # A task with keys waits at a gate until it may hold them: writers of a key
    # exclude everyone, readers only writers. Tasks waiting for a key queue in
    # submission order and a task may not pass a waiting task it conflicts with,
    # so conflicting tasks start in submission order and a writer never starves
    # behind a stream of readers. Tasks without keys never meet the gate.

    def _keys(self, task: Task) -> set[str]:
        return set(task.reads) | set(task.writes)

    def _gate(self, task: Task) -> None:
        task.gated = True
        for key in self._keys(task):
            self.key_waiting.setdefault(key, deque()).append(task)
        if self._may_hold(task):
            self._take_keys(task)

    def _may_hold(self, task: Task) -> bool:
        for key in self._keys(task):
            writes = key in task.writes
            held = self.key_holders.get(key)
            if held is not None and (held[1] or (writes and held[0])):
                return False
            for other in self.key_waiting.get(key, ()):
                if other is task:
                    break
                if writes or key in other.writes:
                    return False  # an earlier task it conflicts with waits for this key
        return True

    def _take_keys(self, task: Task) -> None:
        for key in self._keys(task):
            held = self.key_holders.setdefault(key, [0, 0])
            held[1 if key in task.writes else 0] += 1
            if task.gated:
                self._leave_line(key, task)
        task.gated = False
        task.holds = True

    def _leave_line(self, key: str, task: Task) -> None:
        """Take a task out of the queue of tasks waiting for ``key``."""
        waiting = self.key_waiting.get(key)
        if waiting is not None:
            try:
                waiting.remove(task)
            except ValueError:
                pass
            if not waiting:
                del self.key_waiting[key]

    def _drop_keys(self, task: Task) -> None:
        for key in self._keys(task):
            if task.holds:
                held = self.key_holders.get(key)
                if held is not None:
                    held[1 if key in task.writes else 0] -= 1
                    if held[0] <= 0 and held[1] <= 0:
                        del self.key_holders[key]
            elif task.gated:
                self._leave_line(key, task)
            self._rescan.add(key)
        task.holds = task.gated = False

    def _release_waiting(self) -> None:
        """Keys were freed: let waiting tasks through, in submission order per key."""
        keys, self._rescan = self._rescan, set()
        seen: set[bytes] = set()
        touched: set[str] = set()
        for key in keys:
            for task in list(self.key_waiting.get(key, ())):
                if task.tid in seen or not task.gated or self.tasks.get(task.tid) is not task:
                    continue
                seen.add(task.tid)
                if self._may_hold(task):
                    self._take_keys(task)
                    self.queues.setdefault(task.skill, deque()).append(task)
                    touched.add(task.skill)
        for skill in touched:
            self._pump(skill)
        if self._rescan:  # pumping finished nothing synchronously, but stay safe
            self._release_waiting()

    def _cancel_task(self, task: Task) -> None:
        """Forget a task; tell its node to stop (the slot frees when it answers)."""
        node = task.node if task.state == RUNNING else None
        still_running = node is not None and node.alive
        # a cancelled task may go on running until its node answers (a sync skill
        # stops only when it returns): it keeps its read/write keys until then
        self._forget(task, keep_keys=still_running and task.holds)
        if still_running and task.holds:
            assert node is not None
            self.key_zombies[(task.tid, task.attempt, node.session)] = task
        if node is not None and node.alive:
            entry = self.fence.get(task.tid)
            if entry is None:
                self.fence[task.tid] = [task.attempt, 1]
            else:
                entry[0] = max(entry[0], task.attempt)
                entry[1] += 1
            self._out.append(Send(node.route, P.Cancel(tids=(task.tid,))))

    def _answered(self, node: Node, tid: bytes, attempt: int) -> None:
        """A node is done with a forgotten attempt (it answered, or it died)."""
        self._fence_release(tid)
        if self.key_zombies:
            zombie = self.key_zombies.pop((tid, attempt, node.session), None)
            if zombie is not None:
                self._drop_keys(zombie)

    def _release_held(self) -> None:
        held, self._held = self._held, []
        touched: set[str] = set()
        for task in held:
            if self.tasks.get(task.tid) is not task or task.state != QUEUED:
                continue  # adopted by a returning node, cancelled or timed out meanwhile
            if task.reads or task.writes:
                self._gate(task)
                if task.gated:
                    continue
            self.queues.setdefault(task.skill, deque()).append(task)
            touched.add(task.skill)
        for skill in touched:
            self._pump(skill)

    def _fence_release(self, tid: bytes) -> None:
        entry = self.fence.get(tid)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.fence[tid]

    def _queue_result(self, client: Client, item: P.ResultItem, payload: Any) -> None:
        batch = self._results.get(client)
        if batch is None:
            batch = self._results[client] = ([], [])
        batch[0].append(item)
        batch[1].append(payload)

    def _deliver_status(self, client: Client, tid: bytes, attempt: int, status: int, message: str) -> None:
        self._queue_result(client, P.ResultItem(tid, attempt, status), P.pack_value(message))

    def _drop_peer(self, peer: Peer, why: str) -> None:
        self._close_inbox(peer)
        if self.peers.get(peer.route) is peer:
            del self.peers[peer.route]
        if self.names.get(peer.name) == peer.session:
            del self.names[peer.name]
        if type(peer) is Node:
            self.nodes.pop(peer.session, None)
            peer.alive = False
            if why in ("bye", "revoked", "gone"):
                self._event(f"node {peer.name} left ({why}); {len(peer.inflight)} task(s) handed back")
            if why == "dead":
                self.ghosts[peer.session] = (peer.route, peer.identity.key)
                if len(self.ghosts) > 10_000:
                    del self.ghosts[next(iter(self.ghosts))]
            for skill in peer.skills:
                lst = self.skill_nodes.get(skill)
                if lst is not None and peer in lst:
                    lst.remove(peer)
                    if not lst:
                        del self.skill_nodes[skill]
            self._dispatch.pop(peer, None)
            self._requeue(peer, died=why in ("dead", "gone"))
        elif type(peer) is Client:
            self.clients.pop(peer.session, None)
            if why in ("bye", "revoked", "silent"):
                for tid in list(peer.tasks):
                    task = self.tasks.get(tid)
                    if task is not None:
                        self.counters["cancelled"] += 1
                        self._cancel_task(task)
            else:
                # keep its tasks: the client may come back with the same session
                self.clients[peer.session] = peer

    def _requeue(self, node: Node, *, died: bool) -> None:
        """A node died or left: put its running tasks back at the head of their queues.

        Only a death counts against ``max_attempts``; a node that leaves on
        purpose (BYE) hands its tasks back for free.
        """
        self._requeue_tasks(node, node.inflight, died=died)
        node.inflight.clear()

    def _requeue_tasks(self, node: Node, held: dict[bytes, int], *, died: bool) -> None:
        back: dict[str, list[Task]] = {}
        for tid, attempt in held.items():
            task = self.tasks.get(tid)
            if task is None or task.node is not node or task.attempt != attempt:
                if self.adopted.get(tid) == (node, attempt):
                    del self.adopted[tid]
                else:
                    self._answered(node, tid, attempt)
                continue
            task.node = None
            if died:
                task.deaths += 1
            if task.deaths >= task.max_attempts:
                self.counters["lost"] += 1
                self._forget(task)
                self._deliver_status(
                    task.client, tid, task.attempt, Outcome.LOST,
                    f"task was tried {task.deaths} times and its node died each time",
                )  # fmt: skip
                continue
            task.state = QUEUED
            self.skill_load[task.skill][1] -= 1
            self.counters["requeued"] += 1
            back.setdefault(task.skill, []).append(task)
        for skill, tasks in back.items():
            q = self.queues.setdefault(skill, deque())
            q.extendleft(reversed(tasks))
            self._pump(skill)

    # ------------------------------------------------------------------ output

    def _flush(self) -> list[Send]:
        out = self._out
        acks = self._acks
        if self._dispatch:
            for node, (items, frames) in self._dispatch.items():
                ride = acks.pop(node, None)  # acknowledgements ride along for free
                out.append(Send(node.route, P.Dispatch(tasks=tuple(items), acks=tuple(ride or ())), frames))
            self._dispatch = {}
        if self._results:  # results before acks: they are what someone waits for
            for client, (results, rframes) in self._results.items():
                out.append(Send(client.route, P.Result(results=tuple(results)), rframes))
            self._results = {}
        if acks and (self._ack_all or any(len(t) >= 1000 for t in acks.values())):
            # the rest go on their own, but not on the hot path: at the next tick
            # (a node holds an unacknowledged result a little longer, that is all)
            for node, tids in acks.items():
                if tids and node.alive:
                    out.append(Send(node.route, P.Ack(tids=tuple(tids))))
            self._acks = {}
        self._ack_all = False
        self._out = []
        return out

    # ------------------------------------------------------------------ introspection

    def status(self) -> dict[str, Any]:
        """A snapshot with no payloads: nodes, queues, counters."""
        now = self._now
        queued = {skill: n - r for skill, (n, r) in self.skill_load.items() if n > r}
        running = sum(r for _, r in self.skill_load.values())
        return {
            "epoch": self.epoch.hex(),
            "uptime": round(now - self.started, 3),
            "nodes": [
                {
                    "name": n.name,
                    "key_name": n.identity.name,
                    "skills": sorted(n.skills),
                    # what the node announced of each skill (description, tags, modes...), where it said anything
                    "skill_info": {k: v for k, v in sorted(n.skills.items()) if v},
                    "slots": n.slots,
                    "busy": len(n.inflight),
                    "last_seen": round(now - n.last_seen, 3),
                    "beating": n.beating,  # a heartbeat arrived since it joined
                    "done": n.done,
                    "failed": n.failed,
                    "seal": n.seal,
                    "address": n.address,
                    "draining": n.draining,
                }
                for n in sorted(self.nodes.values(), key=lambda n: n.name)
            ],
            "clients": len(self.clients),
            "seal_keys": sorted({n.seal for n in self.nodes.values()}),  # nodes' seal key ids ("" unsealed)
            "queued": queued,
            "running": running,
            "counters": dict(self.counters),
            "errors": dict(self.errors),
            "events": [[round(t - self.started, 3), text] for t, text in self.events],
            "latency": {
                skill: {"le": list(LATENCY_BUCKETS), "counts": h[:-1], "sum": round(h[-1], 6)}
                for skill, h in self.latency.items()
            },
        }

    def _admin(self, op: str, arg: str) -> dict[str, Any]:
        """An operator's request (admin keys): drain a node, cancel a task."""
        if op == "drain":
            nodes = [n for n in self.nodes.values() if n.alive and arg in (n.name, n.identity.name)]
            if not nodes:
                return {"op": op, "ok": False, "message": f"no connected node named {arg!r}"}
            for node in nodes:
                node.draining = True
                node.capacity = 0
                self._dispatch.pop(node, None)
                self._out.append(Send(node.route, P.Drain(reason="drained by an operator")))
            return {"op": op, "ok": True, "message": f"draining {', '.join(n.name for n in nodes)}"}
        if op == "cancel":
            try:
                tid = bytes.fromhex(arg)
            except ValueError:
                return {"op": op, "ok": False, "message": f"{arg!r} is not a task id (hex)"}
            task = self.tasks.get(tid)
            if task is None:
                return {"op": op, "ok": False, "message": f"no task {arg} at this broker (finished, or never here)"}
            self.counters["cancelled"] += 1
            self._cancel_task(task)
            self._deliver_status(task.client, tid, task.attempt, Outcome.CANCELLED, "cancelled by an operator")
            return {"op": op, "ok": True, "message": f"cancelled task {arg}"}
        return {"op": op, "ok": False, "message": f"unknown operation {op!r} (drain, cancel)"}

    def _event(self, text: str) -> None:
        self.events.append((self._now, text))

    def _observe(self, skill: str, seconds: float) -> None:
        h = self.latency.get(skill)
        if h is None:
            if len(self.latency) >= 10_000:
                return  # bounded: skills come from nodes, but be safe
            h = self.latency[skill] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        h[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds
