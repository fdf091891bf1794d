"""The ``zlink`` console script, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import zlink
from zlink.demo import LocalSwarm
from zlink.security import BrokerHome, load_keypair, read_cert

from .conftest import SKILLS, clean_env, free_port, run_zlink, start_swarm, wait_for, zlink_exe

NODES = ["cli-node-1", "cli-node-2"]
COMMANDS = ["broker", "invite", "allow", "revoke", "keygen", "node", "submit", "status", "demo"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with start_swarm(tmp_path_factory.mktemp("cli") / "home", NODES, slots=2) as sw:
        yield sw


@pytest.fixture(scope="module")
def client_join(swarm: LocalSwarm) -> str:
    return swarm.invite("client", "cli-client")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "no output"
    return lines[-1]


# --------------------------------------------------------------------------- broker home


class _CliBroker:
    """``zlink broker`` as a child process, its stderr in a file."""

    def __init__(self, home: Path, log: Path) -> None:
        self.home = home
        self.log = log
        self.err = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*zlink_exe(), "broker", "--home", str(home), "--bind", "tcp://127.0.0.1:0", "--log-level", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.err,
            env=clean_env(),
        )

    def wait_ready(self) -> str:
        # broker.json is written before the CLI installs its SIGTERM handler: wait for the
        # last banner line too, and for a real client round trip (see the report on this race)
        bh = BrokerHome(self.home)
        wait_for(lambda: self.proc.poll() is not None or bh.bound_endpoints(), timeout=20, what="the broker to bind")
        wait_for(
            lambda: self.proc.poll() is not None or "invite a peer" in self.log.read_text(),
            timeout=20,
            what="the broker's banner",
        )
        assert self.proc.poll() is None, f"the broker exited at start: {self.log.read_text()}"
        endpoint = bh.bound_endpoints()[0]
        with zlink.Client(bh.invite(name=f"probe-{uuid.uuid4().hex[:8]}", role="client", endpoints=[endpoint])) as c:
            assert c.status()["nodes"] == []
        return endpoint

    def stop(self) -> tuple[int, str]:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            self.err.close()
        return self.proc.returncode, self.log.read_text()


@pytest.mark.timeout(60)
def test_broker_creates_its_home_on_first_start_and_keeps_its_keys(tmp_path: Path) -> None:
    home = tmp_path / "brokerhome"
    assert not home.exists()

    broker = _CliBroker(home, tmp_path / "broker1.log")
    try:
        endpoint = broker.wait_ready()
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert (home / "broker.key").is_file()
        assert (home / "broker.key_secret").is_file()
        assert (home / "allowed").is_dir()
        assert stat.S_IMODE((home / "broker.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) & 0o077 == 0
        public = read_cert(home / "broker.key").public
        secret_cert = read_cert(home / "broker.key_secret")
        assert secret_cert.public == public and secret_cert.secret is not None
    finally:
        code, err = broker.stop()
    assert code == 0, err
    assert "created broker keys" in err
    assert f"broker public key: {public}" in err
    assert f"listening on {endpoint}" in err

    # second start: the same keys, nothing created
    (home / "broker.json").unlink()
    broker = _CliBroker(home, tmp_path / "broker2.log")
    try:
        broker.wait_ready()
    finally:
        code, err = broker.stop()
    assert code == 0, err
    assert "created broker keys" not in err
    assert read_cert(home / "broker.key").public == public


@pytest.mark.timeout(30)
def test_invite_without_a_broker_home_is_a_clear_error(tmp_path: Path) -> None:
    res = run_zlink("invite", "--home", str(tmp_path / "nothing-here"), "--name", "x", "--role", "node")
    assert res.returncode == 2
    assert "no broker keys" in res.stderr
    assert res.stdout == ""


# --------------------------------------------------------------------------- keys


@pytest.mark.timeout(60)
def test_invite_then_revoke(swarm: LocalSwarm) -> None:
    home = str(swarm.home)
    res = run_zlink("invite", "--home", home, "--name", "n1", "--role", "node")
    assert res.returncode == 0, res.stderr
    join = zlink.Join.parse(_last_line(res.stdout))
    assert join.name == "n1"
    assert join.role == "node"
    assert join.endpoints == (swarm.endpoint,)
    assert join.broker_key == BrokerHome(swarm.home).keys().public
    assert join.keys.secret is not None
    assert (swarm.home / "allowed" / "n1.key").is_file()
    assert read_cert(swarm.home / "allowed" / "n1.key").public == join.keys.public
    # the secret key is only in the join string, never on disk
    assert join.keys.secret not in (swarm.home / "allowed" / "n1.key").read_text()

    dup = run_zlink("invite", "--home", home, "--name", "n1", "--role", "client")
    assert dup.returncode == 2
    assert "already allowed" in dup.stderr

    res = run_zlink("revoke", "--home", home, "n1")
    assert res.returncode == 0, res.stderr
    assert not (swarm.home / "allowed" / "n1.key").exists()
    # and a node with that join string is now refused (exit code 3)
    node_env = clean_env(ZLINK_JOIN=join.dump())
    res = run_zlink("node", "--skills", str(SKILLS), "--log-level", "error", env=node_env, timeout=30)
    assert res.returncode == 3
    assert "authentication failed" in res.stderr


@pytest.mark.timeout(60)
def test_keygen_and_allow_bring_your_own_key(swarm: LocalSwarm, tmp_path: Path) -> None:
    keydir = tmp_path / "mykeys"
    res = run_zlink("keygen", "--out", str(keydir), "byok")
    assert res.returncode == 0, res.stderr
    pub, sec = keydir / "byok.key", keydir / "byok.key_secret"
    assert pub.is_file() and sec.is_file()
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    keys = load_keypair(sec)
    assert read_cert(pub).public == keys.public
    assert read_cert(pub).secret is None  # the public file holds no secret

    again = run_zlink("keygen", "--out", str(keydir), "byok")
    assert again.returncode == 2  # never overwrites a key
    assert load_keypair(sec) == keys

    join = zlink.Join(
        endpoints=(swarm.endpoint,), broker_key=read_cert(swarm.home / "broker.key").public, keys=keys, name="byok"
    )
    with pytest.raises(zlink.AuthenticationError):
        zlink.Client(join, connect_timeout=10)  # not allowed yet

    res = run_zlink("allow", "--home", str(swarm.home), str(pub), "--role", "client")
    assert res.returncode == 0, res.stderr
    assert "allowed 'byok' as client" in res.stdout
    with zlink.Client(join, connect_timeout=10, seal_key=swarm.seal_key) as c:  # the swarm seals payloads
        assert c.submit("square", 6).result(timeout=20) == 36
    res = run_zlink("revoke", "--home", str(swarm.home), "byok")
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- submit and status


@pytest.mark.timeout(60)
def test_submit_prints_the_result(client_join: str) -> None:
    res = run_zlink("submit", "--join", client_join, "square", "7")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "49"
    # an object is keyword arguments, '-' reads stdin; the join string may come from $ZLINK_JOIN
    res = run_zlink("submit", "add", '{"a": 2, "b": 5}', env=clean_env(ZLINK_JOIN=client_join))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "7"
    res = run_zlink("submit", "--join", client_join, "echo", "-", input='[{"k": [1, "two", null]}]')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"k": [1, "two", None]}


@pytest.mark.timeout(60)
def test_submit_of_a_failing_skill(client_join: str) -> None:
    res = run_zlink("submit", "--join", client_join, "fail")
    assert res.returncode == 1
    assert res.stdout == ""
    assert "task failed" in res.stderr
    assert "ValueError: boom" in res.stderr
    res = run_zlink("submit", "--join", client_join, "square", "7", "--timeout", "0.5")
    assert res.returncode == 0, res.stderr
    res = run_zlink("submit", "--join", client_join, "sleep_then", "[1, 30]", "--timeout", "0.5")
    assert res.returncode == 1
    assert "task failed" in res.stderr
    # the client's or the broker's deadline, whichever fires first
    assert "did not finish within its timeout of 0.5 s" in res.stderr or "task timed out while running" in res.stderr


@pytest.mark.timeout(60)
def test_submit_with_an_unreachable_broker_exits_3(client_join: str) -> None:
    good = zlink.Join.parse(client_join)
    dead = zlink.Join(
        endpoints=(f"tcp://127.0.0.1:{free_port()}",), broker_key=good.broker_key, keys=good.keys, name=good.name
    )
    t0 = time.monotonic()
    res = run_zlink("submit", "--join", dead.dump(), "--connect-timeout", "2", "square", "7", timeout=30)
    assert res.returncode == 3
    assert "could not reach the broker" in res.stderr
    assert res.stdout == ""
    assert time.monotonic() - t0 < 25


@pytest.mark.timeout(30)
def test_submit_with_bad_join_strings_exits_2() -> None:
    res = run_zlink("submit", "square", "7")
    assert res.returncode == 2
    assert "no join string" in res.stderr
    res = run_zlink("submit", "--join", "not-a-join-string", "square", "7")
    assert res.returncode == 2
    assert "not a zlink join string" in res.stderr
    res = run_zlink("submit", "--join", zlink.security.JOIN_PREFIX + "AAAA", "square", "7")
    assert res.returncode == 2
    assert "damaged" in res.stderr


@pytest.mark.timeout(60)
def test_status_lists_nodes_and_skills(client_join: str) -> None:
    res = run_zlink("status", "--join", client_join)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "nodes (2):" in out
    for name in NODES:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(name)), None)
        assert line is not None, out
        for skill in ("square", "add", "echo", "fail", "sleep_then", "whoami", "async_double"):
            assert skill in line
    res = run_zlink("status", "--join", client_join, "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert sorted(n["name"] for n in st["nodes"]) == NODES
    for n in st["nodes"]:
        assert n["skills"] == ["add", "async_double", "echo", "fail", "sleep_then", "square", "whoami"]
        assert n["slots"] == 2
    assert set(st["counters"]) >= {"done", "failed", "submitted", "protocol_errors"}


# --------------------------------------------------------------------------- demo


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (children of the demo inherit it)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.timeout(150)
def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    marker = f"ZLINK_IT_DEMO={uuid.uuid4().hex}"
    tmpdir = tmp_path / "demo-tmp"
    tmpdir.mkdir()
    env = clean_env(TMPDIR=str(tmpdir), ZLINK_IT_DEMO=marker.split("=", 1)[1])
    proc = subprocess.Popen(
        [*zlink_exe(), "demo", "--nodes", "2", "--limit", "40", "--no-sequential"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        leftovers = [p for p in _pids_with_env(marker) if p != proc.pid]
        for pid in leftovers:  # never leave them running, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, err
    assert "Audit report" in out
    assert "files 40" in out
    assert "Problems: none" in out
    assert "swarm:" in out and "2 node(s)" in out
    assert "audit-node-1" in out and "audit-node-2" in out
    assert leftovers == [], f"demo left processes behind: {leftovers}"
    assert list(tmpdir.iterdir()) == [], "demo left files in its temporary home"


# --------------------------------------------------------------------------- help and version


@pytest.mark.timeout(30)
def test_version() -> None:
    res = run_zlink("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"zlink, version {zlink.__version__}"


@pytest.mark.timeout(60)
def test_help_for_every_command() -> None:
    res = run_zlink("--help")
    assert res.returncode == 0
    for cmd in COMMANDS:
        assert cmd in res.stdout
    procs = {
        cmd: subprocess.Popen(
            [*zlink_exe(), cmd, "--help"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for cmd in COMMANDS
    }
    try:
        for cmd, p in procs.items():
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, (cmd, err)
            assert f"Usage: zlink {cmd}" in out
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
