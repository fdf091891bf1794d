"""The ``zlink`` command line.

Exit codes: 0 success, 1 a task failed, 2 bad usage or configuration,
3 the broker could not be reached or refused us.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from . import __version__
from . import protocol as P
from .errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    LoopGuarded,
    ProtocolError,
    RejectedError,
    TaskError,
    ZlinkError,
)
from .security import ROLE_NAMES, BrokerHome, KeyPair, check_name, default_host, generate_keypair, read_cert, write_cert

F = TypeVar("F", bound=Callable[..., Any])

EXIT_TASK = 1
EXIT_CONFIG = 2
EXIT_CONNECT = 3


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"zlink: {message}", err=True)
    sys.exit(code)


def _run_guarded(fn: Callable[[], Any]) -> Any:
    """Map zlink errors to a clear message and an exit code."""
    try:
        return fn()
    except AuthenticationError as exc:
        _fail(f"authentication failed: {exc}", EXIT_CONNECT)
    except ConnectError as exc:
        _fail(str(exc), EXIT_CONNECT)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except RejectedError as exc:
        _fail(f"refused: {exc}" if exc.code == "forbidden" else f"task failed: {exc}", EXIT_TASK)
    except TaskError as exc:
        _fail(f"task failed: {exc}", EXIT_TASK)
    except ZlinkError as exc:
        _fail(str(exc), EXIT_TASK)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (ids, skills, sizes and timings only)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def log_options(fn: F) -> F:
    fn = click.option(
        "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
        help="Log lines as text, or one JSON object per line.",
    )(fn)  # fmt: skip
    return click.option(
        "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
    )(fn)


def _no_core_dumps() -> None:
    """A crash must not write task payloads to disk (zero-log): no core files for this process."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed
        pass


def join_option(fn: F) -> F:
    return click.option(
        "--join",
        envvar="ZLINK_JOIN",
        default=None,
        help="Join string from 'zlink invite' (default: $ZLINK_JOIN).",
    )(fn)


def seal_key_option(fn: F) -> F:
    return click.option(
        "--seal-key",
        "seal_key",
        envvar="ZLINK_SEAL_KEY",
        default=None,
        help="The swarm's payload key: a key file or its text (default: the join string's, or $ZLINK_SEAL_KEY).",
    )(fn)


def _seal_notice(peer: Any, what: str) -> None:
    """Say on stderr whether this peer's payloads are sealed end to end."""
    if peer.seal_key is None:
        click.echo(
            f"zlink {what}: payloads are NOT sealed end to end: whoever runs the broker host can read them. "
            "Make a key with 'zlink seal-key' on a trusted machine (see docs/security.md).",
            err=True,
        )
    else:
        click.echo(f"zlink {what}: payloads sealed end to end (seal key id {peer.seal_key.key_id})", err=True)


def home_option(fn: F) -> F:
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="ZLINK_HOME",
        default=None,
        help="Broker home folder (default: $ZLINK_HOME or ~/.zlink).",
    )(fn)


def _load_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    """--config FILE: TOML with one table per command; it becomes the commands' defaults."""
    if not path:
        return
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ImportError:
            _fail("--config needs Python 3.11+, or 'pip install tomli'", EXIT_CONFIG)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        _fail(f"cannot read the config file {path}: {exc.strerror}", EXIT_CONFIG)
    except tomllib.TOMLDecodeError as exc:
        _fail(f"the config file {path} is not valid TOML: {exc}", EXIT_CONFIG)
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    unknown = sorted(set(tables) - set(main.commands))
    if unknown or len(tables) != len(data):
        commands = ", ".join(sorted(main.commands))
        _fail(f"{path}: expected one [table] per command ({commands}); got {unknown or list(data)}", EXIT_CONFIG)
    # TOML uses the options' own names (--nodes -> nodes), with dashes or underscores
    defaults: dict[str, dict[str, Any]] = {}
    for cmd, opts in tables.items():
        names: dict[str, str] = {}
        for param in main.commands[cmd].params:
            if isinstance(param, click.Option) and param.name:
                for opt in param.opts:
                    names[opt.lstrip("-").replace("-", "_")] = param.name
                names.setdefault(param.name, param.name)
        table: dict[str, Any] = {}
        for key, value in opts.items():
            name = names.get(key.replace("-", "_"))
            if name is None:
                _fail(f"{path}: [{cmd}] has no option {key!r} (see 'zlink {cmd} --help')", EXIT_CONFIG)
            table[name] = value
        defaults[cmd] = table
    ctx.default_map = defaults


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100, "auto_envvar_prefix": "ZLINK"}
)
@click.version_option(__version__, prog_name="zlink")
@click.option(
    "--config", type=click.Path(dir_okay=False), envvar="ZLINK_CONFIG", callback=_load_config, expose_value=False,
    is_eager=True, help="TOML file of defaults, one [table] per command (e.g. [broker] bind = ...).",
)  # fmt: skip
def main() -> None:
    """zlink: fan work out across agents and machines through one encrypted relay.

    Start with 'zlink demo'. To build a swarm: 'zlink broker' on one host,
    'zlink invite' there for each peer, then 'zlink node --join ...' on workers.

    Every option can also come from the environment, as ZLINK_<COMMAND>_<OPTION>
    (e.g. ZLINK_BROKER_BIND, ZLINK_NODE_SLOTS), or from --config FILE. The first
    found wins: command line, environment, config file, built-in default.
    """


# --------------------------------------------------------------------------- broker side


@main.command()
@click.option(
    "--bind", default="tcp://0.0.0.0:7700", show_default=True, help="Main endpoint; P+1 and P+2 are also used."
)
@home_option
@click.option("--heartbeat-interval", type=float, default=0.5, show_default=True, help="Seconds between beats.")
@click.option("--liveness", type=int, default=3, show_default=True, help="Missed beats before a node is dead.")
@click.option("--max-message-size", type=int, default=16 * 1024 * 1024, show_default=True, help="Bytes.")
@click.option(
    "--max-tasks-per-client", type=int, default=1_000_000, show_default=True,
    help="Unresolved tasks one client key may hold; a client at the bound waits (backpressure).",
)  # fmt: skip
@click.option(
    "--max-submit-rate", type=float, default=100_000.0, show_default=True,
    help="New tasks per second one client key may submit (0: no limit); clients pace themselves.",
)  # fmt: skip
@click.option(
    "--max-conversation-turns", type=int, default=1000, show_default=True,
    help="Loop guard: turns two peers may take per hour before their conversation pauses.",
)  # fmt: skip
@click.option(
    "--max-conversation-rate", type=float, default=20.0, show_default=True,
    help="Loop guard: turns per second between two peers (0: no limit); over it the conversation pauses 10 s.",
)  # fmt: skip
@click.option(
    "--max-task-questions", type=int, default=100, show_default=True, help="Loop guard: questions one task may ask."
)
@click.option(
    "--metrics", default=None, metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; e.g. 127.0.0.1:9464).",
)  # fmt: skip
@click.option(
    "--max-message-ttl", type=float, default=600.0, show_default=True,
    help="Longest (s) the broker holds a message for a peer that is not connected (in memory only).",
)  # fmt: skip
@click.option(
    "--peer", "peers", multiple=True, metavar="tcp://HOST:PORT",
    help="Another broker of this swarm (repeat for each; they share this home's keys): invite names them all.",
)  # fmt: skip
@log_options
@click.option("--quiet", is_flag=True, help="Do not print the start-up banner.")
def broker(
    bind: str,
    home: Path | None,
    heartbeat_interval: float,
    liveness: int,
    max_message_size: int,
    max_tasks_per_client: int,
    max_submit_rate: float,
    max_conversation_turns: int,
    max_conversation_rate: float,
    max_task_questions: int,
    max_message_ttl: float,
    metrics: str | None,
    peers: tuple[str, ...],
    log_level: str,
    log_format: str,
    quiet: bool,
) -> None:
    """Run the broker (until Ctrl-C or SIGTERM).

    Several brokers can serve one swarm (no single point of failure): give each
    the same home (its keys and allowed/ folder, shared or copied) and --peer
    for the others; join strings from 'zlink invite' then name them all.
    """
    from .broker import Broker

    _setup_logging(log_level, log_format)
    _no_core_dumps()

    def make() -> Broker:
        return Broker(
            bind=bind, home=home, heartbeat_interval=heartbeat_interval,
            liveness=liveness, max_message_size=max_message_size, max_tasks_per_client=max_tasks_per_client,
            max_submit_rate=max_submit_rate, max_conversation_turns=max_conversation_turns,
            max_conversation_rate=max_conversation_rate, max_task_questions=max_task_questions,
            max_message_ttl=max_message_ttl, metrics=metrics, peers=peers,
        )  # fmt: skip

    import signal

    stop = {"flag": False}

    def on_signal(*_: object) -> None:
        stop["flag"] = True

    # handlers first: broker.json (the readiness signal) appears during start()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    b: Broker = _run_guarded(make)
    _run_guarded(b.start)
    if log_format == "json":  # the banner as log lines too: stderr stays one JSON object per line
        logging.getLogger("zlink.broker").info(
            "broker public key %s, home %s (%d allowed keys)%s", b.keys.public, b.home.path,
            len(b.allowed.by_key), ", keys created" if b.created_keys else "",
        )  # fmt: skip
    elif not quiet:
        allowed = len(b.allowed.by_key)
        if b.created_keys:
            click.echo(f"created broker keys in {b.home.path}", err=True)
        click.echo(f"zlink broker listening on {b.endpoint}", err=True)
        click.echo(f"  broker public key: {b.keys.public}", err=True)
        click.echo(f"  home: {b.home.path} ({allowed} allowed key{'s' if allowed != 1 else ''})", err=True)
        click.echo(f"  invite a peer:  zlink invite --home {b.home.path} --name NAME --role node|client|both", err=True)
    try:
        while not stop["flag"] and b._thread is not None and b._thread.is_alive():
            time.sleep(0.2)
    finally:
        b.stop()
    if b._error is not None:
        _fail(f"broker failed: {b._error}", EXIT_CONFIG)


@main.command()
@home_option
@click.option("--name", default=None, help="Peer name (default: peer- and four random hex digits).")
@click.option("--role", type=click.Choice(["node", "client", "both", "admin"]), default="both", show_default=True)
@click.option("--host", default=None, help="Host name or address peers use to reach the broker.")
@click.option("--port", type=int, default=None, help="Broker port (default: the one it last bound).")
@click.option(
    "--peer", "peers", multiple=True, metavar="tcp://HOST:PORT",
    help="Another broker of the swarm to name (added to those the broker was started with).",
)  # fmt: skip
def invite(
    home: Path | None, name: str | None, role: str, host: str | None, port: int | None, peers: tuple[str, ...]
) -> None:
    """Authorise a new peer and print its join string (the last line of output).

    The join string holds the peer's secret key: hand it over like a password.
    It names this broker and the swarm's other brokers (--peer, here or when
    the broker started).
    """

    def run() -> None:
        h = BrokerHome(home)
        h.keys()  # clear error when there is no broker home yet
        peer = name or f"peer-{os.urandom(2).hex()}"
        for peer_ep in peers:
            if not peer_ep.startswith("tcp://"):
                raise ConfigError(f"--peer must look like tcp://HOST:PORT, got {peer_ep!r}")
        endpoints = list(dict.fromkeys([*_invite_endpoints(h, host, port), *h.peers(), *peers]))
        join = h.invite(name=peer, role=role, endpoints=endpoints)
        click.echo(f"authorised {peer!r} as {role} for {', '.join(endpoints)}", err=True)
        click.echo("join string (secret: whoever holds it can connect as this peer):", err=True)
        click.echo(join.dump())

    _run_guarded(run)


def _invite_endpoints(h: BrokerHome, host: str | None, port: int | None) -> list[str]:
    from urllib.parse import urlsplit

    bound = h.bound_endpoints()
    if not bound:
        bound = ["tcp://0.0.0.0:7700"]
    out = []
    for ep in bound:
        u = urlsplit(ep)
        h_ = host or u.hostname or "127.0.0.1"
        if h_ in ("0.0.0.0", "*", "::"):
            h_ = default_host()
        p = port or u.port or 7700
        out.append(f"tcp://{h_}:{p}")
    return out


@main.command()
@home_option
@click.argument("cert_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--role", type=click.Choice(list(ROLE_NAMES)), default="both", show_default=True)
@click.option("--name", default=None, help="Name to allow it under (default: from the certificate).")
def allow(home: Path | None, cert_file: Path, role: str, name: str | None) -> None:
    """Authorise an existing public certificate (bring your own key)."""

    def run() -> None:
        cert = read_cert(cert_file)
        stem = cert_file.name.split(".key")[0]
        peer = check_name(name or cert.metadata.get("name") or stem)
        path = BrokerHome(home).allow(cert.public, name=peer, role=role)
        click.echo(f"allowed {peer!r} as {role} ({path})")

    _run_guarded(run)


@main.command()
@home_option
@click.argument("name")
def revoke(home: Path | None, name: str) -> None:
    """Remove an authorised key; a running broker refuses it from now on."""

    def run() -> None:
        gone = BrokerHome(home).revoke(name)
        if not gone:
            raise ConfigError(f"no allowed key named {name!r}")
        click.echo(f"revoked {name!r}")

    _run_guarded(run)


@main.command()
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True)
def keygen(name: str, out: Path) -> None:
    """Write NAME.key and NAME.key_secret (pyzmq certificate format)."""

    def run() -> None:
        check_name(name)
        out.mkdir(parents=True, exist_ok=True)
        keys = generate_keypair()
        write_cert(out / f"{name}.key_secret", keys, metadata={"name": name}, secret=True)
        write_cert(out / f"{name}.key", KeyPair(keys.public), metadata={"name": name})
        click.echo(f"wrote {out / (name + '.key')} and {out / (name + '.key_secret')}")

    _run_guarded(run)


@main.command("seal-key")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a new key to this file (0600)."
)
@click.option("--key", "key_from", default=None, help="An existing key (file or text) instead of a new one.")
@click.option("--join", "join_text", default=None, help="Print this join string with the key added.")
def seal_key(out: Path | None, key_from: str | None, join_text: str | None) -> None:
    """Create the swarm's payload key, or add it to a join string.

    Run it on a trusted machine, never on the broker host: the broker must not
    hold this key. Every client and node of the swarm needs the same key, as
    a file (--seal-key FILE or $ZLINK_SEAL_KEY) or inside its join string:

    \b
      zlink seal-key --out swarm.key                  # once
      zlink seal-key --key swarm.key --join "$JOIN"   # per join string
    """
    from .seal import SealKey
    from .security import Join, load_seal_key

    def run() -> None:
        key = load_seal_key(key_from) if key_from is not None else SealKey.generate()
        if out is not None:
            if key_from is not None:
                raise ConfigError("--out writes a new key; it cannot be combined with --key")
            try:
                key.save(out)
            except FileExistsError:
                raise ConfigError(f"{out} exists; a seal key is never overwritten") from None
            click.echo(f"wrote seal key {key.key_id} to {out} (readable only by you)", err=True)
        if join_text is not None:
            click.echo(Join.parse(join_text).with_seal_key(key).dump())
        elif out is None:
            click.echo(key.text())

    _run_guarded(run)


# --------------------------------------------------------------------------- peers


@main.command()
@join_option
@click.option(
    "--skills", "skills", multiple=True, help="Module name or .py file with @zlink.skill functions (repeatable)."
)
@click.option("--slots", type=int, default=4, show_default=True, help="Tasks run at once.")
@click.option(
    "--prefetch",
    type=int,
    default=None,
    help="Most tasks queued at the node beyond its slots (default 1024; the broker adapts the depth to the task rate).",
)
@click.option("--name", default=None, help="Node name (default: the join string's).")
@click.option("--heartbeat-interval", type=float, default=None, help="Seconds (default: the broker's).")
@click.option("--liveness", type=int, default=None, help="Missed beacons before the broker is presumed gone.")
@click.option(
    "--a2a-agent", "a2a_agent", default=None, metavar="URL",
    help="Also serve the skills of the A2A agent at URL: each task is forwarded to it (needs zlink[a2a]).",
)  # fmt: skip
@click.option(
    "--a2a-token", "a2a_token", envvar="ZLINK_A2A_TOKEN", default=None,
    help="Bearer token for the --a2a-agent (default: $ZLINK_A2A_TOKEN).",
)  # fmt: skip
@log_options
@seal_key_option
def node(
    join: str | None,
    skills: tuple[str, ...],
    slots: int,
    prefetch: int | None,
    name: str | None,
    heartbeat_interval: float | None,
    liveness: int | None,
    a2a_agent: str | None,
    a2a_token: str | None,
    log_level: str,
    log_format: str,
    seal_key: str | None,
) -> None:
    """Run a node serving the skills in a module, or an A2A agent's (until Ctrl-C or SIGTERM)."""
    from .node import Node

    _setup_logging(log_level, log_format)
    _no_core_dumps()
    if slots < 1:
        _fail("--slots must be at least 1", EXIT_CONFIG)
    if not skills and not a2a_agent:
        _fail("give --skills MODULE (repeatable) and/or --a2a-agent URL", EXIT_CONFIG)

    def run() -> None:
        n = Node(
            join, slots=slots, prefetch=prefetch, name=name,
            heartbeat_interval=heartbeat_interval, liveness=liveness, seal_key=seal_key,
        )  # fmt: skip
        if log_format == "json":
            node_log = logging.getLogger("zlink.node")
            if n.seal_key is None:
                node_log.warning("payloads are NOT sealed end to end: the broker host can read them")
            else:
                node_log.info("payloads sealed end to end (seal key id %s)", n.seal_key.key_id)
        elif log_level != "error":
            _seal_notice(n, "node")
        if skills:
            n.add_skills(*skills)
        if a2a_agent:
            from .a2a import agent_skills
            from .a2a._convert import scrub_logs

            scrub_logs()  # a2a-sdk and httpx log lines, without payloads (zero-log)
            names = n.add_skills(agent_skills(a2a_agent, token=a2a_token))
            logging.getLogger("zlink.node").info("serving %d skill(s) of the A2A agent %s", len(names), a2a_agent)
        n.run()

    _run_guarded(run)


@main.command()
@join_option
@click.option(
    "--http", "http", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
    help="Where A2A clients connect (port 0: any free port).",
)  # fmt: skip
@click.option(
    "--token", envvar="ZLINK_GATEWAY_TOKEN", default=None,
    help="Bearer token A2A clients must send (default: $ZLINK_GATEWAY_TOKEN, else a new one printed on stdout).",
)  # fmt: skip
@click.option("--no-auth", is_flag=True, help="Serve without a token (anyone who reaches the port may run tasks).")
@click.option("--public-url", default=None, help="Base URL clients use, for the agent card (default: from --http).")
@click.option("--name", "agent_name", default="zlink swarm", show_default=True, help="The agent card's name.")
@click.option("--default-skill", default=None, help="Skill run by messages whose metadata names none.")
@click.option(
    "--task-timeout", type=float, default=3600.0, show_default=True,
    help="Seconds a task may take (a message's metadata 'timeout' may ask for less).",
)  # fmt: skip
@click.option(
    "--task-ttl", type=float, default=600.0, show_default=True,
    help="Seconds a finished task stays readable (GetTask, ListTasks); kept in memory only.",
)  # fmt: skip
@click.option("--max-tasks", type=int, default=10_000, show_default=True, help="Most tasks held in memory.")
@click.option("--tls-cert", default=None, type=click.Path(exists=True, dir_okay=False), help="Serve HTTPS: cert.")
@click.option("--tls-key", default=None, type=click.Path(exists=True, dir_okay=False), help="Serve HTTPS: key.")
@click.option(
    "--advertise-zmq/--no-advertise-zmq", default=True, show_default=True,
    help="List the broker's endpoint on the agent card as zlink's own binding.",
)  # fmt: skip
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
@log_options
@seal_key_option
def gateway(
    join: str | None,
    http: str,
    token: str | None,
    no_auth: bool,
    public_url: str | None,
    agent_name: str,
    default_skill: str | None,
    task_timeout: float,
    task_ttl: float,
    max_tasks: int,
    tls_cert: str | None,
    tls_key: str | None,
    advertise_zmq: bool,
    connect_timeout: float,
    log_level: str,
    log_format: str,
    seal_key: str | None,
) -> None:
    """Serve the swarm as one A2A agent over HTTP (until Ctrl-C or SIGTERM; needs zlink[a2a]).

    The agent card (/.well-known/agent-card.json) lists the skills of the live
    nodes; JSON-RPC is served at /, HTTP+JSON under /rest. Every request but
    the card needs 'Authorization: Bearer TOKEN'. See docs/a2a.md.
    """
    _setup_logging(log_level, log_format)
    _no_core_dumps()

    def make() -> Any:
        from .a2a import Gateway
        from .a2a._convert import scrub_logs

        scrub_logs()  # a2a-sdk, uvicorn and starlette log lines, without payloads (zero-log)
        if no_auth and token:
            raise ConfigError("--no-auth and --token contradict each other")
        return Gateway(
            join, http=http, token=token, auth=not no_auth, public_url=public_url, name=agent_name,
            default_skill=default_skill, task_timeout=task_timeout, task_ttl=task_ttl, max_tasks=max_tasks,
            advertise_zmq=advertise_zmq, seal_key=seal_key, connect_timeout=connect_timeout,
            tls_cert=tls_cert, tls_key=tls_key,
        )  # fmt: skip

    gw = _run_guarded(make)
    sock = _run_guarded(gw.bind)
    client = _run_guarded(gw.connect)
    if log_level != "error":
        _seal_notice(client, "gateway")
    if gw.token is None:
        click.echo(
            "zlink gateway: WARNING: --no-auth: anyone who reaches the port can run tasks on the swarm", err=True
        )
    elif gw.tls is None and gw.host not in ("127.0.0.1", "::1", "localhost"):
        click.echo(
            "zlink gateway: WARNING: plain HTTP on a non-loopback address: the bearer token crosses the network "
            "in clear; use --tls-cert/--tls-key or a TLS proxy",
            err=True,
        )
    click.echo(f"zlink gateway: A2A agent at {gw.url}/ (card: {gw.url}/.well-known/agent-card.json)", err=True)
    if gw.token_generated:
        click.echo(
            "zlink gateway: generated a bearer token (next line); set --token or $ZLINK_GATEWAY_TOKEN to keep one",
            err=True,
        )
        click.echo(gw.token)
        sys.stdout.flush()
    _run_guarded(lambda: gw.run(sock))


def _parse_args(text: str | None) -> tuple[list[Any], dict[str, Any]]:
    if text is None:
        return [], {}
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="ARGS_JSON") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@main.command()
@join_option
@click.argument("skill")
@click.argument("args_json", required=False)
@click.option("--timeout", type=float, default=None, help="Seconds before the task fails with a timeout.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
@seal_key_option
def submit(
    join: str | None,
    skill: str,
    args_json: str | None,
    timeout: float | None,
    connect_timeout: float,
    seal_key: str | None,
) -> None:
    """Run one task and print its result as JSON.

    ARGS_JSON is a JSON array (positional arguments), an object (keyword
    arguments) or any other JSON value (the single argument); '-' reads stdin.
    """
    from .client import Client

    args, kwargs = _parse_args(args_json)

    def run() -> Any:
        with Client(join, connect_timeout=connect_timeout, seal_key=seal_key) as c:
            if c.seal_key is None:
                _seal_notice(c, "submit")
            return c.submit(skill, *args, timeout=timeout, **kwargs).result()

    result = _run_guarded(run)
    click.echo(json.dumps(_jsonable(result), ensure_ascii=False))


@main.command()
@join_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
def status(join: str | None, as_json: bool, connect_timeout: float) -> None:
    """Show nodes, queued tasks and counters."""
    st = _fetch_status(join, connect_timeout)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(render_status(st))


def _fetch_status(join: str | None, connect_timeout: float) -> dict[str, Any]:
    from .client import Client

    def run() -> dict[str, Any]:
        with Client(join, connect_timeout=connect_timeout) as c:
            return c.status()

    st: dict[str, Any] = _run_guarded(run)
    return st


def render_status(st: dict[str, Any]) -> str:
    where = f"broker {st['endpoint']}  " if st.get("endpoint") else "broker "
    lines = [f"{where}epoch {st['epoch']}  up {st['uptime']:.0f} s  clients {st['clients']}  running {st['running']}"]
    nodes = st["nodes"]
    lines.append(f"nodes ({len(nodes)}):")
    if nodes:
        w = max(4, *(len(n["name"]) for n in nodes))
        lines.append(f"  {'NAME':<{w}}  {'SLOTS':>9}  {'SEEN':>6}  {'DONE':>8}  {'FAILED':>6}  {'SEAL':<12}  SKILLS")
        for n in nodes:
            slots = f"{n['busy']}/{n['slots']}"
            seal = n.get("seal") or "UNSEALED"
            lines.append(
                f"  {n['name']:<{w}}  {slots:>9}  {n['last_seen']:>5.1f}s  {n['done']:>8}  {n['failed']:>6}  "
                f"{seal:<12}  " + ", ".join(n["skills"])
            )
    keys = st.get("seal_keys", [])
    if keys == [""]:
        lines.append("sealing: OFF: no node seals payloads; the broker host can read them (see 'zlink seal-key')")
    elif "" in keys:
        lines.append("sealing: MIXED: some nodes seal and some do not; tasks fail between them and other peers")
    elif len(keys) > 1:
        lines.append(f"sealing: MIXED: nodes hold different seal keys ({', '.join(keys)}); tasks fail across them")
    elif keys:
        lines.append(f"sealing: on (seal key id {keys[0]})")
    queued = st["queued"]
    lines.append("queued: " + (", ".join(f"{k}={v}" for k, v in sorted(queued.items())) if queued else "none"))
    c = st["counters"]
    lines.append(
        f"tasks: done {c['done']}  failed {c['failed']}  submitted {c['submitted']}  requeued {c['requeued']}  "
        f"lost {c['lost']}  timed out {c['timed_out']}  cancelled {c['cancelled']}  rejected {c['rejected']}"
    )
    if st.get("errors") or c.get("auth_denied"):
        errs = ", ".join(f"{k}={v}" for k, v in sorted(st.get("errors", {}).items())) or "none"
        lines.append(f"refused: auth {c.get('auth_denied', 0)}  protocol {errs}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- operators


def _admin_op(join: str | None, op: str, arg: str, connect_timeout: float) -> None:
    from .client import Client

    def run() -> dict[str, Any]:
        with Client(join, connect_timeout=connect_timeout) as c:
            return c.admin(op, arg)

    reply: dict[str, Any] = _run_guarded(run)
    if not reply.get("ok"):
        _fail(str(reply.get("message", "refused")), EXIT_TASK)
    click.echo(str(reply.get("message", "")))


@main.command()
@join_option
@click.argument("node_name", metavar="NODE")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
def drain(join: str | None, node_name: str, connect_timeout: float) -> None:
    """Drain NODE: it takes no new tasks, finishes its running ones, then stops (admin key)."""
    _admin_op(join, "drain", node_name, connect_timeout)


@main.command()
@join_option
@click.argument("task_id")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
def cancel(join: str | None, task_id: str, connect_timeout: float) -> None:
    """Cancel the task TASK_ID (hex), whoever submitted it (admin key); its client sees TaskCancelled."""
    _admin_op(join, "cancel", task_id, connect_timeout)


@main.command()
@join_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
def nodes(join: str | None, as_json: bool, connect_timeout: float) -> None:
    """List the connected nodes: name, slots busy/total, heartbeat age, done, failed, seal key, skills."""
    st = _fetch_status(join, connect_timeout)
    if as_json:
        click.echo(json.dumps(st["nodes"], indent=2, sort_keys=True))
        return
    lines = render_status(st).splitlines()
    click.echo("\n".join(line for line in lines[1:] if not line.startswith(("queued:", "tasks:", "refused:"))))


@main.command()
@join_option
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame (after two samples, for the rates) and exit.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
def top(join: str | None, interval: float, once: bool, connect_timeout: float) -> None:
    """A live view of the swarm: nodes, load, throughput, queues, recent events (Ctrl-C ends it)."""
    import shutil

    from .client import Client
    from .top import Top

    if interval <= 0:
        _fail("--interval must be more than 0", EXIT_CONFIG)

    def run() -> None:
        dash = Top(window=max(10, int(60 / interval)), interval=interval)
        with Client(join, connect_timeout=connect_timeout) as c:
            dash.update(c.status())
            while True:
                time.sleep(interval)
                dash.update(c.status())
                frame = dash.render(shutil.get_terminal_size((120, 40)).columns)
                if once:
                    click.echo(frame)
                    return
                click.echo("\x1b[H\x1b[2J" + frame, nl=False)  # home, clear, draw

    _listen_guarded(run)


# --------------------------------------------------------------------------- doctor


def _doctor_peer(join: Any, timeout: float, key: Any) -> Any:
    """A peer to test the connection with: a client, or for a node-only key a probe node
    serving one skill nobody calls (it registers briefly and leaves with BYE)."""
    from .client import Client
    from .node import Node

    if join.role != "node":
        return Client(join, connect_timeout=timeout, seal_key=key)
    probe = Node(join, slots=1, prefetch=0, connect_timeout=timeout, seal_key=key, name=f"{join.name or 'node'}-doctor")

    @probe.skill("zlink.doctor.probe")
    def _probe() -> None:
        return None

    return probe  # started by the caller's "with"


@main.command()
@join_option
@seal_key_option
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds for each check.")
def doctor(join: str | None, seal_key: str | None, timeout: float) -> None:
    """Check a join string end to end and say how to fix what is wrong.

    Checks the join string, that each broker port answers, the CurveZMQ
    handshake and the key's authorisation, the key's role, the protocol
    version, the clock offset to the broker, and payload sealing.
    """
    import socket as _socket

    from .client import Client
    from .security import Join, resolve_seal_key

    problems = 0

    def ok(text: str) -> None:
        click.echo(f"  ok    {text}")

    def bad(text: str, fix: str) -> None:
        nonlocal problems
        problems += 1
        click.echo(f"  FAIL  {text}\n        fix: {fix}")

    def warn(text: str, fix: str) -> None:
        click.echo(f"  WARN  {text}\n        fix: {fix}")

    click.echo("zlink doctor")
    try:
        j = Join.from_env(join)
    except ConfigError as exc:
        bad(f"join string: {exc}", "ask the broker's operator for a new one: zlink invite --name NAME --role ROLE")
        sys.exit(EXIT_CONFIG)
    ok(f"join string: key {j.name or '(unnamed)'!r}, role {j.role}, broker {', '.join(j.endpoints)}")
    from urllib.parse import urlsplit

    reachable = True
    for endpoint in j.endpoints:
        url = urlsplit(endpoint)
        host, port = url.hostname or "", url.port or 0
        for offset, what in ((0, "main"), (1, "beacon"), (2, "heartbeat")):
            try:
                with _socket.create_connection((host, port + offset), timeout=timeout):
                    pass
                ok(f"{what} port {host}:{port + offset} answers")
            except OSError as exc:
                reachable = False
                bad(
                    f"{what} port {host}:{port + offset} does not answer ({exc.strerror or exc})",
                    f"is the broker running? is TCP {port}-{port + 2} open in every firewall between here and {host}?",
                )
    if not reachable:
        sys.exit(EXIT_CONNECT)
    try:
        key = resolve_seal_key(seal_key, j)
    except ConfigError as exc:
        bad(f"seal key: {exc}", "fix or remove --seal-key / $ZLINK_SEAL_KEY")
        key = None
    try:
        with _doctor_peer(j, timeout, key) as c:
            w = c.welcome
            assert w is not None
            ok(f"CurveZMQ handshake: the broker accepted key {w.key_name!r}")
            ok(f"protocol version {P.PROTOCOL_VERSION}: the broker speaks it")
            ok(f"role {w.role!r}: " + {
                "node": "may serve skills (not submit tasks or read status)",
                "client": "may submit tasks, send messages and read status",
                "both": "may serve skills and submit tasks",
                "admin": "may submit tasks, read status and manage the swarm",
            }.get(w.role, "unknown"))  # fmt: skip
            deadline = time.monotonic() + min(timeout, 2 * w.heartbeat_interval + 0.5)
            while c.clock_offset is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if c.clock_offset is None:
                bad("no broker beacon heard", f"TCP port {port + 1} must be reachable for liveness; check firewalls")
            elif abs(c.clock_offset) > 1.0:
                bad(
                    f"clock offset to the broker: {c.clock_offset:+.2f} s",
                    "run NTP (chrony/systemd-timesyncd) on both machines; zlink does not need synced clocks, "
                    "but logs and metrics are hard to correlate",
                )
            else:
                ok(f"clock offset to the broker: {c.clock_offset * 1000:+.0f} ms")
            if key is None:
                warn(
                    "payloads are NOT sealed end to end (no seal key): the broker host can read them",
                    "make one on a trusted machine: zlink seal-key --out swarm.key, then --seal-key or add it "
                    "to join strings with zlink seal-key --key swarm.key --join ...",
                )
            else:
                ok(f"payloads sealed with seal key {key.key_id}")
                if isinstance(c, Client):
                    try:
                        st = c.status(timeout)
                        ids = [i for i in st.get("seal_keys", []) if i]
                        if ids and ids != [key.key_id]:
                            bad(
                                f"nodes use seal key(s) {', '.join(ids)}, this peer {key.key_id}",
                                "give every peer the same seal key",
                            )
                    except ZlinkError:
                        pass
    except AuthenticationError as exc:
        bad(
            f"CurveZMQ handshake refused: {exc}",
            "the key is not authorised here (or was revoked), or the join string names an old broker key: "
            "ask the operator for a new join string (zlink invite)",
        )
    except ConnectError as exc:
        bad(f"no answer to HELLO: {exc}", "the broker may be overloaded or an older version; check its log")
    except ProtocolError as exc:
        bad(f"protocol: {exc}", "upgrade zlink here or on the broker so both speak the same version")
    click.echo("all checks passed" if not problems else f"{problems} problem(s) found")
    sys.exit(0 if not problems else EXIT_TASK)


# --------------------------------------------------------------------------- agent messaging


def _message_text(text: str) -> Any:
    """A message from the command line: '-' reads stdin; JSON is sent as its value, anything else as text."""
    if text == "-":
        text = sys.stdin.read()
        if text.endswith("\n"):
            text = text[:-1]  # the newline that ends the input, as echo and heredocs add
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _print_message(msg: Any, as_json: bool) -> None:
    if as_json:
        line = {"from": msg.sender, "topic": msg.topic or None, "id": msg.id, "message": _jsonable(msg.body)}
        click.echo(json.dumps(line, ensure_ascii=False))
    else:
        where = f"{msg.sender} #{msg.topic}" if msg.topic else msg.sender
        body = msg.body if isinstance(msg.body, str) else json.dumps(_jsonable(msg.body), ensure_ascii=False)
        click.echo(f"{where}> {body}")
    sys.stdout.flush()


def _print_incoming(
    c: Any, *, as_json: bool, once: bool, timeout: float | None = None, topics_only: bool = False
) -> None:
    """Print messages as they arrive (listen, subscribe); a loop-guard notice is said and skipped."""
    while True:
        try:
            msg = c.receive(timeout)
        except TimeoutError:
            _fail(f"no message within {timeout:g} s", EXIT_TASK)
        except LoopGuarded as exc:  # one of this peer's conversations paused: say so, go on
            click.echo(f"zlink: {exc}", err=True)
            continue
        if topics_only and not msg.topic:
            continue
        _print_message(msg, as_json)
        if once:
            return


def _messenger(join: str | None, seal_key: str | None, connect_timeout: float) -> Any:
    from .client import Client

    c = Client(join, connect_timeout=connect_timeout, seal_key=seal_key)
    if c.seal_key is None:
        _seal_notice(c, "messages")
    return c


@main.command()
@join_option
@click.option("--to", "to", required=True, help="The recipient's name (the name it was invited under).")
@click.argument("message")
@click.option("--ttl", type=float, default=60.0, show_default=True, help="Seconds a recipient may take to connect.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
@seal_key_option
def send(join: str | None, to: str, message: str, ttl: float, connect_timeout: float, seal_key: str | None) -> None:
    """Send MESSAGE to the peer named --to; waits until it is delivered.

    MESSAGE is sent as JSON if it parses as JSON, else as text; '-' reads stdin.
    Exit 0 when delivered, 1 when it could not be (not connected within --ttl,
    the loop guard), 3 when the broker cannot be reached.
    """
    body = _message_text(message)

    def run() -> None:
        with _messenger(join, seal_key, connect_timeout) as c:
            c.send(to, body, ttl=ttl).result(ttl + 30)

    _run_guarded(run)


@main.command()
@join_option
@click.option("--topic", "topics", multiple=True, help="Also receive messages published to this topic (repeatable).")
@click.option("--once", is_flag=True, help="Exit after the first message.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: from, topic, id, message.")
@click.option("--timeout", type=float, default=None, help="Exit 1 if no message comes within this many seconds.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
@seal_key_option
def listen(
    join: str | None,
    topics: tuple[str, ...],
    once: bool,
    as_json: bool,
    timeout: float | None,
    connect_timeout: float,
    seal_key: str | None,
) -> None:
    """Print every message sent to this peer (and its --topic's) as it arrives, with its sender."""

    def run() -> None:
        with _messenger(join, seal_key, connect_timeout) as c:
            if topics:
                c.subscribe(*topics)
            _print_incoming(c, as_json=as_json, once=once, timeout=timeout)

    _listen_guarded(run)


@main.command()
@join_option
@click.argument("topic")
@click.argument("message")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
@seal_key_option
def publish(join: str | None, topic: str, message: str, connect_timeout: float, seal_key: str | None) -> None:
    """Send MESSAGE to every current subscriber of TOPIC ('-' reads stdin)."""
    body = _message_text(message)

    def run() -> None:
        with _messenger(join, seal_key, connect_timeout) as c:
            c.publish(topic, body).result(30)

    _run_guarded(run)


@main.command()
@join_option
@click.argument("topics", nargs=-1, required=True)
@click.option("--once", is_flag=True, help="Exit after the first message.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
@seal_key_option
def subscribe(
    join: str | None, topics: tuple[str, ...], once: bool, as_json: bool, connect_timeout: float, seal_key: str | None
) -> None:
    """Print every message published to TOPICS as it arrives."""

    def run() -> None:
        with _messenger(join, seal_key, connect_timeout) as c:
            c.subscribe(*topics)
            _print_incoming(c, as_json=as_json, once=once, topics_only=True)

    _listen_guarded(run)


@main.command()
@join_option
@click.option("--to", "to", required=True, help="The peer to talk to.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True)
@seal_key_option
def chat(join: str | None, to: str, connect_timeout: float, seal_key: str | None) -> None:
    """Talk to the peer named --to: each line you type is sent; what it sends is printed.

    Ctrl-D or Ctrl-C ends the chat.
    """
    import threading

    def run() -> None:
        with _messenger(join, seal_key, connect_timeout) as c:
            click.echo(f"chatting with {to} as {c.welcome.key_name if c.welcome else '?'} (Ctrl-D to end)", err=True)

            def show() -> None:
                while not c.closed:
                    try:
                        msg = c.receive(0.5)
                    except TimeoutError:
                        continue
                    except ZlinkError as exc:
                        click.echo(f"zlink: {exc}", err=True)
                        continue
                    if msg.sender == to and not msg.topic:
                        _print_message(msg, False)

            threading.Thread(target=show, name="zlink-chat", daemon=True).start()
            for line in sys.stdin:
                text = line.rstrip("\n")
                if not text:
                    continue
                try:
                    c.send(to, text).result(90)
                except ZlinkError as exc:
                    click.echo(f"zlink: not delivered: {exc}", err=True)

    _listen_guarded(run)


def _listen_guarded(fn: Callable[[], Any]) -> None:
    """Like _run_guarded, and Ctrl-C ends a listening command quietly (exit 0)."""
    try:
        _run_guarded(fn)
    except KeyboardInterrupt:
        sys.exit(0)


# --------------------------------------------------------------------------- demo


@main.command()
@click.option("--nodes", "n_nodes", type=int, default=2, show_default=True, help="Node processes to start.")
@click.option("--path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Python source tree to audit (default: the standard library).")  # fmt: skip
@click.option("--limit", type=int, default=None, help="Audit at most this many files.")
@click.option("--no-sequential", is_flag=True, help="Skip the one-process comparison run.")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full report as JSON here.")  # fmt: skip
def demo(n_nodes: int, path: Path | None, limit: int | None, no_sequential: bool, report_file: Path | None) -> None:
    """Audit a Python codebase on a throw-away local swarm and compare with one process.

    Starts a broker and N node processes on 127.0.0.1 with CurveZMQ and fresh
    keys, fans three skills (inspect, scan, docs) out per file, merges the
    results with one verify task, then removes everything it created.
    """
    from .demo import run_demo

    if n_nodes < 1:
        _fail("--nodes must be at least 1", EXIT_CONFIG)
    code = _run_guarded(
        lambda: run_demo(nodes=n_nodes, path=path, limit=limit, sequential=not no_sequential, report_file=report_file)
    )
    sys.exit(code)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark suite (scripts/bench.py; '--help' lists its options).

    Needs a source checkout (pip install -e .); Ray, Dask and Celery are
    compared when installed with pip install -e '.[bench]'.
    """
    import runpy

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    if not script.is_file():
        _fail("zlink bench runs scripts/bench.py from a source checkout; install with 'pip install -e .'", EXIT_CONFIG)
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":  # pragma: no cover
    main()
