"""Operator commands against real processes on 127.0.0.1: nodes, drain, cancel,
metrics, JSON logs, doctor, configuration precedence, and ``zlink top``
(as a frame on a pipe, and once in a real terminal through tmux).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import zlink
from zlink.demo import LocalSwarm, processes_mentioning
from zlink.security import BrokerHome

from .conftest import SKILLS, clean_env, free_port, node_by_name, run_zlink, start_swarm, wait_for, zlink_exe

NODES = ["ops-node-1", "ops-node-2"]
METRIC_NAMES = [
    "zlink_up", "zlink_uptime_seconds", "zlink_nodes", "zlink_clients", "zlink_slots", "zlink_slots_busy",
    "zlink_tasks_running", "zlink_tasks_queued", "zlink_node_tasks_total", "zlink_events_total",
    "zlink_refused_total", "zlink_task_seconds",
]  # fmt: skip


@dataclass
class Ops:
    swarm: LocalSwarm
    metrics: str  # host:port of the broker's Prometheus endpoint
    client: str  # join strings (sealed, like every join string of the swarm)
    admin: str


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    metrics = f"127.0.0.1:{free_port()}"
    home = tmp_path_factory.mktemp("ops") / "home"
    with start_swarm(home, NODES, slots=2, broker_args=("--metrics", metrics)) as sw:
        yield Ops(sw, metrics, sw.invite("client", "ops-client"), sw.invite("admin", "ops-admin"))


def zlink_as(join: str, *args: str, timeout: float = 45.0) -> subprocess.CompletedProcess[str]:
    return run_zlink(*args, env=clean_env(ZLINK_JOIN=join), timeout=timeout)


def stop(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    return proc.returncode


def port_triple() -> int:
    """A port P with P, P+1 and P+2 free on 127.0.0.1, below the ephemeral range (a broker uses all three)."""
    for _ in range(500):
        port = random.randrange(11_000, 27_000)
        socks: list[socket.socket] = []
        try:
            for p in (port, port + 1, port + 2):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no three consecutive free ports")


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode(errors="replace")


# --------------------------------------------------------------------------- nodes, top


@pytest.mark.timeout(60)
def test_nodes_lists_the_nodes_with_their_address(ops: Ops) -> None:
    res = zlink_as(ops.client, "nodes")
    assert res.returncode == 0, res.stderr
    for name in NODES:
        assert name in res.stdout
    assert res.stdout.startswith("nodes (")
    assert "tasks:" not in res.stdout  # the node list only, not the counters of status

    res = zlink_as(ops.client, "nodes", "--json")
    assert res.returncode == 0, res.stderr
    listed = {n["name"]: n for n in json.loads(res.stdout)}
    assert set(NODES) <= set(listed)
    for name in NODES:
        n = listed[name]
        assert n["address"] == "127.0.0.1"
        assert n["draining"] is False
        assert n["slots"] == 2
        assert n["seal"] == ops.swarm.seal_key.key_id  # type: ignore[union-attr]
        assert "sleep_then" in n["skills"]


@pytest.mark.timeout(60)
def test_top_once_prints_a_frame(ops: Ops) -> None:
    res = zlink_as(ops.client, "top", "--once", "--interval", "0.3")
    assert res.returncode == 0, res.stderr
    frame = res.stdout
    assert frame.startswith("zlink top  broker ")
    assert "\x1b[" not in frame  # --once prints plain text, no screen control
    assert "throughput" in frame
    for name in NODES:
        assert name in frame
    row = next(line for line in frame.splitlines() if line.startswith(NODES[0] + " "))
    assert row.split()[1] == "127.0.0.1"
    assert row.split()[2].endswith("/2")
    assert f"node {NODES[0]} joined" in frame  # recent events


@pytest.mark.timeout(60)
def test_top_in_a_real_terminal(ops: Ops, tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    marker = f"ops-top-{uuid.uuid4().hex[:8]}"
    sock = str(tmp_path / "tmux.sock")  # a private tmux server: nothing shared with the user's sessions
    env = clean_env(ZLINK_JOIN=ops.client, ZLINK_TEST_MARKER=marker)
    env.pop("TMUX", None)
    command = f"{' '.join(zlink_exe())} top --interval 0.5; echo zlink-top-exited-$?; sleep 60"
    screen = ""
    try:
        subprocess.run(
            [tmux, "-S", sock, "-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", "160", "-y", "40", command],
            env=env, check=True, timeout=20, stdin=subprocess.DEVNULL, capture_output=True,
        )  # fmt: skip

        def captured() -> bool:
            nonlocal screen
            res = subprocess.run(
                [tmux, "-S", sock, "capture-pane", "-p", "-t", "top"],
                env=env, capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
            screen = res.stdout
            return "zlink-top-exited" in screen or (
                "throughput" in screen and all(name in screen for name in NODES) and "recent:" in screen
            )

        wait_for(captured, timeout=30, interval=0.25, what="zlink top to draw a frame in tmux")
    finally:
        subprocess.run([tmux, "-S", sock, "kill-server"], env=env, capture_output=True, timeout=10, check=False)
        saved = tmp_path / "top_screen.txt"
        saved.write_text(screen)
        print(f"captured zlink top screen: {saved}")
    assert "zlink-top-exited" not in screen, screen
    lines = screen.splitlines()
    assert lines[0].startswith("zlink top  broker "), screen
    assert "throughput" in screen
    for name in NODES:
        row = next(line for line in lines if line.startswith(name + " "))
        assert "127.0.0.1" in row
        # the frame is cut at the terminal's 160 columns, not the 120 of a pipe: the skills fit
        assert row.rstrip().endswith("sleep_then, square, whoami"), row
    assert max(len(line) for line in lines) <= 160
    # the tmux server took zlink top with it
    wait_for(lambda: not processes_mentioning(marker), timeout=10, what="zlink top to exit with its terminal")


# --------------------------------------------------------------------------- metrics


@pytest.mark.timeout(60)
def test_metrics_endpoint_serves_prometheus_text_without_payloads(ops: Ops) -> None:
    canary = f"CANARY-{uuid.uuid4().hex}"
    with zlink.Client(ops.client, connect_timeout=15) as c:
        echoes = [c.submit("echo", f"{canary}-arg-{i}") for i in range(20)]
        joined = c.submit("add", f"{canary}-left-", f"{canary}-right")
        failed = c.submit("fail")
        assert [f.result(30) for f in echoes] == [f"{canary}-arg-{i}" for i in range(20)]
        assert joined.result(30) == f"{canary}-left-{canary}-right"
        with pytest.raises(zlink.RemoteError):
            failed.result(30)

    status, ctype, text = http_get(f"http://{ops.metrics}/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    assert canary not in text
    assert "CANARY" not in text
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    assert samples["zlink_up"] == 1
    assert samples["zlink_nodes"] >= 2
    assert samples["zlink_slots"] >= 4
    assert samples['zlink_task_seconds_count{skill="echo"}'] >= 20
    assert (
        samples['zlink_task_seconds_bucket{skill="echo",le="+Inf"}']
        == samples['zlink_task_seconds_count{skill="echo"}']
    )
    assert samples['zlink_task_seconds_count{skill="add"}'] >= 1
    assert samples['zlink_events_total{event="done"}'] >= 21
    assert samples['zlink_events_total{event="failed"}'] >= 1
    done_by_nodes = sum(samples.get(f'zlink_node_tasks_total{{node="{n}",outcome="done"}}', 0) for n in NODES)
    assert done_by_nodes >= 21

    status, _, body = http_get(f"http://{ops.metrics}/elsewhere")
    assert status == 404
    assert canary not in body
    status, _, _ = http_get(f"http://{ops.metrics}/metrics/../secrets")
    assert status == 404


# --------------------------------------------------------------------------- cancel


@pytest.mark.timeout(60)
def test_admin_cancels_another_clients_task(ops: Ops) -> None:
    victim = ops.swarm.invite("client", "ops-victim")
    with zlink.Client(victim, connect_timeout=15) as c:
        fut = c.submit("sleep_then", "never", 40.0)
        wait_for(lambda: c.status()["running"] >= 1, timeout=20, what="the long task to start")
        res = zlink_as(ops.admin, "cancel", fut.task_id)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"cancelled task {fut.task_id}"
        exc = fut.exception(15)
        assert isinstance(exc, zlink.TaskCancelled), exc
        assert "cancelled by an operator" in str(exc)
        # the node was told to stop: its slot frees long before the 40 s sleep would end
        wait_for(
            lambda: sum(n["busy"] for n in c.status()["nodes"]) == 0,
            timeout=20,
            what="the node to stop the cancelled task and free its slot",
        )
    res = zlink_as(ops.admin, "cancel", fut.task_id)
    assert res.returncode == 1
    assert "no task" in res.stderr


@pytest.mark.timeout(60)
def test_non_admin_keys_may_not_manage_the_swarm(ops: Ops) -> None:
    for args in (("drain", NODES[0]), ("cancel", "00" * 16)):
        res = zlink_as(ops.client, *args)
        assert res.returncode == 1, (args, res.stderr)
        assert "admin only" in res.stderr
        assert "role 'client'" in res.stderr
    with zlink.Client(ops.client, connect_timeout=15) as c:
        assert not any(n["draining"] for n in c.status()["nodes"])
    res = zlink_as(ops.admin, "drain", "no-such-node")
    assert res.returncode == 1
    assert "no connected node named 'no-such-node'" in res.stderr


# --------------------------------------------------------------------------- drain


@pytest.mark.timeout(60)
def test_drain_lets_a_node_finish_and_leave_while_tasks_complete_elsewhere(ops: Ops, tmp_path: Path) -> None:
    name = "ops-drained"
    log = tmp_path / "drained-node.log"
    with open(log, "w") as err:
        node = subprocess.Popen(
            [*zlink_exe(), "node", "--skills", str(SKILLS), "--slots", "1", "--name", name,
             "--log-format", "json", "--log-level", "info"],
            env=clean_env(ZLINK_JOIN=ops.swarm.invite("node", name)),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        with zlink.Client(ops.client, connect_timeout=15) as c:
            wait_for(lambda: node_by_name(c.status(), name), timeout=30, what="the node to join")
            futs = [c.submit("sleep_then", i, 2.0) for i in range(8)]
            wait_for(
                lambda: (node_by_name(c.status(), name) or {}).get("busy", 0) >= 1,
                timeout=20,
                what="the node to get a task",
            )
            res = zlink_as(ops.admin, "drain", name)
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == f"draining {name}"
            assert node.wait(30) == 0
            # every task finished, on whichever node
            assert [f.result(30) for f in futs] == list(range(8))

            def gone() -> dict[str, Any] | None:
                st = c.status()
                return None if node_by_name(st, name) else st

            st = wait_for(gone, timeout=10, what="the drained node to leave")
            assert {n["name"] for n in st["nodes"]} >= set(NODES)
            left = [text for _, text in st["events"] if text.startswith(f"node {name} left")]
            assert left == [f"node {name} left (bye); 0 task(s) handed back"], st["events"]
    finally:
        stop(node)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any("drained by an operator" in r["msg"] for r in records), log.read_text()


# --------------------------------------------------------------------------- doctor


@pytest.mark.timeout(60)
def test_doctor_passes_on_a_good_sealed_join(ops: Ops) -> None:
    res = zlink_as(ops.client, "doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "all checks passed" in out
    assert "FAIL" not in out and "WARN" not in out
    assert "ok    CurveZMQ handshake: the broker accepted key 'ops-client'" in out
    assert "ok    role 'client'" in out
    assert f"ok    payloads sealed with seal key {ops.swarm.seal_key.key_id}" in out  # type: ignore[union-attr]
    for what in ("main", "beacon", "heartbeat"):
        assert f"ok    {what} port 127.0.0.1:" in out


@pytest.mark.timeout(60)
def test_doctor_warns_when_unsealed(ops: Ops) -> None:
    bare = BrokerHome(ops.swarm.home).invite(name="ops-unsealed", role="client", endpoints=[ops.swarm.endpoint])
    res = zlink_as(bare.dump(), "doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARN  payloads are NOT sealed end to end" in res.stdout
    assert "fix: make one on a trusted machine: zlink seal-key" in res.stdout
    assert "all checks passed" in res.stdout


@pytest.mark.timeout(60)
def test_doctor_reports_a_revoked_key(ops: Ops) -> None:
    join = ops.swarm.invite("client", "ops-revoked")
    res = run_zlink("revoke", "--home", str(ops.swarm.home), "ops-revoked")
    assert res.returncode == 0, res.stderr
    res = zlink_as(join, "doctor", "--timeout", "5")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL  CurveZMQ handshake" in res.stdout
    assert "ask the operator for a new join string" in res.stdout
    assert "1 problem(s) found" in res.stdout
    assert "ok    main port" in res.stdout  # the ports still answer: only the key is refused


@pytest.mark.timeout(60)
def test_doctor_passes_on_a_node_key(ops: Ops) -> None:
    res = zlink_as(ops.swarm.invite("node", "ops-doctor-node"), "doctor")
    assert "ok    role 'node'" in res.stdout, res.stdout
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(60)
def test_doctor_reports_a_dead_broker(tmp_path: Path) -> None:
    home = BrokerHome(tmp_path / "deadhome")
    home.ensure()
    port = port_triple()
    join = home.invite(name="ops-dead", role="client", endpoints=[f"tcp://127.0.0.1:{port}"]).dump()
    res = zlink_as(join, "doctor", "--timeout", "2")
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"FAIL  main port 127.0.0.1:{port} does not answer" in res.stdout
    assert "is the broker running?" in res.stdout
    assert "CurveZMQ" not in res.stdout  # it stops before the handshake


@pytest.mark.timeout(60)
def test_doctor_reports_a_damaged_join_string(ops: Ops) -> None:
    cut = ops.client[: len(ops.client) // 2]  # cut off when copied
    res = zlink_as(cut, "doctor")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "FAIL  join string: join string is damaged" in res.stdout
    assert "zlink invite" in res.stdout
    assert "ok    " not in res.stdout


# --------------------------------------------------------------------------- configuration, JSON logs


def run_broker(tmp_path: Path, tag: str, args: list[str], env: dict[str, str]) -> tuple[str, int, str]:
    """Start ``zlink ARGS`` (a broker), wait until it is bound, stop it; (endpoint, exit code, stderr)."""
    home = tmp_path / "brokerhome"
    BrokerHome(home).config_file.unlink(missing_ok=True)
    log = tmp_path / f"broker-{tag}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*zlink_exe(), *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        wait_for(
            lambda: (
                proc.poll() is not None or ("listening on" in log.read_text() and BrokerHome(home).bound_endpoints())
            ),
            timeout=30,
            what="the broker to bind",
        )
        assert proc.poll() is None, log.read_text()
        (endpoint,) = BrokerHome(home).bound_endpoints()
    finally:
        code = stop(proc)
    return endpoint, code, log.read_text()


def json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- stderr:\n{text}") from None
    return records


@pytest.mark.timeout(60)
def test_broker_takes_config_file_then_env_then_command_line(tmp_path: Path) -> None:
    p_file, p_env, p_line = port_triple(), port_triple(), port_triple()
    home = tmp_path / "brokerhome"
    cfg = tmp_path / "zlink.toml"
    cfg.write_text(
        "[broker]\n"
        f'bind = "tcp://127.0.0.1:{p_file}"\n'
        f'home = "{home}"\n'
        'log-format = "json"\n'
        'log_level = "info"\n'
        "quiet = true\n"
        "heartbeat-interval = 0.25\n"
    )
    env_bind = {"ZLINK_BROKER_BIND": f"tcp://127.0.0.1:{p_env}"}

    # the file alone (named by $ZLINK_CONFIG)
    endpoint, code, err = run_broker(tmp_path, "file", ["broker"], clean_env(ZLINK_CONFIG=str(cfg)))
    assert endpoint == f"tcp://127.0.0.1:{p_file}"
    assert code == 0, err
    records = json_lines(err)  # log-format and quiet came from the file too: nothing but JSON
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert any(r["msg"].startswith(f"broker listening on tcp://127.0.0.1:{p_file}") for r in records)
    assert any(r["msg"] == "broker stopping" for r in records)

    # the environment beats the file
    endpoint, code, err = run_broker(tmp_path, "env", ["--config", str(cfg), "broker"], clean_env(**env_bind))
    assert endpoint == f"tcp://127.0.0.1:{p_env}"
    assert code == 0, err
    json_lines(err)

    # the command line beats both
    args = ["--config", str(cfg), "broker", "--bind", f"tcp://127.0.0.1:{p_line}", "--log-format", "text"]
    endpoint, code, err = run_broker(tmp_path, "line", args, clean_env(**env_bind))
    assert endpoint == f"tcp://127.0.0.1:{p_line}"
    assert code == 0, err
    assert "INFO zlink.broker: broker listening on" in err  # text, from the command line
    assert not err.lstrip().startswith("{")


@pytest.mark.timeout(60)
def test_broker_refuses_a_config_table_for_no_command(tmp_path: Path) -> None:
    cfg = tmp_path / "zlink.toml"
    cfg.write_text('[brokr]\nbind = "tcp://127.0.0.1:1"\n')
    res = run_zlink("--config", str(cfg), "broker", "--home", str(tmp_path / "home"), timeout=30)
    assert res.returncode == 2
    assert "brokr" in res.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.timeout(60)
def test_broker_json_logs_with_quiet_are_json_lines(tmp_path: Path) -> None:
    args = ["broker", "--home", str(tmp_path / "brokerhome"), "--bind", "tcp://127.0.0.1:0"]
    endpoint, code, err = run_broker(tmp_path, "json", [*args, "--log-format", "json", "--quiet"], clean_env())
    assert code == 0, err
    records = json_lines(err)
    assert [r["level"] for r in records] == ["info"] * len(records)
    assert all(r["logger"].startswith("zlink") for r in records)
    assert any(endpoint in r["msg"] for r in records)


@pytest.mark.timeout(60)
def test_broker_json_logs_are_only_json_lines(tmp_path: Path) -> None:
    args = ["broker", "--home", str(tmp_path / "brokerhome"), "--bind", "tcp://127.0.0.1:0", "--log-format", "json"]
    _, code, err = run_broker(tmp_path, "banner", args, clean_env())
    assert code == 0, err
    json_lines(err)


@pytest.mark.timeout(60)
def test_broker_metrics_port_in_use_is_a_configuration_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["broker", "--home", str(tmp_path / "home"), "--bind", "tcp://127.0.0.1:0", "--quiet"]
        res = run_zlink(*args, "--metrics", f"127.0.0.1:{port}", timeout=30)
    assert res.returncode == 2, res.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in res.stderr
